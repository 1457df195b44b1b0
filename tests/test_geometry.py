"""Torsion geometry: dihedral measurement, rigid torsion rotations, rotatable-bond detection.

Tolerances: positions are float64 in nm, so a rigid rotation keeps bond lengths and angles
to ~1e-15 relative; the asserted 1e-6 nm / 1e-6 rad is the package contract. mdtraj computes
dihedrals in float32, hence 1e-5 rad there.
"""

import importlib.util
import os

import mdtraj as md
import numpy as np
import openmm.app as app
import pytest
from openmm import unit
from rdkit import Chem
from rdkit.Chem import AllChem
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.rotatable import detect_rotatable_torsions
from openmm_confsample.geometry.torsions import TorsionSet, dihedral_angles, moving_atoms

PHI, PSI = (4, 6, 8, 14), (6, 8, 14, 16)


def _ala_pdb_path():
    # find_spec locates openmmtools' data without importing it (the import is slow and noisy).
    root = os.path.dirname(importlib.util.find_spec("openmmtools").origin)
    return os.path.join(root, "data", "alanine-dipeptide-explicit", "alanine-dipeptide.pdb")


@pytest.fixture(scope="module")
def ala_pdb():
    return app.PDBFile(_ala_pdb_path())


@pytest.fixture(scope="module")
def ala(ala_pdb):
    """(openmm Topology without water, positions (22, 3) nm, bonds (21, 2))."""
    modeller = app.Modeller(ala_pdb.topology, ala_pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name == "HOH"])
    top = modeller.topology
    x = np.array(modeller.positions.value_in_unit(unit.nanometer))
    bonds = np.array([(b[0].index, b[1].index) for b in top.bonds()])
    return top, x, bonds


def _rdkit_mol(smiles, seed=7):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    return mol


def _openmm_topology_from_rdkit(mol, with_bonds, with_orders=False, residue_name="LIG"):
    top = app.Topology()
    residue = top.addResidue(residue_name, top.addChain())
    atoms = [top.addAtom(f"{a.GetSymbol()}{a.GetIdx()}",
                         app.Element.getByAtomicNumber(a.GetAtomicNum()), residue)
             for a in mol.GetAtoms()]
    kinds = {Chem.BondType.SINGLE: (app.Single, 1), Chem.BondType.DOUBLE: (app.Double, 2),
             Chem.BondType.AROMATIC: (app.Aromatic, None), Chem.BondType.TRIPLE: (app.Triple, 3)}
    if with_bonds:
        for b in mol.GetBonds():
            kind, order = kinds[b.GetBondType()] if with_orders else (None, None)
            top.addBond(atoms[b.GetBeginAtomIdx()], atoms[b.GetEndAtomIdx()], kind, order)
    return top, mol.GetConformer().GetPositions() / 10.0  # Angstrom -> nm


def _angles(bonds, n_atoms):
    neighbours = [set() for _ in range(n_atoms)]
    for a, b in bonds:
        neighbours[a].add(b)
        neighbours[b].add(a)
    return np.array([(a, b, c) for b in range(n_atoms) for a in neighbours[b]
                     for c in neighbours[b] if a < c])


def _bond_lengths(x, bonds):
    return np.linalg.norm(x[..., bonds[:, 0], :] - x[..., bonds[:, 1], :], axis=-1)


def _bond_angles(x, angles):
    u = x[..., angles[:, 0], :] - x[..., angles[:, 1], :]
    v = x[..., angles[:, 2], :] - x[..., angles[:, 1], :]
    cos = (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def _wrapped(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def _all_ala_rotors(ala):
    top, _, bonds = ala
    return TorsionSet.from_topology(top, detect_rotatable_torsions(top, include_methyl=True))


def _assert_rigid_torsion_change(ts, bonds, before, after, targets=None):
    angles = _angles(bonds, ts.n_atoms)
    np.testing.assert_allclose(_bond_lengths(after, bonds), _bond_lengths(before, bonds), atol=1e-6)
    np.testing.assert_allclose(_bond_angles(after, angles), _bond_angles(before, angles), atol=1e-6)
    fixed = ~ts.moving_mask.any(axis=0)
    assert np.array_equal(after[..., fixed, :], before[..., fixed, :])
    if targets is not None:
        assert np.abs(_wrapped(ts.values(after) - targets)).max() < 1e-6


# ---------------------------------------------------------------------------------------
# dihedral_angles
# ---------------------------------------------------------------------------------------

def test_dihedral_angles_match_mdtraj_on_every_bonded_chain(ala, rng):
    top, x, bonds = ala
    angles = _angles(bonds, len(x))
    chains = np.array([(a, b, c, d) for a, b, c in angles for d in range(len(x))
                       if d not in (a, b) and ((c, d) in map(tuple, bonds) or (d, c) in map(tuple, bonds))])
    frames = x + rng.normal(scale=0.02, size=(8, len(x), 3))
    frames[0] = x
    traj = md.Trajectory(frames, md.Topology.from_openmm(top))
    expected = md.compute_dihedrals(traj, chains, periodic=False)
    got = dihedral_angles(frames, chains)
    assert got.shape == (8, len(chains))
    assert np.abs(_wrapped(got - expected)).max() < 1e-5
    assert got.min() >= -np.pi and got.max() < np.pi
    np.testing.assert_array_equal(dihedral_angles(x, chains), got[0])


def test_dihedral_sign_convention_and_units():
    x = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    assert dihedral_angles(x, [0, 1, 2, 3]) == pytest.approx([-np.pi / 2])
    x[3] = [0, 1, -1]
    assert dihedral_angles(x * unit.nanometer, [[0, 1, 2, 3]]) == pytest.approx([np.pi / 2])
    x[3] = [-1, 1, 0]  # trans: +pi is reported as -pi
    assert dihedral_angles(x, [[0, 1, 2, 3]])[0] == -np.pi


# ---------------------------------------------------------------------------------------
# moving_atoms
# ---------------------------------------------------------------------------------------

def test_alanine_dipeptide_moving_sides(ala):
    _, x, bonds = ala
    np.testing.assert_array_equal(moving_atoms(bonds, 22, PHI), [0, 1, 2, 3, 4, 5, 7])  # ACE + H
    np.testing.assert_array_equal(moving_atoms(bonds, 22, PSI), list(range(15, 22)))  # O + NME
    ts = TorsionSet(bonds, 22, [PHI, PSI], names=["phi", "psi"])
    assert ts.moves_i_side.tolist() == [True, False]
    assert ts.names == ["phi", "psi"] and ts.n_atoms == 22
    np.testing.assert_array_equal(ts.torsions, [PHI, PSI])


def test_moving_side_is_the_smaller_side_of_every_rotor(ala):
    top, _, bonds = ala
    ts = _all_ala_rotors(ala)
    assert len(ts) == 5
    for (i, j, k, l), moving in zip(ts.torsions, ts.moving_indices):
        keep = ~(((bonds[:, 0] == j) & (bonds[:, 1] == k)) | ((bonds[:, 0] == k) & (bonds[:, 1] == j)))
        graph = coo_matrix((np.ones(keep.sum()), (bonds[keep, 0], bonds[keep, 1])), shape=(22, 22))
        _, label = connected_components(graph, directed=False)
        j_side, k_side = np.flatnonzero(label == label[j]), np.flatnonzero(label == label[k])
        smaller = j_side if len(j_side) < len(k_side) else k_side
        np.testing.assert_array_equal(moving, np.setdiff1d(smaller, [j, k]))


def test_tie_moves_the_l_side():
    chain = [[0, 1], [1, 2], [2, 3]]  # two atoms on each side of the 1-2 bond
    np.testing.assert_array_equal(moving_atoms(chain, 4, (0, 1, 2, 3)), [3])
    np.testing.assert_array_equal(moving_atoms(chain, 4, (3, 2, 1, 0)), [0])


def test_other_molecules_are_on_neither_side():
    bonds = [[0, 1], [1, 2], [2, 3], [3, 4], [5, 6], [6, 7], [7, 8], [8, 9]]  # two chains
    np.testing.assert_array_equal(moving_atoms(bonds, 10, (0, 1, 2, 3)), [0])
    np.testing.assert_array_equal(moving_atoms(bonds, 10, (6, 7, 8, 9)), [9])


# ---------------------------------------------------------------------------------------
# TorsionSet
# ---------------------------------------------------------------------------------------

def test_set_values_single_frame(ala):
    _, x, bonds = ala
    ts = TorsionSet(bonds, 22, [PHI, PSI])
    x_before = x.copy()
    for targets in ([-1.4, 2.6], [np.pi, -np.pi], [7.0, -10.0]):
        y = ts.set_values(x, targets)
        assert y.shape == (22, 3) and y.dtype == np.float64
        _assert_rigid_torsion_change(ts, bonds, x, y, targets)
    np.testing.assert_array_equal(x, x_before)


def test_set_values_batch_matches_single_frames_and_keeps_geometry(ala, rng):
    _, x, bonds = ala
    ts = _all_ala_rotors(ala)
    start = ts.rotate_by(np.repeat(x[None], 64, axis=0), rng.uniform(-np.pi, np.pi, (64, len(ts))))
    start_copy = start.copy()
    targets = rng.uniform(-np.pi, np.pi, (64, len(ts)))
    out = ts.set_values(start, targets)
    assert out.shape == (64, 22, 3)
    np.testing.assert_array_equal(start, start_copy)
    _assert_rigid_torsion_change(ts, bonds, start, out, targets)
    singles = np.stack([ts.set_values(start[b], targets[b]) for b in range(0, 64, 9)])
    np.testing.assert_allclose(out[::9], singles, atol=1e-12)


def test_coupled_phi_psi_reach_targets_in_either_order(ala, rng):
    _, x, bonds = ala
    targets = rng.uniform(-np.pi, np.pi, (64, 2))
    forward = TorsionSet(bonds, 22, [PHI, PSI]).set_values(np.repeat(x[None], 64, 0), targets)
    backward = TorsionSet(bonds, 22, [PSI, PHI]).set_values(np.repeat(x[None], 64, 0), targets[:, ::-1])
    assert np.abs(_wrapped(dihedral_angles(forward, [PHI, PSI]) - targets)).max() < 1e-6
    np.testing.assert_allclose(forward, backward, atol=1e-12)


def test_rotate_by_is_undone_by_minus_delta(ala, rng):
    _, x, _ = ala
    ts = _all_ala_rotors(ala)
    deltas = rng.uniform(-np.pi, np.pi, len(ts))
    y = ts.rotate_by(x, deltas)
    assert np.abs(_wrapped(ts.values(y) - ts.values(x) - deltas)).max() < 1e-9
    np.testing.assert_allclose(ts.rotate_by(y, -deltas), x, atol=1e-12)


def test_values_single_and_batch_agree_with_dihedral_angles(ala, rng):
    _, x, _ = ala
    ts = _all_ala_rotors(ala)
    frames = x + rng.normal(scale=0.01, size=(5, 22, 3))
    np.testing.assert_allclose(ts.values(frames), dihedral_angles(frames, ts.torsions), atol=1e-12)
    np.testing.assert_allclose(ts.values(frames[2]), dihedral_angles(frames[2], ts.torsions), atol=1e-12)
    np.testing.assert_allclose(ts.values(x * unit.angstrom * 10), ts.values(x), atol=1e-12)


def test_from_topology_accepts_openmm_mdtraj_and_rdkit(ala):
    top, _, bonds = ala
    a = TorsionSet.from_topology(top, [PHI, PSI], names=["phi", "psi"])
    b = TorsionSet.from_topology(md.Topology.from_openmm(top), detect_rotatable_torsions(top))
    assert b.names == ["phi:ALA2", "psi:ALA2"]
    for ia, ib in zip(a.moving_indices, b.moving_indices):
        np.testing.assert_array_equal(ia, ib)
    mol = _rdkit_mol("CCCC")
    c = TorsionSet.from_topology(mol, detect_rotatable_torsions(mol))
    assert c.n_atoms == 14 and len(c) == 1


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def test_non_bonded_chain_is_refused(ala):
    _, _, bonds = ala
    with pytest.raises(ConfSampleError, match=r"torsion \(4, 6, 14, 16\) is not a bonded chain: "
                                              r"atoms 6 and 14 are not bonded"):
        moving_atoms(bonds, 22, (4, 6, 14, 16))
    with pytest.raises(ConfSampleError, match="atoms 8 and 13 are not bonded"):
        TorsionSet(bonds, 22, [PHI, (6, 8, 13, 16)])


@pytest.mark.parametrize("smiles", ["c1ccccc1", "C1CCCCC1"])
def test_ring_bond_is_refused(smiles):
    mol = _rdkit_mol(smiles)
    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    with pytest.raises(ConfSampleError, match=r"torsion \(0, 1, 2, 3\) turns about ring bond 1-2"):
        moving_atoms(bonds, mol.GetNumAtoms(), (0, 1, 2, 3))
    ring = detect_rotatable_torsions(mol, include_rings=True)
    assert len(ring) == (0 if smiles == "c1ccccc1" else 6)  # aromatic bonds are not single
    if ring:
        with pytest.raises(ConfSampleError, match="ring bond"):
            TorsionSet.from_topology(mol, ring)


def test_out_of_range_and_malformed_input(ala):
    _, x, bonds = ala
    with pytest.raises(ConfSampleError, match=r"torsion \(4, 6, 8, 22\) has atom index 22 outside \[0, 22\)"):
        TorsionSet(bonds, 22, [(4, 6, 8, 22)])
    with pytest.raises(ConfSampleError, match="atom index -1"):
        dihedral_angles(x, [(-1, 6, 8, 14)])
    with pytest.raises(ConfSampleError, match=r"bond \(21, 30\)"):
        moving_atoms(np.vstack([bonds, [21, 30]]), 22, PHI)
    with pytest.raises(ConfSampleError, match="repeats an atom"):
        moving_atoms(bonds, 22, (4, 6, 4, 6))
    with pytest.raises(ConfSampleError, match="both turn bond 8-14"):
        TorsionSet(bonds, 22, [PSI, (6, 8, 14, 15)])
    ts = TorsionSet(bonds, 22, [PHI, PSI])
    with pytest.raises(ConfSampleError, match=r"positions has shape \(21, 3\)"):
        ts.values(x[:21])
    with pytest.raises(ConfSampleError, match="targets has shape"):
        ts.set_values(x, [1.0, 2.0, 3.0])
    with pytest.raises(ConfSampleError, match="unique"):
        TorsionSet(bonds, 22, [PHI, PSI], names=["a", "a"])


# ---------------------------------------------------------------------------------------
# detect_rotatable_torsions
# ---------------------------------------------------------------------------------------

def test_alanine_dipeptide_rotatable_torsions_are_phi_and_psi(ala, ala_pdb):
    top, x, _ = ala
    expected = [("phi:ALA2", PHI), ("psi:ALA2", PSI)]
    assert detect_rotatable_torsions(top) == expected
    assert detect_rotatable_torsions(ala_pdb.topology, ala_pdb.positions) == expected  # with water
    assert detect_rotatable_torsions(md.load(_ala_pdb_path())) == expected
    with_methyl = detect_rotatable_torsions(top, x, include_methyl=True)
    assert [n for n, _ in with_methyl] == ["methyl:ACE1:C-CH3", "phi:ALA2", "psi:ALA2",
                                           "methyl:ALA2:CA-CB", "methyl:NME3:N-C"]
    assert dict(with_methyl)["methyl:ALA2:CA-CB"] == (6, 8, 10, 11)


def test_rdkit_route_on_alanine_dipeptide_finds_the_same_bonds(ala):
    top, x, _ = ala
    for residue in top.residues():
        residue.name = "LIG"  # no longer a peptide: bonds and orders go through RDKit
    try:
        central = {frozenset(t[1:3]) for _, t in detect_rotatable_torsions(top, x)}
        with_methyl = detect_rotatable_torsions(top, x, include_methyl=True)
    finally:
        for residue, name in zip(top.residues(), ["ACE", "ALA", "NME"]):
            residue.name = name
    assert central == {frozenset((6, 8)), frozenset((8, 14))}  # amide C-N bonds excluded
    assert len(with_methyl) == 5


@pytest.mark.parametrize("smiles, n_default, n_methyl", [
    ("CCCC", 1, 3),            # butane: central C-C; + two methyls
    ("CCc1ccccc1", 1, 2),      # ethylbenzene: ring-CH2; + methyl
    ("CCc1ccc(O)cc1", 1, 3),   # 4-ethylphenol: ring-CH2; + methyl and hydroxyl
    ("CC(=O)NC", 0, 2),        # N-methylacetamide: amide bond is not rotatable
    ("CC#CC", 0, 0),           # 2-butyne: bonds next to a triple bond are degenerate
])
def test_small_molecule_counts(smiles, n_default, n_methyl):
    mol = _rdkit_mol(smiles)
    assert len(detect_rotatable_torsions(mol)) == n_default
    assert len(detect_rotatable_torsions(mol, include_methyl=True)) == n_methyl


def test_small_molecule_routes_agree_and_torsions_can_be_set(rng):
    mol = _rdkit_mol("CCc1ccc(O)cc1")
    expected = [t for _, t in detect_rotatable_torsions(mol, include_methyl=True)]
    assert expected == [(2, 1, 0, 9), (0, 1, 2, 3), (4, 5, 6, 16)]
    results = []
    for with_bonds, with_orders in [(False, False), (True, False), (True, True)]:
        top, x = _openmm_topology_from_rdkit(mol, with_bonds, with_orders)
        found = detect_rotatable_torsions(top, x, include_methyl=True)
        assert [t for _, t in found] == expected
        results.append(found)
    assert results[0] == results[1] == results[2]
    assert [n for n, _ in results[0]] == ["methyl:LIG1:C1-C0", "tor:LIG1:C1-C2", "hydroxyl:LIG1:C5-O6"]
    ts = TorsionSet.from_topology(top, results[0])
    bonds = np.array([(b[0].index, b[1].index) for b in top.bonds()])
    batch = np.repeat(x[None], 8, axis=0)
    targets = rng.uniform(-np.pi, np.pi, (8, 3))
    _assert_rigid_torsion_change(ts, bonds, batch, ts.set_values(batch, targets), targets)


def test_non_peptide_without_positions_or_bond_orders_is_refused():
    top, _ = _openmm_topology_from_rdkit(_rdkit_mol("CCCC"), with_bonds=True)
    with pytest.raises(ConfSampleError, match="positions are needed to infer bond orders for residue LIG1"):
        detect_rotatable_torsions(top)
    top, x = _openmm_topology_from_rdkit(_rdkit_mol("CCCC"), with_bonds=True, with_orders=True)
    assert len(detect_rotatable_torsions(top)) == 1  # orders given: no positions needed
    with pytest.raises(ConfSampleError, match=r"positions has shape \(13, 3\)"):
        detect_rotatable_torsions(top, x[:13])
    with pytest.raises(ConfSampleError, match="topology is a str"):
        detect_rotatable_torsions("butane.pdb")


def test_peptide_with_ligand_uses_both_routes(ala):
    top, x, _ = ala
    modeller = app.Modeller(top, x * unit.nanometer)
    lig_top, lig_x = _openmm_topology_from_rdkit(_rdkit_mol("CCCC"), with_bonds=False)
    modeller.add(lig_top, lig_x * unit.nanometer)
    expected = [("phi:ALA2", PHI), ("psi:ALA2", PSI), ("tor:LIG1:C1-C2", (22, 23, 24, 25))]
    assert detect_rotatable_torsions(modeller.topology, modeller.positions) == expected
    with pytest.warns(UserWarning, match="positions are needed"):
        assert detect_rotatable_torsions(modeller.topology) == expected[:2]


def test_ligand_named_like_an_unknown_amino_acid_goes_through_rdkit():
    top, x = _openmm_topology_from_rdkit(_rdkit_mol("CCCC"), with_bonds=False, residue_name="UNK")
    assert detect_rotatable_torsions(top, x) == [("tor:UNK1:C1-C2", (0, 1, 2, 3))]
