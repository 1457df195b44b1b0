"""Named systems (:func:`get_system`, ``confsample systems``) and :func:`resolve_system`, which turns what a
user passes (a MolecularSystem, a registry name or a PDB path) into a MolecularSystem.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfSampleError
from ..units import to_kelvin
from .builders import _openmmtools_pdb, system_from_pdb
from .molecular import MolecularSystem
from .peptides import PEPTIDE_SYSTEMS
from .solvated import alanine_dipeptide_explicit, is_water_model, set_barostat_temperature, solvated_system_from_pdb


def _alanine_dipeptide_implicit() -> MolecularSystem:
    return system_from_pdb(_openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml", "amber99_obc.xml"),
                           300.0, name="alanine-dipeptide-implicit")


def _alanine_dipeptide_vacuum() -> MolecularSystem:
    return system_from_pdb(_openmmtools_pdb("alanine-dipeptide-explicit"), ("amber99sbildn.xml",), 300.0,
                           name="alanine-dipeptide-vacuum")


_REGISTRY: dict[str, Callable[[], MolecularSystem]] = {
    "alanine-dipeptide-implicit": _alanine_dipeptide_implicit,
    "alanine-dipeptide-vacuum": _alanine_dipeptide_vacuum,
    "alanine-dipeptide-explicit": alanine_dipeptide_explicit,  # TIP3P box, PME, HBonds, barostat, 2 fs
}
_REGISTRY.update(PEPTIDE_SYSTEMS)  # dipeptide-X, pentapeptide-AAAAA/-KVPFE, trpzip2-implicit (built once, cached)


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
        set_barostat_temperature(molecular_system.system, molecular_system.temperature_K)
    return molecular_system


def resolve_system(spec, forcefield_files=None, temperature=None) -> MolecularSystem:
    """A MolecularSystem from what a user passes: an instance, a registry name, or a PDB path (+ force fields).

    A PDB file with water, given with a water model among its force fields (e.g. ``amber14-all.xml
    amber14/tip3p.xml``), keeps its waters and box (:func:`solvated_system_from_pdb`: PME, HBonds, barostat, 2 fs);
    otherwise waters are dropped and the default force fields are implicit solvent, as before.
    """
    if isinstance(spec, MolecularSystem):
        return spec
    if isinstance(spec, str) and spec in _REGISTRY:
        return get_system(spec, temperature)
    if isinstance(spec, str) and spec.lower().endswith(".pdb"):
        if forcefield_files and any(is_water_model(f) for f in forcefield_files):
            return solvated_system_from_pdb(spec, forcefield_files, temperature if temperature is not None else 300.0)
        return system_from_pdb(spec, forcefield_files or ("amber99sbildn.xml", "amber99_obc.xml"),
                               temperature if temperature is not None else 300.0)
    raise ConfSampleError(
        f"system '{spec}' is neither a known system name ({list_systems()}) nor a PDB file path."
    )
