"""Boltzmann weights of scored structures, their effective sample size, and resampling by weight.

The weights are exp(-E/kT) of relaxed structures, not exact importance weights against a proposal
density: this is the original study's protocol, kept for comparison. Exact sampling uses the
Metropolis-Hastings moves in :mod:`openmm_confsample.moves`.
"""

from __future__ import annotations

import numpy as np

from ..checks import as_generator, positive_float, positive_int
from ..errors import ConfSampleError
from ..systems import EnergyEvaluator, MolecularSystem

#: Molar gas constant in kcal/(mol K), the value RDKit/MMFF users quote.
GAS_CONSTANT_KCAL = 0.0019872041
#: kT at 298.15 K in kcal/mol (0.5925), the study's default for MMFF94 energies.
KT_KCAL_298 = GAS_CONSTANT_KCAL * 298.15


def boltzmann_weights(energies, kT: float = KT_KCAL_298) -> np.ndarray:
    """Normalized Boltzmann weights w_i = exp(-(E_i - min E)/kT) / sum_j exp(-(E_j - min E)/kT).

    Parameters
    ----------
    energies : (N,) float
        In the same unit as ``kT``. Non-finite energies (failed structures) get weight 0.
    kT : float
        Thermal energy; the default is 0.5925 kcal/mol (298.15 K), for MMFF94 energies. Use
        ``kT_kJ_per_mol(T)`` for OpenMM energies.

    Returns
    -------
    (N,) float, summing to 1.

    Examples
    --------
    >>> w = boltzmann_weights([0.0, 1.0], kT=1.0)
    >>> round(float(w[0] / w[1]), 6) == round(float(np.e), 6)
    True
    """
    values = np.array(energies, dtype=float).reshape(-1)
    if values.size == 0:
        raise ConfSampleError("energies is empty; give at least one energy.")
    kT = positive_float(kT, "kT")
    finite = np.isfinite(values)
    if not finite.any():
        raise ConfSampleError("energies contain no finite value; no structure can be weighted.")
    weights = np.zeros_like(values)
    weights[finite] = np.exp(-(values[finite] - values[finite].min()) / kT)
    return weights / weights.sum()


def _checked_weights(weights) -> np.ndarray:
    w = np.array(weights, dtype=float).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfSampleError("weights must be a non-empty array of finite non-negative numbers with a positive sum.")
    return w


def kish_effective_sample_size(weights) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: N for equal weights, 1 when one weight dominates."""
    w = _checked_weights(weights)
    return float(w.sum() ** 2 / np.sum(w * w))


def resample(weights, n: int, seed: int | np.random.Generator | None = 0, method: str = "multinomial") -> np.ndarray:
    """``n`` indices drawn with probabilities ``weights`` (normalized here).

    Parameters
    ----------
    weights : (N,) float, non-negative
    n : int
        Number of indices to draw.
    seed : int or numpy.random.Generator
    method : 'multinomial' or 'systematic'
        Multinomial draws independently; systematic uses one uniform offset and a comb of ``n`` points
        (lower variance: every index appears floor(n w_i) or ceil(n w_i) times), returned in random order.

    Returns
    -------
    (n,) int indices into ``weights``.
    """
    w = _checked_weights(weights)
    n = positive_int(n, "n")
    rng = as_generator(seed)
    p = w / w.sum()
    if method == "multinomial":
        return rng.choice(len(p), size=n, replace=True, p=p)
    if method == "systematic":
        comb = (rng.random() + np.arange(n)) / n
        cumulative = np.cumsum(p)
        cumulative[-1] = 1.0
        indices = np.searchsorted(cumulative, comb, side="right")
        return rng.permutation(np.minimum(indices, len(p) - 1))
    raise ConfSampleError(f"method must be 'multinomial' or 'systematic', got {method!r}.")


def openmm_energies(molecular_system: MolecularSystem, positions, platform: str = "Reference") -> np.ndarray:
    """Potential energies (N,) in kJ/mol of positions (N, n_atoms, 3) nm under the system's OpenMM force field.

    Structures OpenMM cannot evaluate, or whose energy is NaN, get ``inf`` (weight 0 in :func:`boltzmann_weights`).
    """
    batch = np.asarray(positions, dtype=float)
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3 or batch.shape[1:] != (molecular_system.n_atoms, 3):
        raise ConfSampleError(
            f"positions must have shape (N, {molecular_system.n_atoms}, 3) in nm, got {np.shape(positions)}."
        )
    return np.asarray(EnergyEvaluator(molecular_system, platform).energies(batch), dtype=float).reshape(-1)

