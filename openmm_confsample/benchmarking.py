"""Budgeted samplers and their comparison: how much equilibrium sampling does a wall-clock second buy?

Every sampler runs on a :class:`~openmm_confsample.systems.MolecularSystem` for a wall-clock budget and
returns a :class:`SamplerRun` (phi/psi in radians at a fixed interval, energy evaluations, acceptance)::

    ala = get_system("alanine-dipeptide-implicit")
    md = run_plain_md(ala, wall_seconds=60)
    learned = run_md_with_moves(ala, TorsionDiffusionProposal.for_system(path, ala), wall_seconds=60,
                                method="MD+TorsionDiffusionMove")
    pt = run_parallel_tempering(ala, wall_seconds=60)
    reference = run_reference(ala, wall_seconds=300, cache_path="benchmarks/cache/ala_reference.npz")
    rows = summarize([md, learned, pt], reference)
    print(markdown_table(rows))

The observable is the indicator of phi > 0 (the rare alpha_L/C7ax half of alanine dipeptide): its
effective sample size per wall second is the figure of merit, and Delta F = F(phi > 0) - F(phi < 0) in kT
with a block-averaging error is compared with an independent exact reference (:func:`run_reference`, MD
with broad basin torsion moves, cached to an .npz).

Every clock starts after the same preparation (minimization, equilibration and, for parallel tempering,
one warm-up iteration), so the budgets compare sampling and not set-up. Methods other than Timewarp are
built here; a Timewarp model plugs in through :func:`method_table` (its ``timewarp`` slot is filled when a
model path is given) without this module importing it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import openmm
from openmm import unit

from .errors import ConfSampleError
from .runner import openmm_seed
from .geometry.torsions import TorsionSet, dihedral_angles
from .moves.engine import MetropolisHastingsEngine, Proposal
from .moves.proposals import alanine_basin_proposal
from .moves.reporter import run_engine_steps
from .systems import MolecularSystem, kT_kJ_per_mol, to_kelvin

__all__ = [
    "SamplerRun",
    "ReferenceEstimate",
    "TrainingResult",
    "phi_psi_torsions",
    "run_plain_md",
    "run_md_with_moves",
    "run_parallel_tempering",
    "run_reference",
    "basin_proposal",
    "train_torsion_model",
    "train_learned_bias",
    "method_table",
    "summarize",
    "indicator_ess",
    "indicator_entries",
    "markdown_table",
    "plot_comparison",
    "REFERENCE_SETTINGS",
]

_NM = unit.nanometer
_KJ = unit.kilojoule_per_mole


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class SamplerRun:
    """What one budgeted sampler produced.

    Attributes
    ----------
    method : str
        Label used in tables and plots.
    phi, psi : (N,) float, radians
        Sampled at a fixed interval of the sampler (after each MD segment and its moves, or each
        parallel-tempering iteration at the lowest temperature).
    wall_seconds : float, s
        Time spent sampling (the clock starts after minimization/equilibration/warm-up).
    n_energy_evaluations : int
        Potential-energy/force evaluations: MD steps, MH candidates scored, energies read before
        moves, and the replica-by-state energy matrix of parallel tempering.
    acceptance : dict
        Move statistics (engine statistics, exchange acceptance of parallel tempering, ...).
    exact : bool
        True when every move is an exact MCMC move (False for biased exploration modes).
    weights : (N,) float, optional
        Sample weights (None: unweighted).
    sample_times : (N,) float, s
        Wall-clock time since the start of the clock at which each sample was taken.
    settings : dict
        The sampler's parameters (plain values).
    """

    method: str
    phi: np.ndarray
    psi: np.ndarray
    wall_seconds: float
    n_energy_evaluations: int
    acceptance: dict = field(default_factory=dict)
    exact: bool = True
    weights: np.ndarray | None = None
    sample_times: np.ndarray | None = None
    settings: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(len(self.phi))

    @property
    def angles(self) -> np.ndarray:
        """(N, 2) float, radians: phi and psi columns."""
        return np.column_stack([self.phi, self.psi])

    def check(self) -> None:
        """Raise ConfSampleError when the run produced no samples or non-finite output."""
        if self.n_samples == 0:
            raise ConfSampleError(f"sampler '{self.method}' produced no samples in {self.wall_seconds:.1f} s.")
        finite = np.isfinite(self.phi).all() and np.isfinite(self.psi).all()
        if self.weights is not None:
            finite = finite and np.isfinite(self.weights).all()
        if not finite or not np.isfinite(self.wall_seconds):
            raise ConfSampleError(f"sampler '{self.method}' produced non-finite angles, weights or times.")

    def to_dict(self, arrays: bool = False) -> dict:
        """Plain-value summary (JSON-ready); the angle arrays only when ``arrays``."""
        out = {
            "method": self.method,
            "n_samples": self.n_samples,
            "wall_seconds": float(self.wall_seconds),
            "n_energy_evaluations": int(self.n_energy_evaluations),
            "acceptance": _plain(self.acceptance),
            "exact": bool(self.exact),
            "settings": _plain(self.settings),
        }
        if arrays:
            out["phi"] = self.phi.tolist()
            out["psi"] = self.psi.tolist()
        return out


@dataclass
class ReferenceEstimate:
    """An exact, independent estimate of P(phi > 0) with its block-averaging error.

    Attributes
    ----------
    p_phi_positive, p_error : float
        P(phi > 0) and its standard error (block averaging over ``n_blocks`` contiguous blocks).
    delta_f_kT, delta_f_error_kT : float, kT
        F(phi > 0) - F(phi < 0) and its error.
    run : SamplerRun
        The samples (used for JSD and the TICA fit).
    settings : dict
    from_cache : bool
    cache_path : str or None
    """

    p_phi_positive: float
    p_error: float
    delta_f_kT: float
    delta_f_error_kT: float
    run: SamplerRun
    settings: dict
    from_cache: bool = False
    cache_path: str | None = None

    def to_dict(self) -> dict:
        return {
            "p_phi_positive": self.p_phi_positive,
            "p_error": self.p_error,
            "delta_f_kT": self.delta_f_kT,
            "delta_f_error_kT": self.delta_f_error_kT,
            "n_samples": self.run.n_samples,
            "wall_seconds": self.run.wall_seconds,
            "acceptance": _plain(self.run.acceptance),
            "settings": _plain(self.settings),
            "from_cache": self.from_cache,
            "cache_path": self.cache_path,
        }


@dataclass
class TrainingResult:
    """A trained torsion model on disk and what it cost.

    Attributes
    ----------
    path : str
        The checkpoint.
    data_seconds, train_seconds : float, s
        Wall time to generate the training data and to train.
    n_train : int
        Training angles (rows).
    settings : dict
        Data and model settings (also stored in the checkpoint's metadata).
    model : TorsionDiffusionModel
    """

    path: str
    data_seconds: float
    train_seconds: float
    n_train: int
    settings: dict
    model: object = None

    @property
    def total_seconds(self) -> float:
        return self.data_seconds + self.train_seconds


def _plain(value):
    """numpy scalars/arrays -> Python numbers/lists, recursively (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# helpers


def phi_psi_torsions(molsys: MolecularSystem) -> np.ndarray:
    """(2, 4) int: the system's phi and psi torsions ('phi'/'psi', else the first 'phi:...'/'psi:...')."""
    chosen = []
    for kind in ("phi", "psi"):
        names = [n for n in molsys.torsions if n == kind] or [n for n in molsys.torsions if n.startswith(kind)]
        if not names:
            raise ConfSampleError(
                f"system '{molsys.name}' has no '{kind}' torsion (it has {list(molsys.torsions)}); the benchmarks "
                "measure the phi/psi of a peptide."
            )
        chosen.append(molsys.torsions[names[0]])
    return np.array(chosen, dtype=int)


def _check_budget(wall_seconds) -> float:
    try:
        value = float(wall_seconds)
    except (TypeError, ValueError):
        raise ConfSampleError(f"wall_seconds must be a number of seconds, got {wall_seconds!r}.") from None
    if not np.isfinite(value) or value <= 0:
        raise ConfSampleError(f"wall_seconds must be positive, got {wall_seconds!r}.")
    return value


def _positive_int(value, name: str) -> int:
    if int(value) != value or int(value) < 1:
        raise ConfSampleError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class _Clock:
    """Wall clock of a budgeted run with an optional progress bar in seconds."""

    def __init__(self, wall_seconds: float, progress: bool, desc: str):
        self.budget = wall_seconds
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(wall_seconds, 1), desc=desc, unit="s", bar_format=(
                "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"))
        self.start = time.perf_counter()
        self._shown = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def running(self, **postfix) -> bool:
        now = self.elapsed()
        if self.bar is not None and now - self._shown >= 0.5:
            self.bar.update(round(min(now, self.budget) - self._shown, 1))
            self._shown = round(min(now, self.budget), 1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        return now < self.budget

    def close(self) -> float:
        now = self.elapsed()
        if self.bar is not None:
            self.bar.update(max(0.0, round(self.budget - self._shown, 1)))
            self.bar.close()
        return now


def _prepared_context(molsys: MolecularSystem, integrator, platform: str, seed: int, temperature_K: float,
                      equilibration_steps: int, positions_nm=None) -> openmm.Context:
    """A context minimized, given velocities and equilibrated (all before any clock starts)."""
    integrator.setRandomNumberSeed(openmm_seed(seed))  # never 0, which OpenMM reads as random
    context = molsys.create_context(platform, integrator, positions_nm)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, openmm_seed(seed, offset=1))
    if equilibration_steps > 0:
        integrator.step(int(equilibration_steps))
    return context


def _langevin(temperature_K: float, friction_per_ps: float, timestep_fs: float) -> openmm.LangevinMiddleIntegrator:
    if not timestep_fs > 0 or friction_per_ps < 0:
        raise ConfSampleError(
            f"timestep_fs must be positive and friction_per_ps non-negative, got {timestep_fs} and {friction_per_ps}."
        )
    return openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                           timestep_fs * unit.femtosecond)


def _as_engine(move, n_proposals: int, seed) -> MetropolisHastingsEngine:
    """A fresh engine for a Proposal; a given engine (or a LearnedMCMCMove's) as it is, statistics cleared."""
    if isinstance(move, Proposal):
        return MetropolisHastingsEngine(move, n_proposals, seed)
    engine = move if isinstance(move, MetropolisHastingsEngine) else getattr(move, "engine", None)
    if isinstance(engine, MetropolisHastingsEngine):
        engine.reset_statistics()
        return engine
    raise ConfSampleError(
        f"proposal must be a Proposal, MetropolisHastingsEngine or LearnedMCMCMove, got {type(move).__name__}."
    )


# ------------------------------------------------------------------------------------------------
# budgeted samplers


def run_plain_md(molsys: MolecularSystem, wall_seconds: float, timestep_fs: float = 1.0, friction_per_ps: float = 1.0,
                 sample_every_steps: int = 50, seed: int = 0, platform: str = "Reference", temperature_K=None,
                 equilibration_steps: int = 1000, method: str = "MD", progress: bool = False,
                 positions_nm=None, bias=None, bias_backend: str = "auto") -> SamplerRun:
    """Langevin MD (LangevinMiddleIntegrator) for ``wall_seconds`` of wall clock, optionally with a learned bias.

    Parameters
    ----------
    molsys : MolecularSystem
    wall_seconds : float, s
    timestep_fs : float, fs
    friction_per_ps : float, 1/ps
    sample_every_steps : int
        MD steps between recorded (phi, psi).
    seed : int
        Seeds velocities and the integrator's noise.
    platform : str
    temperature_K : float, optional
        Default: the system's temperature.
    equilibration_steps : int
        Steps after minimization, before the clock starts.
    bias : LearnedTorsionBias or path, optional
        A learned torsion bias (:mod:`openmm_confsample.bias`, e.g. from :func:`train_learned_bias`) added to
        a copy of the System; each sample's bias energy is read from the bias's force group and the run
        carries the weights ``exp(+B/kT)`` that make its averages unbiased.
    bias_backend : {'auto', 'torchforce', 'pythonforce'}
    """
    wall_seconds = _check_budget(wall_seconds)
    sample_every_steps = _positive_int(sample_every_steps, "sample_every_steps")
    temperature_K = molsys.temperature_K if temperature_K is None else to_kelvin(temperature_K)
    quads = phi_psi_torsions(molsys)
    bias_group, extra = None, {}
    if bias is not None:
        from .bias import with_learned_bias

        molsys, added = with_learned_bias(molsys, bias, bias_backend)
        bias_group = {added.force_group}
        extra = {"bias_backend": added.backend, "bias_factor": added.module.bias_factor}
    integrator = _langevin(temperature_K, friction_per_ps, timestep_fs)
    context = _prepared_context(molsys, integrator, platform, seed, temperature_K, equilibration_steps, positions_nm)
    angles, times, bias_kJ = [], [], []
    n_steps = 0
    clock = _Clock(wall_seconds, progress, method)
    while clock.running(samples=len(angles)):
        integrator.step(sample_every_steps)
        n_steps += sample_every_steps
        if bias_group is None:
            state = context.getState(getPositions=True)
        else:
            state = context.getState(getPositions=True, getEnergy=True, groups=bias_group)
            bias_kJ.append(state.getPotentialEnergy().value_in_unit(_KJ))
        angles.append(dihedral_angles(state.getPositions(asNumpy=True).value_in_unit(_NM), quads))
        times.append(clock.elapsed())
    wall = clock.close()
    angles = np.array(angles).reshape(-1, 2)
    weights = None
    if bias_group is not None:
        from .bias import reweighting_weights

        weights = reweighting_weights(np.array(bias_kJ), kT_kJ_per_mol(temperature_K))
    return SamplerRun(method, angles[:, 0], angles[:, 1], wall, n_steps, {}, True, weights, np.array(times), {
        "kind": "md" if bias is None else "biased md", "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps,
        "sample_every_steps": sample_every_steps, "seed": seed, "platform": platform, "temperature_K": temperature_K,
        "md_steps": n_steps, "simulated_ps": n_steps * timestep_fs * 1e-3, **extra})


def run_md_with_moves(molsys: MolecularSystem, proposal, wall_seconds: float, md_steps_per_segment: int = 50,
                      moves_per_segment: int = 1, n_proposals: int = 1, seed: int = 0, timestep_fs: float = 1.0,
                      friction_per_ps: float = 1.0, platform: str = "Reference", equilibration_steps: int = 1000,
                      method: str | None = None, progress: bool = False, positions_nm=None,
                      temperature_K=None, velocity_correction: bool = True) -> SamplerRun:
    """MD segments interleaved with Metropolis-Hastings moves on the same Context, for ``wall_seconds``.

    Each segment is ``md_steps_per_segment`` Langevin steps followed by ``moves_per_segment`` engine steps
    of ``n_proposals`` MH candidates each; (phi, psi) is recorded after every segment. The move changes
    positions only and keeps the on-step velocities, which leaves the joint Boltzmann distribution invariant.
    LangevinMiddleIntegrator stores half-step velocities ``v - (dt/2) F(x)/m``, so after a segment whose
    moves changed x to x' they are shifted by ``(dt/2) (F(x) - F(x'))/m`` (one force evaluation per such
    segment); ``velocity_correction=False`` skips this and lets every accepted jump heat the system.

    Parameters
    ----------
    proposal : Proposal, MetropolisHastingsEngine or LearnedMCMCMove
        E.g. ``TorsionDiffusionProposal.for_system(path, molsys)`` or :func:`basin_proposal`. An engine (or
        a move's engine) is used as it is, with its own ``n_proposals`` and random stream; its statistics
        are reset.
    md_steps_per_segment : int
        0 gives a pure MC chain (valid for torsion moves only as far as they are ergodic).
    moves_per_segment, n_proposals : int
    velocity_correction : bool
        Shift the half-step velocities after accepted jumps (see above).

    Returns
    -------
    SamplerRun
        ``acceptance`` holds the engine statistics plus ``ms_per_proposal`` (engine wall time per candidate,
        model calls and energies included) and ``moves_per_second``.
    """
    wall_seconds = _check_budget(wall_seconds)
    md_steps_per_segment = int(md_steps_per_segment)
    if md_steps_per_segment < 0:
        raise ConfSampleError(f"md_steps_per_segment must be non-negative, got {md_steps_per_segment}.")
    moves_per_segment = _positive_int(moves_per_segment, "moves_per_segment")
    engine = _as_engine(proposal, n_proposals, np.random.default_rng([int(seed), 7]))
    proposal = engine.proposal
    method = method or f"MD+{type(proposal).__name__}"
    temperature_K = molsys.temperature_K if temperature_K is None else to_kelvin(temperature_K)
    kT = kT_kJ_per_mol(temperature_K)
    quads = phi_psi_torsions(molsys)
    integrator = _langevin(temperature_K, friction_per_ps, timestep_fs)
    context = _prepared_context(molsys, integrator, platform, seed, temperature_K, equilibration_steps, positions_nm)
    # LangevinMiddleIntegrator keeps half-step velocities; run_engine_steps shifts them after accepted jumps
    # (see moves.reporter). Without it every accepted jump injects kinetic energy (+70 K with moves every 10 steps).
    angles, times = [], []
    n_steps = n_segments = n_force_reads = 0
    clock = _Clock(wall_seconds, progress, method)
    while clock.running(samples=len(angles), acc=f"{engine.statistics['acceptance_rate']:.2f}"):
        if md_steps_per_segment:
            integrator.step(md_steps_per_segment)
            n_steps += md_steps_per_segment
        if velocity_correction:
            accepted = run_engine_steps(context, engine, kT, moves_per_segment)
            n_force_reads += int(accepted > 0)
            positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(_NM)
        else:
            positions = energy = None
            for _ in range(moves_per_segment):
                result = engine.step(context, kT, positions, energy)
                positions, energy = result.positions_nm, result.potential_kJ
        n_segments += 1
        angles.append(dihedral_angles(positions, quads))
        times.append(clock.elapsed())
    wall = clock.close()
    stats = engine.statistics
    n_scored = stats["n_proposed"] - stats["n_invalid"]
    stats["ms_per_proposal"] = 1e3 * stats["total_seconds"] / max(stats["n_proposed"], 1)
    stats["moves_per_second"] = stats["n_proposed"] / wall
    stats["md_fraction_of_wall"] = 1.0 - stats["total_seconds"] / wall
    angles = np.array(angles).reshape(-1, 2)
    n_energy = n_steps + n_scored + n_segments + n_force_reads
    return SamplerRun(method, angles[:, 0], angles[:, 1], wall, n_energy, stats,
                      bool(stats.get("exact", True)), None, np.array(times), {
                          "kind": "md+moves", "proposal": type(proposal).__name__,
                          "md_steps_per_segment": md_steps_per_segment, "moves_per_segment": moves_per_segment,
                          "n_proposals": engine.n_proposals, "timestep_fs": timestep_fs,
                          "friction_per_ps": friction_per_ps, "seed": seed, "platform": platform,
                          "temperature_K": temperature_K, "md_steps": n_steps, "segments": n_segments,
                          "velocity_correction": velocity_correction, "velocity_corrections": n_force_reads,
                          "simulated_ps": n_steps * timestep_fs * 1e-3})


@contextlib.contextmanager
def _quiet_openmmtools():
    """Silence openmmtools/pymbar logging and pymbar's import-time banner."""
    loggers = [logging.getLogger(name) for name in ("openmmtools", "pymbar", "mpiplus")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from openmmtools import multistate  # noqa: F401  (first import prints the banner)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_parallel_tempering(molsys: MolecularSystem, wall_seconds: float, n_replicas: int = 4, t_min: float = 300.0,
                           t_max: float = 550.0, steps_per_iteration: int = 500, seed: int = 0,
                           timestep_fs: float = 1.0, friction_per_ps: float = 1.0, platform: str = "Reference",
                           learned_move=None, method: str | None = None, progress: bool = False,
                           equilibration_steps: int = 1000) -> SamplerRun:
    """openmmtools parallel tempering, iteration by iteration until ``wall_seconds`` are spent.

    Replicas at ``n_replicas`` geometrically spaced temperatures from ``t_min`` to ``t_max`` (K) each run
    ``steps_per_iteration`` steps of ``LangevinDynamicsMove`` (velocities redrawn at the replica's new
    temperature each iteration: carried-over velocities bias the cold state after an exchange, see
    benchmarks/README.md) (optionally followed by ``learned_move``, a
    ``LearnedMCMCMove``, in a ``SequenceMove``), then exchange. Storage goes to a temporary directory that
    is removed afterwards; contexts live in Reference-platform caches. One warm-up iteration runs before
    the clock starts (numba compiles the mixing code on the first iteration). The lowest-temperature
    state's (phi, psi) is recorded after every iteration.

    Energy evaluations per iteration: ``n_replicas * steps_per_iteration`` (MD) ``+ n_replicas**2``
    (the exchange energy matrix) ``+`` whatever the learned move scores.
    """
    wall_seconds = _check_budget(wall_seconds)
    n_replicas = _positive_int(n_replicas, "n_replicas")
    steps_per_iteration = _positive_int(steps_per_iteration, "steps_per_iteration")
    t_min, t_max = to_kelvin(t_min, "t_min"), to_kelvin(t_max, "t_max")
    if n_replicas < 2 or t_max <= t_min:
        raise ConfSampleError(f"parallel tempering needs n_replicas >= 2 and t_max > t_min, got "
                              f"{n_replicas}, {t_min} K, {t_max} K.")
    method = method or ("PT" if learned_move is None else "PT+learned move")
    quads = phi_psi_torsions(molsys)
    with _quiet_openmmtools():
        from openmmtools import cache, mcmc, multistate

        np.random.seed(int(seed) % 2**32)  # openmmtools mixes replicas with numpy's global generator
        platform_obj = openmm.Platform.getPlatformByName(platform)
        # equilibrated start at t_min, shared by all replicas
        integrator = _langevin(t_min, friction_per_ps, timestep_fs)
        context = _prepared_context(molsys, integrator, platform, seed, t_min, equilibration_steps)
        start_nm = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(_NM)
        del context, integrator
        dynamics = mcmc.LangevinDynamicsMove(timestep=timestep_fs * unit.femtosecond,
                                             collision_rate=friction_per_ps / unit.picosecond,
                                             n_steps=steps_per_iteration, reassign_velocities=True)
        moves = dynamics if learned_move is None else mcmc.SequenceMove([dynamics, learned_move])
        sampler = multistate.ParallelTemperingSampler(mcmc_moves=moves, number_of_iterations=2**31 - 1,
                                                      online_analysis_interval=None)
        directory = tempfile.mkdtemp(prefix="confsample-pt-")
        reporter = multistate.MultiStateReporter(os.path.join(directory, "pt.nc"), checkpoint_interval=1000)
        try:
            # openmmtools prints citations on the first iteration
            with contextlib.redirect_stdout(io.StringIO()):
                sampler.create(molsys.thermodynamic_state(t_min), molsys.sampler_state(start_nm), reporter,
                               min_temperature=t_min * unit.kelvin, max_temperature=t_max * unit.kelvin,
                               n_temperatures=n_replicas)
                sampler.energy_context_cache = cache.ContextCache(platform=platform_obj)
                sampler.sampler_context_cache = cache.ContextCache(platform=platform_obj)
                sampler.run(n_iterations=1)  # warm-up: numba compilation, context creation
            learned_stats_before = _learned_statistics(sampler) if learned_move is not None else None
            angles, times = [], []
            n_iterations = 0
            accepted = np.zeros((n_replicas, n_replicas))
            proposed = np.zeros((n_replicas, n_replicas))
            phi_positive_by_state = np.zeros(n_replicas)
            clock = _Clock(wall_seconds, progress, method)
            while clock.running(samples=len(angles)):
                sampler.run(n_iterations=1)
                n_iterations += 1
                # openmmtools resets the swap matrices every iteration
                accepted += np.asarray(sampler._n_accepted_matrix, dtype=float)
                proposed += np.asarray(sampler._n_proposed_matrix, dtype=float)
                states = np.asarray(sampler._replica_thermodynamic_states)
                for replica, state_index in enumerate(states):
                    x = np.asarray(sampler._sampler_states[replica].positions.value_in_unit(_NM))
                    phi_psi = dihedral_angles(x, quads)
                    phi_positive_by_state[state_index] += phi_psi[0] > 0
                    if state_index == 0:
                        angles.append(phi_psi)
                times.append(clock.elapsed())
            wall = clock.close()
            temperatures = [s.temperature.value_in_unit(unit.kelvin) for s in sampler._thermodynamic_states]
            n_learned = 0
            acceptance = {
                "exchange_acceptance": float(accepted.sum() / proposed.sum()) if proposed.sum() else 0.0,
                "neighbour_exchange_acceptance": [
                    float((accepted[i, i + 1] + accepted[i + 1, i]) / (proposed[i, i + 1] + proposed[i + 1, i]))
                    if proposed[i, i + 1] + proposed[i + 1, i] else 0.0 for i in range(n_replicas - 1)],
                "iterations": n_iterations,
                "p_phi_positive_by_state": (phi_positive_by_state / max(n_iterations, 1)).tolist(),
            }
            if learned_move is not None:
                after = _learned_statistics(sampler)
                delta = {k: after[k] - learned_stats_before[k] for k in ("n_proposed", "n_accepted", "n_invalid",
                                                                           "total_seconds")}
                n_learned = delta["n_proposed"] - delta["n_invalid"] + n_replicas * n_iterations
                acceptance["learned_n_proposed"] = delta["n_proposed"]
                acceptance["acceptance_rate"] = delta["n_accepted"] / max(delta["n_proposed"], 1)
                acceptance["ms_per_proposal"] = 1e3 * delta["total_seconds"] / max(delta["n_proposed"], 1)
        finally:
            reporter.close()
            shutil.rmtree(directory, ignore_errors=True)
    angles = np.array(angles).reshape(-1, 2)
    n_energy = n_iterations * (n_replicas * steps_per_iteration + n_replicas**2) + n_learned
    return SamplerRun(method, angles[:, 0], angles[:, 1], wall, n_energy, acceptance, True, None, np.array(times), {
        "kind": "pt", "n_replicas": n_replicas, "temperatures_K": temperatures,
        "steps_per_iteration": steps_per_iteration, "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps,
        "seed": seed, "platform": platform, "learned_move": type(learned_move).__name__ if learned_move else None,
        "md_steps": n_iterations * n_replicas * steps_per_iteration})


def _learned_statistics(sampler) -> dict:
    """Sum of the learned moves' statistics over the sampler's per-replica copies of the move."""
    total = {"n_proposed": 0, "n_accepted": 0, "n_invalid": 0, "total_seconds": 0.0}
    for move in sampler._mcmc_moves:
        for sub in getattr(move, "move_list", [move]):
            stats = getattr(sub, "statistics", None)
            if isinstance(stats, dict) and "n_proposed" in stats:
                for key in total:
                    total[key] += stats[key]
    return total


# ------------------------------------------------------------------------------------------------
# the reference


def basin_proposal(molsys: MolecularSystem, kappa: float = 3.0, weights=None) -> Proposal:
    """The non-learned baseline: a von Mises mixture over the known alanine-dipeptide basins on phi/psi."""
    quads = phi_psi_torsions(molsys)
    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, quads, names=["phi", "psi"])
    return alanine_basin_proposal(torsion_set, kappa=kappa, weights=weights)


#: Settings of :func:`run_reference`, tuned on alanine-dipeptide-implicit at 300 K (see benchmarks/README.md).
REFERENCE_SETTINGS = {
    "kappa": 3.0,
    "weights": None,
    "md_steps_per_segment": 10,
    "moves_per_segment": 4,
    "n_proposals": 1,
    "n_blocks": 20,
}


def run_reference(molsys: MolecularSystem, wall_seconds: float, seed: int = 12345, cache_path: str | None = None,
                  settings: dict | None = None, progress: bool = False) -> ReferenceEstimate:
    """An exact, independent estimate of P(phi > 0): MD with broad basin torsion moves, cached to .npz.

    The move is an exact MH independence proposal from a von Mises mixture over the known basins
    (:func:`basin_proposal`), so the chain crosses between phi < 0 and phi > 0 many times per second. The
    error is a block average over ``settings['n_blocks']`` contiguous blocks.

    Parameters
    ----------
    wall_seconds : float, s
    seed : int
        Use a seed no benchmarked run uses, so the reference is independent.
    cache_path : str, optional
        An .npz written after the run (temporary file, then rename) and reused by later calls with the same
        system fingerprint, temperature, seed and settings and at least the requested budget.
    settings : dict, optional
        Overrides of :data:`REFERENCE_SETTINGS`.
    """
    from .analysis.free_energy import basin_free_energy
    from .analysis.statistics import block_average_error

    wall_seconds = _check_budget(wall_seconds)
    config = dict(REFERENCE_SETTINGS)
    config.update(settings or {})
    key = {"system": molsys.name, "fingerprint": molsys.fingerprint(), "temperature_K": molsys.temperature_K,
           "seed": int(seed), **_plain(config)}
    if cache_path and os.path.isfile(cache_path):
        cached = _load_reference(cache_path, key, wall_seconds)
        if cached is not None:
            return cached
    proposal = basin_proposal(molsys, config["kappa"], config["weights"])
    run = run_md_with_moves(molsys, proposal, wall_seconds, config["md_steps_per_segment"],
                            config["moves_per_segment"], config["n_proposals"], seed=seed, method="reference",
                            progress=progress)
    run.check()
    n_blocks = int(config["n_blocks"])
    indicator = (run.phi > 0).astype(float)
    p = float(indicator.mean())
    p_error = block_average_error(indicator, n_blocks=n_blocks)
    delta_f, delta_f_error = basin_free_energy(run.phi, error_method="block", n_blocks=n_blocks)
    estimate = ReferenceEstimate(p, p_error, delta_f, delta_f_error, run, {**key, "wall_seconds": run.wall_seconds},
                                 False, cache_path)
    if cache_path:
        _save_reference(cache_path, estimate)
    return estimate


def _save_reference(path: str, estimate: ReferenceEstimate) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    run = estimate.run
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.npz")
    np.savez_compressed(tmp, phi=run.phi, psi=run.psi, sample_times=run.sample_times,
                        settings=json.dumps(_plain(estimate.settings), sort_keys=True),
                        summary=json.dumps({**estimate.to_dict(), "run": run.to_dict()}, sort_keys=True))
    os.replace(tmp, path)


def _load_reference(path: str, key: dict, wall_seconds: float) -> ReferenceEstimate | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            summary = json.loads(str(data["summary"]))
            phi, psi, times = data["phi"], data["psi"], data["sample_times"]
    except Exception as exc:  # a corrupt or foreign file: recompute rather than fail
        logging.getLogger(__name__).warning("reference cache %s unreadable (%s); recomputing", path, exc)
        return None
    same = all(settings.get(k) == v for k, v in _plain(key).items())
    if not same or settings.get("wall_seconds", 0.0) < 0.95 * wall_seconds:
        return None
    info = summary["run"]
    run = SamplerRun("reference", phi, psi, info["wall_seconds"], info["n_energy_evaluations"], info["acceptance"],
                     info["exact"], None, times, info["settings"])
    return ReferenceEstimate(summary["p_phi_positive"], summary["p_error"], summary["delta_f_kT"],
                             summary["delta_f_error_kT"], run, settings, True, path)


# ------------------------------------------------------------------------------------------------
# training the learned proposal


def _training_angles(molsys: MolecularSystem, data: str, data_seconds: float, hot_temperature_K: float, seed: int,
                     sample_every_steps: int, progress: bool):
    """(N, 2) training angles and a description of where they came from."""
    if data == "md":
        runs = [run_plain_md(molsys, data_seconds, sample_every_steps=sample_every_steps, seed=seed,
                             method="data: MD", progress=progress)]
        source = f"{data_seconds:.0f} s MD at {molsys.temperature_K:g} K"
    elif data == "md+hot":
        half = data_seconds / 2
        runs = [run_plain_md(molsys, half, sample_every_steps=sample_every_steps, seed=seed, method="data: MD",
                             progress=progress),
                run_plain_md(molsys, half, sample_every_steps=sample_every_steps, seed=seed + 1,
                             temperature_K=hot_temperature_K, method=f"data: MD {hot_temperature_K:g} K",
                             progress=progress)]
        source = (f"{half:.0f} s MD at {molsys.temperature_K:g} K + {half:.0f} s MD at {hot_temperature_K:g} K "
                  f"(Langevin 1 fs, 1/ps)")
    elif data == "md+basin":
        runs = [run_md_with_moves(molsys, basin_proposal(molsys), data_seconds, md_steps_per_segment=sample_every_steps,
                                  moves_per_segment=1, seed=seed, method="data: MD+basin moves", progress=progress)]
        source = f"{data_seconds:.0f} s MD + basin torsion moves at {molsys.temperature_K:g} K"
    else:
        raise ConfSampleError(f"data must be 'md', 'md+hot' or 'md+basin', got {data!r}.")
    angles = np.concatenate([r.angles for r in runs])
    return angles, source, [r.to_dict() for r in runs]


def _rebalance(angles: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Resample rows so that ``fraction`` of them have phi > 0 (same total count)."""
    if not 0.0 < fraction < 1.0:
        raise ConfSampleError(f"phi_positive_fraction must lie in (0, 1), got {fraction}.")
    positive, negative = angles[angles[:, 0] > 0], angles[angles[:, 0] <= 0]
    if len(positive) == 0 or len(negative) == 0:
        raise ConfSampleError("phi_positive_fraction needs training frames on both sides of phi = 0; the data "
                              "have none on one side (generate more data or use data='md+basin').")
    n_positive = int(round(fraction * len(angles)))
    picked = [positive[rng.integers(len(positive), size=n_positive)],
              negative[rng.integers(len(negative), size=len(angles) - n_positive)]]
    return rng.permutation(np.concatenate(picked))


def train_torsion_model(molsys: MolecularSystem, out_path: str, data_seconds: float = 60.0,
                        train_seconds: float = 60.0, data: str = "md+basin", hot_temperature_K: float = 500.0,
                        sample_every_steps: int = 20, hidden: int = 32, n_layers: int = 2, max_epochs: int = 400,
                        n_steps: int = 10, temperature: float = 1.0, uniform_weight: float = 0.1,
                        phi_positive_fraction: float | None = None, seed: int = 0,
                        progress: bool = False) -> TrainingResult:
    """Generate phi/psi training data with the package's own samplers, train a torsion diffusion model, save it.

    Parameters
    ----------
    molsys : MolecularSystem
    out_path : str
        Checkpoint path (a ``TorsionDiffusionModel`` file with metadata: torsions, topology fingerprint,
        data source, temperature, and these settings and timings under ``'training'``).
    data_seconds, train_seconds : float, s
        Budgets for data generation and for the training epochs.
    data : {'md+basin', 'md+hot', 'md'}
        'md+basin': MD with basin torsion moves at the system's temperature (uses the known alanine basins;
        the default, since it is the only one that reaches phi > 0 within minutes); 'md+hot': half the
        budget MD at the system's temperature, half at ``hot_temperature_K`` (no prior knowledge, but 40 s
        at 500 K gave 0.02 % of frames with phi > 0); 'md': MD only. The MH test keeps the move exact
        whatever the data.
    sample_every_steps : int
        MD steps between training frames.
    hidden, n_layers, max_epochs : int
        Score network and epoch limit (the time budget usually stops training first).
    n_steps : int
        Minimum Euler steps of the flow (raised by the trainer's invertibility check when needed); each
        proposal and each density evaluation costs ``n_steps`` network evaluations.
    temperature, uniform_weight : float
        Set on the model after training (see ``TorsionDiffusionModel``).
    phi_positive_fraction : float, optional
        Resample the training frames (with replacement) so that this fraction has phi > 0: a proposal that
        over-weights the rare basin enters it more often (the MH test removes the bias).
    """
    from .models.torsion_diffusion import TorsionDiffusionTrainer

    data_seconds, train_seconds = _check_budget(data_seconds), _check_budget(train_seconds)
    quads = phi_psi_torsions(molsys)
    t0 = time.perf_counter()
    angles, source, data_runs = _training_angles(molsys, data, data_seconds, hot_temperature_K, seed,
                                                 sample_every_steps, progress)
    data_wall = time.perf_counter() - t0
    fraction_in_data = float(np.mean(angles[:, 0] > 0))
    if phi_positive_fraction is not None:
        angles = _rebalance(angles, float(phi_positive_fraction), np.random.default_rng([seed, 3]))
    settings = {"data": data, "data_seconds": data_seconds, "hot_temperature_K": hot_temperature_K,
                "sample_every_steps": sample_every_steps, "hidden": hidden, "n_layers": n_layers,
                "max_epochs": max_epochs, "min_n_steps": n_steps, "train_seconds": train_seconds, "temperature": temperature,
                "uniform_weight": uniform_weight, "seed": seed, "n_train": int(len(angles)),
                "phi_positive_fraction": phi_positive_fraction, "fraction_phi_positive_in_data": fraction_in_data}
    metadata = {"torsions": [("phi", quads[0].tolist()), ("psi", quads[1].tolist())],
                "topology_fingerprint": molsys.fingerprint(), "data_source": source,
                "temperature": molsys.temperature_K, "system": molsys.name}
    t0 = time.perf_counter()
    trainer = TorsionDiffusionTrainer(hidden=hidden, n_layers=n_layers, max_epochs=max_epochs, seed=seed, n_steps=n_steps,
                                      max_time_s=train_seconds, progress=progress)
    model = trainer.fit(angles, metadata=metadata).fetch_model()
    model.temperature = temperature
    model.uniform_weight = uniform_weight
    train_wall = time.perf_counter() - t0
    settings.update({"data_wall_seconds": data_wall, "train_wall_seconds": train_wall,
                     "epochs": len(model.history.get("train_loss", [])), "n_steps": model.n_steps})
    model.save(out_path, {**metadata, "training": settings, "data_runs": data_runs})
    return TrainingResult(str(out_path), data_wall, train_wall, int(len(angles)), settings, model)


def train_learned_bias(molsys: MolecularSystem, out_path: str, data_seconds: float = 15.0, rounds: int = 3,
                       round_ps: float = 200.0, bias_factor: float = 6.0, cap_kT: float = 20.0,
                       train_seconds_per_round: float = 60.0, seed: int = 0, backend: str = "auto",
                       progress: bool = False, verbose: bool = False) -> TrainingResult:
    """Unbiased MD data, then :func:`openmm_confsample.bias.refine_learned_bias` on phi/psi; the bias is saved.

    Parameters
    ----------
    molsys : MolecularSystem
    out_path : str
        Where the final :class:`~openmm_confsample.bias.LearnedTorsionBias` is saved (its metadata holds the
        rounds).
    data_seconds : float, s
        Wall budget of the unbiased MD (frames every 50 steps) that trains round 0; MD at 300 K stays at
        phi < 0, so round 0 knows nothing of phi > 0 and the refinement has to find it.
    rounds, round_ps, bias_factor, cap_kT
        As ``refine_learned_bias``.
    train_seconds_per_round : float, s
        Training budget of each round's torsion diffusion model.

    Returns
    -------
    TrainingResult
        ``data_seconds``: the unbiased MD; ``train_seconds``: the whole refinement (training and biased MD);
        ``model``: the bias; ``settings['rounds']``: the per-round summary;
        ``settings['round0_first_phi_positive_ps']``: when round 0's biased MD first reached phi > 0 (None: never).
    """
    from .bias import refine_learned_bias

    data_seconds = _check_budget(data_seconds)
    t0 = time.perf_counter()
    data = run_plain_md(molsys, data_seconds, sample_every_steps=50, seed=seed, method="data: MD", progress=progress)
    data_wall = time.perf_counter() - t0
    quads = phi_psi_torsions(molsys)
    t0 = time.perf_counter()
    refinement = refine_learned_bias(molsys, data.angles, rounds=rounds, round_ps=round_ps,
                                     torsions={"phi": tuple(quads[0]), "psi": tuple(quads[1])},
                                     bias_factor=bias_factor, cap_kT=cap_kT, seed=seed + 1, backend=backend,
                                     trainer_options={"max_time_s": float(train_seconds_per_round)},
                                     verbose=verbose, progress=progress)
    refine_wall = time.perf_counter() - t0
    first_entry_ps = None  # when the first biased run (round 0) first reached phi > 0
    if refinement.runs:
        hits = np.nonzero(refinement.runs[0].angle("phi") > 0)[0]
        first_entry_ps = float(refinement.runs[0].time_ps[hits[0]]) if len(hits) else None
    settings = {"data_seconds": data_seconds, "unbiased_frames": data.n_samples,
                "round0_first_phi_positive_ps": first_entry_ps,
                "unbiased_fraction_phi_positive": float(np.mean(data.phi > 0)), "rounds": refinement.rounds,
                "round_ps": round_ps, "bias_factor": bias_factor, "cap_kT": cap_kT,
                "train_seconds_per_round": train_seconds_per_round, "seed": seed}
    bias = refinement.bias
    bias.metadata = {**bias.metadata, "system": molsys.name, "built_by": "benchmarking.train_learned_bias",
                     "settings": _plain({k: v for k, v in settings.items() if k != "rounds"})}
    bias.save(out_path)
    return TrainingResult(str(out_path), data_wall, refine_wall, data.n_samples, settings, bias)


# ------------------------------------------------------------------------------------------------
# the table of methods


def method_table(molsys: MolecularSystem, torsion_model: str | None = None, timewarp_model: str | None = None,
                 md_steps_per_segment: int = 10, moves_per_segment: int = 4, n_proposals: int = 1,
                 pt_learned: bool = False, pt_moves_per_iteration: int = 40,
                 learned_bias: str | None = None,
                 timewarp_n_proposals: int = 16) -> dict[str, Callable[..., SamplerRun]]:
    """name -> ``runner(wall_seconds, seed, progress)`` for every method the benchmark compares.

    'MD', 'MD+VonMises basins' and 'PT' are always present; 'MD+TorsionDiffusionMove' (and, with
    ``pt_learned``, 'PT+TorsionDiffusionMove': ``pt_moves_per_iteration`` learned MH steps after each
    replica's 500 MD steps) when ``torsion_model`` is given; 'MD+TimewarpMove' when ``timewarp_model`` is
    given (imported only then, so the benchmark never depends on it otherwise); 'MD+learned bias' (plain MD
    with the saved :class:`~openmm_confsample.bias.LearnedTorsionBias` at ``learned_bias``, reweighted) when
    that path is given. Move methods share ``md_steps_per_segment``, ``moves_per_segment`` and ``n_proposals``,
    except Timewarp: one engine step of ``timewarp_n_proposals`` MH steps (one batched flow call, plus one per
    acceptance) per segment: ~1.2 ms per proposal for the shipped 2-block flow at 5.7 % acceptance, ~2 ms for
    a 4-block one of width 64 (64 candidates per call: 2.3 ms).
    """
    segment = {"md_steps_per_segment": md_steps_per_segment, "moves_per_segment": moves_per_segment,
               "n_proposals": n_proposals}
    table: dict[str, Callable[..., SamplerRun]] = {
        "MD": lambda wall_seconds, seed=0, progress=False: run_plain_md(
            molsys, wall_seconds, seed=seed, method="MD", progress=progress),
        "MD+VonMises basins": lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, basin_proposal(molsys), wall_seconds, seed=seed, method="MD+VonMises basins",
            progress=progress, **segment),
        "PT": lambda wall_seconds, seed=0, progress=False: run_parallel_tempering(
            molsys, wall_seconds, seed=seed, method="PT", progress=progress),
    }
    if torsion_model is not None:
        from .moves.torsion_diffusion import TorsionDiffusionMove, TorsionDiffusionProposal

        table["MD+TorsionDiffusionMove"] = lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, TorsionDiffusionProposal.for_system(torsion_model, molsys), wall_seconds, seed=seed,
            method="MD+TorsionDiffusionMove", progress=progress, **segment)
        if pt_learned:
            table["PT+TorsionDiffusionMove"] = lambda wall_seconds, seed=0, progress=False: run_parallel_tempering(
                molsys, wall_seconds, seed=seed, method="PT+TorsionDiffusionMove", progress=progress,
                learned_move=TorsionDiffusionMove(torsion_model, molsys, n_proposals=n_proposals,
                                                  n_attempts=pt_moves_per_iteration, seed=seed + 101))
    if learned_bias is not None:
        table["MD+learned bias"] = lambda wall_seconds, seed=0, progress=False: run_plain_md(
            molsys, wall_seconds, seed=seed, method="MD+learned bias", progress=progress, bias=learned_bias)
    if timewarp_model is not None:
        timewarp_segment = {**segment, "n_proposals": timewarp_n_proposals, "moves_per_segment": 1}
        table["MD+TimewarpMove"] = lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, _timewarp_proposal(timewarp_model, molsys), wall_seconds, seed=seed, method="MD+TimewarpMove",
            progress=progress, **timewarp_segment)
    return table


def _timewarp_proposal(model_path: str, molsys: MolecularSystem) -> Proposal:
    """The Timewarp slot: a TimewarpProposal from ``model_path`` (the module is imported only here)."""
    try:
        from .moves.timewarp import TimewarpProposal
    except ImportError as exc:
        raise ConfSampleError(f"a Timewarp model was given ({model_path}) but moves.timewarp cannot be imported: "
                              f"{exc}") from exc
    return TimewarpProposal(model_path, molsys)


# ------------------------------------------------------------------------------------------------
# comparison


def _ess(x: np.ndarray) -> float:
    from .analysis.statistics import effective_sample_size

    return effective_sample_size(np.asarray(x, dtype=float)) if len(x) > 1 else float(len(x))


def indicator_entries(indicator) -> int:
    """How many times a 0/1 series enters 1 (a series that starts at 1 counts that as an entry)."""
    x = np.asarray(indicator, dtype=bool)
    if x.size == 0:
        return 0
    return int(x[0]) + int(np.count_nonzero(x[1:] & ~x[:-1]))


def indicator_ess(indicator, p: float | None = None) -> tuple[float, float, int, bool]:
    """ESS of a rare 0/1 observable: ``min(N / tau_int, two-state ESS from the entries)``.

    The autocorrelation estimate ``N / tau_int`` cannot see fluctuations a run never made: a run with one
    brief visit to the rare state looks uncorrelated and claims thousands of effective samples. A two-state
    Markov chain with per-sample entry/exit probabilities a, b has ``tau_int = (2 - a - b) / (a + b)``; with
    ``r = a + b = entries / (N p (1 - p))`` (``p`` the reference probability) its ESS is ``N r / (2 - r)``:
    ``N`` for independent samples, ``entries / (2 p (1 - p))`` for slow transitions. This second term bounds
    the ESS by the transitions actually seen; well-mixed runs are set by the first. A run that never entered
    the rare state has no measurable ESS; it is given the value of one entry as an upper bound (flagged), so
    that ratios against it are lower bounds.

    Returns (ess, ess_autocorrelation, entries, upper_bound).
    """
    x = np.asarray(indicator, dtype=float)
    autocorrelation_ess = _ess(x)
    entries = indicator_entries(x)
    p = float(x.mean()) if p is None else float(p)
    if not 0.0 < p < 1.0:
        return autocorrelation_ess, autocorrelation_ess, entries, False
    r = min(max(entries, 1) / (len(x) * p * (1.0 - p)), 1.0)
    two_state = len(x) * r / (2.0 - r)
    if entries == 0 or (entries == 1 and x[0] == 1.0 and x.all()):
        return float(two_state), autocorrelation_ess, entries, True
    return float(min(autocorrelation_ess, two_state)), autocorrelation_ess, entries, False


def _weighted_indicator_ess(indicator: np.ndarray, p_error: float, p: float) -> tuple[float, int, bool]:
    """ESS of the reweighted phi > 0 indicator: the sample count whose binomial error equals the block error.

    For importance-weighted frames there is no single autocorrelation time; ``p (1 - p) / sigma_P^2``
    (``sigma_P`` the weighted block-averaging error, ``p`` the best available P) is what an uncorrelated,
    unweighted run would need for the same error, capped at the frame count. Returns (ess, entries,
    upper_bound); a run that never entered phi > 0 gets the value of one entry, as in :func:`indicator_ess`.
    """
    n = len(indicator)
    entries = indicator_entries(indicator)
    if entries == 0 or not 0.0 < p < 1.0 or not np.isfinite(p_error):
        ess, _, _, upper = indicator_ess(indicator, p if 0.0 < p < 1.0 else None)
        return ess, entries, entries == 0 or upper
    if p_error <= 0.0:
        return float(n), entries, False
    return float(min(n, p * (1.0 - p) / p_error**2)), entries, False


def _tica_model(reference: ReferenceEstimate | None, runs: Sequence[SamplerRun], lagtime: int):
    """TICA on sin/cos(phi, psi) of the reference (or, without one, the first run long enough)."""
    from .analysis.kinetics import fit_tica, torsion_features

    candidates = ([reference.run] if reference is not None else []) + list(runs)
    for run in candidates:
        if run.n_samples > 10 * lagtime:
            try:
                return fit_tica([torsion_features(run.angles)], lagtime=lagtime, dim=2)
            except Exception:  # a degenerate run (e.g. constant) cannot be fitted; try the next one
                continue
    return None


def summarize(runs: Sequence[SamplerRun], reference: ReferenceEstimate | None = None, md_method: str = "MD",
              pt_method: str = "PT", extra_seconds: dict | None = None, n_blocks: int = 10,
              tica_lagtime: int = 1, p_phi_positive: float | None = None) -> list[dict]:
    """One row per run: cost, acceptance, ESS/s of the phi > 0 indicator and TIC 0, Delta F, JSD.

    Parameters
    ----------
    runs : sequence of SamplerRun
    reference : ReferenceEstimate, optional
        Gives ``z_vs_reference`` (Delta F difference over the combined error), the JSD and the TICA fit.
    md_method, pt_method : str
        Methods whose ESS/s are the denominators of ``ratio_vs_md`` and ``ratio_vs_pt``.
    extra_seconds : dict method -> s, optional
        One-off costs (data generation + training) added for ``ess_per_s_incl_training``.
    n_blocks : int
        Blocks of the Delta F error.
    tica_lagtime : int, frames
    p_phi_positive : float, optional
        Best available P(phi > 0) for the ESS of the indicator when there is no ``reference`` (otherwise each
        run's own estimate is used, which overstates the ESS of a run that barely visited phi > 0).

    Returns
    -------
    list of dict
        Keys: method, exact, wall_s, n_samples, energy_evaluations, acceptance, ms_per_proposal,
        ess_phi (see :func:`indicator_ess`, with the reference P), ess_phi_per_s, ess_phi_autocorrelation,
        entries_phi_positive, ess_tic0, ess_tic0_per_s, ratio_vs_md, ratio_vs_pt, p_phi_positive, p_error,
        delta_f_kT, delta_f_error_kT, z_vs_reference, jsd, ess_per_s_incl_training; the reference row (when
        given) comes last with ``method='reference'``.
    """
    from .analysis.free_energy import basin_free_energy
    from .analysis.kinetics import tica_project, torsion_features
    from .analysis.statistics import block_average_error, jensen_shannon_divergence

    runs = list(runs)
    if not runs:
        raise ConfSampleError("runs is empty; pass at least one SamplerRun.")
    for run in runs:
        if not isinstance(run, SamplerRun):
            raise ConfSampleError(f"runs must hold SamplerRun objects, got {type(run).__name__}.")
        run.check()
    extra_seconds = extra_seconds or {}
    tica = _tica_model(reference, runs, tica_lagtime)
    rows = []
    for run in runs:
        indicator = (run.phi > 0).astype(float)
        w = None if run.weights is None else run.weights / run.weights.sum()
        p = float(indicator.mean()) if w is None else float(w @ indicator)
        p_best = reference.p_phi_positive if reference is not None else p_phi_positive
        blocks = min(n_blocks, run.n_samples)
        p_error = block_average_error(indicator, n_blocks=blocks, weights=w) if blocks >= 2 else float("inf")
        if w is None:
            ess_phi, ess_phi_autocorrelation, entries, upper_bound = indicator_ess(indicator, p_best)
        else:
            ess_phi, entries, upper_bound = _weighted_indicator_ess(indicator, p_error, p if p_best is None else p_best)
            ess_phi_autocorrelation = float("nan")
        if blocks >= 2:
            delta_f, delta_f_error = basin_free_energy(run.phi, weights=w, error_method="block", n_blocks=blocks)
        else:
            delta_f, delta_f_error = float("nan"), float("inf")
        ess_tic0 = float("nan")
        if tica is not None and w is None:  # an ESS of a reweighted time series is not the same quantity
            ess_tic0 = _ess(tica_project(tica, torsion_features(run.angles))[:, 0])
        row = {
            "method": run.method,
            "exact": run.exact,
            "wall_s": run.wall_seconds,
            "n_samples": run.n_samples,
            "energy_evaluations": run.n_energy_evaluations,
            "acceptance": run.acceptance.get("acceptance_rate", run.acceptance.get("exchange_acceptance")),
            "ms_per_proposal": run.acceptance.get("ms_per_proposal"),
            "ess_phi": ess_phi,
            "ess_phi_per_s": ess_phi / run.wall_seconds,
            "ess_phi_autocorrelation": ess_phi_autocorrelation,
            "entries_phi_positive": entries,
            "ess_phi_upper_bound": upper_bound,
            "ess_tic0": ess_tic0,
            "ess_tic0_per_s": ess_tic0 / run.wall_seconds,
            "p_phi_positive": p,
            "p_error": p_error,
            "delta_f_kT": delta_f,
            "delta_f_error_kT": delta_f_error,
            "z_vs_reference": None,
            "jsd": None,
            "ess_per_s_incl_training": None,
        }
        if run.method in extra_seconds:
            row["ess_per_s_incl_training"] = ess_phi / (run.wall_seconds + float(extra_seconds[run.method]))
        if reference is not None:
            combined = float(np.hypot(delta_f_error, reference.delta_f_error_kT))
            if np.isfinite(delta_f) and combined > 0 and np.isfinite(combined):
                row["z_vs_reference"] = (delta_f - reference.delta_f_kT) / combined
            row["jsd"] = jensen_shannon_divergence(run.angles, reference.run.angles, bins=36, weights_a=w)
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        for key, base in (("ratio_vs_md", md_method), ("ratio_vs_pt", pt_method)):
            denominator = by_method.get(base, {}).get("ess_phi_per_s")
            row[key] = row["ess_phi_per_s"] / denominator if denominator else None
            # against an upper-bounded baseline the ratio is a lower bound (and vice versa)
            row[key + "_bound"] = "" if row["method"] == base else _ratio_bound(
                row["ess_phi_upper_bound"], by_method.get(base, {}).get("ess_phi_upper_bound", False))
    if reference is not None:
        ref = reference.run
        ref_ess, ref_ess_autocorrelation, ref_entries, _ = indicator_ess(ref.phi > 0)
        rows.append({
            "method": "reference", "exact": ref.exact, "wall_s": ref.wall_seconds, "n_samples": ref.n_samples,
            "energy_evaluations": ref.n_energy_evaluations, "acceptance": ref.acceptance.get("acceptance_rate"),
            "ms_per_proposal": ref.acceptance.get("ms_per_proposal"), "ess_phi": ref_ess,
            "ess_phi_per_s": ref_ess / ref.wall_seconds, "ess_phi_autocorrelation": ref_ess_autocorrelation,
            "entries_phi_positive": ref_entries, "ess_phi_upper_bound": False, "ess_tic0": None,
            "ess_tic0_per_s": None,
            "ratio_vs_md": None, "ratio_vs_pt": None, "p_phi_positive": reference.p_phi_positive,
            "p_error": reference.p_error, "delta_f_kT": reference.delta_f_kT,
            "delta_f_error_kT": reference.delta_f_error_kT, "z_vs_reference": 0.0, "jsd": 0.0,
            "ess_per_s_incl_training": None,
        })
    return rows


def _ratio_bound(numerator_upper: bool, denominator_upper: bool) -> str:
    """'>=' when only the denominator is an upper bound, '<=' when only the numerator is, '' when neither,
    '?' when both."""
    if numerator_upper and denominator_upper:
        return "?"
    if denominator_upper:
        return ">="
    if numerator_upper:
        return "<="
    return ""


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _bounded(value, bound: str) -> str:
    if value is None:
        return "-"
    if bound == "?":
        return "?"
    return f"{bound} {value:.3g}".replace(">=", "≥").replace("<=", "≤").strip()


def markdown_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`summarize` rows."""
    header = ("| method | wall s | energy evals | acceptance | ms/proposal | entries phi>0 | ESS(phi>0) | "
              "ESS/s (phi>0) | x MD | x PT | ESS/s (TIC0) | P(phi>0) | ΔF (kT) | z vs ref | JSD |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        delta_f = f"{_fmt(r['delta_f_kT'], '.2f')} ± {_fmt(r['delta_f_error_kT'], '.2f')}"
        p = f"{_fmt(r['p_phi_positive'], '.4f')} ± {_fmt(r['p_error'], '.4f')}"
        exact = "" if r.get("exact", True) else " (biased)"
        bound = "≤ " if r.get("ess_phi_upper_bound") else ""
        md_ratio = _bounded(r.get("ratio_vs_md"), r.get("ratio_vs_md_bound", ""))
        pt_ratio = _bounded(r.get("ratio_vs_pt"), r.get("ratio_vs_pt_bound", ""))
        lines.append(
            f"| {r['method']}{exact} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['energy_evaluations'], ',d')} | "
            f"{_fmt(r['acceptance'], '.3f')} | {_fmt(r['ms_per_proposal'], '.2f')} | "
            f"{_fmt(r.get('entries_phi_positive'), 'd')} | {bound}{_fmt(r['ess_phi'], '.1f')} | "
            f"{bound}{_fmt(r['ess_phi_per_s'], '.3g')} | {md_ratio} | {pt_ratio} | "
            f"{_fmt(r['ess_tic0_per_s'], '.3g')} | {p} | {delta_f} | {_fmt(r['z_vs_reference'], '+.1f')} | "
            f"{_fmt(r['jsd'], '.3f')} |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: Sequence[SamplerRun], reference: ReferenceEstimate | None, out_dir: str,
                    tica_lagtime: int = 1) -> dict[str, str]:
    """Write ramachandran.png, free_energy_phi.png and tic0.png into ``out_dir``; returns name -> path."""
    from .analysis.kinetics import tica_project, torsion_features
    from .analysis.plots import plot_free_energy_1d, plot_ramachandran_comparison, plot_tica

    os.makedirs(out_dir, exist_ok=True)
    runs = list(runs)
    everything = ([reference.run] if reference is not None else []) + runs
    paths = {"ramachandran": os.path.join(out_dir, "ramachandran.png"),
             "free_energy_phi": os.path.join(out_dir, "free_energy_phi.png"),
             "tic0": os.path.join(out_dir, "tic0.png")}
    # reweighted runs (learned bias) are drawn with their weights: the unbiased estimate, not the biased frames
    plot_ramachandran_comparison({r.method: (r.phi, r.psi) if r.weights is None else (r.phi, r.psi, r.weights)
                                  for r in everything}, path=paths["ramachandran"], bins=36, vmax=10.0)
    plot_free_energy_1d({r.method: np.degrees(r.phi) if r.weights is None else (np.degrees(r.phi), r.weights)
                         for r in everything}, bins=np.linspace(-180, 180, 37), xlabel="phi (deg)",
                        path=paths["free_energy_phi"])
    tica = _tica_model(reference, runs, tica_lagtime)
    if tica is not None:  # plot_tica takes no weights: a reweighted run would show its biased profile, so it is left out
        plot_tica({r.method: tica_project(tica, torsion_features(r.angles))[:, :1] for r in everything
                   if r.weights is None}, path=paths["tic0"], bins=40)
    else:
        paths.pop("tic0")
    return paths
