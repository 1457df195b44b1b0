"""Sampling statistics: autocorrelation, effective sample size, error bars, Jensen-Shannon divergence.

Every function takes plain numpy arrays. Time series are 1-D arrays of one observable
sampled at equal intervals (one value per frame or per MCMC step); angles are in radians.
Where samples may carry importance weights (reweighted MD, Boltzmann-reweighted generator
output) a ``weights`` argument accepts non-negative numbers that are normalized internally.

Bad input (NaN, mismatched lengths, negative weights, too few samples) raises
:class:`~openmm_confsample.errors.ConfSampleError` naming the argument at fault.

Examples
--------
>>> import numpy as np
>>> from openmm_confsample.analysis.statistics import effective_sample_size
>>> x = np.random.default_rng(0).normal(size=10_000)
>>> bool(9_000 < effective_sample_size(x) <= 10_000)
True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import numpy as np

from openmm_confsample.checks import positive_float, positive_int as _positive_int
from openmm_confsample.errors import ConfSampleError

__all__ = [
    "autocorrelation",
    "integrated_autocorrelation_time",
    "effective_sample_size",
    "ess_per_second",
    "block_average_error",
    "bootstrap_error",
    "jensen_shannon_divergence",
]


# --------------------------------------------------------------------------------------
# Input checks shared by the analysis modules (private: imported by free_energy, kinetics
# and plots so that every entry point words its errors the same way).
# --------------------------------------------------------------------------------------

def _as_series(x, name: str, min_length: int = 1) -> np.ndarray:
    """A finite 1-D float array of at least ``min_length`` samples, or ConfSampleError."""
    return _finite_samples(x, name, min_length, series=True)


def _as_samples(x, name: str, min_length: int = 1) -> np.ndarray:
    """A finite (N, d) float array (a 1-D input becomes (N, 1)), or ConfSampleError."""
    return _finite_samples(x, name, min_length, series=False)


def _finite_samples(x, name: str, min_length: int, series: bool) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        kind = "a 1-D array of numbers" if series else "an array of numbers"
        raise ConfSampleError(f"Argument '{name}' must be {kind} ({exc}).") from None
    if not series and arr.ndim == 1:
        arr = arr[:, None]
    if series and arr.ndim != 1:
        raise ConfSampleError(f"Argument '{name}' must be a 1-D array of samples, got shape {arr.shape}.")
    if not series and arr.ndim != 2:
        raise ConfSampleError(
            f"Argument '{name}' must have shape (n_samples,) or (n_samples, n_dims), got {arr.shape}."
        )
    if arr.shape[0] < min_length:
        raise ConfSampleError(f"Argument '{name}' needs at least {min_length} samples, got {arr.shape[0]}.")
    if not np.all(np.isfinite(arr)):
        raise ConfSampleError(f"Argument '{name}' contains NaN or infinite values.")
    return arr


def _as_angles(x, name: str) -> np.ndarray:
    """Check radians and wrap into [-pi, pi); shape is kept.

    Values beyond +-2 pi are almost always degrees passed by mistake, so they are refused
    rather than silently wrapped.
    """
    arr = np.asarray(x, dtype=float)
    if arr.size and np.nanmax(np.abs(arr)) > 2.0 * np.pi + 1e-9:
        raise ConfSampleError(
            f"Argument '{name}' has values beyond 2*pi; angles must be in radians, not degrees."
        )
    return np.mod(arr + np.pi, 2.0 * np.pi) - np.pi


def _normalized_weights(weights, n: int, name: str = "weights") -> Optional[np.ndarray]:
    """None, or non-negative weights of length n normalized to sum 1."""
    if weights is None:
        return None
    try:
        w = np.asarray(weights, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfSampleError(f"Argument '{name}' must be a 1-D array of numbers ({exc}).") from None
    if w.ndim != 1 or w.shape[0] != n:
        raise ConfSampleError(
            f"Argument '{name}' must have one entry per sample ({n}), got shape {w.shape}."
        )
    if not np.all(np.isfinite(w)):
        raise ConfSampleError(f"Argument '{name}' contains NaN or infinite values.")
    if np.any(w < 0):
        raise ConfSampleError(f"Argument '{name}' must be non-negative.")
    total = w.sum()
    if total <= 0:
        raise ConfSampleError(f"Argument '{name}' sums to zero; at least one sample needs weight.")
    return w / total


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ConfSampleError(
            f"Arguments '{name_a}' and '{name_b}' must have the same number of samples, "
            f"got {a.shape[0]} and {b.shape[0]}."
        )


# --------------------------------------------------------------------------------------
# Autocorrelation and effective sample size
# --------------------------------------------------------------------------------------

def autocorrelation(x) -> np.ndarray:
    r"""Normalized autocorrelation function of a time series, computed by FFT.

    Uses the standard biased estimator
    :math:`\rho_t = \frac{\sum_{i=0}^{N-1-t} (x_i - \bar x)(x_{i+t} - \bar x)}{\sum_i (x_i - \bar x)^2}`,
    which is positive semi-definite and damps the noisy long-lag tail.

    Parameters
    ----------
    x : (N,) float
        Equally spaced samples of one observable.

    Returns
    -------
    rho : (N,) float
        ``rho[t]`` for lags ``t = 0 .. N-1`` with ``rho[0] = 1``. A constant series has
        no fluctuation to decorrelate, so it is reported as perfectly correlated
        (``rho[t] = 1`` for all t) rather than 0/0.

    Examples
    --------
    >>> autocorrelation([1.0, -1.0, 1.0, -1.0])[:2]
    array([ 1.  , -0.75])
    """
    x = _as_series(x, "x")
    n = x.shape[0]
    dx = x - x.mean()
    # A series that is constant to rounding has no measurable correlation structure.
    if not np.any(np.abs(dx) > 1e-12 * max(1.0, np.abs(x).max())):
        return np.ones(n)
    # Zero-pad to >= 2N so the circular correlation equals the linear one.
    n_fft = 1 << int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(dx, n=n_fft)
    acov = np.fft.irfft(f * np.conjugate(f), n=n_fft)[:n]
    return acov / acov[0]


def integrated_autocorrelation_time(x) -> float:
    r"""Integrated autocorrelation time :math:`\tau_{int} = 1 + 2\sum_{t \ge 1} \rho_t` in samples.

    The sum runs over lags ``1 <= t < T`` where ``T`` is the first lag with
    :math:`\rho_T \le 0` (initial-positive truncation): beyond it the estimate is noise.
    With this convention an uncorrelated series has :math:`\tau_{int} \approx 1` and an
    AR(1) process :math:`x_{t+1} = a x_t + \epsilon` has :math:`\tau_{int} = (1+a)/(1-a)`.

    Parameters
    ----------
    x : (N,) float
        Equally spaced samples of one observable.

    Returns
    -------
    tau : float
        In units of the sampling interval, clipped to ``[1, N]``. A constant series returns
        ``N`` (the whole run counts as one sample).
    """
    rho = autocorrelation(x)
    n = rho.shape[0]
    non_positive = np.flatnonzero(rho[1:] <= 0.0)
    cutoff = non_positive[0] + 1 if non_positive.size else n
    tau = 1.0 + 2.0 * float(np.sum(rho[1:cutoff]))
    return float(min(max(tau, 1.0), float(n)))


def _is_chain_list(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(np.ndim(c) >= 1 for c in x)


def effective_sample_size(x: Union[np.ndarray, Sequence[np.ndarray]]) -> float:
    r"""Effective number of independent samples, :math:`N / \tau_{int}`.

    Parameters
    ----------
    x : (N,) float, or a list of 1-D arrays
        One time series, or several independent chains (e.g. replicas or repeated runs,
        any lengths); for chains the per-chain values are summed.

    Returns
    -------
    ess : float
        In ``[1, N]`` per chain; a constant series gives 1.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> chains = [rng.normal(size=5_000), rng.normal(size=5_000)]
    >>> bool(9_000 < effective_sample_size(chains) <= 10_000)
    True
    """
    if _is_chain_list(x):
        return float(sum(effective_sample_size(_as_series(c, f"x[{i}]")) for i, c in enumerate(x)))
    if isinstance(x, np.ndarray) and x.ndim == 2:
        raise ConfSampleError(
            "Argument 'x' is 2-D; pass one 1-D series or a list of 1-D chains."
        )
    x = _as_series(x, "x")
    return float(x.shape[0] / integrated_autocorrelation_time(x))


def ess_per_second(x, wall_seconds: float) -> float:
    """Effective samples per second of wall-clock time.

    Parameters
    ----------
    x : (N,) float, or a list of 1-D arrays
        As in :func:`effective_sample_size`.
    wall_seconds : float, s
        Wall-clock time spent producing ``x``; must be positive.
    """
    return effective_sample_size(x) / positive_float(wall_seconds, "wall_seconds")


# --------------------------------------------------------------------------------------
# Error bars
# --------------------------------------------------------------------------------------

def block_average_error(x, n_blocks: int = 10, weights=None) -> float:
    r"""Standard error of the (weighted) mean of a correlated time series by block averaging.

    The series is cut into ``n_blocks`` contiguous blocks of equal length (the last
    ``N mod n_blocks`` samples are dropped); block means are treated as independent.
    Blocks must be longer than the autocorrelation time for the error to be honest.

    With weights, each block contributes its weighted mean :math:`m_b` with block weight
    :math:`W_b`, and the error of :math:`m = \sum_b W_b m_b` is
    :math:`\sqrt{\frac{n}{n-1}\sum_b W_b^2 (m_b - m)^2}`, which reduces to
    ``std(block means, ddof=1) / sqrt(n_blocks)`` for equal weights.

    Parameters
    ----------
    x : (N,) float
        Time series.
    n_blocks : int
        Number of blocks, at least 2 and at most N.
    weights : (N,) float, optional
        Non-negative sample weights.

    Returns
    -------
    error : float
        Same units as ``x``.
    """
    n_blocks = _positive_int(n_blocks, "n_blocks", minimum=2)
    x = _as_series(x, "x")
    if x.shape[0] < n_blocks:
        raise ConfSampleError(
            f"Argument 'n_blocks' ({n_blocks}) exceeds the number of samples in 'x' ({x.shape[0]})."
        )
    w = _normalized_weights(weights, x.shape[0])
    if w is None:
        w = np.full(x.shape[0], 1.0 / x.shape[0])
    length = x.shape[0] // n_blocks
    used = length * n_blocks
    xb = x[:used].reshape(n_blocks, length)
    wb = w[:used].reshape(n_blocks, length)
    block_weight = wb.sum(axis=1)
    keep = block_weight > 0
    if keep.sum() < 2:
        raise ConfSampleError("Argument 'weights' puts weight in fewer than two blocks; no block error exists.")
    block_mean = (xb[keep] * wb[keep]).sum(axis=1) / block_weight[keep]
    W = block_weight[keep] / block_weight[keep].sum()
    mean = np.sum(W * block_mean)
    k = keep.sum()
    return float(np.sqrt(k / (k - 1) * np.sum(W**2 * (block_mean - mean) ** 2)))


def bootstrap_error(
    stat_fn: Callable,
    x,
    weights=None,
    n_bootstrap: int = 200,
    seed: int = 0,
    block_size: Optional[int] = None,
):
    """Bootstrap standard error of any statistic of a sample.

    Parameters
    ----------
    stat_fn : callable
        ``stat_fn(x)`` or, when ``weights`` is given, ``stat_fn(x, weights)``; returns a
        float or an array of floats. It receives resampled rows of ``x`` (and the matching
        weights, not renormalized).
    x : (N, ...) array
        Samples, resampled along the first axis.
    weights : (N,) float, optional
        Non-negative sample weights, resampled together with ``x``.
    n_bootstrap : int
        Number of bootstrap replicates (>= 2).
    seed : int
        Seed of the numpy generator that draws the resamples.
    block_size : int, optional
        If given, use the moving-block bootstrap with blocks of this many consecutive
        samples, which keeps the autocorrelation of a time series inside each block;
        choose it a few times larger than the autocorrelation time. ``None`` resamples
        individual samples (only right for independent samples).

    Returns
    -------
    error : float or array
        Standard deviation (ddof=1) of the statistic over replicates, elementwise for an
        array statistic. If any replicate gives a non-finite value (e.g. a population
        that is 0 in some resample) the error is ``inf`` for that element.
    """
    if not callable(stat_fn):
        raise ConfSampleError("Argument 'stat_fn' must be callable.")
    n_bootstrap = _positive_int(n_bootstrap, "n_bootstrap", minimum=2)
    arr = np.asarray(x)
    if arr.ndim == 0 or arr.shape[0] < 2:
        raise ConfSampleError("Argument 'x' needs at least 2 samples along its first axis.")
    if np.issubdtype(arr.dtype, np.number) and not np.all(np.isfinite(arr)):
        raise ConfSampleError("Argument 'x' contains NaN or infinite values.")
    n = arr.shape[0]
    w = None
    if weights is not None:
        _normalized_weights(weights, n)  # validation only
        w = np.asarray(weights, dtype=float)
    if block_size is not None:
        block_size = _positive_int(block_size, "block_size")
        if block_size > n:
            raise ConfSampleError(
                f"Argument 'block_size' ({block_size}) exceeds the number of samples ({n})."
            )
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_bootstrap):
        if block_size is None:
            idx = rng.integers(0, n, size=n)
        else:
            n_blk = -(-n // block_size)
            starts = rng.integers(0, n - block_size + 1, size=n_blk)
            idx = (starts[:, None] + np.arange(block_size)[None, :]).ravel()[:n]
        if w is None:
            value = stat_fn(arr[idx])
        else:
            value = stat_fn(arr[idx], w[idx])
        stats.append(np.asarray(value, dtype=float))
    stats = np.stack(stats)
    finite = np.all(np.isfinite(stats), axis=0)
    with np.errstate(invalid="ignore"):
        err = np.where(finite, np.std(np.where(np.isfinite(stats), stats, 0.0), axis=0, ddof=1), np.inf)
    return float(err) if err.ndim == 0 else err


# --------------------------------------------------------------------------------------
# Distribution distances
# --------------------------------------------------------------------------------------

def _angle_histogram(angles: np.ndarray, bins: int, w: Optional[np.ndarray]) -> np.ndarray:
    d = angles.shape[1]
    edges = [np.linspace(-np.pi, np.pi, bins + 1)] * d
    hist, _ = np.histogramdd(angles, bins=edges, weights=w)
    return hist.ravel()


def jensen_shannon_divergence(
    angles_a,
    angles_b,
    bins: int = 36,
    weights_a=None,
    weights_b=None,
    pseudocount: float = 0.0,
) -> float:
    r"""Jensen-Shannon divergence between two distributions of torsion angles.

    Both sample sets are histogrammed on the same ``bins`` per dimension over
    :math:`[-\pi, \pi)^d`, and
    :math:`JSD = \tfrac12 KL(p\|m) + \tfrac12 KL(q\|m)`, :math:`m = (p+q)/2`, with the
    natural logarithm, so the result lies in :math:`[0, \ln 2]`: 0 for identical
    histograms, :math:`\ln 2` for histograms with no bin in common.

    Parameters
    ----------
    angles_a, angles_b : (N, d) or (N,) float, rad
        Samples, e.g. (phi, psi) columns; wrapped into [-pi, pi). ``d`` must match.
    bins : int
        Bins per dimension (36 gives 10 degree bins).
    weights_a, weights_b : (N,) float, optional
        Non-negative sample weights.
    pseudocount : float
        Added to every bin, in units of samples (weighted histograms are scaled to their
        number of samples first), before normalizing. 0 (default) keeps the exact limits
        above; a value such as 0.5 regularizes sparse histograms but biases the
        divergence of well-separated distributions below ln 2.

    Returns
    -------
    jsd : float, nats
    """
    bins = _positive_int(bins, "bins")
    a = _as_samples(angles_a, "angles_a")
    b = _as_samples(angles_b, "angles_b")
    if a.shape[1] != b.shape[1]:
        raise ConfSampleError(
            f"Arguments 'angles_a' and 'angles_b' must have the same number of angles per sample, "
            f"got {a.shape[1]} and {b.shape[1]}."
        )
    if bins ** a.shape[1] > 50_000_000:
        raise ConfSampleError(f"Argument 'bins' ({bins}) is too fine for {a.shape[1]} dimensions.")
    try:
        pseudocount = float(pseudocount)
    except (TypeError, ValueError):
        raise ConfSampleError(f"Argument 'pseudocount' must be a number, got {pseudocount!r}.") from None
    if not np.isfinite(pseudocount) or pseudocount < 0:
        raise ConfSampleError(f"Argument 'pseudocount' must be non-negative, got {pseudocount!r}.")
    a = _as_angles(a, "angles_a")
    b = _as_angles(b, "angles_b")
    wa = _normalized_weights(weights_a, a.shape[0], "weights_a")
    wb = _normalized_weights(weights_b, b.shape[0], "weights_b")
    ha = _angle_histogram(a, bins, None if wa is None else wa * a.shape[0])
    hb = _angle_histogram(b, bins, None if wb is None else wb * b.shape[0])
    p = ha + pseudocount
    q = hb + pseudocount
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def _kl(u: np.ndarray) -> float:
        nz = u > 0  # m > 0 wherever u > 0
        return float(np.sum(u[nz] * np.log(u[nz] / m[nz])))

    jsd = 0.5 * _kl(p) + 0.5 * _kl(q)
    return float(min(max(jsd, 0.0), np.log(2.0)))
