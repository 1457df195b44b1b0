"""Free energies from (weighted) samples: basin differences, Ramachandran regions, 1-D and 2-D surfaces.

All free energies are returned in units of ``kT``: with the default ``kT=1.0`` they are
dimensionless (in kT); pass ``kT`` in kJ/mol (e.g. ``0.008314462618 * 300``) to get kJ/mol.
Angles are in radians and are wrapped into [-pi, pi) before binning.

Examples
--------
>>> import numpy as np
>>> from openmm_confsample.analysis.free_energy import basin_free_energy
>>> phi = np.r_[np.full(98, -1.5), np.full(2, 1.0)]   # 2 % of samples with phi > 0
>>> value, error = basin_free_energy(phi, error_method="bootstrap")
>>> round(value, 3)
3.892
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from openmm_confsample.checks import positive_float
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.analysis.statistics import (
    _as_angles,
    _as_series,
    _check_same_length,
    _normalized_weights,
    _positive_int,
    block_average_error,
    bootstrap_error,
)

__all__ = [
    "RAMACHANDRAN_REGIONS",
    "basin_free_energy",
    "region_populations",
    "region_free_energies",
    "free_energy_surface_2d",
    "free_energy_1d",
]

#: Ramachandran regions of alanine dipeptide, in degrees. Each region is a list of
#: half-open boxes ``((phi_lo, phi_hi), (psi_lo, psi_hi))``, meaning
#: ``phi_lo <= phi < phi_hi and psi_lo <= psi < psi_hi`` after wrapping into [-180, 180).
#: The boundaries follow the usual alanine-dipeptide convention (e.g. Chodera et al.,
#: J. Chem. Phys. 2006; Bolhuis et al., PNAS 2000):
#:
#: ``beta``    C7eq / C5 / PII basin: phi < 0, psi in [120, 180) or [-180, -150).
#: ``alpha_R`` right-handed helix: phi < 0, psi in [-120, 50).
#: ``alpha_L`` whole phi > 0 half (alpha_L and C7ax together): 0 <= phi < 180, any psi;
#:             it is the rare basin of :func:`basin_free_energy`.
#:
#: The regions do not overlap; phi < 0 with psi in [50, 120) or [-150, -120) is the
#: barrier/bridge area and belongs to none (reported as ``"other"`` by
#: :func:`region_populations`).
RAMACHANDRAN_REGIONS: Dict[str, list] = {
    "beta": [((-180.0, 0.0), (120.0, 180.0)), ((-180.0, 0.0), (-180.0, -150.0))],
    "alpha_R": [((-180.0, 0.0), (-120.0, 50.0))],
    "alpha_L": [((0.0, 180.0), (-180.0, 180.0))],
}


def _check_kT(kT) -> float:
    return positive_float(kT, "kT")


def _ratio_free_energy(p_a: float, p_b: float, kT: float) -> float:
    """-kT ln(p_a / p_b) with the empty-basin limits spelled out (no numpy warnings)."""
    if p_a <= 0 and p_b <= 0:
        return float("nan")
    if p_a <= 0:
        return float("inf")
    if p_b <= 0:
        return float("-inf")
    return float(-kT * np.log(p_a / p_b)) + 0.0  # + 0.0 turns -0.0 into 0.0


def basin_free_energy(
    phi,
    weights=None,
    kT: float = 1.0,
    error_method: str = "block",
    n_blocks: int = 10,
    n_bootstrap: int = 200,
    block_size: Optional[int] = None,
    seed: int = 0,
) -> Tuple[float, float]:
    r"""Free energy of the phi > 0 basin relative to phi < 0.

    :math:`\Delta F = F(\phi>0) - F(\phi<0) = -kT \ln\frac{P(\phi>0)}{P(\phi<0)}`;
    phi exactly 0 (after wrapping into [-pi, pi)) counts as phi < 0.

    Parameters
    ----------
    phi : (N,) float, rad
        Backbone phi angles, in time order when ``error_method='block'``.
    weights : (N,) float, optional
        Non-negative sample weights.
    kT : float
        Unit of the result (1.0 gives kT; kJ/mol value of kT gives kJ/mol).
    error_method : {'block', 'bootstrap'}
        'block': block-average standard error of the indicator ``phi > 0`` over
        ``n_blocks`` contiguous blocks (right for a correlated time series);
        'bootstrap': bootstrap over samples, or moving blocks of ``block_size`` frames.
        The error of P is propagated as :math:`\sigma_F = kT\,\sigma_P / (P(1-P))`.
    n_blocks, n_bootstrap, block_size, seed
        Passed to :func:`block_average_error` / :func:`bootstrap_error`.

    Returns
    -------
    value, error : float, float
        In units of ``kT``. If no sample (or no weight) lies at phi > 0 the value is
        ``+inf``; if none lies at phi < 0 it is ``-inf``; the error is then ``inf``.
    """
    phi = _as_series(phi, "phi")
    kT = _check_kT(kT)
    if error_method not in ("block", "bootstrap"):
        raise ConfSampleError(
            f"Argument 'error_method' must be 'block' or 'bootstrap', got {error_method!r}."
        )
    w = _normalized_weights(weights, phi.shape[0])
    indicator = (_as_angles(phi, "phi") > 0.0).astype(float)
    p = float(indicator.mean()) if w is None else float(np.sum(w * indicator))
    p = min(max(p, 0.0), 1.0)
    value = _ratio_free_energy(p, 1.0 - p, kT)
    if error_method == "block":
        sigma_p = block_average_error(indicator, n_blocks=n_blocks, weights=w)
    else:
        def _mean(x, *ws):
            return float(np.mean(x)) if not ws else float(np.sum(x * ws[0]) / np.sum(ws[0]))

        sigma_p = bootstrap_error(
            _mean, indicator, weights=w, n_bootstrap=n_bootstrap, seed=seed, block_size=block_size
        )
    if not np.isfinite(value):
        return value, float("inf")
    return value, float(kT * sigma_p / (p * (1.0 - p)))


def _region_mask(phi_deg: np.ndarray, psi_deg: np.ndarray, boxes) -> np.ndarray:
    mask = np.zeros(phi_deg.shape[0], dtype=bool)
    for (phi_lo, phi_hi), (psi_lo, psi_hi) in boxes:
        mask |= (phi_deg >= phi_lo) & (phi_deg < phi_hi) & (psi_deg >= psi_lo) & (psi_deg < psi_hi)
    return mask


def region_populations(
    phi,
    psi,
    weights=None,
    regions: Optional[Mapping[str, Sequence]] = None,
) -> Dict[str, float]:
    """Fraction of (weighted) samples in each Ramachandran region.

    Parameters
    ----------
    phi, psi : (N,) float, rad
    weights : (N,) float, optional
        Non-negative sample weights.
    regions : dict, optional
        ``name -> list of ((phi_lo, phi_hi), (psi_lo, psi_hi))`` boxes in degrees;
        default :data:`RAMACHANDRAN_REGIONS`.

    Returns
    -------
    populations : dict name -> float
        One entry per region plus ``"other"`` for samples in no region (if regions
        overlap, a sample counts in each region it falls in and "other" is what lies
        outside all of them).
    """
    phi = _as_series(phi, "phi")
    psi = _as_series(psi, "psi")
    _check_same_length(phi, psi, "phi", "psi")
    w = _normalized_weights(weights, phi.shape[0])
    if w is None:
        w = np.full(phi.shape[0], 1.0 / phi.shape[0])
    regions = RAMACHANDRAN_REGIONS if regions is None else regions
    if not isinstance(regions, Mapping) or not regions:
        raise ConfSampleError("Argument 'regions' must be a non-empty dict of name -> list of boxes.")
    phi_deg = np.degrees(_as_angles(phi, "phi"))
    psi_deg = np.degrees(_as_angles(psi, "psi"))
    populations: Dict[str, float] = {}
    anywhere = np.zeros(phi.shape[0], dtype=bool)
    for name, boxes in regions.items():
        try:
            mask = _region_mask(phi_deg, psi_deg, boxes)
        except (TypeError, ValueError):
            raise ConfSampleError(
                f"Argument 'regions' entry {name!r} must be a list of ((phi_lo, phi_hi), (psi_lo, psi_hi)) boxes."
            ) from None
        anywhere |= mask
        populations[name] = float(np.sum(w[mask]))
    populations["other"] = float(np.sum(w[~anywhere]))
    return populations


def region_free_energies(
    phi,
    psi,
    weights=None,
    kT: float = 1.0,
    reference: Optional[str] = None,
    regions: Optional[Mapping[str, Sequence]] = None,
) -> Dict[str, float]:
    """Free energy of each Ramachandran region relative to a reference region.

    :math:`F_r = -kT \\ln(P_r / P_{ref})`.

    Parameters
    ----------
    phi, psi : (N,) float, rad
    weights : (N,) float, optional
    kT : float
        Unit of the result.
    reference : str, optional
        Region name whose free energy is 0; default the most populated region.
    regions : dict, optional
        As in :func:`region_populations`.

    Returns
    -------
    free_energies : dict name -> float
        In units of ``kT``; ``inf`` for an empty region. The ``"other"`` remainder is not
        included.
    """
    kT = _check_kT(kT)
    pops = region_populations(phi, psi, weights=weights, regions=regions)
    pops.pop("other")
    if reference is None:
        reference = max(pops, key=pops.get)
    if reference not in pops:
        raise ConfSampleError(
            f"Argument 'reference' must be one of {sorted(pops)}, got {reference!r}."
        )
    if pops[reference] <= 0:
        raise ConfSampleError(f"Argument 'reference' names region {reference!r}, which has no samples.")
    return {name: _ratio_free_energy(p, pops[reference], kT) for name, p in pops.items()}


def _free_energy_histogram(
    samples: np.ndarray,
    edges: Sequence[np.ndarray],
    w: Optional[np.ndarray],
    kT: float,
) -> np.ndarray:
    """-kT ln(probability density) shifted to min 0; +inf in empty bins. samples: (N, d).

    Dividing by the bin volume keeps profiles right when explicit edges are uneven.
    """
    hist, _ = np.histogramdd(samples, bins=list(edges), weights=w)
    volume = np.ones(hist.shape)
    for axis, e in enumerate(edges):
        shape = [1] * hist.ndim
        shape[axis] = -1
        volume = volume * np.diff(np.asarray(e, dtype=float)).reshape(shape)
    hist = hist / volume
    F = np.full(hist.shape, np.inf)
    filled = hist > 0
    F[filled] = -kT * np.log(hist[filled])
    F[filled] -= F[filled].min()
    return F


def free_energy_surface_2d(
    phi,
    psi,
    bins: int = 60,
    weights=None,
    kT: float = 1.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Ramachandran free-energy surface from a 2-D histogram.

    Parameters
    ----------
    phi, psi : (N,) float, rad
        Wrapped into [-pi, pi).
    bins : int
        Bins per axis over [-pi, pi) (60 gives 6 degree bins).
    weights : (N,) float, optional
    kT : float
        Unit of the result.

    Returns
    -------
    F : (bins, bins) float
        ``F[i, j]`` for phi in ``[edges[i], edges[i+1])`` and psi in
        ``[edges[j], edges[j+1])``, in units of ``kT`` with minimum 0; ``inf`` in empty
        bins (mask them when plotting).
    edges : (bins + 1,) float, rad
        Bin edges, shared by both axes.
    """
    bins = _positive_int(bins, "bins")
    kT = _check_kT(kT)
    phi = _as_series(phi, "phi")
    psi = _as_series(psi, "psi")
    _check_same_length(phi, psi, "phi", "psi")
    w = _normalized_weights(weights, phi.shape[0])
    angles = np.column_stack([_as_angles(phi, "phi"), _as_angles(psi, "psi")])
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    return _free_energy_histogram(angles, [edges, edges], w, kT), edges


def free_energy_1d(
    x,
    bins=50,
    weights=None,
    kT: float = 1.0,
    range: Optional[Tuple[float, float]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Free-energy profile of one coordinate from a histogram.

    Parameters
    ----------
    x : (N,) float
        Any coordinate (a TIC, an RMSD in nm, an angle in rad - wrap angles yourself).
    bins : int or (n_bins + 1,) float
        Number of bins or explicit edges (as ``numpy.histogram``).
    weights : (N,) float, optional
    kT : float
        Unit of the result.
    range : (float, float), optional
        Histogram range when ``bins`` is an int; default the data range.

    Returns
    -------
    F : (n_bins,) float
        :math:`-kT \\ln p(x)` from the histogram density (so uneven edges are handled),
        in units of ``kT`` with minimum 0; ``inf`` in empty bins.
    edges : (n_bins + 1,) float
        Bin edges, in units of ``x``.
    """
    x = _as_series(x, "x")
    kT = _check_kT(kT)
    w = _normalized_weights(weights, x.shape[0])
    if np.ndim(bins) == 0:
        bins = _positive_int(bins, "bins")
    else:
        bins = np.asarray(bins, dtype=float)
        if bins.ndim != 1 or bins.shape[0] < 2 or not np.all(np.diff(bins) > 0):
            raise ConfSampleError("Argument 'bins' must be an int or an increasing 1-D array of edges.")
    if range is not None:
        if len(range) != 2 or not np.all(np.isfinite(range)) or range[0] >= range[1]:
            raise ConfSampleError(f"Argument 'range' must be (low, high) with low < high, got {range!r}.")
    edges = np.histogram_bin_edges(x, bins=bins, range=range)
    return _free_energy_histogram(x[:, None], [edges], w, kT), edges
