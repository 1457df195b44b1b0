"""The one Metropolis-Hastings engine every learned move runs on.

A :class:`Proposal` looks at the current positions and returns a :class:`ProposalBatch`: S candidate
structures and, for each, the log of everything in the acceptance ratio except the potential energy,

    log_correction = log q(x | x') - log q(x' | x)  [+ augmented-space terms, e.g. -(K(v') - K(v))]

The engine evaluates the reduced potential u = U/kT of each candidate through the OpenMM Context and
accepts with probability min(1, exp(-(u' - u) + log_correction)).

Batches are exact: one engine step with ``n_proposals = S`` is S ordinary MH steps. The S candidates of a
model call are independent draws from the current state; they are tried in order, each with its own
uniform number, and every rejection leaves the state where it was (so a rejected candidate counts as one
step, as in the Timewarp reference). When a candidate is accepted the state has changed, so the remaining
steps are proposed afresh from the new state (for an independence proposal that is a cheap draw from its
buffer). Stopping at the first acceptance instead would *not* be exact: the number of steps taken would
depend on the local acceptance rate, which biases the states seen between moves (an early version did
that; its batched exactness test failed at p = 4e-34).

Candidates with NaN/inf coordinates, energies or forces, or a NaN/+inf correction, are rejected and
counted in ``n_nonfinite`` (a +inf correction would otherwise be accepted whatever the energy: a clash at
1e6 kJ/mol once was, and the velocity correction then heated alanine dipeptide to 1e19 K); a -inf
correction (the reverse move is impossible) is rejected without an energy and counted in ``n_impossible``.
Whatever is raised inside a step (a proposal failing on a re-proposal, a KeyboardInterrupt during an
energy), the Context is left holding the last accepted (or the unchanged) state, the statistics count
what was done, and ``engine.last_result`` records the accepted moves so the caller can correct velocities.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass, field

import numpy as np
import openmm

from ..errors import ConfSampleError
from ..units import state_array, state_energy



@dataclass
class ProposalBatch:
    """S candidate structures from one proposal call.

    Attributes
    ----------
    positions : (S, n_atoms, 3) float, nm
    log_correction : (S,) float
        log q(x | x') - log q(x' | x) plus any augmented-space terms; 0 for a symmetric proposal.
    valid : (S,) bool, optional
        False marks a candidate the proposal itself refuses (e.g. a flipped stereocentre); it is rejected
        without an energy evaluation. The criterion must be symmetric in (x, x') to keep the move exact.
    info : dict
        Anything the proposal wants back in :meth:`Proposal.accepted`.
    """

    positions: np.ndarray
    log_correction: np.ndarray
    valid: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.positions)


class Proposal(abc.ABC):
    """A proposal distribution for Metropolis-Hastings moves in an OpenMM system.

    Subclasses implement :meth:`propose` and, for openmmtools serialization, :meth:`get_config`
    (a dict of plain Python values from which ``type(self).from_config`` rebuilds an equivalent proposal;
    models are referenced by path, never stored by value).
    """

    #: Proposals that move atoms independently (Cartesian) cannot keep constraint lengths, so they refuse
    #: systems with constraints; rigid torsion rotations keep bond lengths and set this to False.
    cartesian: bool = True

    def check_system(self, system: openmm.System) -> None:
        """Raise ConfSampleError if this proposal cannot be used on ``system``."""
        if self.cartesian and system.getNumConstraints() > 0:
            raise ConfSampleError(
                f"{type(self).__name__} moves atoms independently and cannot keep the system's "
                f"{system.getNumConstraints()} constraints; build the System with constraints=None."
            )

    @abc.abstractmethod
    def propose(self, positions_nm: np.ndarray, n_proposals: int, rng: np.random.Generator) -> ProposalBatch:
        """Draw ``n_proposals`` candidates from the current positions ((n_atoms, 3) float, nm)."""

    def accepted(self, batch: ProposalBatch, index: int) -> None:
        """Called when candidate ``index`` of ``batch`` was accepted (lets proposals cache what they know)."""

    def get_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not support serialization.")

    @classmethod
    def from_config(cls, config: dict) -> "Proposal":
        return cls(**config)


#: A kT above this (kJ/mol; 100 kJ/mol is 12,000 K) is a temperature in kelvin passed as kT.
_MAX_PLAUSIBLE_KT_KJ = 100.0


def _checked_start(positions_nm, potential_kJ) -> tuple[np.ndarray, float]:
    """The state a move starts from, as an array and a float; ConfSampleError when it is not finite (a simulation
    that blew up before the move, or NaN passed in), instead of an error deep inside a proposal."""
    positions_nm, potential_kJ = np.asarray(positions_nm, dtype=float), float(potential_kJ)
    if not np.isfinite(positions_nm).all():
        raise ConfSampleError("the move starts from positions that are not finite (NaN or inf): the simulation blew up "
                              "before the move, or non-finite positions were passed in.")
    if not math.isfinite(potential_kJ):
        raise ConfSampleError(f"the move starts from a potential energy of {potential_kJ} kJ/mol, not finite: the "
                              f"simulation blew up before the move, or the positions overlap.")
    return positions_nm, potential_kJ


def _checked_kT(kT_kJ) -> float:
    try:
        value = float(kT_kJ)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfSampleError(f"kT must be a positive thermal energy in kJ/mol, got {kT_kJ!r}.")
    if value > _MAX_PLAUSIBLE_KT_KJ:
        raise ConfSampleError(
            f"kT of {value:g} kJ/mol is over {_MAX_PLAUSIBLE_KT_KJ:g} kJ/mol (a temperature in kelvin passed as kT?); "
            f"kT at 300 K is 2.494 kJ/mol (units.kT_kJ_per_mol)."
        )
    return value


def _finite_forces(context: openmm.Context) -> bool:
    return bool(np.isfinite(state_array(context.getState(getForces=True), "forces")).all())


def _new_statistics() -> dict:
    return {
        "n_moves": 0,
        "n_proposed": 0,
        "n_accepted": 0,
        "n_nonfinite": 0,
        "n_impossible": 0,
        "n_invalid": 0,
        "proposal_seconds": 0.0,
        "energy_seconds": 0.0,
        "total_seconds": 0.0,
    }


@dataclass
class MoveResult:
    """What one engine step did: accepted candidates, final positions (nm) and energy (kJ/mol), candidates tried.

    ``forces`` ((n_atoms, 3) kJ/mol/nm) are the final state's when the step accepted a candidate and read them
    (the engine reads them with the candidate's energy, at no extra cost), else None.
    """

    n_accepted: int
    positions_nm: np.ndarray
    potential_kJ: float
    n_tried: int
    forces: np.ndarray | None = None

    @property
    def accepted(self) -> bool:
        return self.n_accepted > 0


class MetropolisHastingsEngine:
    """Runs MH steps of a :class:`Proposal` on an OpenMM Context.

    Parameters
    ----------
    proposal : Proposal
    n_proposals : int, default 1
        MH steps per :meth:`step` (S), proposed in one model call and re-proposed after each acceptance.
    seed : int or numpy.random.Generator, optional
        Seeds the proposal draws and the acceptance tests.
    exploration_threshold_kT : float, optional
        Exploration mode, NOT exact: no MH test; a candidate is accepted unless its energy is more than this
        many kT above the current one. ``statistics['exact']`` is False and every report must say biased.

    Statistics (``engine.statistics``, a plain dict; ``reset_statistics()`` clears it): n_moves (calls of
    :meth:`step`), n_proposed (candidates tried), n_accepted, n_nonfinite (rejected for NaN/inf positions, energies, forces or NaN/+inf corrections),
    n_impossible (a -inf correction),
    n_invalid (refused by the proposal), proposal/energy/total seconds, and the derived acceptance_rate and
    seconds_per_proposal.
    """

    def __init__(self, proposal: Proposal, n_proposals: int = 1, seed=None, exploration_threshold_kT: float | None = None):
        if not isinstance(proposal, Proposal):
            raise ConfSampleError(f"proposal must be an openmm_confsample Proposal, got {type(proposal).__name__}.")
        if int(n_proposals) < 1:
            raise ConfSampleError(f"n_proposals must be at least 1, got {n_proposals}.")
        self.proposal = proposal
        self.n_proposals = int(n_proposals)
        if exploration_threshold_kT is not None and not np.isfinite(exploration_threshold_kT):
            raise ConfSampleError(f"exploration_threshold_kT must be a finite number, got {exploration_threshold_kT}.")
        self.exploration_threshold_kT = exploration_threshold_kT
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._stats = _new_statistics()
        # The last Context whose System was checked (one slot: Context.getSystem() returns a new wrapper on
        # every call, so a cache keyed by id(system) grew by one entry per step and checked every time).
        self._checked_context = None
        self.last_result: MoveResult | None = None

    # -- statistics -----------------------------------------------------------------------------------
    @property
    def statistics(self) -> dict:
        stats = dict(self._stats)
        stats["acceptance_rate"] = stats["n_accepted"] / stats["n_proposed"] if stats["n_proposed"] else 0.0
        stats["seconds_per_proposal"] = stats["total_seconds"] / stats["n_proposed"] if stats["n_proposed"] else 0.0
        stats["exact"] = self.exploration_threshold_kT is None
        return stats

    @statistics.setter
    def statistics(self, value: dict) -> None:
        fresh = _new_statistics()
        for key in fresh:
            if key in value:
                fresh[key] = type(fresh[key])(value[key])
        self._stats = fresh

    def reset_statistics(self) -> None:
        self._stats = _new_statistics()

    # -- the step -------------------------------------------------------------------------------------
    def check_context(self, context: openmm.Context) -> None:
        """Refuse a system the proposal cannot handle (checked once per System object)."""
        if context is not self._checked_context:
            self.proposal.check_system(context.getSystem())
            self._checked_context = context

    def step(self, context: openmm.Context, kT_kJ: float, positions_nm: np.ndarray | None = None,
             potential_kJ: float | None = None) -> MoveResult:
        """``n_proposals`` MH steps on ``context`` at thermal energy ``kT_kJ`` (one model call when none is accepted).

        Parameters
        ----------
        context : openmm.Context
            Holds the current state on entry and the accepted (or unchanged) state on exit. Velocities,
            box vectors and parameters are not touched.
        kT_kJ : float, kJ/mol
        positions_nm, potential_kJ : optional
            The current positions ((n_atoms, 3) nm) and potential energy (kJ/mol) if the caller already
            has them; otherwise they are read from the context.
        """
        self.last_result = None
        kT_kJ = _checked_kT(kT_kJ)
        start = time.perf_counter()
        stats = self._stats
        self.check_context(context)
        if positions_nm is None or potential_kJ is None:
            state = context.getState(getPositions=True, getEnergy=True)
            positions_nm, potential_kJ = state_array(state, "positions"), state_energy(state)
        positions_nm, potential_kJ = _checked_start(positions_nm, potential_kJ)
        beta = 1.0 / kT_kJ
        u_current = beta * potential_kJ

        stats["n_moves"] += 1
        n_accepted = 0
        n_tried = 0
        energy_seconds = 0.0
        remaining = self.n_proposals
        touched = False
        forces = None
        try:
            while remaining > 0:
                t0 = time.perf_counter()
                batch = self.proposal.propose(positions_nm, remaining, self.rng)
                stats["proposal_seconds"] += time.perf_counter() - t0
                if len(batch) != remaining:
                    raise RuntimeError(f"{type(self.proposal).__name__} returned {len(batch)} candidates, not {remaining}.")
                accepted_index = -1
                for s in range(len(batch)):
                    remaining -= 1
                    n_tried += 1
                    stats["n_proposed"] += 1
                    if batch.valid is not None and not batch.valid[s]:
                        stats["n_invalid"] += 1
                        continue
                    candidate = batch.positions[s]
                    correction = float(batch.log_correction[s])
                    if correction == -math.inf:  # the reverse move is impossible: rejected without an energy
                        stats["n_impossible"] += 1
                        continue
                    if not math.isfinite(correction) or not np.isfinite(candidate).all():
                        stats["n_nonfinite"] += 1
                        continue
                    t0 = time.perf_counter()
                    touched = True
                    try:  # forces come with the energy on OpenMM's platforms (same time measured): read once
                        context.setPositions(candidate)
                        state = context.getState(getEnergy=True, getForces=True)
                        energy = state_energy(state)
                    except openmm.OpenMMException:
                        energy = math.nan
                    energy_seconds += time.perf_counter() - t0
                    if not math.isfinite(energy):
                        stats["n_nonfinite"] += 1
                        continue
                    if self.exploration_threshold_kT is not None:  # biased exploration: an energy cap, no MH
                        accept = beta * energy - u_current <= self.exploration_threshold_kT
                    else:
                        log_alpha = -(beta * energy - u_current) + correction
                        accept = log_alpha >= 0.0 or math.log(self.rng.random()) < log_alpha
                    if accept:  # never accept a state MD cannot continue from
                        candidate_forces = state_array(state, "forces")
                        if not np.isfinite(candidate_forces).all():
                            stats["n_nonfinite"] += 1
                            continue
                        accepted_index = s
                        break
                if accepted_index < 0:
                    break
                n_accepted += 1
                stats["n_accepted"] += 1
                positions_nm = np.array(batch.positions[accepted_index])
                potential_kJ = energy
                forces = candidate_forces
                u_current = beta * energy
                touched = False  # the context holds the accepted candidate
                self.proposal.accepted(batch, accepted_index)
        finally:
            if touched:  # leave the last accepted state, also when something was raised
                context.setPositions(positions_nm)
            stats["energy_seconds"] += energy_seconds
            stats["total_seconds"] += time.perf_counter() - start
            self.last_result = MoveResult(n_accepted, positions_nm, potential_kJ, n_tried, forces)
        return self.last_result
