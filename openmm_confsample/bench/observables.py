"""What a benchmark run records and measures: collective variables and the indicators built on them.

A sampler records :class:`CollectiveVariables` at every sample: named torsions (radians, from the system's
``torsions`` or atom quadruples the caller gives) and any callables ``positions_nm -> float``. The summary
then measures populations, free energies and effective sample sizes of :class:`Indicator` objects, boolean
functions of those recorded values::

    cvs = CollectiveVariables.for_system(molsys)                   # every named torsion of the system
    phi_positive = angle_range("phi", 0.0, 180.0, name="phi > 0")
    alpha_r = torsion_box("phi", (-180.0, 0.0), "psi", (-120.0, 50.0), name="alpha_R")
    rare = phi_positive & ~alpha_r                                 # and / or / not compose indicators

Angle ranges are arcs on the circle, open at both ends: ``angle_range("phi", 0, 180)`` is exactly
``phi > 0`` for angles wrapped into [-pi, pi), and ``angle_range("chi1", 120, -120)`` is the arc through
180 degrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..checks import TWO_PI
from ..errors import ConfSampleError
from ..geometry.torsions import dihedral_angles

__all__ = ["CollectiveVariables", "Indicator", "angle_range", "torsion_box", "positive", "above",
           "sign_indicators"]


class CollectiveVariables:
    """Named torsions (radians) and scalar functions of the positions, evaluated together at each sample.

    Parameters
    ----------
    torsions : dict name -> (i, j, k, l)
        Torsions, 0-based atom indices; recorded in radians in [-pi, pi).
    functions : dict name -> callable, optional
        ``f(positions_nm) -> float`` for any other collective variable (positions (n_atoms, 3) float, nm).
    """

    def __init__(self, torsions: Mapping[str, Sequence[int]], functions: Mapping[str, Callable] | None = None):
        functions = dict(functions or {})
        self.torsion_names = [str(name) for name in torsions]
        self.quads = np.array([tuple(int(a) for a in quad) for quad in torsions.values()], dtype=int).reshape(-1, 4)
        self.functions = functions
        names = self.torsion_names + list(functions)
        if not names:
            raise ConfSampleError("no collective variables to record: give torsions or functions.")
        if len(set(names)) != len(names):
            raise ConfSampleError(f"collective variable names must be unique, got {names}.")
        for name, function in functions.items():
            if not callable(function):
                raise ConfSampleError(f"collective variable '{name}' must be a callable positions_nm -> float.")
        self.names = names

    @classmethod
    def for_system(cls, molecular_system, spec=None) -> "CollectiveVariables":
        """The system's named torsions (``spec=None``), or what ``spec`` names.

        ``spec`` is a CollectiveVariables (used as it is), a sequence of the system's torsion names, or a
        dict name -> torsion name, atom quadruple (i, j, k, l) or callable ``positions_nm -> float``.
        """
        if isinstance(spec, CollectiveVariables):
            return spec
        known = molecular_system.torsions
        if spec is None:
            if not known:
                raise ConfSampleError(f"system '{molecular_system.name}' has no named torsions; pass the collective "
                                      "variables to record (torsion atom indices or callables).")
            return cls(known)
        if isinstance(spec, str):
            spec = [spec]
        items = spec.items() if isinstance(spec, Mapping) else ((name, name) for name in spec)
        torsions, functions = {}, {}
        for name, value in items:
            if callable(value):
                functions[name] = value
            elif isinstance(value, str):
                if value not in known:
                    raise ConfSampleError(f"system '{molecular_system.name}' has no torsion named '{value}' "
                                          f"(it has {list(known)}).")
                torsions[name] = known[value]
            elif np.shape(value) == (4,):
                torsions[name] = tuple(int(a) for a in value)
            else:
                raise ConfSampleError(f"collective variable '{name}' must be a torsion name, four atom indices or a "
                                      f"callable, got {value!r}.")
        return cls(torsions, functions)

    def __call__(self, positions_nm: np.ndarray) -> np.ndarray:
        """(n_cvs,) float: the values at one structure, in the order of ``names``."""
        values = dihedral_angles(positions_nm, self.quads) if len(self.quads) else np.zeros(0)
        if self.functions:
            values = np.concatenate([values, [float(f(positions_nm)) for f in self.functions.values()]])
        return values

    def as_dict(self, rows) -> dict[str, np.ndarray]:
        """(N, n_cvs) recorded rows -> name -> (N,) array."""
        rows = np.asarray(rows, dtype=float).reshape(-1, len(self.names))
        return {name: rows[:, i].copy() for i, name in enumerate(self.names)}

    def describe(self) -> dict:
        """Plain values for a run's settings."""
        return {"torsions": {n: q.tolist() for n, q in zip(self.torsion_names, self.quads)},
                "functions": list(self.functions)}


@dataclass(frozen=True)
class Indicator:
    """A named 0/1 observable of the recorded collective variables, e.g. "phi > 0" or "chi1 of Trp2 in g+".

    Parameters
    ----------
    name : str
        Used as the label in tables and as the key of the summary's per-indicator results.
    function : callable
        ``function(cvs) -> (N,) bool`` for ``cvs`` a dict name -> (N,) array (radians for torsions).
    requires : tuple of str
        The collective variables it reads; a run that lacks one is refused in one sentence.
    """

    name: str
    function: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    requires: tuple = ()

    def __call__(self, cvs: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.requires if n not in cvs]
        if missing:
            raise ConfSampleError(f"indicator '{self.name}' needs the collective variables {missing}, which the run "
                                  f"did not record (it has {list(cvs)}).")
        values = np.asarray(self.function(cvs), dtype=bool)
        if values.ndim != 1:
            raise ConfSampleError(f"indicator '{self.name}' must give one value per sample, got shape {values.shape}.")
        return values

    def renamed(self, name: str) -> "Indicator":
        return Indicator(name, self.function, self.requires)

    def __and__(self, other: "Indicator") -> "Indicator":
        return Indicator(f"({self.name}) and ({other.name})", lambda cvs: self(cvs) & other(cvs),
                         _union(self.requires, other.requires))

    def __or__(self, other: "Indicator") -> "Indicator":
        return Indicator(f"({self.name}) or ({other.name})", lambda cvs: self(cvs) | other(cvs),
                         _union(self.requires, other.requires))

    def __invert__(self) -> "Indicator":
        return Indicator(f"not ({self.name})", lambda cvs: ~self(cvs), self.requires)


def _union(a: tuple, b: tuple) -> tuple:
    return tuple(dict.fromkeys(a + b))


def angle_range(torsion: str, low_deg: float, high_deg: float, name: str | None = None) -> Indicator:
    """``torsion`` inside the open arc from ``low_deg`` counter-clockwise to ``high_deg`` (degrees).

    ``angle_range("phi", 0, 180)`` is ``phi > 0`` (phi = 0 and phi = -180 are outside); a range with
    ``high_deg < low_deg`` wraps through 180 degrees.
    """
    low, width = np.deg2rad(float(low_deg)), np.deg2rad((float(high_deg) - float(low_deg)) % 360.0)
    if width == 0.0:
        raise ConfSampleError(f"angle range ({low_deg}, {high_deg}) of '{torsion}' is empty.")

    def inside(cvs):
        offset = np.mod(np.asarray(cvs[torsion], dtype=float) - low, TWO_PI)
        return (offset > 0.0) & (offset < width)

    return Indicator(name or f"{torsion} in ({low_deg:g}, {high_deg:g})", inside, (torsion,))


def torsion_box(first: str, first_range_deg, second: str, second_range_deg, name: str | None = None) -> Indicator:
    """A basin as a box in two torsions: both inside their arcs (see :func:`angle_range`)."""
    box = angle_range(first, *first_range_deg) & angle_range(second, *second_range_deg)
    return box.renamed(name or f"{first} in {tuple(first_range_deg)}, {second} in {tuple(second_range_deg)}")


def positive(torsion: str) -> Indicator:
    """``torsion > 0`` (radians in [-pi, pi)): the sign of a torsion."""
    return angle_range(torsion, 0.0, 180.0, name=f"{torsion} > 0")


def above(cv: str, threshold: float, name: str | None = None) -> Indicator:
    """A scalar collective variable above ``threshold`` (in its own units)."""
    return Indicator(name or f"{cv} > {threshold:g}", lambda cvs: np.asarray(cvs[cv]) > threshold, (cv,))


def sign_indicators(torsion_names: Sequence[str]) -> list[Indicator]:
    """One ``name > 0`` indicator per torsion: what a system without known basins is measured by."""
    return [positive(name) for name in torsion_names]
