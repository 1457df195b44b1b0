"""Many independent walkers (Langevin MD + learned moves), spread over MPI ranks or run one after another.

:func:`run_walkers` runs N chains of the same system from one seed. Walker i runs on rank ``i % size``
(``mpiplus.distribute``, as openmmtools distributes replicas), so one rank may run several; without MPI the
one process runs them all. Walker i's random streams (OpenMM's integrator seed, the move's generator) come
from stream i of ``SeedSequence(seed).spawn(n_walkers)``: they do not depend on the number of ranks, so a
walker's trajectory is the same under ``mpiexec -n 2`` as on one process (on a deterministic platform).

Each walker writes its own set of files with the package's output conventions
(:class:`~openmm_confsample.data.outputs.OutputSet`: claimed, written as ``*.partial``, renamed into place
together, the JSON last)::

    OUT/walker_000.dcd    trajectory, one frame per segment (after the segment's moves)
    OUT/walker_000.pdb    topology (first frame)
    OUT/walker_000.npz    the system's named torsions per frame (radians) and the frame times (ps)
    OUT/walker_000.json   metadata: seeds, settings, the move's statistics
    OUT/summary.json      (rank 0) populations of the indicators, ESS per walker and pooled, R-hat

A walker that raises (its move, its MD, its factory) is recorded with its error in the summary; the
other walkers go on. (A rank that dies outright, e.g. killed for memory, ends the MPI job: that is MPI's.)
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Mapping

import mpiplus
import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from .. import __version__
from ..checks import positive_float, positive_int, whole_steps
from ..data.outputs import OutputSet, write_json
from ..errors import ConfSampleError
from ..geometry.torsions import dihedral_angles
from ..progress import progress_bar
from ..runner import as_engine, langevin_context, run_engine_steps
from ..systems import MolecularSystem
from ..units import kT_kJ_per_mol, to_kelvin
from .diagnostics import chain_summary, sum_statistics
from .mpi import configure_rank, get_comm, rank_and_size, rank_config, shared_seed, spawn_seeds

_SUFFIXES = (".dcd", ".pdb", ".npz", ".json")


@dataclass
class WalkersResult:
    """What :func:`run_walkers` wrote (the same on every rank)."""

    summary: dict
    summary_path: str
    out_dir: str

    @property
    def failed(self) -> dict[int, str]:
        """Walker index -> its error, for the walkers that raised."""
        return {w["walker"]: w["error"] for w in self.summary["walkers"] if w["error"] is not None}

    def trajectory_path(self, walker: int) -> str | None:
        name = self.summary["walkers"][walker]["trajectory"]
        return None if name is None else os.path.join(self.out_dir, name)

    def torsions(self, walker: int) -> dict[str, np.ndarray]:
        """Walker ``walker``'s named torsions per frame, radians."""
        name = self.summary["walkers"][walker]["torsions"]
        if name is None:
            raise ConfSampleError(f"walker {walker} failed ({self.failed[walker]}); it wrote no torsions.")
        with np.load(os.path.join(self.out_dir, name)) as data:
            return {key[len("torsion_"):]: data[key] for key in data.files if key.startswith("torsion_")}


def default_indicators(molecular_system: MolecularSystem) -> dict[str, Callable]:
    """``'<name> > 0'`` for each named torsion of the system (e.g. ``'phi > 0'``: alanine's C7ax/alpha_L side)."""
    return {f"{name} > 0": (lambda torsions, name=name: torsions[name] > 0.0) for name in molecular_system.torsions}


def run_walkers(molecular_system: MolecularSystem, move_factory: Callable | None, n_walkers: int, length_ps: float,
                out_dir: str, seed=None, *, segment_ps: float = 0.5, moves_per_segment: int = 1,
                timestep_fs: float = 1.0, friction_per_ps: float = 1.0, temperature=None,
                equilibration_ps: float = 0.0, indicators: Mapping[str, Callable] | None = None,
                platform: str | None = None, minimize: bool = True, progress: bool = False) -> WalkersResult:
    """Run ``n_walkers`` independent chains of Langevin MD with learned moves; one trajectory each and a summary.

    Parameters
    ----------
    molecular_system : MolecularSystem
    move_factory : callable or None
        ``move_factory(walker_index, generator)`` returns the walker's move: a ``LearnedMCMCMove`` (e.g.
        ``TorsionDiffusionMove(path, system, seed=generator)``), a MetropolisHastingsEngine or a Proposal.
        Called once per walker, on the rank that runs it, with the walker's own numpy Generator. None: MD only.
    n_walkers : int
    length_ps : float, ps
        Simulated time per walker after equilibration; one frame per ``segment_ps``.
    out_dir : str
        Directory for the walkers' files and ``summary.json`` (created).
    seed : int, optional
        The one seed of the run; None draws one (recorded in the summary).
    segment_ps : float, ps
        MD between moves: each segment is ``segment_ps`` of MD, then ``moves_per_segment`` engine steps,
        then a frame is recorded.
    moves_per_segment : int
    timestep_fs, friction_per_ps : float
        LangevinMiddleIntegrator settings (fs, 1/ps).
    temperature : float K or Quantity, optional
        Default: the system's temperature.
    equilibration_ps : float, ps
        Segments (MD + moves) run before recording, per walker.
    indicators : mapping name -> callable, optional
        ``indicator(torsions)`` with ``torsions`` the dict name -> (n_frames,) radians of the system's named
        torsions, returning a (n_frames,) boolean (or float) series whose mean is reported with its ESS per
        walker and pooled and its R-hat. Default: :func:`default_indicators` ('phi > 0', ...).
    platform : str, optional
        OpenMM platform; default the rank's GPU platform (:func:`~openmm_confsample.parallel.mpi.configure_rank`)
        or Reference.
    progress : bool
        A progress bar for each walker of rank 0.

    Under MPI (the launcher's communicator, :func:`~openmm_confsample.parallel.mpi.get_comm`) the rank is
    configured with ``configure_rank()`` (threads, device) unless the script did so.

    Returns
    -------
    WalkersResult
        On every rank. Raises ConfSampleError (after writing the summary) only if every walker failed.

    Examples
    --------
    >>> from openmm_confsample.testing import four_atom_torsion_system
    >>> chain = four_atom_torsion_system()
    >>> result = run_walkers(chain, None, n_walkers=2, length_ps=0.5, out_dir="walkers", seed=3,
    ...                      segment_ps=0.05)
    >>> result.summary["walkers"][1]["n_frames"], sorted(result.summary["indicators"])
    (10, ['phi > 0'])
    """
    n_walkers = positive_int(n_walkers, "n_walkers")
    settings = _settings(molecular_system, length_ps, segment_ps, moves_per_segment, timestep_fs, friction_per_ps,
                         temperature, equilibration_ps, platform, minimize)
    indicators = dict(default_indicators(molecular_system) if indicators is None else indicators)
    for name, indicator in indicators.items():
        if not callable(indicator):
            raise ConfSampleError(f"indicator '{name}' must be a function of the torsions dict, got "
                                  f"{type(indicator).__name__}.")
    comm = get_comm()
    if comm is not None and rank_config() is None:
        configure_rank(comm=comm)
    if settings["platform"] is None:
        config = rank_config()
        settings["platform"] = (config.platform_name if config is not None else None) or "Reference"
    rank, size = rank_and_size(comm)
    seed = shared_seed(seed, comm)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    width = max(3, len(str(n_walkers - 1)))
    streams = spawn_seeds(seed, n_walkers)
    start = time.perf_counter()
    records, _ = mpiplus.distribute(_walker_task, list(range(n_walkers)), molecular_system, move_factory, streams,
                                    settings, out_dir, width, progress, send_results_to=0)
    summary = None
    if rank == 0:
        try:
            summary = _summary(molecular_system, records, indicators, settings, seed, size,
                               time.perf_counter() - start)
            write_json(os.path.join(out_dir, "summary.json"), summary)
        except BaseException as exc:  # tell the other ranks, which wait for the summary, before raising
            if comm is not None:
                comm.bcast(f"{type(exc).__name__}: {exc}", root=0)
            raise
    if comm is not None:
        summary = comm.bcast(summary, root=0)
        if isinstance(summary, str):
            raise ConfSampleError(f"rank 0 could not summarize the walkers ({summary}).")
    result = WalkersResult(summary, os.path.join(out_dir, "summary.json"), out_dir)
    if len(result.failed) == n_walkers:
        first = min(result.failed)
        raise ConfSampleError(f"all {n_walkers} walkers failed (walker {first}: {result.failed[first]}); "
                              f"see {result.summary_path}.")
    return result


def _settings(molsys, length_ps, segment_ps, moves_per_segment, timestep_fs, friction_per_ps, temperature,
              equilibration_ps, platform, minimize) -> dict:
    """The run's settings, checked once where they enter, as plain values (also written to the summary)."""
    timestep_fs = positive_float(timestep_fs, "timestep_fs")
    steps = whole_steps(segment_ps, timestep_fs, "segment_ps")
    n_frames = int(round(positive_float(length_ps, "length_ps") / positive_float(segment_ps, "segment_ps")))
    if n_frames < 1:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one segment ({segment_ps} ps).")
    n_equilibration = int(round(positive_float(equilibration_ps, "equilibration_ps", allow_zero=True) / segment_ps))
    temperature_K = molsys.temperature_K if temperature is None else to_kelvin(temperature)
    return {"system": molsys.name, "n_frames": n_frames, "segment_ps": float(segment_ps), "steps_per_segment": steps,
            "moves_per_segment": positive_int(moves_per_segment, "moves_per_segment"),
            "timestep_fs": timestep_fs, "friction_per_ps": positive_float(friction_per_ps, "friction_per_ps",
                                                                          allow_zero=True),
            "temperature_K": temperature_K, "equilibration_segments": n_equilibration, "platform": platform,
            "minimize": bool(minimize), "length_ps": n_frames * float(segment_ps)}


def _walker_task(walker: int, molsys, move_factory, streams, settings, out_dir, width, progress) -> dict:
    """Run one walker; never raises an Exception (it is returned as the walker's error)."""
    rank = rank_and_size()[0]
    prefix = os.path.join(out_dir, f"walker_{walker:0{width}d}")
    record = {"walker": walker, "rank": rank, "trajectory": None, "torsions": None, "n_frames": 0,
              "wall_seconds": 0.0, "statistics": {}, "error": None, "angles": {}}
    start = time.perf_counter()
    try:
        with OutputSet(prefix, _SUFFIXES) as outputs:
            record.update(_run_one(walker, molsys, move_factory, streams[walker], settings, outputs,
                                   progress and rank == 0))
    except Exception as exc:  # noqa: BLE001 - one walker's failure must not end the others
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record["wall_seconds"] = time.perf_counter() - start
    return record


def _run_one(walker, molsys, move_factory, stream: np.random.SeedSequence, settings, outputs, progress) -> dict:
    openmm_stream, move_stream = stream.spawn(2)
    openmm_seed = int(openmm_stream.generate_state(1)[0])
    engine = None
    if move_factory is not None:
        engine = as_engine(move_factory(walker, np.random.default_rng(move_stream)))
    kT = kT_kJ_per_mol(settings["temperature_K"])
    context = langevin_context(molsys, settings["temperature_K"], settings["friction_per_ps"], settings["timestep_fs"],
                               openmm_seed, settings["platform"], minimize=settings["minimize"])
    integrator = context.getIntegrator()

    def segment() -> np.ndarray:
        integrator.step(settings["steps_per_segment"])
        if engine is not None:
            run_engine_steps(context, engine, kT, settings["moves_per_segment"])
        positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if not np.all(np.isfinite(positions)):
            raise ConfSampleError(f"walker {walker} blew up (NaN coordinates); try a smaller timestep_fs than "
                                  f"{settings['timestep_fs']}.")
        return positions

    for _ in range(settings["equilibration_segments"]):
        segment()
    if engine is not None:
        engine.reset_statistics()  # report production only
    from mdtraj.formats import DCDTrajectoryFile  # deferred: mdtraj is only needed once a walker writes

    n_frames, names = settings["n_frames"], list(molsys.torsions)
    angles = np.zeros((n_frames, len(names)))
    bar = progress_bar(total=n_frames, enabled=progress, desc=f"walker {walker}", unit="frame")
    writer = DCDTrajectoryFile(outputs.temporary(".dcd"), "w", force_overwrite=True)
    try:
        for frame in range(n_frames):
            positions = segment()
            if frame == 0:
                with open(outputs.temporary(".pdb"), "w") as handle:
                    app.PDBFile.writeFile(molsys.topology, positions * unit.nanometer, handle)
            writer.write((positions[None] * 10.0).astype(np.float32))  # DCD stores angstrom
            if names:
                angles[frame] = dihedral_angles(positions, molsys.torsion_array)
            bar.update(1)
    finally:
        writer.close()
        bar.close()
    times_ps = settings["segment_ps"] * np.arange(1, n_frames + 1)
    with open(outputs.temporary(".npz"), "wb") as handle:
        np.savez(handle, time_ps=times_ps, **{f"torsion_{name}": angles[:, i] for i, name in enumerate(names)})
    statistics = {} if engine is None else {k: (v.item() if isinstance(v, np.generic) else v)
                                            for k, v in engine.statistics.items()}
    metadata = {**settings, "walker": walker, "seed_entropy": int(stream.entropy),
                "spawn_key": list(stream.spawn_key), "openmm_seed": openmm_seed, "statistics": statistics,
                "move": None if engine is None else type(engine.proposal).__name__,
                "n_atoms": molsys.n_atoms, "topology_fingerprint": molsys.fingerprint(),
                "trajectory": os.path.basename(outputs.path(".dcd")),
                "topology": os.path.basename(outputs.path(".pdb")),
                "openmm_version": openmm.__version__, "package_version": __version__}
    paths = outputs.commit(metadata)
    return {"trajectory": os.path.basename(paths[".dcd"]), "torsions": os.path.basename(paths[".npz"]),
            "n_frames": n_frames, "statistics": statistics,
            "angles": {name: angles[:, i] for i, name in enumerate(names)}}


def _summary(molsys, records, indicators, settings, seed, n_ranks, wall_seconds) -> dict:
    """summary.json: settings, one entry per walker, and each indicator over the walkers that finished."""
    finished = [r for r in records if r["error"] is None]
    walkers = [{k: v for k, v in r.items() if k != "angles"} for r in records]
    summary = {**settings, "seed": seed, "n_walkers": len(records), "n_ranks": n_ranks,
               "wall_seconds": wall_seconds, "walkers": walkers, "failed": [r["walker"] for r in records
                                                                           if r["error"] is not None],
               "move_statistics": sum_statistics(r["statistics"] for r in finished), "indicators": {}}
    if not finished:
        return summary
    for name, indicator in indicators.items():
        chains = []
        for r in finished:
            series = np.asarray(indicator(r["angles"]), dtype=float)
            if series.shape != (r["n_frames"],):
                raise ConfSampleError(f"indicator '{name}' returned shape {series.shape} for {r['n_frames']} frames; "
                                      "it must return one value per frame.")
            chains.append(series)
        stats = chain_summary(chains)
        stats["ess_per_second"] = stats["ess"] / wall_seconds if wall_seconds > 0 else None
        summary["indicators"][name] = stats
    return summary
