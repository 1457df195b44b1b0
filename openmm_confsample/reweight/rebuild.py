"""Structures from torsion angles, the way the original study built them: RDKit template, set torsions, MMFF94.

1. :func:`template_molecule` builds an RDKit molecule (explicit hydrogens, bond orders, atom order of the
   OpenMM topology) from a :class:`~openmm_confsample.systems.MolecularSystem`;
2. :func:`rebuild_conformers` sets the torsions of the template conformer to each row of angles and
   relaxes everything else with MMFF94 while the target torsions are held.

Units: angles in radians, positions in nm, MMFF94 energies in kcal/mol. RDKit is imported inside the two
functions: it is needed only on this path and costs about a second at import.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..checks import positive_float, positive_int
from ..errors import ConfSampleError
from ..progress import progress_bar
from ..systems import MolecularSystem

#: Force constant of the torsion restraints during MMFF94 relaxation, kcal/mol/deg^2. Stiffer than about
#: 1e3 stalls RDKit's BFGS at the starting geometry; 100 holds every torsion to ~0.01 deg.
TORSION_FORCE_CONSTANT = 100.0
_ANGSTROM_PER_NM = 10.0


def template_molecule(molecular_system: MolecularSystem, charge: int = 0):
    """An RDKit molecule of ``molecular_system`` with explicit hydrogens, bond orders and one 3D conformer.

    Atoms are in the topology's order (atom ``i`` of the molecule is atom ``i`` of the topology), bonds are
    the topology's bonds, bond orders and formal charges come from
    ``rdDetermineBonds.DetermineBondOrders`` with total ``charge``, stereochemistry from the starting
    positions. For alanine dipeptide this is ACE-ALA-NME, ``CNC(=O)[C@H](C)NC(C)=O``.

    Parameters
    ----------
    molecular_system : MolecularSystem
    charge : int
        Total formal charge of the molecule.

    Returns
    -------
    rdkit.Chem.Mol
        Sanitized, with one conformer at ``molecular_system.positions_nm`` (stored in angstrom, as RDKit does).

    Raises
    ------
    ConfSampleError
        When the topology has atoms without an element or no bonds, when no bond orders fit ``charge``,
        or when MMFF94 has no parameters for the molecule.
    """
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Chem import rdForceFieldHelpers

    name = molecular_system.name
    topology = molecular_system.topology
    editable = Chem.RWMol()
    for atom in topology.atoms():
        if atom.element is None:
            raise ConfSampleError(
                f"system '{name}' atom {atom.index} ({atom.residue.name}:{atom.name}) has no element, so no "
                f"RDKit molecule can be built."
            )
        rd_atom = Chem.Atom(int(atom.element.atomic_number))
        # Hydrogens are all explicit in the topology; RDKit must not invent more.
        rd_atom.SetNoImplicit(True)
        editable.AddAtom(rd_atom)
    n_bonds = 0
    for bond in topology.bonds():
        editable.AddBond(bond[0].index, bond[1].index, Chem.BondType.SINGLE)
        n_bonds += 1
    if n_bonds == 0 and topology.getNumAtoms() > 1:
        raise ConfSampleError(f"system '{name}' has a topology without bonds; bond orders cannot be assigned.")
    conformer = Chem.Conformer(topology.getNumAtoms())
    conformer.SetPositions(np.ascontiguousarray(molecular_system.positions_nm * _ANGSTROM_PER_NM, dtype=float))
    conformer.Set3D(True)
    editable.AddConformer(conformer, assignId=True)
    mol = editable.GetMol()
    try:
        rdDetermineBonds.DetermineBondOrders(mol, charge=int(charge))
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises ValueError / RuntimeError / its own sanitize exceptions
        raise ConfSampleError(
            f"no bond orders fit system '{name}' with total charge {charge} ({exc}); pass the right charge."
        ) from exc
    formal_charge = sum(a.GetFormalCharge() for a in mol.GetAtoms())
    radicals = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    if formal_charge != int(charge) or radicals:
        raise ConfSampleError(
            f"bond orders of system '{name}' came out with total charge {formal_charge} and {radicals} radical "
            f"electrons, not charge {charge} and none; check the topology's bonds and the charge argument."
        )
    Chem.AssignStereochemistryFrom3D(mol)
    if not rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
        raise ConfSampleError(f"MMFF94 has no parameters for some atoms of system '{name}'; it cannot be rebuilt.")
    return mol


# -- rebuilding conformers from angles ----------------------------------------------------------------

class RebuiltConformers(NamedTuple):
    """What :func:`rebuild_conformers` returns; unpacks as ``positions, energies, torsions, converged``.

    positions_nm : (N, n_atoms, 3) float, nm
    energies_kcal : (N,) float, kcal/mol, MMFF94 energy without the torsion restraints
    torsions_rad : (N, k) float, radians in [-pi, pi], the torsions actually reached
    converged : (N,) bool, whether MMFF94 minimization converged within ``max_iters``
    """

    positions_nm: np.ndarray
    energies_kcal: np.ndarray
    torsions_rad: np.ndarray
    converged: np.ndarray


def _torsion_array(torsions, n_atoms: int) -> np.ndarray:
    """(k, 4) int from a dict name -> quad or a sequence of quads."""
    quads = list(torsions.values()) if isinstance(torsions, dict) else list(torsions)
    try:
        array = np.array(quads, dtype=int).reshape(-1, 4)
    except (TypeError, ValueError) as exc:
        raise ConfSampleError(f"torsions must be quadruples of atom indices, got {quads!r}.") from exc
    if len(array) == 0:
        raise ConfSampleError("torsions is empty; give at least one (i, j, k, l) quadruple.")
    if array.min() < 0 or array.max() >= n_atoms:
        raise ConfSampleError(f"torsions hold atom indices outside [0, {n_atoms}): {array.tolist()}.")
    return array


def _check_angles(angles_rad, k: int, name: str = "angles_rad") -> np.ndarray:
    """(N, k) finite float radians, or ConfSampleError naming ``name``."""
    try:
        angles = np.array(angles_rad, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfSampleError(f"{name} must be a numeric (N, {k}) array of radians.") from exc
    if angles.ndim != 2 or angles.shape[1] != k or angles.shape[0] == 0:
        raise ConfSampleError(
            f"{name} must have shape (N, {k}) with N >= 1 (one column per torsion), got {angles.shape}."
        )
    if not np.all(np.isfinite(angles)):
        rows = np.unique(np.nonzero(~np.isfinite(angles))[0])[:5].tolist()
        raise ConfSampleError(f"{name} contain NaN or infinite values (rows {rows}).")
    largest = float(np.abs(angles).max())
    if largest > np.pi + 1e-3:
        raise ConfSampleError(
            f"{name} must be in radians, but the largest |angle| is {largest:.3f} > pi: they look like degrees "
            f"(convert with numpy.deg2rad)."
        )
    return angles


def _check_rotatable(mol, torsions: np.ndarray) -> None:
    for quad in torsions.tolist():
        for a, b in zip(quad[:-1], quad[1:]):
            if mol.GetBondBetweenAtoms(a, b) is None:
                raise ConfSampleError(f"torsion {tuple(quad)} is not a bonded chain: atoms {a} and {b} are not bonded.")
        if mol.GetBondBetweenAtoms(quad[1], quad[2]).IsInRing():
            raise ConfSampleError(
                f"torsion {tuple(quad)} turns about a ring bond ({quad[1]}-{quad[2]}); it cannot be set."
            )



def rebuild_conformers(mol, torsions, angles_rad, optimize: bool = True, max_iters: int = 500,
                       progress: bool = True,
                       torsion_force_constant: float = TORSION_FORCE_CONSTANT) -> RebuiltConformers:
    """Structures with the given torsion angles, relaxed with MMFF94 around the held torsions.

    For each row of ``angles_rad`` the template conformer of ``mol`` is copied, every torsion is set with
    ``rdMolTransforms.SetDihedralRad`` (the side of the ``k`` atom moves rigidly), and, if ``optimize``,
    the structure is minimized with MMFF94 plus a harmonic restraint (RDKit's ``MMFFAddTorsionConstraint``,
    force constant ``torsion_force_constant`` kcal/mol/deg^2) holding each target torsion.

    Parameters
    ----------
    mol : rdkit.Chem.Mol
        From :func:`template_molecule`; its first conformer is the template. It is not modified.
    torsions : dict name -> (i, j, k, l), or (k, 4) int
        The torsions the columns of ``angles_rad`` refer to, in order.
    angles_rad : (N, k) float, radians
    optimize : bool
        Relax with MMFF94 (the torsions are held); without it, only the torsions are set.
    max_iters : int
        Maximum MMFF94 minimizer iterations per structure.
    progress : bool
        Show a progress bar.
    torsion_force_constant : float, kcal/mol/deg^2

    Returns
    -------
    RebuiltConformers
        ``positions_nm`` (N, n_atoms, 3), ``energies_kcal`` (N,) MMFF94 without restraints,
        ``torsions_rad`` (N, k) as reached, ``converged`` (N,) bool (all True when not optimizing).

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> mol = template_molecule(ala)
    >>> out = rebuild_conformers(mol, ala.torsions, np.deg2rad([[-60.0, -45.0]]), progress=False)
    >>> bool(np.allclose(np.rad2deg(out.torsions_rad), [[-60.0, -45.0]], atol=1.0))
    True
    """
    from rdkit import Chem
    from rdkit.Chem import rdForceFieldHelpers, rdMolTransforms

    if mol is None or mol.GetNumConformers() == 0:
        raise ConfSampleError("mol must be an RDKit molecule with a 3D conformer (use template_molecule).")
    n_atoms = mol.GetNumAtoms()
    quads = _torsion_array(torsions, n_atoms)
    angles = _check_angles(angles_rad, len(quads))
    _check_rotatable(mol, quads)
    max_iters = positive_int(max_iters, "max_iters")
    force_constant = positive_float(torsion_force_constant, "torsion_force_constant")

    work = Chem.Mol(mol)
    work.RemoveAllConformers()
    template = mol.GetConformer()
    template_positions = np.array(template.GetPositions(), dtype=float)
    conformer = Chem.Conformer(template)
    conformer.SetId(0)
    work.AddConformer(conformer, assignId=False)
    conformer = work.GetConformer(0)
    properties = rdForceFieldHelpers.MMFFGetMoleculeProperties(work)
    if properties is None:
        raise ConfSampleError("MMFF94 has no parameters for mol; it cannot be rebuilt.")

    n = len(angles)
    positions = np.empty((n, n_atoms, 3))
    energies = np.empty(n)
    reached = np.empty((n, len(quads)))
    converged = np.ones(n, dtype=bool)
    quad_list = [tuple(int(a) for a in q) for q in quads.tolist()]
    for row in progress_bar(range(n), progress, "rebuild", "structure"):
        conformer.SetPositions(template_positions)
        targets_deg = np.rad2deg(angles[row])
        for quad, target in zip(quad_list, targets_deg):
            rdMolTransforms.SetDihedralDeg(conformer, *quad, float(target))
        if optimize:
            force_field = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, properties, confId=0)
            for quad, target in zip(quad_list, targets_deg):
                force_field.MMFFAddTorsionConstraint(*quad, False, float(target), float(target), force_constant)
            force_field.Initialize()
            converged[row] = force_field.Minimize(maxIts=max_iters) == 0
            conformer.SetPositions(np.array(force_field.Positions(), dtype=float).reshape(n_atoms, 3))
        # The reported energy has no restraint term: it is the MMFF94 energy of the structure itself.
        energies[row] = rdForceFieldHelpers.MMFFGetMoleculeForceField(work, properties, confId=0).CalcEnergy()
        positions[row] = np.array(conformer.GetPositions(), dtype=float) / _ANGSTROM_PER_NM
        reached[row] = [rdMolTransforms.GetDihedralRad(conformer, *quad) for quad in quad_list]
    return RebuiltConformers(positions, energies, reached, converged)

