"""Units at the package's edges: OpenMM Quantities in, plain floats in nm, K and kJ/mol inside.

This is the one place kT is computed from a temperature (:func:`kT_kJ_per_mol`, or :func:`kT_of` for
anything that carries a temperature), and the one place positions and temperatures are converted.
"temperature" always means kelvin in this package.
"""

from __future__ import annotations

import numpy as np
from openmm import unit

from .errors import ConfSampleError

#: Boltzmann constant times Avogadro's number, kJ/(mol K): the one place kT is computed from.
MOLAR_GAS_CONSTANT_KJ = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)

#: Temperatures outside this range (K) are almost always a unit mistake (27 meant as Celsius, kT passed as
#: a temperature); they need ``allow_unusual_temperature=True``.
USUAL_TEMPERATURE_RANGE_K = (50.0, 2000.0)


def kT_kJ_per_mol(temperature_K: float) -> float:
    """Thermal energy kT in kJ/mol at ``temperature_K`` kelvin."""
    return MOLAR_GAS_CONSTANT_KJ * float(temperature_K)


def kT_of(thermodynamic_state) -> float:
    """kT in kJ/mol of an openmmtools ThermodynamicState (or anything with a ``temperature`` Quantity)."""
    return kT_kJ_per_mol(to_kelvin(thermodynamic_state.temperature))


def to_nm(positions, name: str = "positions") -> np.ndarray:
    """Convert positions (a Quantity with length units, or a plain array taken as nm) to a float array in nm.

    Raises ConfSampleError when the array is not (n_atoms, 3) or holds NaN/inf, naming ``name``.
    """
    if unit.is_quantity(positions):
        try:
            positions = positions.value_in_unit(unit.nanometer)
        except TypeError as exc:
            raise ConfSampleError(f"{name} must have length units (e.g. nanometer), got {positions.unit}.") from exc
    array = np.asarray(positions, dtype=float)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ConfSampleError(f"{name} must have shape (n_atoms, 3), got {array.shape}.")
    if not np.all(np.isfinite(array)):
        bad = np.unique(np.nonzero(~np.isfinite(array))[0])[:5].tolist()
        raise ConfSampleError(f"{name} contain NaN or infinite coordinates (atoms {bad}).")
    return array


def to_kelvin(temperature, name: str = "temperature", allow_unusual_temperature: bool = False) -> float:
    """Convert a temperature (Quantity or plain number taken as K) to a positive float in K.

    A value outside 50-2000 K is refused unless ``allow_unusual_temperature`` (27 is Celsius meant as K,
    2.49 is a kT in kJ/mol): the mistake costs a whole run and is cheap to catch here.
    """
    if unit.is_quantity(temperature):
        try:
            temperature = temperature.value_in_unit(unit.kelvin)
        except TypeError as exc:
            raise ConfSampleError(f"{name} must have temperature units (kelvin), got {temperature.unit}.") from exc
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ConfSampleError(f"{name} must be a temperature in kelvin, got {temperature!r}.") from None
    if not np.isfinite(value) or value <= 0:
        raise ConfSampleError(f"{name} must be a positive temperature in kelvin, got {value}.")
    low, high = USUAL_TEMPERATURE_RANGE_K
    if not allow_unusual_temperature and not low <= value <= high:
        raise ConfSampleError(
            f"{name} of {value:g} K is outside {low:g}-{high:g} K (Celsius or a kT given as kelvin?); "
            f"pass allow_unusual_temperature=True if it is meant."
        )
    return value
