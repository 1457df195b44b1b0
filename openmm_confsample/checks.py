"""Input checks shared by every module: one place for positive numbers, seeds and angle wrapping.

Each check raises :class:`~openmm_confsample.errors.ConfSampleError` with one sentence naming the argument,
at the point where the input enters the package.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfSampleError

TWO_PI = 2.0 * math.pi


def positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools, fractions and strings refused)."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= minimum
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfSampleError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def positive_float(value, name: str, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (or >= 0 with ``allow_zero``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ConfSampleError(f"{name} must be {kind} and finite, got {value!r}.")
    return number


def finite_float(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfSampleError(f"{name} must be a finite number, got {value!r}.")
    return number


#: A kT above this (kJ/mol; 100 kJ/mol is 12,000 K) is a temperature in kelvin passed as kT.
MAX_PLAUSIBLE_KT_KJ = 100.0


def positive_kT(value, name: str = "kT") -> float:
    """``value`` as a thermal energy kT in kJ/mol: finite, > 0 and not a temperature in kelvin (<= 100 kJ/mol)."""
    number = positive_float(value, f"{name} (kJ/mol)")
    if number > MAX_PLAUSIBLE_KT_KJ:
        raise ConfSampleError(
            f"{name} of {number:g} kJ/mol is over {MAX_PLAUSIBLE_KT_KJ:g} kJ/mol (a temperature in kelvin passed as "
            f"kT?); kT at 300 K is 2.494 kJ/mol (units.kT_kJ_per_mol)."
        )
    return number


def whole_steps(interval_ps, timestep_fs, name: str = "save_interval_ps") -> int:
    """The number of ``timestep_fs`` steps in ``interval_ps`` (both positive), refused unless a whole number >= 1."""
    interval_ps, timestep_fs = positive_float(interval_ps, name), positive_float(timestep_fs, "timestep_fs")
    steps = interval_ps * 1000.0 / timestep_fs
    if round(steps) < 1 or abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
        raise ConfSampleError(f"{name}={interval_ps} is not a whole number of {timestep_fs} fs timesteps.")
    return int(round(steps))


def as_generator(seed, name: str = "seed") -> np.random.Generator:
    """A numpy Generator from an int seed (0 included: every seed is reproducible), None or a Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    raise ConfSampleError(f"{name} must be an int, None or numpy.random.Generator, got {type(seed).__name__}.")


def wrap_angle(x):
    """Map angles (radians) to ``[-pi, pi)``; works on floats, numpy arrays and torch tensors alike."""
    r = (x + math.pi) % TWO_PI - math.pi
    # (x + pi) % 2 pi can round up to exactly 2 pi for x just below -pi.
    return r - TWO_PI * (r >= math.pi)
