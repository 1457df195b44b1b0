"""Torsions chosen by the user, shipped models by name, and moves made straight from an openmm.app.Simulation."""

import os

import numpy as np
import openmm
import openmm.app as app
import pytest
from openmm import unit

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.selection import candidate_torsions, select_torsions, torsion_table
from openmm_confsample.models import shipped_model_path
from openmm_confsample.models.shipped import SHIPPED_MODELS, resolve_model_path, shipped_models
from openmm_confsample.moves import LearnedMoveReporter, TimewarpMove, TorsionDiffusionMove
from openmm_confsample.systems import get_system, system_from_simulation
from openmm_confsample.testing import four_atom_torsion_system


@pytest.fixture(scope="module")
def ala():
    return get_system("alanine-dipeptide-implicit")


def test_selection_by_name_kind_and_all(ala):
    assert select_torsions(ala) == ala.torsions
    assert select_torsions(ala, "all") == {"phi": (4, 6, 8, 14), "psi": (6, 8, 14, 16)}
    assert list(select_torsions(ala, "psi")) == ["psi"]
    with_rotors = select_torsions(ala, "all", include_methyl=True)
    assert len(with_rotors) == 5 and sum(name.startswith("methyl") for name in with_rotors) == 3
    assert list(select_torsions(ala, "methyl", include_methyl=True)) == [n for n in with_rotors if n.startswith("methyl")]


def test_selection_refuses_what_the_system_does_not_have(ala):
    with pytest.raises(ConfSampleError, match="no torsion named or of kind 'chi1'.*phi, psi"):
        select_torsions(ala, "phi,chi1")
    chain = four_atom_torsion_system()
    chain.torsions = {}
    with pytest.raises(ConfSampleError, match="names no torsions"):
        select_torsions(chain)


def test_a_molecule_without_hydrogens_gets_one_sentence():
    """Bond orders of non-peptides come from RDKit, which needs the hydrogens (the 4-atom test chain has none)."""
    chain = four_atom_torsion_system()
    chain.torsions = {}
    with pytest.raises(ConfSampleError, match="could not assign bond orders"):
        candidate_torsions(chain)


def test_torsion_table_names_the_atoms(ala):
    rows = torsion_table(ala)
    assert rows[0] == ("phi", (4, 6, 8, 14), "ACE1:C-ALA2:N-ALA2:CA-ALA2:C")
    assert rows[1][2] == "ALA2:N-ALA2:CA-ALA2:C-NME3:N"


def test_shipped_models_by_name():
    names = [model.name for model in shipped_models()]
    assert {"alanine-dipeptide", "alanine-dipeptide-timewarp"} <= set(names)
    for model in shipped_models():
        assert os.path.isfile(model.path) and model.kind in ("diffusion", "timewarp", "fragment") and model.trained_on
    assert resolve_model_path("alanine-dipeptide") == SHIPPED_MODELS["alanine-dipeptide"].path
    assert shipped_model_path("alanine_dipeptide_timewarp.pt") == SHIPPED_MODELS["alanine-dipeptide-timewarp"].path
    with pytest.raises(ConfSampleError, match="is a diffusion model, not a timewarp model"):
        resolve_model_path("alanine-dipeptide", kind="timewarp")
    with pytest.raises(ConfSampleError, match="not a shipped model .* does not exist"):
        resolve_model_path("no-such-model")


def _simulation(ala, integrator=None, positions=True):
    integrator = integrator or openmm.LangevinMiddleIntegrator(310 * unit.kelvin, 1 / unit.picosecond,
                                                               1 * unit.femtosecond)
    simulation = app.Simulation(ala.topology, ala.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    if positions:
        simulation.context.setPositions(ala.positions_nm)
    return simulation


def test_a_move_is_made_from_a_simulation(ala):
    simulation = _simulation(ala)
    molsys = system_from_simulation(simulation)
    assert molsys.temperature_K == pytest.approx(310.0) and molsys.fingerprint() == ala.fingerprint()
    move = TorsionDiffusionMove("alanine-dipeptide", simulation, seed=3)
    simulation.reporters.append(LearnedMoveReporter(move, interval=10))
    simulation.step(200)
    assert move.statistics["n_proposed"] == 20
    np.testing.assert_array_equal(move.proposal.torsion_set.torsions, ala.torsion_array)


def test_a_move_from_a_simulation_refuses_what_it_cannot_use(ala):
    with pytest.raises(ConfSampleError, match="positions are not set"):
        TorsionDiffusionMove("alanine-dipeptide", _simulation(ala, positions=False))
    with pytest.raises(ConfSampleError, match="has no temperature; pass temperature="):
        TorsionDiffusionMove("alanine-dipeptide", _simulation(ala, openmm.VerletIntegrator(0.001)))
    assert TorsionDiffusionMove("alanine-dipeptide", _simulation(ala, openmm.VerletIntegrator(0.001)),
                                temperature=300.0).statistics["n_proposed"] == 0
    with pytest.raises(ConfSampleError, match="is a diffusion model, not a timewarp model"):
        TimewarpMove("alanine-dipeptide", _simulation(ala))
    with pytest.raises(ConfSampleError, match="expected an openmm.app.Simulation or a MolecularSystem"):
        TorsionDiffusionMove("alanine-dipeptide", ala.system)
    vacuum = get_system("alanine-dipeptide-vacuum")
    vacuum.system.addForce(openmm.CMMotionRemover())
    water = app.Modeller(vacuum.topology, vacuum.positions_nm * unit.nanometer)
    water.addSolvent(app.ForceField("amber99sbildn.xml", "tip3p.xml"), padding=0.5 * unit.nanometer)
    solvated_system = app.ForceField("amber99sbildn.xml", "tip3p.xml").createSystem(water.topology)
    solvated = app.Simulation(water.topology, solvated_system, openmm.VerletIntegrator(0.001))
    solvated.context.setPositions(water.positions)
    with pytest.raises(ConfSampleError, match="another topology"):
        TorsionDiffusionMove("alanine-dipeptide", solvated, temperature=300.0)
