"""MPI job of tests/test_mpi.py: independent walkers (Langevin MD + a learned move) on the closed-form chain.

Run: mpiexec -n 2 python tests/mpi_jobs/walkers_exactness.py OUT_DIR LENGTH_PS

Three walkers from one seed: walkers 0 and 1 run MD with an asymmetric von Mises torsion jump
(LearnedMCMCMove, Hastings term needed); walker 2's move raises at its 50th proposal, and the other walkers
must finish regardless. ``run_job`` is also imported by the test to run the same walkers on one process.
Rank 0 prints ``RESULT {json}`` (the summary's walkers and failures, the ranks' thread counts).
"""

import json
import sys

from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves.engine import Proposal
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.moves.proposals import VonMisesTorsionProposal
from openmm_confsample.parallel import get_comm, rank_config, run_walkers
from openmm_confsample.testing import four_atom_torsion_system

SEED = 5
N_WALKERS = 3
FAILING_WALKER = 2


class FailsAfter(Proposal):
    """The wrapped proposal, raising at its ``n``-th proposal: a walker that dies mid-run."""

    def __init__(self, proposal, n):
        self.proposal, self.n, self.cartesian = proposal, n, proposal.cartesian

    def propose(self, positions_nm, n_proposals, rng):
        self.n -= 1
        if self.n <= 0:
            raise RuntimeError("injected failure of walker 2's move")
        return self.proposal.propose(positions_nm, n_proposals, rng)

    def accepted(self, batch, index):
        self.proposal.accepted(batch, index)


def run_job(out_dir, length_ps):
    chain = four_atom_torsion_system(mass_amu=4.0)
    torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)

    def move_factory(walker, generator):
        proposal = VonMisesTorsionProposal(torsions, kappa=2.0, mu=0.7, mode="random_walk")
        if walker == FAILING_WALKER:
            proposal = FailsAfter(proposal, 50)
        return LearnedMCMCMove(proposal, seed=generator)

    return run_walkers(chain, move_factory, N_WALKERS, length_ps, out_dir, seed=SEED, segment_ps=0.02,
                       timestep_fs=1.0, friction_per_ps=5.0)


if __name__ == "__main__":
    result = run_job(sys.argv[1], float(sys.argv[2]))
    comm = get_comm()
    threads = comm.gather(rank_config().n_threads, root=0) if comm else [1]
    if comm is None or comm.rank == 0:
        summary = result.summary
        print("RESULT " + json.dumps({"n_ranks": summary["n_ranks"], "threads_by_rank": threads,
                                      "walkers": summary["walkers"], "failed": summary["failed"],
                                      "indicators": summary["indicators"]}), flush=True)
