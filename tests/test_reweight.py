"""The study's reconstruct / reweight / validate pipeline: reweight.py and validation.py."""

import csv
import json
import os

import mdtraj
import numpy as np
import pytest
from scipy import stats

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.reweight import (
    KT_KCAL_298,
    boltzmann_weights,
    kish_effective_sample_size,
    openmm_energies,
    rebuild_conformers,
    resample,
    reweight_pipeline,
    template_molecule,
)
from openmm_confsample.units import kT_kJ_per_mol
from openmm_confsample.reweight import plot_validation, validate_structures


def _angle_difference(a, b):
    """Smallest signed difference a - b on the circle, same units as pi (radians)."""
    return (np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi


def _phi_psi(ala, positions_nm):
    traj = mdtraj.Trajectory(positions_nm, ala.mdtraj_topology())
    return mdtraj.compute_dihedrals(traj, ala.torsion_array)


@pytest.fixture(scope="module")
def mol(ala_implicit):
    return template_molecule(ala_implicit)


@pytest.fixture(scope="module")
def targets():
    # Random (phi, psi) plus the awkward corners: the +-pi seam and the alpha/beta basins.
    grid = np.deg2rad([[-179.9, 179.9], [180.0, -180.0], [-63.0, -42.0], [-150.0, 150.0], [60.0, 45.0]])
    return np.vstack([grid, np.random.default_rng(0).uniform(-np.pi, np.pi, size=(15, 2))])


# -- template ---------------------------------------------------------------------------------------

def test_template_atom_order_elements_and_bonds_match_topology(ala_implicit, mol):
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers

    assert mol.GetNumAtoms() == ala_implicit.n_atoms == 22
    assert [a.GetSymbol() for a in mol.GetAtoms()] == ala_implicit.elements
    rd_bonds = {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()}
    top_bonds = {tuple(sorted(b)) for b in ala_implicit.bonds.tolist()}
    assert rd_bonds == top_bonds
    # ACE-ALA-NME with its two amide C=O double bonds and L-alanine from the 3D structure.
    assert Chem.MolToSmiles(Chem.RemoveHs(mol)) == "CNC(=O)[C@H](C)NC(C)=O"
    double = sorted(tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()
                    if b.GetBondType() == Chem.BondType.DOUBLE)
    assert double == [(4, 5), (14, 15)]
    assert rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol)
    np.testing.assert_allclose(mol.GetConformer().GetPositions() / 10.0, ala_implicit.positions_nm, atol=1e-9)


# -- rebuilding -------------------------------------------------------------------------------------

def test_rebuilt_conformers_hit_targets_within_one_degree(ala_implicit, mol, targets):
    out = rebuild_conformers(mol, ala_implicit.torsions, targets, progress=False)
    positions, energies, reached, converged = out
    assert positions.shape == (len(targets), 22, 3) and energies.shape == (len(targets),)
    measured = _phi_psi(ala_implicit, positions)
    # mdtraj agrees with the torsions the function says it reached (float32 positions in mdtraj) ...
    assert np.abs(_angle_difference(measured, reached)).max() < 1e-4
    # ... and both are within 1 degree of the target.
    assert np.rad2deg(np.abs(_angle_difference(measured, targets))).max() < 1.0
    assert converged.all() and np.all(np.isfinite(energies))
    # MMFF94 keeps covalent geometry: every bond within 0.01 nm of the Amber-minimized template.
    i, j = ala_implicit.bonds.T
    template_lengths = np.linalg.norm(ala_implicit.positions_nm[i] - ala_implicit.positions_nm[j], axis=-1)
    lengths = np.linalg.norm(positions[:, i] - positions[:, j], axis=-1)
    assert np.abs(lengths - template_lengths).max() < 0.01
    assert 0.09 < lengths.min() and lengths.max() < 0.16
    # The template molecule is untouched.
    np.testing.assert_allclose(mol.GetConformer().GetPositions() / 10.0, ala_implicit.positions_nm, atol=1e-9)


def test_rebuild_without_optimization_is_rigid_rotation(ala_implicit, mol, targets):
    out = rebuild_conformers(mol, ala_implicit.torsions, targets[:4], optimize=False, progress=False)
    assert np.abs(_angle_difference(out.torsions_rad, targets[:4])).max() < 1e-6
    i, j = ala_implicit.bonds.T
    template_lengths = np.linalg.norm(ala_implicit.positions_nm[i] - ala_implicit.positions_nm[j], axis=-1)
    lengths = np.linalg.norm(out.positions_nm[:, i] - out.positions_nm[:, j], axis=-1)
    np.testing.assert_allclose(lengths, np.broadcast_to(template_lengths, lengths.shape), atol=1e-9)


# -- weights and resampling -------------------------------------------------------------------------

def test_boltzmann_weights_two_energies_exact_ratio():
    dE = 1.3  # kcal/mol
    w = boltzmann_weights([5.0, 5.0 + dE])
    assert w.sum() == pytest.approx(1.0, abs=1e-15)
    assert w[0] / w[1] == pytest.approx(np.exp(dE / KT_KCAL_298), rel=1e-12)
    assert KT_KCAL_298 == pytest.approx(0.5925, abs=1e-4)
    # Large offsets do not overflow; failed structures (inf) get weight 0.
    w = boltzmann_weights([1e6, 1e6 + 1.0, np.inf], kT=0.5)
    np.testing.assert_allclose(w, np.array([1.0, np.exp(-2.0), 0.0]) / (1.0 + np.exp(-2.0)), rtol=1e-12)


def test_kish_effective_sample_size():
    assert kish_effective_sample_size(np.ones(7)) == pytest.approx(7.0)
    assert kish_effective_sample_size([0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert kish_effective_sample_size([0.5, 0.25, 0.25]) == pytest.approx(1.0 / (0.25 + 2 * 0.0625))


def test_multinomial_resampling_frequencies_match_weights():
    weights = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 20000
    counts = np.bincount(resample(weights, n, seed=11), minlength=len(weights))
    # Pearson chi-square with 4 degrees of freedom; at a fixed seed this is deterministic, and a correct
    # sampler fails p > 0.001 only one seed in a thousand.
    _, p_value = stats.chisquare(counts, n * weights)
    assert p_value > 1e-3
    np.testing.assert_array_equal(resample(weights, 50, seed=3), resample(weights, 50, seed=3))


def test_systematic_resampling_counts_are_floor_or_ceil():
    weights = np.random.default_rng(2).random(13)
    p = weights / weights.sum()
    n = 1000
    counts = np.bincount(resample(weights, n, seed=5, method="systematic"), minlength=13)
    assert counts.sum() == n
    assert np.all(counts >= np.floor(n * p) - 1e-9) and np.all(counts <= np.ceil(n * p) + 1e-9)


# -- the pipeline -----------------------------------------------------------------------------------

def test_pipeline_writes_loadable_files(ala_implicit, targets, tmp_path):
    out_dir = tmp_path / "reweighted"
    result = reweight_pipeline(ala_implicit, targets, n_resample=30, seed=4, out_dir=str(out_dir), progress=False)
    names = sorted(os.listdir(out_dir))
    assert names == ["resampled.dcd", "resampled.pdb", "summary.json", "weights.csv"]

    pdb = mdtraj.load(str(out_dir / "resampled.pdb"))
    dcd = mdtraj.load(str(out_dir / "resampled.dcd"), top=str(out_dir / "resampled.pdb"))
    assert pdb.n_frames == dcd.n_frames == 30 and pdb.n_atoms == 22
    np.testing.assert_allclose(dcd.xyz, result.resampled_positions_nm, atol=1e-4)
    np.testing.assert_allclose(pdb.xyz, result.resampled_positions_nm, atol=1e-3)  # PDB keeps 0.001 nm
    # The resampled structures still sit at their target angles.
    measured = mdtraj.compute_dihedrals(dcd, ala_implicit.torsion_array)
    assert np.rad2deg(np.abs(_angle_difference(measured, targets[result.resampled_indices]))).max() < 1.0

    with open(out_dir / "weights.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(targets)
    weights = np.array([float(r["weight"]) for r in rows])
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose([float(r["phi_rad"]) for r in rows], targets[:, 0], atol=1e-6)
    assert sum(int(r["n_resampled"]) for r in rows) == 30
    energies = np.array([float(r["energy_kcal_per_mol"]) for r in rows])
    np.testing.assert_allclose(weights, boltzmann_weights(energies, result.kT), atol=1e-6)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n_structures"] == len(targets) and summary["n_resample"] == 30
    assert summary["ess_kish"] == pytest.approx(result.ess) and 1.0 <= result.ess <= len(targets)
    assert summary["energy_unit"] == "kcal/mol" and summary["max_torsion_deviation_deg"] < 1.0
    assert result.kT == pytest.approx(KT_KCAL_298)


def test_pipeline_with_openmm_energies(ala_implicit, targets):
    result = reweight_pipeline(ala_implicit, targets[:6], energy="openmm", progress=False)
    assert result.energy_unit == "kJ/mol" and result.kT == pytest.approx(kT_kJ_per_mol(298.15))
    np.testing.assert_allclose(result.energies, openmm_energies(ala_implicit, result.positions_nm))
    assert np.all(np.isfinite(result.energies))
    np.testing.assert_allclose(result.weights, boltzmann_weights(result.energies, result.kT))
    assert result.resampled_positions_nm.shape == (6, 22, 3)
    assert result.summary["smiles"] == "CNC(=O)[C@H](C)NC(C)=O"  # the molecule rebuilt is ACE-ALA-NME (L)


@pytest.mark.parametrize("angles, words", [
    (np.array([[-60.0, 140.0]]), "degrees"),
    (np.zeros((3, 3)), "(N, 2)"),
    (np.zeros(2), "(N, 2)"),
    (np.array([[0.1, np.nan]]), "NaN"),
])
def test_pipeline_rejects_bad_angles(ala_implicit, angles, words):
    with pytest.raises(ConfSampleError, match="angles_rad") as info:
        reweight_pipeline(ala_implicit, angles, progress=False)
    assert words in str(info.value)


def test_pipeline_rejects_bad_arguments(ala_implicit, tmp_path):
    angles = np.zeros((2, 2))
    with pytest.raises(ConfSampleError, match="out_dir"):
        reweight_pipeline(ala_implicit, angles, out_dir=str(tmp_path / "missing" / "out"), progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfSampleError, match="out_dir"):
        reweight_pipeline(ala_implicit, angles, out_dir=str(tmp_path / "a_file"), progress=False)
    with pytest.raises(ConfSampleError, match="energy"):
        reweight_pipeline(ala_implicit, angles, energy="amber", progress=False)
    with pytest.raises(ConfSampleError, match="n_resample"):
        reweight_pipeline(ala_implicit, angles, n_resample=0, progress=False)
    with pytest.raises(ConfSampleError, match="kT"):
        boltzmann_weights([0.0, 1.0], kT=0.0)
    with pytest.raises(ConfSampleError, match="energies"):
        boltzmann_weights([np.inf, np.nan])
    with pytest.raises(ConfSampleError, match="weights"):
        resample([0.5, -0.1], 3)
    with pytest.raises(ConfSampleError, match="method"):
        resample([0.5, 0.5], 3, method="stratified")


def test_rebuild_rejects_torsion_that_is_not_a_chain(ala_implicit, mol):
    with pytest.raises(ConfSampleError, match="not bonded"):
        rebuild_conformers(mol, [(0, 4, 8, 14)], np.zeros((1, 1)), progress=False)


# -- validation -------------------------------------------------------------------------------------

def test_validate_two_structures_implicit(ala_implicit, mol, tmp_path):
    start = rebuild_conformers(mol, ala_implicit.torsions, np.deg2rad([[-63.0, -42.0], [-150.0, 150.0]]),
                               progress=False).positions_nm
    result = validate_structures(ala_implicit, start, length_ps=1.0, seed=1, progress=False)
    assert result.time_ps.shape == (11,) and result.time_ps[-1] == pytest.approx(1.0)
    assert result.energies.shape == result.rmsd_nm.shape == (2, 11)
    assert np.all(np.isfinite(result.energies)) and np.all(np.isfinite(result.rmsd_nm))
    assert not result.failed.any()
    # Minimization from an MMFF94 structure moves heavy atoms by a few hundredths of a nm at most.
    assert np.all(result.rmsd_nm[:, 0] < 0.05)
    summary = result.summary
    assert summary["n_failed"] == 0 and 0.0 <= summary["fraction_stable"] <= 1.0
    assert summary["mean_final_rmsd_nm"] == pytest.approx(result.rmsd_nm[:, -1].mean())
    png = plot_validation(result, str(tmp_path / "validation.png"))
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
    # Same seed, same traces.
    again = validate_structures(ala_implicit, start, length_ps=1.0, seed=1, progress=False)
    np.testing.assert_allclose(again.energies, result.energies)


def test_validate_reports_blow_up_without_crashing(ala_implicit):
    # A 10 fs step without constraints is unstable: both runs must be marked failed, and the call return.
    result = validate_structures(ala_implicit, np.stack([ala_implicit.positions_nm] * 2), length_ps=1.0,
                                 timestep_fs=10.0, progress=False)
    assert result.failed.all() and result.summary["n_failed"] == 2
    assert all("blew up" in message for message in result.summary["failure_messages"])
    assert np.isfinite(result.energies[:, 0]).all() and np.isnan(result.energies[:, -1]).all()
    assert result.summary["fraction_stable"] == 0.0


def test_validate_rejects_bad_input(ala_implicit, tmp_path):
    with pytest.raises(ConfSampleError, match="solvent"):
        validate_structures(ala_implicit, ala_implicit.positions_nm, solvent="water", progress=False)
    with pytest.raises(ConfSampleError, match="positions"):
        validate_structures(ala_implicit, np.zeros((2, 21, 3)), progress=False)
    bad = ala_implicit.positions_nm.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ConfSampleError, match="NaN"):
        validate_structures(ala_implicit, bad, progress=False)
    with pytest.raises(ConfSampleError, match="length_ps"):
        validate_structures(ala_implicit, ala_implicit.positions_nm, length_ps=-1.0, progress=False)
    result = validate_structures(ala_implicit, ala_implicit.positions_nm, length_ps=0.1, progress=False)
    with pytest.raises(ConfSampleError, match="plot path"):
        plot_validation(result, str(tmp_path / "missing" / "plot.png"))


@pytest.mark.slow
def test_validate_explicit_solvent_short(ala_implicit):
    result = validate_structures(ala_implicit, ala_implicit.positions_nm, length_ps=0.2, equilibration_ps=0.1,
                                 report_interval_ps=0.05, solvent="explicit", minimize_max_iterations=100,
                                 seed=2, progress=False)
    assert result.energies.shape == (1, 5) and not result.failed.any()
    assert np.all(np.isfinite(result.energies)) and np.all(np.isfinite(result.rmsd_nm))
    assert result.summary["n_atoms_simulated"][0] > 500  # solute + water
    assert result.summary["timestep_fs"] == 2.0 and result.summary["platform"] == "CPU"
    assert np.all(result.rmsd_nm < 0.2)
