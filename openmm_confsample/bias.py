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
    "openmmtorch_status",
    "bias_energies",
    "reweighting_weights",
    "unbiased_potential",
    "run_biased_md",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchforce", "pythonforce")
#: Default force group of the bias: its own group, so the unbiased energy stays readable.
DEFAULT_BIAS_GROUP = 31
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
                 fit_rmse_kJ: float = 0.0, fit_max_error_kJ: float = 0.0):
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

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_log_density(cls, log_density, torsions, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                         max_frequency: int = 10, smoothing_kT: float = 0.5,
                         smoothing_rad: float = 0.0) -> "LearnedTorsionBias":
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
        """
        t = _check_torsions(torsions)
        kT = _check_kT(kT)
        grid, bias_grid = tabulate_bias(log_density, t.shape[0], kT, cap_kT, grid_points, smoothing_kT)
        modes, cos_c, sin_c, rmse, max_err = fit_fourier_series(bias_grid, max_frequency, smoothing_rad)
        return cls(t, modes, cos_c, sin_c, kT, cap_kT * kT, rmse, max_err)

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


# --------------------------------------------------------------------------------------
# tabulation and fit


def _grid_axis(n: int) -> np.ndarray:
    return -np.pi + 2.0 * np.pi * np.arange(n) / n


def tabulate_bias(log_density, n_torsions: int, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                  smoothing_kT: float = 0.5):
    """The capped, smoothed bias ``B_grid`` (kJ/mol) of ``log_density`` on a regular grid (module doc).

    Returns
    -------
    grid : (n^k, k) float, radians (C order, last torsion fastest)
    bias : (n,)*k float, kJ/mol, in [-cap, 0] up to ``w log(1 + exp(-cap/w))``
    """
    kT = _check_kT(kT)
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
    axis = _grid_axis(n)
    grid = np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)
    log_q = np.asarray(log_prob(grid), dtype=np.float64).reshape(-1)
    if log_q.shape[0] != grid.shape[0]:
        raise ConfSampleError(f"log_density returned {log_q.shape[0]} values for {grid.shape[0]} grid points.")
    log_q = np.where(np.isnan(log_q), -np.inf, log_q)
    if not np.isfinite(log_q.max()):
        raise ConfSampleError("log_density is not finite anywhere on the grid.")
    relative = kT * (log_q - log_q.max())  # -(F - F_min) <= 0; -inf where q = 0 becomes -cap below
    soft = -cap + width * np.logaddexp(0.0, (relative + cap) / width)
    soft -= soft.max()
    return grid, soft.reshape((n,) * k)


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
    axis = _grid_axis(n)
    grid = np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)
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
    """The ``PythonForce`` callable of a :class:`LearnedTorsionBias`, in numpy with analytic forces.

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
        # scatter[a, c * k + i] = 1 when atom a is atom c of torsion i: forces = scatter @ stacked gradients.
        k = len(torsions)
        self.scatter = np.zeros((len(self.particles), 4 * k))
        for column in range(4):
            self.scatter[self.local_torsions[:, column], column * k + np.arange(k)] = 1.0

    def __call__(self, state):
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return self.energy_and_forces(np.asarray(x))

    def energy_and_forces(self, x: np.ndarray):
        """Energy (kJ/mol) and forces (len(particles), 3) kJ/mol/nm of the torsion atoms' positions ``x`` (nm)."""
        t = self.local_torsions
        # (3, k) components; cross and dot products written out (np.cross costs ~20 us on tiny arrays).
        p0, p1, p2, p3 = x[t[:, 0]].T, x[t[:, 1]].T, x[t[:, 2]].T, x[t[:, 3]].T
        b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
        n1 = np.array([b1[1] * b2[2] - b1[2] * b2[1], b1[2] * b2[0] - b1[0] * b2[2], b1[0] * b2[1] - b1[1] * b2[0]])
        n2 = np.array([b2[1] * b3[2] - b2[2] * b3[1], b2[2] * b3[0] - b2[0] * b3[2], b2[0] * b3[1] - b2[1] * b3[0]])
        b2_sq = (b2 * b2).sum(0)
        b2_norm = np.sqrt(b2_sq)
        tau = np.arctan2((b1 * n2).sum(0) * b2_norm, (n1 * n2).sum(0))
        phase = self.modes @ tau
        cos_p, sin_p = np.cos(phase), np.sin(phase)
        energy = float(cos_p @ self.cos_coefficients + sin_p @ self.sin_coefficients)
        dB_dtau = (self.sin_coefficients * cos_p - self.cos_coefficients * sin_p) @ self.modes
        # Gradient of the dihedral (Blondel & Karplus 1996) in terms of the bond vectors b1, b2, b3.
        g0 = -(b2_norm / (n1 * n1).sum(0)) * n1
        g3 = (b2_norm / (n2 * n2).sum(0)) * n2
        r1 = (b1 * b2).sum(0) / b2_sq
        r3 = (b3 * b2).sum(0) / b2_sq
        g1 = -(r1 + 1.0) * g0 + r3 * g3
        g2 = r1 * g0 - (r3 + 1.0) * g3
        stacked = np.concatenate([g0, g1, g2, g3], axis=1) * np.tile(-dB_dtau, 4)
        return energy, self.scatter @ stacked.T


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
