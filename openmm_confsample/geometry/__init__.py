"""Torsions: which atoms move, rigid rotations, rotatable-bond detection, stereocentres."""

from .chirality import chirality_signs, find_stereocentres
from .rotatable import detect_rotatable_torsions
from .torsions import TorsionSet, dihedral_angles, moving_atoms

__all__ = ["TorsionSet", "dihedral_angles", "moving_atoms", "detect_rotatable_torsions",
           "find_stereocentres", "chirality_signs"]
