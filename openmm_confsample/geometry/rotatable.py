"""Find the rotatable torsions of a system: backbone and side-chain angles, or RDKit bonds.

Two routes, chosen per molecule:

* **Peptides** (residues mdtraj knows as protein, including ACE/NME caps): phi, psi and
  chi1..chi4 from :mod:`mdtraj` atom-name templates, named ``"phi:ALA2"``. These need no
  positions.
* **Everything else** (ligands, small molecules; water is skipped): the covalent graph goes
  into RDKit, bond orders come from the topology or, when it has none, from
  :func:`rdkit.Chem.rdDetermineBonds` on the 3D positions; a bond is rotatable when it is a
  single, non-ring bond between two heavy atoms, neither of which is in a triple bond, and
  it is not an amide/amidine C-N bond.

Torsions whose moving side is only hydrogens (methyl -CH3, amine -NH3+/-NH2, hydroxyl -OH,
thiol -SH) are dropped unless ``include_methyl``. The end atoms ``i`` and ``l`` are the
lowest-index heavy neighbours of ``j`` and ``k`` (hydrogens only if there is no heavy
neighbour), so the result is a fixed function of the topology.
"""

import warnings
from collections import Counter

import numpy as np

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import _strip_unit

__all__ = ["detect_rotatable_torsions"]

# Single, non-ring, heavy-heavy bond; no atom of a triple bond (its rotation is degenerate).
_ROTATABLE_SMARTS = "[!#1;!$(*#*)]-&!@[!#1;!$(*#*)]"
_ROTATABLE_SMARTS_WITH_RINGS = "[!#1;!$(*#*)]-[!#1;!$(*#*)]"
# Amide, thioamide, amidine and guanidine C-N: partial double bonds; atoms 0-1 are the bond.
_AMIDE_LIKE_SMARTS = "[#7]-[#6X3]=[#8,#16,#7]"
_TERMINAL_KIND = {6: "methyl", 7: "amine", 8: "hydroxyl", 16: "thiol"}
_CAPS = {"ACE", "NME", "NMA", "NH2", "FOR"}
_PEPTIDE_KINDS = ("phi", "psi", "chi1", "chi2", "chi3", "chi4")


def detect_rotatable_torsions(topology, positions=None, include_methyl=False,
                              include_rings=False, include_chi=True):
    """List the rotatable torsions of a topology as ``(name, (i, j, k, l))``.

    Parameters
    ----------
    topology : openmm.app.Topology, mdtraj.Topology, mdtraj.Trajectory or rdkit.Chem.Mol
        Water is ignored. An RDKit Mol is used as is (its bond orders, its atom indices;
        hydrogens must be explicit atoms, e.g. from ``Chem.AddHs``) and ``positions`` is
        then not used. Non-peptide topologies must contain their hydrogens too.
    positions : (n_atoms, 3) float, nm, or OpenMM ``Quantity``, optional
        Needed only for non-peptide molecules whose topology carries no bond orders (they
        are inferred from the geometry). A Trajectory supplies its first frame.
    include_methyl : bool
        Also return rotors whose moving side is only hydrogens (methyl, -NH3+, -OH, ...).
    include_rings : bool
        Also return single bonds in rings (Pro phi, ring C-C). Such torsions cannot be
        turned rigidly; :class:`TorsionSet` will refuse them.
    include_chi : bool
        Peptide side-chain angles chi1..chi4.

    Returns
    -------
    list of ``(name, (i, j, k, l))`` with 0-based atom indices; peptides first (per residue:
    phi, psi, chi1..chi4, then hydrogen rotors), then other molecules by central bond.

    Raises
    ------
    ConfSampleError
        If the topology type is unknown, ``positions`` has the wrong shape, or a
        non-peptide molecule needs bond orders that cannot be inferred.

    Examples
    --------
    >>> from rdkit import Chem
    >>> mol = Chem.AddHs(Chem.MolFromSmiles("CCCC"))
    >>> [t for _, t in detect_rotatable_torsions(mol)]
    [(0, 1, 2, 3)]
    """
    if hasattr(topology, "GetAtoms"):
        return _rdkit_torsions(topology, include_methyl, include_rings, labels=None)

    import mdtraj as md

    if isinstance(topology, md.Trajectory):
        if positions is None and topology.n_frames > 0:
            positions = topology.xyz[0]
        topology = topology.topology
    elif not isinstance(topology, md.Topology):
        try:
            topology = md.Topology.from_openmm(topology)
        except TypeError:
            raise ConfSampleError(
                f"topology is a {type(topology).__name__}; expected an openmm.app.Topology, "
                f"an mdtraj Topology or Trajectory, or an RDKit Mol.") from None
    n_atoms = topology.n_atoms
    if positions is not None:
        positions = _strip_unit(positions)
        if positions.shape != (n_atoms, 3):
            raise ConfSampleError(
                f"positions has shape {positions.shape}, expected ({n_atoms}, 3) in nm.")

    graph = _Graph(topology)
    result = []
    protein = {r.index for r in topology.residues if _is_peptide_residue(r)}
    if protein:
        result += _peptide_torsions(topology, graph, protein, include_methyl, include_rings,
                                    include_chi)
    for component in _other_components(topology, graph, protein):
        try:
            result += _component_torsions(topology, graph, component, positions,
                                          include_methyl, include_rings)
        except ConfSampleError as err:
            if not protein:
                raise
            warnings.warn(f"Skipping non-peptide atoms in rotatable-torsion detection: {err}",
                          stacklevel=2)
    return _unique_names(result)


# --------------------------------------------------------------------------------------
# the covalent graph, independent of the toolkit
# --------------------------------------------------------------------------------------

class _Graph:
    """Neighbours and atomic numbers of an mdtraj Topology (bonds created if it has none)."""

    def __init__(self, topology):
        if topology.n_bonds == 0:
            topology = topology.copy()
            topology.create_standard_bonds()
        self.z = np.array([a.element.atomic_number if a.element is not None else 0
                           for a in topology.atoms])
        self.neighbours = [set() for _ in range(topology.n_atoms)]
        self.orders = {}
        for bond in topology.bonds:
            a, b = bond[0].index, bond[1].index
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)
            self.orders[(min(a, b), max(a, b))] = _bond_order(bond)

    def heavy(self, atom):
        return self.z[atom] > 1

    def connected_without(self, j, k):
        """True if ``j`` and ``k`` stay connected when the bond ``j-k`` is removed."""
        seen = {k}
        stack = [k]
        while stack:
            u = stack.pop()
            for v in self.neighbours[u]:
                if u == k and v == j:
                    continue
                if v == j:
                    return True
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
        return False

    def ends(self, j, k):
        """``(i, l)``: lowest-index heavy neighbours of ``j`` and ``k``; None if there is none."""
        return _end_atom(self, j, k), _end_atom(self, k, j)


def _end_atom(graph, atom, partner):
    others = sorted(graph.neighbours[atom] - {partner})
    heavy = [a for a in others if graph.heavy(a)]
    if heavy:
        return heavy[0]
    return others[0] if others else None


def _bond_order(bond):
    if bond.order is not None:
        return float(bond.order)
    kind = type(bond.type).__name__ if bond.type is not None else None
    return {"Single": 1.0, "Double": 2.0, "Triple": 3.0, "Aromatic": 1.5, "Amide": 1.0}.get(kind)


def _terminal_kind(graph, atom, partner):
    """Name of the group if ``atom`` carries only hydrogens besides ``partner``, else None."""
    others = graph.neighbours[atom] - {partner}
    if others and not any(graph.heavy(a) for a in others):
        return _TERMINAL_KIND.get(int(graph.z[atom]), "rotor")
    return None


def _unique_names(result):
    """Append the central bond's atom indices to names that occur more than once."""
    counts = Counter(name for name, _ in result)
    return [(f"{name}:{t[1]}-{t[2]}" if counts[name] > 1 else name, t) for name, t in result]


# --------------------------------------------------------------------------------------
# peptides: mdtraj templates
# --------------------------------------------------------------------------------------

def _is_peptide_residue(residue):
    """mdtraj's protein residue names, minus ligands called e.g. "UNK" that lack a backbone."""
    if not residue.is_protein:
        return False
    if residue.name in _CAPS:
        return True
    names = {a.name for a in residue.atoms}
    return {"N", "CA", "C"} <= names


def _peptide_torsions(topology, graph, protein, include_methyl, include_rings, include_chi):
    import mdtraj.geometry.dihedral as dih

    finders = {"phi": dih.indices_phi, "psi": dih.indices_psi}
    if include_chi:
        finders.update({"chi1": dih.indices_chi1, "chi2": dih.indices_chi2,
                        "chi3": dih.indices_chi3, "chi4": dih.indices_chi4})
    atoms = list(topology.atoms)
    found = []
    for order, kind in enumerate(_PEPTIDE_KINDS):
        if kind not in finders:
            continue
        for quad in finders[kind](topology):
            i, j, k, l = (int(a) for a in quad)
            # Templates match names, not bonds: skip chain breaks and (unless asked) rings.
            if not (i in graph.neighbours[j] and k in graph.neighbours[j]
                    and l in graph.neighbours[k]):
                continue
            if not include_rings and graph.connected_without(j, k):
                continue
            residue = atoms[j].residue
            found.append(((residue.index, order, j, k), f"{kind}:{residue}", (i, j, k, l)))
    if include_methyl:
        protein_atoms = [a.index for a in atoms if a.residue.index in protein]
        for j, k, kind in _hydrogen_rotors(graph, protein_atoms, sp2_amines=False):
            i, l = graph.ends(j, k)
            residue = atoms[k].residue
            found.append(((residue.index, len(_PEPTIDE_KINDS), j, k),
                          f"{kind}:{residue}:{atoms[j].name}-{atoms[k].name}", (i, j, k, l)))
    found.sort(key=lambda entry: entry[0])
    return [(name, quad) for _, name, quad in found]


def _hydrogen_rotors(graph, atoms, sp2_amines):
    """``(j, k, kind)`` for bonds from a heavy atom ``j`` to a hydrogen-only group ``k``.

    Without bond orders, an -NH2 on a carbon with three neighbours (amide, guanidinium,
    aniline) is treated as conjugated and left out unless ``sp2_amines``.
    """
    rotors = []
    for k in atoms:
        if not graph.heavy(k):
            continue
        heavy = [a for a in graph.neighbours[k] if graph.heavy(a)]
        if len(heavy) != 1:
            continue
        j = heavy[0]
        kind = _terminal_kind(graph, k, j)
        if kind is None or _terminal_kind(graph, j, k) is not None and j > k:
            continue  # ethane-like: report the bond once, from the lower-index side
        if len(graph.neighbours[j]) < 2:
            continue
        if (not sp2_amines and graph.z[k] == 7 and graph.z[j] == 6
                and len(graph.neighbours[j]) == 3):
            continue
        rotors.append((j, k, kind))
    return rotors


# --------------------------------------------------------------------------------------
# everything else: RDKit
# --------------------------------------------------------------------------------------

def _other_components(topology, graph, protein):
    """Atom lists of non-protein, non-water molecules (bonded atoms and residues joined)."""
    parent = list(range(topology.n_atoms))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    keep = set()
    for residue in topology.residues:
        if residue.index in protein or residue.is_water:
            continue
        members = [a.index for a in residue.atoms]
        keep.update(members)
        for a in members[1:]:
            union(members[0], a)
    for a in keep:
        for b in graph.neighbours[a]:
            if b in keep:
                union(a, b)
    groups = {}
    for a in sorted(keep):
        groups.setdefault(find(a), []).append(a)
    components = []
    for members in groups.values():
        if len(members) < 4:
            continue  # ions and diatomics: no torsion
        touching = {b for a in members for b in graph.neighbours[a]} - set(members)
        if touching:
            warnings.warn(
                f"Atoms {members[0]}..{members[-1]} are bonded to a peptide; their torsions "
                f"beyond the peptide templates are not detected.", stacklevel=3)
            continue
        components.append(members)
    return components


def _component_torsions(topology, graph, members, positions, include_methyl, include_rings):
    from rdkit import Chem

    atoms = list(topology.atoms)
    residues = sorted({atoms[a].residue.index for a in members})
    first = atoms[members[0]].residue
    where = f"residue {first}" if len(residues) == 1 else (
        f"the molecule of atoms {members[0]}..{members[-1]}")
    local = {a: n for n, a in enumerate(members)}
    bonds = sorted({(min(a, b), max(a, b)) for a in members for b in graph.neighbours[a]})
    orders = [graph.orders[b] for b in bonds]
    charges = [getattr(atoms[a], "formal_charge", None) for a in members]
    have_charges = all(c is not None for c in charges)
    charge = int(round(sum(charges))) if have_charges else 0

    rw = Chem.RWMol()
    for a, formal_charge in zip(members, charges):
        atom = Chem.Atom(int(graph.z[a]))
        atom.SetNoImplicit(True)  # hydrogens are explicit atoms of the topology
        if have_charges:
            atom.SetFormalCharge(int(formal_charge))
        rw.AddAtom(atom)
    if positions is not None:
        conf = Chem.Conformer(len(members))
        for n, a in enumerate(members):
            conf.SetAtomPosition(n, (positions[a] * 10.0).tolist())  # nm -> Angstrom
        rw.AddConformer(conf, assignId=True)

    mol = None
    if bonds and all(o is not None for o in orders):
        mol = _mol_with_orders(rw, bonds, orders, local)
    if mol is None:
        if positions is None:
            raise ConfSampleError(
                f"positions are needed to infer bond orders for {where}, whose topology has "
                f"none; pass positions, or an RDKit Mol of the molecule.")
        from rdkit.Chem import rdDetermineBonds

        mol = Chem.RWMol(rw)
        try:
            if bonds:
                for a, b in bonds:
                    mol.AddBond(local[a], local[b], Chem.BondType.SINGLE)
                mol = mol.GetMol()
                rdDetermineBonds.DetermineBondOrders(mol, charge=charge)
            else:
                mol = mol.GetMol()
                rdDetermineBonds.DetermineBonds(mol, charge=charge)
        except Exception as err:  # RDKit raises several types here
            raise ConfSampleError(
                f"RDKit could not assign bond orders to {where} with net charge {charge} "
                f"({err}); pass an RDKit Mol of the molecule instead.") from None

    if len(residues) == 1:
        prefix = f"{first}:"
        labels = [atoms[a].name for a in members]
    else:
        prefix = ""
        labels = [f"{atoms[a].residue}:{atoms[a].name}" for a in members]
    if len(set(labels)) != len(labels):  # atom names do not identify atoms: use indices
        labels = [f"{atoms[a].element.symbol}{a}" for a in members]
    found = _rdkit_torsions(mol, include_methyl, include_rings, labels=labels, prefix=prefix)
    return [(name, tuple(members[a] for a in quad)) for name, quad in found]


def _mol_with_orders(rw, bonds, orders, local):
    """The Mol with the topology's bond orders, or None if RDKit cannot sanitize it."""
    from rdkit import Chem

    types = {1.0: Chem.BondType.SINGLE, 2.0: Chem.BondType.DOUBLE,
             3.0: Chem.BondType.TRIPLE, 1.5: Chem.BondType.AROMATIC}
    mol = Chem.RWMol(rw)
    for (a, b), order in zip(bonds, orders):
        if order not in types:
            return None
        mol.AddBond(local[a], local[b], types[order])
        if order == 1.5:
            mol.GetAtomWithIdx(local[a]).SetIsAromatic(True)
            mol.GetAtomWithIdx(local[b]).SetIsAromatic(True)
    mol = mol.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except Exception:  # kekulization or valence failure: infer the orders instead
        return None
    return mol


def _rdkit_torsions(mol, include_methyl, include_rings, labels, prefix=""):
    """Rotatable torsions of an RDKit Mol (explicit hydrogens), in its atom indices."""
    from rdkit import Chem

    mol = Chem.Mol(mol)
    mol.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(mol)  # ring membership for "!@"; a no-op when rings are already known
    graph = _RDKitGraph(mol)
    if labels is None:
        labels = [f"{a.GetSymbol()}{a.GetIdx()}" for a in mol.GetAtoms()]

    pattern = Chem.MolFromSmarts(_ROTATABLE_SMARTS_WITH_RINGS if include_rings
                                 else _ROTATABLE_SMARTS)
    amide_like = {frozenset(m[:2]) for m in
                  mol.GetSubstructMatches(Chem.MolFromSmarts(_AMIDE_LIKE_SMARTS))}
    found = []
    for b, c in {tuple(sorted(m)) for m in mol.GetSubstructMatches(pattern)}:
        if frozenset((b, c)) in amide_like:
            continue
        kind_c = _terminal_kind(graph, c, b)
        kind_b = _terminal_kind(graph, b, c)
        if kind_c is None and kind_b is not None:
            b, c, kind_c = c, b, kind_b  # the hydrogen-only group is on the k side
        j, k = b, c
        i, l = graph.ends(j, k)
        if i is None or l is None:
            continue  # nothing beyond one end (e.g. C-F): no torsion to define
        if kind_c is not None:
            if not include_methyl:
                continue
            name = f"{kind_c}:{prefix}{labels[j]}-{labels[k]}"
        else:
            name = f"tor:{prefix}{labels[j]}-{labels[k]}"
        found.append((name, (int(i), int(j), int(k), int(l))))
    found.sort(key=lambda entry: (min(entry[1][1:3]), max(entry[1][1:3])))
    return _unique_names(found)


class _RDKitGraph:
    """The slice of :class:`_Graph` that the end-atom and terminal-group rules need."""

    def __init__(self, mol):
        self.z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
        self.neighbours = [{n.GetIdx() for n in a.GetNeighbors()} for a in mol.GetAtoms()]

    heavy = _Graph.heavy
    ends = _Graph.ends
