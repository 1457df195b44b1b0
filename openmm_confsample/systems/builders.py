"""MolecularSystems from what a user has: a PDB file with force-field XML files, or an OpenMM
(System, Topology, positions) triple. Peptides get their phi/psi named (mdtraj) unless torsions are given.
"""

from __future__ import annotations

import os

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ..errors import ConfSampleError
from ..units import to_kelvin, to_nm
from .molecular import MolecularSystem


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
    import importlib.util

    # find_spec locates the package without importing it (import openmmtools takes ~2 s: issue 14, item 5)
    spec = importlib.util.find_spec("openmmtools")
    root = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else ""
    path = os.path.join(root, "data", name, "alanine-dipeptide.pdb")
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


def system_from_simulation(simulation: app.Simulation, temperature=None, torsions: dict | None = None,
                           name: str = "simulation") -> MolecularSystem:
    """The MolecularSystem of a running ``openmm.app.Simulation``: its System, Topology and current positions,
    at its integrator's temperature (or ``temperature``, K or a Quantity, for integrators that have none).

    ``torsions`` (name -> quad) defaults to none: a move takes its torsions from its model. The integrator's
    step size becomes ``timestep_fs`` (what an NCMC protocol uses by default).
    """
    if not isinstance(simulation, app.Simulation):
        raise ConfSampleError(f"simulation must be an openmm.app.Simulation, got {type(simulation).__name__}.")
    if temperature is None:
        integrator = simulation.integrator
        if not hasattr(integrator, "getTemperature"):
            raise ConfSampleError(f"the Simulation's {type(integrator).__name__} has no temperature; pass "
                                  "temperature= (kelvin) to the move.")
        temperature = integrator.getTemperature()
    positions = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    if len(positions) > 1 and not np.any(positions):
        raise ConfSampleError("the Simulation's positions are not set: call simulation.context.setPositions(...) "
                              "before creating the move.")
    step = getattr(simulation.integrator, "getStepSize", None)
    timestep_fs = step().value_in_unit(unit.femtosecond) if step is not None else None
    return MolecularSystem(name, simulation.system, simulation.topology, np.array(positions), to_kelvin(temperature),
                           dict(torsions or {}), description="an openmm.app.Simulation's System",
                           timestep_fs=timestep_fs or None)


def as_molecular_system(target, temperature=None) -> MolecularSystem:
    """A MolecularSystem from what a move is given: a MolecularSystem (as it is) or an ``openmm.app.Simulation``."""
    if isinstance(target, MolecularSystem):
        return target
    if isinstance(target, app.Simulation):
        return system_from_simulation(target, temperature)
    raise ConfSampleError(f"expected an openmm.app.Simulation or a MolecularSystem, got {type(target).__name__}.")
