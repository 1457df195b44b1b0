import numpy as np
import openmm
import openmm.app as app
import pytest
from openmm import unit

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.systems import (EnergyEvaluator, get_system, list_systems, resolve_system, system_from_openmm,
                                       system_from_pdb)
from openmm_confsample.units import to_nm


@pytest.mark.parametrize("name", ["alanine-dipeptide-implicit", "alanine-dipeptide-vacuum"])
def test_registry_systems_build_with_finite_energy(name):
    molsys = get_system(name)
    assert molsys.n_atoms == 22
    assert molsys.torsions == {"phi": (4, 6, 8, 14), "psi": (6, 8, 14, 16)}
    assert molsys.temperature_K == 300.0
    assert not molsys.has_constraints
    energy = EnergyEvaluator(molsys).energies(molsys.positions_nm)
    assert np.isfinite(energy)
    assert molsys.masses_amu.sum() == pytest.approx(144.17, abs=0.05)  # C6 H12 N2 O2


def test_registry_lists_both_alanine_systems():
    assert {"alanine-dipeptide-implicit", "alanine-dipeptide-vacuum"} <= set(list_systems())


def test_implicit_solvent_differs_from_vacuum():
    implicit, vacuum = get_system("alanine-dipeptide-implicit"), get_system("alanine-dipeptide-vacuum")
    forces = {type(f).__name__ for f in implicit.system.getForces()}
    assert "GBSAOBCForce" in forces
    assert "GBSAOBCForce" not in {type(f).__name__ for f in vacuum.system.getForces()}
    assert implicit.fingerprint() == vacuum.fingerprint()


def test_user_system_works_like_a_named_one(tmp_path):
    named = get_system("alanine-dipeptide-vacuum")
    user = system_from_openmm(named.system, named.topology, named.positions_nm * unit.nanometer,
                              temperature=310 * unit.kelvin)
    assert user.torsions == named.torsions
    assert user.temperature_K == 310.0
    pdb = tmp_path / "ala.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(named.topology, named.positions_nm * unit.nanometer, handle)
    from_pdb = system_from_pdb(str(pdb), ("amber99sbildn.xml",))
    assert from_pdb.fingerprint() == named.fingerprint()
    assert resolve_system(str(pdb)).n_atoms == 22
    e_named = EnergyEvaluator(named).energies(named.positions_nm)
    assert EnergyEvaluator(from_pdb).energies(from_pdb.positions_nm) == pytest.approx(e_named, abs=1e-2)


def test_energy_evaluator_marks_nan_conformations_inf():
    molsys = get_system("alanine-dipeptide-vacuum")
    batch = np.stack([molsys.positions_nm, molsys.positions_nm])
    batch[1, 3, 0] = np.nan
    energies = EnergyEvaluator(molsys).energies(batch)
    assert np.isfinite(energies[0]) and energies[1] == np.inf


def test_unknown_system_name_is_one_clear_sentence():
    with pytest.raises(ConfSampleError, match="unknown system 'alanine-tripeptide'"):
        get_system("alanine-tripeptide")


def test_pdb_the_force_field_cannot_match(tmp_path):
    pdb = tmp_path / "weird.pdb"
    pdb.write_text(
        "HETATM    1  C1  XYZ A   1       0.000   0.000   0.000  1.00  0.00           C\n"
        "HETATM    2  C2  XYZ A   1       1.500   0.000   0.000  1.00  0.00           C\nEND\n")
    with pytest.raises(ConfSampleError, match="cannot parametrize PDB file .*weird.pdb"):
        system_from_pdb(str(pdb), ("amber99sbildn.xml",))


def test_missing_pdb_file():
    with pytest.raises(ConfSampleError, match="does not exist"):
        system_from_pdb("/nonexistent/ala.pdb")


def test_wrong_units_and_nan_positions_are_refused():
    with pytest.raises(ConfSampleError, match="length units"):
        to_nm(np.zeros((3, 3)) * unit.kelvin)
    with pytest.raises(ConfSampleError, match="NaN"):
        to_nm(np.full((3, 3), np.nan))
    named = get_system("alanine-dipeptide-vacuum")
    with pytest.raises(ConfSampleError, match="22 particles.*21 rows"):
        system_from_openmm(named.system, named.topology, named.positions_nm[:21])
    with pytest.raises(ConfSampleError, match="temperature"):
        get_system("alanine-dipeptide-vacuum", temperature=-5)
