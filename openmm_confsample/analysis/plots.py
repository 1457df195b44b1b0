"""Figures for sampling benchmarks: Ramachandran free energies, 1-D profiles, TICA, traces, losses, ITS.

Every function returns a :class:`matplotlib.figure.Figure` and writes a PNG when ``path``
is given. Figures are built on the Agg canvas directly (no ``pyplot``), so the module
works headless, never opens a window and does not change the user's matplotlib backend;
functions that take ``ax`` draw into an existing figure instead.

Free energies are in units of ``kT`` (labelled by ``units``); Ramachandran axes are in
degrees, while the angles passed in are in radians.

Examples
--------
>>> import numpy as np
>>> from openmm_confsample.analysis.plots import plot_ramachandran
>>> rng = np.random.default_rng(0)
>>> fig = plot_ramachandran(rng.normal(-1.4, 0.3, 2000), rng.normal(2.6, 0.3, 2000))
>>> fig.axes[0].get_xlabel()
'$\\\\phi$ (deg)'
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from openmm_confsample.checks import positive_float
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.analysis.free_energy import (
    _check_kT,
    _free_energy_histogram,
    free_energy_1d,
    free_energy_surface_2d,
)
from openmm_confsample.analysis.statistics import (
    _as_samples,
    _as_series,
    _check_same_length,
    _positive_int,
)

__all__ = [
    "plot_ramachandran",
    "plot_ramachandran_comparison",
    "plot_free_energy_1d",
    "plot_tica",
    "plot_traces",
    "plot_loss_curves",
    "plot_implied_timescales",
]

PathLike = Union[str, "os.PathLike[str]"]
_CMAP = "viridis"
_ANGLE_TICKS = [-180, -90, 0, 90, 180]


def _new_figure(n_panels: int = 1, panel_size=(4.2, 3.6), extra_width: float = 0.0):
    fig = Figure(figsize=(panel_size[0] * n_panels + extra_width, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    return fig, axes


def _finish(fig: Figure, path: Optional[PathLike]) -> Figure:
    if path is not None:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


def _check_mapping(data, name: str) -> Mapping:
    if not isinstance(data, Mapping) or not data:
        raise ConfSampleError(f"Argument '{name}' must be a non-empty dict of name -> data.")
    return data


def _check_vmax(vmax) -> Optional[float]:
    return None if vmax is None else positive_float(vmax, "vmax")


def _finite_max(*grids: np.ndarray) -> float:
    values = [g[np.isfinite(g)].max() for g in grids if np.any(np.isfinite(g))]
    top = max(values) if values else 1.0
    return top if top > 0 else 1.0


def _style_ramachandran_axes(ax, title: Optional[str]) -> None:
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(_ANGLE_TICKS)
    ax.set_yticks(_ANGLE_TICKS)
    ax.set_aspect("equal")
    ax.set_xlabel(r"$\phi$ (deg)")
    ax.set_ylabel(r"$\psi$ (deg)")
    if title:
        ax.set_title(title)


def _draw_surface(ax, F: np.ndarray, x_edges, y_edges, vmax: float):
    # F[i, j] is indexed (x, y); pcolormesh wants rows along y.
    masked = np.ma.masked_invalid(F.T)
    return ax.pcolormesh(x_edges, y_edges, masked, cmap=_CMAP, vmin=0.0, vmax=vmax, shading="flat")


def _unpack_angles(value, name: str):
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise ConfSampleError(
            f"Argument 'data' entry {name!r} must be (phi, psi) or (phi, psi, weights)."
        )
    phi, psi = value[0], value[1]
    weights = value[2] if len(value) == 3 else None
    return phi, psi, weights


def plot_ramachandran(
    phi,
    psi,
    weights=None,
    ax=None,
    title: Optional[str] = None,
    path: Optional[PathLike] = None,
    bins: int = 60,
    kT: float = 1.0,
    vmax: Optional[float] = None,
    units: str = "kT",
) -> Figure:
    """Ramachandran free-energy surface as a 2-D histogram with a colour bar.

    Parameters
    ----------
    phi, psi : (N,) float, rad
    weights : (N,) float, optional
        Non-negative sample weights.
    ax : matplotlib Axes, optional
        Draw here (a colour bar is added next to it); default a new figure.
    title : str, optional
    path : str or path, optional
        Write a PNG here.
    bins : int
        Bins per axis over [-180, 180) deg.
    kT : float
        Energy unit of the surface (see :func:`free_energy_surface_2d`).
    vmax : float, optional
        Top of the colour scale in ``units``; default the largest finite value.
    units : str
        Colour-bar unit label, e.g. ``"kT"`` or ``"kJ/mol"``.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    F, edges = free_energy_surface_2d(phi, psi, bins=bins, weights=weights, kT=kT)
    vmax = _check_vmax(vmax) or _finite_max(F)
    if ax is None:
        fig, (ax,) = _new_figure(1, panel_size=(4.6, 3.8))
    else:
        fig = ax.figure
    mesh = _draw_surface(ax, F, np.degrees(edges), np.degrees(edges), vmax)
    _style_ramachandran_axes(ax, title)
    fig.colorbar(mesh, ax=ax, label=f"free energy ({units})")
    return _finish(fig, path)


def plot_ramachandran_comparison(
    data: Mapping[str, Sequence],
    path: Optional[PathLike] = None,
    bins: int = 60,
    kT: float = 1.0,
    vmax: Optional[float] = None,
    units: str = "kT",
    title: Optional[str] = None,
) -> Figure:
    """Side-by-side Ramachandran free-energy surfaces on one shared colour scale.

    Parameters
    ----------
    data : dict name -> (phi, psi) or (phi, psi, weights)
        Angles in rad; one panel per entry, in dict order, titled by name and sample count.
    path : str or path, optional
        Write a PNG here.
    bins, kT, units
        As in :func:`plot_ramachandran`.
    vmax : float, optional
        Top of the shared colour scale; default the largest finite value of any panel (fitted to the data).
    title : str, optional
        Figure title.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    data = _check_mapping(data, "data")
    surfaces, counts = {}, {}
    for name, value in data.items():
        phi, psi, weights = _unpack_angles(value, name)
        surfaces[name] = free_energy_surface_2d(phi, psi, bins=bins, weights=weights, kT=kT)
        counts[name] = len(np.atleast_1d(phi))
    vmax = _check_vmax(vmax) or _finite_max(*(F for F, _ in surfaces.values()))
    fig, axes = _new_figure(len(surfaces), panel_size=(3.9, 3.8), extra_width=0.8)
    mesh = None
    for ax, (name, (F, edges)) in zip(axes, surfaces.items()):
        mesh = _draw_surface(ax, F, np.degrees(edges), np.degrees(edges), vmax)
        _style_ramachandran_axes(ax, f"{name} (n = {counts[name]:,})")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.colorbar(mesh, ax=axes, label=f"free energy ({units})", shrink=0.9)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def _unpack_weighted(value, name: str):
    """x or (x, weights)."""
    if isinstance(value, tuple) and len(value) == 2 and np.ndim(value[0]) >= 1:
        return value[0], value[1]
    return value, None


def plot_free_energy_1d(
    data: Mapping[str, object],
    bins=50,
    xlabel: str = "x",
    path: Optional[PathLike] = None,
    kT: float = 1.0,
    range: Optional[Sequence[float]] = None,
    units: str = "kT",
    ax=None,
    title: Optional[str] = None,
) -> Figure:
    """Overlaid 1-D free-energy profiles on shared bins.

    Parameters
    ----------
    data : dict name -> x or (x, weights)
        ``x`` : (N,) float, any coordinate (pass degrees if you want degrees on the axis); the legend gives
        each name with its sample count.
    bins : int or (n_bins + 1,) float
        Shared by all profiles; with an int the range spans all data (or ``range``).
    xlabel : str
        Axis label including the unit, e.g. ``"phi (deg)"`` or ``"RMSD (nm)"``.
    path : str or path, optional
        Write a PNG here.
    kT, units
        Energy unit of the profiles and its label.
    range : (float, float), optional
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    data = _check_mapping(data, "data")
    series = {}
    for name, value in data.items():
        x, weights = _unpack_weighted(value, name)
        x = _as_series(x, f"data[{name!r}]")
        series[name] = (x, weights)
    if np.ndim(bins) == 0 and range is None:
        lo = min(x.min() for x, _ in series.values())
        hi = max(x.max() for x, _ in series.values())
        range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    if ax is None:
        fig, (ax,) = _new_figure(1, panel_size=(5.0, 3.6))
    else:
        fig = ax.figure
    for name, (x, weights) in series.items():
        F, edges = free_energy_1d(x, bins=bins, weights=weights, kT=kT, range=range)
        centers = 0.5 * (edges[1:] + edges[:-1])
        ax.plot(centers, np.where(np.isfinite(F), F, np.nan), label=f"{name} (n = {len(x):,})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"free energy ({units})")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def _as_projection(value, name: str) -> np.ndarray:
    if isinstance(value, (list, tuple)):
        parts = [_as_samples(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if len({p.shape[1] for p in parts}) != 1:
            raise ConfSampleError(f"Argument '{name}' mixes projections with different numbers of TICs.")
        return np.concatenate(parts)
    return _as_samples(value, name)


def plot_tica(
    tica_projections,
    path: Optional[PathLike] = None,
    bins: int = 50,
    kT: float = 1.0,
    units: str = "kT",
    title: Optional[str] = None,
) -> Figure:
    """TIC 0 free-energy profile and the TIC 0 / TIC 1 joint free-energy surface.

    Parameters
    ----------
    tica_projections : (N, dim) float, list of them, or dict name -> either
        Output of :func:`~openmm_confsample.analysis.kinetics.tica_project`; a list is
        concatenated. With a dict, the TIC 0 profiles are overlaid in the first panel and
        each entry gets its own joint panel, all on shared bins and one colour scale
        (project every data set with the same TICA model).
    path : str or path, optional
        Write a PNG here.
    bins : int
        Bins per TIC.
    kT, units
        Energy unit and its label.
    title : str, optional

    Returns
    -------
    figure : matplotlib.figure.Figure
        One panel when the projections have a single TIC.
    """
    bins = _positive_int(bins, "bins")
    kT = _check_kT(kT)
    if isinstance(tica_projections, Mapping):
        _check_mapping(tica_projections, "tica_projections")
        projections = {
            str(k): _as_projection(v, f"tica_projections[{k!r}]") for k, v in tica_projections.items()
        }
    else:
        projections = {"": _as_projection(tica_projections, "tica_projections")}
    dims = {p.shape[1] for p in projections.values()}
    if len(dims) != 1:
        raise ConfSampleError("Argument 'tica_projections' mixes data sets with different numbers of TICs.")
    joint = dims.pop() >= 2
    stacked = np.concatenate(list(projections.values()))
    lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    edges0 = np.linspace(lo[0], hi[0], bins + 1)
    n_panels = 1 + (len(projections) if joint else 0)
    fig, axes = _new_figure(n_panels, panel_size=(4.0, 3.6), extra_width=0.8 if joint else 0.0)

    ax = axes[0]
    for name, p in projections.items():
        F = _free_energy_histogram(p[:, :1], [edges0], None, kT)
        centers = 0.5 * (edges0[1:] + edges0[:-1])
        ax.plot(centers, np.where(np.isfinite(F), F, np.nan), label=name or None)
    ax.set_xlabel("TIC 0")
    ax.set_ylabel(f"free energy ({units})")
    if len(projections) > 1:
        ax.legend(frameon=False)

    if joint:
        edges1 = np.linspace(lo[1], hi[1], bins + 1)
        grids = {name: _free_energy_histogram(p[:, :2], [edges0, edges1], None, kT) for name, p in projections.items()}
        vmax = _finite_max(*grids.values())
        mesh = None
        for ax, (name, F) in zip(axes[1:], grids.items()):
            mesh = _draw_surface(ax, F, edges0, edges1, vmax)
            ax.set_xlabel("TIC 0")
            ax.set_ylabel("TIC 1")
            ax.set_title(f"{name} (n = {len(projections[name]):,})" if name else f"n = {len(projections[name]):,}")
        fig.colorbar(mesh, ax=axes[1:], label=f"free energy ({units})")
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_traces(
    data: Mapping[str, object],
    xlabel: str = "frame",
    ylabel: str = "value",
    path: Optional[PathLike] = None,
    title: Optional[str] = None,
    ax=None,
) -> Figure:
    """Overlaid time traces, e.g. potential energy or RMSD per frame.

    Parameters
    ----------
    data : dict name -> y or (x, y)
        ``y`` : (N,) float, plotted against the frame index unless ``x`` is given
        (e.g. time in ps).
    xlabel, ylabel : str
        Axis labels including units, e.g. ``"time (ps)"``, ``"potential energy (kJ/mol)"``.
    path : str or path, optional
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    data = _check_mapping(data, "data")
    lines = {}
    for name, value in data.items():
        if isinstance(value, tuple) and len(value) == 2 and np.ndim(value[0]) >= 1:
            x = _as_series(value[0], f"data[{name!r}][0]")
            y = _as_series(value[1], f"data[{name!r}][1]")
            _check_same_length(x, y, f"data[{name!r}][0]", f"data[{name!r}][1]")
        else:
            y = _as_series(value, f"data[{name!r}]")
            x = np.arange(y.shape[0])
        lines[name] = (x, y)
    if ax is None:
        fig, (ax,) = _new_figure(1, panel_size=(6.0, 3.4))
    else:
        fig = ax.figure
    for name, (x, y) in lines.items():
        ax.plot(x, y, lw=0.8, label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_loss_curves(
    history: Mapping[str, Sequence[float]],
    path: Optional[PathLike] = None,
    ylabel: str = "loss",
    logy: Optional[bool] = None,
    title: Optional[str] = None,
) -> Figure:
    """Training and validation loss per epoch.

    Parameters
    ----------
    history : dict with 'train' and optionally 'val' (and any other) lists of floats
        One value per epoch. NaN/inf entries (a diverged epoch) are allowed and leave a
        gap, because the plot is a diagnostic.
    path : str or path, optional
    ylabel : str
        e.g. ``"negative log-likelihood (nats)"``.
    logy : bool, optional
        Log y axis; default when all finite losses are positive and span more than a
        factor of 50.
    title : str, optional

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    if not isinstance(history, Mapping) or "train" not in history:
        raise ConfSampleError("Argument 'history' must be a dict with a 'train' list of losses.")
    curves = {}
    for key, values in history.items():
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            raise ConfSampleError(f"Argument 'history' entry {key!r} must be a list of numbers.") from None
        if arr.ndim != 1:
            raise ConfSampleError(f"Argument 'history' entry {key!r} must be a 1-D list of numbers.")
        if arr.size:
            curves[key] = arr
    if "train" not in curves:
        raise ConfSampleError("Argument 'history' has an empty 'train' list.")
    finite = np.concatenate([c[np.isfinite(c)] for c in curves.values()])
    if logy is None:
        logy = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 50)
    fig, (ax,) = _new_figure(1, panel_size=(5.0, 3.6))
    order = ["train", "val"] + [k for k in curves if k not in ("train", "val")]
    for key in order:
        if key in curves:
            epochs = np.arange(1, curves[key].size + 1)
            ax.plot(epochs, np.where(np.isfinite(curves[key]), curves[key], np.nan), marker="." if curves[key].size < 50 else None, label=str(key))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_implied_timescales(
    lagtimes,
    timescales,
    path: Optional[PathLike] = None,
    dt_ps: float = 1.0,
    title: Optional[str] = None,
    ax=None,
) -> Figure:
    """Implied timescales against lag time on a log axis.

    The grey area below ``timescale = lag time`` marks processes faster than the lag,
    which the MSM cannot resolve.

    Parameters
    ----------
    lagtimes : (n_lags,) int or float, frames
        As passed to :func:`~openmm_confsample.analysis.kinetics.implied_timescales`.
    timescales : (n_lags, n_timescales) float, ps
        Its output; NaN entries (processes missing at some lag) are skipped.
    path : str or path, optional
    dt_ps : float, ps
        Time between frames, to put the lag axis in ps.
    title : str, optional
    ax : matplotlib Axes, optional

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    lags = _as_series(lagtimes, "lagtimes")
    if np.any(lags <= 0):
        raise ConfSampleError("Argument 'lagtimes' must be positive.")
    dt_ps = positive_float(dt_ps, "dt_ps")
    try:
        ts = np.asarray(timescales, dtype=float)
    except (TypeError, ValueError):
        raise ConfSampleError("Argument 'timescales' must be numeric.") from None
    if ts.ndim == 1:
        ts = ts[:, None]
    if ts.ndim != 2 or ts.shape[0] != lags.shape[0]:
        raise ConfSampleError(
            f"Argument 'timescales' must have shape (n_lags={lags.shape[0]}, n_timescales), got {ts.shape}."
        )
    if np.any(np.isinf(ts)) or np.any(ts[np.isfinite(ts)] <= 0):
        raise ConfSampleError("Argument 'timescales' must be positive (NaN marks a missing process).")
    lag_ps = lags * dt_ps
    if ax is None:
        fig, (ax,) = _new_figure(1, panel_size=(5.0, 3.6))
    else:
        fig = ax.figure
    for k in range(ts.shape[1]):
        if np.any(np.isfinite(ts[:, k])):
            ax.plot(lag_ps, ts[:, k], marker="o", ms=3, label=f"process {k + 1}")
    finite = ts[np.isfinite(ts)]
    floor = min(lag_ps.min(), finite.min() if finite.size else lag_ps.min()) * 0.5
    ax.fill_between(lag_ps, floor, lag_ps, color="0.85", zorder=0, label="lag time")
    ax.set_yscale("log")
    ax.set_xlabel("lag time (ps)")
    ax.set_ylabel("implied timescale (ps)")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    return _finish(fig, path)
