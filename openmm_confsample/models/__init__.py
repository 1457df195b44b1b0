"""The learned generators: torsion diffusion and the Timewarp flow, with their trainers."""

import os as _os

from .checkpoint import load_checkpoint, save_checkpoint
from .timewarp import TimewarpConfig, TimewarpModel, TimewarpTrainer
from .torsion_diffusion import (InvertibilityError, ScoreNetwork, TorsionDiffusionModel, TorsionDiffusionTrainer,
                                plot_loss)


def shipped_model_path(name: str = "alanine_dipeptide_diffusion.pt") -> str:
    """Path of a model the package ships (made by its own commands; see benchmarks/README.md)."""
    from ..errors import ConfSampleError

    path = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "resources", name)
    if not _os.path.isfile(path):
        raise ConfSampleError(f"the package ships no model '{name}' (looked at {path}).")
    return path


__all__ = ["load_checkpoint", "save_checkpoint", "shipped_model_path", "TorsionDiffusionModel",
           "TorsionDiffusionTrainer", "ScoreNetwork", "InvertibilityError", "plot_loss",
           "TimewarpModel", "TimewarpTrainer", "TimewarpConfig"]
