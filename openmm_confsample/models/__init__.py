"""The learned generators behind one density protocol (:mod:`.protocol`): torsion diffusion and the Timewarp flow,
their trainers, checkpoints, and the models the package ships (:mod:`.shipped`).

Names are imported on first use (PEP 562), so ``from openmm_confsample.models import shipped_model_path`` does
not pull in torch.
"""

import importlib as _importlib

_LAZY = {
    "load_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
    "TorsionDiffusionModel": ".torsion_diffusion", "TorsionDiffusionTrainer": ".torsion_diffusion",
    "ScoreNetwork": ".torsion_diffusion", "InvertibilityError": ".torsion_diffusion", "plot_loss": ".torsion_diffusion",
    "TimewarpModel": ".timewarp", "TimewarpTrainer": ".timewarp", "TimewarpConfig": ".timewarp",
    "shipped_models": ".shipped", "resolve_model_path": ".shipped", "SHIPPED_MODELS": ".shipped",
    "FragmentTorsionModel": ".fragments", "FragmentModelTrainer": ".fragments",
}


def shipped_model_path(name: str = "alanine-dipeptide") -> str:
    """Path of a model the package ships, by its name (``confsample models`` lists them) or its file name."""
    from ..errors import ConfSampleError
    from .shipped import SHIPPED_MODELS, resolve_model_path

    key = {model.filename: model.name for model in SHIPPED_MODELS.values()}.get(name, name)
    if key not in SHIPPED_MODELS:
        raise ConfSampleError(f"the package ships no model '{name}' (it ships {', '.join(sorted(SHIPPED_MODELS))}).")
    return resolve_model_path(key)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["shipped_model_path", *_LAZY]
