"""openmmtools' replica exchange and parallel tempering under MPI, with learned moves in ``mcmc_moves``.

openmmtools keeps one copy of each thermodynamic state's move on every rank; each iteration, the rank
that holds a replica applies its copy of that replica's current state's move (``mpiplus.distribute``
gives replica i to rank ``i % size``), then ``_propagate_replicas`` allgathers every state's move
statistics and sets them on all ranks. So the statistics are right on every rank, not only rank 0's
(measured: 2 ranks, 4 states, 10 iterations of 2 proposals: ``n_proposed`` 20 per state, 80 in all, on
both ranks, as on one process), and :func:`learned_move_statistics` reads them locally.

The random streams are not, on one process already. openmmtools gives each state its own copy of the
moves with ``copy.deepcopy``; a ``SequenceMove`` (or ``WeightedMove``) deep-copies through its own
``__getstate__``, which serializes each move, so ``LearnedMCMCMove.__deepcopy__`` (a child stream per copy)
never runs and every state's copy restores the same generator state. Measured with ``seed=7``: the first
application in each of the 4 states started from the same stream state, on one process, and under
``mpiexec -n 2`` 21 of 40 applications repeated a stream state already used (another state's copy, or
the same state's copy on the other rank). States then draw the same proposals and uniforms at the same
iteration: each replica's own chain stays exact, but the replicas are coupled, the joint distribution the
exchanges assume (a product over states) is not kept, and a torsion-diffusion move proposes the same
pre-drawn angles in every state.

:class:`MPIReplicaExchangeSampler` and :class:`MPIParallelTemperingSampler` are openmmtools' samplers with
one change: before each propagation, every learned move copy not seen before gets a stream derived from
its current state, its thermodynamic state's index and the rank (:func:`distinct_streams`), so no two
copies anywhere share one. Storage (written by rank 0 only) holds rank 0's streams; on resume every copy
derives a fresh stream from them again, deterministically.

Everything else is openmmtools': storage is written by rank 0 only, the exchange is computed on rank 0
and broadcast, ``from_storage`` resumes. Models are loaded once per rank: a stored or deep-copied move
refers to its checkpoint by path, and :mod:`openmm_confsample.moves.model_cache` loads each path once per
process.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from openmmtools import multistate

from ..moves.engine import MetropolisHastingsEngine
from .diagnostics import sum_statistics
from .mpi import rank_and_size


def learned_moves(move):
    """The learned moves (anything with a MetropolisHastingsEngine ``engine``) in ``move``, nested
    ``SequenceMove`` and ``WeightedMove`` included, in order."""
    if isinstance(getattr(move, "engine", None), MetropolisHastingsEngine):
        yield move
    for sub in getattr(move, "move_list", ()):
        yield from learned_moves(sub)
    for sub, _ in getattr(move, "move_set", ()):
        yield from learned_moves(sub)


def _keyed_stream(rng: np.random.Generator, key: tuple[int, ...]) -> np.random.Generator:
    """A stream derived from ``rng``'s current state and ``key`` (deterministic; distinct for each key)."""
    state = json.dumps(rng.bit_generator.state, sort_keys=True, default=lambda value: np.asarray(value).tolist())
    entropy = int.from_bytes(hashlib.sha256(state.encode()).digest(), "little")
    return np.random.Generator(type(rng.bit_generator)(np.random.SeedSequence(entropy, spawn_key=key)))


def distinct_streams(moves_by_state, rank: int) -> int:
    """Give every learned move copy its own random stream, keyed by (rank, state index); returns how many changed.

    ``moves_by_state`` is a sampler's per-state moves (``_mcmc_moves``). Each engine is re-keyed once (it is
    marked), so calling this before every propagation costs a walk over the moves.
    """
    changed = 0
    for state_index, move in enumerate(moves_by_state):
        key = (int(rank), state_index)
        for learned in learned_moves(move):
            engine = learned.engine
            if getattr(engine, "_stream_key", None) != key:
                engine.rng = _keyed_stream(engine.rng, key)
                engine._stream_key = key
                changed += 1
    return changed


def learned_move_statistics(sampler) -> list[dict]:
    """Statistics of the learned moves of each thermodynamic state (summed over the moves in its
    ``SequenceMove``), as openmmtools keeps them on every rank; ``sum_statistics`` of the list is the total."""
    # openmmtools exposes only deep copies (``mcmc_moves``); the live per-state moves are ``_mcmc_moves``.
    return [sum_statistics(m.statistics for m in learned_moves(move)) for move in sampler._mcmc_moves]


class _DistinctStreams:
    """Mixin for openmmtools multistate samplers: one learned-move stream per state and rank (module docstring)."""

    def _propagate_replicas(self):
        distinct_streams(self._mcmc_moves, rank_and_size()[0])
        super()._propagate_replicas()


class MPIReplicaExchangeSampler(_DistinctStreams, multistate.ReplicaExchangeSampler):
    """openmmtools' ``ReplicaExchangeSampler`` whose learned moves draw one random stream per state and rank.

    Used exactly like openmmtools' sampler, with or without ``mpiexec``; see the module docstring.

    Examples
    --------
    >>> from openmmtools import mcmc
    >>> sampler = MPIReplicaExchangeSampler(mcmc_moves=mcmc.LangevinDynamicsMove(n_steps=10),
    ...                                     number_of_iterations=2)
    """


class MPIParallelTemperingSampler(_DistinctStreams, multistate.ParallelTemperingSampler):
    """openmmtools' ``ParallelTemperingSampler`` whose learned moves draw one random stream per state and rank.

    Used exactly like openmmtools' sampler (``create``, ``run``, ``from_storage``), with or without
    ``mpiexec``; see the module docstring and ``examples/mpi_replica_exchange.py``.
    """
