"""Training workflows the command line runs: a torsion diffusion model (with broadened data and a coverage
report), a Timewarp flow, and a learned torsion bias, each from trajectory files.

Each is a thin composition of the public pieces (``data``, ``models``, ``bias``) so that a user can copy it
into a script and change one step.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..data.broadened import load_trajectories, pool_torsion_angles, run_training_md, torsion_coverage
from ..data.datasets import block_split, lagged_pairs, torsion_angles
from ..data.md import read_metadata
from ..data.outputs import write_json
from ..errors import ConfSampleError
from ..systems import MolecularSystem

__all__ = ["train_torsion_diffusion", "train_timewarp", "build_learned_bias", "resolve_torsions"]


def resolve_torsions(molsys: MolecularSystem, torsions=None, include_methyl: bool = False) -> dict:
    """name -> (i, j, k, l): a dict as given, else :func:`~openmm_confsample.geometry.selection.select_torsions`
    of the spec (None: the system's named torsions; "all"; "phi,psi,chi1"; a list of names or kinds)."""
    if isinstance(torsions, dict):
        if not torsions:
            raise ConfSampleError("torsions is an empty dict; pass name -> (i, j, k, l), a spec such as 'all', or None.")
        return {str(name): tuple(int(a) for a in quad) for name, quad in torsions.items()}
    from ..geometry.selection import select_torsions

    return select_torsions(molsys, torsions, include_methyl=include_methyl)


def _split(parts, seed: int):
    """Per trajectory: 10 % held out in contiguous blocks (short runs train whole); pooled train and val rows."""
    train_parts, val_parts = [], []
    for part in parts:
        angles = part.angles
        if len(angles) < 20:
            train_parts.append(angles)
            continue
        train_index, val_index = block_split(len(angles), val_fraction=0.1, n_blocks=10, seed=seed)
        train_parts.append(angles[train_index])
        val_parts.append(angles[val_index])
    return np.concatenate(train_parts), (np.concatenate(val_parts) if val_parts else None)


def train_torsion_diffusion(molsys: MolecularSystem, trajectories, out_path: str, topology=None, torsions=None, *,
                            include_methyl: bool = False, hot_temperatures_K=(), bias=None, reweight: bool = False,
                            data_ps: float = 200.0, data_save_interval_ps: float = 0.5, data_dir: str | None = None,
                            uniform_weight: float | None = None, max_epochs: int = 200,
                            max_minutes: float | None = 5.0, hidden: int = 32, n_layers: int = 2,
                            min_flow_steps: int = 10, seed: int = 0,
                            platform: str = "Reference", bias_backend: str = "auto", progress: bool = True,
                            plot: bool = True, allow_truncated: bool = False, coverage_samples: int = 2000):
    """Train a torsion diffusion model on the torsions of MD data and save it to ``out_path``.

    Parameters
    ----------
    molsys : MolecularSystem
    trajectories : list of str
        Existing DCD/XTC (with ``topology`` or the system's topology) or HDF5 files; may be empty when the
        function runs its own data (``hot_temperatures_K``, ``bias``). Several runs (e.g. 300 K and 500 K)
        are pooled: the MH correction keeps the move exact whatever the data.
    torsions : dict name -> (i, j, k, l), spec or None
        What the model learns (and the move turns): a dict, or a spec for
        :func:`~openmm_confsample.geometry.selection.select_torsions` ("all", "phi,psi,chi1", a list of
        names); None: the system's named torsions. Recorded in the model's metadata.
    include_methyl : bool
        With a spec: also hydrogen-only rotors (methyl, hydroxyl, ...).
    hot_temperatures_K : sequence of float, K
        Run ``data_ps`` of MD at each of these temperatures (:func:`~openmm_confsample.data.broadened.run_training_md`)
        and pool it: hot MD crosses barriers that MD at the system's temperature keeps.
    bias : str, optional
        A learned torsion bias file (``confsample bias``): run ``data_ps`` of biased MD and pool it.
    reweight : bool
        Resample biased frames (the ``bias`` run and any biased trajectory given) by exp(+B/kT) toward the
        unbiased distribution; otherwise they are pooled as sampled (broader).
    data_ps, data_save_interval_ps : float, ps
        Length and frame interval of each run the function makes.
    data_dir : str, optional
        Where those runs are written (default ``<out_path without .pt>_data``); they can be reused as
        ``trajectories``.
    uniform_weight : float in [0, 1), optional
        The model's uniform mixture weight (stored in the model): a fraction of proposals drawn uniformly on
        the torus, so that no region is unreachable.
    max_epochs, max_minutes, seed
        Training settings (``max_minutes``: wall-clock budget).
    hidden, n_layers, min_flow_steps : int
        Score network width and depth, and the fewest Euler steps of the flow (raised after training until
        every step is invertible). Every proposal and every log q of the current state costs one network
        evaluation per step, so these set the move's cost: the shipped model's 32 / 2 / 10 (raised to 33)
        draws in 0.66 ms and evaluates log q in 2.7 ms; the earlier defaults 128 / 3 / 50 took 7.6 ms and
        12.7 ms on a 3-torsion dipeptide (issue 14's "42 ms per proposal" against the demo's 1 ms).
    coverage_samples : int
        Model draws used to measure how often it proposes the regions the data never visited (0: none).

    Returns
    -------
    (TorsionDiffusionModel, dict)
        The model and a summary: model path, frames, data sources, training seconds, losses
        (``history``: per-epoch train and validation loss), and ``coverage`` (per torsion, see
        :func:`~openmm_confsample.data.broadened.torsion_coverage`) with its ``warnings``.
    """
    from ..models.torsion_diffusion import TorsionDiffusionTrainer, plot_loss

    torsions = resolve_torsions(molsys, torsions, include_methyl)
    trajectories = [os.fspath(p) for p in (trajectories or [])]
    if not trajectories and not hot_temperatures_K and bias is None:
        raise ConfSampleError("no training data: give trajectories, hot temperatures (--hot) or a bias (--bias).")
    if uniform_weight is not None and not 0.0 <= float(uniform_weight) < 1.0:
        raise ConfSampleError(f"uniform_weight must lie in [0, 1), got {uniform_weight!r}.")
    if hot_temperatures_K or bias is not None:
        data_dir = data_dir or os.path.splitext(os.path.abspath(out_path))[0] + "_data"
        start = time.perf_counter()
        trajectories += run_training_md(molsys, data_dir, hot_temperatures_K=hot_temperatures_K, bias=bias,
                                        length_ps=data_ps, save_interval_ps=data_save_interval_ps, seed=seed,
                                        platform=platform, bias_backend=bias_backend, progress=progress)
        data_seconds = time.perf_counter() - start
    else:
        data_seconds = 0.0
    parts = pool_torsion_angles(molsys, trajectories, torsions, reweight=reweight, topology=topology,
                                allow_truncated=allow_truncated, seed=seed)
    train, val = _split(parts, seed)
    metadata = {
        "torsions": list(torsions.items()),
        "topology_fingerprint": molsys.fingerprint(),
        "data_source": [os.path.abspath(p) for p in trajectories],
        "data_temperatures_K": [p.temperature_K for p in parts],
        "data_runs": [p.describe() for p in parts],
        "temperature": molsys.temperature_K,
        "system": molsys.name,
    }
    trainer = TorsionDiffusionTrainer(hidden=hidden, n_layers=n_layers, n_steps=min_flow_steps, max_epochs=max_epochs,
                                      seed=seed, max_time_s=None if max_minutes is None else 60.0 * max_minutes,
                                      progress=progress)
    start = time.perf_counter()
    model = trainer.fit(train, val, metadata=metadata).fetch_model()
    if uniform_weight is not None:
        model.uniform_weight = float(uniform_weight)
    seconds = time.perf_counter() - start
    model_draws = model.sample(coverage_samples, generator=seed, strict=False) if coverage_samples else None
    if model_draws is not None:
        model_draws = model_draws[np.all(np.isfinite(model_draws), axis=1)]
    coverage = torsion_coverage(np.concatenate([p.angles for p in parts]), list(torsions), model_angles=model_draws)
    metadata["coverage"] = [c.to_dict() for c in coverage]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    model.save(out_path, metadata)
    history = model.history
    summary = {"model": os.path.abspath(out_path), "torsions": list(torsions), "n_train": int(len(train)),
               "n_val": int(0 if val is None else len(val)), "data_runs": metadata["data_runs"],
               "data_seconds": data_seconds, "training_seconds": seconds,
               "epochs": len(history.get("train_loss", [])),
               "final_train_loss": (history.get("train_loss") or [None])[-1],
               "best_val_loss": min(history.get("val_loss") or [float("nan")]),
               "history": {k: list(map(float, v)) for k, v in history.items() if k in ("train_loss", "val_loss")},
               "n_steps": model.n_steps, "uniform_weight": model.uniform_weight,
               "coverage": coverage, "warnings": [c.warning for c in coverage if c.warning]}
    if plot:
        loss_png = os.path.splitext(out_path)[0] + "_loss.png"
        plot_loss(history, loss_png)
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
    from ..models.timewarp import TimewarpTrainer
    from ..systems import EnergyEvaluator

    loaded = load_trajectories(molsys, trajectories, topology, allow_truncated)
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
    (``torsions``: a dict or a spec as in :func:`resolve_torsions`, default the system's named ones) train
    round 0; ``out_path`` gets the final :class:`~openmm_confsample.bias.LearnedTorsionBias` and ``<out>.json``
    the per-round summary. Returns (LearnedTorsionBias, summary dict).
    """
    from ..bias import refine_learned_bias

    torsions = resolve_torsions(molsys, torsions)
    loaded = load_trajectories(molsys, trajectories, topology, allow_truncated)
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
