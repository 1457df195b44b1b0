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
