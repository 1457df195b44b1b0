"""Learned moves in a plain ``openmm.app.Simulation`` script, and in a user's own loop.

One added line applies a move every ``interval`` steps on the Simulation's own Context::

    simulation.reporters.append(LearnedMoveReporter(move, interval=500))

DCDReporter, StateDataReporter and checkpoints keep working: the move changes the Context's positions only
when a candidate is accepted (box and parameters are left alone). Reporters due at the same step as the
move see the state before it.

Velocities: after an accepted move the half-step velocities of leapfrog integrators are corrected
(:mod:`openmm_confsample.runner` has the derivation and the heating measured without it).
"""

from __future__ import annotations

import openmm
from openmm import unit

from ..checks import positive_int
from ..errors import ConfSampleError
from ..units import kT_kJ_per_mol, to_kelvin
from ..runner import HALF_STEP_INTEGRATORS, as_engine, run_engine_steps  # noqa: F401  (public here too)


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
    n_attempts = positive_int(n_attempts, "n_attempts")
    return run_engine_steps(context, as_engine(move), _kT_for(context, temperature), n_attempts)


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
        self.engine = as_engine(move)
        self.interval = positive_int(interval, "interval")
        self.n_attempts = positive_int(n_attempts, "n_attempts")
        # Checked here, not at the first report deep inside simulation.step().
        self.temperature = None if temperature is None else to_kelvin(temperature)
        self.n_accepted = 0

    @property
    def statistics(self) -> dict:
        return self.engine.statistics

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state):
        self.n_accepted += apply_learned_move(simulation.context, self.engine, self.temperature, self.n_attempts)
