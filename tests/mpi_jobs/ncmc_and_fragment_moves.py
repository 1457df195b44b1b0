"""MPI job of tests/test_mpi.py: the NCMC and fragment-local moves inside replica exchange under MPI.

Run: mpiexec -n 2 python tests/mpi_jobs/ncmc_and_fragment_moves.py OUT_DIR N_ITERATIONS

Two MPIReplicaExchangeSampler runs, 2 replicas at 300 and 330 K, storage written by rank 0:
(a) ``testing.coupled_torsion_system`` with Langevin dynamics then an ``NCMCMove`` (40-step protocol that
    softens the torsion-environment spring, a von Mises mixture jump at its midpoint);
(b) the seven-torsion ``testing.coupled_torsion_chain`` cut into three "residues", with Langevin dynamics then a
    fragment-local move (``FragmentProposal``, von Mises fragment density).
Rank 0 prints one line ``RESULT {json}``: per run the learned-move statistics as every rank holds them, the
iterations in storage, and whether the positions stayed finite.
"""

import contextlib
import io
import json
import os
import sys

import numpy as np
from openmm import unit
from openmmtools import mcmc, multistate

from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.models.fragments import VonMisesFragmentDensity, fragments_from_names
from openmm_confsample.moves.fragment import FragmentProposal
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.moves.ncmc import NCMCMove
from openmm_confsample.moves.ncmc_protocol import ParameterSoftening
from openmm_confsample.moves.proposals import VonMisesMixtureProposal
from openmm_confsample.parallel import configure_rank, get_comm
from openmm_confsample.parallel.replica import MPIReplicaExchangeSampler, learned_move_statistics
from openmm_confsample.testing import coupled_torsion_chain, coupled_torsion_system

TEMPERATURES_K = (300.0, 330.0)
GROUPS = [("R1", "ALA", {"phi": "t1", "psi": "t2", "chi1": "t3"}),
          ("R2", "SER", {"phi": "t4", "psi": "t5", "chi1": "t6"}),
          ("R3", "GLY", {"phi": "t7"})]


def ncmc_move(seed):
    molsys = coupled_torsion_system()
    torsions = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array, names=molsys.torsion_names)
    proposal = VonMisesMixtureProposal(torsions, [[np.pi / 3], [-np.pi / 3], [np.pi]], kappas=4.0,
                                       weights=[0.15, 0.15, 0.7])
    return molsys, NCMCMove(proposal, ParameterSoftening({"coupling_scale": 0.0}), ncmc_steps=40, seed=seed,
                            collision_rate_per_ps=10.0)


def fragment_move(seed):
    molsys = coupled_torsion_chain(7, mass_amu=4.0)
    fragments = fragments_from_names(molsys.torsions, GROUPS)
    proposal = FragmentProposal(molsys.bonds, molsys.n_atoms, fragments,
                                VonMisesFragmentDensity(kappa=1.0, mu=0.5, uniform_weight=0.3))
    return molsys, LearnedMCMCMove(proposal, n_proposals=2, seed=seed)


def run(make_move, storage, n_iterations, config):
    molsys, move = make_move(seed=5)
    dynamics = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=5.0 / unit.picosecond,
                                         n_steps=50)
    sampler = MPIReplicaExchangeSampler(mcmc_moves=mcmc.SequenceMove([dynamics, move]),
                                        number_of_iterations=n_iterations, online_analysis_interval=None)
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    with contextlib.redirect_stdout(io.StringIO()):  # citations
        sampler.create([molsys.thermodynamic_state(t) for t in TEMPERATURES_K], molsys.sampler_state(), reporter)
    sampler.energy_context_cache = config.context_cache("Reference")
    sampler.sampler_context_cache = config.context_cache("Reference")
    sampler.run()
    statistics = learned_move_statistics(sampler)
    finite = all(np.isfinite(s.positions.value_in_unit(unit.nanometer)).all() for s in sampler._sampler_states)
    reporter.close()
    stored = None
    if config.rank == 0:
        reader = multistate.MultiStateReporter(storage, open_mode="r")
        stored = int(reader.read_last_iteration())
        reader.close()
    return {"n_proposed": [s["n_proposed"] for s in statistics], "n_accepted": [s["n_accepted"] for s in statistics],
            "ncmc_protocols": [s.get("n_protocols", 0) for s in statistics], "finite": bool(finite),
            "stored_iterations": stored}


def main(out_dir, n_iterations):
    config = configure_rank(seed=3)
    comm = get_comm()
    np.random.seed(3)
    results = {"ncmc": run(ncmc_move, os.path.join(out_dir, "ncmc.nc"), n_iterations, config),
               "fragment": run(fragment_move, os.path.join(out_dir, "fragment.nc"), n_iterations, config)}
    gathered = comm.gather(results, root=0) if comm else [results]
    if config.rank == 0:
        print("RESULT " + json.dumps({"n_ranks": config.size, "by_rank": gathered}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
