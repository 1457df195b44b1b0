"""TimewarpMove: exact MH in the augmented space whatever the flow's weights (random, trained)."""

import numpy as np
import pytest
import torch

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.models.timewarp import TimewarpConfig, TimewarpModel, TimewarpTrainer
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.timewarp import TimewarpMove, TimewarpProposal
from openmm_confsample.testing import (WithoutHastings, chi_square_test, double_well_bin_probabilities,
                                       double_well_system, four_atom_torsion_system, run_chain)

EDGES = np.linspace(-0.2, 0.2, 11)
SMALL = TimewarpConfig(n_coupling_layers=2, hidden_dim=16, embedding_dim=8, n_attention_layers=1)


@pytest.fixture(scope="module")
def well():
    return double_well_system()


def _x(positions):
    return positions[0, 0]


@pytest.fixture(scope="module")
def random_flow(well):
    """An untrained flow with randomly perturbed weights: an arbitrary, strongly asymmetric proposal."""
    torch.manual_seed(0)
    model = TimewarpModel(well.atom_labels, SMALL, metadata={"topology_fingerprint": well.fingerprint()})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.log_sigma_x.fill_(np.log(0.4))  # 0.04 nm steps: the wells are 0.2 nm apart
    return model


def test_random_flow_move_is_exact_and_control_fails(well, random_flow):
    move = TimewarpMove(random_flow, well, n_proposals=4, seed=1)  # moves alone, batched
    result = run_chain(well, move, 5000, _x, seed=1)
    probabilities = double_well_bin_probabilities(EDGES)
    test = chi_square_test(result.observable, EDGES, probabilities)
    assert test.p_value > 1e-3, test
    assert 0.05 < result.statistics["acceptance_rate"] < 0.95
    control = run_chain(well, MetropolisHastingsEngine(WithoutHastings(move.proposal), n_proposals=4, seed=1), 5000,
                        _x, seed=1)
    assert chi_square_test(control.observable, EDGES, probabilities).p_value < 1e-6


@pytest.mark.slow
def test_trained_flow_move_is_exact(well):
    md = run_chain(well, None, 3000, lambda x: x.copy(), md_steps=250, seed=4)  # 0.25 ps apart
    frames = md.observable.astype(np.float32)
    trainer = TimewarpTrainer(SMALL, seed=0, progress=False)
    trainer.fit_likelihood(frames[:-2], frames[2:], well.atom_labels, epochs=3, batch_size=64,
                           topology_fingerprint=well.fingerprint())
    model = trainer.fetch_model()
    assert trainer.history["train_nll"][-1] < trainer.history["train_nll"][0]
    move = TimewarpMove(model, well, n_proposals=2, seed=3)
    result = run_chain(well, move, 6000, _x, md_steps=5, seed=5)
    test = chi_square_test(result.observable, EDGES, double_well_bin_probabilities(EDGES))
    assert test.p_value > 1e-3, test


def test_timewarp_refuses_constraints_and_other_systems(random_flow):
    constrained = four_atom_torsion_system(constrain_bonds=True)
    other = TimewarpModel(constrained.atom_labels, SMALL)
    with pytest.raises(ConfSampleError, match="constraints"):
        TimewarpProposal(other, constrained)
    with pytest.raises(ConfSampleError, match="1 atoms"):
        TimewarpProposal(random_flow, four_atom_torsion_system())


def test_exploration_mode_is_labelled_biased(well, random_flow):
    move = TimewarpMove(random_flow, well, seed=0, exploration_threshold_kT=2.0)
    run_chain(well, move, 50, _x)
    assert move.statistics["exact"] is False
    assert TimewarpMove(random_flow, well, seed=0).statistics["exact"] is True


@pytest.mark.slow
def test_internal_coordinate_flow_move_is_exact_and_control_fails():
    """A random flow in internal coordinates (pose kept, J(q) in the density) samples the torsion marginal."""
    from openmm_confsample.models.timewarp import zmatrix_for
    from openmm_confsample.testing import four_atom_torsion_system, torsion_bin_probabilities

    chain = four_atom_torsion_system()
    torch.manual_seed(1)
    config = TimewarpConfig(n_coupling_layers=2, hidden_dim=16, embedding_dim=8, coordinates="internal",
                            zmatrix=zmatrix_for(chain.atom_labels, topology=chain.topology))
    model = TimewarpModel(chain.atom_labels, config, metadata={"topology_fingerprint": chain.fingerprint()})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.ic_log_sd.copy_(torch.log(torch.tensor([0.004, 0.08, 1.2])).repeat(4, 1))
        # Torsion proposals drawn around 2 rad whatever the state: strongly asymmetric, so dropping the Hastings term must show.
        model.ic_coef[:, 2] = 0.0
        model.ic_mean[:, 2] = 2.0
        # Correlated baseline noise, as the trainer fits it.
        model.ic_chol.copy_(torch.eye(6) + torch.tril(0.3 * torch.randn(6, 6), -1))
    edges = np.linspace(-np.pi, np.pi, 7)

    def phi(positions):
        from openmm_confsample.geometry.torsions import dihedral_angles

        return float(np.ravel(dihedral_angles(positions, [[0, 1, 2, 3]]))[0])

    move = TimewarpMove(model, chain, n_proposals=4, seed=2)
    result = run_chain(chain, move, 4000, phi, seed=2)
    probabilities = torsion_bin_probabilities(edges)
    assert chi_square_test(result.observable, edges, probabilities).p_value > 1e-3
    assert 0.05 < result.statistics["acceptance_rate"] < 0.95
    # 12,000 steps: at 8,000 the control reached only p = 2.1e-6 on this machine's torch/numpy (2026-12-02,
    # the same on the code of the previous release), too close to the 1e-6 bar to prove the test can fail.
    control = run_chain(chain, MetropolisHastingsEngine(WithoutHastings(move.proposal), n_proposals=4, seed=2), 12000,
                        phi, seed=2)
    assert chi_square_test(control.observable, edges, probabilities).p_value < 1e-6
