"""Training data that reaches the basins: MD pooled over temperatures and with a learned bias, and what it covered.

A torsion model proposes where its training data went and almost nowhere else. On alanine dipeptide, MD at
300 K stays at phi < 0 for nanoseconds; a model trained on it proposes phi > 0 only through its uniform
mixture, so the move never finds alpha_L although it would accept it (a user's run in issue 14: acceptance
0.2, phi > 0 never visited, and nothing said why). Two ways to reach further, both exact for the move,
whose Metropolis-Hastings test is against the real potential at the target temperature whatever the data:

* **hot MD**: runs at higher temperatures (:func:`run_training_md` with ``hot_temperatures_K``), pooled as
  they are (reweighting 450 K frames to 300 K would keep only the few that look like 300 K ones);
* **biased MD**: a learned torsion bias (``confsample bias``, :mod:`openmm_confsample.bias`), pooled as
  sampled (``reweight=False``: the broad, flattened distribution) or resampled by the weights exp(+B/kT)
  toward the unbiased one (``reweight=True``).

:func:`torsion_coverage` then says, per torsion, what fraction of the circle the data covered (10-degree
bins with at least one frame) and which arc they never visited, with one sentence where the trained model
will rarely propose there.

Units: angles in radians (degrees only in reports), temperatures in K, times in ps, energies in kJ/mol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..checks import positive_float
from ..errors import ConfSampleError
from ..units import kT_kJ_per_mol

__all__ = ["TrajectoryAngles", "run_training_md", "load_trajectories", "pool_torsion_angles", "systematic_resample",
           "TorsionCoverage", "torsion_coverage", "coverage_report", "DEFAULT_HINT"]

#: What a coverage warning suggests (the command line's options).
DEFAULT_HINT = "add --hot or --bias"


@dataclass
class TrajectoryAngles:
    """The torsions of one trajectory as training rows.

    Attributes
    ----------
    path : str
    angles : (N, k) float, radians
        After resampling when ``reweighted``.
    temperature_K : float or None
        From the trajectory's metadata JSON (None when it has none).
    bias : str or None
        The bias file a biased run was sampled with (None: plain MD).
    reweighted : bool
        Rows resampled by exp(+B/kT) (systematic resampling, time order kept).
    kish_ess : float or None
        Kish effective sample size of the weights of a reweighted run (how many frames the resample is worth).
    """

    path: str
    angles: np.ndarray
    temperature_K: float | None = None
    bias: str | None = None
    reweighted: bool = False
    kish_ess: float | None = None

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "n_frames": int(len(self.angles)),
                "temperature_K": self.temperature_K, "bias": self.bias, "reweighted": self.reweighted,
                "kish_ess": self.kish_ess}


def run_training_md(molecular_system, out_dir: str, *, hot_temperatures_K=(), bias=None, length_ps: float = 200.0,
                    save_interval_ps: float = 0.5, seed: int = 0, platform: str = "Reference",
                    bias_backend: str = "auto", progress: bool = True) -> list[str]:
    """Run the MD that broadens a training set; returns the trajectory paths (``run_md`` output sets).

    Parameters
    ----------
    molecular_system : MolecularSystem
    out_dir : str
        Gets ``hot_<T>K.dcd/.pdb/.json`` per hot temperature and ``biased.dcd/.pdb/.json/.bias.npy``.
    hot_temperatures_K : sequence of float, K
        One run of ``length_ps`` at each temperature.
    bias : str, optional
        A learned torsion bias file (``confsample bias``): one run of ``length_ps`` at the system's
        temperature on the biased potential (:func:`openmm_confsample.bias.with_learned_bias`); each frame's
        bias energy goes to ``biased.bias.npy`` for reweighting.
    length_ps, save_interval_ps : float, ps
    seed : int
        Run i uses ``seed + 1 + i`` (every seed reproducible).
    """
    from .md import BiasRecord, run_md

    length_ps = positive_float(length_ps, "length_ps")
    temperatures = [positive_float(t, "hot temperature (K)") for t in hot_temperatures_K]
    paths = []
    for i, temperature_K in enumerate(temperatures):
        result = run_md(molecular_system, os.path.join(out_dir, f"hot_{temperature_K:g}K"), length_ps,
                        temperature=temperature_K, save_interval_ps=save_interval_ps, seed=seed + 1 + i,
                        platform=platform, progress=progress)
        paths.append(result.trajectory_path)
    if bias is not None:
        from ..bias import with_learned_bias  # torch: only for a biased run

        biased, added = with_learned_bias(molecular_system, bias, bias_backend)
        result = run_md(biased, os.path.join(out_dir, "biased"), length_ps, save_interval_ps=save_interval_ps,
                        seed=seed + 1 + len(temperatures), platform=platform, progress=progress,
                        bias=BiasRecord.of(added, bias))
        paths.append(result.trajectory_path)
    return paths


def systematic_resample(weights, rng: np.random.Generator) -> np.ndarray:
    """Indices (N,) drawn with probabilities ``weights`` (N,), by systematic resampling: sorted, so a
    time series keeps its order (repeated frames stay adjacent) and block splits stay meaningful."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfSampleError("weights must be a non-empty 1-D array of finite, non-negative numbers with a positive sum.")
    cumulative = np.cumsum(w / w.sum())
    cumulative[-1] = 1.0
    positions = (rng.random() + np.arange(len(w))) / len(w)
    return np.searchsorted(cumulative, positions, side="right")


def _bias_weights(path: str, metadata: dict, temperature_K: float) -> np.ndarray:
    energies_name = (metadata.get("bias") or {}).get("energies")
    energies_path = os.path.join(os.path.dirname(os.path.abspath(path)), energies_name or "")
    if not energies_name or not os.path.isfile(energies_path):
        raise ConfSampleError(f"biased trajectory '{path}' has no bias energies file beside it; it cannot be "
                              "reweighted (rerun it with confsample simulate --bias).")
    log_w = np.load(energies_path).astype(float) / kT_kJ_per_mol(temperature_K)
    return np.exp(log_w - log_w.max())


def load_trajectories(molecular_system, trajectories, topology=None, allow_truncated: bool = False) -> list:
    """The trajectories as mdtraj.Trajectory objects, each checked to have the system's atom count."""
    from .md import load_trajectory

    if not trajectories:
        raise ConfSampleError("no trajectory files were given.")
    loaded = []
    for path in trajectories:
        traj = load_trajectory(path, topology or molecular_system, allow_truncated=allow_truncated)
        if traj.n_atoms != molecular_system.n_atoms:
            raise ConfSampleError(f"trajectory '{path}' has {traj.n_atoms} atoms but system "
                                  f"'{molecular_system.name}' has {molecular_system.n_atoms}.")
        loaded.append(traj)
    return loaded


def pool_torsion_angles(molecular_system, trajectories, torsions: dict, *, reweight: bool = False, topology=None,
                        allow_truncated: bool = False, seed: int = 0) -> list[TrajectoryAngles]:
    """The torsions of each trajectory (one :class:`TrajectoryAngles` each), biased runs reweighted on request.

    Parameters
    ----------
    molecular_system : MolecularSystem
        The system every trajectory samples (atom count checked).
    trajectories : list of str
        DCD/XTC (with ``topology`` or the system's) or HDF5 files; their metadata JSON (``run_md``) gives the
        temperature and, for biased runs, the bias energies.
    torsions : dict name -> (i, j, k, l)
    reweight : bool
        Resample the frames of biased runs by exp(+B/kT) (B the recorded bias energy, T the run's
        temperature) so that they follow the unbiased distribution; otherwise they are pooled as sampled.
    """
    from .datasets import torsion_angles
    from .md import read_metadata

    if not torsions:
        raise ConfSampleError("no torsions to record; pass name -> (i, j, k, l).")
    quads = np.array(list(torsions.values()), dtype=int)
    rng = np.random.default_rng([int(seed), 5])
    pooled = []
    for path, traj in zip(trajectories, load_trajectories(molecular_system, trajectories, topology, allow_truncated)):
        angles = torsion_angles(traj, quads)
        metadata = read_metadata(path) or {}
        temperature_K = metadata.get("temperature_K")
        bias = metadata.get("bias")
        entry = TrajectoryAngles(path, angles, temperature_K,
                                 None if bias is None else (bias.get("path") or "a bias passed in memory"))
        if bias is not None and reweight:
            weights = _bias_weights(path, metadata, temperature_K or molecular_system.temperature_K)
            if len(weights) != len(angles):
                raise ConfSampleError(f"biased trajectory '{path}' has {len(angles)} frames but {len(weights)} bias "
                                      "energies.")
            entry.angles = angles[systematic_resample(weights, rng)]
            entry.reweighted = True
            entry.kish_ess = float(weights.sum() ** 2 / np.sum(weights**2))
        pooled.append(entry)
    return pooled


# ------------------------------------------------------------------------------------------------
# coverage


@dataclass
class TorsionCoverage:
    """What the training data covered of one torsion's circle, and what the model proposes where they did not.

    Attributes
    ----------
    name : str
    covered_fraction : float
        Fraction of the ``bin_deg`` bins holding at least one frame.
    gap_deg : (float, float) or None
        The largest arc (degrees, counter-clockwise from the first to the second) without a frame, when it
        is at least ``min_gap_deg`` wide.
    sign_gap : str or None
        ``'> 0'`` when no frame has the torsion > 0, ``'< 0'`` when none has it < 0.
    model_fraction_in_gap : float or None
        Fraction of the model's samples inside the gap (when model samples were given).
    warning : str or None
        One sentence when the data never visited a region the move will rarely propose.
    """

    name: str
    covered_fraction: float
    n_frames: int
    gap_deg: tuple | None = None
    sign_gap: str | None = None
    model_fraction_in_gap: float | None = None
    warning: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "covered_fraction": self.covered_fraction, "n_frames": self.n_frames,
                "gap_deg": None if self.gap_deg is None else list(self.gap_deg), "sign_gap": self.sign_gap,
                "model_fraction_in_gap": self.model_fraction_in_gap, "warning": self.warning}


def _largest_empty_arc(counts: np.ndarray) -> tuple[int, int]:
    """(start bin, length) of the longest circular run of empty bins; (0, 0) when every bin is filled."""
    empty = counts == 0
    n = len(empty)
    if empty.all():
        return 0, n
    start = int(np.argmin(empty))  # a filled bin: runs never wrap past it
    best, best_start, run, run_start = 0, 0, 0, 0
    for offset in range(1, n + 1):
        index = (start + offset) % n
        if empty[index]:
            if run == 0:
                run_start = index
            run += 1
            if run > best:
                best, best_start = run, run_start
        else:
            run = 0
    return best_start, best


def torsion_coverage(angles, names, *, bin_deg: float = 10.0, min_gap_deg: float = 90.0, model_angles=None,
                     rarely: float = 0.05, hint: str = DEFAULT_HINT) -> list[TorsionCoverage]:
    """Per torsion: the fraction of the circle the data covered and the largest arc they never visited.

    Parameters
    ----------
    angles : (N, k) float, radians
        The training rows.
    names : sequence of k str
    bin_deg : float, degrees
        Bin width of the coverage (36 bins of 10 degrees by default).
    min_gap_deg : float, degrees
        An unvisited arc at least this wide is reported (and warned about).
    model_angles : (M, k) float, radians, optional
        Samples of the trained model: the fraction inside each gap is reported, and the warning is given
        only where it is below ``rarely``. Without them every gap is warned about.
    rarely : float
        The fraction of proposals below which the model "rarely" proposes a region.
    hint : str
        What the warning suggests.

    Returns
    -------
    list of TorsionCoverage, in the order of ``names``. A warning reads, e.g., "all frames have phi < 0: the
    model will rarely propose phi > 0 (0.4% of its draws); add --hot or --bias".

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> data = np.column_stack([rng.uniform(-3, -0.5, 500), rng.uniform(-np.pi, np.pi, 500)])
    >>> [c.warning for c in torsion_coverage(data, ["phi", "psi"])]  # doctest: +NORMALIZE_WHITESPACE
    ['all frames have phi < 0: the model will rarely propose phi > 0; add --hot or --bias', None]
    """
    x = np.asarray(angles, dtype=float)
    names = [str(n) for n in names]
    if x.ndim != 2 or x.shape[1] != len(names) or len(x) == 0:
        raise ConfSampleError(f"angles must be (N, {len(names)}) radians with N >= 1, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ConfSampleError("angles contain NaN or infinite values.")
    bin_deg = positive_float(bin_deg, "bin_deg")
    n_bins = int(round(360.0 / bin_deg))
    if n_bins < 2 or abs(n_bins * bin_deg - 360.0) > 1e-9:
        raise ConfSampleError(f"bin_deg must divide 360 degrees into at least 2 bins, got {bin_deg}.")
    model = None if model_angles is None else np.asarray(model_angles, dtype=float).reshape(-1, len(names))
    report = []
    for j, name in enumerate(names):
        degrees = np.mod(np.degrees(x[:, j]) + 180.0, 360.0)  # 0 at -180 degrees
        counts = np.bincount(np.minimum((degrees / bin_deg).astype(int), n_bins - 1), minlength=n_bins)
        coverage = TorsionCoverage(name, float(np.mean(counts > 0)), int(len(x)))
        start, length = _largest_empty_arc(counts)
        if length * bin_deg >= min_gap_deg:
            low, high = -180.0 + start * bin_deg, -180.0 + (start + length) * bin_deg
            coverage.gap_deg = (low, high - 360.0 if high > 180.0 else high)
        if np.all(x[:, j] < 0):
            coverage.sign_gap = "> 0"
        elif np.all(x[:, j] > 0):
            coverage.sign_gap = "< 0"
        if coverage.sign_gap or coverage.gap_deg:
            # the region the sentence names: the empty half-circle, else the largest empty arc
            low, high = ((0.0, 180.0) if coverage.sign_gap == "> 0" else (-180.0, 0.0)) if coverage.sign_gap \
                else coverage.gap_deg
            if model is not None:
                offset = np.mod(np.degrees(model[:, j]) - low, 360.0)
                width = (high - low) % 360.0 or 360.0
                coverage.model_fraction_in_gap = float(np.mean(offset < width))
            coverage.warning = _warning(name, coverage, low, high, rarely, hint)
        report.append(coverage)
    return report


def _warning(name: str, coverage: TorsionCoverage, low: float, high: float, rarely: float, hint: str) -> str | None:
    fraction = coverage.model_fraction_in_gap
    if fraction is not None and fraction >= rarely:
        return None
    if coverage.sign_gap:
        seen = "< 0" if coverage.sign_gap == "> 0" else "> 0"
        sentence = f"all frames have {name} {seen}: the model will rarely propose {name} {coverage.sign_gap}"
    else:
        sentence = (f"no frame has {name} between {low:g} and {high:g} degrees: the model will rarely propose "
                    f"that arc")
    if fraction is not None:
        sentence += f" ({100 * fraction:.2g}% of its draws)"
    return f"{sentence}; {hint}"


def coverage_report(coverages) -> str:
    """Lines for a terminal: per torsion its covered fraction and unvisited arc, then the warnings."""
    width = max([len(c.name) for c in coverages] + [7])
    lines = [f"{'torsion':<{width}}  covered  unvisited arc (deg)  model draws there"]
    for c in coverages:
        arc = "-" if c.gap_deg is None else f"({c.gap_deg[0]:g}, {c.gap_deg[1]:g})"
        model = "-" if c.model_fraction_in_gap is None else f"{100 * c.model_fraction_in_gap:.2g}%"
        lines.append(f"{c.name:<{width}}  {100 * c.covered_fraction:6.1f}%  {arc:<19}  {model}")
    lines += [f"warning: {c.warning}." for c in coverages if c.warning]
    return "\n".join(lines)
