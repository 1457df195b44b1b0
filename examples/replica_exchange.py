"""Learned moves inside replica exchange: openmmtools ParallelTemperingSampler (with storage) and
OpenMM's own ReplicaExchangeSampler (OpenMM >= 8.6).

Run:  python examples/replica_exchange.py        (about 40 s on 2 CPU cores)
"""

import os
import tempfile

import openmm_confsample  # noqa: F401  (first: it silences pymbar's import-time banner)
import openmm
import openmm.app as app
from openmm import unit
from openmmtools import cache, mcmc, multistate

from openmm_confsample.models import shipped_model_path
from openmm_confsample.moves.replica import LearnedMoveReplicaExchangeSampler
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.parallel.replica import MPIParallelTemperingSampler
from openmm_confsample.systems import get_system

ala = get_system("alanine-dipeptide-implicit")
reference = openmm.Platform.getPlatformByName("Reference")
move = TorsionDiffusionMove(shipped_model_path(), ala, n_proposals=4, seed=2)

# 1. openmmtools: the learned move is part of each replica's mcmc_moves; storage keeps its statistics.
moves = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, n_steps=200), move])
# MPIParallelTemperingSampler: openmmtools' sampler, with each replica's learned move on its own random stream
# (openmmtools copies the move per replica, random generator included); runs as one process or under mpiexec.
sampler = MPIParallelTemperingSampler(mcmc_moves=moves, number_of_iterations=10)
storage = os.path.join(tempfile.mkdtemp(), "pt.nc")
reporter = multistate.MultiStateReporter(storage, checkpoint_interval=5)
sampler.create(ala.thermodynamic_state(), ala.sampler_state(), reporter, min_temperature=300 * unit.kelvin,
               max_temperature=550 * unit.kelvin, n_temperatures=4)
sampler.energy_context_cache = cache.ContextCache(platform=reference)
sampler.sampler_context_cache = cache.ContextCache(platform=reference)
sampler.run()
for state, replica_moves in enumerate(sampler._mcmc_moves):
    stats = replica_moves.move_list[1].statistics
    print(f"openmmtools PT state {state}: acceptance {stats['acceptance_rate']:.2f} of {stats['n_proposed']}")
reporter.close()

# 2. OpenMM's native sampler: the move runs after each replica's MD, before exchanges are computed.
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
simulation = app.Simulation(ala.topology, ala.system, integrator, reference)
simulation.context.setPositions(ala.positions_nm)
states = [{"temperature": t * unit.kelvin} for t in (300, 370, 450, 550)]
native = LearnedMoveReplicaExchangeSampler(states, simulation, 200, move, movesPerIteration=2)
native.simulate(10)
for state, stats in enumerate(native.statistics):
    print(f"native RE state {state}: acceptance {stats['acceptance_rate']:.2f} of {stats['n_proposed']}")
