"""Learned moves inside OpenMM's native replica exchange (``openmm.app.ReplicaExchangeSampler``, OpenMM >= 8.6).

:class:`LearnedMoveReplicaExchangeSampler` runs each replica's MD as usual, then applies the move at that
replica's current state, and stores the accepted conformation before the exchange energies are computed,
so exchanges see the state the move produced. (For openmmtools' ``ReplicaExchangeSampler`` and
``ParallelTemperingSampler``, put a ``LearnedMCMCMove`` in their ``mcmc_moves`` instead.)
"""

from __future__ import annotations

from openmm import unit

from ..errors import ConfSampleError
from ..units import kT_kJ_per_mol
from .engine import MetropolisHastingsEngine
from ..runner import as_engine, run_engine_steps

try:
    from openmm.app import ReplicaExchangeSampler as _NativeReplicaExchangeSampler
except ImportError:  # OpenMM < 8.6
    _NativeReplicaExchangeSampler = None


if _NativeReplicaExchangeSampler is not None:

    class LearnedMoveReplicaExchangeSampler(_NativeReplicaExchangeSampler):
        """OpenMM's ReplicaExchangeSampler with a learned move after each replica's MD segment.

        Parameters
        ----------
        states, simulation, stepsPerIteration, reinitializeVelocities
            As for ``openmm.app.ReplicaExchangeSampler``. States may vary temperature and context
            parameters; states that select force ``groups`` are refused (the move scores full energies).
        move : LearnedMCMCMove, MetropolisHastingsEngine or Proposal
            One engine per thermodynamic state, so ``statistics[i]`` is the move's record in state i; the
            proposal (and its model) is shared, so proposals must not assume the previous call's state.
        movesPerIteration : int, default 1
            MH steps after each replica's MD segment.

        Examples
        --------
        >>> states = [{"temperature": t * unit.kelvin} for t in (300, 360, 430, 520)]  # doctest: +SKIP
        >>> sampler = LearnedMoveReplicaExchangeSampler(states, simulation, 500, move)  # doctest: +SKIP
        >>> sampler.simulate(100)  # doctest: +SKIP
        """

        def __init__(self, states, simulation, stepsPerIteration, move, movesPerIteration: int = 1,
                     reinitializeVelocities: bool = False):
            for i, state in enumerate(states):
                if "groups" in state:
                    raise ConfSampleError(
                        f"state {i} selects force groups; learned moves score the full potential energy, so "
                        "only temperature and context-parameter states are supported."
                    )
            super().__init__(states, simulation, stepsPerIteration, reinitializeVelocities)
            engine = as_engine(move)
            # One engine (statistics, random stream) per state; the proposal and its model are shared.
            self.engines = [MetropolisHastingsEngine(engine.proposal, engine.n_proposals, rng)
                            for rng in engine.rng.spawn(len(states))]
            self.movesPerIteration = int(movesPerIteration)

        @property
        def statistics(self) -> list[dict]:
            return [engine.statistics for engine in self.engines]

        def _state_kT(self, state_index: int) -> float:
            if self._kT is not None:
                return self._kT[state_index].value_in_unit(unit.kilojoule_per_mole)
            return kT_kJ_per_mol(self.simulation.integrator.getTemperature().value_in_unit(unit.kelvin))

        def simulateReplica(self, index: int, steps: int | None = None):
            super().simulateReplica(index, steps)
            state_index = self.replicaStateIndex[index]
            engine = self.engines[state_index]
            kT = self._state_kT(state_index)
            context = self.simulation.context
            accepted = run_engine_steps(context, engine, kT, self.movesPerIteration)
            if accepted:
                self.replicaConformation[index] = context.getState(positions=True, velocities=True, parameters=True,
                                                                   integratorParameters=True)
