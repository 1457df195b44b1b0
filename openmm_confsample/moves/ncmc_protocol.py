"""The nonequilibrium protocol of an NCMC move: what is softened, on which schedule, by which integrator.

A :class:`Perturbation` turns the user's System into the System the protocol runs on (a copy without
barostat and centre-of-mass remover, with the softened forces in force group :data:`WORK_GROUP`) and gives
the schedule of its global parameters as functions of openmmtools' protocol variable ``lambda`` (0 -> 1 over
the whole protocol):

* :class:`SoluteDecoupling` -- the solute's charges, then its steric interactions with its environment
  softened with openmmtools' ``AbsoluteAlchemicalFactory`` (``lambda_electrostatics``, ``lambda_sterics``);
* :class:`ParameterSoftening` -- global parameters the System already has (e.g. a coupling constant of a
  test system), each moved from its default value to a midpoint value;
* :class:`TorsionDrive` -- nothing softened: a restraint on the proposal's torsions, switched on, dragged from
  an anchor near the current torsions to the proposed ones, and switched off (no midpoint jump; the
  environment relaxes all the way).

Every schedule is a function of s = 1 - |2 lambda - 1|, which rises from 0 to 1 at the midpoint and falls back:
the protocol is time-symmetric by construction (the exactness argument in :mod:`.ncmc` needs this). With
several parameters, each moves in its own window of s in the order given (electrostatics off before sterics,
sterics back before electrostatics).

:class:`NCMCIntegrator` is openmmtools' ``AlchemicalNonequilibriumLangevinIntegrator`` (splitting
``O V R H R V O``, a palindrome, heat measured) whose perturbation step H reads the energy of the softened
forces only (``energy31``) instead of the whole System twice per step; on alanine dipeptide in water
(2,269 atoms, CPU) the full-System version cost 3-4 MD steps per protocol step.
"""

from __future__ import annotations

import copy

import numpy as np
import openmm
from openmm import unit
from openmmtools.integrators import AlchemicalNonequilibriumLangevinIntegrator

from ..checks import positive_float
from ..errors import ConfSampleError

__all__ = ["WORK_GROUP", "SPLITTING", "Perturbation", "SoluteDecoupling", "ParameterSoftening", "TorsionDrive",
           "NCMCIntegrator", "check_splitting", "perturbation_from_config"]

#: Force group of the forces the protocol changes (the H step reads only its energy).
WORK_GROUP = 31
#: Langevin splitting of a protocol step (openmmtools' letters; H moves the parameters).
SPLITTING = "V R O H O R V"


def _global_parameters(force) -> list[str]:
    if not hasattr(force, "getNumGlobalParameters"):
        return []
    return [force.getGlobalParameterName(i) for i in range(force.getNumGlobalParameters())]


def _fixed_volume_copy(system: openmm.System) -> openmm.System:
    """A copy of ``system`` without barostats and centre-of-mass motion removers.

    The protocol runs at the box of its start: a barostat step inside it would be an unaccounted move, and
    the COM remover an unaccounted change of kinetic energy. The user's own MD keeps both.
    """
    fixed = copy.deepcopy(system)
    for index in reversed(range(fixed.getNumForces())):
        force = fixed.getForce(index)
        if isinstance(force, openmm.CMMotionRemover) or "Barostat" in type(force).__name__:
            fixed.removeForce(index)
    return fixed


def _group_softened_forces(system: openmm.System, names) -> openmm.System:
    """Put every force that reads one of ``names`` in WORK_GROUP, and every other force out of it."""
    names = set(names)
    found = set()
    for force in system.getForces():
        reads = names.intersection(_global_parameters(force))
        found |= reads
        if reads:
            force.setForceGroup(WORK_GROUP)
        elif force.getForceGroup() == WORK_GROUP:
            force.setForceGroup(0)
    missing = sorted(names - found)
    if missing:
        available = sorted({p for f in system.getForces() for p in _global_parameters(f)})
        raise ConfSampleError(f"the System has no global parameter {missing} to soften (its global parameters: "
                              f"{available or 'none'}).")
    return system


class Perturbation:
    """What an NCMC protocol softens: a System builder and a symmetric schedule of global parameters.

    Subclasses set ``midpoints`` (parameter -> value at the midpoint, in the order the parameters move) and
    implement :meth:`build_system`.
    """

    midpoints: dict

    def build_system(self, system: openmm.System) -> openmm.System:
        """The System the protocol runs on (a copy; ``system`` is not changed)."""
        raise NotImplementedError

    def endpoint_values(self, system: openmm.System) -> dict:
        """Each parameter's value at the ends of the protocol: its default in ``system`` (the built one)."""
        values = {}
        for force in system.getForces():
            for i, name in enumerate(_global_parameters(force)):
                if name in self.midpoints:
                    values[name] = force.getGlobalParameterDefaultValue(i)
        return values

    def functions(self, system: openmm.System) -> dict:
        """Parameter -> Lepton expression of ``lambda`` for openmmtools' integrator (time-symmetric schedule)."""
        ends = self.endpoint_values(system)
        moving = [name for name, mid in self.midpoints.items() if mid != ends[name]]
        functions = {}
        for name in self.midpoints:
            if name not in moving:
                functions[name] = repr(float(ends[name]))
                continue
            k = moving.index(name)
            start, width = k / len(moving), 1.0 / len(moving)
            ramp = f"min(1, max(0, ((1 - abs(2*lambda - 1)) - {start!r}) / {width!r}))"
            functions[name] = f"{ends[name]!r} + ({float(self.midpoints[name]) - ends[name]!r})*{ramp}"
        return functions

    def get_config(self) -> dict:
        raise NotImplementedError


class ParameterSoftening(Perturbation):
    """Move global parameters the System already has to midpoint values and back.

    Parameters
    ----------
    midpoints : dict name -> float
        Value of each parameter at the protocol's midpoint; at its ends each has its default in the System.

    Examples
    --------
    >>> from openmm_confsample.testing import coupled_torsion_system
    >>> chain = coupled_torsion_system()
    >>> sorted(ParameterSoftening({"coupling_scale": 0.0}).functions(chain.system))
    ['coupling_scale']
    """

    def __init__(self, midpoints: dict):
        if not midpoints:
            raise ConfSampleError("ParameterSoftening needs at least one parameter to soften.")
        self.midpoints = {str(name): float(value) for name, value in dict(midpoints).items()}

    def build_system(self, system):
        return _group_softened_forces(_fixed_volume_copy(system), self.midpoints)

    def get_config(self):
        return {"kind": "ParameterSoftening", "midpoints": dict(self.midpoints)}


class SoluteDecoupling(Perturbation):
    """Soften the solute's interactions with its environment (openmmtools' alchemical factory).

    Parameters
    ----------
    solute_atoms : sequence of int
        The alchemical region (e.g. ``MolecularSystem.solute_atoms``).
    electrostatics_midpoint, sterics_midpoint : float in [0, 1], default 0 and 0.5
        ``lambda_electrostatics`` and ``lambda_sterics`` at the midpoint (1: not softened; 0: off, soft-core
        for sterics). Electrostatics are turned down before sterics and back up after them. Sterics fully off
        let water fill the solute's cavity, which costs work to push out again (``NCMCEngine.for_system``).

    Exact PME treatment (openmmtools' ``alchemical_pme_treatment='exact'``): ``lambda_electrostatics`` scales
    the solute's charges in the System's own NonbondedForce, so at lambda = 1 the copy's energy is the user's
    to 0.01 kJ/mol plus a constant at fixed box (the solute's dispersion correction, left out so that a change
    of ``lambda_sterics`` does not recompute it). Scaling charges also scales the solute's electrostatics with
    itself (annihilation); sterics are decoupled (the solute's Lennard-Jones with itself is kept). The direct-space
    treatment, which keeps the reciprocal part on, differed from the user's System by 281-291 kJ/mol across
    MD frames of alanine dipeptide in water: endpoint terms of several kT of noise in every move's work.
    """

    def __init__(self, solute_atoms, electrostatics_midpoint: float = 0.0, sterics_midpoint: float = 0.5):
        atoms = sorted({int(a) for a in solute_atoms})
        if not atoms or atoms[0] < 0:
            raise ConfSampleError(f"solute_atoms must be non-negative atom indices, got {list(solute_atoms)[:10]}.")
        for value, name in ((electrostatics_midpoint, "electrostatics_midpoint"), (sterics_midpoint, "sterics_midpoint")):
            if not 0.0 <= positive_float(value, name, allow_zero=True) <= 1.0:
                raise ConfSampleError(f"{name} must be in [0, 1], got {value}.")
        self.solute_atoms = atoms
        self.midpoints = {"lambda_electrostatics": float(electrostatics_midpoint),
                          "lambda_sterics": float(sterics_midpoint)}

    def build_system(self, system):
        from openmmtools import alchemy  # deferred: only solvated systems need the factory

        if max(self.solute_atoms) >= system.getNumParticles():
            raise ConfSampleError(f"solute atom {max(self.solute_atoms)} is outside the System's "
                                  f"{system.getNumParticles()} particles.")
        if len(self.solute_atoms) == system.getNumParticles():
            raise ConfSampleError("the solute is the whole System: there is no environment to soften (NCMC needs a "
                                  "solvated system; use the instantaneous move, ncmc_steps=0).")
        region = alchemy.AlchemicalRegion(alchemical_atoms=self.solute_atoms, annihilate_electrostatics=True,
                                          annihilate_sterics=False)
        factory = alchemy.AbsoluteAlchemicalFactory(alchemical_pme_treatment="exact",
                                                    disable_alchemical_dispersion_correction=True)
        built = factory.create_alchemical_system(_fixed_volume_copy(system), region)
        return _group_softened_forces(built, self.midpoints)

    def get_config(self):
        return {"kind": "SoluteDecoupling", "solute_atoms": list(self.solute_atoms),
                "electrostatics_midpoint": self.midpoints["lambda_electrostatics"],
                "sterics_midpoint": self.midpoints["lambda_sterics"]}


class TorsionDrive(Perturbation):
    """Drag torsions to proposed values with a moving restraint, the environment relaxing all along.

    The protocol System is the user's (at fixed box) plus, in force group :data:`WORK_GROUP`,

        U_drive = kappa(lambda) sum_i [1 - cos(theta_i - a_i - p(lambda) d_i)]

    on the driven torsions theta_i: kappa rises from 0 to ``kappa_kJ_per_mol`` over the first ``ramp_fraction``
    of the protocol while the centre stays at the anchor a, the centre moves along the shorter arc d = b - a
    (wrapped) to the target b while p goes from 0 to 1, and kappa falls back to 0 over the last
    ``ramp_fraction``. Both ends are the user's potential (kappa = 0). Read backwards, the schedule is the one
    that drags from b to a: ``kappa(1 - lambda) = kappa(lambda)`` and ``a + p(1 - lambda) d = b - p(lambda) d``,
    which is what makes the move exact (:mod:`.ncmc`).

    The engine draws the target b from the proposal's torsion density q and the anchor a from a von Mises
    distribution of concentration ``anchor_concentration`` about the current torsions; the reverse move would
    draw a from q and b about the end state's torsions, so the Hastings term is
    log VM(b; theta_T) + log q(a) - log VM(a; theta_0) - log q(b).

    Parameters
    ----------
    torsions : (k, 4) int
        The driven torsions (a proposal's ``torsion_set.torsions``).
    kappa_kJ_per_mol : float, default 400
        Restraint strength at full strength (400 kJ/mol: about 0.08 rad thermal width at 300 K, stiff
        enough to drag phi of alanine dipeptide over its barriers).
    ramp_fraction : float in (0, 0.5), default 0.1
        Fraction of the protocol spent switching the restraint on (and the same switching it off).
    anchor_concentration : float, default 10
        Concentration (1/rad^2) of the anchor's and the reverse target's von Mises draws about the current
        torsions (10: about 0.3 rad wide, the width of a torsion basin).
    softening : SoluteDecoupling or ParameterSoftening, optional
        Also soften on its own (time-symmetric) schedule while the torsions are dragged, e.g. the solute's
        charges halfway down at the midpoint; the union of two time-symmetric schedules is time-symmetric.
    """

    def __init__(self, torsions, kappa_kJ_per_mol: float = 400.0, ramp_fraction: float = 0.1,
                 anchor_concentration: float = 10.0, softening: Perturbation | None = None):
        torsions = np.asarray(torsions, dtype=np.int64)
        if torsions.ndim != 2 or torsions.shape[1] != 4 or len(torsions) == 0 or torsions.min() < 0:
            raise ConfSampleError(f"torsions must be a non-empty (k, 4) array of atom indices, got shape "
                                  f"{torsions.shape}.")
        self.torsions = torsions
        self.kappa_kJ_per_mol = positive_float(kappa_kJ_per_mol, "kappa_kJ_per_mol")
        self.ramp_fraction = positive_float(ramp_fraction, "ramp_fraction")
        if not 0.0 < self.ramp_fraction < 0.5:
            raise ConfSampleError(f"ramp_fraction must be in (0, 0.5) (on, drag, off), got {ramp_fraction}.")
        self.anchor_concentration = positive_float(anchor_concentration, "anchor_concentration")
        if softening is not None and not isinstance(softening, (SoluteDecoupling, ParameterSoftening)):
            raise ConfSampleError(f"softening must be a SoluteDecoupling or ParameterSoftening, got "
                                  f"{type(softening).__name__}.")
        self.softening = softening
        self.midpoints = {"drive_kappa": self.kappa_kJ_per_mol, "drive_progress": 1.0,
                          **(softening.midpoints if softening is not None else {})}

    def build_system(self, system):
        if self.torsions.max() >= system.getNumParticles():
            raise ConfSampleError(f"driven torsion atom {int(self.torsions.max())} is outside the System's "
                                  f"{system.getNumParticles()} particles.")
        built = _fixed_volume_copy(system) if self.softening is None else self.softening.build_system(system)
        force = openmm.CustomTorsionForce("drive_kappa*(1 - cos(theta - drive_a - drive_progress*drive_d))")
        force.addGlobalParameter("drive_kappa", 0.0)
        force.addGlobalParameter("drive_progress", 0.0)
        force.addPerTorsionParameter("drive_a")
        force.addPerTorsionParameter("drive_d")
        for i, j, k, l in self.torsions.tolist():
            force.addTorsion(i, j, k, l, [0.0, 0.0])
        force.setName("TorsionDrive")
        built.addForce(force)
        return _group_softened_forces(built, self.midpoints)

    def endpoint_values(self, system):
        softened = self.softening.endpoint_values(system) if self.softening is not None else {}
        return {"drive_kappa": 0.0, "drive_progress": 0.0, **softened}

    def functions(self, system):
        f = self.ramp_fraction
        softened = self.softening.functions(system) if self.softening is not None else {}
        return {"drive_kappa": f"{self.kappa_kJ_per_mol!r}*min(1, min(lambda, 1 - lambda)/{f!r})",
                "drive_progress": f"min(1, max(0, (lambda - {f!r})/{1.0 - 2.0 * f!r}))", **softened}

    @staticmethod
    def drive_force(system: openmm.System) -> openmm.CustomTorsionForce:
        """The restraint that :meth:`build_system` added to ``system``."""
        for force in system.getForces():
            if isinstance(force, openmm.CustomTorsionForce) and force.getName() == "TorsionDrive":
                return force
        raise ConfSampleError("the System has no TorsionDrive restraint (build it with TorsionDrive.build_system).")

    @staticmethod
    def set_path(force: openmm.CustomTorsionForce, context: openmm.Context, anchor, displacement) -> None:
        """Drag the torsions of ``force`` from ``anchor`` by ``displacement`` (radians) in the next protocol."""
        path = zip(np.asarray(anchor, float).tolist(), np.asarray(displacement, float).tolist())
        for index, (a, d) in enumerate(path):
            i, j, k, l, _ = force.getTorsionParameters(index)
            force.setTorsionParameters(index, i, j, k, l, [a, d])
        force.updateParametersInContext(context)

    def get_config(self):
        return {"kind": "TorsionDrive", "torsions": self.torsions.tolist(), "kappa_kJ_per_mol": self.kappa_kJ_per_mol,
                "ramp_fraction": self.ramp_fraction, "anchor_concentration": self.anchor_concentration,
                "softening": None if self.softening is None else self.softening.get_config()}


#: Stored perturbations are rebuilt from this table only (a storage file's string never picks code).
_PERTURBATIONS = {"SoluteDecoupling": SoluteDecoupling, "ParameterSoftening": ParameterSoftening,
                  "TorsionDrive": TorsionDrive}


def perturbation_from_config(config: dict) -> Perturbation:
    """Rebuild a perturbation from :meth:`Perturbation.get_config`."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _PERTURBATIONS:
        raise ConfSampleError(f"stored perturbation kind {kind!r} is not one of {sorted(_PERTURBATIONS)}.")
    if kind == "TorsionDrive" and config.get("softening") is not None:
        config["softening"] = perturbation_from_config(config["softening"])
    return _PERTURBATIONS[kind](**config)


def check_splitting(splitting: str) -> str:
    """``splitting`` if it is a palindrome of openmmtools' letters with one H in its middle, else ConfSampleError."""
    steps = str(splitting).upper().split()
    if steps != steps[::-1] or steps.count("H") != 1 or not set(steps) <= {"O", "V", "R", "H"}:
        raise ConfSampleError(f"splitting '{splitting}' must be a palindrome of O, V, R with one H in its middle "
                              "(time-symmetric steps), e.g. 'V R O H O R V'.")
    return str(splitting)


class NCMCIntegrator(AlchemicalNonequilibriumLangevinIntegrator):
    """openmmtools' nonequilibrium Langevin integrator with heat measured, whose H step moves the softened
    parameters and, only when ``measure_protocol_work``, reads the energy of force group :data:`WORK_GROUP`
    (the forces the protocol changes) before and after, instead of the whole System's.

    The move's work is Delta E - Q (total energy change minus heat), which needs no energy inside the step;
    the protocol work is a diagnostic (and the negative control that leaves out the shadow work).

    Parameters
    ----------
    functions : dict parameter -> expression of ``lambda``
    n_steps : int
        Steps of the whole protocol; ``lambda`` rises by 1/n_steps in each step's H.
    temperature_K, collision_rate_per_ps, timestep_fs : float
    seed : int
        OpenMM random seed (non-zero).
    splitting : str
        A palindrome with one H in its middle (time-symmetric steps).
    measure_protocol_work : bool
    """

    def __init__(self, functions: dict, n_steps: int, temperature_K: float, collision_rate_per_ps: float,
                 timestep_fs: float, seed: int, splitting: str = SPLITTING, measure_protocol_work: bool = False):
        check_splitting(splitting)
        self._measure_protocol_work = bool(measure_protocol_work)
        super().__init__(alchemical_functions=dict(functions), splitting=splitting, nsteps_neq=int(n_steps),
                         temperature=temperature_K * unit.kelvin, collision_rate=collision_rate_per_ps / unit.picosecond,
                         timestep=timestep_fs * unit.femtosecond, measure_heat=True, measure_shadow_work=False)
        self.setRandomNumberSeed(int(seed))

    def _add_alchemical_perturbation_step(self):
        # openmmtools' step, with "energy" -> the softened group's energy (the other forces do not depend on
        # lambda), read only when asked: each read costs a pass over the softened forces' neighbour list.
        if self._measure_protocol_work:
            self.addComputeGlobal("Eold", f"energy{WORK_GROUP}")
        self.addComputeGlobal("lambda", "(lambda_step+1)/n_lambda_steps")
        self.addComputeGlobal("lambda_step", "lambda_step + 1")
        self._add_update_alchemical_parameters_step()
        if self._measure_protocol_work:
            self.addComputeGlobal("Enew", f"energy{WORK_GROUP}")
            self.addComputeGlobal("protocol_work", "protocol_work + (Enew-Eold)")
