"""Reconstruct, score, reweight and resample structures from torsion angles (the original study's protocol),
and check them with short MD.

A generator proposes torsion angles only. To turn angles into Boltzmann-distributed structures:

* :mod:`.rebuild`: :func:`template_molecule` (RDKit molecule in the topology's atom order) and
  :func:`rebuild_conformers` (set the torsions, relax the rest with MMFF94 around them);
* :mod:`.weights`: :func:`boltzmann_weights`, :func:`kish_effective_sample_size`, :func:`resample`,
  :func:`openmm_energies`;
* :mod:`.pipeline`: :func:`reweight_pipeline` runs all of it and writes the files;
* :mod:`.validation`: :func:`validate_structures` runs short OpenMM MD from each structure (implicit or
  explicit solvent) and records energy and RMSD traces.

Units: angles in radians, positions in nm, MMFF94 energies in kcal/mol, OpenMM energies in kJ/mol.
"""

from .pipeline import ReweightResult, reweight_pipeline
from .rebuild import TORSION_FORCE_CONSTANT, RebuiltConformers, rebuild_conformers, template_molecule
from .validation import ValidationResult, plot_validation, validate_structures
from .weights import (GAS_CONSTANT_KCAL, KT_KCAL_298, boltzmann_weights, kish_effective_sample_size,
                      openmm_energies, resample)

__all__ = [
    "GAS_CONSTANT_KCAL",
    "KT_KCAL_298",
    "TORSION_FORCE_CONSTANT",
    "RebuiltConformers",
    "ReweightResult",
    "ValidationResult",
    "boltzmann_weights",
    "kish_effective_sample_size",
    "openmm_energies",
    "plot_validation",
    "rebuild_conformers",
    "resample",
    "reweight_pipeline",
    "template_molecule",
    "validate_structures",
]
