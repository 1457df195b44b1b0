"""A process-wide cache of loaded models, so deep copies and deserialized moves share weights.

openmmtools deep-copies and YAML-serializes moves every iteration; a move's state therefore holds a
*reference* to its model (a checkpoint path, or a key for a model that only lives in memory), and
reloading goes through :func:`get_model`, which loads each checkpoint once per process.
"""

from __future__ import annotations

import os
import threading

from ..errors import ConfSampleError

_LOCK = threading.Lock()
_MODELS: dict[str, object] = {}


def model_key(model, path: str | None = None) -> str:
    """The key under which ``model`` is cached: its checkpoint path, or ``memory:<id>`` for an unsaved model."""
    key = os.path.abspath(path) if path is not None else f"memory:{id(model)}"
    with _LOCK:
        _MODELS.setdefault(key, model)
    return key


def resolve(model, loader) -> tuple[object, str]:
    """``(model, key)`` for a model object or its checkpoint path (loaded once per process with ``loader``).

    A loaded model's ``checkpoint_path`` attribute, when set, is its key, so deserialized moves find it again.
    """
    if isinstance(model, (str, os.PathLike)):
        key = os.fspath(model)
        key = key if key.startswith("memory:") else os.path.abspath(key)
        return get_model(key, loader), key
    return model, model_key(model, getattr(model, "checkpoint_path", None))


def get_model(key: str, loader):
    """The model cached under ``key``, loading it with ``loader(path)`` the first time."""
    with _LOCK:
        if key in _MODELS:
            return _MODELS[key]
    if key.startswith("memory:"):
        raise ConfSampleError(
            f"model '{key}' only existed in another process's memory; save it with model.save(path) "
            "before putting the move into stored or multi-process samplers."
        )
    if not os.path.isfile(key):
        raise ConfSampleError(f"model checkpoint '{key}' does not exist.")
    model = loader(key)
    with _LOCK:
        return _MODELS.setdefault(key, model)


def clear() -> None:
    """Forget every cached model (tests; or to reload a checkpoint that changed on disk)."""
    with _LOCK:
        _MODELS.clear()
