"""The Timewarp conditional flow p(x(t+tau), v | x(t)): a learned proposal for exact MH moves.

Modules, in the order the data flows through them:

* :mod:`.config` -- :class:`TimewarpConfig`, the sizes of the flow and the space of its position half;
* :mod:`.zmatrix` -- bonds guessed from geometry, a Z-matrix, and the map x <-> internal coordinates q;
* :mod:`.layers` -- kernel self-attention, the atom transformer and the RealNVP coupling blocks;
* :mod:`.model` -- :class:`TimewarpModel`, the conditional density (condition first, numpy in and out:
  ``sample(condition, n, generator)``, ``log_prob(condition, y)``, ``sample_and_log_prob``), with ``y`` an
  :class:`AugmentedState` of positions ``y.x`` and auxiliary velocities ``y.v``; saving and loading;
* :mod:`.energy` -- potential energies as a torch op whose gradient is -forces;
* :mod:`.trainer` -- :class:`TimewarpTrainer` (likelihood, then acceptance; ``fetch_model()``) and its plot.

Reference: Klein et al., "Timewarp: Transferable Acceleration of Molecular Dynamics by Learning
Time-Coarsened Dynamics", NeurIPS 2023.
"""

from .config import TimewarpConfig
from .energy import PotentialEnergy, potential_energy
from .layers import CouplingBlock, FlowContext, kernel_attention_weights
from .model import MODEL_KIND, AugmentedState, TimewarpModel
from .trainer import TimewarpTrainer, random_rotations
from .zmatrix import InternalCoordinates, guess_bonds, zmatrix_for, zmatrix_from_bonds

__all__ = [
    "TimewarpConfig",
    "TimewarpModel",
    "AugmentedState",
    "TimewarpTrainer",
    "PotentialEnergy",
    "potential_energy",
    "random_rotations",
    "guess_bonds",
    "zmatrix_for",
    "zmatrix_from_bonds",
    "InternalCoordinates",
    "CouplingBlock",
    "FlowContext",
    "kernel_attention_weights",
    "MODEL_KIND",
]
