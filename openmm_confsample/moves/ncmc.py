"""Nonequilibrium candidate Monte Carlo (NCMC): a learned jump of the solute, relaxed by its environment.

In water an instantaneous torsion jump of a solute almost always lands its atoms on water molecules
(alanine dipeptide: 0.5 % acceptance in a TIP3P box against 12.5 % in implicit solvent). NCMC (Nilmeier et
al., PNAS 2011; BLUES) makes the change gradually: the solute's interactions with its environment are
softened over ``ncmc_steps / 2`` Langevin steps, the proposal's jump is made at the midpoint, and the
interactions are restored over ``ncmc_steps / 2`` more steps while the environment relaxes around the new
conformation. The candidate is accepted with

    min(1, exp(-W) q(tau_mid) / q(tau'))

W the total reduced work of the protocol and q the proposal's density (any :class:`~.engine.Proposal`: its
``log_correction`` at the midpoint is log q(tau_mid) - log q(tau')).

Why it is exact
---------------
The state is (x, v) on the constraint manifold at the current box; the target is
pi(x, v) ~ exp(-u(x) - k(v)), u = U/kT of the user's System, k = K/kT.

1. Fresh Maxwell-Boltzmann velocities v0 are drawn (a Gibbs step: leaves pi invariant).
2. The proposal path: N/2 steps of :class:`~.ncmc_protocol.NCMCIntegrator` (openmmtools' Langevin steps,
   ``V R O H O R V`` by default: a palindrome; H moves the softened parameters along a schedule symmetric
   about the midpoint), the jump x_m -> x_m' (the proposal; a rigid torsion rotation has unit Jacobian, also on the
   HBonds/rigid-water constraint manifold, whose measure depends on bond angles only), a fresh draw of the
   velocities at x_m' (the rotation leaves the velocities of constrained atoms off the new tangent space;
   a full velocity refresh is an O step with infinite friction: heat, no work), and N/2 more steps.
3. Each substep is either deterministic and reversible (V, R with RATTLE constraints; H; the jump, an
   involution on (x, tau)) or satisfies detailed balance with respect to the Maxwell-Boltzmann distribution
   (O, the refresh). So the probability of the reverse path -- from (x_T, -v_T), the same schedule read
   backwards (it is symmetric), the reverse jump proposing tau_m -- over that of the forward path is
   exp(-W) q(tau_m) / q(tau') times pi(x0, v0) / pi(x_T, v_T), with W = Delta E - Q: the change of total
   energy u + k minus the heat Q of the O steps and the refresh. W is the protocol work of H, the jump's work
   and the integrator's shadow work; leaving out the shadow work is not exact (``tests/test_ncmc.py``).
4. MH on paths with that ratio leaves pi invariant with the end state (x_T, -v_T) on acceptance and
   (x0, v0) on rejection; reversing the velocities afterwards (pi is symmetric in v) gives what the
   Context holds: (x_T, v_T) when accepted, (x0, -v0) when rejected.

The protocol runs on its own Context (a copy of the System softened by a
:class:`~.ncmc_protocol.Perturbation`, without barostat and COM remover) at the current box, so the move
keeps pi(x, v | box) and the user's barostat keeps the volume's distribution. The copy need not equal the
user's System at lambda = 1: switching from the user's potential to the copy's at the start and back at the
end adds u(x_T) - u_copy(x_T) - [u(x0) - u_copy(x0)] to W. The velocities the Context gets are on-step
samples of pi (a velocity reassignment, for the user's integrator), so no half-step correction is applied
(``sets_velocities``). ``ncmc_steps = 0`` is the instantaneous move: the plain MH step of the engine.

The dragged-torsion protocol (:class:`~.ncmc_protocol.TorsionDrive`)
---------------------------------------------------------------------
No jump and nothing softened: a restraint kappa(lambda) sum_i [1 - cos(theta_i - a_i - p(lambda) d_i)] on the
proposal's torsions is switched on at an anchor a, its centre dragged along the shorter arc d to a target b,
and switched off, all in ``ncmc_steps`` steps of the same integrator, so the water moves aside as the solute
turns. The proposal must be an independence proposal with a torsion density q (``sample_torsions`` and
``log_density``). The auxiliary pair (a, b) is drawn as a ~ VM(theta(x0), c) (von Mises about the current
torsions, concentration c = ``anchor_concentration``) and b ~ q; the reverse move, from the end state, would
draw its anchor b about theta(x_T) and its target a from q, and drive the schedule that is ours read backwards
(kappa is symmetric in lambda, and a + p(1 - lambda) d = b - p(lambda) d). By the argument above (steps 1, 3,
4, with no jump and no refresh) the path ratio is exp(-W) times the ratio of the auxiliary densities, so

    min(1, exp(-W) VM(b; theta(x_T), c) q(a) / [VM(a; theta(x0), c) q(b)])

is exact, whatever the end torsions theta(x_T) are (the restraint need not land on b). W = Delta E - Q again
includes the restraint's work and the integrator's shadow work; the restraint is off at both ends, so the
protocol's potential there is the user's (no endpoint term beyond the box-fixed copy's).
"""

from __future__ import annotations

import math
import time

import numpy as np
import openmm
from openmm import unit

from ..checks import positive_float, positive_int
from ..errors import ConfSampleError
from ..geometry.torsions import dihedral_angles
from ..runner import openmm_seed
from ..systems.builders import as_molecular_system
from ..units import KJ_PER_MOL as _KJ, MOLAR_GAS_CONSTANT_KJ, NM as _NM
from .engine import MetropolisHastingsEngine, MoveResult, Proposal, _checked_kT, _checked_start, _finite_forces
from .mcmc import LearnedMCMCMove
from .ncmc_protocol import (SPLITTING, NCMCIntegrator, Perturbation, SoluteDecoupling, TorsionDrive,
                            check_splitting, perturbation_from_config)
from .proposals import von_mises_logpdf, wrap_angle

__all__ = ["NCMCEngine", "NCMCMove", "solute_diffusion_proposal"]

_NM_PER_PS = _NM / unit.picosecond
#: NCMC statistics on top of the engine's (plain numbers; kept through openmmtools storage).
_NCMC_KEYS = {"n_protocols": 0, "n_protocol_steps": 0, "n_energy_evaluations": 0, "n_stopped_at_midpoint": 0,
              "n_failed_protocols": 0, "protocol_seconds": 0.0, "sum_work_kT": 0.0, "sum_jump_work_kT": 0.0,
              "sum_protocol_work_kT": 0.0, "sum_drive_miss_rad": 0.0}


class _ProtocolContext:
    """The protocol's Context for one user Context: the softened System, its integrator and masses."""

    def __init__(self, user_context: openmm.Context, engine: "NCMCEngine", kT: float, seed: int):
        self.user_context = user_context
        system = engine.perturbation.build_system(user_context.getSystem())
        self.kT = kT
        self.integrator = NCMCIntegrator(engine.perturbation.functions(system), engine.ncmc_steps, self.temperature_K,
                                         engine.collision_rate_per_ps, engine.timestep_fs, seed, engine.splitting,
                                         engine.measure_protocol_work)
        platform = user_context.getPlatform()
        properties = {}
        for name in platform.getPropertyNames():  # same platform and settings (threads, device) as the user's
            try:
                properties[name] = platform.getPropertyValue(user_context, name)
            except openmm.OpenMMException:
                pass
        self.context = openmm.Context(system, self.integrator, platform, properties)
        self.drive_force = TorsionDrive.drive_force(system) if isinstance(engine.perturbation, TorsionDrive) else None
        self.masses_amu = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                                    for i in range(system.getNumParticles())])

    @property
    def temperature_K(self) -> float:
        return self.kT / MOLAR_GAS_CONSTANT_KJ

    def set_kT(self, kT: float) -> None:
        if kT != self.kT:
            self.kT = kT
            self.integrator.setTemperature(self.temperature_K * unit.kelvin)

    def kinetic_kJ(self, velocities) -> float:
        """0.5 sum m v^2 of (n_atoms, 3) nm/ps velocities, kJ/mol (the integrator's heat uses the same)."""
        return 0.5 * float(np.sum(self.masses_amu[:, None] * np.square(velocities)))

    def refresh_velocities(self, rng: np.random.Generator) -> np.ndarray:
        """Maxwell-Boltzmann velocities at the current positions (OpenMM applies the constraints), nm/ps."""
        self.context.setVelocitiesToTemperature(self.temperature_K * unit.kelvin,
                                                openmm_seed(int(rng.integers(0, 2**31 - 2))))
        return self.context.getState(getVelocities=True).getVelocities(asNumpy=True).value_in_unit(_NM_PER_PS)

    def read(self):
        """(positions nm, velocities nm/ps, potential kJ/mol) of the protocol Context."""
        state = self.context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        return (state.getPositions(asNumpy=True).value_in_unit(_NM),
                state.getVelocities(asNumpy=True).value_in_unit(_NM_PER_PS),
                state.getPotentialEnergy().value_in_unit(_KJ))

    def potential_kJ(self) -> float:
        try:
            return self.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(_KJ)
        except openmm.OpenMMException:
            return math.nan


class NCMCEngine(MetropolisHastingsEngine):
    """An MH engine whose candidates are relaxed by a nonequilibrium protocol (module docstring).

    Parameters
    ----------
    proposal : Proposal
        Proposes the jump made at the protocol's midpoint (e.g. a ``TorsionDiffusionProposal`` or a
        ``VonMisesMixtureProposal`` over the solute's torsions).
    perturbation : Perturbation
        What the protocol softens: :class:`~.ncmc_protocol.SoluteDecoupling` for a solvated system,
        :class:`~.ncmc_protocol.ParameterSoftening` for a System with its own coupling parameters.
    ncmc_steps : int, default 100
        Langevin steps of the protocol, half before and half after the jump (even); 0 is the instantaneous move.
    timestep_fs : float, default 2, fs
    collision_rate_per_ps : float, default 1, 1/ps
    seed : int or numpy.random.Generator, optional
        Seeds the proposals, the velocity draws, the integrator's noise and the acceptance tests.
    splitting : str, default ``ncmc_protocol.SPLITTING``
        openmmtools' letters for one protocol step: a palindrome with H (the parameter update) in its middle.
    measure_protocol_work : bool, default False
        Also accumulate the work of the H steps (a diagnostic: two energies of the softened forces per step;
        the acceptance uses the total work, which needs none).

    Statistics: the engine's (one candidate per protocol) plus n_protocols, n_protocol_steps,
    n_energy_evaluations (energies outside the integrator), n_stopped_at_midpoint (candidates refused at the
    midpoint: the rest of the protocol is skipped), n_failed_protocols (NaN coordinates or constraint failures
    after the jump: rejected), protocol_seconds, mean_work_kT (the total work of
    completed protocols, the one in the test), mean_jump_work_kT (the midpoint jump's share), with
    ``measure_protocol_work`` mean_protocol_work_kT (the H steps' share), and the cost: md_step_equivalents
    (protocol steps + energies, each about one MD step's force evaluation) and md_step_equivalents_per_move.

    Examples
    --------
    >>> engine = NCMCEngine.for_system(proposal, get_system("alanine-dipeptide-explicit"), ncmc_steps=2000)  # doctest: +SKIP
    >>> simulation.reporters.append(LearnedMoveReporter(engine, interval=500))  # doctest: +SKIP
    """

    def __init__(self, proposal: Proposal, perturbation: Perturbation, ncmc_steps: int = 100,
                 timestep_fs: float = 2.0, collision_rate_per_ps: float = 1.0, seed=None, splitting: str = SPLITTING,
                 measure_protocol_work: bool = False):
        super().__init__(proposal, 1, seed)
        self.splitting = check_splitting(splitting)
        self.measure_protocol_work = bool(measure_protocol_work)
        if not isinstance(perturbation, Perturbation):
            raise ConfSampleError(f"perturbation must be a SoluteDecoupling or ParameterSoftening, got "
                                  f"{type(perturbation).__name__}.")
        self.ncmc_steps = positive_int(ncmc_steps, "ncmc_steps", minimum=0)
        if self.ncmc_steps % 2:
            raise ConfSampleError(f"ncmc_steps must be even (half before, half after the midpoint jump), got "
                                  f"{self.ncmc_steps}.")
        if isinstance(perturbation, TorsionDrive):
            _check_drivable(proposal, perturbation)
        self.perturbation = perturbation
        self.timestep_fs = positive_float(timestep_fs, "timestep_fs")
        self.collision_rate_per_ps = positive_float(collision_rate_per_ps, "collision_rate_per_ps", allow_zero=True)
        self._ncmc = dict(_NCMC_KEYS)
        self._protocol = None
        # Negative controls of the exactness tests only: a wrong work ("no_shadow": H steps and jump only;
        # "no_jump": without the midpoint jump's work), or a jump off the midpoint (an asymmetric protocol).
        self._wrong_work = None
        self._jump_step = None

    @classmethod
    def for_system(cls, proposal: Proposal, molecular_system, ncmc_steps: int = 1000, electrostatics_midpoint=0.0,
                   sterics_midpoint=0.5, solute_atoms=None, timestep_fs=None, protocol: str = "decouple",
                   **options) -> "NCMCEngine":
        """An engine that softens the solute of a solvated ``molecular_system`` (its ``solute_atoms`` by default),
        or, with ``protocol="drive"``, drags the proposal's torsions with :class:`~.ncmc_protocol.TorsionDrive`
        (its defaults; build one yourself for other settings).

        Midpoints as for :class:`~.ncmc_protocol.SoluteDecoupling`: by default the solute's charges off and
        its sterics halved (alanine dipeptide in water, 1000-step protocols with basin jumps: mean work 46 kT
        against 79 kT with sterics off, where water fills the cavity, and about 120 kT with sterics on, where
        the jump lands on water). ``timestep_fs`` defaults to the system's own (``MolecularSystem.timestep_fs``),
        else 2 fs; ``options``
        are the constructor's (seed, collision_rate_per_ps, splitting, measure_protocol_work). The proposal's
        torsions must move solute atoms only.
        """
        molecular_system = as_molecular_system(molecular_system)
        solute = molecular_system.solute_atoms if solute_atoms is None else np.asarray(solute_atoms, dtype=int)
        moved = getattr(getattr(proposal, "torsion_set", None), "torsions", None)
        if moved is not None and not np.isin(np.asarray(moved), solute).all():
            raise ConfSampleError(f"the proposal's torsions {np.asarray(moved).tolist()} include atoms outside the "
                                  f"solute of '{molecular_system.name}'; learned moves act on the solute only.")
        timestep_fs = timestep_fs or getattr(molecular_system, "timestep_fs", None) or 2.0
        if protocol == "drive":
            if moved is None:
                raise ConfSampleError(f"protocol 'drive' drags torsions; the proposal {type(proposal).__name__} has no "
                                      "torsion_set.")
            return cls(proposal, TorsionDrive(moved), ncmc_steps, timestep_fs, **options)
        if protocol != "decouple":
            raise ConfSampleError(f"protocol must be 'decouple' (soften the solute, jump at the midpoint) or 'drive' "
                                  f"(drag the torsions), got {protocol!r}.")
        return cls(proposal, SoluteDecoupling(solute, electrostatics_midpoint, sterics_midpoint), ncmc_steps,
                   timestep_fs, **options)

    @property
    def options(self) -> dict:
        """The constructor's keyword options of this engine (plain values)."""
        return {"timestep_fs": self.timestep_fs, "collision_rate_per_ps": self.collision_rate_per_ps,
                "splitting": self.splitting, "measure_protocol_work": self.measure_protocol_work}

    @property
    def sets_velocities(self) -> bool:
        """True when the move leaves new velocities in the Context (no half-step correction after it)."""
        return self.ncmc_steps > 0

    # -- statistics -----------------------------------------------------------------------------------
    @property
    def statistics(self) -> dict:
        stats = MetropolisHastingsEngine.statistics.fget(self)
        stats.update(self._ncmc)
        n = stats["n_protocols"]
        stats["ncmc_steps"] = self.ncmc_steps
        completed = n - stats["n_stopped_at_midpoint"] - stats["n_failed_protocols"]
        for name in ("work", "jump_work") + (("protocol_work",) if self.measure_protocol_work else ()):
            stats[f"mean_{name}_kT"] = stats[f"sum_{name}_kT"] / completed if completed > 0 else 0.0
        stats["mean_drive_miss_rad"] = stats["sum_drive_miss_rad"] / completed if completed > 0 else 0.0
        stats["md_step_equivalents"] = stats["n_protocol_steps"] + stats["n_energy_evaluations"]
        stats["md_step_equivalents_per_move"] = stats["md_step_equivalents"] / max(stats["n_proposed"], 1)
        return stats

    @statistics.setter
    def statistics(self, value: dict) -> None:
        MetropolisHastingsEngine.statistics.fset(self, value)
        self._ncmc = {key: type(default)(value.get(key, default)) for key, default in _NCMC_KEYS.items()}

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self._ncmc = dict(_NCMC_KEYS)

    # -- the move -------------------------------------------------------------------------------------
    def _protocol_for(self, context: openmm.Context, kT: float) -> _ProtocolContext:
        """The protocol Context of ``context`` (one slot: rebuilt when the user's Context changes)."""
        if self._protocol is None or self._protocol.user_context is not context:
            self._protocol = None  # free the old Context first
            seed = openmm_seed(int(self.rng.integers(0, 2**31 - 2)))
            self._protocol = _ProtocolContext(context, self, kT, seed)
        self._protocol.set_kT(kT)
        return self._protocol

    def step(self, context: openmm.Context, kT_kJ: float, positions_nm: np.ndarray | None = None,
             potential_kJ: float | None = None) -> MoveResult:
        """One NCMC move on ``context`` at thermal energy ``kT_kJ`` (kJ/mol); see the module docstring.

        On exit the Context holds the accepted end state with its velocities, or the start positions with
        the reversed fresh velocities (also when something was raised); its box vectors are never changed.
        """
        if self.ncmc_steps == 0:  # the instantaneous move: the engine's plain MH step (velocities kept)
            result = super().step(context, kT_kJ, positions_nm, potential_kJ)
            self._ncmc["n_energy_evaluations"] += result.n_tried
            return result
        self.last_result = None
        kT = _checked_kT(kT_kJ)
        start = time.perf_counter()
        stats, ncmc = self._stats, self._ncmc
        self.check_context(context)
        if positions_nm is None or potential_kJ is None:
            state = context.getState(getPositions=True, getEnergy=True)
            positions_nm = state.getPositions(asNumpy=True).value_in_unit(_NM)
            potential_kJ = state.getPotentialEnergy().value_in_unit(_KJ)
            ncmc["n_energy_evaluations"] += 1
        x0, u0 = _checked_start(positions_nm, potential_kJ)
        x0 = x0.copy()
        stats["n_moves"] += 1
        stats["n_proposed"] += 1
        protocol = v0 = result = None
        touched = False
        try:
            protocol = self._protocol_for(context, kT)
            protocol.integrator.reset()
            protocol.context.setPeriodicBoxVectors(*context.getState().getPeriodicBoxVectors())
            protocol.context.setPositions(x0)
            v0 = protocol.refresh_velocities(self.rng)
            end = self._run_protocol(protocol, kT, protocol.kinetic_kJ(v0))
            if end is not None:
                x_t, v_t, u_copy_change, work_kT, h_work_kT, jump_kT, correction = end
                touched = True
                context.setPositions(x_t)
                u_t = _potential_kJ(context)
                ncmc["n_energy_evaluations"] += 1
                # from the user's potential to the protocol's at the start, and back at the end
                endpoint_kT = ((u_t - u0) - u_copy_change) / kT
                ncmc["sum_work_kT"] += work_kT + endpoint_kT
                ncmc["sum_jump_work_kT"] += jump_kT
                ncmc["sum_protocol_work_kT"] += h_work_kT
                work = {"no_shadow": h_work_kT + jump_kT, "no_jump": work_kT - jump_kT}.get(self._wrong_work, work_kT)
                if self._accept(context, u_t, correction - work - endpoint_kT):
                    context.setVelocities(v_t)
                    stats["n_accepted"] += 1
                    result = MoveResult(1, x_t, u_t, 1)
        finally:
            if result is None:  # the start positions with the fresh velocities reversed (module docstring, 4.)
                if touched:
                    context.setPositions(x0)
                if v0 is not None:
                    context.setVelocities(-v0)
            stats["total_seconds"] += time.perf_counter() - start
            self.last_result = result or MoveResult(0, x0, u0, 1)
        return self.last_result

    def _accept(self, context, u_t: float, log_alpha: float) -> bool:
        stats = self._stats
        if not (math.isfinite(u_t) and math.isfinite(log_alpha)):
            stats["n_nonfinite"] += 1
            return False
        accept = log_alpha >= 0.0 or math.log(self.rng.random()) < log_alpha
        if accept and not _finite_forces(context):  # never accept a state MD cannot continue from
            stats["n_nonfinite"] += 1
            return False
        return accept

    def _run_protocol(self, protocol: _ProtocolContext, kT: float, k_start_kJ: float):
        """Both halves and the midpoint jump, from the state set in ``protocol``. None when the candidate is
        refused (at the midpoint, or non-finite), else (x_T nm, v_T nm/ps, u_copy(x_T) - u_copy(x0) kJ/mol,
        W kT, the H steps' work kT (0 unless measured), the jump's work kT, the proposal's log correction);
        W without endpoint terms."""
        if isinstance(self.perturbation, TorsionDrive):
            return self._run_drive(protocol, kT, k_start_kJ)
        stats, ncmc = self._stats, self._ncmc
        t0 = time.perf_counter()
        u_start = protocol.potential_kJ()
        half = self.ncmc_steps // 2 if self._jump_step is None else int(self._jump_step)
        ncmc["n_protocols"] += 1
        ncmc["n_protocol_steps"] += half
        try:
            protocol.integrator.step(half)
            x_m, v_m, u_m = protocol.read()
        except openmm.OpenMMException:  # NaN coordinates or a constraint failure: a rejection like any other
            stats["n_nonfinite"] += 1
            ncmc["n_stopped_at_midpoint"] += 1
            return None
        ncmc["n_energy_evaluations"] += 2
        ncmc["protocol_seconds"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = self.proposal.propose(x_m, 1, self.rng)
        stats["proposal_seconds"] += time.perf_counter() - t0
        correction = float(batch.log_correction[0])
        refused = None
        if batch.valid is not None and not batch.valid[0]:
            refused = "n_invalid"
        elif correction == -math.inf:  # the reverse move is impossible
            refused = "n_impossible"
        elif not math.isfinite(correction) or not np.isfinite(batch.positions[0]).all():
            refused = "n_nonfinite"
        else:
            t0 = time.perf_counter()
            protocol.context.setPositions(batch.positions[0])
            u_jumped = protocol.potential_kJ()
            ncmc["n_energy_evaluations"] += 1
            stats["energy_seconds"] += time.perf_counter() - t0
            if not math.isfinite(u_jumped):
                refused = "n_nonfinite"
        if refused is not None:
            stats[refused] += 1
            ncmc["n_stopped_at_midpoint"] += 1
            return None

        t0 = time.perf_counter()
        # the refresh at the midpoint: heat, not work (module docstring, 2.)
        heat_kJ = protocol.kinetic_kJ(protocol.refresh_velocities(self.rng)) - protocol.kinetic_kJ(v_m)
        rest = self.ncmc_steps - half
        ncmc["n_protocol_steps"] += rest
        ncmc["n_energy_evaluations"] += 1
        end = self._steps_to_end(protocol, rest, t0)
        if end is None:
            return None
        x_t, v_t, u_t = end
        heat_kJ += protocol.integrator.getGlobalVariableByName("heat")
        work_kJ = (u_t + protocol.kinetic_kJ(v_t)) - (u_start + k_start_kJ) - heat_kJ
        h_work_kJ = protocol.integrator.getGlobalVariableByName("protocol_work")
        return x_t, v_t, u_t - u_start, work_kJ / kT, h_work_kJ / kT, (u_jumped - u_m) / kT, correction

    def _steps_to_end(self, protocol: _ProtocolContext, n_steps: int, t0: float):
        """``n_steps`` protocol steps, then the end state ``(x, v, u)``; None, counted as a failed protocol, when the
        integrator raised or anything came out non-finite. ``t0`` starts the protocol_seconds clock."""
        try:
            protocol.integrator.step(n_steps)
            x_t, v_t, u_t = protocol.read()
        except openmm.OpenMMException:
            x_t = v_t = None
        self._ncmc["protocol_seconds"] += time.perf_counter() - t0
        if x_t is None or not (math.isfinite(u_t) and np.isfinite(x_t).all() and np.isfinite(v_t).all()):
            self._stats["n_nonfinite"] += 1
            self._ncmc["n_failed_protocols"] += 1
            return None
        return x_t, v_t, u_t

    def _run_drive(self, protocol: _ProtocolContext, kT: float, k_start_kJ: float):
        """A :class:`~.ncmc_protocol.TorsionDrive` protocol from the state set in ``protocol``; returns as
        :meth:`_run_protocol` (the jump's work is 0: there is none)."""
        stats, ncmc = self._stats, self._ncmc
        drive = self.perturbation
        concentration = drive.anchor_concentration
        t0 = time.perf_counter()
        target, log_q_target = self.proposal.sample_torsions(1, self.rng)
        target, log_q_target = np.asarray(target[0], dtype=float), float(log_q_target[0])
        stats["proposal_seconds"] += time.perf_counter() - t0
        if not (math.isfinite(log_q_target) and np.isfinite(target).all()):
            stats["n_nonfinite"] += 1
            ncmc["n_stopped_at_midpoint"] += 1
            return None
        state = protocol.context.getState(getPositions=True, getEnergy=True)
        theta_0 = dihedral_angles(state.getPositions(asNumpy=True).value_in_unit(_NM), drive.torsions)
        u_start = state.getPotentialEnergy().value_in_unit(_KJ)  # the restraint is off at lambda = 0
        anchor = wrap_angle(theta_0 + self.rng.vonmises(0.0, concentration, size=theta_0.shape))
        TorsionDrive.set_path(protocol.drive_force, protocol.context, anchor, wrap_angle(target - anchor))
        ncmc["n_protocols"] += 1
        ncmc["n_protocol_steps"] += self.ncmc_steps
        ncmc["n_energy_evaluations"] += 2
        end = self._steps_to_end(protocol, self.ncmc_steps, t0)
        if end is None:
            return None
        x_t, v_t, u_t = end
        theta_t = dihedral_angles(x_t, drive.torsions)
        ncmc["sum_drive_miss_rad"] += float(np.mean(np.abs(wrap_angle(theta_t - target))))
        t0 = time.perf_counter()
        log_q_anchor = float(self.proposal.log_density(anchor[None])[0])
        stats["proposal_seconds"] += time.perf_counter() - t0
        # the reverse move draws its anchor (our target) about theta_T and its target (our anchor) from q
        anchors = (float(von_mises_logpdf(target, theta_t, concentration).sum())
                   - float(von_mises_logpdf(anchor, theta_0, concentration).sum()))
        correction = {"no_anchor_terms": log_q_anchor - log_q_target, "no_q_terms": anchors}.get(
            self._wrong_work, log_q_anchor - log_q_target + anchors)
        heat_kJ = protocol.integrator.getGlobalVariableByName("heat")
        work_kJ = (u_t + protocol.kinetic_kJ(v_t)) - (u_start + k_start_kJ) - heat_kJ
        h_work_kJ = protocol.integrator.getGlobalVariableByName("protocol_work")
        return x_t, v_t, u_t - u_start, work_kJ / kT, h_work_kJ / kT, 0.0, correction

def _check_drivable(proposal: Proposal, drive: TorsionDrive) -> None:
    """ConfSampleError unless ``proposal`` is an independence proposal over exactly the torsions ``drive`` drags."""
    if not (callable(getattr(proposal, "sample_torsions", None)) and callable(getattr(proposal, "log_density", None))):
        raise ConfSampleError(f"a TorsionDrive protocol needs a proposal with a torsion density (sample_torsions and "
                              f"log_density: TorsionResamplingProposal, TorsionDiffusionProposal, "
                              f"VonMisesMixtureProposal), got {type(proposal).__name__}.")
    torsions = np.asarray(getattr(getattr(proposal, "torsion_set", None), "torsions", np.empty((0, 4))))
    if torsions.shape != drive.torsions.shape or not np.array_equal(torsions, drive.torsions):
        raise ConfSampleError(f"the TorsionDrive drags torsions {drive.torsions.tolist()} but the proposal samples "
                              f"{torsions.tolist()}; they must be the same, in the same order.")


def _potential_kJ(context: openmm.Context) -> float:
    try:
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(_KJ)
    except openmm.OpenMMException:
        return math.nan


class NCMCMove(LearnedMCMCMove):
    """openmmtools MCMC move: a proposal's jump relaxed by an NCMC protocol (:class:`NCMCEngine`).

    Works wherever a ``LearnedMCMCMove`` does (``MCMCSampler``, ``SequenceMove``, replica exchange and
    parallel tempering, storage); the sampler state takes the Context's new velocities. Parameters as for
    :class:`NCMCEngine`, plus ``n_attempts`` (protocols per application).

    Examples
    --------
    >>> ala = get_system("alanine-dipeptide-explicit")  # doctest: +SKIP
    >>> move = NCMCMove.for_system(solute_diffusion_proposal("alanine-dipeptide", ala), ala, ncmc_steps=2000)  # doctest: +SKIP
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=500), move])  # doctest: +SKIP
    """

    def __init__(self, proposal: Proposal, perturbation: Perturbation, ncmc_steps: int = 100, n_attempts: int = 1,
                 seed=None, **options):
        super().__init__(proposal, n_attempts=n_attempts, seed=seed)
        self.engine = NCMCEngine(proposal, perturbation, ncmc_steps, seed=seed, **options)

    @classmethod
    def for_system(cls, proposal: Proposal, molecular_system, ncmc_steps: int = 1000, n_attempts: int = 1, seed=None,
                   **options) -> "NCMCMove":
        """Soften the solute of a solvated system: a MolecularSystem or the user's running ``openmm.app.Simulation``
        (options as for :meth:`NCMCEngine.for_system`)."""
        engine = NCMCEngine.for_system(proposal, molecular_system, ncmc_steps, seed=seed, **options)
        return cls(proposal, engine.perturbation, engine.ncmc_steps, n_attempts, seed, **engine.options)

    def __getstate__(self):
        state = super().__getstate__()
        state.update({"perturbation": self.engine.perturbation.get_config(), "ncmc_steps": self.engine.ncmc_steps,
                      "options": self.engine.options})
        return state

    @staticmethod
    def _engine_from_state(proposal, serialization):
        return NCMCEngine(proposal, perturbation_from_config(serialization["perturbation"]),
                          serialization["ncmc_steps"], seed=serialization.get("seed"), **serialization["options"])


def solute_diffusion_proposal(model, molecular_system, buffer_size: int = 2048):
    """A ``TorsionDiffusionProposal`` on the solute of ``molecular_system`` (a MolecularSystem or a running
    ``openmm.app.Simulation``; solvated or not).

    ``model`` is a ``TorsionDiffusionModel``, a checkpoint path or a shipped model's name, trained on this very
    system or on its solute alone (in vacuum or implicit solvent: the same atoms and bonds without water); the
    second case is said once (``moves.torsion_diffusion.check_model_matches_system``).
    """
    from .torsion_diffusion import TorsionDiffusionProposal

    return TorsionDiffusionProposal.for_system(model, as_molecular_system(molecular_system), buffer_size)
