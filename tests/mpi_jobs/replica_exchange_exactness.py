"""MPI job of tests/test_mpi.py: replica exchange with a learned move on the closed-form 4-atom chain.

Run: mpiexec -n 2 python tests/mpi_jobs/replica_exchange_exactness.py OUT_DIR N_ITERATIONS

States at 300, 300, 300 and 380 K exchange (MPIReplicaExchangeSampler); each replica runs 500 steps of
Langevin dynamics then 8 asymmetric von Mises torsion jumps (LearnedMCMCMove, Hastings term needed). Rank 0
prints one line ``RESULT {json}``: the 300 K states' torsions, the learned-move statistics as every rank
holds them, which ranks held the storage open, and how many random-stream states were used twice (also
for openmmtools' own sampler over a few iterations: the negative control of that count).
"""

import contextlib
import io
import json
import os
import sys
import time

import numpy as np
from openmm import unit
from openmmtools import mcmc, multistate

from openmm_confsample.geometry.torsions import TorsionSet, dihedral_angles
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.moves.proposals import VonMisesTorsionProposal
from openmm_confsample.parallel import configure_rank, get_comm
from openmm_confsample.parallel.replica import MPIReplicaExchangeSampler, learned_move_statistics
from openmm_confsample.testing import four_atom_torsion_system

TEMPERATURES_K = (300.0, 300.0, 300.0, 380.0)
STREAM_STATES = []  # (rank, PCG64 state) at every application of a learned move on this rank


def _recording_apply(apply):
    def recorded(self, thermodynamic_state, sampler_state, context_cache=None):
        STREAM_STATES.append(self.engine.rng.bit_generator.state["state"]["state"])
        return apply(self, thermodynamic_state, sampler_state, context_cache)
    return recorded


LearnedMCMCMove.apply = _recording_apply(LearnedMCMCMove.apply)


def make_sampler(sampler_class, chain, storage, n_iterations, config):
    torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)
    move = LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=2.0, mu=0.7, mode="random_walk"),
                           n_proposals=8, seed=7)
    dynamics = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=5.0 / unit.picosecond,
                                         n_steps=500, reassign_velocities=True)
    sampler = sampler_class(mcmc_moves=mcmc.SequenceMove([dynamics, move]), number_of_iterations=n_iterations,
                            online_analysis_interval=None)
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=10)
    states = [chain.thermodynamic_state(t) for t in TEMPERATURES_K]
    with contextlib.redirect_stdout(io.StringIO()):  # citations
        sampler.create(states, chain.sampler_state(), reporter)
    sampler.energy_context_cache = config.context_cache("Reference")
    sampler.sampler_context_cache = config.context_cache("Reference")
    return sampler, reporter


def reused_stream_states(comm) -> int:
    everything = [s for states in (comm.allgather(STREAM_STATES) if comm else [STREAM_STATES]) for s in states]
    return len(everything) - len(set(everything))


def main(out_dir, n_iterations):
    config = configure_rank(seed=11)
    comm = get_comm()
    chain = four_atom_torsion_system(mass_amu=4.0)
    np.random.seed(11)  # openmmtools mixes replicas with numpy's global generator (on rank 0)

    # negative control: openmmtools' own sampler replays streams across ranks
    control, control_reporter = make_sampler(multistate.ReplicaExchangeSampler, chain,
                                             os.path.join(out_dir, "control.nc"), 10, config)
    control.run()
    control_reporter.close()
    control_reused = reused_stream_states(comm)
    STREAM_STATES.clear()

    sampler, reporter = make_sampler(MPIReplicaExchangeSampler, chain, os.path.join(out_dir, "re.nc"),
                                     n_iterations, config)
    phi_by_state = {0: [], 1: [], 2: []}  # the 300 K states
    start = time.perf_counter()
    for _ in range(n_iterations):
        sampler.run(n_iterations=1)
        if config.rank == 0:  # rank 0 receives every replica's positions
            for replica, state in enumerate(sampler._replica_thermodynamic_states):
                if state in phi_by_state:
                    positions = sampler._sampler_states[replica].positions.value_in_unit(unit.nanometer)
                    phi_by_state[state].append(float(dihedral_angles(np.asarray(positions), chain.torsion_array)[0]))
    seconds_per_iteration = (time.perf_counter() - start) / n_iterations
    statistics = learned_move_statistics(sampler)
    storage_open = reporter.is_open()
    reporter.close()
    gathered = comm.gather((statistics, storage_open), root=0) if comm else [(statistics, storage_open)]
    reused = reused_stream_states(comm)
    if config.rank == 0:
        print("RESULT " + json.dumps({
            "n_ranks": config.size, "seconds_per_iteration": seconds_per_iteration, "n_threads": config.n_threads,
            "phi_300K": phi_by_state[0] + phi_by_state[1] + phi_by_state[2],
            "n_proposed_by_rank": [[s["n_proposed"] for s in stats] for stats, _ in gathered],
            "acceptance": [s["acceptance_rate"] for s in statistics],
            "storage_open_by_rank": [is_open for _, is_open in gathered],
            "reused_stream_states": reused, "control_reused_stream_states": control_reused,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
