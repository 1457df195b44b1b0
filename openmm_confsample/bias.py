"""A learned bias on torsions: flatten a model's free-energy landscape inside an OpenMM System.

A torsion model (e.g. :class:`~openmm_confsample.models.torsion_diffusion.TorsionDiffusionModel`)
has an exact log density ``log q(tau)`` on the torus; ``F(tau) = -kT log q(tau)`` is its free energy
along the torsions. Adding the bias ``B(tau) ~ -(F(tau) - F_min)`` to the potential makes the biased
torsion landscape roughly flat, so MD crosses barriers it would wait nanoseconds for; frames are
reweighted by ``exp(+B/kT)`` to recover unbiased averages (:func:`reweighting_weights`).

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

Two options turn this into an iterated, well-tempered bias (:func:`refine_learned_bias`):

* ``prior_bias`` B0: the model was trained on frames sampled *with* the bias B0, so it learned the
  biased marginal ``q ∝ p exp(-B0/kT)``; the unbiased free energy is ``F = -kT log q - B0`` and ``r``
  above uses ``log q + B0/kT`` in place of ``log q``.
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

Backends
--------
:func:`add_learned_bias` (and :func:`add_torch_force` for any ``positions -> energy`` module) adds
the module to a System as ``openmmtorch.TorchForce`` when ``openmmtorch`` imports, otherwise as
OpenMM's built-in ``openmm.PythonForce`` running the same module with autograd forces. Both give
the same energies; TorchForce avoids the Python call per step.

Units: positions in nm, energies in kJ/mol, angles in radians, ``kT`` in kJ/mol.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn

from .errors import ConfSampleError

__all__ = [
    "LearnedTorsionBias",
    "AddedForce",
    "BiasedMDResult",
    "FourierBiasComputation",
    "TorchModuleComputation",
    "torsion_angles_torch",
    "tabulate_bias",
    "fit_fourier_series",
    "add_torch_force",
    "add_learned_bias",
    "with_learned_bias",
    "openmmtorch_status",
    "bias_energies",
    "reweighting_weights",
    "unbiased_potential",
    "run_biased_md",
    "BiasRefinement",
    "refine_learned_bias",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchforce", "pythonforce")
#: Default force group of the bias: its own group, so the unbiased energy stays readable.
DEFAULT_BIAS_GROUP = 31
#: Checkpoint kind of a saved LearnedTorsionBias.
BIAS_KIND = "learned_torsion_bias"
#: Largest tabulation grid (points in all); beyond it (k >= 4 at useful resolution) tabulation is not the tool.
MAX_GRID_POINTS = 300_000


# --------------------------------------------------------------------------------------
# input checks


def _check_kT(kT) -> float:
    try:
        value = float(kT)
    except (TypeError, ValueError):
        raise ConfSampleError(f"kT must be a positive energy in kJ/mol, got {kT!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfSampleError(f"kT must be a positive energy in kJ/mol, got {kT!r}.")
    return value


def _check_positive(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfSampleError(f"{name} must be a positive number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfSampleError(f"{name} must be a positive number, got {value!r}.")
    return value


def _check_torsions(torsions, n_atoms: int | None = None) -> np.ndarray:
    """Torsions as a (k, 4) int64 array: a dict name -> quad, a list of quads, or a (k, 4) array."""
    if isinstance(torsions, dict):
        torsions = list(torsions.values())
    try:
        t = np.asarray(torsions, dtype=np.int64)
    except (TypeError, ValueError):
        raise ConfSampleError(f"torsions must be (k, 4) integer atom indices, got {torsions!r}.") from None
    if t.ndim == 1 and t.size == 4:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 4 or t.shape[0] == 0:
        raise ConfSampleError(f"torsions must have shape (k, 4) with k >= 1, got shape {t.shape}.")
    for quad in t:
        if len(set(quad.tolist())) != 4 or quad.min() < 0 or (n_atoms is not None and quad.max() >= n_atoms):
            limit = f" in [0, {n_atoms})" if n_atoms is not None else ""
            raise ConfSampleError(f"torsion {tuple(quad.tolist())} must be four distinct atom indices{limit}.")
    return t


def _check_bias_factor(bias_factor) -> float:
    try:
        value = float(bias_factor)
    except (TypeError, ValueError):
        raise ConfSampleError(f"bias_factor must be a number > 1 (or inf), got {bias_factor!r}.") from None
    if math.isnan(value) or value <= 1.0:
        raise ConfSampleError(f"bias_factor must be a number > 1 (or inf), got {bias_factor!r}.")
    return value


def _prior_energy(prior, torsions: np.ndarray, kT: float):
    """The energy function (N, k) rad -> (N,) kJ/mol of one prior bias (None: unbiased data)."""
    if prior is None:
        return None
    if not isinstance(prior, LearnedTorsionBias):
        raise ConfSampleError(f"prior_bias must hold LearnedTorsionBias objects or None, got {type(prior).__name__}.")
    if not np.array_equal(prior.torsions.numpy(), torsions):
        raise ConfSampleError(f"prior_bias acts on torsions {prior.torsions.tolist()}, not {torsions.tolist()}.")
    if not math.isclose(prior.kT, kT, rel_tol=1e-6):
        raise ConfSampleError(f"prior_bias was built for kT={prior.kT} kJ/mol, not {kT} kJ/mol.")
    return prior.energies_of_angles


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfSampleError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    return backend


# --------------------------------------------------------------------------------------
# torch geometry


def torsion_angles_torch(positions: torch.Tensor, torsions: torch.Tensor) -> torch.Tensor:
    """Dihedral angles in torch, same convention as :func:`openmm_confsample.geometry.torsions.dihedral_angles`.

    positions : (..., n_atoms, 3) tensor, nm
    torsions : (k, 4) long tensor of atom indices
    Returns (..., k) radians in (-pi, pi]; differentiable except at collinear atoms.
    """
    p0 = torch.index_select(positions, -2, torsions[:, 0])
    p1 = torch.index_select(positions, -2, torsions[:, 1])
    p2 = torch.index_select(positions, -2, torsions[:, 2])
    p3 = torch.index_select(positions, -2, torsions[:, 3])
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    c1 = torch.linalg.cross(b2, b3, dim=-1)
    c2 = torch.linalg.cross(b1, b2, dim=-1)
    y = (b1 * c1).sum(-1) * torch.linalg.norm(b2, dim=-1)
    x = (c1 * c2).sum(-1)
    return torch.atan2(y, x)


# --------------------------------------------------------------------------------------
# the module


class LearnedTorsionBias(nn.Module):
    """Bias energy ``B(tau(x))`` (kJ/mol) of positions ``x`` through a Fourier series of torsions.

    Build it with :meth:`from_model` (or :meth:`from_log_density`) rather than by hand.

    Parameters
    ----------
    torsions : (k, 4) int
        Atom quadruples (0-based) of the torsions the bias acts on.
    modes : (M, k) int
        Integer wave vectors ``m`` of the series.
    cos_coefficients, sin_coefficients : (M,) float, kJ/mol
        ``B(tau) = sum_m a_m cos(m . tau) + b_m sin(m . tau)``.
    kT : float, kJ/mol
        Thermal energy the bias was built for (for reweighting and reports).
    cap_kJ : float, kJ/mol
        The cap of the tabulated bias.
    fit_rmse_kJ, fit_max_error_kJ : float, kJ/mol
        Deviation of the series from the tabulated bias on the grid.
    bias_factor : float
        The well-tempered factor gamma the bias was built with (inf: full flattening).
    metadata : dict, optional
        JSON-like notes kept with :meth:`save` (e.g. how the bias was refined).

    ``forward(positions)`` takes (n_atoms, 3) or (B, n_atoms, 3) nm (any float dtype; computed in
    float64) and returns the energy as a scalar tensor (or (B,)); autograd gives the forces. The
    module is TorchScript-compatible: :meth:`save_torchscript` writes a file for ``openmmtorch.TorchForce``.

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.bias import LearnedTorsionBias
    >>> log_q = lambda tau: 2.0 * np.cos(tau[:, 0] + 1.0)       # any (N, k) -> (N,) log density
    >>> bias = LearnedTorsionBias.from_log_density(log_q, [(0, 1, 2, 3)], kT=2.494, grid_points=36)
    >>> bias.n_torsions, round(bias.fit_rmse_kJ, 6) < 1e-6
    (1, True)
    """

    def __init__(self, torsions, modes, cos_coefficients, sin_coefficients, kT: float, cap_kJ: float = math.inf,
                 fit_rmse_kJ: float = 0.0, fit_max_error_kJ: float = 0.0, bias_factor: float = math.inf,
                 metadata: dict | None = None):
        super().__init__()
        t = _check_torsions(torsions)
        modes = np.asarray(modes, dtype=np.float64).reshape(-1, t.shape[0])
        cos_c = np.asarray(cos_coefficients, dtype=np.float64).reshape(-1)
        sin_c = np.asarray(sin_coefficients, dtype=np.float64).reshape(-1)
        if not len(modes) == len(cos_c) == len(sin_c) or len(modes) == 0:
            raise ConfSampleError(
                f"modes ({len(modes)}), cos_coefficients ({len(cos_c)}) and sin_coefficients ({len(sin_c)}) "
                "must have the same non-zero length."
            )
        self.register_buffer("torsions", torch.from_numpy(t.copy()))
        self.register_buffer("modes", torch.from_numpy(modes.copy()))
        self.register_buffer("cos_coefficients", torch.from_numpy(cos_c.copy()))
        self.register_buffer("sin_coefficients", torch.from_numpy(sin_c.copy()))
        self.kT = _check_kT(kT)
        self.cap_kJ = float(cap_kJ)
        self.fit_rmse_kJ = float(fit_rmse_kJ)
        self.fit_max_error_kJ = float(fit_max_error_kJ)
        self.bias_factor = _check_bias_factor(bias_factor)
        self.metadata = dict(metadata or {})

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_log_density(cls, log_density, torsions, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                         max_frequency: int = 10, smoothing_kT: float = 0.5, smoothing_rad: float = 0.0,
                         bias_factor: float = math.inf, prior_bias=None, prior_fractions=None,
                         metadata: dict | None = None) -> "LearnedTorsionBias":
        """Tabulate ``log_density`` ((N, k) radians -> (N,)) on a grid and fit the bias series (see module doc).

        Parameters
        ----------
        log_density : callable or object with ``log_prob``
            The model's exact log density, e.g. ``TorsionDiffusionModel.log_prob``.
        torsions : (k, 4) int or dict name -> (i, j, k, l)
        kT : float, kJ/mol
        cap_kT : float
            Largest depth of the bias, in kT (8-10 kT keeps the bias inside the region the data support).
        grid_points : int
            Grid points per torsion (``grid_points^k`` evaluations of ``log_density``).
        max_frequency : int
            Highest wave number per torsion; must be below ``grid_points / 2``.
        smoothing_kT : float
            Width of the soft cap, in kT.
        smoothing_rad : float
            Gaussian smoothing of the series, radians (0: none).
        bias_factor : float > 1
            Well-tempered factor gamma: the bias is ``(1 - 1/gamma)`` times the flattening one (default inf:
            full flattening).
        prior_bias : LearnedTorsionBias or sequence of (LearnedTorsionBias or None), optional
            The bias under which the model's training frames were sampled (same torsions and kT); the bias
            is then built from the unbiased free energy ``-kT log q - prior_bias``. For frames pooled from
            several runs, one bias per run (None: unbiased) and ``prior_fractions``, the share of the
            training frames each run gave (default equal); WHAM on the grid removes the biases.
        metadata : dict, optional
            Kept on the bias (and in :meth:`save`).
        """
        t = _check_torsions(torsions)
        kT = _check_kT(kT)
        prior = None
        if prior_bias is not None:
            single = isinstance(prior_bias, LearnedTorsionBias)
            prior = [_prior_energy(b, t, kT) for b in ([prior_bias] if single else prior_bias)]
        grid, bias_grid = tabulate_bias(log_density, t.shape[0], kT, cap_kT, grid_points, smoothing_kT,
                                        prior_bias_kJ=prior, bias_factor=bias_factor, prior_fractions=prior_fractions)
        modes, cos_c, sin_c, rmse, max_err = fit_fourier_series(bias_grid, max_frequency, smoothing_rad)
        return cls(t, modes, cos_c, sin_c, kT, cap_kT * kT, rmse, max_err, bias_factor, metadata)

    @classmethod
    def from_model(cls, model, torsions=None, kT: float | None = None, **options) -> "LearnedTorsionBias":
        """The bias of a torsion model with ``log_prob`` (and ``n_torsions``); ``options`` as :meth:`from_log_density`.

        ``torsions`` defaults to ``model.metadata['torsions']``; ``kT`` (kJ/mol) must be given.
        """
        if not callable(getattr(model, "log_prob", None)):
            raise ConfSampleError(f"model must have a log_prob method, got {type(model).__name__}.")
        if torsions is None:
            meta = getattr(model, "metadata", {}) or {}
            torsions = [item["atoms"] for item in meta.get("torsions", [])]
            if not torsions:
                raise ConfSampleError("torsions must be given: the model's metadata names no torsions.")
        t = _check_torsions(torsions)
        n_model = getattr(model, "n_torsions", None)
        if n_model is not None and int(n_model) != t.shape[0]:
            raise ConfSampleError(f"the model has {n_model} torsions but {t.shape[0]} torsion quadruples were given.")
        if kT is None:
            raise ConfSampleError("kT (kJ/mol) must be given to build a bias from a model.")
        return cls.from_log_density(model.log_prob, t, kT, **options)

    # -- evaluation ------------------------------------------------------------------------------
    @property
    def n_torsions(self) -> int:
        return int(self.torsions.shape[0])

    @torch.jit.export
    def energy_of_angles(self, angles: torch.Tensor) -> torch.Tensor:
        """Bias (..., ) kJ/mol of torsion angles (..., k) radians."""
        phase = angles.to(torch.float64) @ self.modes.t()
        return torch.cos(phase) @ self.cos_coefficients + torch.sin(phase) @ self.sin_coefficients

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = torsion_angles_torch(positions.to(torch.float64), self.torsions)
        return self.energy_of_angles(angles)

    def energies_of_angles(self, angles) -> np.ndarray:
        """numpy convenience: (N, k) radians -> (N,) kJ/mol."""
        a = np.asarray(angles, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.n_torsions:
            raise ConfSampleError(f"angles must have shape (N, {self.n_torsions}), got {a.shape}.")
        with torch.no_grad():
            return self.energy_of_angles(torch.from_numpy(a)).numpy()

    def save_torchscript(self, path) -> str:
        """Write the TorchScript module (for ``openmmtorch.TorchForce(path)``) and return the path."""
        scripted = torch.jit.script(self)
        scripted.save(str(path))
        return str(path)

    def save(self, path) -> str:
        """Write the bias (series, torsions, kT, cap, fit errors, metadata) as a checkpoint; returns the path.

        Read it back with :meth:`load`; the file is written to ``path.tmp`` and renamed, so an interrupted
        save leaves no half-written file under ``path``.
        """
        from .models.checkpoint import save_checkpoint

        config = {"kT": self.kT, "cap_kJ": self.cap_kJ, "fit_rmse_kJ": self.fit_rmse_kJ,
                  "fit_max_error_kJ": self.fit_max_error_kJ, "bias_factor": self.bias_factor}
        state = {"torsions": self.torsions, "modes": self.modes, "cos_coefficients": self.cos_coefficients,
                 "sin_coefficients": self.sin_coefficients}
        return str(save_checkpoint(path, BIAS_KIND, config, state, {"bias": self.metadata}))

    @classmethod
    def load(cls, path) -> "LearnedTorsionBias":
        """Read a bias written by :meth:`save` (a clear error for a missing file or another kind of checkpoint)."""
        from .models.checkpoint import load_checkpoint

        payload = load_checkpoint(path, kind=BIAS_KIND)
        c, state = payload["config"], payload["state_dict"]
        return cls(state["torsions"].numpy(), state["modes"].numpy(), state["cos_coefficients"].numpy(),
                   state["sin_coefficients"].numpy(), c["kT"], c["cap_kJ"], c["fit_rmse_kJ"], c["fit_max_error_kJ"],
                   c["bias_factor"], payload["metadata"].get("bias") or {})


# --------------------------------------------------------------------------------------
# tabulation and fit


def _grid_axis(n: int) -> np.ndarray:
    return -np.pi + 2.0 * np.pi * np.arange(n) / n


def _subsample_pool(pool, limit: int, rng: np.random.Generator):
    """Frames of every run in ``pool`` (at most ``limit`` in all, uniformly), their runs' biases and shares."""
    sizes = np.array([len(frames) for frames, _ in pool])
    keep = np.minimum(sizes, np.floor(sizes * min(1.0, limit / sizes.sum())).astype(int))
    picked = [frames[np.sort(rng.choice(len(frames), size=n, replace=False))] for (frames, _), n in zip(pool, keep)]
    return np.concatenate(picked), [b for _, b in pool], keep / keep.sum()


def _grid_points(k: int, n: int) -> np.ndarray:
    """(n^k, k) radians: the regular grid in C order (last torsion fastest)."""
    axis = _grid_axis(n)
    return np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)


def tabulate_bias(log_density, n_torsions: int, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                  smoothing_kT: float = 0.5, prior_bias_kJ=None, bias_factor: float = math.inf,
                  prior_fractions=None):
    """The capped, smoothed bias ``B_grid`` (kJ/mol) of ``log_density`` on a regular grid (module doc).

    ``prior_bias_kJ``: optional callable (N, k) radians -> (N,) kJ/mol, the bias the density's data were
    sampled under (added to ``kT log q``), or a sequence of them (None for unbiased data) when the data
    pool runs with different biases, in the proportions ``prior_fractions`` (default equal); the unbiased
    density is then recovered by WHAM on the grid (:func:`_unbias_on_grid`). ``bias_factor``: the
    well-tempered gamma (the result is multiplied by ``1 - 1/gamma``).

    Returns
    -------
    grid : (n^k, k) float, radians (C order, last torsion fastest)
    bias : (n,)*k float, kJ/mol, in [-(1 - 1/gamma) cap, 0] up to ``w log(1 + exp(-cap/w))``
    """
    kT = _check_kT(kT)
    tempering = 1.0 - 1.0 / _check_bias_factor(bias_factor)
    cap = _check_positive(cap_kT, "cap_kT") * kT
    width = _check_positive(smoothing_kT, "smoothing_kT") * kT
    if int(grid_points) != grid_points or int(grid_points) < 4:
        raise ConfSampleError(f"grid_points must be an integer >= 4, got {grid_points!r}.")
    n, k = int(grid_points), int(n_torsions)
    if n**k > MAX_GRID_POINTS:
        raise ConfSampleError(
            f"a {n}^{k} grid has {n**k} points (limit {MAX_GRID_POINTS}); lower grid_points or bias fewer torsions."
        )
    log_prob = getattr(log_density, "log_prob", log_density)
    if not callable(log_prob):
        raise ConfSampleError(f"log_density must be callable or have log_prob, got {type(log_density).__name__}.")
    grid = _grid_points(k, n)
    log_q = np.asarray(log_prob(grid), dtype=np.float64).reshape(-1)
    if log_q.shape[0] != grid.shape[0]:
        raise ConfSampleError(f"log_density returned {log_q.shape[0]} values for {grid.shape[0]} grid points.")
    log_q = np.where(np.isnan(log_q), -np.inf, log_q)
    if prior_bias_kJ is not None:
        log_q = _unbias_on_grid(log_q, grid, prior_bias_kJ, prior_fractions, kT)
    if not np.isfinite(log_q.max()):
        raise ConfSampleError("log_density is not finite anywhere on the grid.")
    relative = kT * (log_q - log_q.max())  # -(F - F_min) <= 0; -inf where q = 0 becomes -cap below
    soft = -cap + width * np.logaddexp(0.0, (relative + cap) / width)
    soft -= soft.max()
    return grid, tempering * soft.reshape((n,) * k)


def _unbias_on_grid(log_pooled, grid, priors, fractions, kT, iterations: int = 1000, tolerance: float = 1e-10):
    """log p on the grid from the log density of frames pooled from runs with different biases (WHAM).

    Frames of run r (a fraction f_r of the pool) follow ``p exp(-B_r/kT) / Z_r``, so the pool follows
    ``m = p sum_r f_r exp(-B_r/kT) / Z_r`` with ``Z_r = sum_grid p exp(-B_r/kT)``; iterate
    ``p = m / sum_r f_r exp(-B_r/kT) / Z_r`` to self-consistency. One run: ``log p = log m + B/kT``.
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
    from scipy.special import logsumexp

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
    k, n = values.ndim, values.shape[0]
    if k == 0 or any(s != n for s in values.shape):
        raise ConfSampleError(f"values must be a (n,)*k grid, got shape {values.shape}.")
    if int(max_frequency) != max_frequency or not 0 <= int(max_frequency) < n / 2:
        raise ConfSampleError(
            f"max_frequency must be an integer in [0, {n / 2}) for a {n}-point grid, got {max_frequency!r}."
        )
    if not np.isfinite(smoothing_rad) or smoothing_rad < 0:
        raise ConfSampleError(f"smoothing_rad must be a non-negative number of radians, got {smoothing_rad!r}.")
    max_frequency = int(max_frequency)
    spectrum = np.fft.fftn(values) / values.size
    modes = _half_space_modes(k, max_frequency)
    # The grid starts at -pi: c_m = (-1)^(sum m) * FFT_m / N.
    c = spectrum[tuple((modes % n).T)] * np.where(modes.sum(axis=1) % 2 == 0, 1.0, -1.0)
    damping = np.exp(-0.5 * (smoothing_rad * np.linalg.norm(modes, axis=1)) ** 2)
    is_zero = ~modes.any(axis=1)
    cos_c = np.where(is_zero, c.real, 2.0 * c.real) * damping
    sin_c = np.where(is_zero, 0.0, -2.0 * c.imag) * damping
    grid = _grid_points(k, n)
    phase = grid @ modes.T
    fitted = np.cos(phase) @ cos_c + np.sin(phase) @ sin_c
    shift = fitted.max()
    cos_c[is_zero] -= shift
    error = (fitted - shift) - values.reshape(-1)
    return modes, cos_c, sin_c, float(np.sqrt(np.mean(error**2))), float(np.max(np.abs(error)))


# --------------------------------------------------------------------------------------
# adding a torch module to a System


@dataclass
class AddedForce:
    """What :func:`add_torch_force` / :func:`add_learned_bias` added.

    Attributes
    ----------
    backend : 'torchforce' or 'pythonforce'
    force : openmm.Force
    force_index : int
        Index in ``system.getForces()``.
    force_group : int
    module : torch.nn.Module
        The module the force runs.
    message : str
        The line that was logged, e.g. "learned bias: TorchForce (openmm-torch)".
    torchscript_path : str or None
        The TorchScript file a TorchForce was built from.
    """

    backend: str
    force: openmm.Force
    force_index: int
    force_group: int
    module: nn.Module
    message: str
    torchscript_path: str | None = None


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


_TORCH_PLUGINS_LOADED = False


def _load_torch_plugins() -> None:
    """Load the openmm-torch platform plugins that failed because openmm was imported before torch.

    OpenMM loads its plugins when it is first imported; the openmm-torch Reference plugin needs libtorch
    already in the process, so after ``import openmm`` before ``import torch`` a TorchForce would make
    Context creation fail ("does not support all required kernels"). Retrying those libraries now, with
    torch loaded, registers their kernels. GPU (CUDA/OpenCL) plugins are left alone.
    """
    global _TORCH_PLUGINS_LOADED
    if _TORCH_PLUGINS_LOADED:
        return
    import re

    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.match(r"Error loading library (.+?OpenMMTorch(Reference|CPU)[^/]*?): ", failure)
        if match:
            openmm.Platform.loadPluginLibrary(match.group(1))
    _TORCH_PLUGINS_LOADED = True


def openmmtorch_status() -> tuple[bool, str]:
    """``(True, version)`` when ``openmmtorch`` imports, else ``(False, reason)`` (the import error, one line).

    This module imports torch and openmm first, which the PyPI wheel of openmmtorch 1.5 needs on Linux: it
    finds libOpenMM.so and libtorch's CUDA libraries (libnvrtc.so.12) only when those packages are loaded.
    With a CPU-only torch the import fails with "libnvrtc.so.12: cannot open shared object file". When
    openmm was imported before torch, the openmm-torch Reference plugin is loaded again here (see
    :func:`_load_torch_plugins`).
    """
    try:
        import openmmtorch
    except Exception as exc:  # ImportError, or OSError from a missing CUDA library in the wheel
        return False, _one_line(exc)
    try:
        _load_torch_plugins()
    except Exception as exc:  # openmm.OpenMMException
        return False, f"the openmm-torch Reference/CPU plugin does not load: {_one_line(exc)}"
    version = getattr(openmmtorch, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("openmmtorch")
        except metadata.PackageNotFoundError:
            version = "unknown version"
    return True, str(version)


class TorchModuleComputation:
    """The ``PythonForce`` callable: energy and autograd forces of a torch module from an OpenMM State.

    Top-level and holding a plain module, so OpenMM can pickle it (XmlSerializer, deepcopy of the System).
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, state):
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        x = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
        energy = self.module(x)
        (grad,) = torch.autograd.grad(energy, x)
        return float(energy.detach()), -grad.numpy()


class FourierBiasComputation:
    """The ``PythonForce`` callable of a :class:`LearnedTorsionBias`: analytic energy and forces, no torch.

    Same energies and forces as the torch module (to rounding), about ten times cheaper per call than
    torch autograd on a few atoms. ``particles`` are the torsion atoms (``PythonForce.setParticles``),
    ``local_torsions`` index into them.
    """

    def __init__(self, bias: "LearnedTorsionBias"):
        torsions = bias.torsions.numpy()
        self.particles = np.unique(torsions)
        self.local_torsions = np.searchsorted(self.particles, torsions)
        self.modes = bias.modes.numpy().copy()
        self.cos_coefficients = bias.cos_coefficients.numpy().copy()
        self.sin_coefficients = bias.sin_coefficients.numpy().copy()
        self._quads = [tuple(int(a) for a in quad) for quad in self.local_torsions]

    def __call__(self, state):
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return self.energy_and_forces(np.asarray(x))

    def energy_and_forces(self, x: np.ndarray):
        """Energy (kJ/mol) and forces (len(particles), 3) kJ/mol/nm of the torsion atoms' positions ``x`` (nm).

        The geometry is plain-float Python per torsion: for a few torsions, numpy's per-call overhead on
        3-vectors cost ~80 us a step (most of the PythonForce's cost), the scalar code ~10 us.
        """
        xs = x.tolist()
        angles, gradients = [], []
        for i0, i1, i2, i3 in self._quads:
            (x0, y0, z0), (x1, y1, z1), (x2, y2, z2), (x3, y3, z3) = xs[i0], xs[i1], xs[i2], xs[i3]
            ax, ay, az = x1 - x0, y1 - y0, z1 - z0  # b1
            bx, by, bz = x2 - x1, y2 - y1, z2 - z1  # b2
            cx, cy, cz = x3 - x2, y3 - y2, z3 - z2  # b3
            n1x, n1y, n1z = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
            n2x, n2y, n2z = by * cz - bz * cy, bz * cx - bx * cz, bx * cy - by * cx
            b2_sq = bx * bx + by * by + bz * bz
            b2_norm = math.sqrt(b2_sq)
            angles.append(math.atan2((ax * n2x + ay * n2y + az * n2z) * b2_norm, n1x * n2x + n1y * n2y + n1z * n2z))
            # Gradient of the dihedral (Blondel & Karplus 1996) in terms of the bond vectors b1, b2, b3.
            s0 = -b2_norm / (n1x * n1x + n1y * n1y + n1z * n1z)
            s3 = b2_norm / (n2x * n2x + n2y * n2y + n2z * n2z)
            g0 = (s0 * n1x, s0 * n1y, s0 * n1z)
            g3 = (s3 * n2x, s3 * n2y, s3 * n2z)
            r1 = (ax * bx + ay * by + az * bz) / b2_sq
            r3 = (cx * bx + cy * by + cz * bz) / b2_sq
            g1 = tuple(-(r1 + 1.0) * u + r3 * v for u, v in zip(g0, g3))
            g2 = tuple(r1 * u - (r3 + 1.0) * v for u, v in zip(g0, g3))
            gradients.append((g0, g1, g2, g3))
        phase = self.modes @ np.array(angles)
        cos_p, sin_p = np.cos(phase), np.sin(phase)
        energy = float(cos_p @ self.cos_coefficients + sin_p @ self.sin_coefficients)
        dB_dtau = ((self.sin_coefficients * cos_p - self.cos_coefficients * sin_p) @ self.modes).tolist()
        forces = [[0.0, 0.0, 0.0] for _ in range(len(xs))]
        for quad, grads, slope in zip(self._quads, gradients, dB_dtau):
            for atom, g in zip(quad, grads):
                f = forces[atom]
                f[0] -= slope * g[0]
                f[1] -= slope * g[1]
                f[2] -= slope * g[2]
        return energy, np.array(forces)


def _check_force_group(force_group) -> int:
    try:
        valid = int(force_group) == force_group and 0 <= int(force_group) <= 31
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfSampleError(f"force_group must be an integer in [0, 31], got {force_group!r}.")
    return int(force_group)


def add_torch_force(system: openmm.System, module: nn.Module, backend: str = "auto", force_group: int = 0,
                    torchscript_path=None, label: str = "torch force") -> AddedForce:
    """Add a torch module ``positions (n_atoms, 3) nm -> energy kJ/mol`` to ``system`` as a force.

    Parameters
    ----------
    system : openmm.System
        Modified in place (one force appended).
    module : torch.nn.Module
        TorchScript-compatible for the TorchForce backend.
    backend : {'auto', 'torchforce', 'pythonforce'}
        'auto' uses TorchForce when ``openmmtorch`` imports, else PythonForce.
    force_group : int in [0, 31]
    torchscript_path : str, optional
        Where the TorchScript file for TorchForce is kept (default: a temporary file, removed once the
        TorchForce has loaded it).
    label : str
        Prefix of the logged line.

    Returns
    -------
    AddedForce
    """
    backend = _check_backend(backend)
    if not isinstance(system, openmm.System):
        raise ConfSampleError(f"system must be an openmm.System, got {type(system).__name__}.")
    if not isinstance(module, nn.Module):
        raise ConfSampleError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    force_group = _check_force_group(force_group)
    available, detail = openmmtorch_status()
    if backend == "torchforce" and not available:
        raise ConfSampleError(f"backend 'torchforce' was requested but openmmtorch is not importable ({detail}).")
    use_torchforce = backend == "torchforce" or (backend == "auto" and available)
    module = module.eval()
    if use_torchforce:
        import openmmtorch

        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
        if torchscript_path is None:
            # TorchForce loads the module when it is constructed, so a temporary file is enough.
            handle, temporary = tempfile.mkstemp(prefix="confsample-", suffix=".pt")
            os.close(handle)
            try:
                scripted.save(temporary)
                force = openmmtorch.TorchForce(temporary)
            finally:
                os.remove(temporary)
        else:
            scripted.save(str(torchscript_path))
            force = openmmtorch.TorchForce(str(torchscript_path))
        message = f"{label}: TorchForce (openmm-torch {detail})"
        name = "torchforce"
    else:
        if isinstance(module, LearnedTorsionBias):
            computation = FourierBiasComputation(module)
            force = openmm.PythonForce(computation)
            force.setParticles([int(a) for a in computation.particles])
        else:
            force = openmm.PythonForce(TorchModuleComputation(module))
        reason = ("pythonforce backend requested" if backend == "pythonforce"
                  else f"openmm-torch not importable: {detail}")
        message = f"{label}: PythonForce fallback ({reason})"
        name = "pythonforce"
        torchscript_path = None
    force.setForceGroup(force_group)
    index = system.addForce(force)
    logger.info(message)
    return AddedForce(name, force, index, force_group, module, message,
                      None if torchscript_path is None else str(torchscript_path))


def add_learned_bias(system: openmm.System, bias_module_or_model, torsions=None, kT: float | None = None,
                     backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP, torchscript_path=None,
                     verbose: bool = True, **options) -> AddedForce:
    """Add the learned torsion bias of a model (or a ready :class:`LearnedTorsionBias`) to ``system``.

    Parameters
    ----------
    system : openmm.System
        Modified in place.
    bias_module_or_model : LearnedTorsionBias or a model with ``log_prob``
        A model is tabulated and fitted with :meth:`LearnedTorsionBias.from_model` (``options``:
        cap_kT, grid_points, max_frequency, smoothing_kT, smoothing_rad).
    torsions : (k, 4) int or dict name -> quad, optional
        Must match the module's/model's torsions (count; for a module also the atoms).
    kT : float, kJ/mol
        Required for a model; for a module it must equal the module's ``kT`` if given.
    backend : {'auto', 'torchforce', 'pythonforce'}
    force_group : int, default 31
        The bias's own group: read the unbiased energy with :func:`unbiased_potential`.
    verbose : bool
        Also print the backend line (it is always logged).

    Returns
    -------
    AddedForce  (``.backend`` is 'torchforce' or 'pythonforce'; ``.module`` the bias)

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.testing import four_atom_torsion_system
    >>> chain = four_atom_torsion_system()
    >>> log_q = lambda tau: 3.0 * np.cos(tau[:, 0] - 1.0)          # any model's log density
    >>> bias = LearnedTorsionBias.from_log_density(log_q, [(0, 1, 2, 3)], kT=chain.kT)
    >>> added = add_learned_bias(chain.system, bias, backend="pythonforce", verbose=False)
    >>> added.backend, added.force_group
    ('pythonforce', 31)
    """
    _check_backend(backend)
    if not isinstance(system, openmm.System):
        raise ConfSampleError(f"system must be an openmm.System, got {type(system).__name__}.")
    n_atoms = system.getNumParticles()
    if kT is not None:
        kT = _check_kT(kT)
    if isinstance(bias_module_or_model, LearnedTorsionBias):
        bias = bias_module_or_model
        if torsions is not None:
            t = _check_torsions(torsions, n_atoms)
            if t.shape[0] != bias.n_torsions:
                raise ConfSampleError(
                    f"the bias has {bias.n_torsions} torsions but {t.shape[0]} torsion quadruples were given."
                )
            if not np.array_equal(t, bias.torsions.numpy()):
                raise ConfSampleError(
                    f"torsions {t.tolist()} differ from the bias's torsions {bias.torsions.tolist()}."
                )
        if kT is not None and not math.isclose(kT, bias.kT, rel_tol=1e-6):
            raise ConfSampleError(f"kT={kT} kJ/mol differs from the kT={bias.kT} kJ/mol the bias was built for.")
    else:
        bias = LearnedTorsionBias.from_model(bias_module_or_model, torsions, kT, **options)
    _check_torsions(bias.torsions.numpy(), n_atoms)
    force_group = _check_force_group(force_group)
    sharing = [type(f).__name__ for f in system.getForces() if f.getForceGroup() == force_group]
    if sharing:
        raise ConfSampleError(
            f"force_group {force_group} is already used by {', '.join(sharing)}; the bias needs a group of its own "
            "so that the unbiased energy stays readable."
        )
    added = add_torch_force(system, bias, backend, force_group, torchscript_path, label="learned bias")
    if verbose:
        print(added.message)
    return added


# --------------------------------------------------------------------------------------
# energies on frames, weights


def with_learned_bias(molsys, bias, backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP):
    """A copy of the MolecularSystem ``molsys`` whose System carries ``bias``, and the :class:`AddedForce`.

    ``bias`` is a :class:`LearnedTorsionBias` or the path of one saved with :meth:`LearnedTorsionBias.save`;
    ``molsys`` itself is not changed.
    """
    import copy
    import dataclasses

    if isinstance(bias, (str, os.PathLike)):
        bias = LearnedTorsionBias.load(bias)
    if not isinstance(bias, LearnedTorsionBias):
        raise ConfSampleError(f"bias must be a LearnedTorsionBias or the path of a saved one, got {type(bias).__name__}.")
    n_atoms = molsys.system.getNumParticles()
    if int(bias.torsions.max()) >= n_atoms:
        raise ConfSampleError(f"the bias's torsions name atom {int(bias.torsions.max())} but system "
                              f"'{molsys.name}' has {n_atoms} atoms.")
    system = copy.deepcopy(molsys.system)
    added = add_learned_bias(system, bias, kT=molsys.kT, backend=backend, force_group=force_group, verbose=False)
    return dataclasses.replace(molsys, system=system), added


def bias_energies(bias: LearnedTorsionBias, frames) -> np.ndarray:
    """Bias energies (N,) kJ/mol of frames: an mdtraj.Trajectory, (N, n_atoms, 3) nm positions or (N, k) angles (rad).

    A 2-D array with 3 columns is read as one frame's positions; for k = 3 torsions pass angles to
    :meth:`LearnedTorsionBias.energies_of_angles`.
    """
    if hasattr(frames, "xyz") and hasattr(frames, "n_frames"):
        frames = frames.xyz
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == bias.n_torsions and x.shape[1] != 3:
        return bias.energies_of_angles(x)
    if x.ndim == 2 and x.shape[1] == 3:
        x = x[None]
    if x.ndim != 3 or x.shape[2] != 3:
        raise ConfSampleError(
            f"frames must be (N, n_atoms, 3) nm or (N, {bias.n_torsions}) angles, got shape {x.shape}."
        )
    if int(bias.torsions.max()) >= x.shape[1]:
        raise ConfSampleError(f"frames have {x.shape[1]} atoms but the bias uses atom {int(bias.torsions.max())}.")
    with torch.no_grad():
        return bias(torch.from_numpy(x)).numpy().reshape(-1)


def reweighting_weights(bias_energies_kJ, kT: float) -> np.ndarray:
    """Normalised weights ``w_i ∝ exp(+B_i / kT)`` that turn biased samples into unbiased averages.

    bias_energies_kJ : (N,) float, kJ/mol -- the bias each frame felt (``B``, typically <= 0)
    kT : float, kJ/mol
    Returns (N,) float summing to 1 (computed as a softmax, stable for any offset of ``B``).
    """
    kT = _check_kT(kT)
    b = np.asarray(bias_energies_kJ, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] == 0:
        raise ConfSampleError(f"bias_energies_kJ must be a non-empty 1-D array, got shape {b.shape}.")
    if not np.all(np.isfinite(b)):
        raise ConfSampleError("bias_energies_kJ contains NaN or infinite values.")
    log_w = b / kT
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def unbiased_potential(context: openmm.Context, added: AddedForce) -> float:
    """Potential energy (kJ/mol) of every force group except the bias's."""
    groups = set(range(32)) - {added.force_group}
    state = context.getState(getEnergy=True, groups=groups)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


# --------------------------------------------------------------------------------------
# biased MD


@dataclass
class BiasedMDResult:
    """Frames of a biased MD run and their reweighting.

    Attributes
    ----------
    time_ps : (N,) float
    angles : (N, k) float, radians -- the biased torsions, in the order of ``torsion_names``
    torsion_names : list of str
    bias_kJ : (N,) float -- bias energy of each frame (the bias force group's energy)
    weights : (N,) float -- :func:`reweighting_weights` of ``bias_kJ``
    backend : str, message : str
    wall_seconds : float
    bias : LearnedTorsionBias
    kT : float, kJ/mol
    """

    time_ps: np.ndarray
    angles: np.ndarray
    torsion_names: list
    bias_kJ: np.ndarray
    weights: np.ndarray
    backend: str
    message: str
    wall_seconds: float
    bias: LearnedTorsionBias
    kT: float
    extra: dict = field(default_factory=dict)

    def angle(self, name: str) -> np.ndarray:
        """(N,) radians of the torsion called ``name``."""
        if name not in self.torsion_names:
            raise ConfSampleError(f"no torsion named {name!r}; the run recorded {self.torsion_names}.")
        return self.angles[:, self.torsion_names.index(name)]


def run_biased_md(molsys, model, length_ps: float, *, torsions=None, save_interval_ps: float = 0.5,
                  timestep_fs: float = 1.0, friction_per_ps: float = 1.0, seed: int = 0,
                  platform: str = "Reference", backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP,
                  minimize: bool = True, positions_nm=None, progress: bool = False, verbose: bool = True,
                  **options) -> BiasedMDResult:
    """Langevin MD of ``molsys`` with the learned bias of ``model`` added (to a copy of its System).

    Parameters
    ----------
    molsys : MolecularSystem
    model : model with ``log_prob`` or a LearnedTorsionBias
    length_ps : float, ps
    torsions : dict name -> quad or (k, 4), optional
        Default: the model's metadata torsions when they are all named in ``molsys.torsions``, else
        ``molsys.torsions``.
    save_interval_ps, timestep_fs, friction_per_ps, seed, platform
        As :func:`openmm_confsample.data.md.run_md`.
    backend, force_group, options
        As :func:`add_learned_bias`.

    Returns
    -------
    BiasedMDResult
    """
    import copy

    from .systems import get_platform

    length_ps = _check_positive(length_ps, "length_ps")
    save_interval_ps = _check_positive(save_interval_ps, "save_interval_ps")
    timestep_fs = _check_positive(timestep_fs, "timestep_fs")
    steps_per_frame = int(round(save_interval_ps * 1000.0 / timestep_fs))
    if steps_per_frame < 1 or not math.isclose(steps_per_frame * timestep_fs, save_interval_ps * 1000.0, rel_tol=1e-6):
        raise ConfSampleError(
            f"save_interval_ps={save_interval_ps} must be a whole number of {timestep_fs} fs timesteps."
        )
    n_frames = int(round(length_ps / save_interval_ps))
    if n_frames < 1:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one save interval ({save_interval_ps} ps).")
    names, t = _resolve_md_torsions(molsys, model, torsions)
    system = copy.deepcopy(molsys.system)
    added = add_learned_bias(system, model, t, molsys.kT, backend=backend, force_group=force_group,
                             verbose=verbose, **options)
    integrator = openmm.LangevinMiddleIntegrator(molsys.temperature_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(int(seed) + 1)
    context = openmm.Context(system, integrator, get_platform(platform))
    context.setPositions(molsys.positions_nm if positions_nm is None else np.asarray(positions_nm, dtype=float))
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(molsys.temperature_K * unit.kelvin, int(seed) + 2)
    bias = added.module
    torsion_tensor = bias.torsions
    angles = np.empty((n_frames, t.shape[0]))
    bias_kJ = np.empty(n_frames)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for i in tqdm(range(n_frames), desc="biased MD", unit="frame", disable=not progress):
        integrator.step(steps_per_frame)
        state = context.getState(getPositions=True, getEnergy=True, groups={added.force_group})
        x = torch.from_numpy(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        angles[i] = torsion_angles_torch(x, torsion_tensor).numpy()
        bias_kJ[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    wall = time.perf_counter() - start
    time_ps = save_interval_ps * np.arange(1, n_frames + 1)
    return BiasedMDResult(time_ps, angles, names, bias_kJ, reweighting_weights(bias_kJ, molsys.kT), added.backend,
                          added.message, wall, bias, molsys.kT,
                          {"ns_per_day": length_ps / 1000.0 / wall * 86400.0, "platform": platform})


def _resolve_md_torsions(molsys, model, torsions):
    if torsions is not None:
        if isinstance(torsions, dict):
            return list(torsions), _check_torsions(list(torsions.values()), molsys.n_atoms)
        t = _check_torsions(torsions, molsys.n_atoms)
        return [f"torsion_{i}" for i in range(len(t))], t
    if isinstance(model, LearnedTorsionBias):
        t = model.torsions.numpy()
        lookup = {tuple(v): k for k, v in molsys.torsions.items()}
        return [lookup.get(tuple(q.tolist()), f"torsion_{i}") for i, q in enumerate(t)], t
    meta = getattr(model, "metadata", {}) or {}
    named = [(item["name"], item["atoms"]) for item in meta.get("torsions", [])]
    if named:
        return [n for n, _ in named], _check_torsions([a for _, a in named], molsys.n_atoms)
    if not molsys.torsions:
        raise ConfSampleError(f"system '{molsys.name}' names no torsions and none were given.")
    return list(molsys.torsions), _check_torsions(list(molsys.torsions.values()), molsys.n_atoms)


# --------------------------------------------------------------------------------------
# iterated, well-tempered bias


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


#: Torsion diffusion settings for each round's model: a few seconds per 1000 frames on one core.
DEFAULT_REFINE_TRAINER = {"hidden": 64, "n_layers": 3, "max_epochs": 200, "patience": 20, "batch_size": 256,
                          "max_time_s": 60.0}


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
    reweighting (:func:`reweighting_weights`), whatever the models' quality: refinement only improves the
    statistics.

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
        As :func:`run_biased_md`; round ``r`` uses ``seed + r``.
    verbose : bool
        Print one line per round (and the backend line once).

    Returns
    -------
    BiasRefinement
    """
    from .models.torsion_diffusion import TorsionDiffusionTrainer, check_angles

    if isinstance(rounds, bool) or int(rounds) != rounds or int(rounds) < 0:
        raise ConfSampleError(f"rounds must be a non-negative integer, got {rounds!r}.")
    rounds = int(rounds)
    round_ps = _check_positive(round_ps, "round_ps")
    torsions = dict(torsions or molsys.torsions)
    if not torsions:
        raise ConfSampleError(f"system '{molsys.name}' names no torsions and none were given.")
    quads = _check_torsions(list(torsions.values()), molsys.n_atoms)
    data = check_angles(angles, "angles", len(quads))
    options = {**DEFAULT_REFINE_TRAINER, **(trainer_options or {})}
    build = {"cap_kT": cap_kT, "grid_points": grid_points, "max_frequency": max_frequency,
             "smoothing_kT": smoothing_kT, "bias_factor": bias_factor}
    named = [(name, list(map(int, q))) for name, q in zip(torsions, quads)]
    kT = molsys.kT
    if isinstance(max_training_frames, bool) or int(max_training_frames) != max_training_frames \
            or int(max_training_frames) < 20:
        raise ConfSampleError(f"max_training_frames must be an integer >= 20, got {max_training_frames!r}.")
    rng = np.random.default_rng([int(seed), 17])
    start = time.perf_counter()
    biases, runs, summary = [], [], []
    pool = [(data, None)]  # (frames, the bias they were sampled with)
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        frames, priors, fractions = _subsample_pool(pool, int(max_training_frames), rng)
        trainer = TorsionDiffusionTrainer(**{**options, "seed": seed + r, "progress": False})
        model = trainer.fit(frames, metadata={"torsions": named, "temperature": molsys.temperature_K}).fetch_model()
        train_seconds = time.perf_counter() - t0
        unbiased_only = len(pool) == 1
        bias = LearnedTorsionBias.from_log_density(model, quads, kT, prior_bias=None if unbiased_only else priors,
                                                   prior_fractions=None if unbiased_only else fractions, **build)
        row = {"round": r, "train_seconds": train_seconds, "epochs": len(model.history.get("val_loss", [])),
               "bias_range_kT": float(-bias.energies_of_angles(_grid_points(len(quads), grid_points)).min() / kT),
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
