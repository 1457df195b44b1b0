"""Stereocentres and their handedness: a flow in Cartesian space can invert a centre, MD never does.

:func:`find_stereocentres` asks RDKit which atoms are stereocentres, from the elements and bonds of an OpenMM
topology and one 3D structure; :func:`chirality_signs` gives the sign of the signed volume spanned by each
centre's three listed neighbours, for one or many conformations. A proposal whose signs differ from the
reference structure's has inverted a centre (e.g. turned L-alanine into D-alanine).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfSampleError
from ..units import to_nm

__all__ = ["find_stereocentres", "chirality_signs"]


def _rdkit_mol(topology, positions_nm: np.ndarray):
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = Chem.RWMol()
    for atom in topology.atoms():
        if atom.element is None:
            raise ConfSampleError(f"atom {atom.index} ({atom.residue.name}:{atom.name}) has no element; "
                                  "stereocentres need elements for every atom.")
        rd_atom = Chem.Atom(atom.element.atomic_number)
        # All hydrogens are explicit in an MD topology; RDKit must not add implicit ones.
        rd_atom.SetNoImplicit(True)
        mol.AddAtom(rd_atom)
    orders = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for bond in topology.bonds():
        # PDB-derived topologies carry no bond orders; single bonds leave the neighbour ranking of sp3 centres intact.
        order = orders.get(getattr(bond, "order", None), Chem.BondType.SINGLE)
        mol.AddBond(bond[0].index, bond[1].index, order)
    mol = mol.GetMol()
    # Radicals from missing bond orders are harmless here; skip valence/property sanitisation.
    mol.UpdatePropertyCache(strict=False)
    Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_SYMMRINGS | Chem.SanitizeFlags.SANITIZE_SETCONJUGATION
                     | Chem.SanitizeFlags.SANITIZE_SETHYBRIDIZATION, catchErrors=True)
    conformer = Chem.Conformer(mol.GetNumAtoms())
    for i, (x, y, z) in enumerate(np.asarray(positions_nm, dtype=float) * 10.0):  # RDKit works in angstrom
        conformer.SetAtomPosition(i, Point3D(float(x), float(y), float(z)))
    mol.AddConformer(conformer, assignId=True)
    return mol


def find_stereocentres(topology, positions_nm) -> np.ndarray:
    """Tetrahedral stereocentres of a molecule, with three neighbours each in a fixed order.

    Parameters
    ----------
    topology : openmm.app.Topology
        Elements and bonds of every atom.
    positions_nm : (n_atoms, 3) float, nm (or a Quantity)
        One 3D structure, from which RDKit assigns the stereochemistry.

    Returns
    -------
    (m, 4) int array: ``[centre, a, b, c]`` per stereocentre, sorted by centre; ``a < b < c`` are the
    three lowest-index neighbours of the centre. Empty (0, 4) when there is none.

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> find_stereocentres(ala.topology, ala.positions_nm)[:, 0].tolist()
    [8]
    """
    from rdkit import Chem

    positions_nm = to_nm(positions_nm, "positions_nm")
    if len(positions_nm) != topology.getNumAtoms():
        raise ConfSampleError(f"positions_nm has {len(positions_nm)} atoms but the topology has {topology.getNumAtoms()}.")
    mol = _rdkit_mol(topology, positions_nm)
    Chem.AssignStereochemistryFrom3D(mol)
    centres = sorted(index for index, _ in Chem.FindMolChiralCenters(mol, includeUnassigned=True, useLegacyImplementation=False))
    rows = []
    for centre in centres:
        neighbours = sorted(n.GetIdx() for n in mol.GetAtomWithIdx(centre).GetNeighbors())
        if len(neighbours) >= 3:
            rows.append([centre] + neighbours[:3])
    return np.array(rows, dtype=int).reshape(-1, 4)


def chirality_signs(positions, centres) -> np.ndarray:
    """Sign of the signed volume ``(a - x) . ((b - x) x (c - x))`` for each centre ``[x, a, b, c]``.

    Parameters
    ----------
    positions : (n_atoms, 3) or (B, n_atoms, 3) float, any length unit
    centres : (m, 4) int, from :func:`find_stereocentres`

    Returns
    -------
    (m,) or (B, m) int8 in {-1, 0, +1}; 0 only for a planar (degenerate) centre.
    """
    x = np.asarray(positions, dtype=float)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ConfSampleError(f"positions must have shape (n_atoms, 3) or (B, n_atoms, 3), got {np.shape(positions)}.")
    if not np.all(np.isfinite(x)):
        raise ConfSampleError("positions contain NaN or infinite values.")
    quads = np.asarray(centres)
    if quads.size == 0:
        out = np.zeros((len(x), 0), dtype=np.int8)
        return out[0] if single else out
    if quads.ndim != 2 or quads.shape[1] != 4 or not np.issubdtype(quads.dtype, np.integer):
        raise ConfSampleError(f"centres must be an (m, 4) integer array, got shape {quads.shape}.")
    if quads.min() < 0 or quads.max() >= x.shape[1]:
        raise ConfSampleError(f"centres index atoms outside [0, {x.shape[1]}).")
    centre = x[:, quads[:, 0]]
    a, b, c = (x[:, quads[:, k]] - centre for k in (1, 2, 3))
    volume = np.einsum("bmi,bmi->bm", a, np.cross(b, c))
    signs = np.sign(volume).astype(np.int8)
    return signs[0] if single else signs
