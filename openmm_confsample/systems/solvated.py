"""Explicit solvent: a solute in a box of water (and ions), set up the way most OpenMM scripts already are.

:func:`solvated_system_from_pdb` builds a MolecularSystem from a solvated PDB file (waters kept, periodic box
from its CRYST1 record): PME electrostatics, HBonds constraints, rigid water and, by default, a
MonteCarloBarostat, with a 2 fs step recorded as the integration step the set-up is meant for
(``MolecularSystem.timestep_fs``). ``alanine-dipeptide-explicit`` in the registry is this on openmmtools' file.

:func:`find_solute_atoms` tells the solute from its environment: a residue is solvent when it is water (by
name, or by composition: one O and two H, plus massless sites) or a single-atom ion; everything else is solute.
The learned moves turn the solute's torsions; NCMC (:mod:`openmm_confsample.moves.ncmc`) softens the solute's
interactions with everything else.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ..checks import positive_float
from ..errors import ConfSampleError
from ..units import to_kelvin
from .builders import _openmmtools_pdb, _peptide_torsions
from .molecular import MolecularSystem

__all__ = ["WATER_RESIDUES", "ION_ELEMENTS", "find_solute_atoms", "barostats", "set_barostat_temperature",
           "is_water_model", "solvated_system_from_pdb", "alanine_dipeptide_explicit"]

#: Residue names read as water whatever their atoms (common PDB, Amber, GROMACS and CHARMM spellings).
WATER_RESIDUES = frozenset({"HOH", "WAT", "H2O", "SOL", "TIP", "TIP3", "TIP3P", "TIP4", "TIP4P", "TIP5", "TIP5P",
                            "T3P", "T4P", "T5P", "SPC", "SPCE", "DOD", "OPC"})
#: Elements of single-atom residues read as ions.
ION_ELEMENTS = frozenset({"Li", "Na", "K", "Rb", "Cs", "F", "Cl", "Br", "I", "Mg", "Ca", "Sr", "Ba", "Zn", "Mn",
                          "Fe", "Co", "Ni", "Cu", "Cd"})
#: Barostat classes: a fixed-volume protocol (NCMC) runs without them.
_BAROSTATS = tuple(getattr(openmm, name) for name in ("MonteCarloBarostat", "MonteCarloAnisotropicBarostat",
                                                       "MonteCarloMembraneBarostat", "MonteCarloFlexibleBarostat")
                   if hasattr(openmm, name))


def _is_water(residue) -> bool:
    if residue.name.upper() in WATER_RESIDUES:
        return True
    elements = Counter(a.element.symbol for a in residue.atoms() if a.element is not None)
    n_sites = sum(1 for _ in residue.atoms())
    return elements == Counter({"O": 1, "H": 2}) and n_sites <= 5  # TIP4P/TIP5P add massless sites


def _is_ion(residue) -> bool:
    atoms = list(residue.atoms())
    return len(atoms) == 1 and atoms[0].element is not None and atoms[0].element.symbol in ION_ELEMENTS


def find_solute_atoms(topology: app.Topology, periodic: bool | None = None, label: str = "the system") -> np.ndarray:
    """0-based indices of the atoms that are neither water nor ions, in topology order.

    Parameters
    ----------
    topology : openmm.app.Topology
    periodic : bool, optional
        Whether the system has a periodic box: a periodic system in which no residue is water or an ion is
        refused, since its solvent cannot be told from its solute (an unrecognised solvent, or one residue
        holding everything). None skips that check (vacuum and implicit solvent: everything is solute).
    label : str
        Names the system in error messages.

    Raises
    ------
    ConfSampleError
        When every atom is solvent, or a periodic system has nothing recognisable as solvent.
    """
    solute, n_solvent_residues = [], 0
    for residue in topology.residues():
        if _is_water(residue) or _is_ion(residue):
            n_solvent_residues += 1
        else:
            solute.extend(atom.index for atom in residue.atoms())
    if not solute:
        raise ConfSampleError(f"{label} has no solute: all its {n_solvent_residues} residues are water or ions.")
    if periodic and n_solvent_residues == 0:
        raise ConfSampleError(
            f"cannot tell the solute of {label} from its solvent: it is periodic but no residue is water (by name "
            f"or an H2O composition) or a single-atom ion; pass solute_atoms= (0-based atom indices) explicitly."
        )
    return np.array(sorted(solute), dtype=int)


def barostats(system: openmm.System) -> list[int]:
    """Indices of the Monte Carlo barostat forces in ``system`` (empty at constant volume)."""
    return [i for i, force in enumerate(system.getForces()) if isinstance(force, _BAROSTATS)]


def set_barostat_temperature(system: openmm.System, temperature_K: float) -> None:
    """Set the temperature of every barostat in ``system`` (it must match the integrator's)."""
    for index in barostats(system):
        system.getForce(index).setDefaultTemperature(to_kelvin(temperature_K) * unit.kelvin)


#: Fragments of the file names of OpenMM's water-model force fields (tip3p.xml, amber14/tip3pfb.xml, opc.xml, ...).
_WATER_MODELS = ("tip3p", "tip4p", "tip5p", "spce", "spc", "opc")


def is_water_model(forcefield_file: str) -> bool:
    """Whether an OpenMM force-field file name is a water model (a solvated PDB built with it keeps its water)."""
    return any(model in os.path.basename(str(forcefield_file)).lower() for model in _WATER_MODELS)


def solvated_system_from_pdb(pdb_path: str, forcefield_files=("amber14-all.xml", "amber14/tip3p.xml"),
                             temperature=300.0, pressure_bar: float | None = 1.0, cutoff_nm: float = 0.9,
                             constraints=app.HBonds, rigid_water: bool = True, timestep_fs: float = 2.0,
                             barostat_interval: int = 25, name: str | None = None,
                             torsions: dict | None = None) -> MolecularSystem:
    """A solvated PDB file (waters and ions kept) as a periodic MolecularSystem with PME and, optionally, a barostat.

    Parameters
    ----------
    pdb_path : str
        PDB file with a periodic box (CRYST1 record) and its water.
    forcefield_files : sequence of str
        Protein and water force fields, e.g. ``('amber14-all.xml', 'amber14/tip3p.xml')``.
    temperature : Quantity or float, K
    pressure_bar : float or None, bar
        Pressure of a MonteCarloBarostat added to the System (every ``barostat_interval`` steps); None: constant volume.
    cutoff_nm : float, nm
        Direct-space cutoff of PME.
    constraints, rigid_water
        As ``ForceField.createSystem`` takes them (default HBonds and rigid water).
    timestep_fs : float, fs
        The step the set-up is meant for (2 fs with HBonds); recorded as ``MolecularSystem.timestep_fs``.
    torsions : dict name -> (i, j, k, l), optional
        Named torsions; by default phi/psi of the peptide solute (mdtraj).
    """
    if not os.path.isfile(pdb_path):
        raise ConfSampleError(f"PDB file '{pdb_path}' does not exist.")
    cutoff_nm = positive_float(cutoff_nm, "cutoff_nm")
    timestep_fs = positive_float(timestep_fs, "timestep_fs")
    temperature_K = to_kelvin(temperature)
    try:
        pdb = app.PDBFile(pdb_path)
    except Exception as exc:  # OpenMM raises a variety of parse errors
        raise ConfSampleError(f"PDB file '{pdb_path}' could not be read: {exc}") from exc
    topology = pdb.topology
    if topology.getPeriodicBoxVectors() is None:
        raise ConfSampleError(f"PDB file '{pdb_path}' has no periodic box (CRYST1 record); a solvated system needs one.")
    if not any(_is_water(residue) for residue in topology.residues()):
        raise ConfSampleError(f"PDB file '{pdb_path}' contains no water: leave the water model out of the force "
                              "fields for vacuum or implicit solvent (system_from_pdb).")
    try:
        forcefield = app.ForceField(*forcefield_files)
        system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_nm * unit.nanometer,
                                         constraints=constraints, rigidWater=rigid_water)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfSampleError(f"the force field {list(forcefield_files)} cannot parametrize PDB file '{pdb_path}': "
                              f"{first_line}") from exc
    settings = [f"PME {cutoff_nm:g} nm", f"constraints {constraints}", "rigid water" if rigid_water else "flexible water"]
    if pressure_bar is not None:
        pressure_bar = positive_float(pressure_bar, "pressure_bar")
        system.addForce(openmm.MonteCarloBarostat(pressure_bar * unit.bar, temperature_K * unit.kelvin,
                                                  int(barostat_interval)))
        settings.append(f"MonteCarloBarostat {pressure_bar:g} bar")
    positions = np.array(pdb.positions.value_in_unit(unit.nanometer))
    if torsions is None:
        torsions = _peptide_torsions(topology)
    label = name or os.path.splitext(os.path.basename(pdb_path))[0]
    description = (f"{pdb_path} with {', '.join(forcefield_files)}; {', '.join(settings)}; "
                   f"integrate with a {timestep_fs:g} fs LangevinMiddleIntegrator")
    return MolecularSystem(label, system, topology, positions, temperature_K, dict(torsions), description=description,
                           timestep_fs=timestep_fs)


def alanine_dipeptide_explicit() -> MolecularSystem:
    """ACE-ALA-NME in 749 TIP3P waters (openmmtools' file): amber99sbildn, PME 0.9 nm, HBonds, 1 bar, 300 K, 2 fs."""
    return solvated_system_from_pdb(_openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml", "tip3p.xml"),
                                    300.0, pressure_bar=1.0, cutoff_nm=0.9, name="alanine-dipeptide-explicit")
