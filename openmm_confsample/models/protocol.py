"""The one call shape every generator exposes to the moves (zuko-style density protocol).

Unconditional densities (a torsion model over the torus)::

    x = model.sample(n, generator=rng)                     # (n, d) numpy
    log_q = model.log_prob(x)                               # (n,) numpy, natural log
    x, log_q = model.sample_and_log_prob(n, generator=rng)

Conditional densities (a Timewarp flow x(t+tau) | x(t)) take the condition first::

    y = model.sample(condition, n, generator=rng)
    log_q = model.log_prob(condition, y)
    y, log_q = model.sample_and_log_prob(condition, n, generator=rng)

One random-generator convention: ``generator`` is a ``numpy.random.Generator`` (the engine's), an int seed,
or None (fresh entropy). Models that draw with torch make a ``torch.Generator`` from it with
:func:`torch_generator`, so one numpy stream drives the whole chain and a seed reproduces it. Arrays
cross the protocol as numpy; tensor-level methods stay private to a model and its trainer.

A proposal is written once against these calls (``moves.proposals``), whatever model fills it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..checks import as_generator


@runtime_checkable
class Density(Protocol):
    """An unconditional density a proposal can sample from and evaluate exactly."""

    def sample(self, n: int, generator=None) -> np.ndarray: ...

    def log_prob(self, x) -> np.ndarray: ...

    def sample_and_log_prob(self, n: int, generator=None) -> tuple[np.ndarray, np.ndarray]: ...


@runtime_checkable
class ConditionalDensity(Protocol):
    """A density of ``y`` given a condition (first argument of every call)."""

    def sample(self, condition, n: int, generator=None): ...

    def log_prob(self, condition, y) -> np.ndarray: ...

    def sample_and_log_prob(self, condition, n: int, generator=None): ...


def torch_generator(generator=None):
    """A ``torch.Generator`` seeded from ``generator`` (numpy Generator, int seed or None), for torch models."""
    import torch

    rng = as_generator(generator, "generator")
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


__all__ = ["Density", "ConditionalDensity", "as_generator", "torch_generator"]
