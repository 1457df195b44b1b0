"""Exactness of the MH engine against closed-form marginals, with negative controls that must fail."""

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import TorsionSet, dihedral_angles
from openmm_confsample.moves.engine import MetropolisHastingsEngine, Proposal, ProposalBatch
from openmm_confsample.moves.proposals import GaussianDisplacementProposal, VonMisesTorsionProposal
from openmm_confsample.testing import (WithoutHastings, chi_square_test, double_well_bin_probabilities,
                                       double_well_system, four_atom_torsion_system, run_chain,
                                       torsion_bin_probabilities)

# A correct sampler passes at p > 1e-3 (fails by chance 1 time in 1000; the seeds are fixed, so the
# outcome is deterministic). A negative control must reach p < 1e-6.
PASS_P, FAIL_P = 1e-3, 1e-6

TORSION_EDGES = np.linspace(-np.pi, np.pi, 13)
X_EDGES = np.linspace(-0.2, 0.2, 11)


@pytest.fixture(scope="module")
def chain():
    molsys = four_atom_torsion_system()
    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array)
    return molsys, torsion_set, torsion_bin_probabilities(TORSION_EDGES)


def _phi(molsys):
    return lambda x: dihedral_angles(x, molsys.torsion_array)[0]


@pytest.mark.parametrize("mode, kappa, mu, md_steps, n_proposals", [
    ("independent", 1.0, 1.0, 0, 1),        # moves alone, a deliberately poor independence proposal
    ("independent", 1.0, 1.0, 10, 1),       # mixed with Langevin dynamics
    ("random_walk", 1.0, 0.8, 10, 1),       # asymmetric jump with drift, mixed with MD
    ("independent", 1.0, 1.0, 0, 4),        # batched: 4 MH steps per model call
    ("random_walk", 1.0, 0.8, 0, 4),        # batched state-dependent proposal: re-proposed after acceptance
])
def test_torsion_moves_reproduce_exact_marginal(chain, mode, kappa, mu, md_steps, n_proposals):
    molsys, torsion_set, probabilities = chain
    proposal = VonMisesTorsionProposal(torsion_set, kappa=kappa, mu=mu, mode=mode)
    engine = MetropolisHastingsEngine(proposal, n_proposals=n_proposals, seed=11)
    result = run_chain(molsys, engine, 15000, _phi(molsys), md_steps=md_steps, seed=5)
    test = chi_square_test(result.observable, TORSION_EDGES, probabilities)
    assert test.n_effective > 100
    assert test.p_value > PASS_P, test
    assert 0.05 < result.statistics["acceptance_rate"] < 0.95


@pytest.mark.parametrize("mode, mu, md_steps", [("independent", 1.0, 0), ("random_walk", 0.8, 10)])
def test_negative_control_without_hastings_fails(chain, mode, mu, md_steps):
    molsys, torsion_set, probabilities = chain
    proposal = WithoutHastings(VonMisesTorsionProposal(torsion_set, kappa=1.0, mu=mu, mode=mode))
    result = run_chain(molsys, MetropolisHastingsEngine(proposal, seed=11), 15000, _phi(molsys), md_steps=md_steps,
                       seed=5)
    assert chi_square_test(result.observable, TORSION_EDGES, probabilities).p_value < FAIL_P


@pytest.mark.parametrize("md_steps", [0, 10])
def test_cartesian_asymmetric_proposal_on_double_well(md_steps):
    molsys = double_well_system()
    probabilities = double_well_bin_probabilities(X_EDGES)
    proposal = GaussianDisplacementProposal(0.05, drift_nm=(0.03, 0.0, 0.0))
    result = run_chain(molsys, MetropolisHastingsEngine(proposal, seed=2), 15000, lambda x: x[0, 0],
                       md_steps=md_steps, seed=3)
    assert chi_square_test(result.observable, X_EDGES, probabilities).p_value > PASS_P
    control = run_chain(molsys, MetropolisHastingsEngine(WithoutHastings(proposal), seed=2), 15000,
                        lambda x: x[0, 0], md_steps=md_steps, seed=3)
    assert chi_square_test(control.observable, X_EDGES, probabilities).p_value < FAIL_P


def test_langevin_alone_matches_marginal_so_the_harness_is_sound(chain):
    molsys, _, probabilities = chain
    result = run_chain(molsys, None, 6000, _phi(molsys), md_steps=50, seed=9)
    assert chi_square_test(result.observable, TORSION_EDGES, probabilities).p_value > PASS_P


class _Broken(Proposal):
    """Returns NaN coordinates, then NaN corrections, then a finite candidate."""

    cartesian = False

    def propose(self, positions_nm, n_proposals, rng):
        batch = np.repeat(positions_nm[None], 3, axis=0)
        batch[0, 0, 0] = np.nan
        batch[2, 3] += 0.01
        return ProposalBatch(batch, np.array([0.0, np.nan, 0.0]))


def test_a_blown_up_start_is_refused_in_one_sentence():
    """NaN positions in the Context (a simulation that blew up before the move) or passed in: a ConfSampleError
    that says so, not an error from inside the proposal; nothing is counted as a move."""
    molsys = four_atom_torsion_system()
    engine = MetropolisHastingsEngine(VonMisesTorsionProposal(TorsionSet(molsys.bonds, molsys.n_atoms,
                                                                         [molsys.torsions["phi"]]), 2.0), seed=0)
    context = molsys.create_context()
    broken = molsys.positions_nm.copy()
    broken[3] = np.nan
    context.setPositions(broken)
    with pytest.raises(ConfSampleError, match="not finite"):
        engine.step(context, molsys.kT)
    context.setPositions(molsys.positions_nm)
    with pytest.raises(ConfSampleError, match="not finite"):
        engine.step(context, molsys.kT, broken, 0.0)
    with pytest.raises(ConfSampleError, match="potential energy of nan"):
        engine.step(context, molsys.kT, molsys.positions_nm, float("nan"))
    assert engine.statistics["n_moves"] == 0
    assert engine.step(context, molsys.kT).n_tried == 1


def test_nonfinite_proposals_are_rejected_and_counted():
    molsys = four_atom_torsion_system()
    context = molsys.create_context()
    engine = MetropolisHastingsEngine(_Broken(), n_proposals=3, seed=0)
    before = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    result = engine.step(context, molsys.kT)
    stats = engine.statistics
    assert stats["n_nonfinite"] == 2 and stats["n_proposed"] == result.n_tried
    after = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(after, result.positions_nm)
    assert np.all(np.isfinite(after))
    if not result.accepted:
        np.testing.assert_allclose(after, before)


def test_energy_overflow_is_rejected_and_state_kept():
    molsys = four_atom_torsion_system()
    context = molsys.create_context()
    before = context.getState(getPositions=True, getEnergy=True)

    class Collapse(Proposal):
        def propose(self, positions_nm, n_proposals, rng):
            return ProposalBatch(np.zeros((1,) + positions_nm.shape), np.zeros(1))  # all atoms on one point

    engine = MetropolisHastingsEngine(Collapse(), seed=0)
    result = engine.step(context, molsys.kT)
    assert not result.accepted
    after = context.getState(getPositions=True, getEnergy=True)
    np.testing.assert_allclose(after.getPositions(asNumpy=True)._value, before.getPositions(asNumpy=True)._value)
    assert after.getPotentialEnergy() == before.getPotentialEnergy()


def test_statistics_reset_and_setter(chain):
    molsys, torsion_set, _ = chain
    engine = MetropolisHastingsEngine(VonMisesTorsionProposal(torsion_set, kappa=1.0), seed=0)
    context = molsys.create_context()
    for _ in range(20):
        engine.step(context, molsys.kT)
    stats = engine.statistics
    assert stats["n_proposed"] == 20 and stats["n_moves"] == 20
    assert stats["acceptance_rate"] == pytest.approx(stats["n_accepted"] / 20)
    assert stats["seconds_per_proposal"] > 0
    engine.reset_statistics()
    assert engine.statistics["n_proposed"] == 0
    engine.statistics = stats
    assert engine.statistics["n_accepted"] == stats["n_accepted"]


def test_cartesian_proposal_refused_on_constrained_system():
    molsys = four_atom_torsion_system(constrain_bonds=True)
    engine = MetropolisHastingsEngine(GaussianDisplacementProposal(0.01), seed=0)
    with pytest.raises(ConfSampleError, match="cannot keep the system's 3 constraints"):
        engine.step(molsys.create_context(), molsys.kT)
    # torsion rotations keep bond lengths, so they are allowed and keep the constraints satisfied
    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array)
    context = molsys.create_context()
    engine = MetropolisHastingsEngine(VonMisesTorsionProposal(torsion_set, kappa=0.0), seed=0)
    for _ in range(10):
        x = engine.step(context, molsys.kT).positions_nm
    np.testing.assert_allclose(np.linalg.norm(np.diff(x, axis=0), axis=1), 0.153, atol=1e-6)


def test_constructor_checks():
    with pytest.raises(ConfSampleError, match="n_proposals"):
        MetropolisHastingsEngine(GaussianDisplacementProposal(0.01), n_proposals=0)
    with pytest.raises(ConfSampleError, match="Proposal"):
        MetropolisHastingsEngine(object())
    with pytest.raises(ConfSampleError, match="sigma_nm"):
        GaussianDisplacementProposal(-1.0)
