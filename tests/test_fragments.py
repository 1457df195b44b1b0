"""Fragment-local torsion moves (moves.fragment) and their densities (models.fragments).

Exactness: on the closed-form chain of seven coupled torsions (testing.coupled_torsion_chain), grouped into
three "residues" with phi/psi/chi1 so that every move kind applies, the moves alone, with MD and in both
scans reproduce every marginal and every neighbour joint (chi-square); without the Hastings term they fail.
"""

import copy
import math
import os

import numpy as np
import pytest
import yaml

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.models.fragments import (BLOCKS, FragmentConditional, FragmentTable, UniformFragmentDensity,
                                                VonMisesFragmentDensity, crankshaft_fiber, fragments_from_names)
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.fragment import FragmentProposal
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.testing import (WithoutHastings, chain_bin_probabilities, chain_chi_square_tests,
                                       coupled_torsion_chain, run_chain)
from test_peptides import cache  # noqa: F401  (fixture: peptide builds go to a fresh cache folder)

pytestmark = pytest.mark.usefixtures("cache")

PASS_P, FAIL_P = 1e-3, 1e-6
#: Wells of 1-3 kJ/mol and a coupling of -2 kJ/mol: rugged enough that a wrong sampler fails (p = 1e-113 without
#: the Hastings term), smooth enough that 32,000 MH steps give 50-600 independent samples per test (measured).
CHAIN_TERMS = (((1.0, 1, 0.0), (1.5, 3, 0.0)), ((1.5, 2, 1.0),), ((1.0, 1, 2.0), (1.0, 3, 0.5)))
#: Three "residues" over the seven torsions: t3 and t6 play chi1, and (t2, t4) / (t5, t7) are psi_i / phi_{i+1}
#: pairs around an "omega" (t3 / t6), as in a peptide, so every move kind (fragment, backbone, sidechain,
#: crankshaft) applies.
GROUPS = [("R1", "ALA", {"phi": "t1", "psi": "t2", "chi1": "t3"}),
          ("R2", "SER", {"phi": "t4", "psi": "t5", "chi1": "t6"}),
          ("R3", "GLY", {"phi": "t7"})]


@pytest.fixture(scope="module")
def chain():
    molsys = coupled_torsion_chain(7, terms=CHAIN_TERMS, coupling=-2.0, mass_amu=4.0)
    molsys.exact = chain_bin_probabilities(molsys)
    molsys.fragments = fragments_from_names(molsys.torsions, GROUPS)
    molsys.all_torsions = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array)
    return molsys


def _proposal(chain, density=None, **options):
    density = density or VonMisesFragmentDensity(kappa=1.0, mu=0.5, uniform_weight=0.3)
    return FragmentProposal(chain.bonds, chain.n_atoms, chain.fragments, density, **options)


def _min_p(chain, proposal, n_iterations, md_steps=0, seed=0, n_proposals=1):
    engine = MetropolisHastingsEngine(proposal, n_proposals=n_proposals, seed=seed)
    result = run_chain(chain, engine, n_iterations, chain.all_torsions.values, md_steps=md_steps, seed=seed + 1)
    tests = chain_chi_square_tests(result.observable, *chain.exact)
    # Bonferroni over the chain's marginal and joint tests (13 for 7 torsions): the smallest of 13 p-values
    # of an exact sampler falls below 1e-3 in 1.3 % of runs (seen once: 3e-4 with a model trained under load)
    return min(1.0, len(tests) * min(t.p_value for t in tests)), result, tests


# ------------------------------------------------------------------------------------------------
# tables: exact sampling and evaluation
# ------------------------------------------------------------------------------------------------

def _random_table(rng, n_grid=12, uniform_weight=0.1):
    return FragmentTable(rng.random((len(BLOCKS), n_grid, n_grid)) ** 3, uniform_weight)


@pytest.mark.parametrize("moved, present", [(("phi", "psi", "chi1"), ("phi", "psi", "chi1")),
                                            (("psi",), ("psi",)),
                                            (("chi1", "chi2"), ("phi", "psi", "chi1", "chi2")),
                                            (("phi",), ("phi", "psi"))])
def test_conditional_draws_come_with_their_exact_log_density(rng, moved, present):
    table = _random_table(rng)
    conditional = FragmentConditional(table, moved, present)
    condition = rng.uniform(-np.pi, np.pi, len(conditional.fixed))
    x, log_q = conditional.sample_and_log_prob(condition, 500, rng)
    assert x.shape == (500, len(moved)) and np.all((x >= -np.pi) & (x < np.pi))
    np.testing.assert_allclose(conditional.log_prob(condition, x), log_q, atol=1e-12)
    # the scalar one-draw path of the move's hot loop: the same random numbers give the same draw and density
    twin_a, twin_b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        (vector, vector_log_q), (scalar, scalar_log_q) = (conditional.sample_and_log_prob(condition, 1, twin_a),
                                                          conditional.sample_one(condition, twin_b))
        np.testing.assert_array_equal(vector[0], scalar)
        assert scalar_log_q == pytest.approx(vector_log_q[0], abs=1e-12)
        assert conditional.log_prob_one(condition, scalar) == pytest.approx(scalar_log_q, abs=1e-12)
    # normalised: sum over cell centres of q * cell volume is one (the moved kinds of one block at a time)
    centres = -np.pi + (np.arange(table.n_grid) + 0.5) * table.width
    if len(moved) <= 2:
        grid = np.stack(np.meshgrid(*[centres] * len(moved), indexing="ij"), -1).reshape(-1, len(moved))
        total = np.exp(conditional.log_prob(condition, grid)).sum() * table.width ** len(moved)
        assert total == pytest.approx(1.0, abs=1e-9)


def test_a_fixed_torsion_conditions_its_partner(rng):
    table = _random_table(rng, n_grid=8, uniform_weight=0.0)
    conditional = FragmentConditional(table, ("phi",), ("phi", "psi"))
    psi = 1.0
    x = conditional.sample([psi], 40000, rng)[:, 0]
    observed = np.bincount(((x + np.pi) / table.width).astype(int), minlength=8) / 40000
    column = table.probabilities[0][:, int((psi + np.pi) / table.width)]
    np.testing.assert_allclose(observed, column / column.sum(), atol=0.01)


def test_crankshaft_fiber_is_a_distribution(rng):
    a, b = _random_table(rng), _random_table(rng)
    for phi_i, psi_j in ((0.3, -2.0), (None, 1.0), (None, None)):
        fiber = crankshaft_fiber(a, phi_i, b, psi_j, 0.7)
        assert fiber.shape == (a.n_grid,) and np.all(fiber > 0) and fiber.sum() == pytest.approx(1.0)


def test_table_refuses_bad_input():
    with pytest.raises(ConfSampleError, match=r"shape \(3, n_grid, n_grid\)"):
        FragmentTable(np.ones((2, 4, 4)))
    with pytest.raises(ConfSampleError, match="negative, non-finite or all-zero"):
        FragmentTable(-np.ones((3, 4, 4)))
    with pytest.raises(ConfSampleError, match="uniform_weight"):
        FragmentTable(np.ones((3, 4, 4)), 1.0)
    with pytest.raises(ConfSampleError, match="moved kinds"):
        FragmentConditional(FragmentTable.uniform(4), ("chi1",), ("phi", "psi"))


# ------------------------------------------------------------------------------------------------
# the move on the closed-form chain
# ------------------------------------------------------------------------------------------------

def test_moves_built_for_every_kind(chain):
    proposal = _proposal(chain)
    assert [m.label for m in proposal.moves] == [
        "fragment:R1", "backbone:R1", "sidechain:R1", "fragment:R2", "backbone:R2", "sidechain:R2", "fragment:R3",
        "crankshaft:R1-R2", "crankshaft:R2-R3"]
    assert math.isclose(proposal.probabilities.sum(), 1.0)
    only = _proposal(chain, moves=("crankshaft",), weights={"crankshaft": 2.0})
    assert [m.kind for m in only.moves] == ["crankshaft", "crankshaft"]


def test_crankshaft_keeps_the_sum_and_moves_nothing_else(chain, rng):
    proposal = _proposal(chain, moves=("crankshaft",))
    x = chain.positions_nm
    before = chain.all_torsions.values(x)
    batch = proposal.propose(x, 20, rng)
    after = chain.all_torsions.values(batch.positions)
    for s, m in enumerate(batch.info["moves"]):
        psi, phi = {0: (1, 3), 1: (4, 6)}[int(m)]
        changed = np.flatnonzero(np.abs(np.sin((after[s] - before) / 2)) > 1e-9)
        assert set(changed) <= {psi, phi}
        assert math.isclose(math.remainder(after[s, psi] + after[s, phi] - before[psi] - before[phi], 2 * math.pi), 0.0,
                            abs_tol=1e-9)
    assert np.all(np.isfinite(batch.log_correction))


@pytest.mark.slow
def test_fragment_moves_alone_are_exact(chain):
    p, result, _ = _min_p(chain, _proposal(chain, moves=("fragment",)), 8000, seed=5, n_proposals=4)
    assert p > PASS_P, p
    assert 0.1 < result.statistics["acceptance_rate"] < 0.9


@pytest.mark.slow
def test_random_scan_of_every_kind_is_exact(chain):
    proposal = _proposal(chain)
    p, result, _ = _min_p(chain, proposal, 8000, seed=2, n_proposals=4)
    assert p > PASS_P, p
    stats = proposal.fragment_statistics()
    assert set(stats["per_kind"]) == {"fragment", "backbone", "sidechain", "crankshaft"}
    assert sum(e["n_proposed"] for e in stats["per_move"].values()) == result.statistics["n_proposed"]
    assert sum(e["n_accepted"] for e in stats["per_move"].values()) == result.statistics["n_accepted"]
    assert all(e["acceptance_rate"] > 0.05 for e in stats["per_kind"].values())


@pytest.mark.slow
def test_systematic_scan_with_md_and_batches_is_exact(chain):
    proposal = _proposal(chain, scan="systematic")
    p, result, _ = _min_p(chain, proposal, 6000, md_steps=10, seed=3, n_proposals=3)
    assert p > PASS_P, p
    per_move = proposal.fragment_statistics()["per_move"]
    tried = [e["n_proposed"] for e in per_move.values()]
    assert sum(tried) == result.statistics["n_proposed"] and max(tried) - min(tried) <= 1  # in order, none skipped


@pytest.mark.slow
def test_local_moves_with_md_are_exact(chain):
    p, _, _ = _min_p(chain, _proposal(chain, moves=("sidechain", "crankshaft")), 8000, md_steps=10, seed=4)
    assert p > PASS_P, p


@pytest.mark.slow
def test_without_the_hastings_term_the_chain_fails(chain):
    p, _, _ = _min_p(chain, WithoutHastings(_proposal(chain)), 5000, seed=2, n_proposals=4)
    assert p < FAIL_P, p


def test_uniform_density_needs_no_hastings_term(chain, rng):
    proposal = _proposal(chain, UniformFragmentDensity())
    batch = proposal.propose(chain.positions_nm, 50, rng)
    np.testing.assert_allclose(batch.log_correction, 0.0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# construction, serialization
# ------------------------------------------------------------------------------------------------

def test_config_round_trip_and_move_copies(chain, rng):
    proposal = _proposal(chain, scan="systematic")
    engine = MetropolisHastingsEngine(proposal, seed=5)
    context = chain.create_context()
    for _ in range(7):
        engine.step(context, chain.kT)
    config = proposal.get_config()
    restored = FragmentProposal.from_config(yaml.safe_load(yaml.safe_dump(config)))
    assert restored.get_config() == config
    assert restored.fragment_statistics() == proposal.fragment_statistics()
    move = LearnedMCMCMove(proposal, seed=1)
    twin = copy.deepcopy(move)
    assert twin.proposal.get_config() == config and twin.proposal is not proposal


def test_bad_arguments_are_refused(chain):
    with pytest.raises(ConfSampleError, match="moves must be a non-empty subset"):
        _proposal(chain, moves=("backflip",))
    with pytest.raises(ConfSampleError, match="scan must be"):
        _proposal(chain, scan="sometimes")
    with pytest.raises(ConfSampleError, match="weights must be non-negative"):
        _proposal(chain, weights={"fragment": -1.0})
    with pytest.raises(ConfSampleError, match="no fragments to move"):
        FragmentProposal(chain.bonds, chain.n_atoms, [], UniformFragmentDensity())
    with pytest.raises(ConfSampleError, match="kinds must be among"):
        fragments_from_names(chain.torsions, [("R1", "ALA", {"omega": "t1"})])
    with pytest.raises(ConfSampleError, match="fragment density"):
        _proposal(chain, density=object())


# ------------------------------------------------------------------------------------------------
# peptides: fragments, a small trained model, adapters, bad input
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model(request, tmp_path_factory):
    """A fragment model trained in seconds on 5 ps of MD of Ac-Ala-NMe and Ac-Val-NMe at 300 and 500 K."""
    request.getfixturevalue("cache")
    from openmm_confsample.models.fragments import FragmentModelTrainer, sample_fragment_md
    from openmm_confsample.systems import get_system

    data = sample_fragment_md([get_system("dipeptide-ALA"), get_system("dipeptide-VAL")], (300.0, 500.0),
                              length_ps=5.0, sample_every_ps=0.05, progress=False)
    trainer = FragmentModelTrainer(n_grid=36, order=3, hidden=32, steps=400, lr=1e-2, progress=False)
    model = trainer.fit(data).fetch_model()
    model.save(str(tmp_path_factory.mktemp("model") / "fragments.pt"))
    return model


def test_peptide_fragments_of_a_pentapeptide():
    from openmm_confsample.models.fragments import peptide_fragments
    from openmm_confsample.systems import get_system

    molsys = get_system("pentapeptide-KVPFE")
    fragments = peptide_fragments(molsys.topology)
    assert [f.name for f in fragments] == ["LYS2", "VAL3", "PRO4", "PHE5", "GLU6"]
    assert [f.previous for f in fragments] == ["ACE", "LYS", "VAL", "PRO", "PHE"]
    assert [f.next for f in fragments] == ["VAL", "PRO", "PHE", "GLU", "NME"]
    assert fragments[2].kinds == ("psi",)  # proline: phi and chi turn ring bonds
    assert fragments[0].kinds == ("phi", "psi", "chi1", "chi2", "chi3", "chi4")
    named = {n for f in fragments for n, _ in f.torsions.values()}
    assert named == set(molsys.torsions)
    proposal = FragmentProposal.for_system(molsys, UniformFragmentDensity())
    assert proposal.torsion_set.names == [f.torsions[k][0] for f in fragments for k in f.kinds]
    kinds = [m.label for m in proposal.moves]
    # no crankshaft into proline (its phi is fixed by the ring), one out of it; no side-chain move for proline
    assert "crankshaft:VAL3-PRO4" not in kinds and "crankshaft:PRO4-PHE5" in kinds and "sidechain:PRO4" not in kinds


def test_trained_model_round_trip_and_tables(small_model):
    from openmm_confsample.models.fragments import FragmentTorsionModel, peptide_fragments
    from openmm_confsample.systems import get_system

    assert small_model.seen_residues == ("ALA", "VAL")
    loaded = FragmentTorsionModel.load(small_model.checkpoint_path)
    fragments = peptide_fragments(get_system("dipeptide-VAL").topology)
    np.testing.assert_allclose(loaded.tables_for(fragments)[0].probabilities,
                               small_model.tables_for(fragments)[0].probabilities, atol=1e-12)
    assert loaded.metadata["training"]["sources"][0]["system"] == "dipeptide-ALA"
    table = loaded.tables_for(fragments)[0]
    # the learned backbone table prefers phi < 0 (where the data are) over phi > 0
    assert table.probabilities[0][: table.n_grid // 2].sum() > 0.6


def test_a_model_trained_with_other_residue_features_is_refused_in_one_sentence(tmp_path):
    """A checkpoint whose network reads a context of another length (the package's residue features changed
    since it was trained) is named as such, instead of a tensor-shape error."""
    import torch

    from openmm_confsample.models.checkpoint import save_checkpoint
    from openmm_confsample.models.fragments import FragmentNetwork, FragmentTorsionModel
    from openmm_confsample.models.fragments.model import CONTEXT_SIZE

    network = FragmentNetwork(n_grid=12, order=1, hidden=4)
    state = network.state_dict()
    state["body.0.weight"] = torch.zeros(4, CONTEXT_SIZE - 12)  # a model of 8 features per residue
    path = tmp_path / "old.pt"
    save_checkpoint(path, "fragment_torsion", {**network.config(), "uniform_weight": 0.05, "seen_residues": ["ALA"],
                                               "seen_neighbours": ["ACE", "NME"]}, state, {})
    with pytest.raises(ConfSampleError, match=f"reads contexts of .{CONTEXT_SIZE - 12}.* make {CONTEXT_SIZE}.*retrain"):
        FragmentTorsionModel.load(path)


@pytest.mark.slow
def test_trained_model_on_the_chain_is_exact(chain, small_model):
    # the chain's "residues" are named ALA/SER/GLY: the model gives learned (ALA), zero-shot (SER) and zero-shot
    # (GLY) tables; whatever they are, the chain must come out exact
    with pytest.warns(UserWarning, match="never saw residue"):
        proposal = FragmentProposal(chain.bonds, chain.n_atoms, chain.fragments, small_model, uniform_weight=0.2)
    assert any("zero-shot" in t.label for t in proposal.tables)
    p, _, _ = _min_p(chain, proposal, 6000, md_steps=10, seed=6, n_proposals=2)
    assert p > PASS_P, p


def test_move_in_a_simulation_reporter_and_openmmtools(small_model):
    import openmm
    import openmm.app as app
    from openmm import unit
    from openmmtools import mcmc
    from openmmtools.cache import ContextCache

    from openmm_confsample.moves.fragment import FragmentMove
    from openmm_confsample.moves.reporter import LearnedMoveReporter
    from openmm_confsample.systems import get_system

    molsys = get_system("dipeptide-VAL")
    move = FragmentMove(small_model, molsys, seed=2)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    simulation = app.Simulation(molsys.topology, molsys.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(molsys.positions_nm)
    simulation.reporters.append(LearnedMoveReporter(move, interval=10))
    simulation.step(200)
    assert move.statistics["n_proposed"] == 20
    stats = move.proposal.fragment_statistics()
    assert stats["per_residue"]["VAL2"]["n_proposed"] == 20
    twin = FragmentMove(small_model, molsys, moves=("sidechain",), seed=3)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=20), twin])
    weighted = mcmc.WeightedMove([(mcmc.LangevinDynamicsMove(n_steps=20), 0.5), (copy.deepcopy(twin), 0.5)])
    reference = ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    for moves in (sequence, weighted):
        sampler = mcmc.MCMCSampler(molsys.thermodynamic_state(), molsys.sampler_state(), moves)
        sampler.run(5, context_cache=reference)
    assert twin.statistics["n_proposed"] == 5
    assert set(twin.proposal.fragment_statistics()["per_kind"]) == {"sidechain"}


def test_parallel_tempering_stores_and_restores_the_move(small_model, tmp_path):
    import openmm
    from openmm import unit
    from openmmtools import mcmc, multistate
    from openmmtools.cache import ContextCache

    from openmm_confsample.moves.fragment import FragmentMove
    from openmm_confsample.systems import get_system

    molsys = get_system("dipeptide-ALA")
    move = FragmentMove(small_model.checkpoint_path, molsys, seed=4)
    moves = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=20, timestep=1.0 * unit.femtosecond), move])
    sampler = multistate.ParallelTemperingSampler(mcmc_moves=moves, number_of_iterations=2)
    storage = str(tmp_path / "pt.nc")
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler.create(molsys.thermodynamic_state(), molsys.sampler_state(), reporter, min_temperature=300 * unit.kelvin,
                   max_temperature=450 * unit.kelvin, n_temperatures=3)
    platform = openmm.Platform.getPlatformByName("Reference")
    sampler.energy_context_cache = ContextCache(platform=platform)
    sampler.sampler_context_cache = ContextCache(platform=platform)
    sampler.run()
    assert [m.move_list[1].statistics["n_proposed"] for m in sampler._mcmc_moves] == [2, 2, 2]
    reporter.close()
    restored = multistate.ParallelTemperingSampler.from_storage(multistate.MultiStateReporter(storage, open_mode="r"))
    learned = restored._mcmc_moves[0].move_list[1]
    assert isinstance(learned.proposal, FragmentProposal)
    assert learned.proposal.fragment_statistics()["per_residue"]["ALA2"]["n_proposed"] == 2


# ------------------------------------------------------------------------------------------------
# bad input: one sentence or a documented fallback that says so
# ------------------------------------------------------------------------------------------------

def test_residue_type_the_model_never_saw(small_model):
    from openmm_confsample.systems import get_system

    molsys = get_system("dipeptide-LEU")
    with pytest.warns(UserWarning, match=r"never saw residue\(s\) LEU2; .* zero-shot"):
        proposal = FragmentProposal.for_system(molsys, small_model)
    assert proposal.describe()["tables"] == ["model: LEU, zero-shot"]
    with pytest.raises(ConfSampleError, match=r"trained on ALA, VAL; residues LEU2 are not among them"):
        FragmentProposal.for_system(molsys, small_model, strict=True)


def test_ring_torsion_is_refused_in_one_sentence():
    from openmm_confsample.geometry.rotatable import detect_rotatable_torsions
    from openmm_confsample.models.fragments import Fragment, peptide_fragments
    from openmm_confsample.systems import get_system

    molsys = get_system("dipeptide-PRO")
    with pytest.raises(ConfSampleError, match="ring torsions .* cannot be part of a fragment"):
        peptide_fragments(molsys.topology, include_rings=True)
    ring_phi = dict(detect_rotatable_torsions(molsys.topology, include_rings=True))["phi:PRO2"]
    fragment = Fragment("PRO2", "PRO", {"phi": ("phi:PRO2", ring_phi)}, "ACE", "NME")
    with pytest.raises(ConfSampleError, match="turns about ring bond"):
        FragmentProposal(molsys.bonds, molsys.n_atoms, [fragment], UniformFragmentDensity())
    proposal = FragmentProposal.for_system(molsys, UniformFragmentDensity())  # the default keeps phi fixed
    assert [m.label for m in proposal.moves] == ["fragment:PRO2"]
    assert proposal.moves[0].torsion_set.names == ["psi:PRO2"]


def test_non_standard_residue_gets_a_uniform_proposal_and_says_so(small_model):
    from openmm_confsample.systems import get_system

    molsys = get_system("dipeptide-ALA")
    next(r for r in molsys.topology.residues() if r.index == 1).name = "NLE"
    with pytest.warns(UserWarning, match=r"NLE2 are not standard amino acids; .* uniformly"):
        proposal = FragmentProposal.for_system(molsys, small_model)
    assert proposal.describe()["tables"] == ["uniform: NLE not a standard residue"]
    batch = proposal.propose(molsys.positions_nm, 5, np.random.default_rng(0))
    np.testing.assert_allclose(batch.log_correction, 0.0, atol=1e-9)


def test_peptide_the_model_does_not_cover(small_model):
    from openmm_confsample.systems import get_system

    molsys = get_system("pentapeptide-KVPFE")
    with pytest.raises(ConfSampleError, match=r"residues LYS2, PRO4, PHE5, GLU6 are not among them \(strict=True\)"):
        FragmentProposal.for_system(molsys, small_model, strict=True)
    with pytest.warns(UserWarning, match=r"never saw residue\(s\) LYS2, PRO4, PHE5, GLU6"):
        proposal = FragmentProposal.for_system(molsys, small_model)
    assert small_model.coverage(proposal.fragments) == {"seen": ["VAL3"], "zero_shot": ["LYS2", "PRO4", "PHE5", "GLU6"],
                                                        "uniform": []}


def test_sample_command_runs_fragment_moves_with_the_shipped_model(tmp_path):
    """`confsample sample PEPTIDE --move fragment` (model defaults to the shipped 'peptide-fragments')."""
    import json

    from openmm_confsample.cli import main

    out = tmp_path / "run"
    assert main(["sample", "pentapeptide-AAAAA", "--move", "fragment", "--length-ps", "2", "--move-interval", "50",
                 "--save-interval-ps", "0.1", "--seed", "1", "--out", str(out), "--quiet"]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["move_statistics"]["n_proposed"] == 40 and summary["move_statistics"]["n_accepted"] > 0
    per_kind = summary["fragment_statistics"]["per_kind"]
    assert sum(kind["n_proposed"] for kind in per_kind.values()) == 40
    assert {"phi:ALA2", "psi:ALA6"} <= set(summary["torsions"])


def _make_fragment_model_script():
    """benchmarks/make_fragment_model.py as a module (it is a script, not part of the package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "make_fragment_model.py")
    spec = importlib.util.spec_from_file_location("make_fragment_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_make_fragment_model_trains_twice_and_reuses_both_rounds(tmp_path, capsys):
    """benchmarks/make_fragment_model.py: round 1 (uniform moves), a first model, round 2 with that model's moves,
    the final model on both; a second call with the same settings reuses both rounds' frames."""
    from openmm_confsample.models.fragments import FragmentData, FragmentTorsionModel

    script = _make_fragment_model_script()
    args = ["--out", str(tmp_path / "model.pt"), "--data", str(tmp_path / "round1.npz"), "--bootstrap-data",
            str(tmp_path / "round2.npz"), "--residues", "ALA", "VAL", "--leave-out", "VAL", "--temperatures", "300",
            "--length-ps", "2", "--bootstrap-ps", "2", "--steps", "10", "--order", "2", "--hidden", "8", "--quiet"]
    assert script.main(args) == 0
    first = capsys.readouterr().out
    assert "reusing" not in first and "first model trained" in first
    round2 = FragmentData.load(str(tmp_path / "round2.npz"))
    assert [s["moves_option"][:6] for s in round2.sources] == ["model:", "model:"]
    assert [s["move_acceptance"] > 0 for s in round2.sources] == [True, True]
    model = FragmentTorsionModel.load(str(tmp_path / "model.pt"))
    assert list(model.seen_residues) == ["ALA"] and model.metadata["bootstrap_ps"] == 2.0
    assert model.metadata["training"]["sources"][-1]["moves_option"].startswith("model:")
    assert script.main(args) == 0
    assert capsys.readouterr().out.count("reusing MD frames") == 2


def test_fragment_data_file_is_written_all_or_nothing_and_bad_files_are_refused(tmp_path, monkeypatch):
    from openmm_confsample.models.fragments import FragmentData
    from openmm_confsample.models.fragments import data as data_module

    data = FragmentData()
    data.add(("ALA", "ACE", "NME"), np.full((5, 6), 0.5))
    data.sources = [{"system": "dipeptide-ALA", "temperature_K": 300.0}]
    path = str(tmp_path / "frames.npz")
    data.save(path)
    loaded = FragmentData.load(path)
    assert loaded.contexts == data.contexts and loaded.sources == data.sources
    np.testing.assert_array_equal(loaded.angles[0], data.angles[0])
    before = open(path, "rb").read()

    def dies_half_way(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(data_module.np, "savez_compressed", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        data.save(path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["frames.npz"]

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(before[: len(before) // 2])
    with pytest.raises(ConfSampleError, match="is not a complete fragment data file"):
        FragmentData.load(str(truncated))
    with pytest.raises(ConfSampleError, match="does not exist"):
        FragmentData.load(str(tmp_path / "missing.npz"))


def test_make_fragment_model_refuses_a_negative_round_2(tmp_path, capsys):
    script = _make_fragment_model_script()
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "m.pt"), "--bootstrap-ps", "-5"])
    assert "--bootstrap-ps must be 0 (no round 2) or a positive number of ps, got -5.0" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
