"""The object every part of the package passes around: an OpenMM System with its topology, positions,
temperature and named torsions (:class:`MolecularSystem`), and :class:`EnergyEvaluator` for many energies.

Units: OpenMM ``Quantity`` objects are accepted at the edges (:mod:`openmm_confsample.units`); inside,
positions are float arrays in nm, temperatures floats in K and energies floats in kJ/mol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ..checks import positive_float
from ..errors import ConfSampleError
from ..units import check_position_scale, kT_kJ_per_mol, to_kelvin, to_nm


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
    timestep_fs : float, optional, fs
        The integration step the set-up is meant for (2 fs for a solvated system with HBonds constraints);
        None: no recommendation (samplers use their own default).

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
    timestep_fs: float | None = None

    def __post_init__(self):
        if self.timestep_fs is not None:
            self.timestep_fs = positive_float(self.timestep_fs, "timestep_fs")
        self.positions_nm = to_nm(self.positions_nm, "positions")
        self.temperature_K = to_kelvin(self.temperature_K)
        n_system, n_topology, n_positions = self.system.getNumParticles(), self.topology.getNumAtoms(), len(self.positions_nm)
        if not n_system == n_topology == n_positions:
            raise ConfSampleError(
                f"system '{self.name}' is inconsistent: the System has {n_system} particles, the topology "
                f"{n_topology} atoms and the positions {n_positions} rows."
            )
        check_position_scale(self.system, self.positions_nm, f"positions of system '{self.name}'")
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

    @property
    def solute_atoms(self) -> np.ndarray:
        """(n_solute,) int: atoms that are neither water nor ions (all atoms in vacuum or implicit solvent).

        Raises ConfSampleError when there is no solute, or when a periodic system has no recognisable solvent
        (:func:`openmm_confsample.systems.solvated.find_solute_atoms`).
        """
        from .solvated import find_solute_atoms  # deferred: solvated builds on this module

        return find_solute_atoms(self.topology, self.system.usesPeriodicBoundaryConditions(), f"system '{self.name}'")

    def fingerprint(self, atoms=None) -> str:
        """A short hash of atom names, elements, residues and bonds: checkpoints record it to refuse other systems.

        ``atoms`` (0-based indices, e.g. ``solute_atoms``) hashes that part only, renumbered from 0, so a solute
        in water has the fingerprint of the same molecule built without its water.
        """
        atoms = np.arange(self.n_atoms) if atoms is None else np.asarray(atoms, dtype=int)
        number = {int(a): n for n, a in enumerate(atoms)}
        all_atoms = list(self.topology.atoms())
        digest = hashlib.sha256()
        for index in atoms:
            atom = all_atoms[index]
            symbol = atom.element.symbol if atom.element is not None else "X"
            digest.update(f"{atom.residue.name}:{atom.name}:{symbol};".encode())
        bonds = [(number[i], number[j]) for i, j in self.bonds.tolist() if i in number and j in number]
        for i, j in sorted(tuple(sorted(b)) for b in bonds):
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

        temperature_K = self.temperature_K if temperature_K is None else to_kelvin(temperature_K)
        return states.ThermodynamicState(self.system, temperature=temperature_K * unit.kelvin)

    def sampler_state(self, positions_nm: np.ndarray | None = None):
        """An openmmtools SamplerState at the given (default: starting) positions (and the System's box if periodic)."""
        from openmmtools import states

        positions = self.positions_nm if positions_nm is None else to_nm(positions_nm)
        box = self.system.getDefaultPeriodicBoxVectors() if self.system.usesPeriodicBoundaryConditions() else None
        return states.SamplerState(positions * unit.nanometer, box_vectors=box)


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
