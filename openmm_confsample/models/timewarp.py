"""The Timewarp conditional normalizing flow: a learned proposal p(x(t+tau), v | x(t)) for exact MH moves.

The flow lives on an augmented space: the 3n coordinates of the displacement ``x(t+tau) - x(t)`` (nm) and
3n auxiliary velocities ``v`` (dimensionless, target N(0, I)). A Gaussian latent ``(z_x, z_v)`` with learned
scales (one per atom type for ``z_x``, one global for ``z_v``) is pushed through RealNVP coupling blocks
(:mod:`.timewarp_layers`) whose scale and shift come from an atom transformer with kernel self-attention on
the conditioning positions. Internally displacements are divided by ``config.displacement_scale_nm`` (0.1 nm);
every density this module returns is in nm-coordinates, that scaling's Jacobian included:

    log p(x', v | x) = log N(z; 0, sigma^2) - log|det d(y, v)/dz| - 3n log(L),   y = (x' - x) / L.

Conditioning positions are centred on their geometric centroid (not the mass-weighted centre) before they
enter the network, so the proposal is translation-invariant. It is not rotation-equivariant (neither is the
reference model); training applies random rotations as augmentation.

``config.coordinates='internal'`` swaps the position half for the 3n - 6 bond lengths, angles and torsions of
a Z-matrix (the velocity half is unchanged). The coupling blocks' output goes through a linear-Gaussian
baseline fitted in closed form to the training pairs, q' = m + c (q - m) + sd * (L y): per coordinate a
relaxation towards its mean (bonds and angles forget x(t) within tau, torsions mostly take a random-walk step)
and one Cholesky factor L of the residual correlation of all 3n - 6 coordinates (the angles around one atom
are strongly coupled). An untrained flow is exactly that baseline; the blocks learn corrections on top. A proposal keeps the pose of x(t) (root
atom, root -> second atom direction, plane of the third atom) and the density is taken on that fibre,

    log p(x', v | x) = log p(q', v | q) - log J(q'),   J(q) = r_1^2 prod_i r_i^2 sin(theta_i),

which is what an MH move between x and x' (same pose) needs; MD between moves changes the pose. The model is
rotation- and translation-invariant by construction. Measured on alanine dipeptide at tau = 0.5 ps, held-out
MH acceptance (``benchmarks/timewarp_experiment.py``): baseline with independent coordinates 2.7 %, with the
fitted correlation 15 % (a 4 s fit), after 15 min of likelihood training on one CPU core 22-23 %, at an
RMS displacement of 0.1 nm per proposal. Validation NLLs in this mode are in (q, v)-coordinates plus log J
and are not comparable with Cartesian ones.

Estimator/model split as in deeptime: :class:`TimewarpTrainer` fits (maximum likelihood, then optionally the
acceptance objective), ``fetch_model()`` returns a :class:`TimewarpModel`, which is what is saved, loaded and
handed to a move: ``sample(x_cond, n_samples)`` and ``log_prob(x, v, x_cond)`` are all an MH engine needs.

Precision: the network runs in the dtype of its parameters, float32 by default, so ``log_prob`` of a sample
equals the log-probability returned by ``sample`` to about 1e-4 nats. Call ``model.double()`` for float64
(about 1e-10) when that matters more than speed. Positions are returned in float64 (``x_cond`` plus the
float32 displacement).

Reference: Klein et al., "Timewarp: Transferable Acceleration of Molecular Dynamics by Learning
Time-Coarsened Dynamics", NeurIPS 2023.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from ..errors import ConfSampleError
from .checkpoint import load_checkpoint, save_checkpoint
from .timewarp_layers import (CouplingBlock, FlowContext, InternalCoordinates, kernel_attention_weights, wrap_angle,
                              zmatrix_from_bonds)

__all__ = [
    "TimewarpConfig",
    "TimewarpModel",
    "TimewarpTrainer",
    "PotentialEnergy",
    "potential_energy",
    "random_rotations",
    "guess_bonds",
    "zmatrix_for",
]

MODEL_KIND = "timewarp"
_LOG_2PI = math.log(2.0 * math.pi)


# -- configuration ------------------------------------------------------------------------------------

@dataclass
class TimewarpConfig:
    """Sizes of the flow, and its coordinates.

    The reference model used 8 coupling layers and hidden size 128 on a GPU; raise
    ``n_coupling_layers``, ``hidden_dim`` and ``n_attention_layers`` there. On one CPU core the default sizes
    with ``coordinates='internal'`` reach about 23 % held-out MH acceptance on alanine dipeptide at tau = 0.5 ps
    after 15 minutes of likelihood training on 140k pairs; the Cartesian default (the reference design) had
    median log alpha of about -4000 and no acceptance after 12 minutes on the same pairs. Trained at tau = 5 ps
    on pairs from MD with a learned torsion bias, 2 blocks of width 32 (the shipped model,
    ``demo.SHIPPED_TIMEWARP_MODEL``) did as well as 4 of width 64 at less than half the cost: about 5.5 %
    acceptance, 13 % of proposals on the other side of phi = 0.

    Parameters
    ----------
    n_coupling_layers : int
        Coupling blocks; each updates the positions and then the velocities (two transformers). 0 is allowed
        with ``coordinates='internal'``: the fitted linear-Gaussian baseline alone (an ablation, and a cheap
        proposal: no transformer runs).
    hidden_dim : int
        Width of the per-atom features in the transformers.
    embedding_dim : int
        Size of the learned atom-type embedding.
    n_attention_layers : int
        Kernel self-attention layers per transformer.
    lengthscales_nm : tuple of float, nm
        One attention head per lengthscale.
    head_dim : int
        Value features per head.
    max_log_scale : float
        Bound on each layer's log-scale, ``s = max * tanh(raw / max)``, for stable training.
    displacement_scale_nm : float, nm
        Displacements are divided by this inside the flow (Cartesian coordinates only).
    coordinates : {'cartesian', 'internal'}
        Space of the position half. 'cartesian' (the reference model): the displacement x' - x. 'internal':
        bond lengths, angles and torsions of ``zmatrix``, each mapped through a per-coordinate linear-Gaussian
        baseline fitted to the training pairs; proposals keep the pose (root atom, root -> second atom
        direction, plane of the third) of x and change the 3n - 6 internal coordinates. Rotation-invariant.
    zmatrix : tuple of (i, j, k, l)
        Placement order for 'internal' (see :func:`~.timewarp_layers.zmatrix_from_bonds`); empty means the
        trainer builds it from bonds guessed from the first training frame.
    """

    n_coupling_layers: int = 4
    hidden_dim: int = 64
    embedding_dim: int = 16
    n_attention_layers: int = 1
    lengthscales_nm: tuple = (0.1, 0.2, 0.5, 0.7, 1.0, 1.2)
    head_dim: int = 16
    max_log_scale: float = 2.0
    displacement_scale_nm: float = 0.1
    coordinates: str = "cartesian"
    zmatrix: tuple = ()

    def __post_init__(self):
        for name in ("n_coupling_layers", "hidden_dim", "embedding_dim", "n_attention_layers", "head_dim"):
            value = getattr(self, name)
            # No coupling layers is allowed in internal coordinates: the fitted linear-Gaussian baseline alone.
            minimum = 0 if name == "n_attention_layers" or (name == "n_coupling_layers"
                                                          and self.coordinates == "internal") else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfSampleError(f"config.{name} must be an integer >= {minimum}, got {value!r}.")
            setattr(self, name, int(value))
        scales = tuple(float(s) for s in self.lengthscales_nm)
        if not scales or not all(np.isfinite(s) and s > 0 for s in scales):
            raise ConfSampleError(f"config.lengthscales_nm must be positive lengths in nm, got {self.lengthscales_nm!r}.")
        self.lengthscales_nm = scales
        for name in ("max_log_scale", "displacement_scale_nm"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value <= 0:
                raise ConfSampleError(f"config.{name} must be a positive number, got {getattr(self, name)!r}.")
            setattr(self, name, value)
        if self.coordinates not in ("cartesian", "internal"):
            raise ConfSampleError(f"config.coordinates must be 'cartesian' or 'internal', got {self.coordinates!r}.")
        try:
            rows = tuple(tuple(int(a) for a in row) for row in self.zmatrix)
        except (TypeError, ValueError):
            raise ConfSampleError("config.zmatrix must be a sequence of (i, j, k, l) integer rows.") from None
        if any(len(row) != 4 for row in rows):
            raise ConfSampleError("config.zmatrix must be a sequence of (i, j, k, l) integer rows.")
        self.zmatrix = rows

    @property
    def internal(self) -> bool:
        return self.coordinates == "internal"

    @classmethod
    def from_any(cls, config) -> "TimewarpConfig":
        """A config from None (defaults), a TimewarpConfig or a dict of its fields."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return copy.deepcopy(config)
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ConfSampleError(f"config has unknown keys {unknown}; known keys are {sorted(known)}.")
            return cls(**config)
        raise ConfSampleError(f"config must be a TimewarpConfig, a dict or None, got {type(config).__name__}.")


# -- input checks -------------------------------------------------------------------------------------

def _positions_tensor(positions, name: str, n_atoms: int, allow_single: bool = True) -> np.ndarray:
    """(B, n_atoms, 3) float64 array from a numpy array, tensor or Quantity, or ConfSampleError naming ``name``."""
    from openmm import unit

    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    try:
        array = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfSampleError(f"{name} must be a numeric array of shape (..., {n_atoms}, 3).") from exc
    if array.ndim == 2 and allow_single:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (n_atoms, 3):
        raise ConfSampleError(f"{name} must have shape (n_samples, {n_atoms}, 3) or ({n_atoms}, 3), got {array.shape}.")
    if not np.all(np.isfinite(array)):
        bad = np.unique(np.nonzero(~np.isfinite(array))[1])[:5].tolist()
        raise ConfSampleError(f"{name} contain NaN or infinite values (atoms {bad}).")
    return array


def _resolve_generator(generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise ConfSampleError(f"generator must be a torch.Generator, an integer seed or None, got {type(generator).__name__}.")


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, 3) rotation matrices, uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=1).view(n, 3, 3)
    return rot.to(dtype)


_COVALENT_RADIUS_NM = {"H": 0.031, "C": 0.076, "N": 0.071, "O": 0.066, "F": 0.057, "P": 0.107, "S": 0.105,
                       "CL": 0.102, "BR": 0.120}


def guess_bonds(atom_labels, positions_nm) -> tuple[list, list]:
    """Bonds from geometry, for internal coordinates when no Z-matrix is given.

    The element is read from the atom name (the part of 'RES:NAME' after the colon: 'CL'/'BR' if the name starts
    so, else its first letter); atoms closer than 1.25 times the sum of covalent radii (median over the given
    frames) are bonded. Returns ``(bonds, heavy)``: pairs of atom indices and a heavy-atom flag per atom.
    """
    names = [str(label).split(":")[-1].upper() for label in atom_labels]
    elements = [name[:2] if name[:2] in ("CL", "BR") else name[:1] for name in names]
    unknown = sorted({e for e in elements if e not in _COVALENT_RADIUS_NM})
    if unknown:
        raise ConfSampleError(f"cannot guess bonds for elements {unknown} from atom names; pass config.zmatrix.")
    x = np.asarray(positions_nm, dtype=np.float64).reshape(-1, len(names), 3)
    dist = np.median(np.linalg.norm(x[:, :, None] - x[:, None], axis=-1), axis=0)
    radii = np.array([_COVALENT_RADIUS_NM[e] for e in elements])
    bonded = dist < 1.25 * (radii[:, None] + radii[None])
    bonds = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if bonded[i, j]]
    return bonds, [e != "H" for e in elements]


def zmatrix_for(atom_labels, positions_nm=None, topology=None) -> tuple:
    """A Z-matrix for ``coordinates='internal'``: from an OpenMM topology's bonds, else guessed from positions."""
    n_atoms = len(atom_labels)
    if topology is not None:
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        heavy = [a.element is None or a.element.symbol != "H" for a in topology.atoms()]
    else:
        bonds, heavy = guess_bonds(atom_labels, positions_nm)
    try:
        return tuple(zmatrix_from_bonds(bonds, n_atoms, heavy))
    except ValueError as exc:
        raise ConfSampleError(f"cannot build a Z-matrix for these {n_atoms} atoms: {exc}") from None


# -- the model ----------------------------------------------------------------------------------------

class TimewarpModel(nn.Module):
    """A trained (or fresh) Timewarp flow for one molecule: ``sample`` and ``log_prob`` of p(x', v' | x).

    Parameters
    ----------
    atom_labels : sequence of str
        One label per atom ('RES:NAME', as ``MolecularSystem.atom_labels``); distinct labels are the atom types.
    config : TimewarpConfig, dict or None
    metadata : dict, optional
        Stored with the checkpoint: ``tau_ps``, ``temperature`` (K), ``topology_fingerprint``, ``history``, ...

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> from openmm_confsample.models.timewarp import TimewarpModel
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> model = TimewarpModel(ala.atom_labels, {"n_coupling_layers": 2, "hidden_dim": 32})
    >>> x_new, v_new, log_prob = model.sample(ala.positions_nm, n_samples=4, generator=0)
    >>> x_new.shape, log_prob.shape
    ((4, 22, 3), (4,))
    >>> bool(abs(model.log_prob(x_new, v_new, ala.positions_nm) - log_prob).max() < 1e-3)
    True
    """

    def __init__(self, atom_labels, config=None, metadata: dict | None = None):
        super().__init__()
        labels = [str(label) for label in atom_labels]
        if not labels:
            raise ConfSampleError("atom_labels must name at least one atom.")
        self.config = TimewarpConfig.from_any(config)
        self.atom_labels = labels
        self.vocabulary = {label: index for index, label in enumerate(sorted(set(labels)))}
        self.metadata = dict(metadata or {})
        self.source = None  # the checkpoint path, once loaded
        cfg = self.config
        self.register_buffer("atom_types", torch.tensor([self.vocabulary[label] for label in labels], dtype=torch.long))
        self.register_buffer("lengthscales_nm", torch.tensor(cfg.lengthscales_nm, dtype=torch.float32))
        self.embedding = nn.Embedding(len(self.vocabulary), cfg.embedding_dim)
        # Learned base scales: one per atom type for the displacement latent, one for the velocity latent.
        self.log_sigma_x = nn.Parameter(torch.zeros(len(self.vocabulary)))
        self.log_sigma_v = nn.Parameter(torch.zeros(()))
        extra = 0
        if cfg.internal:
            if len(cfg.zmatrix) != len(labels):
                raise ConfSampleError(f"config.zmatrix has {len(cfg.zmatrix)} rows for {len(labels)} atoms; "
                                      "internal coordinates need one row per atom.")
            try:
                self.internal = InternalCoordinates(cfg.zmatrix)
            except ValueError as exc:
                raise ConfSampleError(f"config.zmatrix is not a valid Z-matrix: {exc}") from None
            extra = 5  # r, cos/sin theta, cos/sin phi of the conditioning state
            # Baseline q' = m + c (q - m) + sd * (L y) (torsions on the circle, see _to_q); fitted by the
            # trainer, saved with the weights.
            self.register_buffer("ic_mean", torch.zeros(len(labels), 3))
            self.register_buffer("ic_coef", torch.ones(len(labels), 3))
            self.register_buffer("ic_log_sd", torch.log(torch.tensor([0.005, 0.05, 0.2])).repeat(len(labels), 1))
            # Cholesky factor of the residual correlation of the 3n - 6 coordinates (identity: independent).
            n_active = int(self.internal.mask.sum().item())
            self.register_buffer("ic_chol", torch.eye(n_active))
            self.register_buffer("ic_active", torch.nonzero(self.internal.mask.reshape(-1) > 0)[:, 0])
        self.blocks = nn.ModuleList(
            CouplingBlock(cfg.embedding_dim, cfg.hidden_dim, cfg.n_attention_layers, len(cfg.lengthscales_nm),
                          cfg.head_dim, cfg.max_log_scale, extra)
            for _ in range(cfg.n_coupling_layers)
        )

    # -- descriptive properties ---------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return len(self.atom_labels)

    @property
    def tau_ps(self) -> float | None:
        return self.metadata.get("tau_ps")

    @property
    def temperature_K(self) -> float | None:
        """Temperature (K) of the training data, from the metadata (``temperature``, or ``temperature_K``)."""
        value = self.metadata.get("temperature")
        return value if value is not None else self.metadata.get("temperature_K")

    @property
    def _dtype(self):
        return self.log_sigma_v.dtype

    @property
    def _device(self):
        return self.log_sigma_v.device

    def __repr__(self):
        n_params = sum(p.numel() for p in self.parameters())
        return (f"TimewarpModel(n_atoms={self.n_atoms}, n_coupling_layers={self.config.n_coupling_layers}, "
                f"hidden_dim={self.config.hidden_dim}, parameters={n_params})")

    # -- the flow, on tensors -----------------------------------------------------------------------
    def _context(self, x_cond: torch.Tensor) -> FlowContext:
        """x_cond (B or 1, n, 3) nm -> centred coordinates, embeddings and kernel attention weights."""
        embedding = self.embedding(self.atom_types)[None]
        if not self.config.internal:
            x_centred = x_cond - x_cond.mean(dim=1, keepdim=True)
            weights = kernel_attention_weights(x_centred, self.lengthscales_nm.to(x_cond.dtype))
            return FlowContext(x_centred, embedding, weights)
        origin, rot = self.internal.frame(x_cond)
        x_frame = torch.matmul(x_cond - origin[:, None], rot)  # invariant: coordinates in the pose frame
        weights = kernel_attention_weights(x_frame, self.lengthscales_nm.to(x_cond.dtype))
        q = self.internal.to_internal(x_cond)
        mask = self.internal.mask.to(x_cond.dtype)
        features = torch.stack([q[..., 0] * 10.0, torch.cos(q[..., 1]), torch.sin(q[..., 1]), torch.cos(q[..., 2]),
                                torch.sin(q[..., 2])], dim=-1) * torch.cat([mask, mask[:, 1:]], dim=-1)
        return FlowContext(x_frame, embedding, weights, features, mask, q)

    def _log_sigmas(self):
        return self.log_sigma_x[self.atom_types][None, :, None], self.log_sigma_v

    def base_log_prob(self, z_x: torch.Tensor, z_v: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, sigma^2) of the latent, summed over atoms and coordinates (that exist): (B,)."""
        log_sx, log_sv = self._log_sigmas()
        lp_x = -0.5 * (z_x * torch.exp(-log_sx)).pow(2) - log_sx - 0.5 * _LOG_2PI
        if self.config.internal:
            lp_x = lp_x * self.internal.mask
        lp_v = -0.5 * (z_v * torch.exp(-log_sv)).pow(2) - log_sv - 0.5 * _LOG_2PI
        return lp_x.sum(dim=(-2, -1)) + lp_v.sum(dim=(-2, -1))

    # -- internal coordinates: the per-coordinate baseline ------------------------------------------
    def _to_q(self, y: torch.Tensor, q_cond: torch.Tensor):
        """Flow output y -> (q', valid, log|dq'/dy|), with e = sd * (L y) the correlated noise. Bonds, angles:
        q' = m + c (q - m) + e. Torsions: q' = q + delta with delta = (c - 1) wrap(q - m) + e, valid only for
        |delta| < pi (so q' -> x' is one-to-one; other draws are outside the proposal's support and get
        rejected)."""
        mask = self.internal.mask
        sd = torch.exp(self.ic_log_sd)
        m, c = self.ic_mean, self.ic_coef
        noise = sd * self._correlate(y)
        lin = m + c * (q_cond - m) + noise
        delta = (c[:, 2] - 1) * wrap_angle(q_cond[..., 2] - m[:, 2]) + noise[..., 2]
        q = torch.stack([lin[..., 0], lin[..., 1], q_cond[..., 2] + delta], dim=-1)
        q = torch.where(mask > 0, q, torch.zeros_like(q))
        ok = ((q[..., 0] > 0) | (mask[:, 0] == 0)) & (((q[..., 1] > 0) & (q[..., 1] < math.pi)) | (mask[:, 1] == 0))
        ok = ok & ((delta.abs() < math.pi) | (mask[:, 2] == 0))
        return q, ok.all(dim=-1), (self.ic_log_sd * mask).sum() + self._chol_log_det()

    def _from_q(self, q: torch.Tensor, q_cond: torch.Tensor):
        """Inverse of :meth:`_to_q`: (y, log|dy/dq'|)."""
        mask = self.internal.mask
        sd = torch.exp(self.ic_log_sd)
        m, c = self.ic_mean, self.ic_coef
        lin = (q - m - c * (q_cond - m)) / sd
        delta = wrap_angle(q[..., 2] - q_cond[..., 2])
        tors = (delta - (c[:, 2] - 1) * wrap_angle(q_cond[..., 2] - m[:, 2])) / sd[:, 2]
        y = torch.stack([lin[..., 0], lin[..., 1], tors], dim=-1)
        y = self._decorrelate(torch.where(mask > 0, y, torch.zeros_like(y)))
        return y, -(self.ic_log_sd * mask).sum() - self._chol_log_det()

    def _chol_log_det(self):
        return torch.log(torch.diagonal(self.ic_chol)).sum()

    def _correlate(self, y):
        """Standardised noise with the fitted residual correlation: L y on the coordinates that exist."""
        flat = y.reshape(y.shape[0], -1)
        active = flat[:, self.ic_active] @ self.ic_chol.T
        return flat.new_zeros(flat.shape).index_copy(1, self.ic_active, active).view_as(y)

    def _decorrelate(self, e):
        flat = e.reshape(e.shape[0], -1)
        active = torch.linalg.solve_triangular(self.ic_chol, flat[:, self.ic_active].T, upper=False).T
        return flat.new_zeros(flat.shape).index_copy(1, self.ic_active, active).view_as(e)

    def _scale_log_det(self) -> float:
        # d = L * y for all 3n displacement coordinates.
        return 3 * self.n_atoms * math.log(self.config.displacement_scale_nm)

    def transform(self, z_x: torch.Tensor, z_v: torch.Tensor, x_cond: torch.Tensor):
        """Latent -> (displacement nm, velocity) given x_cond (B or 1, n, 3) nm.

        Returns ``(displacement_nm, v, log_det)`` with ``log_det = log|det d(displacement, v) / d(z_x, z_v)|`` (B,).
        """
        context = self._context(x_cond)
        if self.config.internal:
            z_x = z_x * self.internal.mask
        y, v, log_det = z_x, z_v, torch.zeros(z_x.shape[0], dtype=z_x.dtype, device=z_x.device)
        for block in self.blocks:
            y, v, block_log_det = block(y, v, context)
            log_det = log_det + block_log_det
        if not self.config.internal:
            return y * self.config.displacement_scale_nm, v, log_det + self._scale_log_det()
        # Internal coordinates: y -> q' -> x' on the pose fibre of x_cond; dx' = J(q') dq' there. Draws outside
        # the support (see _to_q) come back as NaN displacements, which every caller rejects.
        q, ok, log_det_q = self._to_q(y, context.q_cond)
        safe_q = torch.where(ok[:, None, None], q, context.q_cond.expand_as(q))
        x_new = self.internal.to_cartesian(safe_q, x_cond)
        displacement = x_new - x_cond
        displacement = torch.where(ok[:, None, None], displacement, torch.full_like(displacement, math.nan))
        log_det = log_det + log_det_q + self.internal.log_jacobian(safe_q)
        return displacement, v, torch.where(ok, log_det, torch.full_like(log_det, math.nan))

    def inverse_transform(self, displacement_nm: torch.Tensor, v: torch.Tensor, x_cond: torch.Tensor):
        """(displacement nm, velocity) -> latent; returns ``(z_x, z_v, log_det)``, log_det of this inverse map (B,)."""
        context = self._context(x_cond)
        if self.config.internal:
            q = self.internal.to_internal(x_cond + displacement_nm)
            y, log_det_q = self._from_q(q, context.q_cond)
            log_det = log_det_q - self.internal.log_jacobian(q)
        else:
            y = displacement_nm / self.config.displacement_scale_nm
            log_det = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device) - self._scale_log_det()
        for block in reversed(self.blocks):
            y, v, block_log_det = block.inverse(y, v, context)
            log_det = log_det + block_log_det
        return y, v, log_det

    def rsample(self, x_cond: torch.Tensor, n_samples: int | None = None, generator: torch.Generator | None = None):
        """Differentiable sampling on tensors.

        x_cond : (B, n, 3) nm (one proposal each) or (n, 3) nm with ``n_samples`` proposals.
        Returns ``(x_new nm, v_new, log_prob)`` tensors of shapes (S, n, 3), (S, n, 3), (S,).
        """
        if x_cond.dim() == 2:
            x_cond = x_cond[None]
        displacement, v_new, log_prob = self._rsample_displacement(x_cond, n_samples, generator)
        return x_cond + displacement, v_new, log_prob

    def _rsample_displacement(self, x_cond, n_samples, generator):
        if x_cond.dim() == 2:
            x_cond = x_cond[None]
        n = x_cond.shape[0] if n_samples is None else int(n_samples)
        log_sx, log_sv = self._log_sigmas()
        shape = (n, self.n_atoms, 3)
        eps_x = torch.randn(shape, generator=generator, dtype=self._dtype).to(self._device)
        eps_v = torch.randn(shape, generator=generator, dtype=self._dtype).to(self._device)
        z_x, z_v = eps_x * torch.exp(log_sx), eps_v * torch.exp(log_sv)
        displacement, v_new, log_det = self.transform(z_x, z_v, x_cond)
        return displacement, v_new, self.base_log_prob(z_x, z_v) - log_det

    def log_prob_displacement(self, displacement_nm: torch.Tensor, v: torch.Tensor, x_cond: torch.Tensor) -> torch.Tensor:
        """log p(x_cond + displacement, v | x_cond) on tensors (B,), differentiable in all inputs."""
        z_x, z_v, log_det = self.inverse_transform(displacement_nm, v, x_cond)
        return self.base_log_prob(z_x, z_v) + log_det

    def log_prob_tensor(self, x_target: torch.Tensor, v_target: torch.Tensor, x_cond: torch.Tensor) -> torch.Tensor:
        """log p(x_target, v_target | x_cond) on tensors (B,); x_cond (B or 1, n, 3) nm."""
        if x_cond.dim() == 2:
            x_cond = x_cond[None]
        return self.log_prob_displacement(x_target - x_cond, v_target, x_cond)

    # -- the public numpy interface -----------------------------------------------------------------
    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=self._dtype, device=self._device)

    @torch.no_grad()
    def sample(self, x_cond, n_samples: int = 1, generator=None):
        """Draw proposals (x', v') ~ p(. | x_cond).

        Parameters
        ----------
        x_cond : (n_atoms, 3) float, nm (numpy, tensor or Quantity)
        n_samples : int
        generator : torch.Generator, int seed or None

        Returns
        -------
        x_new : (S, n_atoms, 3) float64, nm
        v_new : (S, n_atoms, 3) float64, dimensionless auxiliary velocities
        log_prob : (S,) float64, log p(x_new, v_new | x_cond) in nm-coordinates (precision: see module docstring)
        """
        x = _positions_tensor(x_cond, "x_cond", self.n_atoms)
        if x.shape[0] != 1:
            raise ConfSampleError(f"x_cond must be one conformation of shape ({self.n_atoms}, 3), got {x.shape[0]}.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ConfSampleError(f"n_samples must be a positive integer, got {n_samples!r}.")
        generator = _resolve_generator(generator)
        displacement, v_new, log_prob = self._rsample_displacement(self._to_tensor(x), int(n_samples), generator)
        x_new = x + displacement.double().cpu().numpy()
        return x_new, v_new.double().cpu().numpy(), log_prob.double().cpu().numpy()

    @torch.no_grad()
    def log_prob(self, x_target, v_target, x_cond) -> np.ndarray:
        """log p(x_target, v_target | x_cond) by the exact inverse pass.

        Parameters
        ----------
        x_target : (S, n_atoms, 3) or (n_atoms, 3) float, nm
        v_target : same shape, dimensionless
        x_cond : (n_atoms, 3) or (S, n_atoms, 3) float, nm

        Returns
        -------
        (S,) float64, nats, density in nm-coordinates.
        """
        x = _positions_tensor(x_target, "x_target", self.n_atoms)
        v = _positions_tensor(v_target, "v_target", self.n_atoms)
        c = _positions_tensor(x_cond, "x_cond", self.n_atoms)
        if v.shape[0] != x.shape[0]:
            raise ConfSampleError(f"v_target has {v.shape[0]} samples but x_target has {x.shape[0]}.")
        if c.shape[0] not in (1, x.shape[0]):
            raise ConfSampleError(f"x_cond has {c.shape[0]} conformations; give one or {x.shape[0]} (one per sample).")
        # The displacement is formed in float64 so sample -> log_prob round trips lose no precision here.
        displacement = self._to_tensor(x - c)
        return self.log_prob_displacement(displacement, self._to_tensor(v), self._to_tensor(c)).double().cpu().numpy()

    # -- compatibility, save and load ---------------------------------------------------------------
    def check_compatible(self, molecular_system) -> None:
        """Raise ConfSampleError unless ``molecular_system`` has this model's atom count and atom labels (in order)."""
        labels = list(molecular_system.atom_labels)
        name = getattr(molecular_system, "name", "the system")
        where = f"checkpoint {self.source!r}" if self.source else "the Timewarp model"
        if labels != self.atom_labels:
            diff = next((i for i, (a, b) in enumerate(zip(self.atom_labels, labels)) if a != b), None)
            detail = (f"; first difference at atom {diff}: {self.atom_labels[diff]!r} vs {labels[diff]!r}"
                      if diff is not None else "")
            raise ConfSampleError(
                f"{where} was trained on {self.n_atoms} atoms with labels {_short(self.atom_labels)}, the system "
                f"'{name}' has {len(labels)} atoms with labels {_short(labels)}{detail}."
            )
        expected = self.metadata.get("topology_fingerprint")
        if expected and hasattr(molecular_system, "fingerprint") and molecular_system.fingerprint() != expected:
            raise ConfSampleError(
                f"{where} was trained on a topology with fingerprint {expected}, the system '{name}' has "
                f"{molecular_system.fingerprint()} (same atom labels, different elements or bonds)."
            )

    def save(self, path, metadata: dict | None = None):
        """Write the model (config, weights, atom labels and metadata) to ``path``; returns the path."""
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta["atom_labels"] = list(self.atom_labels)
        meta["vocabulary"] = dict(self.vocabulary)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        return save_checkpoint(path, MODEL_KIND, asdict(self.config), state, meta)

    @classmethod
    def load(cls, path, molecular_system=None, device: str = "cpu") -> "TimewarpModel":
        """Read a model written by :meth:`save`; checks compatibility with ``molecular_system`` when given."""
        payload = load_checkpoint(path, kind=MODEL_KIND)
        meta = dict(payload["metadata"])
        labels = meta.get("atom_labels")
        if not labels:
            raise ConfSampleError(f"checkpoint file {str(path)!r} has no atom_labels in its metadata.")
        model = cls(labels, payload["config"], meta)
        if meta.get("vocabulary") and dict(meta["vocabulary"]) != model.vocabulary:
            raise ConfSampleError(f"checkpoint file {str(path)!r} has an atom vocabulary that does not match its labels.")
        state = dict(payload["state_dict"])
        if model.config.internal and "ic_chol" not in state:  # written before the correlated baseline
            state["ic_chol"], state["ic_active"] = model.ic_chol, model.ic_active
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfSampleError(f"checkpoint file {str(path)!r} has weights that do not fit its config.") from exc
        model.source = str(path)
        model.to(device)
        if molecular_system is not None:
            model.check_compatible(molecular_system)
        return model


def _short(labels, head: int = 4) -> str:
    labels = list(labels)
    shown = ", ".join(repr(label) for label in labels[:head])
    return f"[{shown}{', ...' if len(labels) > head else ''}]"


# -- energies with forces as gradients ----------------------------------------------------------------

def _call_energy_fn(energy_fn, positions_nm: np.ndarray):
    if hasattr(energy_fn, "energies_and_forces"):
        energies, forces = energy_fn.energies_and_forces(positions_nm, forces=True)
    else:
        energies, forces = energy_fn(positions_nm)
    energies = np.asarray(energies, dtype=np.float64).reshape(len(positions_nm))
    forces = np.asarray(forces, dtype=np.float64).reshape(positions_nm.shape)
    bad = ~np.isfinite(energies) | ~np.all(np.isfinite(forces), axis=(1, 2))
    energies = np.where(bad, np.inf, energies)
    forces[bad] = 0.0
    return energies, forces


class PotentialEnergy(torch.autograd.Function):
    """U(x) in kJ/mol of a batch of conformations, with dU/dx = -forces (kJ/mol/nm) as its gradient.

    ``energy_fn`` is an :class:`~openmm_confsample.systems.EnergyEvaluator` or any callable taking (B, n, 3)
    float64 nm and returning ``(energies (B,) kJ/mol, forces (B, n, 3) kJ/mol/nm)``. Conformations OpenMM
    refuses (or with non-finite energy) get ``inf`` and a zero gradient.
    """

    @staticmethod
    def forward(ctx, positions_nm: torch.Tensor, energy_fn):
        x = positions_nm.detach().double().cpu().numpy()
        energies, forces = _call_energy_fn(energy_fn, x)
        ctx.save_for_backward(torch.as_tensor(-forces, dtype=positions_nm.dtype, device=positions_nm.device))
        return torch.as_tensor(energies, dtype=torch.float64, device=positions_nm.device)

    @staticmethod
    def backward(ctx, grad_energy):
        (gradient,) = ctx.saved_tensors
        return grad_energy.to(gradient.dtype)[:, None, None] * gradient, None


def potential_energy(positions_nm: torch.Tensor, energy_fn) -> torch.Tensor:
    """(B,) float64 kJ/mol of (B, n, 3) nm positions; backpropagates -forces. See :class:`PotentialEnergy`."""
    return PotentialEnergy.apply(positions_nm, energy_fn)


# -- training -----------------------------------------------------------------------------------------


def _progress(total, desc, unit, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfSampleError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _positive_float(value, name, allow_zero=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfSampleError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfSampleError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value}.")
    return value


class TimewarpTrainer:
    """Fits a :class:`TimewarpModel`: maximum likelihood on (x(t), x(t+tau)) pairs, then optionally acceptance.

    Parameters
    ----------
    config : TimewarpConfig, dict or None
        Network sizes for a new model (ignored when ``model`` is given).
    model : TimewarpModel, optional
        Continue training this model (e.g. a loaded checkpoint) instead of creating one.
    seed : int
        Seeds the weight initialisation, batch order, rotations and auxiliary velocities.
    device : str
        Torch device, e.g. 'cpu' or 'cuda'.
    progress : bool
        Show progress bars (pairs/s and ETA).
    full_covariance : bool
        Internal coordinates only: fit the baseline's residual correlation between all 3n - 6 coordinates
        (e.g. the angles around one atom), not only one spread per coordinate.

    Examples
    --------
    >>> trainer = TimewarpTrainer({"n_coupling_layers": 2}, seed=0, progress=False)  # doctest: +SKIP
    >>> trainer.fit_likelihood(x0, x1, ala.atom_labels, val=(x0v, x1v), epochs=20)    # doctest: +SKIP
    >>> trainer.fit_acceptance(x0, EnergyEvaluator(ala), ala.kT, steps=200)           # doctest: +SKIP
    >>> model = trainer.fetch_model(); model.save("timewarp.pt")                       # doctest: +SKIP
    """

    def __init__(self, config=None, *, model: TimewarpModel | None = None, seed: int = 0, device: str = "cpu",
                 progress: bool = True, full_covariance: bool = True):
        if model is not None and not isinstance(model, TimewarpModel):
            raise ConfSampleError(f"model must be a TimewarpModel, got {type(model).__name__}.")
        self.config = model.config if model is not None else TimewarpConfig.from_any(config)
        self.seed = int(seed)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfSampleError(f"device {device!r} is not a valid torch device.") from exc
        self.progress = bool(progress)
        self.full_covariance = bool(full_covariance)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._model = model.to(self.device) if model is not None else None
        self.history: dict[str, list] = {
            "train_nll": [], "val_nll": [], "initial_val_nll": [], "epoch_seconds": [], "pairs_per_second": [],
            "acceptance_loss": [], "acceptance_rate": [], "mean_clipped_log_alpha": [], "median_delta_u_kT": [],
            "proposal_rms_displacement_nm": [], "proposal_log_prob": [],
        }

    # -- helpers -----------------------------------------------------------------------------------
    def _new_model(self, atom_labels, metadata):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = TimewarpModel(atom_labels, self.config, metadata)
        return model.to(self.device)

    def _tensor(self, array):
        return torch.as_tensor(array, dtype=torch.float32, device=self.device)

    def _randn(self, shape):
        return torch.randn(shape, generator=self.generator).to(self.device)

    @torch.no_grad()
    def _mean_nll(self, x0, x1, v, batch_size=512) -> float:
        total = 0.0
        for start in range(0, len(x0), batch_size):
            sl = slice(start, start + batch_size)
            total += -self._model.log_prob_tensor(x1[sl], v[sl], x0[sl]).double().sum().item()
        return total / len(x0)

    @torch.no_grad()
    def _init_base_scales(self, x0, x1):
        """Start each atom type's latent scale at the data's displacement spread (the flow starts as identity).

        In internal coordinates: fit the per-coordinate baseline q' = m + c (q - m) + sd * y by least squares
        (torsions: circular mean m, regression of the wrapped change on the wrapped deviation), so the untrained
        flow is that linear-Gaussian model and the latent scales start at 1.
        """
        if self.config.internal:
            self._fit_internal_baseline(x0, x1)
            return
        y = (x1 - x0) / self.config.displacement_scale_nm
        y = y - y.mean(dim=1, keepdim=True)
        per_atom = y.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-3)  # (n,)
        types = self._model.atom_types
        sums = torch.zeros(len(self._model.vocabulary), device=self.device).index_add_(0, types, per_atom.log())
        counts = torch.zeros_like(sums).index_add_(0, types, torch.ones_like(per_atom))
        self._model.log_sigma_x.copy_(sums / counts.clamp_min(1))

    @torch.no_grad()
    def _fit_internal_baseline(self, x0, x1, batch_size=4096):
        """Least-squares fit of m, c, sd per coordinate and (``full_covariance``) of the residual correlation L."""
        model = self._model
        ic = model.internal
        q0 = torch.cat([ic.to_internal(x0[i:i + batch_size].double()) for i in range(0, len(x0), batch_size)])
        q1 = torch.cat([ic.to_internal(x1[i:i + batch_size].double()) for i in range(0, len(x1), batch_size)])
        mean = 0.5 * (q0.mean(0) + q1.mean(0))
        d0, d1 = q0 - mean, q1 - mean
        coef = ((d0 * d1).mean(0) / d0.pow(2).mean(0).clamp_min(1e-12)).clamp(0.0, 1.0)
        resid = d1 - coef * d0
        # Torsions on the circle.
        phi0, phi1 = q0[..., 2], q1[..., 2]
        m_phi = torch.atan2(torch.sin(phi0).mean(0), torch.cos(phi0).mean(0))
        dev = wrap_angle(phi0 - m_phi)
        delta = wrap_angle(phi1 - phi0)
        slope = ((dev * delta).mean(0) / dev.pow(2).mean(0).clamp_min(1e-12)).clamp(-1.0, 0.0)  # c - 1
        resid_phi = delta - slope * dev
        mean[:, 2], coef[:, 2] = m_phi, 1.0 + slope
        sd = resid.pow(2).mean(0).sqrt()
        sd[:, 2] = resid_phi.pow(2).mean(0).sqrt()
        mask = ic.mask.double()
        if self.full_covariance:
            std_resid = torch.stack([resid[..., 0], resid[..., 1], resid_phi], dim=-1) / sd.clamp_min(1e-5)
            active = std_resid.reshape(len(std_resid), -1)[:, model.ic_active]
            corr = active.T @ active / len(active)
            corr = corr + 1e-6 * torch.eye(len(corr), dtype=corr.dtype)
            model.ic_chol.copy_(torch.linalg.cholesky(corr).float())
        model.ic_mean.copy_((mean * mask).float())
        model.ic_coef.copy_(torch.where(mask > 0, coef, torch.ones_like(coef)).float())
        model.ic_log_sd.copy_(torch.where(mask > 0, sd.clamp_min(1e-5).log(), torch.zeros_like(sd)).float())
        model.log_sigma_x.zero_()

    # -- phase 1 -----------------------------------------------------------------------------------
    def fit_likelihood(self, x0, x1, atom_labels, val=None, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                       weight_decay: float = 1e-5, patience: int | None = 10, max_minutes: float | None = None,
                       rotate: bool = True, max_grad_norm: float = 10.0, tau_ps: float | None = None,
                       temperature_K: float | None = None, topology_fingerprint: str | None = None,
                       metadata: dict | None = None):
        """Maximum likelihood of x(t+tau) given x(t), with fresh N(0, I) auxiliary velocities every batch.

        Parameters
        ----------
        x0, x1 : (N, n_atoms, 3) float, nm
            Pairs (x(t), x(t+tau)).
        atom_labels : sequence of str, length n_atoms
        val : (x0v, x1v), optional
            Held-out pairs; the best-validation weights are kept (else the best training epoch).
        epochs, batch_size, lr, weight_decay : training settings (AdamW); ``epochs=0`` fits the baseline only.
        patience : int or None
            Stop after this many epochs without improvement of the monitored NLL.
        max_minutes : float or None
            Stop after the epoch that passes this wall-clock budget.
        rotate : bool
            Random rotation augmentation (x(t) and x(t+tau) rotated together about x(t)'s centroid).
        tau_ps, temperature_K, topology_fingerprint : recorded in the model's metadata.
        metadata : dict, optional
            Further entries for the model's metadata (JSON-like), e.g. ``data_source``.

        NLL in the history is nats per pair, -log p(x1, v | x0) in nm-coordinates, velocities included
        (their part is 3n/2 log(2 pi e) = 93.6 nats for 22 atoms at best). A model created here starts as a
        Gaussian whose per-atom-type scales are fitted to the training displacements; ``initial_val_nll``
        records that starting point on the validation pairs.
        """
        labels = [str(a) for a in atom_labels]
        n_atoms = len(labels)
        x0 = _positions_tensor(x0, "x0", n_atoms, allow_single=False)
        x1 = _positions_tensor(x1, "x1", n_atoms, allow_single=False)
        if len(x0) != len(x1):
            raise ConfSampleError(f"x0 has {len(x0)} conformations but x1 has {len(x1)}; they must be pairs.")
        # epochs=0 only creates the model and fits its baseline (the per-atom-type scales, or in internal
        # coordinates the linear-Gaussian model): a closed-form start that is already a usable proposal there.
        epochs = 0 if epochs == 0 and not isinstance(epochs, bool) else _positive_int(epochs, "epochs")
        batch_size = _positive_int(batch_size, "batch_size")
        lr = _positive_float(lr, "lr")
        weight_decay = _positive_float(weight_decay, "weight_decay", allow_zero=True)
        if val is not None:
            if not isinstance(val, (tuple, list)) or len(val) != 2:
                raise ConfSampleError("val must be a pair (x0_val, x1_val) of (N, n_atoms, 3) arrays in nm.")
            x0v = _positions_tensor(val[0], "val[0]", n_atoms, allow_single=False)
            x1v = _positions_tensor(val[1], "val[1]", n_atoms, allow_single=False)
            if len(x0v) != len(x1v):
                raise ConfSampleError(f"val[0] has {len(x0v)} conformations but val[1] has {len(x1v)}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise ConfSampleError(f"metadata must be a dict, got {type(metadata).__name__}.")
        metadata = dict(metadata or {})
        if "temperature_K" in metadata and "temperature" not in metadata:
            metadata["temperature"] = metadata.pop("temperature_K")
        metadata.update({k: v for k, v in (("tau_ps", tau_ps), ("temperature", temperature_K),
                                           ("topology_fingerprint", topology_fingerprint)) if v is not None})
        if self._model is None:
            if self.config.internal and not self.config.zmatrix:
                self.config.zmatrix = zmatrix_for(labels, x0[:10])
            self._model = self._new_model(labels, metadata)
            fresh = True
        else:
            if labels != self._model.atom_labels:
                raise ConfSampleError(
                    f"atom_labels differ from the model's ({n_atoms} atoms {_short(labels)} vs "
                    f"{self._model.n_atoms} atoms {_short(self._model.atom_labels)})."
                )
            self._model.metadata.update(metadata)
            fresh = False
        model = self._model
        x0_t, x1_t = self._tensor(x0), self._tensor(x1)
        if fresh:
            self._init_base_scales(x0_t, x1_t)
        if val is not None:
            x0v_t, x1v_t = self._tensor(x0v), self._tensor(x1v)
            # Fixed validation velocities make the validation NLL comparable between epochs.
            vv_t = self._randn(x0v_t.shape)

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        n_batches = math.ceil(len(x0_t) / batch_size)
        best_nll, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
        if val is not None:
            # The starting point competes too: a run that only gets worse returns the weights it started from.
            best_nll = self._mean_nll(x0v_t, x1v_t, vv_t)
            self.history["initial_val_nll"].append(best_nll)
        t_start = time.perf_counter()
        bar = _progress(epochs * len(x0_t), "Timewarp likelihood", "pair", self.progress)
        try:
            for epoch in range(epochs):
                t_epoch = time.perf_counter()
                model.train()
                order = torch.randperm(len(x0_t), generator=self.generator).to(self.device)
                epoch_loss = 0.0
                for b in range(n_batches):
                    idx = order[b * batch_size:(b + 1) * batch_size]
                    xa, xb = x0_t[idx], x1_t[idx]
                    if rotate and not model.config.internal:  # internal coordinates are invariant already
                        rot = random_rotations(len(idx), self.generator).to(self.device)
                        centre = xa.mean(dim=1, keepdim=True)
                        xa = torch.matmul(xa - centre, rot.transpose(1, 2))
                        xb = torch.matmul(xb - centre, rot.transpose(1, 2))
                    v = self._randn(xa.shape)
                    loss = -model.log_prob_tensor(xb, v, xa).mean()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite likelihood loss at epoch {epoch}; lower lr.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    epoch_loss += loss.item() * len(idx)
                    bar.update(len(idx))
                model.eval()
                train_nll = epoch_loss / len(x0_t)
                val_nll = self._mean_nll(x0v_t, x1v_t, vv_t) if val is not None else math.nan
                seconds = time.perf_counter() - t_epoch
                self.history["train_nll"].append(train_nll)
                self.history["val_nll"].append(val_nll)
                self.history["epoch_seconds"].append(seconds)
                self.history["pairs_per_second"].append(len(x0_t) / seconds)
                bar.set_postfix(train_nll=f"{train_nll:.2f}", val_nll=f"{val_nll:.2f}")
                monitored = val_nll if val is not None else train_nll
                if monitored < best_nll:
                    best_nll, best_state, stale = monitored, copy.deepcopy(model.state_dict()), 0
                else:
                    stale += 1
                if patience is not None and stale >= patience:
                    break
                if max_minutes is not None and time.perf_counter() - t_start > 60.0 * max_minutes:
                    break
        finally:
            bar.close()
        model.load_state_dict(best_state)
        model.metadata["history"] = {k: list(v) for k, v in self.history.items() if v}
        return self

    fit = fit_likelihood

    # -- phase 2 -----------------------------------------------------------------------------------
    def fit_acceptance(self, x0, energy_fn, kT: float, steps: int = 200, batch_size: int = 16, lr: float = 1e-4,
                       beta_ent: float = 0.1, beta_energy: float = 0.0, weight_decay: float = 1e-5,
                       max_grad_norm: float = 1.0, max_minutes: float | None = None):
        """Fine-tune on the MH acceptance of proposals from the states ``x0``.

        Per step, for a batch of states x with fresh velocities v and proposals (x', v') ~ p(.|x), maximise

            mean(min(0, log alpha)) - beta_ent * mean(log p(x', v' | x)) - beta_energy * mean(u(x') - u(x)),
            log alpha = -(u(x') - u(x)) - (K(v') - K(v)) + log p(x, v | x') - log p(x', v' | x),

        with K(v) = |v|^2 / 2 and u = U / kT. The energy gradient is -forces through :class:`PotentialEnergy`.

        Parameters
        ----------
        x0 : (N, n_atoms, 3) float, nm
            States to propose from (e.g. MD frames).
        energy_fn : EnergyEvaluator or callable (B, n, 3) nm -> (energies kJ/mol, forces kJ/mol/nm)
        kT : float, kJ/mol
        steps, batch_size, lr, weight_decay, max_grad_norm : optimisation settings (AdamW).
        beta_ent : float
            Weight of the entropy term; without it the flow shrinks its steps until every proposal is accepted.
            A flow that can only shrink its steps settles where the mean energy change is about
            ``1.5 * n_atoms * beta_ent`` kT (~3.3 kT for alanine dipeptide at 0.1): watch
            ``proposal_rms_displacement_nm`` in the history, high acceptance of tiny steps is no gain.
        beta_energy : float
            Optional weight of the mean reduced energy change of proposals.

        The raw objective is used on purpose, clashes at 1e8 kT included; only the global gradient norm is
        clipped. Capping the energy lets the flow buy acceptance with density ratio instead of energy, and
        squashing very negative log alpha hands the step to the entropy term: both diverged in tests on
        alanine dipeptide, while the raw objective took a likelihood-trained model from 0 to ~10% acceptance
        (by shrinking its steps; see ``beta_ent``).

        The history records, per step, ``acceptance_rate`` (mean min(1, alpha), proposals OpenMM refuses count
        as 0), ``mean_clipped_log_alpha``, ``median_delta_u_kT``, ``proposal_rms_displacement_nm`` (root mean
        square over atoms of x' - x, no alignment) and ``proposal_log_prob``.
        """
        if self._model is None:
            raise ConfSampleError("fit_acceptance needs a model: call fit_likelihood first or pass model= to the trainer.")
        model = self._model
        x0 = _positions_tensor(x0, "x0", model.n_atoms, allow_single=False)
        kT = _positive_float(kT, "kT")
        steps, batch_size = _positive_int(steps, "steps"), _positive_int(batch_size, "batch_size")
        lr = _positive_float(lr, "lr")
        beta_ent = _positive_float(beta_ent, "beta_ent", allow_zero=True)
        beta_energy = _positive_float(beta_energy, "beta_energy", allow_zero=True)
        if not (hasattr(energy_fn, "energies_and_forces") or callable(energy_fn)):
            raise ConfSampleError("energy_fn must be an EnergyEvaluator or a callable returning (energies, forces).")
        u0 = _call_energy_fn(energy_fn, x0)[0] / kT
        if not np.all(np.isfinite(u0)):
            bad = np.nonzero(~np.isfinite(u0))[0][:5].tolist()
            raise ConfSampleError(f"x0 has conformations with non-finite energy (indices {bad}).")
        x0_t = self._tensor(x0)
        u0_t = torch.as_tensor(u0, dtype=torch.float64, device=self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        t_start = time.perf_counter()
        bar = _progress(steps, "Timewarp acceptance", "step", self.progress)
        model.train()
        try:
            for _ in range(steps):
                idx = torch.randint(len(x0_t), (batch_size,), generator=self.generator).to(self.device)
                x, u_old = x0_t[idx], u0_t[idx]
                v = self._randn(x.shape)
                x_new, v_new, log_p_forward = model.rsample(x, None, self.generator)
                inside = torch.isfinite(log_p_forward) & torch.isfinite(x_new).all(dim=(1, 2))
                # Draws outside the support (internal coordinates) are rejected proposals: acceptance 0, no gradient.
                x_safe = torch.where(inside[:, None, None], x_new, x)
                log_p_reverse = model.log_prob_tensor(x, v, x_safe)
                delta_u = potential_energy(x_safe, energy_fn) / kT - u_old
                finite = torch.isfinite(delta_u) & inside
                if not finite.any():
                    bar.update(1)
                    continue
                delta_u = delta_u[finite]
                delta_k = 0.5 * (v_new[finite].pow(2).sum(dim=(1, 2)) - v[finite].pow(2).sum(dim=(1, 2)))
                log_alpha = (-delta_u - delta_k.double() + log_p_reverse[finite].double()
                             - log_p_forward[finite].double())
                clipped = log_alpha.clamp(max=0.0)
                objective = clipped.mean() - beta_ent * log_p_forward[finite].double().mean()
                if beta_energy:
                    objective = objective - beta_energy * delta_u.mean()
                loss = -objective
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                # Rejected-for-infinite-energy proposals count as acceptance 0.
                rate = torch.exp(clipped.detach()).sum().item() / batch_size
                self.history["acceptance_loss"].append(loss.item())
                self.history["acceptance_rate"].append(rate)
                self.history["mean_clipped_log_alpha"].append(clipped.mean().item())
                self.history["median_delta_u_kT"].append(delta_u.median().item())
                self.history["proposal_rms_displacement_nm"].append(
                    (x_new - x)[inside].detach().pow(2).sum(-1).mean().sqrt().item())
                self.history["proposal_log_prob"].append(log_p_forward.detach().mean().item())
                bar.update(1)
                bar.set_postfix(acceptance=f"{rate:.3f}")
                if max_minutes is not None and time.perf_counter() - t_start > 60.0 * max_minutes:
                    break
        finally:
            bar.close()
            model.eval()
        model.metadata["history"] = {k: list(v) for k, v in self.history.items() if v}
        return self

    # -- results -----------------------------------------------------------------------------------
    def fetch_model(self) -> TimewarpModel:
        """The trained model (best weights of the likelihood phase, then any acceptance fine-tuning)."""
        if self._model is None:
            raise ConfSampleError("the trainer has no model yet: call fit_likelihood first.")
        return self._model

    def plot_history(self, path) -> str:
        """Save a PNG of the training curves (NLL per epoch; acceptance per step) to ``path``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        has_acc = bool(self.history["acceptance_rate"])
        fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.5), squeeze=False)
        ax = axes[0, 0]
        epochs = np.arange(1, len(self.history["train_nll"]) + 1)
        ax.plot(epochs, self.history["train_nll"], label="train")
        if any(np.isfinite(self.history["val_nll"])):
            ax.plot(epochs, self.history["val_nll"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NLL (nats per pair)")
        ax.set_title("likelihood phase")
        ax.legend()
        if has_acc:
            ax = axes[0, 1]
            rate = np.asarray(self.history["acceptance_rate"])
            ax.plot(rate, alpha=0.4, label="per step")
            window = max(1, len(rate) // 20)
            ax.plot(np.convolve(rate, np.ones(window) / window, mode="valid"), label=f"running mean ({window})")
            ax.set_xlabel("step")
            ax.set_ylabel("mean min(1, alpha)")
            ax.set_title("acceptance phase")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)
