"""Populations of states and how many independent samples a run holds of them.

For a 0/1 series (a frame in the state or not): the population with a block-averaging error and the free
energy of the state (:func:`population_estimate`), the entries into it (:func:`indicator_entries`), and an
effective sample size bounded by the transitions actually seen (:func:`indicator_ess`), which the
autocorrelation estimate alone overstates for a state a run barely visited. The benchmark harness
(:mod:`openmm_confsample.bench.summary`) and the ``sample`` report (:mod:`openmm_confsample.workflows.report`)
measure every state with these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .statistics import block_average_error, effective_sample_size

__all__ = ["PopulationEstimate", "population_estimate", "indicator_entries", "indicator_ess",
           "weighted_indicator_ess"]


@dataclass
class PopulationEstimate:
    """P(state) with its block-averaging error, and Delta F = F(in) - F(out) = -ln(P / (1 - P)) in kT."""

    p: float
    p_error: float
    delta_f_kT: float
    delta_f_error_kT: float

    def to_dict(self) -> dict:
        return {"p": self.p, "p_error": self.p_error, "delta_f_kT": self.delta_f_kT,
                "delta_f_error_kT": self.delta_f_error_kT}


def population_estimate(indicator, weights=None, n_blocks: int = 10) -> PopulationEstimate:
    """Population, block error (``n_blocks`` contiguous blocks; inf with fewer than 2 samples) and Delta F.

    The error of Delta F is propagated from that of P: sigma_F = sigma_P / (P (1 - P)). A state never
    (always) visited gives Delta F = +inf (-inf) with an infinite error.
    """
    x = np.asarray(indicator, dtype=float)
    w = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
    p = float(x.mean()) if w is None else float(w @ x)
    p = min(max(p, 0.0), 1.0)
    blocks = min(int(n_blocks), len(x))
    if blocks < 2:
        return PopulationEstimate(p, float("inf"), float("nan"), float("inf"))
    p_error = block_average_error(x, n_blocks=blocks, weights=w)
    if p <= 0.0 or p >= 1.0:
        return PopulationEstimate(p, p_error, float("inf") if p <= 0.0 else float("-inf"), float("inf"))
    return PopulationEstimate(p, p_error, float(-np.log(p / (1.0 - p))) + 0.0, float(p_error / (p * (1.0 - p))))


def _ess(x: np.ndarray) -> float:
    return effective_sample_size(np.asarray(x, dtype=float)) if len(x) > 1 else float(len(x))


def indicator_entries(indicator) -> int:
    """How many times a 0/1 series enters 1 (a series that starts at 1 counts that as an entry)."""
    x = np.asarray(indicator, dtype=bool)
    if x.size == 0:
        return 0
    return int(x[0]) + int(np.count_nonzero(x[1:] & ~x[:-1]))


def indicator_ess(indicator, p: float | None = None) -> tuple[float, float, int, bool]:
    """ESS of a rare 0/1 observable: ``min(N / tau_int, two-state ESS from the entries)``.

    The autocorrelation estimate ``N / tau_int`` cannot see fluctuations a run never made: a run with one
    brief visit to the rare state looks uncorrelated and claims thousands of effective samples. A two-state
    Markov chain with per-sample entry/exit probabilities a, b has ``tau_int = (2 - a - b) / (a + b)``; with
    ``r = a + b = entries / (N p (1 - p))`` (``p`` the reference probability) its ESS is ``N r / (2 - r)``:
    ``N`` for independent samples, ``entries / (2 p (1 - p))`` for slow transitions. This second term bounds
    the ESS by the transitions actually seen; well-mixed runs are set by the first. A run that never entered
    the rare state has no measurable ESS; it is given the value of one entry as an upper bound (flagged), so
    that ratios against it are lower bounds.

    Returns (ess, ess_autocorrelation, entries, upper_bound).
    """
    x = np.asarray(indicator, dtype=float)
    autocorrelation_ess = _ess(x)
    entries = indicator_entries(x)
    p = float(x.mean()) if p is None else float(p)
    if not 0.0 < p < 1.0:
        return autocorrelation_ess, autocorrelation_ess, entries, False
    r = min(max(entries, 1) / (len(x) * p * (1.0 - p)), 1.0)
    two_state = len(x) * r / (2.0 - r)
    if entries == 0 or (entries == 1 and x[0] == 1.0 and x.all()):
        return float(two_state), autocorrelation_ess, entries, True
    return float(min(autocorrelation_ess, two_state)), autocorrelation_ess, entries, False


def weighted_indicator_ess(indicator: np.ndarray, p_error: float, p: float) -> tuple[float, int, bool]:
    """ESS of a reweighted indicator: the sample count whose binomial error equals the block error.

    For importance-weighted frames there is no single autocorrelation time; ``p (1 - p) / sigma_P^2``
    (``sigma_P`` the weighted block-averaging error, ``p`` the best available P) is what an uncorrelated,
    unweighted run would need for the same error, capped at the frame count. Returns (ess, entries,
    upper_bound); a run that never entered the state gets the value of one entry, as in :func:`indicator_ess`.
    """
    n = len(indicator)
    entries = indicator_entries(indicator)
    if entries == 0 or not 0.0 < p < 1.0 or not np.isfinite(p_error):
        ess, _, _, upper = indicator_ess(indicator, p if 0.0 < p < 1.0 else None)
        return ess, entries, entries == 0 or upper
    if p_error <= 0.0:
        return float(n), entries, False
    return float(min(n, p * (1.0 - p) / p_error**2)), entries, False
