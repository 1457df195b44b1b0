"""NCMC learned moves (moves/ncmc.py): exactness against closed forms, negative controls, integration, bad input.

The closed form is testing.coupled_torsion_system: a torsion phi whose marginal is exp(-V(phi)/kT) / Z, coupled
to an environment particle whose projection on u(phi) is exactly Gaussian; an instantaneous jump between wells
costs over 100 kT there, as a torsion jump of a solute does in water.
"""

import copy

import numpy as np
import openmm
import pytest
from openmm import unit
from scipy import stats

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.ncmc import NCMCEngine, NCMCMove
from openmm_confsample.moves.ncmc_protocol import (ParameterSoftening, SoluteDecoupling, TorsionDrive,
                                                   perturbation_from_config)
from openmm_confsample.moves.proposals import GaussianDisplacementProposal, VonMisesMixtureProposal, wrap_angle
from openmm_confsample.moves.torsion_resampling import TorsionResamplingProposal
from openmm_confsample.testing import (chi_square_test, coupled_torsion_system, environment_projection,
                                       environment_projection_moments, run_chain, torsion_bin_probabilities)

WELLS = [[np.pi / 3], [-np.pi / 3], [np.pi]]
WEIGHTS = [0.15, 0.15, 0.7]  # near the wells' Boltzmann weights of the default torsion terms
EDGES = np.linspace(-np.pi, np.pi, 13)
SOFTEN = {"coupling_scale": 0.0}


class MixtureDensity:
    """A von Mises mixture through the density protocol (what a learned torsion model provides)."""

    def __init__(self, mixture):
        self.mixture = mixture

    def sample(self, n, generator=None):
        return self.mixture.sample(n, np.random.default_rng(generator))

    def log_prob(self, x):
        return self.mixture.log_prob(np.asarray(x))

    def sample_and_log_prob(self, n, generator=None):
        x = self.sample(n, generator)
        return x, self.log_prob(x)


@pytest.fixture(scope="module")
def coupled():
    return coupled_torsion_system()


def _torsions(molsys):
    return TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array, names=molsys.torsion_names)


def _proposal(molsys, learned=True):
    mixture = VonMisesMixtureProposal(_torsions(molsys), WELLS, kappas=4.0, weights=WEIGHTS)
    return TorsionResamplingProposal(MixtureDensity(mixture), _torsions(molsys)) if learned else mixture


def _engine(molsys, ncmc_steps=40, learned=False, seed=0, **options):
    """An NCMC engine on the coupled system (10/ps friction: the environment relaxes within the protocol)."""
    options.setdefault("collision_rate_per_ps", 10.0)
    return NCMCEngine(_proposal(molsys, learned), ParameterSoftening(SOFTEN), ncmc_steps, seed=seed, **options)


def _phi_and_xi(molsys):
    torsions = _torsions(molsys)
    return lambda x: (torsions.values(x)[0], environment_projection(x))


def _run(molsys, engine, n, md_steps=0, seed=3):
    result = run_chain(molsys, engine, n, _phi_and_xi(molsys), md_steps=md_steps, timestep_fs=1.0, seed=seed)
    return result.observable[:, 0], result.observable[:, 1], result.statistics


def _phi_test(molsys, phi):
    return chi_square_test(phi, EDGES, torsion_bin_probabilities(EDGES, molsys.torsion_terms, molsys.temperature_K))


def _xi_test(molsys, xi):
    mean, sd = environment_projection_moments(molsys)
    edges = stats.norm.ppf(np.linspace(0.0, 1.0, 11))
    edges[0], edges[-1] = -50.0, 50.0
    return chi_square_test((np.asarray(xi) - mean) / sd, edges, np.full(10, 0.1))


def _well_changes_per_move(phi):
    """How often consecutive samples sit in different wells (nearest of the three well centres)."""
    centres = np.array([np.pi / 3, -np.pi / 3, np.pi])
    well = np.argmin(np.abs(wrap_angle(np.asarray(phi)[:, None] - centres)), axis=1)
    return float(np.mean(well[1:] != well[:-1]))


# -- exactness ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ncmc_alone_samples_torsion_and_environment_exactly(coupled):
    """NCMC alone (OVRVO steps at 5 fs, where the shadow work matters): both closed-form marginals."""
    engine = _engine(coupled, 100, learned=True, seed=1, timestep_fs=5.0, splitting="O V R H R V O")
    phi, xi, statistics = _run(coupled, engine, 1500)
    assert statistics["acceptance_rate"] > 0.15
    assert _phi_test(coupled, phi).p_value > 1e-3
    assert _xi_test(coupled, xi).p_value > 1e-3


@pytest.mark.slow
def test_ncmc_with_md_is_exact_where_the_instantaneous_move_is_refused(coupled):
    """MD + NCMC (default splitting, 2 fs) passes; the instantaneous move barely changes well (both reported)."""
    instantaneous = MetropolisHastingsEngine(_proposal(coupled), seed=2)
    phi0, _, stats0 = _run(coupled, instantaneous, 1500, md_steps=20)
    engine = _engine(coupled, 100, learned=True, seed=2, timestep_fs=2.0)
    phi, xi, statistics = _run(coupled, engine, 1500, md_steps=20)
    print(f"acceptance: instantaneous {stats0['acceptance_rate']:.3f} (well changes per move "
          f"{_well_changes_per_move(phi0):.3f}), NCMC {statistics['acceptance_rate']:.3f} (well changes per move "
          f"{_well_changes_per_move(phi):.3f})")
    assert _well_changes_per_move(phi0) < 0.01
    assert statistics["acceptance_rate"] > 0.2 and _well_changes_per_move(phi) > 0.05
    assert _phi_test(coupled, phi).p_value > 1e-3
    assert _xi_test(coupled, xi).p_value > 1e-3
    assert statistics["md_step_equivalents_per_move"] == pytest.approx(100 + 6, abs=1)


@pytest.mark.slow
def test_without_shadow_work_fails(coupled):
    """Negative control: the work without the integrator's shadow work (OVRVO at 5 fs) gets the environment's
    marginal wrong (p < 1e-6 with seeds 0-4: at most 2e-7). The torsion's marginal cannot show it here: the
    environment's integral is the same for every phi whatever its (integrator-broadened) width."""
    engine = _engine(coupled, 100, learned=True, seed=1, timestep_fs=5.0, splitting="O V R H R V O",
                     measure_protocol_work=True)
    engine._wrong_work = "no_shadow"
    _, xi, _ = _run(coupled, engine, 2000)
    assert _xi_test(coupled, xi).p_value < 1e-6


@pytest.mark.slow
def test_without_the_jump_work_fails(coupled):
    """Negative control: the work without the midpoint jump's share gets the torsion's marginal wrong
    (p < 1e-6 with seeds 0-4: at most 5e-8)."""
    engine = _engine(coupled, 100, learned=True, seed=1, timestep_fs=2.0)
    engine._wrong_work = "no_jump"
    phi, _, _ = _run(coupled, engine, 2000)
    assert _phi_test(coupled, phi).p_value < 1e-6



# -- the dragged-torsion protocol (TorsionDrive) -----------------------------------------------------------
DRIVE_OVRVO = dict(timestep_fs=5.0, splitting="O V R H R V O", kappa_kJ_per_mol=100.0)


def _drive_engine(molsys, ncmc_steps, seed, **options):
    """A TorsionDrive engine on the coupled system, the learned-density proposal (10/ps friction)."""
    drive = {k: options.pop(k) for k in ("kappa_kJ_per_mol", "anchor_concentration", "ramp_fraction") if k in options}
    options.setdefault("collision_rate_per_ps", 10.0)
    return NCMCEngine(_proposal(molsys, learned=True), TorsionDrive(molsys.torsion_array, **drive), ncmc_steps,
                      seed=seed, **options)


@pytest.mark.slow
def test_torsion_drive_samples_torsion_and_environment_exactly(coupled):
    """Dragging the torsion (300 OVRVO steps at 5 fs, where the shadow work matters): both closed-form marginals
    (p over seeds 0-4: at least 0.31; acceptance 0.23-0.26), and the well changes the instantaneous move cannot
    make (0.08-0.10 per move)."""
    engine = _drive_engine(coupled, 300, seed=1, **DRIVE_OVRVO)
    phi, xi, statistics = _run(coupled, engine, 2000)
    print(f"drive: acceptance {statistics['acceptance_rate']:.3f}, well changes per move "
          f"{_well_changes_per_move(phi):.3f}, mean work {statistics['mean_work_kT']:.2f} kT")
    assert statistics["acceptance_rate"] > 0.15 and _well_changes_per_move(phi) > 0.05
    assert _phi_test(coupled, phi).p_value > 1e-3
    assert _xi_test(coupled, xi).p_value > 1e-3
    # the steps, plus 4 energies: the start state (run_chain passes none), the protocol's first and last, the end
    assert statistics["md_step_equivalents_per_move"] == pytest.approx(300 + 4, abs=0.5)
    assert 0.0 < statistics["mean_drive_miss_rad"] < 0.5


@pytest.mark.slow
def test_torsion_drive_with_md_default_splitting(coupled):
    """MD + the drive at 2 fs with the default splitting, as a user runs it: both marginals (p over seeds 0-4: at
    least 0.18)."""
    engine = _drive_engine(coupled, 100, seed=2, timestep_fs=2.0)
    phi, xi, statistics = _run(coupled, engine, 1500, md_steps=20)
    assert statistics["acceptance_rate"] > 0.05
    assert _phi_test(coupled, phi).p_value > 1e-3
    assert _xi_test(coupled, xi).p_value > 1e-3


@pytest.mark.slow
def test_torsion_drive_without_shadow_work_fails(coupled):
    """Negative control: the drive's work without the integrator's shadow work (the restraint's work only) gets
    the environment's marginal wrong (seeds 0-4: p at most 6e-12)."""
    engine = _drive_engine(coupled, 300, seed=1, measure_protocol_work=True, **DRIVE_OVRVO)
    engine._wrong_work = "no_shadow"
    _, xi, _ = _run(coupled, engine, 2000)
    assert _xi_test(coupled, xi).p_value < 1e-6


def test_torsion_drive_schedule_reads_the_same_backwards(coupled):
    """kappa(1 - lambda) = kappa(lambda) and a + p(1 - lambda) d = b - p(lambda) d: the reverse protocol drags
    b to a."""
    drive = TorsionDrive(coupled.torsion_array, kappa_kJ_per_mol=50.0, ramp_fraction=0.2)
    functions = drive.functions(coupled.system)
    lam = np.linspace(0.0, 1.0, 101)
    kappa, progress = (np.array([eval(functions[name].replace("lambda", "lam"), {"min": min, "max": max}, {"lam": x})
                                 for x in lam]) for name in ("drive_kappa", "drive_progress"))  # Lepton reads as Python
    np.testing.assert_allclose(kappa, kappa[::-1], atol=1e-12)
    np.testing.assert_allclose(progress + progress[::-1], 1.0, atol=1e-12)
    assert kappa[0] == kappa[-1] == 0.0 and kappa.max() == 50.0 and progress[20] == 0.0 and progress[80] == 1.0
    assert perturbation_from_config(drive.get_config()).get_config() == drive.get_config()


def test_torsion_drive_restraint_energy(coupled):
    """The restraint is kappa (1 - cos(theta - a - p d)) on the torsion as dihedral_angles measures it."""
    drive = TorsionDrive(coupled.torsion_array)
    system = drive.build_system(coupled.system)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    x = _torsions(coupled).set_values(coupled.positions_nm, [1.0])
    context.setPositions(x)
    context.setParameter("drive_kappa", 100.0)
    context.setParameter("drive_progress", 0.5)
    for anchor, displacement, expected in ((0.5, 1.0, 0.0), (-1.0, 0.4, 100.0 * (1 - np.cos(1.8)))):
        TorsionDrive.set_path(TorsionDrive.drive_force(system), context, [anchor], [displacement])
        energy = context.getState(getEnergy=True, groups={31}).getPotentialEnergy()
        assert energy.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(expected, abs=1e-9)


def test_torsion_drive_bad_input(coupled):
    with pytest.raises(ConfSampleError, match="ramp_fraction must be in \\(0, 0.5\\)"):
        TorsionDrive(coupled.torsion_array, ramp_fraction=0.5)
    with pytest.raises(ConfSampleError, match="non-empty \\(k, 4\\) array"):
        TorsionDrive([[0, 1, 2]])
    with pytest.raises(ConfSampleError, match="needs a proposal with a torsion density"):
        NCMCEngine(GaussianDisplacementProposal(0.01), TorsionDrive(coupled.torsion_array), 10)
    with pytest.raises(ConfSampleError, match="drags torsions \\[\\[3, 2, 1, 0\\]\\] but the proposal samples"):
        NCMCEngine(_proposal(coupled), TorsionDrive([[3, 2, 1, 0]]), 10)
    with pytest.raises(ConfSampleError, match="protocol must be 'decouple'"):
        NCMCEngine.for_system(_proposal(coupled), coupled, protocol="jump")
    engine = NCMCEngine.for_system(_proposal(coupled), coupled, ncmc_steps=10, protocol="drive")
    assert isinstance(engine.perturbation, TorsionDrive)


# -- the Context after a move ------------------------------------------------------------------------------
def _context(molsys, seed=0):
    from openmm_confsample.runner import langevin_context

    return langevin_context(molsys, timestep_fs=1.0, friction_per_ps=5.0, seed=seed, minimize=False)


def _state(context):
    state = context.getState(getPositions=True, getVelocities=True)
    return (state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
            state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))


def test_context_holds_accepted_or_restored_state(coupled):
    context = _context(coupled)
    engine = _engine(coupled, learned=True, seed=4)
    assert engine.sets_velocities
    outcomes = set()
    for _ in range(30):
        context.getIntegrator().step(5)
        x0, v0, box0 = _state(context)
        result = engine.step(context, coupled.kT)
        x1, v1, box1 = _state(context)
        np.testing.assert_array_equal(box0, box1)
        assert not np.allclose(v0, v1)  # fresh velocities: the protocol's end, or the reversed draw
        if result.accepted:
            np.testing.assert_allclose(x1, result.positions_nm, atol=1e-12)
        else:
            np.testing.assert_array_equal(x1, x0)
        outcomes.add(result.accepted)
    assert outcomes == {True, False}
    kinetic = 0.5 * np.sum(coupled.masses_amu[:, None] * v1**2)
    assert 0.0 < kinetic < 50 * coupled.kT


def test_zero_steps_is_the_instantaneous_move(coupled):
    proposal = _proposal(coupled, learned=False)
    engine = NCMCEngine(proposal, ParameterSoftening(SOFTEN), ncmc_steps=0, seed=5)
    plain = MetropolisHastingsEngine(_proposal(coupled, learned=False), seed=5)
    assert not engine.sets_velocities
    a = run_chain(coupled, engine, 40, lambda x: x[3, 0], md_steps=5)
    b = run_chain(coupled, plain, 40, lambda x: x[3, 0], md_steps=5)
    np.testing.assert_array_equal(a.observable, b.observable)
    assert engine.statistics["n_accepted"] == plain.statistics["n_accepted"]
    assert engine.statistics["md_step_equivalents"] == engine.statistics["n_proposed"]


def test_runner_skips_half_step_correction_for_ncmc(coupled):
    """run_engine_steps leaves the velocities the move set (no half-step correction after an NCMC move)."""
    from openmm_confsample.runner import run_engine_steps

    velocities = []
    for through_runner in (True, False):  # one chain after the other: Reference draws from one global stream
        context, engine = _context(coupled, seed=1), _engine(coupled, seed=6)
        chain = []
        for _ in range(10):
            if through_runner:
                run_engine_steps(context, engine, coupled.kT)
            else:
                engine.step(context, coupled.kT)
            chain.append(_state(context)[1])
        velocities.append(chain)
        assert engine.statistics["n_accepted"] >= 1
    np.testing.assert_array_equal(velocities[0], velocities[1])


# -- integration -------------------------------------------------------------------------------------------
def test_reporter_with_dcd_state_data_and_checkpoint(coupled, tmp_path):
    import openmm.app as app

    from openmm_confsample.moves.reporter import LearnedMoveReporter
    from openmm_confsample.runner import langevin_integrator

    simulation = app.Simulation(coupled.topology, coupled.system, langevin_integrator(300.0, 5.0, 1.0, seed=2),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(coupled.positions_nm)
    move = NCMCMove(_proposal(coupled, learned=False), ParameterSoftening(SOFTEN), ncmc_steps=10, seed=7)
    reporter = LearnedMoveReporter(move, interval=10)
    simulation.reporters += [app.DCDReporter(str(tmp_path / "t.dcd"), 10),
                             app.StateDataReporter(str(tmp_path / "t.csv"), 10, step=True, potentialEnergy=True),
                             reporter]
    simulation.step(100)
    simulation.saveCheckpoint(str(tmp_path / "t.chk"))
    simulation.loadCheckpoint(str(tmp_path / "t.chk"))
    simulation.step(10)
    assert move.statistics["n_proposed"] == 11 and move.statistics["n_protocols"] == 11
    assert (tmp_path / "t.dcd").stat().st_size > 0 and len((tmp_path / "t.csv").read_text().splitlines()) == 12


def test_openmmtools_sequence_copy_and_state(coupled):
    from openmmtools import cache, mcmc

    move = NCMCMove(_proposal(coupled, learned=False), ParameterSoftening(SOFTEN), ncmc_steps=10, seed=8,
                    timestep_fs=1.5)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=10, timestep=1.0 * unit.femtosecond), move])
    sampler_state = coupled.sampler_state()
    sampler = mcmc.MCMCSampler(coupled.thermodynamic_state(), sampler_state, sequence)
    sampler.run(n_iterations=3, context_cache=cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference")))
    assert move.statistics["n_protocols"] == 3
    assert np.abs(sampler.sampler_state.velocities.value_in_unit(unit.nanometer / unit.picosecond)).sum() > 0
    clone = copy.deepcopy(move)
    assert isinstance(clone.engine, NCMCEngine) and clone.engine.timestep_fs == 1.5
    assert clone.statistics["n_protocols"] == 3 and clone.engine.rng is not move.engine.rng
    restored = NCMCMove.__new__(NCMCMove)
    restored.__setstate__(move.__getstate__())
    assert restored.engine.perturbation.midpoints == SOFTEN and restored.engine.ncmc_steps == 10


def test_drive_move_in_sequence_and_from_stored_state(coupled):
    """The dragged-torsion move with a softening in an openmmtools SequenceMove; its state restores the drive."""
    from openmmtools import cache, mcmc

    drive = TorsionDrive(coupled.torsion_array, kappa_kJ_per_mol=100.0,
                         softening=ParameterSoftening({"coupling_scale": 0.5}))
    move = NCMCMove(_proposal(coupled, learned=False), drive, ncmc_steps=20, seed=10)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=10, timestep=1.0 * unit.femtosecond), move])
    sampler = mcmc.MCMCSampler(coupled.thermodynamic_state(), coupled.sampler_state(), sequence)
    sampler.run(n_iterations=5, context_cache=cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference")))
    statistics = move.statistics
    assert statistics["n_protocols"] == 5 and statistics["n_protocol_steps"] == 100
    assert 0.0 < statistics["mean_drive_miss_rad"] < np.pi
    restored = NCMCMove.__new__(NCMCMove)
    restored.__setstate__(move.__getstate__())
    assert restored.engine.perturbation.get_config() == drive.get_config()
    assert restored.engine.perturbation.softening.midpoints == {"coupling_scale": 0.5}

def test_parallel_tempering_with_storage(coupled, tmp_path):
    from openmmtools import cache, mcmc, multistate

    from openmm_confsample.parallel.replica import MPIParallelTemperingSampler, learned_move_statistics

    move = NCMCMove(_proposal(coupled, learned=False), ParameterSoftening(SOFTEN), ncmc_steps=10, seed=9)
    moves = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=10, timestep=1.0 * unit.femtosecond), move])
    sampler = MPIParallelTemperingSampler(mcmc_moves=moves, number_of_iterations=2)
    reporter = multistate.MultiStateReporter(str(tmp_path / "pt.nc"), checkpoint_interval=1)
    platform = openmm.Platform.getPlatformByName("Reference")
    sampler.create(coupled.thermodynamic_state(), coupled.sampler_state(), reporter, min_temperature=300 * unit.kelvin,
                   max_temperature=400 * unit.kelvin, n_temperatures=2)
    sampler.energy_context_cache = cache.ContextCache(platform=platform)
    sampler.sampler_context_cache = cache.ContextCache(platform=platform)
    sampler.run()
    per_state = learned_move_statistics(sampler)
    assert [s["n_protocols"] for s in per_state] == [2, 2]
    reporter.close()


# -- the solvated system and bad input ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def explicit():
    from openmm_confsample.systems import get_system

    return get_system("alanine-dipeptide-explicit")


def test_explicit_registry_entry(explicit, ala_implicit):
    from openmm_confsample.systems.solvated import barostats

    assert explicit.n_atoms == 2269 and explicit.system.usesPeriodicBoundaryConditions()
    assert explicit.timestep_fs == 2.0 and len(barostats(explicit.system)) == 1
    assert explicit.system.getNumConstraints() > 2000  # HBonds + rigid water
    np.testing.assert_array_equal(explicit.solute_atoms, np.arange(22))
    assert explicit.fingerprint(explicit.solute_atoms) == ala_implicit.fingerprint()
    assert explicit.torsions == ala_implicit.torsions


def test_resolve_solvated_pdb_keeps_water_only_with_a_water_model():
    from openmm_confsample.systems import resolve_system
    from openmm_confsample.systems.builders import _openmmtools_pdb

    pdb = _openmmtools_pdb("alanine-dipeptide-explicit")
    solvated = resolve_system(pdb, ["amber14-all.xml", "amber14/tip3p.xml"])
    assert solvated.n_atoms == 2269 and solvated.timestep_fs == 2.0
    assert resolve_system(pdb).n_atoms == 22  # implicit solvent by default, waters dropped as before


@pytest.mark.parametrize("pressure_bar", [None, 1.0])
def test_ncmc_on_solvated_system_with_and_without_barostat(pressure_bar, explicit):
    from openmm_confsample.bench.alanine import alanine_basin_proposal
    from openmm_confsample.runner import langevin_context, run_engine_steps
    from openmm_confsample.systems.builders import _openmmtools_pdb
    from openmm_confsample.systems.solvated import barostats, solvated_system_from_pdb

    system = explicit if pressure_bar else solvated_system_from_pdb(
        _openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml", "tip3p.xml"), pressure_bar=None)
    assert len(barostats(system.system)) == (1 if pressure_bar else 0)
    proposal = alanine_basin_proposal(_torsions(system))
    engine = NCMCEngine.for_system(proposal, system, ncmc_steps=4, seed=1)
    assert engine.timestep_fs == 2.0 and engine.perturbation.solute_atoms == list(range(22))
    context = langevin_context(system, platform="CPU", minimize=False, equilibration_steps=2)
    box = _state(context)[2]
    run_engine_steps(context, engine, system.kT)
    np.testing.assert_array_equal(_state(context)[2], box)
    statistics = engine.statistics
    assert statistics["n_protocols"] == 1 and np.isfinite(statistics["mean_work_kT"])
    assert statistics["md_step_equivalents_per_move"] >= 4


def test_implicit_model_in_water_is_allowed_and_said_once(explicit):
    from openmm_confsample.models import shipped_model_path
    from openmm_confsample.moves import ncmc, torsion_diffusion
    from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionProposal

    torsion_diffusion._TOLD.clear()
    path = shipped_model_path("alanine_dipeptide_diffusion.pt")
    with pytest.warns(UserWarning, match="without the water of 'alanine-dipeptide-explicit'.*exact"):
        proposal = ncmc.solute_diffusion_proposal(path, explicit)
    assert isinstance(proposal, TorsionDiffusionProposal)
    assert proposal.torsion_set.torsions.tolist() == [list(explicit.torsions["phi"]), list(explicit.torsions["psi"])]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ncmc.solute_diffusion_proposal(path, explicit)  # said once


def test_solute_that_cannot_be_told_from_solvent():
    import openmm.app as app

    from openmm_confsample.systems.solvated import find_solute_atoms

    water_only = app.Topology()
    for _ in range(3):
        residue = water_only.addResidue("HOH", water_only.addChain())
        for name, element in (("O", app.element.oxygen), ("H1", app.element.hydrogen), ("H2", app.element.hydrogen)):
            water_only.addAtom(name, element, residue)
    with pytest.raises(ConfSampleError, match="has no solute: all its 3 residues are water or ions"):
        find_solute_atoms(water_only)
    one_residue = app.Topology()
    residue = one_residue.addResidue("UNL", one_residue.addChain())
    for i in range(6):
        one_residue.addAtom(f"C{i}", app.element.carbon, residue)
    with pytest.raises(ConfSampleError, match="cannot tell the solute of the box from its solvent"):
        find_solute_atoms(one_residue, periodic=True, label="the box")
    np.testing.assert_array_equal(find_solute_atoms(one_residue, periodic=False), np.arange(6))
    odd_water = app.Topology()  # water under an unknown residue name is found by its H2O composition
    residue = odd_water.addResidue("XYZ", odd_water.addChain())
    for name, element in (("OW", app.element.oxygen), ("HW1", app.element.hydrogen), ("HW2", app.element.hydrogen)):
        odd_water.addAtom(name, element, residue)
    odd_water.addAtom("C", app.element.carbon, odd_water.addResidue("MOL", odd_water.addChain()))
    np.testing.assert_array_equal(find_solute_atoms(odd_water, periodic=True), [3])


def test_bad_arguments(coupled):
    proposal = _proposal(coupled, learned=False)
    with pytest.raises(ConfSampleError, match="ncmc_steps must be even"):
        NCMCEngine(proposal, ParameterSoftening(SOFTEN), ncmc_steps=7)
    with pytest.raises(ConfSampleError, match="ncmc_steps must be"):
        NCMCEngine(proposal, ParameterSoftening(SOFTEN), ncmc_steps=-2)
    with pytest.raises(ConfSampleError, match="no global parameter \\['lambda_x'\\]"):
        ParameterSoftening({"lambda_x": 0.0}).build_system(coupled.system)
    with pytest.raises(ConfSampleError, match="sterics_midpoint must be in \\[0, 1\\]"):
        SoluteDecoupling([0, 1], sterics_midpoint=1.5)
    with pytest.raises(ConfSampleError, match="no environment to soften"):
        SoluteDecoupling(range(coupled.n_atoms)).build_system(coupled.system)
    with pytest.raises(ConfSampleError, match="palindrome"):
        NCMCEngine(proposal, ParameterSoftening(SOFTEN), ncmc_steps=2, splitting="V R O H R V")
    with pytest.raises(ConfSampleError, match="outside the solute"):
        NCMCEngine.for_system(proposal, coupled, solute_atoms=[0, 1, 2])


def test_cli_sample_explicit_with_ncmc_steps(tmp_path, capsys):
    """`confsample sample alanine-dipeptide-explicit --move diffusion --model M --ncmc-steps N` (issue 16.2):
    the shipped implicit-solvent model on the solute, protocols of N steps at the system's 2 fs, the usual
    summary plus the protocol's cost; N = 0 is the instantaneous move; Timewarp is refused in one sentence."""
    import json

    from openmm_confsample.cli import main
    from openmm_confsample.moves import torsion_diffusion

    torsion_diffusion._TOLD.clear()
    out_dir = tmp_path / "ncmc"
    with pytest.warns(UserWarning, match="without the water"):
        assert main(["sample", "alanine-dipeptide-explicit", "--model", "alanine-dipeptide", "--ncmc-steps", "10",
                     "--length-ps", "0.2", "--move-interval", "50", "--save-interval-ps", "0.1",
                     "--out", str(out_dir), "--quiet"]) == 0  # 2269 atoms: the CPU platform by default
    out = capsys.readouterr().out
    assert "NCMC: 10-step protocols" in out and "MD-step equivalents per move" in out
    summary = json.load(open(out_dir / "summary.json"))
    stats = summary["move_statistics"]
    assert summary["settings"]["timestep_fs"] == 2.0 and summary["n_frames"] == 2
    assert summary["settings"]["platform"] == "CPU"
    assert stats["n_moves"] == 2 and stats["ncmc_steps"] == 10 and stats["n_protocols"] == 2
    assert stats["md_step_equivalents_per_move"] >= 5  # at least the first half of each protocol
    assert main(["sample", "alanine-dipeptide-explicit", "--model", "alanine-dipeptide", "--ncmc-steps", "0",
                 "--length-ps", "0.2", "--move-interval", "50", "--save-interval-ps", "0.1", "--platform", "CPU",
                 "--out", str(tmp_path / "instant"), "--quiet"]) == 0
    stats = json.load(open(tmp_path / "instant" / "summary.json"))["move_statistics"]
    assert stats["ncmc_steps"] == 0 and stats["n_protocols"] == 0 and stats["n_moves"] == 2
    assert main(["sample", "alanine-dipeptide-explicit", "--model", "alanine-dipeptide", "--ncmc-steps", "10",
                 "--ncmc-protocol", "drive", "--length-ps", "0.1", "--move-interval", "50", "--save-interval-ps", "0.1",
                 "--out", str(tmp_path / "drive"), "--quiet"]) == 0
    stats = json.load(open(tmp_path / "drive" / "summary.json"))["move_statistics"]
    assert stats["n_protocols"] == 1 and stats["n_protocol_steps"] == 10 and "mean_drive_miss_rad" in stats
    assert main(["sample", "alanine-dipeptide-explicit", "--move", "timewarp", "--model",
                 "alanine-dipeptide-timewarp", "--ncmc-steps", "10", "--out", str(tmp_path / "tw")]) == 2
    assert "Timewarp proposes every atom's position" in capsys.readouterr().err
