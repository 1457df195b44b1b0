"""Learned moves in a plain ``openmm.app.Simulation`` script, and in a user's own loop.

One added line applies a move every ``interval`` steps on the Simulation's own Context::

    simulation.reporters.append(LearnedMoveReporter(move, interval=500))

DCDReporter, StateDataReporter and checkpoints keep working: the move changes the Context's positions only
when a candidate is accepted (box and parameters are left alone). Reporters due at the same step as the
move see the state before it.

Velocities: OpenMM's leapfrog integrators (LangevinMiddleIntegrator, LangevinIntegrator, VerletIntegrator)
hold velocities half a step behind the positions, v(t - dt/2), and the velocity at time t is
v(t - dt/2) + (dt/2) F(x)/m. Keeping v(t - dt/2) across a jump x -> x' would change the on-step velocity by
(dt/2)(F(x') - F(x))/m and heat the system (measured: 373 K instead of 300 K with moves every 10 steps).
After an accepted move the half-step velocities are therefore shifted by (dt/2)(F(x) - F(x'))/m, which
keeps the on-step velocity, independent of x under the Boltzmann distribution, unchanged.
"""

from __future__ import annotations

import numpy as np
import openmm
from openmm import unit

from ..errors import ConfSampleError
from ..systems import kT_kJ_per_mol, to_kelvin
from .engine import MetropolisHastingsEngine, Proposal

#: Integrators whose Context velocities lag the positions by half a step.
HALF_STEP_INTEGRATORS = (openmm.LangevinMiddleIntegrator, openmm.LangevinIntegrator, openmm.VerletIntegrator)
_FORCE = unit.kilojoule_per_mole / unit.nanometer
_inverse_masses: dict = {}


def _inverse_mass(system: openmm.System) -> np.ndarray:
    """(n_atoms, 1) 1/m in 1/amu (0 for massless, fixed particles), cached per System object."""
    key = id(system)
    if key not in _inverse_masses:
        masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
        _inverse_masses[key] = (system, np.where(masses > 0, 1.0 / np.where(masses > 0, masses, 1.0), 0.0)[:, None])
    return _inverse_masses[key][1]


def run_engine_steps(context: openmm.Context, engine: MetropolisHastingsEngine, kT: float, n_attempts: int = 1) -> int:
    """``n_attempts`` engine steps on a Context driven by an integrator; returns the number of accepted moves.

    Applies the half-step velocity correction (module docstring) when the integrator needs it.
    """
    integrator = context.getIntegrator()
    correct = isinstance(integrator, HALF_STEP_INTEGRATORS)
    positions = energy = None
    if correct:
        state = context.getState(getPositions=True, getEnergy=True, getForces=True, getVelocities=True)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        forces_before = state.getForces(asNumpy=True).value_in_unit(_FORCE)
        velocities = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    accepted = 0
    for _ in range(int(n_attempts)):
        result = engine.step(context, kT, positions, energy)
        positions, energy = result.positions_nm, result.potential_kJ
        accepted += result.n_accepted
    if correct and accepted:
        forces_after = context.getState(getForces=True).getForces(asNumpy=True).value_in_unit(_FORCE)
        half_dt_ps = 0.5 * integrator.getStepSize().value_in_unit(unit.picosecond)
        system = context.getSystem()
        context.setVelocities(velocities + half_dt_ps * (forces_before - forces_after) * _inverse_mass(system))
        if system.getNumConstraints():
            context.applyVelocityConstraints(1e-6)
    return accepted


def _as_engine(move) -> MetropolisHastingsEngine:
    """Accept a Proposal, an engine, or a LearnedMCMCMove (anything with an ``engine``)."""
    if isinstance(move, MetropolisHastingsEngine):
        return move
    if isinstance(move, Proposal):
        return MetropolisHastingsEngine(move)
    engine = getattr(move, "engine", None)
    if isinstance(engine, MetropolisHastingsEngine):
        return engine
    raise ConfSampleError(f"move must be a LearnedMCMCMove, MetropolisHastingsEngine or Proposal, got {type(move).__name__}.")


def _kT_for(context: openmm.Context, temperature) -> float:
    if temperature is not None:
        return kT_kJ_per_mol(to_kelvin(temperature))
    integrator = context.getIntegrator()
    if not hasattr(integrator, "getTemperature"):
        raise ConfSampleError(
            f"cannot tell the temperature from a {type(integrator).__name__}; pass temperature= to the move."
        )
    return kT_kJ_per_mol(integrator.getTemperature().value_in_unit(unit.kelvin))


def apply_learned_move(context: openmm.Context, move, temperature=None, n_attempts: int = 1) -> int:
    """Apply ``n_attempts`` MH steps of ``move`` to ``context``; returns how many were accepted.

    For users who run their own loop::

        for _ in range(1000):
            integrator.step(500)
            apply_learned_move(context, move)

    Parameters
    ----------
    context : openmm.Context
    move : LearnedMCMCMove, MetropolisHastingsEngine or Proposal
    temperature : Quantity or float K, optional
        Target temperature; by default the integrator's (``getTemperature()``).
    """
    return run_engine_steps(context, _as_engine(move), _kT_for(context, temperature), n_attempts)


class LearnedMoveReporter:
    """Apply a learned move every ``interval`` MD steps of an ``openmm.app.Simulation``.

    Parameters
    ----------
    move : LearnedMCMCMove, MetropolisHastingsEngine or Proposal
    interval : int
        MD steps between moves.
    n_attempts : int, default 1
        MH steps per application.
    temperature : Quantity or float K, optional
        Target temperature; by default the integrator's.

    Examples
    --------
    >>> simulation.reporters.append(LearnedMoveReporter(move, interval=500))  # doctest: +SKIP
    """

    def __init__(self, move, interval: int, n_attempts: int = 1, temperature=None):
        if int(interval) < 1:
            raise ConfSampleError(f"interval must be a positive number of steps, got {interval}.")
        self.engine = _as_engine(move)
        self.interval = int(interval)
        self.n_attempts = int(n_attempts)
        self.temperature = temperature
        self.n_accepted = 0

    @property
    def statistics(self) -> dict:
        return self.engine.statistics

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state):
        self.n_accepted += apply_learned_move(simulation.context, self.engine, self.temperature, self.n_attempts)
