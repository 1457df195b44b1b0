"""Slow coordinates and kinetics with deeptime: torsion features, TICA, MSM implied timescales.

Thin wrappers that validate input and call deeptime's estimators
(``Estimator(params).fit(data).fetch_model()``); nothing is reimplemented here.
Lag times are in frames (steps of the input trajectories); ``dt_ps`` converts to ps.

Examples
--------
>>> import numpy as np
>>> from openmm_confsample.analysis.kinetics import torsion_features, fit_tica, tica_project
>>> rng = np.random.default_rng(0)
>>> angles = rng.uniform(-np.pi, np.pi, size=(500, 2))
>>> model = fit_tica([torsion_features(angles)], lagtime=1, dim=2)
>>> tica_project(model, torsion_features(angles)).shape
(500, 2)
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np

from openmm_confsample.checks import positive_float
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.analysis.statistics import _as_angles, _as_samples, _positive_int

__all__ = ["torsion_features", "fit_tica", "tica_project", "implied_timescales"]

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]


def torsion_features(angles) -> np.ndarray:
    """Periodic features of torsion angles: ``[sin a_1, cos a_1, sin a_2, cos a_2, ...]``.

    Parameters
    ----------
    angles : (N, k) or (N,) float, rad

    Returns
    -------
    features : (N, 2k) float
        Continuous across the +-pi seam, so that linear methods such as TICA see
        phi = -179 deg and phi = +179 deg as neighbours.
    """
    a = _as_samples(angles, "angles")
    a = _as_angles(a, "angles")
    out = np.empty((a.shape[0], 2 * a.shape[1]))
    out[:, 0::2] = np.sin(a)
    out[:, 1::2] = np.cos(a)
    return out


def _as_feature_list(data, name: str, min_length: int = 1) -> List[np.ndarray]:
    """List of finite (N_i, d) float arrays with a common d."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ConfSampleError(f"Argument '{name}' is an empty list of trajectories.")
        trajs = [_as_samples(t, f"{name}[{i}]", min_length) for i, t in enumerate(data)]
    else:
        trajs = [_as_samples(data, name, min_length)]
    dims = {t.shape[1] for t in trajs}
    if len(dims) != 1:
        raise ConfSampleError(
            f"Argument '{name}' mixes trajectories with different feature counts {sorted(dims)}."
        )
    return trajs


def fit_tica(features_list: ArrayOrList, lagtime: int, dim: int = 2, scaling: str = "kinetic_map"):
    """Fit time-lagged independent component analysis with deeptime.

    Parameters
    ----------
    features_list : (N, d) float or list of (N_i, d) float
        One or several trajectories of features, e.g. :func:`torsion_features`.
        Time-lagged pairs never cross from one trajectory into the next.
    lagtime : int, frames
        TICA lag time; every trajectory must be longer than this.
    dim : int
        Number of TICs kept (at most d).
    scaling : {'kinetic_map', 'km', 'commute_map', None}
        deeptime's scaling of the projection.

    Returns
    -------
    model : deeptime.decomposition.CovarianceKoopmanModel
        ``model.transform(features)`` projects (see :func:`tica_project`);
        ``model.timescales()`` gives TIC timescales in frames.
    """
    from deeptime.decomposition import TICA

    lagtime = _positive_int(lagtime, "lagtime")
    dim = _positive_int(dim, "dim")
    trajs = _as_feature_list(features_list, "features_list")
    if dim > trajs[0].shape[1]:
        raise ConfSampleError(
            f"Argument 'dim' ({dim}) exceeds the number of features ({trajs[0].shape[1]})."
        )
    short = [i for i, t in enumerate(trajs) if t.shape[0] <= lagtime]
    if len(short) == len(trajs):
        raise ConfSampleError(
            f"Argument 'lagtime' ({lagtime}) is not shorter than any trajectory in 'features_list'."
        )
    trajs = [t for t in trajs if t.shape[0] > lagtime]
    estimator = TICA(lagtime=lagtime, dim=dim, scaling=scaling)
    return estimator.fit(trajs if len(trajs) > 1 else trajs[0]).fetch_model()


def tica_project(model, features: ArrayOrList):
    """Project features onto the TICs of a fitted model.

    Parameters
    ----------
    model : deeptime.decomposition.CovarianceKoopmanModel
        From :func:`fit_tica`.
    features : (N, d) float or list of (N_i, d) float

    Returns
    -------
    projection : (N, dim) float, or a list of them for a list input
    """
    if not hasattr(model, "transform"):
        raise ConfSampleError("Argument 'model' must be a fitted TICA model with a transform method.")
    if isinstance(features, (list, tuple)):
        return [tica_project(model, f) for f in _as_feature_list(features, "features")]
    x = _as_samples(features, "features")
    expected = model.mean_0.shape[0] if getattr(model, "mean_0", None) is not None else x.shape[1]
    if x.shape[1] != expected:
        raise ConfSampleError(
            f"Argument 'features' has {x.shape[1]} features per frame, the model was fitted on {expected}."
        )
    return model.transform(x)


def _discretize(data, n_clusters: int, seed: int) -> List[np.ndarray]:
    """Discrete trajectories from integer input (as is) or from features (k-means)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ConfSampleError("Argument 'data' is an empty list of trajectories.")
    arrays = [np.asarray(t) for t in items]
    if all(np.issubdtype(a.dtype, np.integer) and a.ndim == 1 for a in arrays):
        for i, a in enumerate(arrays):
            if a.shape[0] == 0 or a.min() < 0:
                raise ConfSampleError(
                    f"Argument 'data' trajectory {i} must be a non-empty sequence of state indices >= 0."
                )
        return [a.astype(np.int32) for a in arrays]
    from deeptime.clustering import KMeans

    trajs = _as_feature_list(items, "data")
    n_frames = sum(t.shape[0] for t in trajs)
    if n_clusters > n_frames:
        raise ConfSampleError(
            f"Argument 'n_clusters' ({n_clusters}) exceeds the number of frames in 'data' ({n_frames})."
        )
    # n_jobs=1: deeptime's k-means is only reproducible for a fixed seed when single-threaded.
    kmeans = KMeans(n_clusters=n_clusters, fixed_seed=int(seed), n_jobs=1, max_iter=200)
    model = kmeans.fit(np.concatenate(trajs)).fetch_model()
    return [model.transform(t).astype(np.int32) for t in trajs]


def implied_timescales(
    data: ArrayOrList,
    lagtimes: Sequence[int],
    n_clusters: int = 50,
    seed: int = 0,
    dt_ps: float = 1.0,
    n_timescales: int = 5,
    reversible: bool = True,
) -> np.ndarray:
    """Implied timescales of reversible maximum-likelihood MSMs over a range of lag times.

    Parameters
    ----------
    data : list of (N_i,) int, or (N, d) float / list of (N_i, d) float
        Either discrete trajectories (integer state indices) or features, which are
        clustered with deeptime k-means into ``n_clusters`` states first.
    lagtimes : sequence of int, frames
        MSM lag times; each must be shorter than the longest trajectory.
    n_clusters : int
        k-means clusters (ignored for discrete input).
    seed : int
        Seed of the k-means initialisation.
    dt_ps : float, ps
        Time between frames.
    n_timescales : int
        Number of slowest processes reported.
    reversible : bool
        Estimate a detailed-balance MSM (default) or a non-reversible one.

    Returns
    -------
    timescales : (n_lags, n_timescales) float, ps
        Slowest first, from deeptime ``MarkovStateModel.timescales`` on the largest
        connected set at each lag. Entries are NaN where the connected set has too few
        states to have that many processes.
    """
    from deeptime.markov.msm import MaximumLikelihoodMSM

    n_clusters = _positive_int(n_clusters, "n_clusters", minimum=2)
    n_timescales = _positive_int(n_timescales, "n_timescales")
    dt_ps = positive_float(dt_ps, "dt_ps")
    lags = np.atleast_1d(np.asarray(lagtimes))
    if lags.ndim != 1 or lags.size == 0 or not np.issubdtype(lags.dtype, np.integer) or np.any(lags < 1):
        raise ConfSampleError("Argument 'lagtimes' must be a non-empty sequence of integers >= 1.")
    dtrajs = _discretize(data, n_clusters, seed)
    longest = max(d.shape[0] for d in dtrajs)
    if lags.max() >= longest:
        raise ConfSampleError(
            f"Argument 'lagtimes' contains {int(lags.max())}, not shorter than the longest trajectory ({longest})."
        )
    out = np.full((lags.size, n_timescales), np.nan)
    for i, lag in enumerate(lags):
        estimator = MaximumLikelihoodMSM(reversible=reversible, lagtime=int(lag))
        msm = estimator.fit(dtrajs, lagtime=int(lag)).fetch_model()
        k = min(n_timescales, msm.n_states - 1)
        if k > 0:
            out[i, :k] = np.asarray(msm.timescales(k=k)).real * dt_ps
    return out
