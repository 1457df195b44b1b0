"""Building blocks of the Timewarp flow: kernel self-attention, the atom transformer, coupling layers.

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
