"""The learned part of torsion diffusion: the noise schedule and the score network, in torch.

A variance-exploding diffusion on ``[-pi, pi)^k``: ``x_t = wrap(x_0 + sigma(t) eps)`` with
``sigma(t) = sigma_min^(1-t) sigma_max^t`` (``sigma_min = 0.01 pi``, ``sigma_max = pi``). A small
MLP on ``(sin x, cos x, features of t)`` predicts the score of the wrapped-normal kernel divided by
``sqrt(E[s^2](sigma))``, so its regression target has unit variance at every noise level (torsional
diffusion, Jing, Corso et al. 2022). :mod:`.flow` turns the trained network into an exact density.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ...checks import wrap_angle
from ...errors import ConfSampleError
from .. import torus

__all__ = ["SIGMA_MIN", "SIGMA_MAX", "NoiseSchedule", "ScoreNetwork", "check_angles"]

SIGMA_MIN = 0.01 * math.pi
SIGMA_MAX = math.pi


def check_angles(angles, name: str, n_torsions: int | None = None, allow_single: bool = False) -> np.ndarray:
    """Validate torsion angles and return them as float64 ``(N, k)`` wrapped to ``[-pi, pi)``.

    Raises :class:`ConfSampleError` for a wrong shape, non-finite values, an empty array, or
    values that look like degrees (``max |angle| > pi + 1e-3``).
    """
    try:
        a = np.asarray(angles, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfSampleError(f"{name} must be a numeric array of angles in radians.") from None
    if allow_single and a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ConfSampleError(
            f"{name} must have shape (n_frames, n_torsions), got shape {a.shape}; reshape a single "
            "torsion series to (n_frames, 1)."
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ConfSampleError(f"{name} is empty (shape {a.shape}).")
    if n_torsions is not None and a.shape[1] != n_torsions:
        raise ConfSampleError(f"{name} has {a.shape[1]} torsions per row, the model has {n_torsions}.")
    if not np.all(np.isfinite(a)):
        raise ConfSampleError(f"{name} contains NaN or infinite values.")
    amax = float(np.max(np.abs(a)))
    if amax > math.pi + 1e-3:
        raise ConfSampleError(
            f"{name} look like degrees (max |angle| = {amax:.4g} > pi); pass radians, e.g. np.deg2rad(angles)."
        )
    return wrap_angle(a)


@contextmanager
def torch_threads(n: int | None):
    """Run torch on ``n`` intra-op threads inside the block (None: leave it), restoring the old count."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class NoiseSchedule:
    """Geometric variance-exploding schedule ``sigma(t) = sigma_min^(1-t) sigma_max^t`` on t in [0, 1].

    ``g2(t) = d sigma^2 / dt = 2 log(sigma_max / sigma_min) sigma(t)^2``; ``exp(log_score_norm(t))`` is
    ``E[s^2]`` of the 1-D wrapped normal at ``sigma(t)`` (tabulated, linear in ``t``).
    Works on numpy arrays and torch tensors.
    """

    def __init__(self, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        if not 0.0 < sigma_min < sigma_max:
            raise ConfSampleError(f"sigma_min must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)
        _, log_norm = torus.score_norm_table(self.sigma_min, self.sigma_max)
        self._log_norm = np.asarray(log_norm, dtype=np.float64)
        self._log_norm_torch = torch.tensor(self._log_norm, dtype=torch.float64)

    def sigma(self, t):
        if isinstance(t, torch.Tensor):
            return self.sigma_min * torch.exp(self.log_ratio * t)
        return self.sigma_min * np.exp(self.log_ratio * np.asarray(t, dtype=np.float64))

    def g2(self, t):
        return 2.0 * self.log_ratio * self.sigma(t) ** 2

    def log_score_norm(self, t):
        """``log E[s^2]`` at ``sigma(t)``, linear interpolation of the table in t (= log sigma)."""
        n = len(self._log_norm) - 1
        if isinstance(t, torch.Tensor):
            u = torch.clamp(t.to(torch.float64), 0.0, 1.0) * n
            i = torch.clamp(torch.floor(u).long(), max=n - 1)
            frac = u - i
            table = self._log_norm_torch
            return ((1.0 - frac) * table[i] + frac * table[i + 1]).to(t.dtype)
        u = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * n
        i = np.minimum(np.floor(u).astype(np.int64), n - 1)
        frac = u - i
        return (1.0 - frac) * self._log_norm[i] + frac * self._log_norm[i + 1]


class ScoreNetwork(nn.Module):
    """MLP ``(sin x, cos x, time features) -> normalised score``, SiLU activations.

    Parameters
    ----------
    n_torsions : int
        k, the number of angles.
    hidden : int
        Width of each hidden layer.
    n_layers : int
        Number of hidden layers (activations); ``n_layers + 1`` linear maps in all.
    n_frequencies : int
        Time features are ``t, sin(pi 2^j t), cos(pi 2^j t)`` for ``j < n_frequencies``; since
        ``t`` is affine in ``log sigma`` these are sinusoidal features of ``log sigma``.

    ``forward(x, t)`` takes ``x : (B, k)`` radians and ``t : (B,)`` in [0, 1] and returns
    ``(B, k)``; the score is that output times ``sqrt(E[s^2](sigma(t)))``.
    """

    def __init__(self, n_torsions: int, hidden: int = 64, n_layers: int = 3, n_frequencies: int = 6):
        super().__init__()
        if n_torsions < 1 or hidden < 1 or n_layers < 1 or n_frequencies < 0:
            raise ConfSampleError("ScoreNetwork needs n_torsions, hidden and n_layers >= 1 and n_frequencies >= 0.")
        self.n_torsions = int(n_torsions)
        self.hidden = int(hidden)
        self.n_layers = int(n_layers)
        self.n_frequencies = int(n_frequencies)
        self.register_buffer(
            "frequencies", math.pi * 2.0 ** torch.arange(self.n_frequencies, dtype=torch.float32), persistent=False
        )
        n_in = 2 * self.n_torsions + 1 + 2 * self.n_frequencies
        self.layers = nn.ModuleList(
            [nn.Linear(n_in, self.hidden)] + [nn.Linear(self.hidden, self.hidden) for _ in range(self.n_layers - 1)]
        )
        self.out = nn.Linear(self.hidden, self.n_torsions)

    @property
    def config(self) -> dict:
        return {
            "n_torsions": self.n_torsions,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "n_frequencies": self.n_frequencies,
        }

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1)
        arg = t * self.frequencies.to(t.dtype)
        return torch.cat([t, torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.sin(x), torch.cos(x), self.time_features(t).expand(x.shape[0], -1)], dim=-1)
        for layer in self.layers:
            h = nn.functional.silu(layer(h))
        return self.out(h)
