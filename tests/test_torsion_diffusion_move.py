"""TorsionDiffusionMove: exact whatever the training (untrained and trained), in every adapter; the torsion-resampling
proposal it is made of, exact with any density of the protocol (here a von Mises mixture), refusals included."""

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
import yaml
from openmm import unit
from openmmtools import cache, mcmc
from scipy.special import i0e, logsumexp

from openmm_confsample.checks import as_generator, wrap_angle
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import TorsionSet, dihedral_angles
from openmm_confsample.models.torsion_diffusion import ScoreNetwork, TorsionDiffusionModel, TorsionDiffusionTrainer
from openmm_confsample.moves import model_cache
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.replica import LearnedMoveReplicaExchangeSampler
from openmm_confsample.moves.reporter import LearnedMoveReporter
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.moves.torsion_resampling import TorsionResamplingProposal
from openmm_confsample.testing import (WithoutHastings, chi_square_test, four_atom_torsion_system, run_chain,
                                       torsion_bin_probabilities)

EDGES = np.linspace(-np.pi, np.pi, 13)
REFERENCE = openmm.Platform.getPlatformByName("Reference")


@pytest.fixture(scope="module")
def chain():
    return four_atom_torsion_system()


def _metadata(molsys):
    return {"torsions": [(name, quad) for name, quad in molsys.torsions.items()],
            "topology_fingerprint": molsys.fingerprint()}


@pytest.fixture(scope="module")
def trained_on_wrong_place(chain):
    """A model trained on von Mises data centred at phi = 1.0 rad, far from where the chain's weight is."""
    rng = np.random.default_rng(0)
    angles = rng.vonmises(1.0, 3.0, size=(4000, 1))
    trainer = TorsionDiffusionTrainer(hidden=32, n_layers=2, max_epochs=15, seed=0, progress=False)
    return trainer.fit(angles, metadata=_metadata(chain)).fetch_model()


def _phi(molsys):
    return lambda x: dihedral_angles(x, molsys.torsion_array)[0]


def test_untrained_model_move_is_exact(chain):
    torch.manual_seed(0)
    model = TorsionDiffusionModel(ScoreNetwork(1, hidden=16, n_layers=2), n_steps=20, metadata=_metadata(chain))
    move = TorsionDiffusionMove(model, chain, n_proposals=2, seed=1)
    result = run_chain(chain, move, 5000, _phi(chain), md_steps=5)
    assert chi_square_test(result.observable, EDGES, torsion_bin_probabilities(EDGES)).p_value > 1e-3


def test_trained_model_move_is_exact_and_control_fails(chain, trained_on_wrong_place):
    model = trained_on_wrong_place
    assert np.mean(np.abs(model.sample(2000, generator=0) - 1.0) < 0.6) > 0.6  # it learned its (wrong) place
    move = TorsionDiffusionMove(model, chain, seed=2)
    result = run_chain(chain, move, 12000, _phi(chain))
    test = chi_square_test(result.observable, EDGES, torsion_bin_probabilities(EDGES))
    assert test.p_value > 1e-3, test
    # without MD the state only changes by accepted proposals, whose density is known: one evaluation in all
    assert move.proposal.n_density_evaluations == 1
    control = run_chain(chain, MetropolisHastingsEngine(WithoutHastings(move.proposal), seed=2), 12000, _phi(chain))
    assert chi_square_test(control.observable, EDGES, torsion_bin_probabilities(EDGES)).p_value < 1e-6


@pytest.fixture(scope="module")
def ala_model(tmp_path_factory, ala_implicit):
    rng = np.random.default_rng(1)
    centres = np.array([[-1.4, 2.6], [-1.3, -0.7], [1.0, 0.6]])
    which = rng.choice(3, size=3000, p=[0.6, 0.3, 0.1])
    angles = np.angle(np.exp(1j * rng.normal(centres[which], 0.3)))
    model = TorsionDiffusionTrainer(hidden=32, n_layers=2, max_epochs=5, progress=False).fit(
        angles, metadata=_metadata(ala_implicit)).fetch_model()
    path = tmp_path_factory.mktemp("model") / "ala.pt"
    model.save(path)
    return str(path)


def test_move_in_simulation_openmmtools_and_native_replica_exchange(ala_model, ala_implicit):
    move = TorsionDiffusionMove(ala_model, ala_implicit, n_proposals=4, seed=3)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    simulation = app.Simulation(ala_implicit.topology, ala_implicit.system, integrator, REFERENCE)
    simulation.context.setPositions(ala_implicit.positions_nm)
    simulation.reporters.append(LearnedMoveReporter(move, interval=50))
    simulation.step(2000)
    assert move.statistics["n_proposed"] == 40 * 4 and move.statistics["n_accepted"] > 0

    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=50, timestep=1 * unit.femtosecond), move])
    sampler = mcmc.MCMCSampler(ala_implicit.thermodynamic_state(), ala_implicit.sampler_state(), sequence)
    sampler.run(5, context_cache=cache.ContextCache(platform=REFERENCE))
    assert move.statistics["n_moves"] == 45

    states = [{"temperature": t * unit.kelvin} for t in (300, 400, 550)]
    native = LearnedMoveReplicaExchangeSampler(states, simulation, 50, move)
    native.simulate(3)
    assert [s["n_moves"] for s in native.statistics] == [3, 3, 3]


def test_serialized_move_reloads_through_the_cache(ala_model, ala_implicit):
    move = TorsionDiffusionMove(ala_model, ala_implicit, seed=0)
    text = yaml.safe_dump(move.__getstate__())
    restored = TorsionDiffusionMove.__new__(TorsionDiffusionMove)
    restored.__setstate__(yaml.safe_load(text))
    assert restored.proposal.model is move.proposal.model  # weights shared, not copied
    model_cache.clear()
    fresh = TorsionDiffusionMove.__new__(TorsionDiffusionMove)
    fresh.__setstate__(yaml.safe_load(text))  # loads the checkpoint from its path
    x = np.array([[-1.2, 2.0]])
    assert fresh.proposal.model.log_prob(x) == pytest.approx(move.proposal.model.log_prob(x), abs=1e-9)


def test_model_for_another_system_is_refused(ala_model, chain):
    with pytest.raises(ConfSampleError, match="trained on another topology"):
        TorsionDiffusionMove(ala_model, chain)
    with pytest.raises(ConfSampleError, match="does not exist"):
        TorsionDiffusionMove("/nonexistent/model.pt", chain)


# ---------------------------------------------------------------------------------------
# the generic torsion-resampling proposal, filled by a density that is not a diffusion model


class VonMisesMixtureDensity:
    """A mixture of products of von Mises distributions with the calls of models.protocol.Density."""

    def __init__(self, centres, kappas, weights):
        self.centres, self.kappas = np.atleast_2d(centres), np.atleast_2d(kappas)
        self.weights = np.asarray(weights, dtype=float) / np.sum(weights)

    def log_prob(self, x):
        x = np.asarray(x, dtype=float)[:, None, :]
        per_component = self.kappas * (np.cos(x - self.centres) - 1.0) - np.log(2.0 * np.pi * i0e(self.kappas))
        return logsumexp(per_component.sum(axis=-1) + np.log(self.weights), axis=-1)

    def sample(self, n, generator=None):
        rng = as_generator(generator, "generator")
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        return wrap_angle(rng.vonmises(self.centres[component], self.kappas[component]))

    def sample_and_log_prob(self, n, generator=None):
        x = self.sample(n, generator)
        return x, self.log_prob(x)


class RefusingDensity(VonMisesMixtureDensity):
    """Refuses its draws with |phi| > 2.6 (log q = NaN), as a too-sharp flow does; with ``symmetric`` its
    log_prob is -inf there too (outside the support), as TorsionDiffusionModel's is beyond max_stretch."""

    def __init__(self, symmetric: bool):
        super().__init__([[1.0], [-2.0]], [[3.0], [1.0]], [0.8, 0.2])
        self.symmetric = symmetric

    def log_prob(self, x):
        log_q = super().log_prob(x)
        return np.where(np.abs(np.asarray(x)[:, 0]) > 2.6, -np.inf, log_q) if self.symmetric else log_q

    def sample_and_log_prob(self, n, generator=None):
        x = self.sample(n, generator)
        return x, np.where(np.abs(x[:, 0]) > 2.6, np.nan, super().log_prob(x))


def _chain_torsions(chain):
    return TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)


def test_resampling_proposal_is_exact_with_a_von_mises_density_and_control_fails(chain):
    density = VonMisesMixtureDensity([[1.0], [-2.0]], [[3.0], [1.0]], [0.8, 0.2])  # weight far from the chain's
    proposal = TorsionResamplingProposal(density, _chain_torsions(chain))
    result = run_chain(chain, MetropolisHastingsEngine(proposal, seed=2), 12000, _phi(chain))
    test = chi_square_test(result.observable, EDGES, torsion_bin_probabilities(EDGES))
    assert test.p_value > 1e-3, test
    assert proposal.n_density_evaluations == 1  # no MD: the current state is always the last accepted draw
    control = TorsionResamplingProposal(density, _chain_torsions(chain))
    control_result = run_chain(chain, MetropolisHastingsEngine(WithoutHastings(control), seed=2), 12000, _phi(chain))
    assert chi_square_test(control_result.observable, EDGES, torsion_bin_probabilities(EDGES)).p_value < 1e-6


@pytest.mark.slow
def test_refused_draws_keep_the_move_exact_only_when_log_prob_refuses_the_same_states(chain):
    # With MD between moves, states where draws are refused are entered by MD. If log_prob is -inf there,
    # moves out of them are impossible, as are moves into them: exact (p = 0.78 at 12,000 steps). If
    # log_prob stays finite there, the chain leaves them by moves it never makes back: p = 1.6e-13 at 6,000.
    for symmetric in (True, False):
        engine = MetropolisHastingsEngine(TorsionResamplingProposal(RefusingDensity(symmetric), _chain_torsions(chain)),
                                          seed=3)
        result = run_chain(chain, engine, 8000, _phi(chain), md_steps=5)
        p_value = chi_square_test(result.observable, EDGES, torsion_bin_probabilities(EDGES)).p_value
        stats = result.statistics
        assert stats["n_nonfinite"] > 0  # refused draws: rejected before any energy
        if symmetric:
            assert stats["n_impossible"] > 0 and p_value > 1e-3, p_value
        else:
            assert stats["n_impossible"] == 0 and p_value < 1e-6, p_value


def test_resampling_proposal_checks_its_density(chain):
    with pytest.raises(ConfSampleError, match="models.protocol.Density"):
        TorsionResamplingProposal(object(), _chain_torsions(chain))
    with pytest.raises(ConfSampleError, match="buffer_size"):
        TorsionResamplingProposal(VonMisesMixtureDensity([[0.0]], [[1.0]], [1.0]), _chain_torsions(chain), 0)
    two = VonMisesMixtureDensity([[0.0, 0.0]], [[1.0, 1.0]], [1.0])
    proposal = TorsionResamplingProposal(two, _chain_torsions(chain))
    with pytest.raises(ConfSampleError, match="returned shapes"):
        proposal.propose(chain.positions_nm, 1, np.random.default_rng(0))
