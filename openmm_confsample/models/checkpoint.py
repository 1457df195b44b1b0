"""Save and load a trained model as one torch file that says what it is.

A checkpoint is a plain dict written with :func:`torch.save` and read back with
``weights_only=True`` (no pickled code runs on load)::

    {
        "format_version": 2,
        "kind": "torsion_diffusion",          # which model class can read it
        "package_version": "0.1.0",           # openmm_confsample.__version__ at save time
        "config": {...},                      # constructor arguments of the network/model
        "state_dict": {...},                  # torch tensors
        "metadata": {
            "torsions": [{"name": "phi", "atoms": [4, 6, 8, 14]}, ...],
            "topology_fingerprint": "sha256:...",   # or None
            "data_source": "traj.dcd",              # or None
            "temperature": 300.0,                   # kelvin, of the training data; or None
            "history": {"train_loss": [...], "val_loss": [...]},
            ...                                     # any further JSON-like entries
        },
    }

Compatibility is decided by ``format_version`` alone, an integer bumped whenever an older reader could
not follow the file: a package reads every version from :data:`MIN_FORMAT_VERSION` to
:data:`FORMAT_VERSION` and refuses others in one sentence naming the package version that wrote the file.
Version 1: the first release (the shipped models). Version 2: a torsion diffusion model stores its
sampling divisor as ``config['sampling_scale']`` (``'temperature'`` in version 1, mapped on load) and
its ``latent_tol`` and ``max_stretch``; a version-1 reader would fail on those keys.

Only JSON-like values (dict, list, str, int, float, bool, None) and tensors may appear,
so the file stays loadable with ``weights_only=True``; numpy scalars and arrays are
converted on save.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfSampleError

__all__ = ["FORMAT_VERSION", "MIN_FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "normalize_torsions"]

#: Bumped whenever the layout above changes in a way an older reader cannot follow.
FORMAT_VERSION = 2
#: The oldest format this package still reads.
MIN_FORMAT_VERSION = 1

_STANDARD_METADATA = {
    "torsions": [],
    "topology_fingerprint": None,
    "data_source": None,
    "temperature": None,
    "history": {},
}


def _package_version() -> str:
    from .. import __version__

    return str(__version__)


def _plain(value, where: str):
    """Convert numpy/tuple values to the JSON-like types ``weights_only`` loading accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfSampleError(
        f"checkpoint entry {where} has type {type(value).__name__}; only numbers, strings, "
        "lists, dicts, None and tensors can be stored."
    )


def normalize_torsions(torsions, n_torsions: int | None = None) -> list[dict]:
    """Return torsion definitions as ``[{"name": str, "atoms": [i, j, k, l]}, ...]``.

    Accepts dicts with ``name`` and ``atoms`` keys, ``(name, (i, j, k, l))`` pairs or bare
    quadruples (named ``torsion_0``, ...). ``n_torsions``, when given, must match the count.
    """
    if torsions is None:
        return []
    out = []
    for index, item in enumerate(torsions):
        if isinstance(item, dict):
            name, atoms = item.get("name", f"torsion_{index}"), item.get("atoms")
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], str)
        ):
            name, atoms = item
        else:
            name, atoms = f"torsion_{index}", item
        try:
            atoms = [int(a) for a in atoms]
        except (TypeError, ValueError):
            raise ConfSampleError(
                f"metadata['torsions'][{index}] must give four integer atom indices, got {atoms!r}."
            ) from None
        if len(atoms) != 4 or len(set(atoms)) != 4 or min(atoms) < 0:
            raise ConfSampleError(
                f"metadata['torsions'][{index}] must be four distinct non-negative atom indices, "
                f"got {atoms}."
            )
        out.append({"name": str(name), "atoms": atoms})
    if n_torsions is not None and out and len(out) != n_torsions:
        raise ConfSampleError(
            f"metadata['torsions'] defines {len(out)} torsions but the model has {n_torsions}."
        )
    return out


def save_checkpoint(path, kind: str, config: dict, state_dict: dict, metadata: dict | None = None) -> Path:
    """Write a checkpoint (layout in the module docstring) and return its path.

    Parameters
    ----------
    path : str or PathLike
        Destination file; parent folders are created.
    kind : str
        Model kind, checked on load (e.g. ``"torsion_diffusion"``).
    config : dict
        JSON-like constructor arguments.
    state_dict : dict of tensors
    metadata : dict, optional
        Standard keys ``torsions``, ``topology_fingerprint``, ``data_source``,
        ``temperature`` (kelvin), ``history``; other JSON-like keys are kept as given.
    """
    if not isinstance(kind, str) or not kind:
        raise ConfSampleError("kind must be a non-empty string naming the model class.")
    meta = dict(_STANDARD_METADATA)
    meta.update(metadata or {})
    meta["torsions"] = normalize_torsions(meta["torsions"])
    if meta["temperature"] is not None:
        try:
            meta["temperature"] = float(meta["temperature"])
        except (TypeError, ValueError):
            raise ConfSampleError(
                f"metadata['temperature'] must be a number in kelvin, got {meta['temperature']!r}."
            ) from None
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "package_version": _package_version(),
        "config": _plain(dict(config), "config"),
        "state_dict": {str(k): v.detach().cpu() for k, v in state_dict.items()},
        "metadata": _plain(meta, "metadata"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so an interrupted save never leaves a truncated checkpoint behind.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path, kind: str | None = None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`~openmm_confsample.errors.ConfSampleError` when the file is missing or
    unreadable, when ``kind`` is given and differs from the stored kind, or when the file
    was written in a format version this package cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfSampleError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise ConfSampleError(
            f"checkpoint file {str(path)!r} could not be read as a torch checkpoint ({exc.__class__.__name__})."
        ) from exc
    if not isinstance(payload, dict) or "format_version" not in payload or "kind" not in payload:
        raise ConfSampleError(f"checkpoint file {str(path)!r} is not an openmm-confsample checkpoint.")
    version = payload["format_version"]
    known = isinstance(version, int) and not isinstance(version, bool)
    if not (known and MIN_FORMAT_VERSION <= version <= FORMAT_VERSION):
        newer = known and version > FORMAT_VERSION
        advice = "upgrade openmm-confsample to load it" if newer else "it is not a format this package knows"
        raise ConfSampleError(
            f"checkpoint file {str(path)!r} has format version {version!r} (written by openmm-confsample "
            f"{payload.get('package_version', 'unknown')}); this package ({_package_version()}) reads format "
            f"versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}: {advice}."
        )
    if kind is not None and payload["kind"] != kind:
        raise ConfSampleError(
            f"checkpoint file {str(path)!r} holds a {payload['kind']!r} model, not {kind!r}."
        )
    meta = dict(_STANDARD_METADATA)
    meta.update(payload.get("metadata") or {})
    payload["metadata"] = meta
    return payload
