"""Building blocks of the Timewarp conditional flow: kernel self-attention, the atom transformer, coupling layers.

The flow acts on an augmented state: positions ``y`` (the displacement x(t+tau) - x(t) divided by a fixed
length scale, dimensionless) and auxiliary velocities ``v`` (dimensionless), both (B, n_atoms, 3). Each
:class:`CouplingBlock` is a RealNVP pair: first ``y`` gets a scale and shift computed from ``v`` (and the
conditioning state), then ``v`` gets a scale and shift from the new ``y``. The conditioning state enters every
transformer twice: as a per-atom input feature (centred coordinates) and through the attention weights
``exp(-|x_i - x_j|^2 / l^2)``, which depend on the conditioning positions only, so they are computed once per
call and shared by every layer.

Nothing here is rotation-equivariant (as in the reference Timewarp model); training uses random rotations
as augmentation instead.

Reference: Klein et al., "Timewarp: Transferable Acceleration of Molecular Dynamics by Learning Time-Coarsened
Dynamics", NeurIPS 2023.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def kernel_attention_weights(x_cond_nm: torch.Tensor, lengthscales_nm: torch.Tensor) -> torch.Tensor:
    """Attention weights of the kernel self-attention, one head per lengthscale.

    Parameters
    ----------
    x_cond_nm : (B, n_atoms, 3) float, nm
        Conditioning positions (any translation: only differences enter).
    lengthscales_nm : (H,) float, nm

    Returns
    -------
    (B, H, n_atoms, n_atoms) float: ``softmax_j(-|x_i - x_j|^2 / l_h^2)``, rows sum to one.
    """
    sq_dist = (x_cond_nm[:, :, None, :] - x_cond_nm[:, None, :, :]).pow(2).sum(-1)  # (B, n, n)
    logits = -sq_dist[:, None] / lengthscales_nm.pow(2)[None, :, None, None]
    return torch.softmax(logits, dim=-1)


class KernelSelfAttention(nn.Module):
    """Multi-head attention whose weights are fixed Gaussian kernels of the conditioning distances.

    Only the values are learned: head ``h`` averages the projected features of all atoms with the weights of
    lengthscale ``l_h``; the heads are concatenated and projected back to ``dim``.
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.values = nn.Linear(dim, n_heads * head_dim)
        self.out = nn.Linear(n_heads * head_dim, dim)

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        batch, n_atoms, _ = h.shape
        values = self.values(h).view(batch, n_atoms, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, n, hd)
        mixed = torch.matmul(weights, values)  # weights (B or 1, H, n, n) broadcast over samples
        return self.out(mixed.transpose(1, 2).reshape(batch, n_atoms, self.n_heads * self.head_dim))


class TransformerLayer(nn.Module):
    """Post-norm transformer layer: kernel attention and a feed-forward net, each with a residual and LayerNorm."""

    def __init__(self, dim: int, n_heads: int, head_dim: int):
        super().__init__()
        self.attention = KernelSelfAttention(dim, n_heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.attention(h, weights))
        return self.norm2(h + self.feed_forward(h))


class AtomTransformer(nn.Module):
    """Per-atom [centred x(t), atom embedding, other half] -> MLP -> L kernel-attention layers -> MLP -> (shift, log-scale).

    The last linear layer starts at zero, so an untrained coupling layer is the identity.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, n_layers: int, n_heads: int, head_dim: int,
                 extra_features: int = 0):
        super().__init__()
        self.input_mlp = nn.Sequential(nn.Linear(3 + embedding_dim + 3 + extra_features, hidden_dim), nn.SiLU(),
                                       nn.Linear(hidden_dim, hidden_dim))
        self.layers = nn.ModuleList(TransformerLayer(hidden_dim, n_heads, head_dim) for _ in range(n_layers))
        self.output_mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 6))
        nn.init.zeros_(self.output_mlp[-1].weight)
        nn.init.zeros_(self.output_mlp[-1].bias)

    def forward(self, other: torch.Tensor, context: "FlowContext") -> tuple[torch.Tensor, torch.Tensor]:
        batch = other.shape[0]
        parts = [context.x_centred.expand(batch, -1, -1), context.embedding.expand(batch, -1, -1), other]
        if context.features is not None:
            parts.append(context.features.expand(batch, -1, -1))
        features = torch.cat(parts, dim=-1)
        h = self.input_mlp(features)
        for layer in self.layers:
            h = layer(h, context.weights)
        out = self.output_mlp(h)
        return out[..., :3], out[..., 3:]


class FlowContext:
    """What the conditioning state contributes, computed once per call and shared by all layers.

    x_centred : (B or 1, n, 3) nm, conditioning positions minus their geometric centroid (or, in internal
        coordinates, in the pose frame of the Z-matrix)
    embedding : (1, n, E) atom-type embeddings
    weights : (B or 1, H, n, n) kernel attention weights
    features : (B or 1, n, F) further per-atom inputs, or None
    mask : (n, 3) 1 where a position coordinate exists, or None (all exist)
    q_cond : (B or 1, n, 3) internal coordinates of the conditioning state, or None
    """

    __slots__ = ("x_centred", "embedding", "weights", "features", "mask", "q_cond")

    def __init__(self, x_centred: torch.Tensor, embedding: torch.Tensor, weights: torch.Tensor, features=None,
                 mask=None, q_cond=None):
        self.x_centred, self.embedding, self.weights = x_centred, embedding, weights
        self.features, self.mask, self.q_cond = features, mask, q_cond


class AffineCoupling(nn.Module):
    """``target -> target * exp(s) + t`` with ``(t, s)`` from the other half; ``s = s_max * tanh(raw / s_max)``."""

    def __init__(self, transformer: AtomTransformer, max_log_scale: float, masked: bool = False):
        super().__init__()
        self.transformer = transformer
        self.max_log_scale = float(max_log_scale)
        self.masked = bool(masked)

    def _shift_log_scale(self, other, context):
        shift, raw = self.transformer(other, context)
        log_scale = self.max_log_scale * torch.tanh(raw / self.max_log_scale)
        if self.masked and context.mask is not None:
            # Coordinates that do not exist stay at zero and add nothing to the log-determinant.
            shift, log_scale = shift * context.mask, log_scale * context.mask
        return shift, log_scale

    def forward(self, target, other, context):
        shift, log_scale = self._shift_log_scale(other, context)
        return target * torch.exp(log_scale) + shift, log_scale.sum(dim=(-2, -1))

    def inverse(self, target, other, context):
        shift, log_scale = self._shift_log_scale(other, context)
        return (target - shift) * torch.exp(-log_scale), -log_scale.sum(dim=(-2, -1))


class CouplingBlock(nn.Module):
    """One Timewarp coupling layer: positions from velocities, then velocities from the new positions."""

    def __init__(self, embedding_dim: int, hidden_dim: int, n_attention_layers: int, n_heads: int, head_dim: int,
                 max_log_scale: float, extra_features: int = 0):
        super().__init__()
        self.position_coupling = AffineCoupling(
            AtomTransformer(embedding_dim, hidden_dim, n_attention_layers, n_heads, head_dim, extra_features),
            max_log_scale, masked=True)
        self.velocity_coupling = AffineCoupling(
            AtomTransformer(embedding_dim, hidden_dim, n_attention_layers, n_heads, head_dim, extra_features),
            max_log_scale)

    def forward(self, y, v, context):
        y, log_det_y = self.position_coupling(y, v, context)
        v, log_det_v = self.velocity_coupling(v, y, context)
        return y, v, log_det_y + log_det_v

    def inverse(self, y, v, context):
        v, log_det_v = self.velocity_coupling.inverse(v, y, context)
        y, log_det_y = self.position_coupling.inverse(y, v, context)
        return y, v, log_det_y + log_det_v


# -- internal coordinates (optional output space of the flow) -----------------------------------------
#
# In ``coordinates="internal"`` mode the flow's position half lives on bond lengths, bond angles and
# torsions of a Z-matrix instead of Cartesian displacements. Atom ``i`` (not the first three placed) is put
# at distance r from its parent j, angle theta(i, j, k) and torsion phi(i, j, k, l) from previously placed
# atoms. The first three placed atoms fix the pose (position of the root, direction root -> second atom,
# half-plane of the third): a proposal keeps the pose of x(t) and changes the 3n - 6 internal coordinates.
# On that fibre dx = J(q) dq with J(q) = r_1^2 prod_{i>=2} r_i^2 sin(theta_i) (the rotation part is the
# Haar measure, which does not depend on q), so densities in Cartesian coordinates differ from those in q by
# -log J(q).

def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def bond_angle(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Angle p0-p1-p2 in radians, (...,)."""
    a, b = p0 - p1, p2 - p1
    return torch.atan2(torch.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1))


def dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """IUPAC torsion p0-p1-p2-p3 in radians in (-pi, pi], (...,)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = _unit(b1)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def wrap_angle(a: torch.Tensor) -> torch.Tensor:
    """Angles mapped to [-pi, pi)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def zmatrix_from_bonds(bonds, n_atoms: int, heavy=None) -> list:
    """Z-matrix rows ``(i, j, k, l)`` in placement order (-1 where a reference is unused), from a bond list.

    The root is the graph centre among heavy atoms; atoms are placed breadth-first, heavy atoms first. The
    torsion reference ``l`` is an already placed sibling of ``i`` on ``j`` when there is one (so methyl
    hydrogens and branches get near-rigid relative torsions) and otherwise a placed neighbour of ``k``.
    """
    heavy = [True] * n_atoms if heavy is None else [bool(h) for h in heavy]
    adj = [[] for _ in range(n_atoms)]
    for a, b in bonds:
        adj[int(a)].append(int(b))
        adj[int(b)].append(int(a))
    for a in range(n_atoms):
        adj[a].sort(key=lambda x: (not heavy[x], x))

    def eccentricity(s):
        dist = {s: 0}
        frontier = [s]
        while frontier:
            nxt = []
            for a in frontier:
                for b in adj[a]:
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        nxt.append(b)
            frontier = nxt
        return max(dist.values()) if len(dist) == n_atoms else math.inf

    candidates = [a for a in range(n_atoms) if heavy[a] and len(adj[a]) >= 2] or list(range(n_atoms))
    root = min(candidates, key=lambda a: (eccentricity(a), -len(adj[a]), a))
    if not math.isfinite(eccentricity(root)):
        raise ValueError("the bond graph is not connected; internal coordinates need one molecule.")
    order, parent = [root], {root: -1}
    head = 0
    while head < len(order):
        a = order[head]
        head += 1
        for b in adj[a]:
            if b not in parent:
                parent[b] = a
                order.append(b)
    if n_atoms < 3:
        raise ValueError("internal coordinates need at least three atoms.")
    placed, rows = set(), []
    for i in order:
        j = parent[i]
        k = l = -1
        if j >= 0:
            k_options = [b for b in adj[j] if b in placed and b != i]
            if parent[j] >= 0:
                k_options = [parent[j]] + [b for b in k_options if b != parent[j]]
            k = k_options[0] if k_options else -1
            if len(placed) >= 3:
                siblings = [b for b in adj[j] if b in placed and b not in (i, k)]
                if siblings:
                    l = siblings[0]
                else:
                    l_options = [b for b in adj[k] if b in placed and b not in (i, j)]
                    if not l_options:
                        l_options = [b for b in placed if b not in (i, j, k)]
                    l = l_options[0]
        rows.append((int(i), int(j), int(k), int(l)))
        placed.add(i)
    # The third placed atom needs k: its parent's other placed neighbour.
    i, j, k, l = rows[2]
    if k < 0:
        k = rows[0][0] if j != rows[0][0] else rows[1][0]
        rows[2] = (i, j, k, -1)
    return rows


class InternalCoordinates(nn.Module):
    """Cartesian <-> (r, theta, phi) per atom for a fixed Z-matrix; the pose is taken from a reference state.

    ``q`` is (B, n, 3) in topology order: column 0 bond length (nm), 1 angle (rad), 2 torsion (rad); ``mask``
    (n, 3) is 1 where the coordinate exists (3n - 6 ones) and the rest of ``q`` is 0.
    """

    def __init__(self, zmatrix):
        super().__init__()
        rows = torch.as_tensor(zmatrix, dtype=torch.long).view(-1, 4)
        n = rows.shape[0]
        if sorted(rows[:, 0].tolist()) != list(range(n)):
            raise ValueError("the Z-matrix must place every atom exactly once.")
        refs = torch.full((n, 3), -1, dtype=torch.long)
        refs[rows[:, 0]] = rows[:, 1:]
        mask = torch.zeros(n, 3)
        mask[rows[1, 0], 0] = 1.0
        mask[rows[2, 0], :2] = 1.0
        for i in rows[3:, 0]:
            mask[i] = 1.0
        self.register_buffer("rows", rows)
        self.register_buffer("refs", refs)
        self.register_buffer("mask", mask)
        # Atoms from the fourth row on are placed level by level: an atom's level is one more than the highest
        # of its three references, so every atom of a level can be placed in one batched step.
        level = {int(rows[0, 0]): 0, int(rows[1, 0]): 1, int(rows[2, 0]): 2}
        for i, j, k, m in rows[3:].tolist():
            level[i] = 1 + max(level[j], level[k], level[m])
        # Non-persistent buffers: they follow .to(device) but stay out of the state dict (checkpoints unchanged).
        self._level_names = []
        for lv in sorted({level[i] for i in rows[3:, 0].tolist()}):
            name = f"_level_{lv}"
            self.register_buffer(name, rows[3:][torch.tensor([level[i] == lv for i in rows[3:, 0].tolist()])],
                                 persistent=False)
            self._level_names.append(name)

    def to_internal(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, n, 3) nm -> q (B, n, 3)."""
        # Only coordinates that exist are computed: degenerate ones would give NaN values and NaN gradients.
        rows = self.rows
        r_rows, t_rows, p_rows = rows[1:], rows[2:], rows[3:]
        r = (x[:, r_rows[:, 0]] - x[:, r_rows[:, 1]]).norm(dim=-1)
        theta = bond_angle(x[:, t_rows[:, 0]], x[:, t_rows[:, 1]], x[:, t_rows[:, 2]])
        phi = dihedral(x[:, p_rows[:, 0]], x[:, p_rows[:, 1]], x[:, p_rows[:, 2]], x[:, p_rows[:, 3]])
        zeros = x.new_zeros(x.shape[0], x.shape[1])
        return torch.stack([zeros.index_copy(1, r_rows[:, 0], r), zeros.index_copy(1, t_rows[:, 0], theta),
                            zeros.index_copy(1, p_rows[:, 0], phi)], dim=-1)

    def log_jacobian(self, q: torch.Tensor) -> torch.Tensor:
        """log J(q) = sum 2 log r + sum log sin(theta) over the coordinates that exist, (B,)."""
        m = self.mask
        safe_r = torch.where(m[:, 0] > 0, q[..., 0], torch.ones_like(q[..., 0]))
        safe_t = torch.where(m[:, 1] > 0, q[..., 1], torch.full_like(q[..., 1], math.pi / 2))
        return 2 * torch.log(safe_r).sum(-1) + torch.log(torch.sin(safe_t)).sum(-1)

    def frame(self, x_ref: torch.Tensor):
        """Origin (B, 3) and rotation (B, 3, 3) (columns e1, e2, e3) of the pose of ``x_ref``."""
        a0, a1, a2 = self.rows[0, 0], self.rows[1, 0], self.rows[2, 0]
        origin = x_ref[:, a0]
        e1 = _unit(x_ref[:, a1] - origin)
        w = x_ref[:, a2] - x_ref[:, self.rows[2, 1]]
        e2 = _unit(w - (w * e1).sum(-1, keepdim=True) * e1)
        e3 = torch.cross(e1, e2, dim=-1)
        return origin, torch.stack([e1, e2, e3], dim=-1)

    def to_cartesian(self, q: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
        """q (B, n, 3) -> x (B, n, 3) nm with the pose of x_ref (B or 1, n, 3)."""
        batch = q.shape[0]
        x_ref = x_ref.expand(batch, -1, -1)
        origin, rot = self.frame(x_ref)
        e1, e2 = rot[..., 0], rot[..., 1]
        placed = [None] * q.shape[1]
        rows = self.rows.tolist()
        i0, i1, i2 = rows[0][0], rows[1][0], rows[2][0]
        placed[i0] = origin
        placed[i1] = origin + q[:, i1, 0:1] * e1
        _, j2, k2, _ = rows[2]
        # e1 points root -> second atom; the third atom's angle is measured from its parent towards k.
        axis = _unit(placed[k2] - placed[j2])
        perp = _unit(e2 - (e2 * axis).sum(-1, keepdim=True) * axis)
        placed[i2] = placed[j2] + q[:, i2, 0:1] * (torch.cos(q[:, i2, 1:2]) * axis + torch.sin(q[:, i2, 1:2]) * perp)
        x = q.new_zeros(q.shape).index_copy(1, self.rows[:3, 0], torch.stack([placed[i0], placed[i1], placed[i2]], 1))
        for name in self._level_names:
            i, j, k, l = getattr(self, name).unbind(-1)
            c, b, a = x[:, j], x[:, k], x[:, l]
            bc = _unit(c - b)
            n = _unit(torch.cross(b - a, bc, dim=-1))
            m = torch.cross(n, bc, dim=-1)
            qi = q[:, i]
            r, theta, phi = qi[..., 0:1], qi[..., 1:2], qi[..., 2:3]
            sin_theta = torch.sin(theta)
            x = x.index_copy(1, i, c + r * (-torch.cos(theta) * bc + sin_theta * torch.cos(phi) * m
                                            + sin_theta * torch.sin(phi) * n))
        return x
