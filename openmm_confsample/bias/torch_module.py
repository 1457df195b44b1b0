"""The bias as a torch module: positions (nm) -> torsions -> Fourier series (kJ/mol), TorchScript-ready.

:class:`LearnedTorsionBias` holds the series fitted in :mod:`.fourier`; autograd gives its forces, and
:meth:`LearnedTorsionBias.save_torchscript` writes it for ``openmmtorch.TorchForce``. Built from any exact
log density (``from_log_density``) or from a model through its ``log_prob`` alone (``from_model``: the
density protocol of :mod:`openmm_confsample.models.protocol`, so any torsion model fills it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..checks import positive_kT
from ..errors import ConfSampleError
from ..models.checkpoint import load_checkpoint, save_checkpoint
from .fourier import check_bias_factor, fit_fourier_series, tabulate_bias

__all__ = ["BIAS_KIND", "LearnedTorsionBias", "torsion_angles_torch", "check_torsions"]

#: Checkpoint kind of a saved LearnedTorsionBias.
BIAS_KIND = "learned_torsion_bias"


def check_torsions(torsions, n_atoms: int | None = None) -> np.ndarray:
    """Torsions as a (k, 4) int64 array: a dict name -> quad, a list of quads, or a (k, 4) array.

    Each quad must be four distinct atom indices (in ``[0, n_atoms)`` when ``n_atoms`` is given); k >= 1.
    """
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
        t = check_torsions(torsions)
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
        self.kT = positive_kT(kT)
        self.cap_kJ = float(cap_kJ)
        self.fit_rmse_kJ = float(fit_rmse_kJ)
        self.fit_max_error_kJ = float(fit_max_error_kJ)
        self.bias_factor = check_bias_factor(bias_factor)
        self.metadata = dict(metadata or {})

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_log_density(cls, log_density, torsions, kT: float, cap_kT: float = 10.0, grid_points: int = 48,
                         max_frequency: int = 10, smoothing_kT: float = 0.5, smoothing_rad: float = 0.0,
                         bias_factor: float = math.inf, prior_bias=None, prior_fractions=None,
                         metadata: dict | None = None) -> "LearnedTorsionBias":
        """Tabulate ``log_density`` ((N, k) radians -> (N,)) on a grid and fit the bias series (:mod:`.fourier`).

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
        t = check_torsions(torsions)
        kT = positive_kT(kT)
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

        Only ``model.log_prob`` is called (the density protocol), so any exact torsion density works.
        ``torsions`` defaults to ``model.metadata['torsions']``; ``kT`` (kJ/mol) must be given.
        """
        if not callable(getattr(model, "log_prob", None)):
            raise ConfSampleError(f"model must have a log_prob method, got {type(model).__name__}.")
        if torsions is None:
            meta = getattr(model, "metadata", {}) or {}
            torsions = [item["atoms"] for item in meta.get("torsions", [])]
            if not torsions:
                raise ConfSampleError("torsions must be given: the model's metadata names no torsions.")
        t = check_torsions(torsions)
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

    # -- persistence -----------------------------------------------------------------------------
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
        config = {"kT": self.kT, "cap_kJ": self.cap_kJ, "fit_rmse_kJ": self.fit_rmse_kJ,
                  "fit_max_error_kJ": self.fit_max_error_kJ, "bias_factor": self.bias_factor}
        state = {"torsions": self.torsions, "modes": self.modes, "cos_coefficients": self.cos_coefficients,
                 "sin_coefficients": self.sin_coefficients}
        return str(save_checkpoint(path, BIAS_KIND, config, state, {"bias": self.metadata}))

    @classmethod
    def load(cls, path) -> "LearnedTorsionBias":
        """Read a bias written by :meth:`save` (a clear error for a missing file or another kind of checkpoint)."""
        payload = load_checkpoint(path, kind=BIAS_KIND)
        c, state = payload["config"], payload["state_dict"]
        return cls(state["torsions"].numpy(), state["modes"].numpy(), state["cos_coefficients"].numpy(),
                   state["sin_coefficients"].numpy(), c["kT"], c["cap_kJ"], c["fit_rmse_kJ"], c["fit_max_error_kJ"],
                   c["bias_factor"], payload["metadata"].get("bias") or {})


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
