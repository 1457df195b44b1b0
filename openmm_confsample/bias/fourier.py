"""The bias on a torsion grid: tabulate a model's free energy, remove earlier biases (WHAM), fit a Fourier series.

Plain numpy: nothing here knows about torch or OpenMM. :class:`~openmm_confsample.bias.LearnedTorsionBias`
turns the fitted series into a force.

The exact form
--------------
On a regular grid ``tau_j = -pi + 2 pi j / n`` (``n = grid_points`` per torsion, ``n^k`` points)::

    r(tau)  = kT (log q(tau) - max_grid log q)              # = -(F - F_min), <= 0
    s(r)    = -cap + w * softplus((r + cap) / w)             # smooth max(r, -cap), width w = smoothing_kT * kT
    B_grid  = s(r) - max_grid s(r)                           # in [-cap - w log(1 + e^(-cap/w)), 0]

``cap = cap_kT * kT``. Where the model has seen data, ``B = -(F - F_min)`` to within
``w exp(-cap/w)``; where ``log q`` falls more than ``cap`` below its peak (barriers the data never
crossed, regions the model only extrapolates into) ``B`` is flat at ``-cap``: those regions are
lowered by at most ``cap`` and get no extra push from the model's guesses.

Two options turn this into an iterated, well-tempered bias (:func:`~openmm_confsample.bias.refine_learned_bias`):

* ``prior_bias`` B0: the model was trained on frames sampled *with* the bias B0, so it learned the
  biased marginal ``q ∝ p exp(-B0/kT)``; the unbiased free energy is ``F = -kT log q - B0`` and ``r``
  above uses ``log q + B0/kT`` in place of ``log q`` (for frames pooled from several biased runs, WHAM
  on the grid: :func:`unbias_on_grid`).
* ``bias_factor`` gamma: the bias is ``(1 - 1/gamma) B_grid``, so the biased marginal is ``p^(1/gamma)``
  (barriers divided by gamma) instead of flat. A fully flat landscape (gamma = inf, the default) spends
  most of its time in regions of negligible Boltzmann weight, where reweighting throws the frames away;
  gamma of 4 to 10 keeps both the barrier crossings and the effective sample size.

``B_grid`` is fitted by a truncated real Fourier series (least squares on the grid, i.e. the
discrete Fourier coefficients, optionally damped by ``exp(-(sigma |m|)^2 / 2)``, which is a
convolution with a wrapped Gaussian of width ``sigma = smoothing_rad``)::

    B(tau) = sum_m  a_m cos(m . tau) + b_m sin(m . tau),    m in Z^k, max_i |m_i| <= max_frequency,

and shifted so that its maximum on the grid is 0. It is periodic, smooth and cheap; its deviation
from ``B_grid`` is stored (``fit_rmse_kJ``, ``fit_max_error_kJ``). Only the Fourier series enters the
dynamics and the weights, so the reweighting is exact for the bias that was actually applied.

Units: angles in radians, energies and ``kT`` in kJ/mol.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from ..checks import finite_float, positive_float, positive_int, positive_kT
from ..errors import ConfSampleError

__all__ = ["MAX_GRID_POINTS", "torsion_grid", "tabulate_bias", "unbias_on_grid", "fit_fourier_series"]

#: Largest tabulation grid (points in all); beyond it (k >= 4 at useful resolution) tabulation is not the tool.
MAX_GRID_POINTS = 300_000


def check_bias_factor(bias_factor) -> float:
    """The well-tempered factor gamma as a float > 1 (inf allowed: full flattening)."""
    value = math.inf if bias_factor == math.inf else finite_float(bias_factor, "bias_factor")
    if value <= 1.0:
        raise ConfSampleError(f"bias_factor must be a number > 1 (or inf), got {bias_factor!r}.")
    return value


def torsion_grid(k: int, n: int) -> np.ndarray:
    """(n^k, k) radians: the regular grid ``-pi + 2 pi j / n`` per torsion, in C order (last torsion fastest)."""
    axis = -np.pi + 2.0 * np.pi * np.arange(n) / n
    return np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)


def tabulate_bias(log_density, n_torsions: int, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                  smoothing_kT: float = 0.5, prior_bias_kJ=None, bias_factor: float = math.inf,
                  prior_fractions=None):
    """The capped, smoothed bias ``B_grid`` (kJ/mol) of ``log_density`` on a regular grid (module doc).

    ``log_density``: callable (N, k) radians -> (N,) log density, or an object with ``log_prob``.
    ``prior_bias_kJ``: optional callable (N, k) radians -> (N,) kJ/mol, the bias the density's data were
    sampled under (added to ``kT log q``), or a sequence of them (None for unbiased data) when the data
    pool runs with different biases, in the proportions ``prior_fractions`` (default equal); the unbiased
    density is then recovered by WHAM on the grid (:func:`unbias_on_grid`). ``bias_factor``: the
    well-tempered gamma (the result is multiplied by ``1 - 1/gamma``).

    Returns
    -------
    grid : (n^k, k) float, radians (C order, last torsion fastest)
    bias : (n,)*k float, kJ/mol, in [-(1 - 1/gamma) cap, 0] up to ``w log(1 + exp(-cap/w))``
    """
    kT = positive_kT(kT)
    tempering = 1.0 - 1.0 / check_bias_factor(bias_factor)
    cap = positive_float(cap_kT, "cap_kT") * kT
    width = positive_float(smoothing_kT, "smoothing_kT") * kT
    n, k = positive_int(grid_points, "grid_points", minimum=4), positive_int(n_torsions, "n_torsions")
    if n**k > MAX_GRID_POINTS:
        raise ConfSampleError(
            f"a {n}^{k} grid has {n**k} points (limit {MAX_GRID_POINTS}); lower grid_points or bias fewer torsions."
        )
    log_prob = getattr(log_density, "log_prob", log_density)
    if not callable(log_prob):
        raise ConfSampleError(f"log_density must be callable or have log_prob, got {type(log_density).__name__}.")
    grid = torsion_grid(k, n)
    log_q = np.asarray(log_prob(grid), dtype=np.float64).reshape(-1)
    if log_q.shape[0] != grid.shape[0]:
        raise ConfSampleError(f"log_density returned {log_q.shape[0]} values for {grid.shape[0]} grid points.")
    log_q = np.where(np.isnan(log_q), -np.inf, log_q)
    if prior_bias_kJ is not None:
        log_q = unbias_on_grid(log_q, grid, prior_bias_kJ, prior_fractions, kT)
    if not np.isfinite(log_q.max()):
        raise ConfSampleError("log_density is not finite anywhere on the grid.")
    relative = kT * (log_q - log_q.max())  # -(F - F_min) <= 0; -inf where q = 0 becomes -cap below
    soft = -cap + width * np.logaddexp(0.0, (relative + cap) / width)
    soft -= soft.max()
    return grid, tempering * soft.reshape((n,) * k)


def unbias_on_grid(log_pooled, grid, priors, fractions, kT, iterations: int = 1000, tolerance: float = 1e-10):
    """log p on the grid from the log density of frames pooled from runs with different biases (WHAM).

    Frames of run r (a fraction f_r of the pool) follow ``p exp(-B_r/kT) / Z_r``, so the pool follows
    ``m = p sum_r f_r exp(-B_r/kT) / Z_r`` with ``Z_r = sum_grid p exp(-B_r/kT)``; iterate
    ``p = m / sum_r f_r exp(-B_r/kT) / Z_r`` to self-consistency. One run: ``log p = log m + B/kT``.

    ``priors``: one callable (N, k) radians -> (N,) kJ/mol or a sequence of them (None: an unbiased run).
    Returns (n^k,) log p, normalised to a maximum of 0.
    """
    if callable(priors):
        priors = [priors]
    priors = list(priors)
    if not priors:
        raise ConfSampleError("prior_bias_kJ is an empty sequence; pass None for unbiased data.")
    u = np.zeros((len(priors), grid.shape[0]))
    for r, prior in enumerate(priors):
        if prior is None:
            continue
        values = np.asarray(prior(grid), dtype=np.float64).reshape(-1)
        if values.shape[0] != grid.shape[0] or not np.all(np.isfinite(values)):
            raise ConfSampleError("prior_bias_kJ must return one finite energy (kJ/mol) per grid point.")
        u[r] = -values / kT
    f = np.full(len(priors), 1.0 / len(priors)) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if f.shape != (len(priors),) or not np.all(np.isfinite(f)) or np.any(f < 0) or f.sum() <= 0:
        raise ConfSampleError(f"prior_fractions must be {len(priors)} non-negative numbers, got {fractions!r}.")
    log_f = np.log(f / f.sum())
    log_p = log_pooled - logsumexp(log_f[:, None] + u, axis=0)  # first guess: all Z_r equal
    for _ in range(iterations):
        log_z = logsumexp(log_p[None, :] + u, axis=1)
        new = log_pooled - logsumexp(log_f[:, None] + u - log_z[:, None], axis=0)
        new -= np.max(new[np.isfinite(new)])
        done = np.max(np.abs(np.where(np.isfinite(new), new - log_p, 0.0))) < tolerance
        log_p = new
        if done:
            break
    return log_p


def _half_space_modes(k: int, max_frequency: int) -> np.ndarray:
    """Integer vectors with max |m_i| <= max_frequency, one of each +-m pair, m = 0 first."""
    axis = np.arange(-max_frequency, max_frequency + 1)
    all_modes = np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)
    keep = []
    for m in all_modes:
        nonzero = np.nonzero(m)[0]
        if len(nonzero) == 0 or m[nonzero[0]] > 0:
            keep.append(m)
    keep.sort(key=lambda m: (np.abs(m).sum(), tuple(m)))
    return np.array(keep, dtype=np.int64)


def fit_fourier_series(values, max_frequency: int = 10, smoothing_rad: float = 0.0):
    """Least-squares truncated real Fourier series of periodic grid ``values`` ((n,)*k on :func:`tabulate_bias`'s grid).

    Returns ``modes (M, k) int, cos (M,), sin (M,), rmse, max_error``; the constant is shifted so the
    series' maximum on the grid is 0, and the errors compare the shifted series with ``values``.
    """
    values = np.asarray(values, dtype=np.float64)
    k, n = values.ndim, values.shape[0] if values.ndim else 0
    if k == 0 or any(s != n for s in values.shape):
        raise ConfSampleError(f"values must be a (n,)*k grid, got shape {values.shape}.")
    max_frequency = positive_int(max_frequency, "max_frequency", minimum=0)
    if not max_frequency < n / 2:
        raise ConfSampleError(
            f"max_frequency must be an integer in [0, {n / 2}) for a {n}-point grid, got {max_frequency!r}."
        )
    smoothing_rad = positive_float(smoothing_rad, "smoothing_rad", allow_zero=True)
    spectrum = np.fft.fftn(values) / values.size
    modes = _half_space_modes(k, max_frequency)
    # The grid starts at -pi: c_m = (-1)^(sum m) * FFT_m / N.
    c = spectrum[tuple((modes % n).T)] * np.where(modes.sum(axis=1) % 2 == 0, 1.0, -1.0)
    damping = np.exp(-0.5 * (smoothing_rad * np.linalg.norm(modes, axis=1)) ** 2)
    is_zero = ~modes.any(axis=1)
    cos_c = np.where(is_zero, c.real, 2.0 * c.real) * damping
    sin_c = np.where(is_zero, 0.0, -2.0 * c.imag) * damping
    phase = torsion_grid(k, n) @ modes.T
    fitted = np.cos(phase) @ cos_c + np.sin(phase) @ sin_c
    shift = fitted.max()
    cos_c[is_zero] -= shift
    error = (fitted - shift) - values.reshape(-1)
    return modes, cos_c, sin_c, float(np.sqrt(np.mean(error**2))), float(np.max(np.abs(error)))
