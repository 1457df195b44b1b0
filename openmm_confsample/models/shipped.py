"""The models the package ships, by name: ``TorsionDiffusionMove("alanine-dipeptide", simulation)``.

Each shipped model is a checkpoint under ``openmm_confsample/resources/`` made by the package's own commands
(``benchmarks/README.md`` says how to remake each); ``confsample models`` lists them. Everywhere a model
is taken (a move, ``--model`` on the command line) a shipped model's name works as well as a checkpoint
path: :func:`resolve_model_path` turns either into a path. This module imports no torch, so listing the
models and checking a name stay fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfSampleError

__all__ = ["ShippedModel", "SHIPPED_MODELS", "shipped_models", "resolve_model_path"]

_RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources")


@dataclass(frozen=True)
class ShippedModel:
    """A model in the package's resources.

    name : the name a move or ``--model`` accepts
    filename : the checkpoint's file name in ``openmm_confsample/resources``
    kind : 'diffusion' (TorsionDiffusionMove), 'timewarp' (TimewarpMove) or 'fragment' (FragmentMove)
    system : the registry system it was trained for (moves refuse other topologies)
    trained_on : one line on its training data
    """

    name: str
    filename: str
    kind: str
    system: str
    trained_on: str

    @property
    def path(self) -> str:
        return os.path.join(_RESOURCES, self.filename)


#: Name -> the shipped model. A name of the form SYSTEM (torsion diffusion) or SYSTEM-timewarp.
SHIPPED_MODELS = {model.name: model for model in (
    ShippedModel("alanine-dipeptide", "alanine_dipeptide_diffusion.pt", "diffusion", "alanine-dipeptide-implicit",
                 "torsion diffusion on phi/psi; 120 s of MD with basin torsion moves at 300 K, 30 % of frames "
                 "phi > 0 (benchmarks/make_demo_model.py)"),
    ShippedModel("peptide-fragments", "peptide_fragments.pt", "fragment", "any capped peptide (zero-shot)",
                 "fragment torsion tables per residue type; MD of the 20 capped dipeptides except LEU (left out "
                 "for the zero-shot check) at 300 K and 500 K: 100 ps each with uniform fragment moves, then 300 ps "
                 "each with a first model's moves (benchmarks/make_fragment_model.py)"),
    ShippedModel("alanine-dipeptide-timewarp", "alanine_dipeptide_timewarp.pt", "timewarp",
                 "alanine-dipeptide-implicit",
                 "Timewarp flow in internal coordinates, tau = 5 ps; 6 x 1.5 ns of MD with a learned torsion bias "
                 "(benchmarks/README.md)"),
)}


def shipped_models() -> list[ShippedModel]:
    """Every shipped model, in name order."""
    return [SHIPPED_MODELS[name] for name in sorted(SHIPPED_MODELS)]


def resolve_model_path(model, kind: str | None = None) -> str:
    """The checkpoint path of ``model``: a shipped model's name or a path to an existing file.

    ``kind`` ('diffusion' or 'timewarp'), when given, refuses a shipped model of the other kind in one
    sentence (a path is checked by the model's own loader).
    """
    if not isinstance(model, (str, os.PathLike)):
        raise ConfSampleError(f"model must be a shipped model's name or a checkpoint path, got {type(model).__name__}.")
    text = os.fspath(model)
    if text in SHIPPED_MODELS:
        shipped = SHIPPED_MODELS[text]
        if kind is not None and shipped.kind != kind:
            wanted = [m.name for m in shipped_models() if m.kind == kind]
            raise ConfSampleError(f"shipped model '{text}' is a {shipped.kind} model, not a {kind} model "
                                  f"(shipped {kind} models: {', '.join(wanted) or 'none'}).")
        if not os.path.isfile(shipped.path):
            raise ConfSampleError(f"shipped model '{text}' is missing from the installation ({shipped.path}); "
                                  "reinstall openmm-confsample.")
        return shipped.path
    if os.path.isfile(text):
        return text
    raise ConfSampleError(f"model '{text}' is not a shipped model ({', '.join(sorted(SHIPPED_MODELS))}) and as a "
                          f"checkpoint path it does not exist.")
