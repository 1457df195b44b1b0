"""One torsion model for the fragments of many peptides, and the exact tables a fragment move samples.

* :mod:`.context`: fragments (a residue's phi, psi, chi) and their contexts (residue and neighbour types)
* :mod:`.tables`: exact piecewise-constant densities on a grid; conditionals for moved/fixed torsions
* :mod:`.model`: untrained (uniform, von Mises) and learned (:class:`FragmentTorsionModel`) densities
* :mod:`.data`: training data from MD of the dipeptide family (300 K pooled with hot MD)
* :mod:`.trainer`: :class:`FragmentModelTrainer` (``fit(data).fetch_model()``)

The move that uses them is :class:`openmm_confsample.moves.fragment.FragmentProposal`; docs/fragments.md.
"""

from .context import BLOCKS, KINDS, Fragment, fragments_from_names, peptide_fragments, residue_features
from .model import FragmentNetwork, FragmentTorsionModel, UniformFragmentDensity, VonMisesFragmentDensity
from .data import FragmentData, fragment_angles, sample_fragment_md
from .tables import FragmentConditional, FragmentTable, crankshaft_fiber
from .trainer import FragmentModelTrainer

__all__ = ["BLOCKS", "KINDS", "Fragment", "fragments_from_names", "peptide_fragments", "residue_features",
           "FragmentNetwork", "FragmentTorsionModel", "UniformFragmentDensity", "VonMisesFragmentDensity",
           "FragmentConditional", "FragmentTable", "crankshaft_fiber", "FragmentData", "fragment_angles",
           "sample_fragment_md", "FragmentModelTrainer"]
