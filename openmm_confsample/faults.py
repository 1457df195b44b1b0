"""Fault injection: a user's run meets NaN positions, infinite densities, raising proposals and raising forces.

:func:`run_fault_injection` runs Langevin MD with MH moves whose proposal (or the System's energy) fails in
one chosen way on a fraction of the candidates, and reports what a run must keep whatever happens (issue 13):
no crash, no non-finite state left in the Context, statistics that add up, and a temperature at the
thermostat's (a +inf correction once was accepted on a clash and heated alanine dipeptide to 1e19 K).
``tests/test_reliability.py`` runs it on every fault kind; ``benchmarks/fault_injection.py`` runs 10^5 moves
of each and prints the table.

Fault kinds (:data:`FAULTS`): ``nan_positions``/``inf_positions`` (a coordinate of the candidate),
``nan``/``+inf``/``-inf`` (its log-correction), ``clash`` (+inf correction on two atoms placed on each other),
``raising_proposal`` (the proposal raises on a call), ``raising_force`` (a PythonForce in the System raises
while a candidate's energy is evaluated).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import openmm
from openmm import unit

from .errors import ConfSampleError
from .moves.engine import MetropolisHastingsEngine, Proposal, ProposalBatch
from .runner import langevin_context, run_engine_steps
from .units import MOLAR_GAS_CONSTANT_KJ

FAULTS = ("nan_positions", "inf_positions", "nan", "+inf", "-inf", "clash", "raising_proposal", "raising_force")


class InjectedFault(RuntimeError):
    """The exception a faulty proposal or force raises on purpose."""


class FaultyProposal(Proposal):
    """Wraps a proposal and injects ``fault`` into a fraction ``rate`` of its candidates (or of its calls)."""

    def __init__(self, inner: Proposal, fault: str | None, rate: float = 0.2, raise_on_call: int | None = None):
        if fault is not None and fault not in FAULTS:
            raise ConfSampleError(f"fault must be one of {FAULTS} or None, got {fault!r}.")
        self.inner, self.fault, self.rate = inner, fault, float(rate)
        self.raise_on_call, self.calls = raise_on_call, 0  # also raise on exactly this call (1-based), if given
        self.cartesian = inner.cartesian

    def propose(self, positions_nm, n_proposals, rng):
        self.calls += 1
        if self.calls == self.raise_on_call or (self.fault == "raising_proposal" and rng.random() < self.rate):
            raise InjectedFault("proposal failed")
        batch = self.inner.propose(positions_nm, n_proposals, rng)
        hit = rng.random(n_proposals) < self.rate
        positions, correction = np.array(batch.positions), np.array(batch.log_correction, dtype=float)
        if self.fault == "nan_positions":
            positions[hit, 0, 0] = np.nan
        elif self.fault == "inf_positions":
            positions[hit, 1, 2] = np.inf
        elif self.fault in ("nan", "+inf", "-inf"):
            correction[hit] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[self.fault]
        elif self.fault == "clash":
            correction[hit] = np.inf
            positions[hit, 1] = positions[hit, 0]
        return ProposalBatch(positions, correction, batch.valid, batch.info)

    def accepted(self, batch, index):
        self.inner.accepted(batch, index)


class _RaisingComputation:
    """A PythonForce of zero energy that raises, while armed, on a fraction of its evaluations."""

    def __init__(self, n_atoms: int, rate: float, seed: int):
        self.n_atoms, self.rate, self.rng, self.armed = n_atoms, rate, np.random.default_rng(seed), False

    def __call__(self, state):
        if self.armed and self.rng.random() < self.rate:
            raise InjectedFault("force failed")
        return 0.0, np.zeros((self.n_atoms, 3))


@dataclass
class FaultReport:
    """What :func:`run_fault_injection` saw. ``temperature_K`` is the mean kinetic temperature of the run."""

    fault: str
    n_proposed: int
    n_accepted: int
    n_rejected_faulty: int
    n_raised: int
    n_nonfinite_states: int
    counters_add_up: bool
    temperature_K: float

    def as_row(self) -> dict:
        return dict(self.__dict__)


def run_fault_injection(molecular_system, proposal: Proposal, fault: str, n_moves: int, rate: float = 0.3,
                        md_steps: int = 5, n_proposals: int = 4, seed: int = 2) -> FaultReport:
    """Langevin MD (1 fs, 5/ps, from a minimised start) with ``n_moves`` MH candidates of ``proposal`` made faulty
    by ``fault``.

    Each iteration runs ``md_steps`` MD steps and two engine steps of ``n_proposals`` candidates; an
    exception the fault raises is caught (as a user's loop would), counted, and the run goes on.
    """
    system = molecular_system.system
    computation = None
    if fault == "raising_force":
        system = copy.deepcopy(system)
        computation = _RaisingComputation(system.getNumParticles(), rate, seed)
        system.addForce(openmm.PythonForce(computation))
        molecular_system = copy.copy(molecular_system)
        molecular_system.system = system
    engine = MetropolisHastingsEngine(FaultyProposal(proposal, fault, rate), n_proposals=n_proposals, seed=seed)
    context = langevin_context(molecular_system, timestep_fs=1.0, friction_per_ps=5.0, seed=seed)
    integrator = context.getIntegrator()
    kinetic, raised, nonfinite = [], 0, 0
    n_iterations = max(1, int(math.ceil(n_moves / (2 * n_proposals))))
    for _ in range(n_iterations):
        integrator.step(md_steps)
        if computation is not None:
            computation.armed = True
        try:
            run_engine_steps(context, engine, molecular_system.kT, n_attempts=2)
        except (InjectedFault, openmm.OpenMMException):
            raised += 1
        finally:
            if computation is not None:
                computation.armed = False
        state = context.getState(getEnergy=True, getPositions=True, getVelocities=True)
        values = (state.getPotentialEnergy()._value, state.getKineticEnergy()._value)
        if not (np.isfinite(values).all() and np.isfinite(state.getPositions(asNumpy=True)._value).all()
                and np.isfinite(state.getVelocities(asNumpy=True)._value).all()):
            nonfinite += 1
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
    stats = engine.statistics
    faulty = stats["n_nonfinite"] + stats["n_impossible"]
    rejected = stats["n_proposed"] - stats["n_accepted"]
    dof = 3 * system.getNumParticles() - system.getNumConstraints() - (
        3 if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()) else 0)
    # the first fifth is equilibration (minimised start, velocities drawn at the thermostat's temperature)
    temperature = 2.0 * float(np.mean(kinetic[len(kinetic) // 5:])) / (dof * MOLAR_GAS_CONSTANT_KJ)
    adds_up = (stats["n_accepted"] + faulty + stats["n_invalid"] <= stats["n_proposed"]
               and rejected >= faulty + stats["n_invalid"])
    return FaultReport(fault, stats["n_proposed"], stats["n_accepted"], faulty, raised, nonfinite, adds_up,
                       temperature)
