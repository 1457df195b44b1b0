"""Units at the package's edges: OpenMM Quantities in, plain floats in nm, K and kJ/mol inside.

This is the one place kT is computed from a temperature (:func:`kT_kJ_per_mol`, or :func:`kT_of` for
anything that carries a temperature), and the one place positions and temperatures are converted.
"temperature" always means kelvin in this package.
"""

from __future__ import annotations

import numpy as np
import openmm
from openmm import unit

from .errors import ConfSampleError

#: The units plain floats carry inside the package.
NM = unit.nanometer
KJ_PER_MOL = unit.kilojoule_per_mole
KJ_PER_MOL_NM = unit.kilojoule_per_mole / unit.nanometer

#: Boltzmann constant times Avogadro's number, kJ/(mol K): the one place kT is computed from.
MOLAR_GAS_CONSTANT_KJ = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)

#: Temperatures outside this range (K) are almost always a unit mistake (27 meant as Celsius, kT passed as
#: a temperature); they need ``allow_unusual_temperature=True``.
USUAL_TEMPERATURE_RANGE_K = (50.0, 2000.0)


_STATE_VECTORS = {"positions": (openmm.State.Positions, "getPositions", NM),
                  "velocities": (openmm.State.Velocities, "getVelocities", NM / unit.picosecond),
                  "forces": (openmm.State.Forces, "getForces", KJ_PER_MOL_NM)}


def state_array(state: openmm.State, which: str) -> np.ndarray:
    """A State's ``'positions'`` (nm), ``'velocities'`` (nm/ps) or ``'forces'`` (kJ/mol/nm) as a plain (n, 3) array.

    OpenMM's ``getForces(asNumpy=True).value_in_unit(...)`` wraps the array in units, copies it for the
    conversion and looks its cache up with ``dir()``: ~0.05 ms per call, as much as a 22-atom energy, and the
    move loop reads several per move. The State's own copy into an array is used where it exists (it is
    what ``asNumpy=True`` calls); otherwise the public path.
    """
    kind, getter, units = _STATE_VECTORS[which]
    copy_into = getattr(state, "_getVectorAsNumpy", None)
    if copy_into is not None:
        array = np.empty((state._getNumParticles(), 3))
        copy_into(kind, array)
        return array
    return np.asarray(getattr(state, getter)(asNumpy=True).value_in_unit(units))


def state_energy(state: openmm.State) -> float:
    """A State's potential energy in kJ/mol (OpenMM's own unit: no conversion when it is that)."""
    energy = state.getPotentialEnergy()
    return float(energy._value) if energy.unit is KJ_PER_MOL else energy.value_in_unit(KJ_PER_MOL)


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
    array = _length_array(positions, name)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ConfSampleError(f"{name} must have shape (n_atoms, 3), got {array.shape}.")
    _require_finite(array, name, "atoms")
    return array


def to_nm_batch(positions, n_atoms: int, name: str = "positions") -> np.ndarray:
    """Structures (M, n_atoms, 3) in nm from a Quantity or a plain array in nm; one (n_atoms, 3) structure gets M = 1."""
    batch = _length_array(positions, name)
    if batch.ndim == 2:
        batch = batch[None]
    if batch.ndim != 3 or batch.shape[1:] != (n_atoms, 3) or len(batch) == 0:
        raise ConfSampleError(f"{name} must have shape (M, {n_atoms}, 3) in nm with M >= 1, got {batch.shape}.")
    _require_finite(batch, name, "structures")
    return batch


def _length_array(positions, name: str) -> np.ndarray:
    if unit.is_quantity(positions):
        try:
            positions = positions.value_in_unit(unit.nanometer)
        except TypeError as exc:
            raise ConfSampleError(f"{name} must have length units (e.g. nanometer), got {positions.unit}.") from exc
    try:
        return np.array(positions, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfSampleError(f"{name} must be a numeric array of coordinates in nm.") from exc


def _require_finite(array: np.ndarray, name: str, what: str) -> None:
    if not np.all(np.isfinite(array)):
        bad = np.unique(np.nonzero(~np.isfinite(array))[0])[:5].tolist()
        raise ConfSampleError(f"{name} contain NaN or infinite coordinates ({what} {bad}).")


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


#: Bonded distances this many times the force field's (median over bonds) mean the positions are in angstrom.
POSITION_SCALE_LIMIT = 3.0


def check_position_scale(system: openmm.System, positions, name: str = "positions", max_bonds: int = 1000) -> None:
    """Refuse positions whose bonded distances are about 10x the force field's: angstrom numbers taken as nm.

    Plain numbers are read as nm everywhere (OpenMM does the same, also inside openmmtools sampler states), so
    angstrom coordinates gave energies of 4e6 kJ/mol with no word. The median ratio of the positions'
    distance to the reference length over (at most ``max_bonds`` of) the HarmonicBondForce bonds and the
    constraints is about 1 for nm and 10 for angstrom; above :data:`POSITION_SCALE_LIMIT` this raises. The
    median keeps a few bonds split across a periodic box from deciding. A System without bonds or
    constraints is not checked.

    positions : (n_atoms, 3) float nm, or a Quantity (a dimensionless one, as openmmtools makes of plain
    numbers, is read as nm).
    """
    if unit.is_quantity(positions) and positions.unit.is_dimensionless():
        positions = positions.value_in_unit(unit.dimensionless)
    positions = to_nm(positions, name)
    pairs, lengths = [], []
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            for index in range(min(force.getNumBonds(), max_bonds)):
                i, j, length, _ = force.getBondParameters(index)
                pairs.append((i, j))
                lengths.append(length.value_in_unit(unit.nanometer))
    for index in range(min(system.getNumConstraints(), max_bonds)):
        i, j, length = system.getConstraintParameters(index)
        pairs.append((i, j))
        lengths.append(length.value_in_unit(unit.nanometer))
    pairs, lengths = np.array(pairs, dtype=int).reshape(-1, 2), np.array(lengths, dtype=float)
    keep = (lengths > 0) & (pairs.max(axis=1, initial=-1) < len(positions))
    if not keep.any():
        return
    pairs, lengths = pairs[keep], lengths[keep]
    distances = np.linalg.norm(positions[pairs[:, 0]] - positions[pairs[:, 1]], axis=1)
    if np.median(distances / lengths) > POSITION_SCALE_LIMIT:
        raise ConfSampleError(
            f"{name} look like angstrom (median bond {np.median(distances):.3g} nm vs {np.median(lengths):.3g} nm "
            f"in the force field); pass nm or a Quantity."
        )
