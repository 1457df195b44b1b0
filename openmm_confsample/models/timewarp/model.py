"""The Timewarp conditional normalizing flow: a learned proposal p(x(t+tau), v | x(t)) for exact MH moves.

The flow lives on an augmented space: the 3n coordinates of the displacement ``x(t+tau) - x(t)`` (nm) and
3n auxiliary velocities ``v`` (dimensionless, target N(0, I)). A Gaussian latent ``(z_x, z_v)`` with learned
scales (one per atom type for ``z_x``, one global for ``z_v``) is pushed through RealNVP coupling blocks
(:mod:`.layers`) whose scale and shift come from an atom transformer with kernel self-attention on
the conditioning positions. Internally displacements are divided by ``config.displacement_scale_nm`` (0.1 nm);
every density this module returns is in nm-coordinates, that scaling's Jacobian included:

    log p(x', v | x) = log N(z; 0, sigma^2) - log|det d(y, v)/dz| - 3n log(L),   y = (x' - x) / L.

Conditioning positions are centred on their geometric centroid (not the mass-weighted centre) before they
enter the network, so the proposal is translation-invariant. It is not rotation-equivariant (neither is the
reference model); training applies random rotations as augmentation.

``config.coordinates='internal'`` swaps the position half for the 3n - 6 bond lengths, angles and torsions of
a Z-matrix (:mod:`.zmatrix`; the velocity half is unchanged). The coupling blocks' output goes through a
linear-Gaussian baseline fitted in closed form to the training pairs, q' = m + c (q - m) + sd * (L y): per
coordinate a relaxation towards its mean (bonds and angles forget x(t) within tau, torsions mostly take a
random-walk step) and one Cholesky factor L of the residual correlation of all 3n - 6 coordinates (the angles
around one atom are strongly coupled). An untrained flow is exactly that baseline; the blocks learn
corrections on top. A proposal keeps the pose of x(t) (root atom, root -> second atom direction, plane of the
third atom) and the density is taken on that fibre,

    log p(x', v | x) = log p(q', v | q) - log J(q'),   J(q) = r_1^2 prod_i r_i^2 sin(theta_i),

which is what an MH move between x and x' (same pose) needs; MD between moves changes the pose. The model is
rotation- and translation-invariant by construction. Measured on alanine dipeptide at tau = 0.5 ps, held-out
MH acceptance (``benchmarks/timewarp_experiment.py``): baseline with independent coordinates 2.7 %, with the
fitted correlation 15 % (a 4 s fit), after 15 min of likelihood training on one CPU core 22-23 %, at an
RMS displacement of 0.1 nm per proposal. Validation NLLs in this mode are in (q, v)-coordinates plus log J
and are not comparable with Cartesian ones.

The public calls are the conditional density protocol (:mod:`..protocol`), condition first, numpy in and out:
``sample(condition, n, generator)``, ``log_prob(condition, y)``, ``sample_and_log_prob(condition, n,
generator)``, where ``y`` is an :class:`AugmentedState` (positions ``y.x`` and auxiliary velocities ``y.v``).
The tensor-level methods (underscored) belong to the model and its trainer.

Precision: the network runs in the dtype of its parameters, float32 by default, so ``log_prob`` of a sample
equals the log-probability returned by ``sample_and_log_prob`` to about 1e-4 nats. Call ``model.double()``
for float64 (about 1e-10) when that matters more than speed. Positions are returned in float64 (the
condition plus the float32 displacement).

Reference: Klein et al., "Timewarp: Transferable Acceleration of Molecular Dynamics by Learning
Time-Coarsened Dynamics", NeurIPS 2023.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ...checks import positive_int, wrap_angle
from ...errors import ConfSampleError
from ...units import to_nm_batch
from ..checkpoint import load_checkpoint, save_checkpoint
from ..protocol import torch_generator
from .config import TimewarpConfig
from .layers import CouplingBlock, FlowContext, kernel_attention_weights
from .zmatrix import InternalCoordinates

MODEL_KIND = "timewarp"
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class AugmentedState:
    """A batch of points of the flow's augmented space: the ``y`` of ``sample`` and ``log_prob``.

    x : (S, n_atoms, 3) float64, nm
        Positions.
    v : (S, n_atoms, 3) float64, dimensionless
        Auxiliary velocities (their target is N(0, I); the MH test adds the kinetic term |v|^2 / 2).

    ``len(y)`` is the number of samples S and ``y[index]`` selects samples (e.g. ``y[inside]``). Anywhere a
    model takes a ``y``, a plain pair ``(x, v)`` of arrays is accepted too.
    """

    x: np.ndarray
    v: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index) -> "AugmentedState":
        return AugmentedState(self.x[index], self.v[index])


class TimewarpModel(nn.Module):
    """A trained (or fresh) Timewarp flow for one molecule: the conditional density p(x', v' | x).

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
    >>> y, log_q = model.sample_and_log_prob(ala.positions_nm, 4, generator=0)
    >>> y.x.shape, y.v.shape, log_q.shape
    ((4, 22, 3), (4, 22, 3), (4,))
    >>> bool(abs(model.log_prob(ala.positions_nm, y) - log_q).max() < 1e-3)
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
        self.checkpoint_path = None  # where the model was loaded from (its key in moves' model cache)
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

    def _base_log_prob(self, z_x: torch.Tensor, z_v: torch.Tensor) -> torch.Tensor:
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

    def _transform(self, x_cond: torch.Tensor, z_x: torch.Tensor, z_v: torch.Tensor):
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

    def _inverse_transform(self, x_cond: torch.Tensor, displacement_nm: torch.Tensor, v: torch.Tensor):
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

    def _rsample(self, x_cond: torch.Tensor, n: int | None = None, generator: torch.Generator | None = None):
        """Differentiable sampling on tensors: ``(x_new nm, v_new, log_prob)`` of shapes (S, n, 3), (S, n, 3), (S,).

        x_cond : (B, n, 3) nm (one proposal each) or (n, 3) / (1, n, 3) nm with ``n`` proposals.
        """
        if x_cond.dim() == 2:
            x_cond = x_cond[None]
        displacement, v_new, log_prob = self._rsample_displacement(x_cond, n, generator)
        return x_cond + displacement, v_new, log_prob

    def _rsample_displacement(self, x_cond: torch.Tensor, n: int | None, generator: torch.Generator | None):
        n = x_cond.shape[0] if n is None else int(n)
        log_sx, log_sv = self._log_sigmas()
        shape = (n, self.n_atoms, 3)
        eps_x = torch.randn(shape, generator=generator, dtype=self._dtype).to(self._device)
        eps_v = torch.randn(shape, generator=generator, dtype=self._dtype).to(self._device)
        z_x, z_v = eps_x * torch.exp(log_sx), eps_v * torch.exp(log_sv)
        displacement, v_new, log_det = self._transform(x_cond, z_x, z_v)
        return displacement, v_new, self._base_log_prob(z_x, z_v) - log_det

    def _log_prob_displacement(self, x_cond: torch.Tensor, displacement_nm: torch.Tensor,
                               v: torch.Tensor) -> torch.Tensor:
        """log p(x_cond + displacement, v | x_cond) on tensors (B,), differentiable in all inputs."""
        z_x, z_v, log_det = self._inverse_transform(x_cond, displacement_nm, v)
        return self._base_log_prob(z_x, z_v) + log_det

    def _log_prob_tensor(self, x_cond: torch.Tensor, x_target: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
        """log p(x_target, v_target | x_cond) on tensors (B,); x_cond (B or 1, n, 3) or (n, 3) nm."""
        if x_cond.dim() == 2:
            x_cond = x_cond[None]
        return self._log_prob_displacement(x_cond, x_target - x_cond, v_target)

    # -- the density protocol (numpy in and out) ----------------------------------------------------
    def _to_tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=self._dtype, device=self._device)

    @torch.no_grad()
    def sample_and_log_prob(self, condition, n: int = 1, generator=None) -> tuple[AugmentedState, np.ndarray]:
        """Draw proposals y = (x', v') ~ p(. | condition) with their log-density.

        Parameters
        ----------
        condition : (n_atoms, 3) float, nm (or a Quantity)
            The current state x.
        n : int
            Number of proposals.
        generator : numpy.random.Generator, int seed or None
            Drives the draw (through :func:`~openmm_confsample.models.protocol.torch_generator`).

        Returns
        -------
        y : AugmentedState
            ``y.x`` (n, n_atoms, 3) float64 nm and ``y.v`` (n, n_atoms, 3) float64. In internal coordinates a
            draw outside the support (a torsion change of pi or more, a negative bond) is NaN in ``y.x``.
        log_q : (n,) float64
            log p(y | condition) in nm-coordinates (NaN outside the support; precision: module docstring).
        """
        x = to_nm_batch(condition, self.n_atoms, "condition")
        if x.shape[0] != 1:
            raise ConfSampleError(f"condition must be one conformation of shape ({self.n_atoms}, 3), "
                                  f"got {x.shape[0]}.")
        n = positive_int(n, "n")
        displacement, v_new, log_q = self._rsample_displacement(self._to_tensor(x), n, torch_generator(generator))
        y = AugmentedState(x + displacement.double().cpu().numpy(), v_new.double().cpu().numpy())
        return y, log_q.double().cpu().numpy()

    def sample(self, condition, n: int = 1, generator=None) -> AugmentedState:
        """Draw proposals y = (x', v') ~ p(. | condition); see :meth:`sample_and_log_prob`."""
        return self.sample_and_log_prob(condition, n, generator)[0]

    @torch.no_grad()
    def log_prob(self, condition, y) -> np.ndarray:
        """log p(y | condition) by the exact inverse pass of the flow.

        Parameters
        ----------
        condition : (n_atoms, 3) or (S, n_atoms, 3) float, nm
            One conditioning state for all samples, or one per sample.
        y : AugmentedState or pair (x, v)
            ``x`` (S, n_atoms, 3) or (n_atoms, 3) float, nm; ``v`` the same shape, dimensionless.

        Returns
        -------
        (S,) float64, nats, density in nm-coordinates.
        """
        if isinstance(y, AugmentedState):
            x_target, v_target = y.x, y.v
        elif isinstance(y, (tuple, list)) and len(y) == 2:  # not an array: one of length 2 would unpack too
            x_target, v_target = y
        else:
            raise ConfSampleError(f"y must be an AugmentedState or a pair (x, v) of arrays, got {type(y).__name__}.")
        x = to_nm_batch(x_target, self.n_atoms, "y.x")
        v = to_nm_batch(v_target, self.n_atoms, "y.v")
        c = to_nm_batch(condition, self.n_atoms, "condition")
        if v.shape[0] != x.shape[0]:
            raise ConfSampleError(f"y.v has {v.shape[0]} samples but y.x has {x.shape[0]}.")
        if c.shape[0] not in (1, x.shape[0]):
            raise ConfSampleError(f"condition has {c.shape[0]} conformations; give one or {x.shape[0]} "
                                  "(one per sample).")
        # The displacement is formed in float64 so sample -> log_prob round trips lose no precision here.
        displacement = self._to_tensor(x - c)
        return self._log_prob_displacement(self._to_tensor(c), displacement, self._to_tensor(v)).double().cpu().numpy()

    # -- compatibility, save and load ---------------------------------------------------------------
    def check_compatible(self, molecular_system) -> None:
        """Raise ConfSampleError unless ``molecular_system`` has this model's atom count and atom labels (in order)."""
        labels = list(molecular_system.atom_labels)
        name = getattr(molecular_system, "name", "the system")
        where = f"checkpoint {self.checkpoint_path!r}" if self.checkpoint_path else "the Timewarp model"
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
        model.checkpoint_path = str(path)
        model.to(device)
        if molecular_system is not None:
            model.check_compatible(molecular_system)
        return model


def _short(labels, head: int = 4) -> str:
    labels = list(labels)
    shown = ", ".join(repr(label) for label in labels[:head])
    return f"[{shown}{', ...' if len(labels) > head else ''}]"

