"""Peptide systems built by the package (systems.peptides): build, energy, minimisation, torsions, cache."""

import json
import os

import numpy as np
import openmm
import pytest
from openmm import unit

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.systems import get_system, peptides

#: chi angles rigid rotations can turn (ring torsions such as Pro chi1 are left out)
EXPECTED_CHI = {"ALA": 0, "GLY": 0, "PRO": 0, "VAL": 1, "THR": 1, "SER": 1, "ILE": 2, "LEU": 2, "PHE": 2, "TRP": 2,
                "ASN": 2, "ASP": 2, "MET": 3, "GLU": 3, "LYS": 4, "GLN": 3, "ARG": 4, "CYS": 1, "HIS": 2, "TYR": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Builds go to a fresh cache folder for this module (never the user's)."""
    folder = tmp_path_factory.mktemp("confsample-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONFSAMPLE_CACHE", str(folder))
        yield folder


def _energy_and_reminimised(molsys):
    context = molsys.create_context("Reference")
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 2000)
    again = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    return energy, again


def _l_chirality(molsys):
    """Signed volume (N - CA, C - CA, CB - CA) of every non-Gly residue: positive for L amino acids (checked on openmmtools alanine dipeptide)."""
    x = molsys.positions_nm
    signs = []
    for residue in molsys.topology.residues():
        atoms = {a.name: a.index for a in residue.atoms()}
        if {"N", "CA", "C", "CB"} <= set(atoms):
            a, b, c = (x[atoms[n]] - x[atoms["CA"]] for n in ("N", "C", "CB"))
            signs.append(np.sign(np.dot(np.cross(a, b), c)))
    return signs


def _beta_chirality(molsys):
    """Signed volume (CA, OG1 or CG1, CG2) about CB of Thr and Ile: +1 in trpzip2's NMR model (L-Thr, L-Ile)."""
    x = molsys.positions_nm
    signs = []
    for residue in molsys.topology.residues():
        atoms = {a.name: a.index for a in residue.atoms()}
        if residue.name in ("THR", "ILE"):
            a, b, c = (x[atoms[n]] - x[atoms["CB"]] for n in ("CA", "OG1" if residue.name == "THR" else "CG1", "CG2"))
            signs.append(np.sign(np.dot(np.cross(a, b), c)))
    return signs


def _check_built(molsys, n_residues):
    energy, again = _energy_and_reminimised(molsys)
    assert np.isfinite(energy)
    # minimised before caching; the PDB's 0.001 A rounding leaves a few kJ/mol at most
    assert energy - again < 5.0, (molsys.name, energy, again)
    assert abs(energy - molsys.build_record["minimised_energy_kJ_per_mol"]) < 5.0
    assert len(list(molsys.topology.residues())) == n_residues
    assert not any(r.name in ("HOH", "WAT", "NA", "CL", "Cl-") for r in molsys.topology.residues())
    assert set(_l_chirality(molsys)) <= {1.0}  # every CA an L centre (Gly has none)
    assert set(_beta_chirality(molsys)) <= {1.0}
    assert "amber99_obc.xml" in molsys.description


def test_alanine_dipeptide_reference_chirality():
    assert _l_chirality(get_system("alanine-dipeptide-vacuum")) == [1.0]


@pytest.mark.slow
@pytest.mark.parametrize("code", peptides.DIPEPTIDE_RESIDUES)
def test_dipeptide_builds_minimised_with_named_torsions(cache, code):
    molsys = get_system(f"dipeptide-{code}")
    assert molsys.name == f"dipeptide-{code}"
    names = [r.name for r in molsys.topology.residues()]
    assert names[0] == "ACE" and names[2] == "NME"
    kinds = sorted(name.split(":")[0] for name in molsys.torsions)
    backbone = ["psi"] if code == "PRO" else ["phi", "psi"]  # Pro phi turns a ring bond: left out
    assert kinds == sorted(backbone + [f"chi{i}" for i in range(1, EXPECTED_CHI[code] + 1)])
    assert all(name.endswith(f"{names[1]}2") for name in molsys.torsions)
    _check_built(molsys, 3)


def test_dipeptide_charges_at_ph7(cache):
    for code, charge in (("LYS", 1), ("ARG", 1), ("ASP", -1), ("HIS", 0), ("VAL", 0)):
        molsys = get_system(f"dipeptide-{code}")
        force = next(f for f in molsys.system.getForces() if isinstance(f, openmm.NonbondedForce))
        total = sum(force.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                    for i in range(force.getNumParticles()))
        assert total == pytest.approx(charge, abs=1e-4)


@pytest.mark.slow
def test_pentapeptides_and_trpzip2(cache):
    ala5 = get_system("pentapeptide-AAAAA")
    assert [r.name for r in ala5.topology.residues()] == ["ACE"] + ["ALA"] * 5 + ["NME"]
    assert sorted(ala5.torsions) == sorted(f"{k}:ALA{i}" for i in range(2, 7) for k in ("phi", "psi"))
    _check_built(ala5, 7)
    mixed = get_system("pentapeptide-KVPFE")
    assert [r.name for r in mixed.topology.residues()] == ["ACE", "LYS", "VAL", "PRO", "PHE", "GLU", "NME"]
    assert "phi:PRO4" not in mixed.torsions and "psi:PRO4" in mixed.torsions and "chi4:LYS2" in mixed.torsions
    _check_built(mixed, 7)
    trpzip = get_system("trpzip2-implicit")
    assert [r.name for r in trpzip.topology.residues()] == ["SER", "TRP", "THR", "TRP", "GLU", "ASN", "GLY", "LYS",
                                                             "TRP", "THR", "TRP", "LYS"]
    assert trpzip.n_atoms == 218
    for number in (2, 4, 9, 11):
        assert {f"chi1:TRP{number}", f"chi2:TRP{number}", f"phi:TRP{number}", f"psi:TRP{number}"} <= set(trpzip.torsions)
    assert "phi:SER1" not in trpzip.torsions and "psi:LYS12" not in trpzip.torsions  # charged termini
    _check_built(trpzip, 12)


def test_second_build_comes_from_the_cache(cache, monkeypatch):
    first = peptides.dipeptide("SER")
    record_path = os.path.join(peptides.cache_dir(), "dipeptide-SER.json")
    assert os.path.isfile(record_path) and os.path.isfile(record_path[:-5] + ".pdb")

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(peptides, "_complete_with_pdbfixer", no_build)
    second = peptides.dipeptide("SER")
    np.testing.assert_allclose(second.positions_nm, first.positions_nm)
    assert second.torsions == first.torsions
    # an entry written by another builder version is rebuilt
    with open(record_path) as handle:
        record = json.load(handle)
    record["builder_version"] = -1
    with open(record_path, "w") as handle:
        json.dump(record, handle)
    with pytest.raises(AssertionError, match="rebuilt"):
        peptides.dipeptide("SER")


def test_capped_peptide_sequence_forms(cache):
    one = peptides.capped_peptide("A")
    assert [r.name for r in one.topology.residues()] == ["ACE", "ALA", "NME"] and one.name == "peptide-A"
    assert peptides.capped_peptide(["ALA"]).n_atoms == one.n_atoms
    assert peptides.capped_peptide("ALA").n_atoms == one.n_atoms


def test_bad_residues_are_refused_in_one_sentence(cache):
    with pytest.raises(ConfSampleError, match="'XYZ' is not one of the 20 standard amino acids"):
        peptides.dipeptide("XYZ")
    with pytest.raises(ConfSampleError, match="'B' is not one of the 20 standard"):
        peptides.capped_peptide("AB")
    with pytest.raises(ConfSampleError, match="sequence is empty"):
        peptides.capped_peptide([])


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CONFSAMPLE_CACHE", str(tmp_path / "c"))
    assert peptides.cache_dir() == str(tmp_path / "c" / "systems")
    monkeypatch.delenv("CONFSAMPLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert peptides.cache_dir() == str(tmp_path / "x" / "openmm-confsample" / "systems")
