"""The one runner: Langevin set-up and the engine-stepping loop every sampler in the package uses.

Two things used to be written once per module (MD data, learned bias, workflows, benchmarks, the exactness
harness, validation): the Langevin set-up (integrator, platform, minimisation, velocities, seed mapping)
and "step the MH engine n times, then correct the half-step velocities". Both live here.

Seeds: OpenMM reads a random-number seed of 0 as "pick one at random", so a user's seed 0 would not be
reproducible. :func:`openmm_seed` maps every integer (0 included) to a distinct non-zero OpenMM seed.

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

from .checks import positive_float, positive_int
from .errors import ConfSampleError
from .units import state_array, state_energy, to_kelvin

#: Integrators whose Context velocities lag the positions by half a step.
HALF_STEP_INTEGRATORS = (openmm.LangevinMiddleIntegrator, openmm.LangevinIntegrator, openmm.VerletIntegrator)
_MAX_OPENMM_SEED = 2**31 - 2


def openmm_seed(seed, offset: int = 0) -> int:
    """A non-zero OpenMM random seed for the user's ``seed`` (any int, 0 included; ``offset`` picks a stream).

    None gives a fresh random seed (OpenMM's own 0 would do the same, but the value could not be recorded).
    """
    if seed is None:
        seed = int(np.random.default_rng().integers(0, _MAX_OPENMM_SEED))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfSampleError(f"seed must be an integer or None, got {seed!r}.")
    return (int(seed) + int(offset)) % _MAX_OPENMM_SEED + 1


def langevin_integrator(temperature_K, friction_per_ps: float = 1.0, timestep_fs: float = 2.0,
                        seed=0) -> openmm.LangevinMiddleIntegrator:
    """A seeded LangevinMiddleIntegrator (temperature in K or a Quantity; friction 1/ps; step fs)."""
    temperature_K = to_kelvin(temperature_K)
    timestep_fs = positive_float(timestep_fs, "timestep_fs")
    friction_per_ps = positive_float(friction_per_ps, "friction_per_ps", allow_zero=True)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    return integrator


def langevin_context(molecular_system, temperature_K=None, friction_per_ps: float = 1.0, timestep_fs: float = 2.0,
                     seed=0, platform: str | None = "Reference", positions_nm=None, minimize: bool = True,
                     equilibration_steps: int = 0, integrator: openmm.Integrator | None = None) -> openmm.Context:
    """A Context of ``molecular_system`` driven by a seeded Langevin integrator, ready to run.

    Minimised (``minimize``, 500 iterations at 10 kJ/mol/nm), given Maxwell-Boltzmann velocities from the
    same seed stream and equilibrated for ``equilibration_steps``. ``context.getIntegrator()`` is the
    integrator; pass ``integrator`` to use another one with the same set-up.
    """
    temperature_K = molecular_system.temperature_K if temperature_K is None else to_kelvin(temperature_K)
    if integrator is None:
        integrator = langevin_integrator(temperature_K, friction_per_ps, timestep_fs, seed)
    context = molecular_system.create_context(platform, integrator, positions_nm)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, openmm_seed(seed, offset=1))
    if equilibration_steps and int(equilibration_steps) > 0:
        integrator.step(int(equilibration_steps))
    return context


def as_engine(move, n_proposals: int | None = None, seed=None):
    """The MetropolisHastingsEngine behind ``move``: a Proposal, an engine, or anything with an ``engine``.

    A Proposal gets a fresh engine with ``n_proposals`` candidates per step (default 1) and random stream
    ``seed`` (int, Generator or None). An engine, or a ``LearnedMCMCMove``'s engine, is returned as it is,
    with its own ``n_proposals`` and random stream (``n_proposals`` and ``seed`` are then unused) and its
    statistics NOT reset: a caller that wants a fresh count calls ``engine.reset_statistics()`` itself.
    """
    # Deferred: moves imports this module (run_engine_steps), so importing moves here at load would be a cycle.
    from .moves.engine import MetropolisHastingsEngine, Proposal

    if isinstance(move, MetropolisHastingsEngine):
        return move
    if isinstance(move, Proposal):
        return MetropolisHastingsEngine(move, 1 if n_proposals is None else n_proposals, seed)
    engine = getattr(move, "engine", None)
    if isinstance(engine, MetropolisHastingsEngine):
        return engine
    raise ConfSampleError(
        f"move must be a proposal (Proposal), a MetropolisHastingsEngine or a LearnedMCMCMove, got "
        f"{type(move).__name__}."
    )


def inverse_masses(system: openmm.System) -> np.ndarray:
    """(n_atoms, 1) 1/m in 1/amu (0 for massless, fixed particles)."""
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    return np.where(masses > 0, 1.0 / np.where(masses > 0, masses, 1.0), 0.0)[:, None]


def _cached_inverse_masses(engine, context: openmm.Context) -> np.ndarray:
    """1/m for ``context``, cached on the engine in one slot (no growth: a dict keyed by id(system) kept
    one System wrapper alive per accepted move, 27k entries after 27k acceptances)."""
    cached = getattr(engine, "_inverse_masses_cache", None)
    if cached is None or cached[0] is not context:
        cached = (context, inverse_masses(context.getSystem()))
        try:
            engine._inverse_masses_cache = cached
        except AttributeError:  # an engine-like object that takes no attributes: no cache
            pass
    return cached[1]


def run_engine_steps(context: openmm.Context, engine, kT: float, n_attempts: int = 1) -> int:
    """``n_attempts`` engine steps on a Context driven by an integrator; returns the number of accepted moves.

    Applies the half-step velocity correction (module docstring) when the integrator needs it, also when a
    step raises: the moves accepted before the exception are corrected, then the exception propagates.
    An engine with ``sets_velocities = True`` (NCMC: it leaves fresh on-step velocities in the Context) is
    not corrected.
    """
    n_attempts = positive_int(n_attempts, "n_attempts")
    integrator = context.getIntegrator()
    correct = isinstance(integrator, HALF_STEP_INTEGRATORS) and not getattr(engine, "sets_velocities", False)
    positions = energy = None
    if correct:
        state = context.getState(getPositions=True, getEnergy=True, getForces=True, getVelocities=True)
        positions, energy = state_array(state, "positions"), state_energy(state)
        forces_before, velocities = state_array(state, "forces"), state_array(state, "velocities")
    accepted = 0
    forces_after = None  # of the last accepted state, where the engine read them with its energy
    completed = False
    try:
        for _ in range(n_attempts):
            result = engine.step(context, kT, positions, energy)
            positions, energy = result.positions_nm, result.potential_kJ
            accepted += result.n_accepted
            if result.n_accepted:
                forces_after = getattr(result, "forces", None)
        completed = True
    finally:
        if not completed:  # the step that raised still accepted some moves before it did
            partial = getattr(engine, "last_result", None)
            accepted += partial.n_accepted if partial is not None else 0
            forces_after = None
        if correct and accepted:
            if forces_after is None:
                forces_after = state_array(context.getState(getForces=True), "forces")
            half_dt_ps = 0.5 * integrator.getStepSize().value_in_unit(unit.picosecond)
            context.setVelocities(velocities + half_dt_ps * (forces_before - forces_after)
                                  * _cached_inverse_masses(engine, context))
            if context.getSystem().getNumConstraints():
                context.applyVelocityConstraints(1e-6)
    return accepted
