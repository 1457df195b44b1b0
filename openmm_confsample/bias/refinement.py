"""Refinement by rounds: build a well-tempered bias from unbiased data, then improve it with biased MD.

A model trained on MD that never left its basin knows nothing of the others; its bias is capped there
(:mod:`.fourier`), which lowers those regions most, so the next biased run goes there; the next model
learns what is there, and pooling every round's frames (WHAM on the grid) keeps what earlier rounds saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..checks import positive_float, positive_int
from ..errors import ConfSampleError
from ..models.torsion_diffusion import TorsionDiffusionTrainer, check_angles
from .biased_md import run_biased_md
from .fourier import torsion_grid
from .torch_module import LearnedTorsionBias, check_torsions

__all__ = ["DEFAULT_REFINE_TRAINER", "BiasRefinement", "refine_learned_bias"]

#: Torsion diffusion settings for each round's model: a few seconds per 1000 frames on one core.
DEFAULT_REFINE_TRAINER = {"hidden": 64, "n_layers": 3, "max_epochs": 200, "patience": 20, "batch_size": 256,
                          "max_time_s": 60.0}


@dataclass
class BiasRefinement:
    """What :func:`refine_learned_bias` did.

    Attributes
    ----------
    bias : LearnedTorsionBias
        The last bias built (use it for production runs; reweight with its energies).
    biases : list of LearnedTorsionBias
        ``biases[r]`` is the bias of round ``r`` (``biases[0]`` from the unbiased data).
    runs : list of BiasedMDResult
        ``runs[r]`` is the biased MD of round ``r`` (run with ``biases[r]``), whose frames trained ``biases[r + 1]``.
    rounds : list of dict
        Per round: ``round``, ``train_seconds``, ``epochs``, ``md_seconds``, ``simulated_ps``, ``frames``,
        ``kish_ess`` (effective frames after reweighting), ``bias_range_kT``, ``fit_rmse_kT``.
    wall_seconds : float
        Everything: training, tabulation and biased MD.
    """

    bias: LearnedTorsionBias
    biases: list
    runs: list
    rounds: list
    wall_seconds: float

    def to_dict(self) -> dict:
        return {"rounds": [dict(r) for r in self.rounds], "wall_seconds": self.wall_seconds,
                "bias_factor": self.bias.bias_factor, "cap_kT": self.bias.cap_kJ / self.bias.kT}


def refine_learned_bias(molsys, angles, rounds: int = 3, round_ps: float = 200.0, *, torsions=None,
                        bias_factor: float = 6.0, cap_kT: float = 20.0, grid_points: int = 48,
                        max_frequency: int = 10, smoothing_kT: float = 0.5, save_interval_ps: float = 0.05,
                        trainer_options: dict | None = None, max_training_frames: int = 40_000, seed: int = 0,
                        platform: str = "Reference", backend: str = "auto", verbose: bool = True,
                        progress: bool = False) -> BiasRefinement:
    """Build a learned torsion bias from unbiased data and refine it by rounds of biased MD.

    Round 0 trains a torsion diffusion model on ``angles`` (unbiased frames, e.g. a short MD run that never
    left its first basin) and builds the well-tempered bias ``B0`` of its free energy. Each round ``r``
    then runs ``round_ps`` of MD with ``B_r``, trains a new model on the pool of all frames so far (the
    unbiased ones and every round's), and builds ``B_{r+1}`` from the unbiased free energy the pool implies
    (``prior_bias`` with one bias per run: WHAM on the grid). The capped regions the data never reached are
    lowered by ``(1 - 1/gamma) cap``, so a round crosses into them; the next round learns what is there;
    pooling keeps what earlier rounds saw when a later one stays in one basin. Every bias is exact for
    reweighting (:func:`~openmm_confsample.bias.reweighting_weights`), whatever the models' quality:
    refinement only improves the statistics.

    Parameters
    ----------
    molsys : MolecularSystem
    angles : (N, k) float, radians
        Unbiased training frames of the torsions (in the order of ``torsions``).
    rounds : int >= 0
        Biased MD rounds (0: only the bias of the unbiased data, no MD).
    round_ps : float, ps
        Biased MD per round.
    torsions : dict name -> (i, j, k, l), optional
        Default ``molsys.torsions``.
    bias_factor, cap_kT, grid_points, max_frequency, smoothing_kT
        As :meth:`LearnedTorsionBias.from_log_density`. The cap must reach above the barriers: on alanine
        dipeptide (gamma 6, 3 rounds of 200 ps, then 180 s of biased MD) a 12 kT cap left the phi = 0 region
        partly unlowered (ESS/s of the phi > 0 indicator 2.9, Delta F error 0.28 kT), a 20 kT cap did not
        (ESS/s 20.7, error 0.11 kT).
    save_interval_ps : float, ps
        Frame interval of the biased MD (the next model's training data).
    trainer_options : dict, optional
        ``TorsionDiffusionTrainer`` arguments (default :data:`DEFAULT_REFINE_TRAINER`).
    max_training_frames : int
        The pool is subsampled (uniformly, seeded) to at most this many frames per model.
    seed, platform, backend
        As :func:`~openmm_confsample.bias.run_biased_md`; round ``r`` uses ``seed + r`` (0 included: every
        seed reproduces the refinement).
    verbose : bool
        Print one line per round (and the backend line once).

    Returns
    -------
    BiasRefinement
    """
    rounds = positive_int(rounds, "rounds", minimum=0)
    round_ps = positive_float(round_ps, "round_ps")
    max_training_frames = positive_int(max_training_frames, "max_training_frames", minimum=20)
    seed = positive_int(seed, "seed", minimum=0)
    torsions = dict(torsions or molsys.torsions)
    if not torsions:
        raise ConfSampleError(f"system '{molsys.name}' names no torsions and none were given.")
    quads = check_torsions(list(torsions.values()), molsys.n_atoms)
    data = check_angles(angles, "angles", len(quads))
    options = {**DEFAULT_REFINE_TRAINER, **(trainer_options or {})}
    build = {"cap_kT": cap_kT, "grid_points": grid_points, "max_frequency": max_frequency,
             "smoothing_kT": smoothing_kT, "bias_factor": bias_factor}
    named = [(name, list(map(int, q))) for name, q in zip(torsions, quads)]
    kT = molsys.kT
    rng = np.random.default_rng([seed, 17])
    start = time.perf_counter()
    biases, runs, summary = [], [], []
    pool = [(data, None)]  # (frames, the bias they were sampled with)
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        frames, priors, fractions = _subsample_pool(pool, max_training_frames, rng)
        trainer = TorsionDiffusionTrainer(**{**options, "seed": seed + r, "progress": False})
        model = trainer.fit(frames, metadata={"torsions": named, "temperature": molsys.temperature_K}).fetch_model()
        train_seconds = time.perf_counter() - t0
        unbiased_only = len(pool) == 1
        bias = LearnedTorsionBias.from_log_density(model, quads, kT, prior_bias=None if unbiased_only else priors,
                                                   prior_fractions=None if unbiased_only else fractions, **build)
        row = {"round": r, "train_seconds": train_seconds, "epochs": len(model.history.get("val_loss", [])),
               "bias_range_kT": float(-bias.energies_of_angles(torsion_grid(len(quads), grid_points)).min() / kT),
               "fit_rmse_kT": bias.fit_rmse_kJ / kT, "training_frames": int(len(frames)),
               "pooled_runs": len(pool)}
        biases.append(bias)
        if r < rounds:
            run = run_biased_md(molsys, bias, round_ps, torsions=torsions, save_interval_ps=save_interval_ps,
                                seed=seed + r, platform=platform, backend=backend, verbose=verbose and r == 0,
                                progress=progress)
            runs.append(run)
            pool.append((run.angles, bias))
            row.update({"md_seconds": run.wall_seconds, "simulated_ps": round_ps, "frames": len(run.angles),
                        "kish_ess": float(1.0 / np.sum(run.weights**2))})
        summary.append(row)
        if verbose:
            md = (f"; biased MD {round_ps:g} ps in {row['md_seconds']:.0f} s, Kish ESS {row['kish_ess']:.0f} of "
                  f"{row['frames']} frames") if "md_seconds" in row else ""
            print(f"bias round {r}: model {row['epochs']} epochs in {train_seconds:.0f} s, bias depth "
                  f"{row['bias_range_kT']:.1f} kT (fit RMSE {row['fit_rmse_kT']:.3f} kT){md}", flush=True)
    final = biases[-1]
    final.metadata = {"refinement": summary}
    return BiasRefinement(final, biases, runs, summary, time.perf_counter() - start)


def _subsample_pool(pool, limit: int, rng: np.random.Generator):
    """Frames of every run in ``pool`` (at most ``limit`` in all, uniformly), their runs' biases and shares."""
    sizes = np.array([len(frames) for frames, _ in pool])
    keep = np.minimum(sizes, np.floor(sizes * min(1.0, limit / sizes.sum())).astype(int))
    picked = [frames[np.sort(rng.choice(len(frames), size=n, replace=False))] for (frames, _), n in zip(pool, keep)]
    return np.concatenate(picked), [b for _, b in pool], keep / keep.sum()
