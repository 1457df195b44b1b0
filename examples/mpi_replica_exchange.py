"""Parallel tempering with a learned move, replicas spread over MPI ranks; rerun after a kill to resume.

Run:  mpiexec -n 2 python examples/mpi_replica_exchange.py            (about 1 min on 2 CPU cores)
      python examples/mpi_replica_exchange.py                         (the same on one process)
      srun python examples/mpi_replica_exchange.py --platform CUDA    (Slurm, one GPU per rank: docs/mpi.md)

Each rank runs its share of the 4 replicas (openmmtools' sampler through mpiplus); rank 0 writes the
storage. ``MPIParallelTemperingSampler`` is openmmtools' ``ParallelTemperingSampler`` with one random stream
per state and rank for the learned moves (see ``openmm_confsample.parallel.replica``). If the storage file
exists the run resumes from it (``from_storage``), e.g. after the job was killed, and goes on to
``--iterations`` in all.
"""

import argparse
import contextlib
import io
import os

import openmm_confsample  # noqa: F401  (first: it silences pymbar's import-time banner)
from openmm import unit
from openmmtools import mcmc, multistate

from openmm_confsample.models import shipped_model_path
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.parallel import configure_rank
from openmm_confsample.parallel.replica import MPIParallelTemperingSampler, learned_move_statistics
from openmm_confsample.systems import get_system

parser = argparse.ArgumentParser()
parser.add_argument("--storage", default="mpi_pt.nc", help="openmmtools storage; an existing one is resumed")
parser.add_argument("--iterations", type=int, default=20)
parser.add_argument("--platform", default=None, help="OpenMM platform (default: a GPU if present, else Reference)")
args = parser.parse_args()

# threads, GPU (by local rank) and the seed, set once per rank before anything creates a Context
config = configure_rank(seed=2026, platform=args.platform)
ala = get_system("alanine-dipeptide-implicit")

with contextlib.redirect_stdout(io.StringIO()):  # openmmtools prints citations
    if os.path.exists(args.storage):
        sampler = MPIParallelTemperingSampler.from_storage(args.storage)
    else:
        # every rank builds the same move; the model is loaded once per rank, by path. Each state's copy on each
        # rank pre-draws its own buffer of proposals: keep it near what a copy uses (here 4 per iteration).
        move = TorsionDiffusionMove(shipped_model_path(), ala, n_proposals=4, buffer_size=256, seed=config.seed)
        dynamics = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, n_steps=500, reassign_velocities=True)
        sampler = MPIParallelTemperingSampler(mcmc_moves=mcmc.SequenceMove([dynamics, move]),
                                              number_of_iterations=args.iterations)
        # checkpoint every iteration: openmmtools stores the moves (and their statistics) every iteration but
        # resumes at the last checkpoint, so a sparser checkpoint recounts the iterations since it
        reporter = multistate.MultiStateReporter(args.storage, checkpoint_interval=1)
        sampler.create(ala.thermodynamic_state(), ala.sampler_state(), reporter, min_temperature=300 * unit.kelvin,
                       max_temperature=450 * unit.kelvin, n_temperatures=4)
    sampler.energy_context_cache = config.context_cache("Reference")
    sampler.sampler_context_cache = config.context_cache("Reference")
    start = sampler.iteration
    if start < args.iterations:
        sampler.extend(args.iterations - start)  # run() would stop at the stored number_of_iterations

if config.rank == 0:  # statistics are the same on every rank (openmmtools gathers them each iteration)
    print(f"{config.size} rank(s), {config.n_threads} thread(s) each; iterations {start} -> {sampler.iteration}")
    for state, stats in enumerate(learned_move_statistics(sampler)):
        print(f"state {state}: learned-move acceptance {stats['acceptance_rate']:.2f} of {stats['n_proposed']}")
