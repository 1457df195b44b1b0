"""The sizes of a Timewarp flow and the space its position half lives in (Cartesian or internal coordinates)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

from ...checks import positive_float, positive_int
from ...errors import ConfSampleError


@dataclass
class TimewarpConfig:
    """Sizes of the flow, and its coordinates.

    The reference model used 8 coupling layers and hidden size 128 on a GPU; raise
    ``n_coupling_layers``, ``hidden_dim`` and ``n_attention_layers`` there. On one CPU core the default sizes
    with ``coordinates='internal'`` reach about 23 % held-out MH acceptance on alanine dipeptide at tau = 0.5 ps
    after 15 minutes of likelihood training on 140k pairs; the Cartesian default (the reference design) had
    median log alpha of about -4000 and no acceptance after 12 minutes on the same pairs. Trained at tau = 5 ps
    on pairs from MD with a learned torsion bias, 2 blocks of width 32 (the shipped model,
    ``bench.alanine.SHIPPED_TIMEWARP_MODEL``) did as well as 4 of width 64 at less than half the cost: about 5.5 %
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
        Placement order for 'internal' (see :func:`~.zmatrix.zmatrix_from_bonds`); empty means the
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
        if self.coordinates not in ("cartesian", "internal"):
            raise ConfSampleError(f"config.coordinates must be 'cartesian' or 'internal', got {self.coordinates!r}.")
        # No coupling layers is allowed in internal coordinates: the fitted linear-Gaussian baseline alone.
        self.n_coupling_layers = positive_int(self.n_coupling_layers, "config.n_coupling_layers",
                                              minimum=0 if self.internal else 1)
        self.n_attention_layers = positive_int(self.n_attention_layers, "config.n_attention_layers", minimum=0)
        for name in ("hidden_dim", "embedding_dim", "head_dim"):
            setattr(self, name, positive_int(getattr(self, name), f"config.{name}"))
        try:
            scales = tuple(float(s) for s in self.lengthscales_nm)
        except (TypeError, ValueError):
            scales = ()
        if not scales or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ConfSampleError(
                f"config.lengthscales_nm must be positive lengths in nm, got {self.lengthscales_nm!r}.")
        self.lengthscales_nm = scales
        for name in ("max_log_scale", "displacement_scale_nm"):
            setattr(self, name, positive_float(getattr(self, name), f"config.{name}"))
        try:
            rows = tuple(tuple(int(a) for a in row) for row in self.zmatrix)
        except (TypeError, ValueError):
            rows = None
        if rows is None or any(len(row) != 4 for row in rows):
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
