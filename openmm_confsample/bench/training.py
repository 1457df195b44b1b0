"""The learned methods' one-off costs: training data from the package's own samplers, then the model or bias.

:func:`train_torsion_model` generates torsion data (plain MD, MD at a higher temperature, or MD with the
configuration's basin moves), trains a :class:`~openmm_confsample.models.torsion_diffusion.TorsionDiffusionModel`
on the recorded torsions within a time budget and saves it; :func:`train_learned_bias` refines a learned
torsion bias from unbiased MD. Both report the data and training seconds, which the summary amortizes
(``ess_per_s_incl_training``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..checks import positive_float
from ..errors import ConfSampleError
from ..systems import MolecularSystem
from .config import BenchmarkConfig
from .samplers import SamplerRun, plain, run_md_with_moves, run_plain_md

__all__ = ["TrainingResult", "train_torsion_model", "train_learned_bias"]


@dataclass
class TrainingResult:
    """A trained torsion model (or learned bias) on disk and what it cost.

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
    model : TorsionDiffusionModel or LearnedTorsionBias
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


def _training_runs(molsys: MolecularSystem, config: BenchmarkConfig, data: str, data_seconds: float,
                   hot_temperature_K: float, seed: int, sample_every_steps: int,
                   progress: bool) -> tuple[list[SamplerRun], str]:
    """The runs whose recorded torsions are the training data, and a description of where they came from."""
    options = {"sample_every_steps": sample_every_steps, "progress": progress, "cvs": config.cvs}
    if data == "md":
        runs = [run_plain_md(molsys, data_seconds, seed=seed, method="data: MD", **options)]
        source = f"{data_seconds:.0f} s MD at {molsys.temperature_K:g} K"
    elif data == "md+hot":
        half = data_seconds / 2
        runs = [run_plain_md(molsys, half, seed=seed, method="data: MD", **options),
                run_plain_md(molsys, half, seed=seed + 1, temperature_K=hot_temperature_K,
                             method=f"data: MD {hot_temperature_K:g} K", **options)]
        source = (f"{half:.0f} s MD at {molsys.temperature_K:g} K + {half:.0f} s MD at {hot_temperature_K:g} K "
                  f"(Langevin 1 fs, 1/ps)")
    elif data == "md+basin":
        if config.basin_proposal is None:
            raise ConfSampleError(f"data='md+basin' needs a basin proposal, which configuration '{config.name}' "
                                  "does not have; use data='md+hot' or 'md'.")
        runs = [run_md_with_moves(molsys, config.basin_proposal(molsys), data_seconds,
                                  md_steps_per_segment=sample_every_steps, moves_per_segment=1, seed=seed,
                                  method="data: MD+basin moves", progress=progress, cvs=config.cvs)]
        source = f"{data_seconds:.0f} s MD + basin torsion moves at {molsys.temperature_K:g} K"
    else:
        raise ConfSampleError(f"data must be 'md', 'md+hot' or 'md+basin', got {data!r}.")
    return runs, source


def _rebalance(angles: np.ndarray, inside: np.ndarray, fraction: float, name: str,
               rng: np.random.Generator) -> np.ndarray:
    """Resample rows so that ``fraction`` of them lie inside the state (same total count)."""
    if not 0.0 < fraction < 1.0:
        raise ConfSampleError(f"primary_fraction must lie in (0, 1), got {fraction}.")
    positive, negative = angles[inside], angles[~inside]
    if len(positive) == 0 or len(negative) == 0:
        raise ConfSampleError(f"primary_fraction needs training frames inside and outside '{name}'; the data have "
                              "none on one side (generate more data or use data='md+basin').")
    n_positive = int(round(fraction * len(angles)))
    picked = [positive[rng.integers(len(positive), size=n_positive)],
              negative[rng.integers(len(negative), size=len(angles) - n_positive)]]
    return rng.permutation(np.concatenate(picked))


def train_torsion_model(molsys: MolecularSystem, out_path: str, config: BenchmarkConfig,
                        data_seconds: float = 60.0, train_seconds: float = 60.0, data: str | None = None,
                        hot_temperature_K: float = 500.0, sample_every_steps: int = 20, hidden: int = 32,
                        n_layers: int = 2, max_epochs: int = 400, n_steps: int = 10, sampling_scale: float = 1.0,
                        uniform_weight: float = 0.1, primary_fraction: float | None = None, seed: int = 0,
                        progress: bool = False) -> TrainingResult:
    """Generate torsion data with the package's own samplers, train a torsion diffusion model, save it.

    The model samples the torsions ``config`` records (all of the system's named torsions by default).

    Parameters
    ----------
    molsys : MolecularSystem
    out_path : str
        Checkpoint path (a ``TorsionDiffusionModel`` file with metadata: torsions, topology fingerprint,
        data source, temperature, and these settings and timings under ``'training'``).
    config : BenchmarkConfig
        The torsions, the primary indicator (for ``primary_fraction``) and the basin proposal ('md+basin').
    data_seconds, train_seconds : float, s
        Budgets for data generation and for the training epochs.
    data : {'md+basin', 'md+hot', 'md'}, optional
        'md+basin': MD with the configuration's basin torsion moves at the system's temperature (on alanine
        dipeptide the only one that reaches phi > 0 within minutes; the default where the configuration has
        a basin proposal); 'md+hot': half the budget MD at the system's temperature, half at
        ``hot_temperature_K`` (no prior knowledge, the default otherwise; on alanine dipeptide 40 s at 500 K
        gave 0.02 % of frames with phi > 0); 'md': MD only. The MH test keeps the move exact whatever the data.
    sample_every_steps : int
        MD steps between training frames.
    hidden, n_layers, max_epochs : int
        Score network and epoch limit (the time budget usually stops training first).
    n_steps : int
        Minimum Euler steps of the flow (raised by the trainer's invertibility check when needed); each
        proposal and each density evaluation costs ``n_steps`` network evaluations.
    sampling_scale, uniform_weight : float
        Set on the model after training (see ``TorsionDiffusionModel``; the scale divides the score, it is
        not a temperature).
    primary_fraction : float, optional
        Resample the training frames (with replacement) so that this fraction lies inside the primary
        indicator's state: a proposal that over-weights the rare state enters it more often (the MH test
        removes the bias).
    """
    # Deferred: the trainer pulls in torch, which the rest of the harness does not need.
    from ..models.torsion_diffusion import TorsionDiffusionTrainer

    data_seconds, train_seconds = positive_float(data_seconds, "data_seconds"), positive_float(train_seconds,
                                                                                              "train_seconds")
    data = data or ("md+basin" if config.basin_proposal is not None else "md+hot")
    recorded = config.recorded(molsys)
    if not recorded.torsion_names:
        raise ConfSampleError(f"configuration '{config.name}' records no torsions to train a torsion model on.")
    t0 = time.perf_counter()
    runs, source = _training_runs(molsys, config, data, data_seconds, hot_temperature_K, seed, sample_every_steps,
                                  progress)
    data_wall = time.perf_counter() - t0
    angles = np.concatenate([r.values(recorded.torsion_names) for r in runs])
    inside = np.concatenate([r.indicator(config.primary_indicator) for r in runs])
    fraction_in_data = float(np.mean(inside))
    if primary_fraction is not None:
        angles = _rebalance(angles, inside, float(primary_fraction), config.primary_name,
                            np.random.default_rng([seed, 3]))
    settings = {"data": data, "data_seconds": data_seconds, "hot_temperature_K": hot_temperature_K,
                "sample_every_steps": sample_every_steps, "hidden": hidden, "n_layers": n_layers,
                "max_epochs": max_epochs, "min_n_steps": n_steps, "train_seconds": train_seconds,
                "sampling_scale": sampling_scale, "uniform_weight": uniform_weight, "seed": seed, "n_train": int(len(angles)),
                "primary_indicator": config.primary_name, "primary_fraction": primary_fraction,
                "primary_fraction_in_data": fraction_in_data}
    metadata = {"torsions": [(name, quad.tolist()) for name, quad in zip(recorded.torsion_names, recorded.quads)],
                "topology_fingerprint": molsys.fingerprint(), "data_source": source,
                "temperature": molsys.temperature_K, "system": molsys.name}
    t0 = time.perf_counter()
    trainer = TorsionDiffusionTrainer(hidden=hidden, n_layers=n_layers, max_epochs=max_epochs, seed=seed,
                                      n_steps=n_steps, max_time_s=train_seconds, progress=progress)
    model = trainer.fit(angles, metadata=metadata).fetch_model()
    model.sampling_scale = sampling_scale
    model.uniform_weight = uniform_weight
    train_wall = time.perf_counter() - t0
    settings.update({"data_wall_seconds": data_wall, "train_wall_seconds": train_wall,
                     "epochs": len(model.history.get("train_loss", [])), "n_steps": model.n_steps})
    model.save(out_path, {**metadata, "training": settings, "data_runs": [r.to_dict() for r in runs]})
    return TrainingResult(str(out_path), data_wall, train_wall, int(len(angles)), settings, model)


def train_learned_bias(molsys: MolecularSystem, out_path: str, config: BenchmarkConfig, data_seconds: float = 15.0,
                       rounds: int = 3, round_ps: float = 200.0, bias_factor: float = 6.0, cap_kT: float = 20.0,
                       train_seconds_per_round: float = 60.0, seed: int = 0, backend: str = "auto",
                       progress: bool = False, verbose: bool = False) -> TrainingResult:
    """Unbiased MD data, then :func:`openmm_confsample.bias.refine_learned_bias` on the recorded torsions.

    Parameters
    ----------
    molsys : MolecularSystem
    out_path : str
        Where the final :class:`~openmm_confsample.bias.LearnedTorsionBias` is saved (its metadata holds the
        rounds).
    config : BenchmarkConfig
        The torsions to bias and the primary indicator whose first entry is reported.
    data_seconds : float, s
        Wall budget of the unbiased MD (frames every 50 steps) that trains round 0; on alanine dipeptide MD at
        300 K stays at phi < 0, so round 0 knows nothing of phi > 0 and the refinement has to find it.
    rounds, round_ps, bias_factor, cap_kT
        As ``refine_learned_bias``.
    train_seconds_per_round : float, s
        Training budget of each round's torsion diffusion model.

    Returns
    -------
    TrainingResult
        ``data_seconds``: the unbiased MD; ``train_seconds``: the whole refinement (training and biased MD);
        ``model``: the bias; ``settings['rounds']``: the per-round summary;
        ``settings['round0_first_primary_ps']``: when round 0's biased MD first entered the primary
        indicator's state (None: never).
    """
    # Deferred: the bias pulls in torch.
    from ..bias import refine_learned_bias

    data_seconds = positive_float(data_seconds, "data_seconds")
    recorded = config.recorded(molsys)
    t0 = time.perf_counter()
    data = run_plain_md(molsys, data_seconds, sample_every_steps=50, seed=seed, method="data: MD", progress=progress,
                        cvs=config.cvs)
    data_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    refinement = refine_learned_bias(molsys, data.values(recorded.torsion_names), rounds=rounds, round_ps=round_ps,
                                     torsions={n: tuple(q) for n, q in zip(recorded.torsion_names, recorded.quads)},
                                     bias_factor=bias_factor, cap_kT=cap_kT, seed=seed + 1, backend=backend,
                                     trainer_options={"max_time_s": float(train_seconds_per_round)},
                                     verbose=verbose, progress=progress)
    refine_wall = time.perf_counter() - t0
    first_entry_ps = None  # when the first biased run (round 0) first entered the primary state
    if refinement.runs:
        first = refinement.runs[0]
        inside = config.primary_indicator({name: first.angle(name) for name in recorded.torsion_names})
        hits = np.nonzero(inside)[0]
        first_entry_ps = float(first.time_ps[hits[0]]) if len(hits) else None
    settings = {"data_seconds": data_seconds, "unbiased_frames": data.n_samples,
                "primary_indicator": config.primary_name, "round0_first_primary_ps": first_entry_ps,
                "unbiased_primary_fraction": float(np.mean(data.indicator(config.primary_indicator))),
                "rounds": refinement.rounds, "round_ps": round_ps, "bias_factor": bias_factor, "cap_kT": cap_kT,
                "train_seconds_per_round": train_seconds_per_round, "seed": seed}
    bias = refinement.bias
    bias.metadata = {**bias.metadata, "system": molsys.name, "built_by": "bench.training.train_learned_bias",
                     "settings": plain({k: v for k, v in settings.items() if k != "rounds"})}
    bias.save(out_path)
    return TrainingResult(str(out_path), data_wall, refine_wall, data.n_samples, settings, bias)
