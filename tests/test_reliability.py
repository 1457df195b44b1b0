"""Faults a user's run meets (issue 13): no silent acceptance, no leak, no state left that was never accepted."""

import copy
import math
import tracemalloc

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.faults import FaultyProposal as Faulty
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.moves.proposals import VonMisesTorsionProposal
from openmm_confsample.moves.reporter import LearnedMoveReporter, apply_learned_move
from openmm_confsample.runner import langevin_context, run_engine_steps
from openmm_confsample.testing import four_atom_torsion_system

_NM = unit.nanometer


@pytest.fixture(scope="module")
def chain():
    molsys = four_atom_torsion_system()
    return molsys, TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array)


def _positions(context):
    return context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(_NM)


def test_plus_inf_correction_is_rejected_and_counted(chain):
    """Before the fix a +inf log-correction was accepted whatever the energy and counted nowhere."""
    molsys, torsions = chain
    engine = MetropolisHastingsEngine(Faulty(VonMisesTorsionProposal(torsions, kappa=1.0), "+inf", rate=1.0), seed=1)
    context = molsys.create_context()
    start = _positions(context)
    for _ in range(200):
        engine.step(context, molsys.kT)
    stats = engine.statistics
    assert stats["n_accepted"] == 0 and stats["n_nonfinite"] == 200
    np.testing.assert_array_equal(_positions(context), start)


def test_minus_inf_correction_is_counted_as_impossible(chain):
    molsys, torsions = chain
    engine = MetropolisHastingsEngine(Faulty(VonMisesTorsionProposal(torsions, kappa=1.0), "-inf", rate=1.0), seed=1)
    context = molsys.create_context()
    for _ in range(50):
        engine.step(context, molsys.kT)
    assert engine.statistics["n_impossible"] == 50 and engine.statistics["n_accepted"] == 0


@pytest.mark.parametrize("fault", ["nan_positions", "inf_positions", "nan", "+inf", "-inf", "clash"])
def test_fault_injection_with_md(chain, fault):
    """MD + faulty moves: no crash, no non-finite state, counters add up, temperature near the thermostat."""
    molsys, torsions = chain
    proposal = Faulty(VonMisesTorsionProposal(torsions, kappa=1.0), fault, rate=0.3)
    engine = MetropolisHastingsEngine(proposal, n_proposals=4, seed=3)
    context = langevin_context(molsys, timestep_fs=1.0, friction_per_ps=5.0, seed=2, minimize=False)
    integrator = context.getIntegrator()
    kinetic = []
    n_iterations = 2500
    for _ in range(n_iterations):
        integrator.step(5)
        run_engine_steps(context, engine, molsys.kT, n_attempts=2)
        state = context.getState(getEnergy=True, getPositions=True)
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        assert math.isfinite(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert np.isfinite(_positions(context)).all()
    stats = engine.statistics
    assert stats["n_proposed"] == n_iterations * 2 * 4
    assert stats["n_accepted"] > 0
    faulty = stats["n_impossible"] if fault == "-inf" else stats["n_nonfinite"]
    assert faulty > 0.2 * stats["n_proposed"]
    # 4 atoms, no constraints, no CM removal force: 12 degrees of freedom.
    temperature = 2 * np.mean(kinetic) / (12 * unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin))
    assert abs(temperature - molsys.temperature_K) < 15.0, temperature


def test_raise_after_acceptance_leaves_accepted_state_with_corrected_velocities(chain):
    """A proposal raising on its re-proposal after an acceptance (n_proposals > 1): before the fix the
    velocity correction was skipped and the Context held an accepted candidate nobody counted."""
    molsys, torsions = chain
    inner = VonMisesTorsionProposal(torsions, kappa=0.0)  # uniform: accepted often on this chain
    # raise on the second call: the first call's batch must contain an acceptance, so try seeds until one does
    for seed in range(50):
        proposal = Faulty(inner, None, rate=0.0, raise_on_call=2)
        engine = MetropolisHastingsEngine(proposal, n_proposals=8, seed=seed)
        context = langevin_context(molsys, timestep_fs=1.0, seed=seed, minimize=False)
        with pytest.raises(RuntimeError, match="proposal failed"):
            run_engine_steps(context, engine, molsys.kT)
        if engine.last_result.n_accepted:
            break
    assert engine.last_result.n_accepted == 1
    assert engine.statistics["n_accepted"] == 1
    np.testing.assert_allclose(_positions(context), engine.last_result.positions_nm)


def test_velocity_correction_uses_the_forces_of_the_state_the_moves_end_in(chain):
    """The engine hands back the accepted candidate's forces (read with its energy) and the half-step velocity
    correction uses them instead of a second evaluation: they must be the final state's, also when several
    engine steps each accepted a candidate."""
    molsys, torsions = chain
    for seed in range(20):
        engine = MetropolisHastingsEngine(VonMisesTorsionProposal(torsions, kappa=0.0), n_proposals=3, seed=seed)
        context = langevin_context(molsys, timestep_fs=1.0, seed=seed, minimize=False)
        before = context.getState(getForces=True, getVelocities=True)
        forces_before = before.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        velocities = before.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        accepted = run_engine_steps(context, engine, molsys.kT, n_attempts=4)
        if accepted >= 2:
            break
    assert accepted >= 2
    after = context.getState(getForces=True, getVelocities=True)
    forces_after = after.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    masses = np.array([molsys.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(molsys.n_atoms)])
    expected = velocities + 0.5e-3 * (forces_before - forces_after) / masses[:, None]
    np.testing.assert_allclose(after.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
                               expected, rtol=1e-6, atol=1e-9)
    assert not np.allclose(forces_before, forces_after)  # the check can fail: the moves changed the forces


def test_interrupt_during_energy_restores_the_accepted_state(chain):
    molsys, torsions = chain
    context = molsys.create_context()
    start = _positions(context)

    class InterruptingContext:
        """The real Context, with a KeyboardInterrupt at the third energy evaluation."""

        def __init__(self, context):
            self.context, self.n = context, 0

        def getState(self, **kwargs):
            if kwargs.get("getEnergy") and not kwargs.get("getPositions"):
                self.n += 1
                if self.n == 3:
                    raise KeyboardInterrupt
            return self.context.getState(**kwargs)

        def __getattr__(self, name):
            return getattr(self.context, name)

    engine = MetropolisHastingsEngine(VonMisesTorsionProposal(torsions, kappa=1.0), n_proposals=8, seed=0)
    engine.proposal.check_system(context.getSystem())
    engine.rng = np.random.default_rng(0)
    wrapped = InterruptingContext(context)
    with pytest.raises(KeyboardInterrupt):
        engine.step(wrapped, 1e-6 + molsys.kT * 1e-3)  # cold: nothing is accepted, so the start is the last state
    np.testing.assert_array_equal(_positions(context), start)
    assert engine.statistics["n_proposed"] == 3 and engine.statistics["n_accepted"] == 0


@pytest.mark.parametrize("kT", [0.0, -1.0, float("nan"), 300.0])
def test_engine_refuses_bad_kT(chain, kT):
    molsys, torsions = chain
    engine = MetropolisHastingsEngine(VonMisesTorsionProposal(torsions, kappa=1.0), seed=0)
    with pytest.raises(ConfSampleError, match="kT"):
        engine.step(molsys.create_context(), kT)


def test_bad_attempts_and_temperature_are_refused_at_construction(chain):
    molsys, torsions = chain
    proposal = VonMisesTorsionProposal(torsions, kappa=1.0)
    context = langevin_context(molsys, timestep_fs=1.0, seed=0, minimize=False)
    with pytest.raises(ConfSampleError, match="n_attempts"):
        apply_learned_move(context, proposal, n_attempts=-3)
    with pytest.raises(ConfSampleError, match="n_attempts"):
        LearnedMoveReporter(proposal, interval=10, n_attempts=0)
    with pytest.raises(ConfSampleError, match="temperature"):
        LearnedMoveReporter(proposal, interval=10, temperature=-5)
    with pytest.raises(ConfSampleError, match="n_attempts"):
        LearnedMCMCMove(proposal, n_attempts=-3)


def test_saving_a_move_does_not_change_its_future(chain):
    molsys, torsions = chain
    moves = [LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=1.0), seed=7) for _ in range(2)]
    moves[0].__getstate__()  # what openmmtools storage does when it writes a move
    draws = [m.engine.rng.random(5) for m in moves]
    np.testing.assert_array_equal(draws[0], draws[1])
    clone = copy.deepcopy(moves[0])  # a copy gets its own stream, the parent's continues unchanged
    assert not np.array_equal(clone.engine.rng.random(5), moves[1].engine.rng.random(5))


def test_stored_move_restores_the_same_stream(chain):
    molsys, torsions = chain
    move = LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=1.0), seed=7)
    state = move.__getstate__()
    restored = LearnedMCMCMove.__new__(LearnedMCMCMove)
    restored.__setstate__(state)
    np.testing.assert_array_equal(restored.engine.rng.random(5), move.engine.rng.random(5))


def test_tampered_storage_cannot_import_a_module(chain):
    import sys

    molsys, torsions = chain
    state = LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=1.0), seed=7).__getstate__()
    state["proposal_class"] = "this.Anything"
    sys.modules.pop("this", None)
    restored = LearnedMCMCMove.__new__(LearnedMCMCMove)
    with pytest.raises(ConfSampleError, match="not one of the package's own proposals"):
        restored.__setstate__(state)
    assert "this" not in sys.modules


@pytest.mark.slow
def test_reporter_memory_stays_flat(chain):
    """The README's one-line path kept one System wrapper per accepted move (27k after 27k acceptances)."""
    molsys, torsions = chain
    simulation = openmm.app.Simulation(molsys.topology, molsys.system,
                                       openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond,
                                                                       1 * unit.femtosecond),
                                       openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(molsys.positions_nm)
    reporter = LearnedMoveReporter(VonMisesTorsionProposal(torsions, kappa=0.0), interval=1)
    simulation.reporters.append(reporter)
    simulation.step(2000)  # warm-up: caches and allocator pools settle
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    simulation.step(20000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert reporter.statistics["n_accepted"] > 5000
    assert grown < 200_000, grown  # bytes; the leak grew by a few hundred bytes per acceptance


@pytest.mark.parametrize("fault", ["raising_proposal", "raising_force"])
def test_fault_injection_with_raising_proposals_and_forces(chain, fault):
    """A proposal or a force that raises mid-run: the loop catches it and goes on; nothing non-finite is left,
    the counters add up, and the run stays at the thermostat's temperature. The 4-atom chain's kinetic
    temperature (12 degrees of freedom) is noisy: over seeds 3-8 runs of this length gave 295 +- 4 K (mean,
    error of the mean) with a spread of 10-17 K per run, so a heating fault (+64 K on alanine before the fix,
    1e19 K with a +inf correction) is what 45 K (3 sigma) catches. 10^5 moves: benchmarks/fault_injection.py."""
    from openmm_confsample.faults import run_fault_injection

    _, torsions = chain
    report = run_fault_injection(four_atom_torsion_system(), VonMisesTorsionProposal(torsions, kappa=1.0), fault,
                                 40000, seed=2)
    assert report.n_raised > 500 and report.n_accepted > 500
    assert report.n_nonfinite_states == 0 and report.counters_add_up
    if fault == "raising_force":
        assert report.n_rejected_faulty > 0  # energies OpenMM could not evaluate: rejected, not accepted
    assert abs(report.temperature_K - 300.0) < 45.0, report.temperature_K
