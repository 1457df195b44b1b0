"""Summaries across chains: populations with ESS per chain and pooled, R-hat, and summed move statistics.

Independent walkers (or replicas) give several chains of the same observable. Pooled over chains, the
effective sample size is the sum of the chains' ESS (:func:`~openmm_confsample.analysis.statistics.
effective_sample_size` of a list), and the standard error of the pooled mean combines the chains' block
errors. R-hat compares the variance between chains with the variance within them: near 1 when the chains
agree, above about 1.01-1.1 when they have not mixed (e.g. each walker stuck in the basin it started in).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..analysis.statistics import block_average_error, effective_sample_size
from ..errors import ConfSampleError

#: Statistics derived from the counts, recomputed after summing instead of summed.
_DERIVED = ("acceptance_rate", "seconds_per_proposal")


def sum_statistics(statistics: Iterable[dict]) -> dict:
    """Sum move statistics (counts and seconds); ``acceptance_rate`` and ``seconds_per_proposal`` recomputed.

    Examples
    --------
    >>> sum_statistics([{"n_proposed": 4, "n_accepted": 1}, {"n_proposed": 4, "n_accepted": 3}])
    {'n_proposed': 8, 'n_accepted': 4, 'acceptance_rate': 0.5}
    """
    total: dict = {}
    for stats in statistics:
        for key, value in stats.items():
            if key in _DERIVED or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                continue
            total[key] = total.get(key, 0) + (value.item() if isinstance(value, np.number) else value)
    if "n_proposed" in total and "n_accepted" in total:
        total["acceptance_rate"] = total["n_accepted"] / total["n_proposed"] if total["n_proposed"] else 0.0
    if "n_proposed" in total and "total_seconds" in total:
        total["seconds_per_proposal"] = total["total_seconds"] / total["n_proposed"] if total["n_proposed"] else 0.0
    return total


def split_r_hat(chains: Sequence[np.ndarray]) -> float:
    r"""Potential scale reduction :math:`\hat R` of one observable over chains, each split in halves.

    With the 2m half-chains of n samples, W the mean within-half variance and B/n the variance of the
    half-chain means, :math:`\hat R = \sqrt{((n-1)/n\, W + B/n) / W}` (Gelman et al., Bayesian Data Analysis,
    3rd ed., 11.4). Splitting also flags one chain that drifts. NaN where every half-chain is constant
    (e.g. an indicator that never changes in any chain): R-hat is undefined there, not 1.

    Parameters
    ----------
    chains : sequence of (N_i,) float
        At least one chain of at least 4 samples; chains are cut to the shortest length.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> bool(split_r_hat([rng.normal(size=2000), rng.normal(size=2000)]) < 1.01)
    True
    >>> bool(split_r_hat([rng.normal(size=2000), 3.0 + rng.normal(size=2000)]) > 1.5)
    True
    """
    arrays = [np.asarray(c, dtype=float).ravel() for c in chains]
    if not arrays or min(len(a) for a in arrays) < 4:
        raise ConfSampleError("split_r_hat needs at least one chain of at least 4 samples.")
    n = min(len(a) for a in arrays) // 2
    halves = np.array([half for a in arrays for half in (a[:n], a[n:2 * n])])
    within = halves.var(axis=1, ddof=1).mean()
    if within == 0.0:
        return float("nan")
    between_over_n = halves.mean(axis=1).var(ddof=1)
    return float(np.sqrt(((n - 1) / n * within + between_over_n) / within))


def _block_error(series: np.ndarray, n_blocks: int) -> float | None:
    blocks = min(n_blocks, len(series))
    return block_average_error(series, n_blocks=blocks) if blocks >= 2 else None


def chain_summary(chains: Sequence[np.ndarray], n_blocks: int = 10) -> dict:
    """Mean, error, ESS per chain and pooled, and split R-hat of one observable over several chains.

    Parameters
    ----------
    chains : sequence of (N_i,) float
        One series per chain (e.g. an indicator 0/1 per frame: the mean is a population).
    n_blocks : int
        Blocks for :func:`block_average_error` of each chain.

    Returns
    -------
    dict
        ``mean`` (pooled over all samples), ``error`` (from the chains' block errors), ``ess`` (pooled:
        the sum), ``per_chain`` (list of ``{n, mean, error, ess}``) and ``r_hat`` (None where undefined).

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> summary = chain_summary([rng.random(1000) < 0.3, rng.random(1000) < 0.3])
    >>> round(summary["mean"], 1), summary["ess"] > 1500
    (0.3, True)
    """
    arrays = [np.asarray(c, dtype=float).ravel() for c in chains]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ConfSampleError("chain_summary needs at least one non-empty chain.")
    per_chain = []
    for a in arrays:
        per_chain.append({"n": int(len(a)), "mean": float(a.mean()), "error": _block_error(a, n_blocks),
                          "ess": effective_sample_size(a)})
    total = sum(len(a) for a in arrays)
    errors = [c["error"] for c in per_chain]
    error = (None if any(e is None for e in errors)
             else float(np.sqrt(sum((len(a) / total * e) ** 2 for a, e in zip(arrays, errors)))))
    r_hat = split_r_hat(arrays) if min(len(a) for a in arrays) >= 4 else float("nan")
    return {"mean": float(np.concatenate(arrays).mean()), "error": error,
            "ess": effective_sample_size(arrays), "per_chain": per_chain,
            "r_hat": None if np.isnan(r_hat) else r_hat}
