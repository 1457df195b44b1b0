"""End-to-end workflows the CLI runs: train a model from trajectories, sample with learned moves.

Each is a thin composition of the public pieces (``data``, ``models``, ``moves``) so that a user can
copy it into a script and change one step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import openmm.app as app
from openmm import unit

from .data.datasets import block_split, lagged_pairs, torsion_angles
from .data.md import load_trajectory, read_metadata
from .data.outputs import write_json
from .errors import ConfSampleError
from .runner import langevin_integrator, openmm_seed
from .systems import MolecularSystem, get_platform


def _load_all(molsys: MolecularSystem, trajectories, topology=None, allow_truncated: bool = False):
    if not trajectories:
        raise ConfSampleError("no trajectory files were given.")
    loaded = []
    for path in trajectories:
        traj = load_trajectory(path, topology or molsys, allow_truncated=allow_truncated)
        if traj.n_atoms != molsys.n_atoms:
            raise ConfSampleError(f"trajectory '{path}' has {traj.n_atoms} atoms but system '{molsys.name}' has "
                                  f"{molsys.n_atoms}.")
        loaded.append(traj)
    return loaded


def train_torsion_diffusion(molsys: MolecularSystem, trajectories, out_path: str, topology=None,
                            torsions=None, max_epochs: int = 200, max_minutes: float | None = 5.0,
                            hidden: int = 128, n_layers: int = 3, seed: int = 0, progress: bool = True,
                            plot: bool = True, allow_truncated: bool = False):
    """Train a torsion diffusion model on the torsions of ``trajectories`` and save it to ``out_path``.

    Parameters
    ----------
    molsys : MolecularSystem
        The system the trajectories sample (its named torsions are used unless ``torsions`` is given).
    trajectories : list of str
        DCD/XTC (with ``topology`` or the system's topology) or HDF5 files; several runs (e.g. 300 K and
        500 K) may be pooled: the MH correction keeps the move exact whatever the data.
    torsions : dict name -> (i, j, k, l), optional
    max_minutes : float, optional
        Wall-clock budget of training.
    allow_truncated : bool
        Train on a truncated DCD's readable frames instead of refusing it (:func:`~.data.md.load_trajectory`).

    Returns
    -------
    (TorsionDiffusionModel, dict) : the model and a summary (frames, seconds, losses, paths).
    """
    from .models.torsion_diffusion import TorsionDiffusionTrainer, plot_loss

    torsions = dict(torsions or molsys.torsions)
    if not torsions:
        raise ConfSampleError(f"system '{molsys.name}' has no named torsions; pass torsions=.")
    loaded = _load_all(molsys, trajectories, topology, allow_truncated)
    per_trajectory = [torsion_angles(t, np.array(list(torsions.values()))) for t in loaded]
    train_parts, val_parts = [], []
    for angles in per_trajectory:
        if len(angles) < 20:
            train_parts.append(angles)
            continue
        train_index, val_index = block_split(len(angles), val_fraction=0.1, n_blocks=10, seed=seed)
        train_parts.append(angles[train_index])
        val_parts.append(angles[val_index])
    train = np.concatenate(train_parts)
    val = np.concatenate(val_parts) if val_parts else None
    sources = [os.path.abspath(p) for p in trajectories]
    temperatures = [((read_metadata(p) or {}).get("temperature_K")) for p in trajectories]
    metadata = {
        "torsions": list(torsions.items()),
        "topology_fingerprint": molsys.fingerprint(),
        "data_source": sources,
        "data_temperatures_K": temperatures,
        "temperature": molsys.temperature_K,
        "system": molsys.name,
    }
    trainer = TorsionDiffusionTrainer(hidden=hidden, n_layers=n_layers, max_epochs=max_epochs, seed=seed,
                                      max_time_s=None if max_minutes is None else 60.0 * max_minutes,
                                      progress=progress)
    start = time.perf_counter()
    model = trainer.fit(train, val, metadata=metadata).fetch_model()
    seconds = time.perf_counter() - start
    directory = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(directory, exist_ok=True)
    model.save(out_path, metadata)
    summary = {"model": os.path.abspath(out_path), "n_train": int(len(train)), "n_val": int(0 if val is None else len(val)),
               "training_seconds": seconds, "epochs": len(model.history.get("train_loss", [])),
               "final_train_loss": (model.history.get("train_loss") or [None])[-1],
               "best_val_loss": min(model.history.get("val_loss") or [float("nan")]),
               "n_steps": model.n_steps}
    if plot:
        loss_png = os.path.splitext(out_path)[0] + "_loss.png"
        plot_loss(model.history, loss_png)
        summary["loss_plot"] = loss_png
    return model, summary


def train_timewarp(molsys: MolecularSystem, trajectories, out_path: str, tau_ps: float, topology=None,
                   save_interval_ps: float | None = None, epochs: int = 20, acceptance_steps: int = 0,
                   max_minutes: float | None = 30.0, seed: int = 0, progress: bool = True, config=None,
                   allow_truncated: bool = False):
    """Train a Timewarp flow on (x(t), x(t + tau)) pairs of ``trajectories`` (likelihood, then optionally acceptance).

    ``save_interval_ps`` defaults to the value in each trajectory's metadata JSON (written by ``run_md``).
    Trajectories of biased MD (``run_md(biased, ..., bias=...)``, ``confsample simulate --bias``) are fine training data:
    their pairs cross barriers that plain MD keeps, and the move's MH test is against the unbiased potential;
    the checkpoint's metadata lists the biases under ``data_bias``.
    Returns (TimewarpModel, summary dict).
    """
    from .models.timewarp import TimewarpTrainer
    from .systems import EnergyEvaluator

    loaded = _load_all(molsys, trajectories, topology, allow_truncated)
    intervals, biases = [], []
    for path in trajectories:
        meta = read_metadata(path) or {}
        bias = meta.get("bias")  # run_md's record of a bias, None for plain MD
        biases.append(None if bias is None else (bias.get("path") or "a LearnedTorsionBias passed in memory"))
        interval = save_interval_ps or meta.get("save_interval_ps")
        if interval is None:
            raise ConfSampleError(f"trajectory '{path}' has no metadata JSON; pass save_interval_ps.")
        intervals.append(float(interval))
    if len(set(intervals)) != 1:
        raise ConfSampleError(f"trajectories have different save intervals {intervals}; train on one interval.")
    pairs = lagged_pairs(loaded, tau_ps, intervals[0], atom_labels=molsys.atom_labels)
    lag = int(round(tau_ps / intervals[0]))
    train_index, val_index = block_split(len(pairs), val_fraction=0.1, n_blocks=10, seed=seed, gap=lag)
    train, val = pairs.subset(train_index), pairs.subset(val_index)
    trainer = TimewarpTrainer(config, seed=seed, progress=progress)
    start = time.perf_counter()
    metadata = {"topology_fingerprint": molsys.fingerprint(), "tau_ps": float(tau_ps),
                "temperature_K": molsys.temperature_K, "data_source": [os.path.abspath(p) for p in trajectories],
                "system": molsys.name}
    if any(b is not None for b in biases):
        # Pairs from biased MD (``simulate --bias``): the flow learns the biased dynamics; the move's MH test
        # is against the unbiased potential, so it stays exact. Recorded so nobody reads tau as physical time.
        metadata["data_bias"] = biases
    trainer.fit_likelihood(train.x0, train.x1, molsys.atom_labels, val=(val.x0, val.x1), epochs=epochs,
                           max_minutes=max_minutes, metadata=metadata)
    if acceptance_steps:
        evaluator = EnergyEvaluator(molsys)
        trainer.fit_acceptance(train.x0, evaluator.energies_and_forces, molsys.kT, steps=acceptance_steps)
    model = trainer.fetch_model()
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    model.save(out_path, metadata)
    summary = {"model": os.path.abspath(out_path), "n_pairs_train": len(train), "n_pairs_val": len(val),
               "training_seconds": seconds, "tau_ps": float(tau_ps)}
    history_png = os.path.splitext(out_path)[0] + "_history.png"
    trainer.plot_history(history_png)
    summary["history_plot"] = history_png
    return model, summary


def build_learned_bias(molsys: MolecularSystem, trajectories, out_path: str, topology=None, torsions=None,
                       rounds: int = 3, round_ps: float = 200.0, bias_factor: float = 6.0, cap_kT: float = 20.0,
                       train_minutes_per_round: float = 1.0, seed: int = 0, platform: str = "Reference",
                       backend: str = "auto", progress: bool = True, allow_truncated: bool = False):
    """A learned torsion bias from unbiased ``trajectories``, refined by rounds of biased MD, saved to ``out_path``.

    Thin composition of :func:`openmm_confsample.bias.refine_learned_bias`: the trajectories' torsions
    (``torsions``, default the system's named ones) train round 0; ``out_path`` gets the final
    :class:`~openmm_confsample.bias.LearnedTorsionBias` and ``<out>.json`` the per-round summary.
    Returns (LearnedTorsionBias, summary dict).
    """
    from .bias import refine_learned_bias

    torsions = dict(torsions or molsys.torsions)
    if not torsions:
        raise ConfSampleError(f"system '{molsys.name}' has no named torsions; pass torsions=.")
    loaded = _load_all(molsys, trajectories, topology, allow_truncated)
    angles = np.concatenate([torsion_angles(t, np.array(list(torsions.values()))) for t in loaded])
    refinement = refine_learned_bias(molsys, angles, rounds=rounds, round_ps=round_ps, torsions=torsions,
                                     bias_factor=bias_factor, cap_kT=cap_kT, seed=seed, platform=platform,
                                     backend=backend, trainer_options={"max_time_s": 60.0 * train_minutes_per_round},
                                     verbose=True, progress=progress)
    bias = refinement.bias
    bias.metadata = {**bias.metadata, "system": molsys.name, "data_source": [os.path.abspath(p) for p in trajectories],
                     "torsions": {name: list(map(int, q)) for name, q in torsions.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bias.save(out_path)
    summary = {"bias": os.path.abspath(out_path), "unbiased_frames": int(len(angles)), **refinement.to_dict()}
    summary_path = os.path.splitext(out_path)[0] + ".json"
    write_json(summary_path, summary)
    summary["summary"] = summary_path
    return bias, summary


@dataclass
class SamplingResult:
    trajectory_path: str
    log_path: str
    summary_path: str
    statistics: dict
    wall_seconds: float


def sample_with_moves(molsys: MolecularSystem, move, out_prefix: str, length_ps: float, move_interval_steps: int = 500,
                      n_attempts: int = 1, timestep_fs: float = 1.0, friction_per_ps: float = 1.0,
                      save_interval_ps: float = 1.0, seed: int = 0, platform: str = "Reference",
                      progress: bool = True) -> SamplingResult:
    """Hybrid sampling: an ``openmm.app.Simulation`` with a DCDReporter, a StateDataReporter and the one added
    ``LearnedMoveReporter`` line. Outputs are written as ``*.partial`` and renamed when the run completes.
    """
    from .moves.reporter import LearnedMoveReporter

    if length_ps <= 0 or save_interval_ps <= 0:
        raise ConfSampleError(f"length_ps and save_interval_ps must be positive, got {length_ps} and {save_interval_ps}.")
    n_steps = int(round(length_ps * 1000.0 / timestep_fs))
    save_steps = max(1, int(round(save_interval_ps * 1000.0 / timestep_fs)))
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    paths = {"dcd": f"{out_prefix}.dcd", "log": f"{out_prefix}.csv", "pdb": f"{out_prefix}.pdb",
             "json": f"{out_prefix}.json"}
    # openmm_seed: OpenMM reads 0 as "random", so seed 0 (the CLI default) was not reproducible (issue 13.5).
    integrator = langevin_integrator(molsys.temperature_K, friction_per_ps, timestep_fs, seed=seed)
    simulation = app.Simulation(molsys.topology, molsys.system, integrator, get_platform(platform))
    simulation.context.setPositions(molsys.positions_nm)
    simulation.minimizeEnergy(maxIterations=500)
    simulation.context.setVelocitiesToTemperature(molsys.temperature_K * unit.kelvin, openmm_seed(seed, offset=1))
    with open(paths["pdb"] + ".partial", "w") as handle:
        app.PDBFile.writeFile(molsys.topology, simulation.context.getState(getPositions=True).getPositions(), handle)
    os.replace(paths["pdb"] + ".partial", paths["pdb"])
    dcd = app.DCDReporter(paths["dcd"] + ".partial", save_steps)
    log = app.StateDataReporter(paths["log"] + ".partial", save_steps, step=True, time=True, potentialEnergy=True,
                                temperature=True, speed=True)
    reporter = LearnedMoveReporter(move, interval=move_interval_steps, n_attempts=n_attempts)
    simulation.reporters.extend([dcd, log, reporter])
    chunk = max(move_interval_steps, save_steps) * 10
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, desc="MD + learned moves", unit="step", unit_scale=True)
    start = time.perf_counter()
    done = 0
    while done < n_steps:
        steps = min(chunk, n_steps - done)
        simulation.step(steps)
        done += steps
        if bar is not None:
            stats = reporter.statistics
            bar.update(steps)
            bar.set_postfix(acceptance=f"{stats['acceptance_rate']:.2f}")
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    simulation.reporters.clear()
    dcd._out.close()  # OpenMM's reporters close their files only in __del__
    log._out.close()
    os.replace(paths["dcd"] + ".partial", paths["dcd"])
    os.replace(paths["log"] + ".partial", paths["log"])
    statistics = reporter.statistics
    summary = {"system": molsys.name, "length_ps": length_ps, "move_interval_steps": move_interval_steps,
               "n_attempts": n_attempts, "timestep_fs": timestep_fs, "save_interval_ps": save_interval_ps,
               "seed": seed, "platform": platform, "wall_seconds": wall, "move_statistics": statistics,
               "exact": statistics.get("exact", True), "trajectory": paths["dcd"], "topology": paths["pdb"],
               "temperature_K": molsys.temperature_K}
    write_json(paths["json"], summary)
    return SamplingResult(paths["dcd"], paths["log"], paths["json"], statistics, wall)
