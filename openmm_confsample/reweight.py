"""Reconstruct, score, reweight and resample: structures from torsion angles the way the original study did it.

A generator proposes torsion angles only. To turn angles into Boltzmann-distributed structures:

1. :func:`template_molecule` builds an RDKit molecule (explicit hydrogens, bond orders, atom order of the
   OpenMM topology) from a :class:`~openmm_confsample.systems.MolecularSystem`;
2. :func:`rebuild_conformers` sets the torsions of the template conformer to each row of angles and
   relaxes everything else with MMFF94 while the target torsions are held;
3. each relaxed structure is scored, with MMFF94 (kcal/mol) or with the system's OpenMM force field
   (:func:`openmm_energies`, kJ/mol);
4. :func:`boltzmann_weights` turns energies into importance weights, :func:`kish_effective_sample_size`
   says how many structures they are worth, and :func:`resample` draws a weight-distributed subset.

:func:`reweight_pipeline` runs all four steps and, given ``out_dir``, writes ``resampled.pdb``,
``resampled.dcd``, ``weights.csv`` and ``summary.json``.

The weights are exp(-E/kT) of relaxed structures, not exact importance weights against a proposal
density: this is the study's protocol, kept for comparison. Exact sampling uses the Metropolis-Hastings
moves in :mod:`openmm_confsample.moves`.

Units: angles in radians, positions in nm, MMFF94 energies in kcal/mol, OpenMM energies in kJ/mol.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import ConfSampleError
from .systems import EnergyEvaluator, MolecularSystem, kT_kJ_per_mol, to_kelvin

__all__ = [
    "KT_KCAL_298",
    "RebuiltConformers",
    "ReweightResult",
    "boltzmann_weights",
    "kish_effective_sample_size",
    "openmm_energies",
    "rebuild_conformers",
    "resample",
    "reweight_pipeline",
    "template_molecule",
]

#: Molar gas constant in kcal/(mol K), the value RDKit/MMFF users quote.
GAS_CONSTANT_KCAL = 0.0019872041
#: kT at 298.15 K in kcal/mol (0.5925), the study's default for MMFF94 energies.
KT_KCAL_298 = GAS_CONSTANT_KCAL * 298.15
#: Force constant of the torsion restraints during MMFF94 relaxation, kcal/mol/deg^2. Stiffer than about
#: 1e3 stalls RDKit's BFGS at the starting geometry; 100 holds every torsion to ~0.01 deg.
TORSION_FORCE_CONSTANT = 100.0
_ANGSTROM_PER_NM = 10.0
_ENERGY_UNITS = {"mmff": "kcal/mol", "openmm": "kJ/mol"}


# -- the template molecule ----------------------------------------------------------------------------

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


def _progress(iterable, enabled: bool, desc: str, unit: str, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total)


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
    max_iters = int(max_iters)
    if max_iters < 1:
        raise ConfSampleError(f"max_iters must be a positive integer, got {max_iters}.")
    force_constant = float(torsion_force_constant)
    if not np.isfinite(force_constant) or force_constant <= 0:
        raise ConfSampleError(f"torsion_force_constant must be positive, got {torsion_force_constant}.")

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
    for row in _progress(range(n), progress, "rebuild", "structure"):
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


# -- weights and resampling ---------------------------------------------------------------------------

def boltzmann_weights(energies, kT: float = KT_KCAL_298) -> np.ndarray:
    """Normalized Boltzmann weights w_i = exp(-(E_i - min E)/kT) / sum_j exp(-(E_j - min E)/kT).

    Parameters
    ----------
    energies : (N,) float
        In the same unit as ``kT``. Non-finite energies (failed structures) get weight 0.
    kT : float
        Thermal energy; the default is 0.5925 kcal/mol (298.15 K), for MMFF94 energies. Use
        ``kT_kJ_per_mol(T)`` for OpenMM energies.

    Returns
    -------
    (N,) float, summing to 1.

    Examples
    --------
    >>> w = boltzmann_weights([0.0, 1.0], kT=1.0)
    >>> round(float(w[0] / w[1]), 6) == round(float(np.e), 6)
    True
    """
    values = np.array(energies, dtype=float).reshape(-1)
    if values.size == 0:
        raise ConfSampleError("energies is empty; give at least one energy.")
    kT = float(kT)
    if not np.isfinite(kT) or kT <= 0:
        raise ConfSampleError(f"kT must be a positive energy, got {kT}.")
    finite = np.isfinite(values)
    if not finite.any():
        raise ConfSampleError("energies contain no finite value; no structure can be weighted.")
    weights = np.zeros_like(values)
    weights[finite] = np.exp(-(values[finite] - values[finite].min()) / kT)
    return weights / weights.sum()


def kish_effective_sample_size(weights) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: N for equal weights, 1 when one weight dominates."""
    w = np.array(weights, dtype=float).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfSampleError("weights must be a non-empty array of finite non-negative numbers with a positive sum.")
    return float(w.sum() ** 2 / np.sum(w * w))


def resample(weights, n: int, seed: int | np.random.Generator | None = 0, method: str = "multinomial") -> np.ndarray:
    """``n`` indices drawn with probabilities ``weights`` (normalized here).

    Parameters
    ----------
    weights : (N,) float, non-negative
    n : int
        Number of indices to draw.
    seed : int or numpy.random.Generator
    method : 'multinomial' or 'systematic'
        Multinomial draws independently; systematic uses one uniform offset and a comb of ``n`` points
        (lower variance: every index appears floor(n w_i) or ceil(n w_i) times), returned in random order.

    Returns
    -------
    (n,) int indices into ``weights``.
    """
    w = np.array(weights, dtype=float).reshape(-1)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfSampleError("weights must be a non-empty array of finite non-negative numbers with a positive sum.")
    if int(n) != n or n < 1:
        raise ConfSampleError(f"n must be a positive integer, got {n}.")
    n = int(n)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    p = w / w.sum()
    if method == "multinomial":
        return rng.choice(len(p), size=n, replace=True, p=p)
    if method == "systematic":
        comb = (rng.random() + np.arange(n)) / n
        cumulative = np.cumsum(p)
        cumulative[-1] = 1.0
        indices = np.searchsorted(cumulative, comb, side="right")
        return rng.permutation(np.minimum(indices, len(p) - 1))
    raise ConfSampleError(f"method must be 'multinomial' or 'systematic', got {method!r}.")


def openmm_energies(molecular_system: MolecularSystem, positions, platform: str = "Reference") -> np.ndarray:
    """Potential energies (N,) in kJ/mol of positions (N, n_atoms, 3) nm under the system's OpenMM force field.

    Structures OpenMM cannot evaluate, or whose energy is NaN, get ``inf`` (weight 0 in :func:`boltzmann_weights`).
    """
    batch = np.asarray(positions, dtype=float)
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3 or batch.shape[1:] != (molecular_system.n_atoms, 3):
        raise ConfSampleError(
            f"positions must have shape (N, {molecular_system.n_atoms}, 3) in nm, got {np.shape(positions)}."
        )
    return np.asarray(EnergyEvaluator(molecular_system, platform).energies(batch), dtype=float).reshape(-1)


# -- the pipeline -------------------------------------------------------------------------------------

@dataclass
class ReweightResult:
    """What :func:`reweight_pipeline` produced.

    Attributes
    ----------
    angles_rad : (N, k) float, radians, the target torsions
    torsions_rad : (N, k) float, radians, the torsions reached after relaxation
    positions_nm : (N, n_atoms, 3) float, nm
    energies : (N,) float, in ``energy_unit`` (inf for structures OpenMM could not score)
    energy_unit : 'kcal/mol' (MMFF94) or 'kJ/mol' (OpenMM)
    kT : float, in ``energy_unit``
    weights : (N,) float, normalized Boltzmann weights
    ess : float, Kish effective sample size of ``weights``
    resampled_indices : (n_resample,) int, indices into the N structures
    resampled_positions_nm : (n_resample, n_atoms, 3) float, nm
    converged : (N,) bool, MMFF94 minimization converged
    files : dict kind -> path of the files written (empty without ``out_dir``)
    """

    angles_rad: np.ndarray
    torsions_rad: np.ndarray
    positions_nm: np.ndarray
    energies: np.ndarray
    energy_unit: str
    kT: float
    weights: np.ndarray
    ess: float
    resampled_indices: np.ndarray
    resampled_positions_nm: np.ndarray
    converged: np.ndarray
    summary: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def resampled_trajectory(self, molecular_system: MolecularSystem):
        """The resampled structures as an mdtraj.Trajectory on ``molecular_system``'s topology."""
        import mdtraj

        return mdtraj.Trajectory(self.resampled_positions_nm, molecular_system.mdtraj_topology())


def _check_out_dir(out_dir) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfSampleError(f"out_dir '{out_dir}' exists and is not a directory.")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise ConfSampleError(f"out_dir '{out_dir}' cannot be created: its parent directory '{parent}' does not exist.")
    return out_dir


def _partial(path: str) -> str:
    return path + ".partial"


def _write_json(path: str, payload: dict) -> None:
    with open(_partial(path), "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(_partial(path), path)


def _write_csv(path: str, header: list[str], rows) -> None:
    with open(_partial(path), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(_partial(path), path)


def _write_structures(out_dir: str, positions_nm: np.ndarray, molecular_system: MolecularSystem) -> dict:
    import mdtraj

    trajectory = mdtraj.Trajectory(positions_nm, molecular_system.mdtraj_topology())
    pdb_path = os.path.join(out_dir, "resampled.pdb")
    dcd_path = os.path.join(out_dir, "resampled.dcd")
    # save_pdb/save_dcd (unlike save) do not pick the format from the extension, so '.partial' is safe.
    trajectory.save_pdb(_partial(pdb_path), force_overwrite=True)
    os.replace(_partial(pdb_path), pdb_path)
    trajectory.save_dcd(_partial(dcd_path), force_overwrite=True)
    os.replace(_partial(dcd_path), dcd_path)
    return {"pdb": pdb_path, "dcd": dcd_path}


def reweight_pipeline(molecular_system: MolecularSystem, angles_rad, n_resample: int | None = None,
                      energy: str = "mmff", temperature_K: float = 298.15, optimize: bool = True, seed: int = 0,
                      out_dir: str | None = None, progress: bool = True, max_iters: int = 500,
                      resample_method: str = "multinomial", charge: int = 0,
                      platform: str = "Reference") -> ReweightResult:
    """Rebuild structures from torsion angles, weight them by exp(-E/kT) and resample.

    Parameters
    ----------
    molecular_system : MolecularSystem
        Its ``torsions`` (in insertion order) name the columns of ``angles_rad``.
    angles_rad : (N, k) float, radians
        E.g. samples of (phi, psi) from a generator.
    n_resample : int, optional
        How many structures to draw by weight; default N.
    energy : 'mmff' or 'openmm'
        Score the relaxed structures with MMFF94 (kcal/mol, gas phase) or with the system's own OpenMM
        force field (kJ/mol). kT is taken in the matching unit.
    temperature_K : float or Quantity
        Temperature of the weights; 298.15 K by default, as in the original study.
    optimize : bool
        MMFF94-relax each structure around the held torsions (see :func:`rebuild_conformers`).
    seed : int
        Seed of the resampling draw.
    out_dir : str, optional
        Directory for ``resampled.pdb`` (multi-model), ``resampled.dcd``, ``weights.csv`` and
        ``summary.json``; created if its parent exists. Each file is written under a ``.partial`` name and
        renamed when complete.
    progress : bool
        Show a progress bar while rebuilding.
    max_iters : int
        MMFF94 minimizer iterations per structure.
    resample_method : 'multinomial' or 'systematic'
    charge : int
        Total charge of the molecule, for bond-order assignment.
    platform : str
        OpenMM platform for ``energy='openmm'``.

    Returns
    -------
    ReweightResult

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> angles = np.random.default_rng(0).uniform(-np.pi, np.pi, size=(5, 2))
    >>> result = reweight_pipeline(ala, angles, n_resample=10, progress=False)
    >>> result.weights.shape, result.resampled_positions_nm.shape
    ((5,), (10, 22, 3))
    """
    start = time.perf_counter()
    if energy not in _ENERGY_UNITS:
        raise ConfSampleError(f"energy must be 'mmff' or 'openmm', got {energy!r}.")
    if not molecular_system.torsions:
        raise ConfSampleError(f"system '{molecular_system.name}' has no named torsions to set.")
    angles = _check_angles(angles_rad, len(molecular_system.torsions))
    temperature_K = to_kelvin(temperature_K, "temperature_K")
    n_resample = len(angles) if n_resample is None else n_resample
    if int(n_resample) != n_resample or n_resample < 1:
        raise ConfSampleError(f"n_resample must be a positive integer, got {n_resample}.")
    n_resample = int(n_resample)
    if resample_method not in ("multinomial", "systematic"):
        raise ConfSampleError(f"resample_method must be 'multinomial' or 'systematic', got {resample_method!r}.")
    out_dir = _check_out_dir(out_dir) if out_dir is not None else None

    mol = template_molecule(molecular_system, charge=charge)
    rebuilt = rebuild_conformers(mol, molecular_system.torsions, angles, optimize=optimize, max_iters=max_iters,
                                 progress=progress)
    if energy == "mmff":
        energies, kT = rebuilt.energies_kcal, GAS_CONSTANT_KCAL * temperature_K
    else:
        energies, kT = openmm_energies(molecular_system, rebuilt.positions_nm, platform), kT_kJ_per_mol(temperature_K)
    weights = boltzmann_weights(energies, kT)
    ess = kish_effective_sample_size(weights)
    indices = resample(weights, n_resample, seed, resample_method)
    resampled_positions = rebuilt.positions_nm[indices]

    deviation_deg = np.rad2deg(np.abs((rebuilt.torsions_rad - angles + np.pi) % (2 * np.pi) - np.pi))
    finite = np.isfinite(energies)
    summary = {
        "system": molecular_system.name,
        "torsions": {name: list(quad) for name, quad in molecular_system.torsions.items()},
        "n_structures": int(len(angles)),
        "n_resample": n_resample,
        "resample_method": resample_method,
        "seed": int(seed),
        "energy_model": "MMFF94 (RDKit, gas phase)" if energy == "mmff" else f"OpenMM ({molecular_system.description})",
        "energy_unit": _ENERGY_UNITS[energy],
        "temperature_K": temperature_K,
        "kT": kT,
        "optimize": bool(optimize),
        "n_not_converged": int((~rebuilt.converged).sum()),
        "n_unscored": int((~finite).sum()),
        "max_torsion_deviation_deg": float(deviation_deg.max()),
        "energy_min": float(energies[finite].min()),
        "energy_max": float(energies[finite].max()),
        "ess_kish": ess,
        "ess_fraction": ess / len(angles),
        "n_unique_resampled": int(len(np.unique(indices))),
        "smiles": _smiles(mol),
    }
    result = ReweightResult(angles, rebuilt.torsions_rad, rebuilt.positions_nm, np.asarray(energies, dtype=float),
                            _ENERGY_UNITS[energy], float(kT), weights, ess, indices, resampled_positions,
                            rebuilt.converged, summary)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        files = _write_structures(out_dir, resampled_positions, molecular_system)
        counts = np.bincount(indices, minlength=len(angles))
        names = list(molecular_system.torsions)
        energy_column = "energy_kcal_per_mol" if energy == "mmff" else "energy_kJ_per_mol"
        header = (["index"] + [f"{n}_rad" for n in names] + [f"{n}_reached_rad" for n in names]
                  + [energy_column, "weight", "n_resampled", "converged"])
        rows = ([i] + [f"{a:.6f}" for a in angles[i]] + [f"{a:.6f}" for a in rebuilt.torsions_rad[i]]
                + [f"{energies[i]:.6f}", f"{weights[i]:.6e}", int(counts[i]), int(rebuilt.converged[i])]
                for i in range(len(angles)))
        files["weights"] = os.path.join(out_dir, "weights.csv")
        _write_csv(files["weights"], header, rows)
        files["summary"] = os.path.join(out_dir, "summary.json")
        result.files = files
        summary["files"] = {kind: os.path.basename(path) for kind, path in files.items()}
        summary["wall_seconds"] = time.perf_counter() - start
        _write_json(files["summary"], summary)
    else:
        summary["wall_seconds"] = time.perf_counter() - start
    return result


def _smiles(mol) -> str:
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.RemoveHs(mol))
