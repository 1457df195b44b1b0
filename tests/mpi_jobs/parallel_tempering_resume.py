"""MPI job of tests/test_mpi.py: parallel tempering of alanine dipeptide with the shipped torsion-diffusion
model, killed and resumed from storage.

Run: mpiexec -n 2 python tests/mpi_jobs/parallel_tempering_resume.py STORAGE N_ITERATIONS [--resume]

Without --resume it creates the storage and prints ``ITERATION k`` (rank 0) after each iteration, for the
test to SIGKILL the job mid-run. With --resume it restores the sampler from storage on every rank, runs
to N_ITERATIONS and prints ``RESULT {json}``: the iteration it resumed at, the learned-move statistics of
each state as every rank holds them, and how many times each rank loaded the model.
"""

import contextlib
import io
import json
import os
import sys

from openmm import unit
from openmmtools import mcmc, multistate

from openmm_confsample.models import TorsionDiffusionModel, shipped_model_path
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.parallel import configure_rank, get_comm
from openmm_confsample.parallel.replica import MPIParallelTemperingSampler, learned_move_statistics
from openmm_confsample.systems import get_system

LOADS = []
_load = TorsionDiffusionModel.load.__func__


def _counted_load(cls, *args, **kwargs):
    LOADS.append(args[0] if args else kwargs.get("path"))
    return _load(cls, *args, **kwargs)


TorsionDiffusionModel.load = classmethod(_counted_load)


def main(storage, n_iterations, resume):
    config = configure_rank(seed=3)
    comm = get_comm()
    pids = comm.gather(os.getpid(), root=0) if comm else [os.getpid()]
    if config.rank == 0:  # for the test to SIGKILL every rank (hydra starts each in a session of its own)
        print("PIDS " + " ".join(map(str, pids)), flush=True)
    with contextlib.redirect_stdout(io.StringIO()):  # citations
        if resume:
            sampler = MPIParallelTemperingSampler.from_storage(storage)
        else:
            ala = get_system("alanine-dipeptide-implicit")
            move = TorsionDiffusionMove(shipped_model_path(), ala, n_proposals=2, buffer_size=16, seed=5)
            dynamics = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, n_steps=50,
                                                 reassign_velocities=True)
            sampler = MPIParallelTemperingSampler(mcmc_moves=mcmc.SequenceMove([dynamics, move]),
                                                  number_of_iterations=n_iterations, online_analysis_interval=None,
                                                  replica_mixing_scheme="swap-neighbors")  # no numba compile
            reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
            sampler.create(ala.thermodynamic_state(), ala.sampler_state(), reporter,
                           min_temperature=300 * unit.kelvin, max_temperature=450 * unit.kelvin, n_temperatures=4)
    sampler.energy_context_cache = config.context_cache("Reference")
    sampler.sampler_context_cache = config.context_cache("Reference")
    resumed_at = sampler.iteration
    statistics_at_resume = learned_move_statistics(sampler)
    with contextlib.redirect_stdout(io.StringIO()):
        while not sampler.is_completed:
            sampler.run(n_iterations=1)
            if config.rank == 0:
                sys.__stdout__.write(f"ITERATION {sampler.iteration}\n")
                sys.__stdout__.flush()
    gathered = comm.gather((learned_move_statistics(sampler), LOADS), root=0) if comm else [
        (learned_move_statistics(sampler), LOADS)]
    if config.rank == 0:
        print("RESULT " + json.dumps({
            "n_ranks": config.size, "resumed_at": resumed_at, "iteration": sampler.iteration,
            "n_proposed_at_resume": [s["n_proposed"] for s in statistics_at_resume],
            "n_proposed_by_rank": [[s["n_proposed"] for s in stats] for stats, _ in gathered],
            "model_loads_by_rank": [len(loads) for _, loads in gathered],
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv[3:])
