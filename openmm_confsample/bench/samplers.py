"""Budgeted samplers: how much equilibrium sampling does a wall-clock second buy?

Every sampler runs on a :class:`~openmm_confsample.systems.MolecularSystem` for a wall-clock budget and
returns a :class:`SamplerRun`: the collective variables it recorded at a fixed interval (by default the
system's named torsions, see :class:`~openmm_confsample.bench.observables.CollectiveVariables`), energy
evaluations and acceptance::

    md = run_plain_md(molsys, wall_seconds=60)
    learned = run_md_with_moves(molsys, TorsionDiffusionProposal.for_system(path, molsys), wall_seconds=60,
                                method="MD+TorsionDiffusionMove")
    pt = run_parallel_tempering(molsys, wall_seconds=60)

Every clock starts after the same preparation (minimization, equilibration and, for parallel tempering,
one warm-up iteration), so the budgets compare sampling and not set-up. The Langevin set-up and the
engine-stepping loop (with its half-step velocity correction) are :mod:`openmm_confsample.runner`'s.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import openmm
from openmm import unit

from ..checks import positive_float, positive_int
from ..errors import ConfSampleError
from ..progress import progress_bar
from ..runner import as_engine, langevin_context, run_engine_steps
from ..systems import MolecularSystem
from ..units import KJ_PER_MOL as _KJ, NM as _NM, kT_kJ_per_mol, state_array, to_kelvin
from .observables import CollectiveVariables, Indicator

__all__ = ["SamplerRun", "run_plain_md", "run_md_with_moves", "run_parallel_tempering", "plain"]



@dataclass
class SamplerRun:
    """What one budgeted sampler produced.

    Attributes
    ----------
    method : str
        Label used in tables and plots.
    cvs : dict name -> (N,) float
        The recorded collective variables (torsions in radians), sampled at a fixed interval of the
        sampler (after each MD segment and its moves, or each parallel-tempering iteration at the lowest
        temperature).
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
        Sample weights of a reweighted (biased) run (None: unweighted).
    sample_times : (N,) float, s
        Wall-clock time since the start of the clock at which each sample was taken.
    settings : dict
        The sampler's parameters (plain values).
    angle_names : tuple of str, optional
        The collective variables that are torsions in radians (default: all of them).
    """

    method: str
    cvs: dict
    wall_seconds: float
    n_energy_evaluations: int
    acceptance: dict = field(default_factory=dict)
    exact: bool = True
    weights: np.ndarray | None = None
    sample_times: np.ndarray | None = None
    settings: dict = field(default_factory=dict)
    angle_names: tuple | None = None

    def __post_init__(self):
        self.cvs = {str(name): np.asarray(values, dtype=float).reshape(-1) for name, values in self.cvs.items()}
        lengths = {len(v) for v in self.cvs.values()}
        if len(lengths) > 1:
            raise ConfSampleError(f"run '{self.method}': collective variables have different lengths {sorted(lengths)}.")
        self.angle_names = tuple(self.cvs) if self.angle_names is None else tuple(self.angle_names)
        unknown = [n for n in self.angle_names if n not in self.cvs]
        if unknown:
            raise ConfSampleError(f"run '{self.method}': angle_names {unknown} are not among its cvs {list(self.cvs)}.")

    @property
    def n_samples(self) -> int:
        return int(len(next(iter(self.cvs.values())))) if self.cvs else 0

    @property
    def angles(self) -> np.ndarray:
        """(N, k) float, radians: the recorded torsions, columns in ``angle_names`` order."""
        return self.values(self.angle_names)

    def values(self, names: Sequence[str]) -> np.ndarray:
        """(N, len(names)) float: the named collective variables as columns."""
        missing = [n for n in names if n not in self.cvs]
        if missing:
            raise ConfSampleError(f"run '{self.method}' did not record {missing} (it has {list(self.cvs)}).")
        return np.column_stack([self.cvs[n] for n in names]) if names else np.zeros((self.n_samples, 0))

    def indicator(self, indicator: Indicator) -> np.ndarray:
        """(N,) bool: ``indicator`` at every sample."""
        return indicator(self.cvs)

    def check(self) -> None:
        """Raise ConfSampleError when the run produced no samples or non-finite output."""
        if self.n_samples == 0:
            raise ConfSampleError(f"sampler '{self.method}' produced no samples in {self.wall_seconds:.1f} s.")
        finite = all(np.isfinite(v).all() for v in self.cvs.values())
        if self.weights is not None:
            finite = finite and np.isfinite(self.weights).all()
        if not finite or not np.isfinite(self.wall_seconds):
            raise ConfSampleError(f"sampler '{self.method}' produced non-finite values, weights or times.")

    def to_dict(self, arrays: bool = False) -> dict:
        """Plain-value summary (JSON-ready); the recorded arrays only when ``arrays``."""
        out = {
            "method": self.method,
            "n_samples": self.n_samples,
            "wall_seconds": float(self.wall_seconds),
            "n_energy_evaluations": int(self.n_energy_evaluations),
            "acceptance": plain(self.acceptance),
            "exact": bool(self.exact),
            "settings": plain(self.settings),
            "cv_names": list(self.cvs),
            "angle_names": list(self.angle_names),
        }
        if arrays:
            out["cvs"] = plain(self.cvs)
        return out


def plain(value):
    """numpy scalars/arrays -> Python numbers/lists, recursively (for JSON)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


class _Clock:
    """Wall clock of a budgeted run with an optional progress bar in seconds."""

    def __init__(self, wall_seconds: float, progress: bool, desc: str):
        self.budget = wall_seconds
        self.bar = None
        if progress:
            self.bar = progress_bar(total=round(wall_seconds, 1), desc=desc, unit="s", bar_format=(
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


def _positions_nm(state) -> np.ndarray:
    return state_array(state, "positions")


def run_plain_md(molsys: MolecularSystem, wall_seconds: float, timestep_fs: float = 1.0, friction_per_ps: float = 1.0,
                 sample_every_steps: int = 50, seed: int = 0, platform: str = "Reference", temperature_K=None,
                 equilibration_steps: int = 1000, method: str = "MD", progress: bool = False,
                 positions_nm=None, bias=None, bias_backend: str = "auto", cvs=None) -> SamplerRun:
    """Langevin MD (LangevinMiddleIntegrator) for ``wall_seconds`` of wall clock, optionally with a learned bias.

    Parameters
    ----------
    molsys : MolecularSystem
    wall_seconds : float, s
    timestep_fs : float, fs
    friction_per_ps : float, 1/ps
    sample_every_steps : int
        MD steps between recorded samples.
    seed : int
        Seeds velocities and the integrator's noise (every seed, 0 included, is reproducible).
    platform : str
    temperature_K : float, optional
        Default: the system's temperature.
    equilibration_steps : int
        Steps after minimization, before the clock starts.
    bias : LearnedTorsionBias or path, optional
        A learned torsion bias (:mod:`openmm_confsample.bias`, e.g. from
        :func:`~openmm_confsample.bench.training.train_learned_bias`) added to a copy of the System; each
        sample's bias energy is read from the bias's force group and the run carries the weights
        ``exp(+B/kT)`` that make its averages unbiased.
    bias_backend : {'auto', 'torchforce', 'pythonforce'}
    cvs : CollectiveVariables, sequence or dict, optional
        What to record (see :meth:`CollectiveVariables.for_system`); default the system's named torsions.
    """
    wall_seconds = positive_float(wall_seconds, "wall_seconds")
    sample_every_steps = positive_int(sample_every_steps, "sample_every_steps")
    temperature_K = molsys.temperature_K if temperature_K is None else to_kelvin(temperature_K)
    recorder = CollectiveVariables.for_system(molsys, cvs)
    bias_group, extra = None, {}
    if bias is not None:
        # Deferred: the bias pulls in torch; plain MD must not pay for it.
        from ..bias import with_learned_bias

        molsys, added = with_learned_bias(molsys, bias, bias_backend)
        bias_group = {added.force_group}
        extra = {"bias_backend": added.backend, "bias_factor": added.module.bias_factor}
    context = langevin_context(molsys, temperature_K, friction_per_ps, timestep_fs, seed, platform, positions_nm,
                               equilibration_steps=equilibration_steps)
    integrator = context.getIntegrator()
    rows, times, bias_kJ = [], [], []
    n_steps = 0
    clock = _Clock(wall_seconds, progress, method)
    while clock.running(samples=len(rows)):
        integrator.step(sample_every_steps)
        n_steps += sample_every_steps
        if bias_group is None:
            state = context.getState(getPositions=True)
        else:
            state = context.getState(getPositions=True, getEnergy=True, groups=bias_group)
            bias_kJ.append(state.getPotentialEnergy().value_in_unit(_KJ))
        rows.append(recorder(_positions_nm(state)))
        times.append(clock.elapsed())
    wall = clock.close()
    weights = None
    if bias_group is not None:
        from ..bias import reweighting_weights

        weights = reweighting_weights(np.array(bias_kJ), kT_kJ_per_mol(temperature_K))
    return SamplerRun(method, recorder.as_dict(rows), wall, n_steps, {}, True, weights, np.array(times), {
        "kind": "md" if bias is None else "biased md", "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps,
        "sample_every_steps": sample_every_steps, "seed": seed, "platform": platform, "temperature_K": temperature_K,
        "md_steps": n_steps, "simulated_ps": n_steps * timestep_fs * 1e-3, "cvs": recorder.describe(), **extra},
        recorder.torsion_names)


def run_md_with_moves(molsys: MolecularSystem, proposal, wall_seconds: float, md_steps_per_segment: int = 50,
                      moves_per_segment: int = 1, n_proposals: int = 1, seed: int = 0, timestep_fs: float = 1.0,
                      friction_per_ps: float = 1.0, platform: str = "Reference", equilibration_steps: int = 1000,
                      method: str | None = None, progress: bool = False, positions_nm=None,
                      temperature_K=None, velocity_correction: bool = True, cvs=None) -> SamplerRun:
    """MD segments interleaved with Metropolis-Hastings moves on the same Context, for ``wall_seconds``.

    Each segment is ``md_steps_per_segment`` Langevin steps followed by ``moves_per_segment`` engine steps
    of ``n_proposals`` MH candidates each; the collective variables are recorded after every segment. The
    move changes positions only and keeps the on-step velocities, which leaves the joint Boltzmann
    distribution invariant: :func:`~openmm_confsample.runner.run_engine_steps` shifts the half-step
    velocities after accepted jumps (one force evaluation per such segment; derivation in
    :mod:`openmm_confsample.runner`). ``velocity_correction=False`` skips this and lets every accepted jump
    heat the system (+70 K with moves every 10 steps).

    Parameters
    ----------
    proposal : Proposal, MetropolisHastingsEngine or LearnedMCMCMove
        E.g. ``TorsionDiffusionProposal.for_system(path, molsys)``. An engine (or a move's engine) is used
        as it is, with its own ``n_proposals`` and random stream (:func:`~openmm_confsample.runner.as_engine`);
        its statistics are reset here, so the run reports its own moves only.
    md_steps_per_segment : int
        0 gives a pure MC chain (valid for torsion moves only as far as they are ergodic).
    moves_per_segment, n_proposals : int
    velocity_correction : bool
        Shift the half-step velocities after accepted jumps (see above).
    cvs : optional
        What to record, as for :func:`run_plain_md`.

    Returns
    -------
    SamplerRun
        ``acceptance`` holds the engine statistics plus ``ms_per_proposal`` (engine wall time per candidate,
        model calls and energies included) and ``moves_per_second``.
    """
    wall_seconds = positive_float(wall_seconds, "wall_seconds")
    md_steps_per_segment = positive_int(md_steps_per_segment, "md_steps_per_segment", minimum=0)
    moves_per_segment = positive_int(moves_per_segment, "moves_per_segment")
    engine = as_engine(proposal, n_proposals, np.random.default_rng([int(seed), 7]))
    engine.reset_statistics()
    proposal = engine.proposal
    method = method or f"MD+{type(proposal).__name__}"
    temperature_K = molsys.temperature_K if temperature_K is None else to_kelvin(temperature_K)
    kT = kT_kJ_per_mol(temperature_K)
    recorder = CollectiveVariables.for_system(molsys, cvs)
    context = langevin_context(molsys, temperature_K, friction_per_ps, timestep_fs, seed, platform, positions_nm,
                               equilibration_steps=equilibration_steps)
    integrator = context.getIntegrator()
    rows, times = [], []
    n_steps = n_segments = n_force_reads = 0
    clock = _Clock(wall_seconds, progress, method)
    while clock.running(samples=len(rows), acc=f"{engine.statistics['acceptance_rate']:.2f}"):
        if md_steps_per_segment:
            integrator.step(md_steps_per_segment)
            n_steps += md_steps_per_segment
        if velocity_correction:
            accepted = run_engine_steps(context, engine, kT, moves_per_segment)
            n_force_reads += int(accepted > 0)
            positions = _positions_nm(context.getState(getPositions=True))
        else:
            positions = energy = None
            for _ in range(moves_per_segment):
                result = engine.step(context, kT, positions, energy)
                positions, energy = result.positions_nm, result.potential_kJ
        n_segments += 1
        rows.append(recorder(positions))
        times.append(clock.elapsed())
    wall = clock.close()
    stats = engine.statistics
    n_scored = stats["n_proposed"] - stats["n_invalid"]
    stats["ms_per_proposal"] = 1e3 * stats["total_seconds"] / max(stats["n_proposed"], 1)
    stats["moves_per_second"] = stats["n_proposed"] / wall
    stats["md_fraction_of_wall"] = 1.0 - stats["total_seconds"] / wall
    n_energy = n_steps + n_scored + n_segments + n_force_reads
    return SamplerRun(method, recorder.as_dict(rows), wall, n_energy, stats, bool(stats.get("exact", True)), None,
                      np.array(times), {
                          "kind": "md+moves", "proposal": type(proposal).__name__,
                          "md_steps_per_segment": md_steps_per_segment, "moves_per_segment": moves_per_segment,
                          "n_proposals": engine.n_proposals, "timestep_fs": timestep_fs,
                          "friction_per_ps": friction_per_ps, "seed": seed, "platform": platform,
                          "temperature_K": temperature_K, "md_steps": n_steps, "segments": n_segments,
                          "velocity_correction": velocity_correction, "velocity_corrections": n_force_reads,
                          "simulated_ps": n_steps * timestep_fs * 1e-3, "cvs": recorder.describe()},
                      recorder.torsion_names)


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
                           equilibration_steps: int = 1000, cvs=None,
                           indicators: Sequence[Indicator] = ()) -> SamplerRun:
    """openmmtools parallel tempering, iteration by iteration until ``wall_seconds`` are spent.

    Replicas at ``n_replicas`` geometrically spaced temperatures from ``t_min`` to ``t_max`` (K) each run
    ``steps_per_iteration`` steps of ``LangevinDynamicsMove`` (velocities redrawn at the replica's new
    temperature each iteration: carried-over velocities bias the cold state after an exchange, see
    benchmarks/README.md) (optionally followed by ``learned_move``, a
    ``LearnedMCMCMove``, in a ``SequenceMove``), then exchange. Storage goes to a temporary directory that
    is removed afterwards; contexts live in Reference-platform caches. One warm-up iteration runs before
    the clock starts (numba compiles the mixing code on the first iteration). The lowest-temperature
    state's collective variables are recorded after every iteration; the population of each of
    ``indicators`` in every temperature state goes to ``acceptance['p_by_state'][name]``.

    Energy evaluations per iteration: ``n_replicas * steps_per_iteration`` (MD) ``+ n_replicas**2``
    (the exchange energy matrix) ``+`` whatever the learned move scores.
    """
    wall_seconds = positive_float(wall_seconds, "wall_seconds")
    n_replicas = positive_int(n_replicas, "n_replicas")
    steps_per_iteration = positive_int(steps_per_iteration, "steps_per_iteration")
    t_min, t_max = to_kelvin(t_min, "t_min"), to_kelvin(t_max, "t_max")
    if n_replicas < 2 or t_max <= t_min:
        raise ConfSampleError(f"parallel tempering needs n_replicas >= 2 and t_max > t_min, got "
                              f"{n_replicas}, {t_min} K, {t_max} K.")
    method = method or ("PT" if learned_move is None else "PT+learned move")
    recorder = CollectiveVariables.for_system(molsys, cvs)
    with _quiet_openmmtools():
        # Deferred: openmmtools takes seconds to import and only this sampler needs it.
        from openmmtools import cache, mcmc, multistate

        np.random.seed(int(seed) % 2**32)  # openmmtools mixes replicas with numpy's global generator
        platform_obj = openmm.Platform.getPlatformByName(platform)
        # equilibrated start at t_min, shared by all replicas
        context = langevin_context(molsys, t_min, friction_per_ps, timestep_fs, seed, platform,
                                   equilibration_steps=equilibration_steps)
        start_nm = _positions_nm(context.getState(getPositions=True))
        del context
        dynamics = mcmc.LangevinDynamicsMove(timestep=timestep_fs * unit.femtosecond,
                                             collision_rate=friction_per_ps / unit.picosecond,
                                             n_steps=steps_per_iteration, reassign_velocities=True)
        moves = dynamics if learned_move is None else mcmc.SequenceMove([dynamics, learned_move])
        from ..parallel.replica import MPIParallelTemperingSampler  # each replica's learned move its own stream

        sampler = MPIParallelTemperingSampler(mcmc_moves=moves, number_of_iterations=2**31 - 1,
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
            rows, times = [], []
            n_iterations = 0
            accepted = np.zeros((n_replicas, n_replicas))
            proposed = np.zeros((n_replicas, n_replicas))
            in_state = {indicator.name: np.zeros(n_replicas) for indicator in indicators}
            clock = _Clock(wall_seconds, progress, method)
            while clock.running(samples=len(rows)):
                sampler.run(n_iterations=1)
                n_iterations += 1
                # openmmtools resets the swap matrices every iteration
                accepted += np.asarray(sampler._n_accepted_matrix, dtype=float)
                proposed += np.asarray(sampler._n_proposed_matrix, dtype=float)
                states = np.asarray(sampler._replica_thermodynamic_states)
                for replica, state_index in enumerate(states):
                    row = recorder(np.asarray(sampler._sampler_states[replica].positions.value_in_unit(_NM)))
                    if indicators:
                        sample = recorder.as_dict(row)
                        for indicator in indicators:
                            in_state[indicator.name][state_index] += bool(indicator(sample)[0])
                    if state_index == 0:
                        rows.append(row)
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
                "p_by_state": {name: (count / max(n_iterations, 1)).tolist() for name, count in in_state.items()},
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
    n_energy = n_iterations * (n_replicas * steps_per_iteration + n_replicas**2) + n_learned
    return SamplerRun(method, recorder.as_dict(rows), wall, n_energy, acceptance, True, None, np.array(times), {
        "kind": "pt", "n_replicas": n_replicas, "temperatures_K": temperatures,
        "steps_per_iteration": steps_per_iteration, "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps,
        "seed": seed, "platform": platform, "learned_move": type(learned_move).__name__ if learned_move else None,
        "md_steps": n_iterations * n_replicas * steps_per_iteration, "cvs": recorder.describe()},
        recorder.torsion_names)


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
