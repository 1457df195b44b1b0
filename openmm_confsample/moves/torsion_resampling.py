"""Resampling a set of torsions from any density over them: an exact independence move.

The density (any object with the calls of :class:`openmm_confsample.models.protocol.Density`: a torsion
diffusion model, a von Mises mixture, ...) proposes new values for the chosen torsions of the current
structure; the move sets them by rigid rotation and accepts with the independence-sampler rule

    min(1, exp(-(u' - u)) q(tau) / q(tau'))

No other factor enters: in bond-angle-torsion coordinates the Jacobian does not depend on the torsions,
and a rigid rotation of one side of a bond changes only its torsion (the exactness tests check this).

Proposals do not depend on the current state, so they and their log-densities are drawn in batches ahead
of time; only the current state's log-density is evaluated afresh, and not even that when the state is the
last accepted proposal. The batches grow geometrically, from 64 draws to ``buffer_size``: a first batch of
2048 draws cost a short run more than its moves did (issue 14: ``confsample sample`` for 20 ps, 40 moves,
spent 1.2 s on one buffer of 2048 torsion diffusion draws, 30 ms per proposal against the demo's 1 ms);
doubling keeps the draws made at most about twice those used. Draws are independent of the current state
and of each other whatever the batch size, so the move is exact with any schedule. A draw the density refuses comes with
log q = NaN and is rejected by the engine before any energy is computed; a current state where the
density is zero (log q = -inf) makes every move from it impossible (rejected and counted as such).
"""

from __future__ import annotations

import numpy as np

from ..checks import positive_int
from ..errors import ConfSampleError
from ..geometry.torsions import TorsionSet
from ..models.protocol import Density
from .engine import Proposal, ProposalBatch

__all__ = ["TorsionResamplingProposal"]

#: Draws of the first density call; each later call draws twice as many, up to ``buffer_size``.
_FIRST_BATCH = 64


class TorsionResamplingProposal(Proposal):
    """Independence proposal: a set of torsions set to draws from ``density``.

    Parameters
    ----------
    density : models.protocol.Density
        Over the ``k`` torsions of ``torsion_set``, in its order: ``sample_and_log_prob(n, generator)``
        returns ``(n, k)`` radians and ``(n,)`` natural-log densities, ``log_prob(x)`` the ``(n,)``
        log-densities of ``(n, k)`` radians.
    torsion_set : TorsionSet
        The torsions the angles are set on.
    buffer_size : int, default 2048
        Largest number of proposals drawn (with their log-densities) per density call; the first call draws
        ``min(64, buffer_size)`` and each later one twice as many as the one before, up to this.

    Examples
    --------
    >>> from openmm_confsample.testing import four_atom_torsion_system
    >>> from openmm_confsample.geometry.torsions import TorsionSet
    >>> from openmm_confsample.moves import MetropolisHastingsEngine
    >>> chain = four_atom_torsion_system()
    >>> torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)
    >>> proposal = TorsionResamplingProposal(my_density, torsions)  # doctest: +SKIP
    >>> engine = MetropolisHastingsEngine(proposal, seed=1)  # doctest: +SKIP
    """

    cartesian = False

    def __init__(self, density, torsion_set: TorsionSet, buffer_size: int = 2048):
        if not isinstance(density, Density):
            raise ConfSampleError(
                f"density must have sample, log_prob and sample_and_log_prob (models.protocol.Density), "
                f"got {type(density).__name__}."
            )
        n_torsions = getattr(density, "n_torsions", None)
        if n_torsions is not None and n_torsions != len(torsion_set):
            raise ConfSampleError(
                f"the density samples {n_torsions} torsions but the torsion set has {len(torsion_set)}."
            )
        self.density = density
        self.torsion_set = torsion_set
        self.buffer_size = positive_int(buffer_size, "buffer_size")
        self._next_batch = min(_FIRST_BATCH, self.buffer_size)
        self._angles = np.empty((0, len(torsion_set)))
        self._log_q = np.empty(0)
        self._cursor = 0
        self._last_angles = None
        self._last_log_q = None
        self.n_density_evaluations = 0

    def _sample(self, n: int, generator):
        """``n`` draws and their log q from the density (a subclass may pass options here)."""
        return self.density.sample_and_log_prob(n, generator=generator)

    def _draw(self, n: int, rng: np.random.Generator):
        if self._cursor + n > len(self._log_q):
            size = max(self._next_batch, n)
            self._next_batch = min(2 * self._next_batch, self.buffer_size)
            # a child seed, not the engine's generator: the engine's stream stays independent of the buffer size
            fresh_angles, fresh_log_q = self._sample(size, int(rng.integers(2**63)))
            fresh_angles = np.asarray(fresh_angles, dtype=np.float64)
            fresh_log_q = np.asarray(fresh_log_q, dtype=np.float64)
            if fresh_angles.shape != (size, len(self.torsion_set)) or fresh_log_q.shape != (size,):
                raise ConfSampleError(
                    f"{type(self.density).__name__}.sample_and_log_prob({size}) returned shapes {fresh_angles.shape} "
                    f"and {fresh_log_q.shape}, not ({size}, {len(self.torsion_set)}) and ({size},)."
                )
            self._angles = np.concatenate([self._angles[self._cursor:], fresh_angles])
            self._log_q = np.concatenate([self._log_q[self._cursor:], fresh_log_q])
            self._cursor = 0
        angles = self._angles[self._cursor:self._cursor + n]
        log_q = self._log_q[self._cursor:self._cursor + n]
        self._cursor += n
        return angles, log_q

    def current_log_density(self, angles: np.ndarray) -> float:
        """log q of the current torsions; reuses the last accepted proposal's value when they are the same."""
        if self._last_angles is not None and np.allclose(angles, self._last_angles, rtol=0.0, atol=1e-9):
            return self._last_log_q
        self.n_density_evaluations += 1
        log_q = float(np.asarray(self.density.log_prob(angles[None]), dtype=np.float64).reshape(-1)[0])
        self._last_angles, self._last_log_q = angles.copy(), log_q
        return log_q

    def sample_torsions(self, n: int, rng: np.random.Generator):
        """``n`` draws of the torsions, (n, k) radians, and their (n,) log q (NaN where the density refused one)."""
        angles, log_q = self._draw(n, rng)
        return angles.copy(), log_q.copy()

    def log_density(self, angles) -> np.ndarray:
        """log q of (n, k) torsion angles in radians."""
        self.n_density_evaluations += 1
        return np.asarray(self.density.log_prob(np.asarray(angles, dtype=np.float64)), dtype=np.float64).reshape(-1)

    def propose(self, positions_nm, n_proposals, rng):
        current = self.torsion_set.values(positions_nm)
        log_q_current = self.current_log_density(current)
        angles, log_q = self._draw(n_proposals, rng)
        batch = np.broadcast_to(positions_nm, (n_proposals,) + positions_nm.shape)
        positions = self.torsion_set.set_values(batch, angles)
        # a refused draw has log_q = nan: the engine rejects it as non-finite, before any energy
        return ProposalBatch(positions, log_q_current - log_q, info={"angles": angles, "log_q": log_q})

    def accepted(self, batch, index):
        self._last_angles = self.torsion_set.values(batch.positions[index])
        self._last_log_q = float(batch.info["log_q"][index])
