"""Wrapped-normal maths on the torus ``[-pi, pi)^k``.

Everything here is numpy, float64, and vectorised over arbitrary leading shapes. The
wrapped normal is a sum over periodic images; it is evaluated in logsumexp form, so it
stays accurate from ``sigma = 0.01 pi`` (a sharp Gaussian) to ``sigma = pi`` (nearly
uniform) with the default ``n_images = 10`` (images ``-10 .. 10``).

The score normalisation :func:`score_norm` is ``E[s(x)^2]`` for ``x ~ WN(0, sigma^2)`` in one
dimension, the per-noise-level weight of denoising score matching used by torsional
diffusion (Jing, Corso et al. 2022). It is computed here by deterministic quadrature on a
periodic grid (spectrally accurate for a smooth periodic integrand) rather than by Monte
Carlo, tabulated once on a grid geometric in sigma and interpolated in ``log sigma``.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.special import logsumexp

__all__ = [
    "wrap",
    "log_wrapped_normal",
    "wrapped_normal_score",
    "score_norm",
    "score_norm_table",
]

TWO_PI = 2.0 * np.pi


def wrap(x):
    """Map angles to ``[-pi, pi)``; works on numpy arrays and torch tensors alike."""
    r = (x + np.pi) % TWO_PI - np.pi
    # (x + pi) % 2 pi can round up to exactly 2 pi for x just below -pi.
    return r - TWO_PI * (r >= np.pi)


def _image_offsets(n_images: int) -> np.ndarray:
    return TWO_PI * np.arange(-n_images, n_images + 1, dtype=np.float64)


def log_wrapped_normal(x, sigma, n_images: int = 10) -> np.ndarray:
    """Log-density of the one-dimensional wrapped normal ``WN(0, sigma^2)`` on ``[-pi, pi)``.

    Parameters
    ----------
    x : array, radians
        Any shape; applied elementwise.
    sigma : float or array broadcastable to ``x``, radians
    n_images : int
        Periodic images ``-n_images .. n_images`` are summed.

    Returns
    -------
    array of ``log p(x)`` with the shape of ``broadcast(x, sigma)``; ``p`` integrates to one
    over ``[-pi, pi)``.
    """
    x = np.asarray(x, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    x, sigma = np.broadcast_arrays(wrap(x), sigma)
    d = x[..., None] + _image_offsets(n_images)
    s = sigma[..., None]
    log_terms = -0.5 * (d / s) ** 2
    return logsumexp(log_terms, axis=-1) - np.log(sigma) - 0.5 * np.log(TWO_PI)


def wrapped_normal_score(x, sigma, n_images: int = 10) -> np.ndarray:
    """``d/dx log p(x)`` of the wrapped normal ``WN(0, sigma^2)``, elementwise.

    Computed as a softmax-weighted average of the Gaussian scores of the images, which is
    exact up to the truncation of the image sum and stable for small and large ``sigma``.
    """
    x = np.asarray(x, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    x, sigma = np.broadcast_arrays(wrap(x), sigma)
    d = x[..., None] + _image_offsets(n_images)
    s2 = (sigma**2)[..., None]
    log_terms = -0.5 * d**2 / s2
    w = np.exp(log_terms - log_terms.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.sum(w * (-d / s2), axis=-1)


def wrapped_normal_score_torch(x, sigma, n_images: int = 10):
    """Torch version of :func:`wrapped_normal_score` (same maths), used in the training loop.

    ``x`` and ``sigma`` are broadcastable tensors; the result has their broadcast shape.
    """
    import torch

    offsets = torch.as_tensor(_image_offsets(n_images), dtype=x.dtype, device=x.device)
    x = wrap(x)
    d = x.unsqueeze(-1) + offsets
    s2 = (sigma**2).unsqueeze(-1)
    w = torch.softmax(-0.5 * d**2 / s2, dim=-1)
    return torch.sum(w * (-d / s2), dim=-1)


def _score_norm_quadrature(sigma: float, n_grid: int = 1024, n_images: int = 10) -> float:
    # Periodic rectangle rule: exponentially accurate for smooth periodic integrands once the
    # grid resolves sigma (2 pi / 1024 = 0.006 rad vs sigma >= 0.01 pi = 0.031 rad); agrees
    # with an 8192-point grid to 1e-15 over the whole sigma range.
    x = -np.pi + TWO_PI * np.arange(n_grid) / n_grid
    logp = log_wrapped_normal(x, sigma, n_images)
    s = wrapped_normal_score(x, sigma, n_images)
    return float(np.sum(np.exp(logp) * s**2) * TWO_PI / n_grid)


@functools.lru_cache(maxsize=8)
def score_norm_table(sigma_min: float, sigma_max: float, n_sigma: int = 128):
    """Tabulated ``(log_sigma, log_norm)`` with ``norm = E[s^2]`` on a grid geometric in sigma.

    The table is deterministic and cached per ``(sigma_min, sigma_max, n_sigma)``.
    """
    log_sigma = np.linspace(np.log(sigma_min), np.log(sigma_max), n_sigma)
    norms = np.array([_score_norm_quadrature(float(np.exp(ls))) for ls in log_sigma])
    log_norm = np.log(norms)
    log_sigma.setflags(write=False)
    log_norm.setflags(write=False)
    return log_sigma, log_norm


def score_norm(sigma, sigma_min: float = 0.01 * np.pi, sigma_max: float = np.pi) -> np.ndarray:
    """``E[s(x)^2]`` of the one-dimensional wrapped normal at ``sigma`` (interpolated table).

    ``sigma`` must lie in ``[sigma_min, sigma_max]``; tends to ``1 / sigma^2`` for small sigma
    and to zero as the wrapped normal approaches the uniform distribution.
    """
    log_sigma, log_norm = score_norm_table(float(sigma_min), float(sigma_max))
    return np.exp(np.interp(np.log(np.asarray(sigma, dtype=np.float64)), log_sigma, log_norm))
