"""What is simulated: an OpenMM System with its topology, positions, temperature and named torsions.

A :class:`MolecularSystem` is the one object the data pipeline, the models, the moves and the
benchmarks pass around. Named systems come from a small registry (:func:`get_system`); a user's own
system comes from :func:`system_from_openmm` (any System/Topology/positions triple) or
:func:`system_from_pdb` (a PDB file plus force-field XML files) and works everywhere a named one does.

Units: OpenMM ``Quantity`` objects are accepted at the edges; inside, positions are float arrays in nm,
temperatures floats in K and energies floats in kJ/mol.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from .errors import ConfSampleError

# Units live in .units; re-exported here for code that imported them from systems.
from .units import MOLAR_GAS_CONSTANT_KJ, kT_kJ_per_mol, to_kelvin, to_nm  # noqa: F401


@dataclass
class MolecularSystem:
    """An OpenMM system ready to simulate and sample.

    Parameters
    ----------
    name : str
        Registry name, or a label for a user's system.
    system : openmm.System
        The potential. Its particle count must match ``topology`` and ``positions_nm``.
    topology : openmm.app.Topology
    positions_nm : (n_atoms, 3) float, nm
        A starting structure.
    temperature_K : float
        The target temperature of sampling.
    torsions : dict name -> (i, j, k, l)
        Named torsions (0-based atom indices), e.g. ``{"phi": (4, 6, 8, 14), "psi": (6, 8, 14, 16)}``.
    description : str
        Force field and source, for metadata.

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-vacuum")
    >>> ala.n_atoms, sorted(ala.torsions)
    (22, ['phi', 'psi'])
    """

    name: str
    system: openmm.System
    topology: app.Topology
    positions_nm: np.ndarray
    temperature_K: float = 300.0
    torsions: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        self.positions_nm = to_nm(self.positions_nm, "positions")
        self.temperature_K = to_kelvin(self.temperature_K)
        n_system, n_topology, n_positions = self.system.getNumParticles(), self.topology.getNumAtoms(), len(self.positions_nm)
        if not n_system == n_topology == n_positions:
            raise ConfSampleError(
                f"system '{self.name}' is inconsistent: the System has {n_system} particles, the topology "
                f"{n_topology} atoms and the positions {n_positions} rows."
            )
        torsions = {}
        for torsion_name, quad in self.torsions.items():
            quad = tuple(int(a) for a in quad)
            if len(quad) != 4 or min(quad) < 0 or max(quad) >= n_topology or len(set(quad)) != 4:
                raise ConfSampleError(
                    f"torsion '{torsion_name}' must be four distinct atom indices in [0, {n_topology}), got {quad}."
                )
            torsions[torsion_name] = quad
        self.torsions = torsions

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.system.getNumParticles()

    @property
    def kT(self) -> float:
        """kT in kJ/mol at the system's temperature."""
        return kT_kJ_per_mol(self.temperature_K)

    @property
    def beta(self) -> float:
        """1/kT in mol/kJ."""
        return 1.0 / self.kT

    @property
    def masses_amu(self) -> np.ndarray:
        return np.array([self.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(self.n_atoms)])

    @property
    def bonds(self) -> np.ndarray:
        """(n_bonds, 2) int: the topology's bonds, 0-based atom indices."""
        pairs = [(b[0].index, b[1].index) for b in self.topology.bonds()]
        return np.array(pairs, dtype=int).reshape(-1, 2)

    @property
    def torsion_names(self) -> list[str]:
        return list(self.torsions)

    @property
    def torsion_array(self) -> np.ndarray:
        """(k, 4) int: the named torsions in insertion order."""
        return np.array(list(self.torsions.values()), dtype=int).reshape(-1, 4)

    @property
    def has_constraints(self) -> bool:
        return self.system.getNumConstraints() > 0

    @property
    def elements(self) -> list[str]:
        return [a.element.symbol if a.element is not None else "X" for a in self.topology.atoms()]

    @property
    def atom_labels(self) -> list[str]:
        """One label per atom, 'RES:NAME' (e.g. 'ALA:CA'), used as atom types by the flow model."""
        return [f"{a.residue.name}:{a.name}" for a in self.topology.atoms()]

    def fingerprint(self) -> str:
        """A short hash of atom names, elements, residues and bonds: checkpoints record it to refuse other systems."""
        digest = hashlib.sha256()
        for atom in self.topology.atoms():
            symbol = atom.element.symbol if atom.element is not None else "X"
            digest.update(f"{atom.residue.name}:{atom.name}:{symbol};".encode())
        for i, j in sorted(tuple(sorted(b)) for b in self.bonds.tolist()):
            digest.update(f"{i}-{j};".encode())
        return digest.hexdigest()[:16]

    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.Topology.from_openmm(self.topology)

    # -- OpenMM objects -----------------------------------------------------------------------------
    def create_context(self, platform: str | None = "Reference", integrator: openmm.Integrator | None = None,
                       positions_nm: np.ndarray | None = None) -> openmm.Context:
        """A fresh Context on ``platform`` (default Reference: fastest for ~22 atoms in vacuum/implicit solvent)."""
        integrator = integrator or openmm.VerletIntegrator(1.0 * unit.femtosecond)
        platform_obj = get_platform(platform)
        context = openmm.Context(self.system, integrator, platform_obj) if platform_obj else openmm.Context(self.system, integrator)
        context.setPositions(self.positions_nm if positions_nm is None else positions_nm)
        return context

    def thermodynamic_state(self, temperature_K: float | None = None):
        """An openmmtools ThermodynamicState of this system (NVT at the system's temperature by default)."""
        from openmmtools import states

        return states.ThermodynamicState(self.system, temperature=(temperature_K or self.temperature_K) * unit.kelvin)

    def sampler_state(self, positions_nm: np.ndarray | None = None):
        """An openmmtools SamplerState at the given (default: starting) positions."""
        from openmmtools import states

        positions = self.positions_nm if positions_nm is None else to_nm(positions_nm)
        return states.SamplerState(positions * unit.nanometer)


def get_platform(name: str | None) -> openmm.Platform | None:
    """The OpenMM platform called ``name`` (None lets OpenMM choose), with a clear error for unknown names."""
    if name is None:
        return None
    available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if name not in available:
        raise ConfSampleError(f"platform '{name}' is not available; choose one of {available}.")
    return openmm.Platform.getPlatformByName(name)


class EnergyEvaluator:
    """Potential energies (and forces) of many conformations through one reusable Context.

    Parameters
    ----------
    molecular_system : MolecularSystem
    platform : str, default 'Reference'

    ``energies(positions)`` takes (B, n_atoms, 3) or (n_atoms, 3) float nm and returns (B,) kJ/mol; a
    conformation whose energy is NaN/inf, or that OpenMM refuses, gets ``inf``.
    """

    def __init__(self, molecular_system: MolecularSystem, platform: str = "Reference"):
        self.molecular_system = molecular_system
        self.context = molecular_system.create_context(platform)

    def energies(self, positions_nm: np.ndarray) -> np.ndarray:
        return self.energies_and_forces(positions_nm, forces=False)[0]

    def energies_and_forces(self, positions_nm: np.ndarray, forces: bool = True):
        """Energies (B,) kJ/mol and, if ``forces``, forces (B, n_atoms, 3) kJ/mol/nm."""
        batch = np.asarray(positions_nm, dtype=float)
        single = batch.ndim == 2
        batch = batch[None] if single else batch
        energies = np.full(len(batch), np.inf)
        force_out = np.zeros_like(batch) if forces else None
        for b, x in enumerate(batch):
            if not np.all(np.isfinite(x)):
                continue
            self.context.setPositions(x)
            try:
                state = self.context.getState(getEnergy=True, getForces=forces)
            except openmm.OpenMMException:
                continue
            energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if np.isfinite(energy):
                energies[b] = energy
                if forces:
                    force_out[b] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        if single:
            return energies[0], (force_out[0] if forces else None)
        return energies, force_out


# -- construction ------------------------------------------------------------------------------------

def _peptide_torsions(topology: app.Topology) -> dict[str, tuple[int, int, int, int]]:
    """phi/psi of a peptide through mdtraj; 'phi'/'psi' when there is one residue with both, else 'phi:RESn'."""
    import mdtraj

    md_top = mdtraj.Topology.from_openmm(topology)
    traj = mdtraj.Trajectory(np.zeros((1, md_top.n_atoms, 3)), md_top)
    phi_idx, _ = mdtraj.compute_phi(traj) if md_top.n_atoms else (np.zeros((0, 4)), None)
    psi_idx, _ = mdtraj.compute_psi(traj) if md_top.n_atoms else (np.zeros((0, 4)), None)
    if len(phi_idx) == 1 and len(psi_idx) == 1:
        return {"phi": tuple(int(a) for a in phi_idx[0]), "psi": tuple(int(a) for a in psi_idx[0])}
    torsions = {}
    for kind, indices in (("phi", phi_idx), ("psi", psi_idx)):
        for quad in indices:
            residue = md_top.atom(int(quad[2])).residue
            torsions[f"{kind}:{residue}"] = tuple(int(a) for a in quad)
    return torsions


def _openmmtools_pdb(name: str) -> str:
    import openmmtools

    path = os.path.join(os.path.dirname(openmmtools.__file__), "data", name, "alanine-dipeptide.pdb")
    if not os.path.exists(path):
        raise ConfSampleError(f"openmmtools' data file {path} is missing; reinstall openmmtools.")
    return path


def system_from_pdb(pdb_path: str, forcefield_files=("amber99sbildn.xml",), temperature=300.0, name: str | None = None,
                    remove_residues=("HOH",), torsions: dict | None = None, implicit_solvent: bool = False,
                    nonbonded_method=app.NoCutoff, constraints=None) -> MolecularSystem:
    """Build a MolecularSystem from a PDB file and OpenMM force-field XML files.

    Parameters
    ----------
    pdb_path : str
        PDB file. Residues named in ``remove_residues`` (waters by default) are dropped.
    forcefield_files : sequence of str
        Force-field XML files as ``openmm.app.ForceField`` takes them, e.g. ``('amber99sbildn.xml', 'amber99_obc.xml')``.
    temperature : Quantity or float (K)
    torsions : dict name -> (i, j, k, l), optional
        Named torsions; by default phi/psi from mdtraj for peptides (none for other molecules).
    """
    if not os.path.isfile(pdb_path):
        raise ConfSampleError(f"PDB file '{pdb_path}' does not exist.")
    try:
        pdb = app.PDBFile(pdb_path)
    except Exception as exc:  # OpenMM raises a variety of parse errors
        raise ConfSampleError(f"PDB file '{pdb_path}' could not be read: {exc}") from exc
    modeller = app.Modeller(pdb.topology, pdb.positions)
    if remove_residues:
        doomed = [r for r in modeller.topology.residues() if r.name in set(remove_residues)]
        if doomed:
            modeller.delete(doomed)
    try:
        forcefield = app.ForceField(*forcefield_files)
    except Exception as exc:
        raise ConfSampleError(f"force-field files {list(forcefield_files)} could not be loaded: {exc}") from exc
    try:
        system = forcefield.createSystem(modeller.topology, nonbondedMethod=nonbonded_method, constraints=constraints)
    except ValueError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise ConfSampleError(
            f"the force field {list(forcefield_files)} cannot parametrize PDB file '{pdb_path}': {first_line}"
        ) from exc
    positions = modeller.positions.value_in_unit(unit.nanometer)
    if torsions is None:
        torsions = _peptide_torsions(modeller.topology)
    label = name or os.path.splitext(os.path.basename(pdb_path))[0]
    return MolecularSystem(label, system, modeller.topology, np.array(positions), to_kelvin(temperature),
                           dict(torsions), description=f"{pdb_path} with {', '.join(forcefield_files)}")


def system_from_openmm(system: openmm.System, topology: app.Topology, positions, temperature=300.0,
                       torsions: dict | None = None, name: str = "user-system") -> MolecularSystem:
    """Wrap a user's (System, Topology, positions) triple; phi/psi are found for peptides when ``torsions`` is None."""
    if not isinstance(system, openmm.System):
        raise ConfSampleError(f"system must be an openmm.System, got {type(system).__name__}.")
    if not isinstance(topology, app.Topology):
        raise ConfSampleError(f"topology must be an openmm.app.Topology, got {type(topology).__name__}.")
    if torsions is None:
        torsions = _peptide_torsions(topology)
    return MolecularSystem(name, system, topology, to_nm(positions), to_kelvin(temperature), dict(torsions),
                           description="user-provided openmm.System")


def _alanine_dipeptide_implicit() -> MolecularSystem:
    return system_from_pdb(_openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml", "amber99_obc.xml"),
                           300.0, name="alanine-dipeptide-implicit")


def _alanine_dipeptide_vacuum() -> MolecularSystem:
    return system_from_pdb(_openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml",), 300.0,
                           name="alanine-dipeptide-vacuum")


_REGISTRY: dict[str, Callable[[], MolecularSystem]] = {
    "alanine-dipeptide-implicit": _alanine_dipeptide_implicit,
    "alanine-dipeptide-vacuum": _alanine_dipeptide_vacuum,
}


def register_system(name: str, factory: Callable[[], MolecularSystem]) -> None:
    """Add a named system; ``factory()`` must return a fresh MolecularSystem."""
    _REGISTRY[name] = factory


def list_systems() -> list[str]:
    return sorted(_REGISTRY)


def get_system(name: str, temperature=None) -> MolecularSystem:
    """A fresh copy of the named system, optionally at another temperature (Quantity or K).

    Raises ConfSampleError for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ConfSampleError(f"unknown system '{name}'; known systems are {list_systems()}.")
    molecular_system = _REGISTRY[name]()
    if temperature is not None:
        molecular_system.temperature_K = to_kelvin(temperature)
    return molecular_system


def resolve_system(spec, forcefield_files=None, temperature=None) -> MolecularSystem:
    """A MolecularSystem from what a user passes: an instance, a registry name, or a PDB path (+ force fields)."""
    if isinstance(spec, MolecularSystem):
        return spec
    if isinstance(spec, str) and spec in _REGISTRY:
        return get_system(spec, temperature)
    if isinstance(spec, str) and spec.lower().endswith(".pdb"):
        return system_from_pdb(spec, forcefield_files or ("amber99sbildn.xml", "amber99_obc.xml"),
                               temperature if temperature is not None else 300.0)
    raise ConfSampleError(
        f"system '{spec}' is neither a known system name ({list_systems()}) nor a PDB file path."
    )
