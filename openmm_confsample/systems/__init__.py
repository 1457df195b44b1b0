"""What is simulated: an OpenMM System with its topology, positions, temperature and named torsions.

A :class:`MolecularSystem` is the one object the data pipeline, the models, the moves and the
benchmarks pass around. Named systems come from a small registry (:func:`get_system`); a user's own
system comes from :func:`system_from_openmm` (any System/Topology/positions triple) or
:func:`system_from_pdb` (a PDB file plus force-field XML files) and works everywhere a named one does.

* :mod:`.molecular`: MolecularSystem, EnergyEvaluator, get_platform
* :mod:`.builders`: system_from_pdb, system_from_openmm, system_from_simulation, as_molecular_system
* :mod:`.registry`: the named systems, get_system, list_systems, register_system, resolve_system

Units and kT live in :mod:`openmm_confsample.units`.
"""

from .builders import as_molecular_system, system_from_openmm, system_from_pdb, system_from_simulation
from .molecular import EnergyEvaluator, MolecularSystem, get_platform
from .registry import get_system, list_systems, register_system, resolve_system

__all__ = ["MolecularSystem", "EnergyEvaluator", "get_platform", "system_from_pdb", "system_from_openmm",
           "system_from_simulation", "as_molecular_system",
           "get_system", "list_systems", "register_system", "resolve_system"]
