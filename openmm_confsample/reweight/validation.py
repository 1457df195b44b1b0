"""Do generated structures survive MD? Short OpenMM runs from each structure, with energy and RMSD traces.

:func:`validate_structures` minimizes each structure locally, then runs Langevin MD
(``LangevinMiddleIntegrator``) and records the potential energy and the heavy-atom RMSD of the solute
(after superposition, ``mdtraj.rmsd``) to the structure as given. A structure that blows up (NaN energy,
an energy more than ``BLOWUP_KJ_PER_ATOM`` per atom above its first production value, or an OpenMM
error) is marked failed, its traces are NaN from then on, and the run goes on with the next one.

Two solvent protocols:

``'implicit'``
    The system's own ``System`` (for ``alanine-dipeptide-implicit``: amber99sbildn + OBC), no constraints
    beyond the system's, 1 fs steps by default. The energy is that of the solute in implicit solvent.
``'explicit'``
    Each structure is solvated anew (``Modeller.addSolvent``, TIP3P, 1.0 nm padding) and parametrized with
    ``amber99sbildn.xml`` + ``tip3p.xml``: PME (0.9 nm cutoff), HBond constraints, rigid water, 2 fs steps.
    Minimization and a short NPT equilibration (``MonteCarloBarostat``, 1 bar) run with the solute heavy atoms
    restrained to the given structure; the restraints are switched off for production, which stays NPT. The energy
    traces are of the whole solvated system (the water count differs between structures, so compare each
    trace with itself); the RMSD is of the solute heavy atoms.

:func:`plot_validation` draws the traces.

Units: positions in nm, time in ps, energies in kJ/mol.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ..checks import positive_float
from ..errors import ConfSampleError
from ..progress import progress_bar
from ..runner import langevin_integrator
from ..systems import MolecularSystem, get_platform
from ..units import to_kelvin, to_nm_batch

__all__ = ["ValidationResult", "plot_validation", "validate_structures"]

_SOLVENTS = ("implicit", "explicit")
#: Force constant of the solute heavy-atom restraints during explicit-solvent minimization and
#: equilibration, kJ/mol/nm^2.
RESTRAINT_K = 1000.0
_RESTRAINT_PARAMETER = "confsample_restraint_k"
#: A production run has blown up when its potential energy exceeds the first production value by more
#: than this many kJ/mol per simulated atom (thermal fluctuations are a few kJ/mol per atom) ...
BLOWUP_KJ_PER_ATOM = 100.0
#: ... or when a solute coordinate leaves this range (nm); mdtraj would overflow its float32 cast anyway.
_MAX_COORDINATE_NM = 1.0e4
#: The solvated box must exceed twice the cutoff by this much (nm), room for the barostat to shrink it.
_BOX_MARGIN_NM = 0.1


@dataclass
class ValidationResult:
    """Energy and RMSD traces of short MD runs, one row per structure.

    Attributes
    ----------
    time_ps : (T,) float, ps; 0 is the start of production (after minimization and, in explicit solvent,
        equilibration)
    energies : (M, T) float, kJ/mol; potential energy of the simulated system (solute in implicit solvent,
        or the whole solvated box). NaN after a blow-up.
    rmsd_nm : (M, T) float, nm; heavy-atom RMSD of the solute to the given structure after superposition.
        NaN after a blow-up.
    failed : (M,) bool; the run blew up (NaN or runaway energy, or an OpenMM error)
    messages : list of M str; why a run failed ('' when it did not)
    solvent : 'implicit' or 'explicit'
    rmsd_threshold_nm : float; a structure is stable when its RMSD stays below this throughout
    summary : dict; see :func:`validate_structures`
    """

    time_ps: np.ndarray
    energies: np.ndarray
    rmsd_nm: np.ndarray
    failed: np.ndarray
    messages: list
    solvent: str
    rmsd_threshold_nm: float
    summary: dict = field(default_factory=dict)

    @property
    def stable(self) -> np.ndarray:
        """(M,) bool: the run did not fail and the RMSD stayed below ``rmsd_threshold_nm`` throughout."""
        with np.errstate(invalid="ignore"):
            below = np.all(self.rmsd_nm < self.rmsd_threshold_nm, axis=1)
        return below & ~self.failed


class _BlowUp(Exception):
    """A run produced a non-finite energy."""


def _solvated_simulation(molecular_system: MolecularSystem, positions_nm: np.ndarray, heavy: np.ndarray,
                         forcefield, padding_nm: float, cutoff_nm: float, temperature_K: float,
                         friction_per_ps: float, timestep_ps: float, pressure_bar: float, platform, seed: int):
    """A Context of the solvated structure, with switchable heavy-atom restraints and a barostat."""
    modeller = app.Modeller(molecular_system.topology, positions_nm * unit.nanometer)
    modeller.addSolvent(forcefield, model="tip3p", padding=padding_nm * unit.nanometer)
    width_nm = min(modeller.topology.getUnitCellDimensions().value_in_unit(unit.nanometer))
    if width_nm < 2.0 * cutoff_nm + _BOX_MARGIN_NM:
        raise ConfSampleError(
            f"padding_nm={padding_nm} gives a {width_nm:.2f} nm box, too small for cutoff_nm={cutoff_nm} under a "
            f"barostat (need at least 2*cutoff + {_BOX_MARGIN_NM} nm); increase padding_nm or decrease cutoff_nm."
        )
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                     nonbondedCutoff=cutoff_nm * unit.nanometer, constraints=app.HBonds,
                                     rigidWater=True)
    restraint = openmm.CustomExternalForce(f"{_RESTRAINT_PARAMETER}*periodicdistance(x, y, z, x0, y0, z0)^2")
    restraint.addGlobalParameter(_RESTRAINT_PARAMETER, RESTRAINT_K)
    for name in ("x0", "y0", "z0"):
        restraint.addPerParticleParameter(name)
    for index in heavy.tolist():
        restraint.addParticle(index, positions_nm[index].tolist())
    system.addForce(restraint)
    barostat = openmm.MonteCarloBarostat(pressure_bar * unit.bar, temperature_K * unit.kelvin, 25)
    barostat.setRandomNumberSeed(seed)
    system.addForce(barostat)
    integrator = langevin_integrator(temperature_K, friction_per_ps, timestep_ps * 1e3, seed)
    context = openmm.Context(system, integrator, platform) if platform else openmm.Context(system, integrator)
    context.setPeriodicBoxVectors(*modeller.topology.getPeriodicBoxVectors())
    context.setPositions(modeller.positions)
    return context, integrator, system.getNumParticles()


def _implicit_simulation(molecular_system: MolecularSystem, positions_nm: np.ndarray, temperature_K: float,
                         friction_per_ps: float, timestep_ps: float, platform, seed: int):
    integrator = langevin_integrator(temperature_K, friction_per_ps, timestep_ps * 1e3, seed)
    system = molecular_system.system
    context = openmm.Context(system, integrator, platform) if platform else openmm.Context(system, integrator)
    context.setPositions(positions_nm)
    return context, integrator, system.getNumParticles()


def _energy_and_solute(context, n_solute: int, ceiling_kJ: float = np.inf):
    """Potential energy (kJ/mol) and solute positions (nm); _BlowUp when either is non-finite or absurd."""
    state = context.getState(getEnergy=True, getPositions=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)[:n_solute]
    if not np.isfinite(energy) or not np.all(np.isfinite(positions)):
        raise _BlowUp("the potential energy or the positions became NaN/inf")
    if energy > ceiling_kJ:
        raise _BlowUp(f"the potential energy rose to {energy:.4g} kJ/mol, above the blow-up ceiling {ceiling_kJ:.4g}")
    if np.abs(positions).max() > _MAX_COORDINATE_NM:
        raise _BlowUp(f"solute atoms flew beyond {_MAX_COORDINATE_NM:g} nm")
    return energy, positions


def validate_structures(molecular_system: MolecularSystem, positions, length_ps: float = 10.0,
                        timestep_fs: float | None = None, temperature_K=None, report_interval_ps: float = 0.1,
                        solvent: str = "implicit", seed: int = 0, platform: str | None = None,
                        progress: bool = True, friction_per_ps: float = 1.0, equilibration_ps: float = 10.0,
                        padding_nm: float = 1.0, cutoff_nm: float = 0.9, pressure_bar: float = 1.0,
                        forcefield_files=("amber99sbildn.xml", "tip3p.xml"),
                        minimize_tolerance: float = 10.0, minimize_max_iterations: int = 1000,
                        rmsd_threshold_nm: float = 0.2) -> ValidationResult:
    """Run short MD from each structure and record potential-energy and heavy-atom RMSD traces.

    Parameters
    ----------
    molecular_system : MolecularSystem
    positions : (M, n_atoms, 3) or (n_atoms, 3) float, nm (or a Quantity)
        The structures to test, e.g. ``ReweightResult.resampled_positions_nm``.
    length_ps : float, ps
        Production length per structure.
    timestep_fs : float, fs
        Default 1 fs (implicit) or 2 fs (explicit, with HBond constraints).
    temperature_K : float or Quantity, optional
        Default: the system's temperature.
    report_interval_ps : float, ps
        Time between recorded energies/RMSDs (rounded to whole steps).
    solvent : 'implicit' or 'explicit'
        See the module docstring.
    seed : int
        Seeds the Langevin (and barostat) random numbers of every run; structure m gets its own seed.
    platform : str, optional
        OpenMM platform; default 'Reference' for implicit and 'CPU' for explicit solvent.
    progress : bool
        Show a progress bar (integration steps, equilibration included).
    friction_per_ps : float, 1/ps
    equilibration_ps : float, ps
        Explicit solvent only: restrained NPT equilibration before production.
    padding_nm, cutoff_nm, pressure_bar, forcefield_files
        Explicit solvent only: ``Modeller.addSolvent`` padding (OpenMM >= 8 makes a cube of edge
        2 * solute radius + padding, at least 2 * padding: 2.0 nm for alanine dipeptide), PME real-space
        cutoff (0.9 nm, so that the 2.0 nm box stays above twice the cutoff when the barostat shrinks it),
        barostat pressure, force-field XML files.
    minimize_tolerance : float, kJ/mol/nm
        Local energy minimization stops when the RMS force is below this.
    minimize_max_iterations : int
        Cap on minimizer iterations (0: until converged).
    rmsd_threshold_nm : float, nm
        A structure counts as stable when its RMSD stays below this throughout production.

    Returns
    -------
    ValidationResult
        With ``summary``: ``mean_final_rmsd_nm`` (over runs that did not fail), ``fraction_stable`` (of all M;
        failed runs count as unstable), ``n_failed`` and ``failed_indices`` with ``failure_messages``, the
        protocol, ``n_atoms_simulated`` and ``seconds_per_structure``.

    Examples
    --------
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> result = validate_structures(ala, ala.positions_nm, length_ps=0.2, progress=False)
    >>> result.energies.shape, bool(result.failed[0])
    ((1, 3), False)
    """
    start = time.perf_counter()
    if solvent not in _SOLVENTS:
        raise ConfSampleError(f"solvent must be 'implicit' or 'explicit', got {solvent!r}.")
    n_solute = molecular_system.n_atoms
    structures = to_nm_batch(positions, n_solute)
    length_ps = positive_float(length_ps, "length_ps")
    report_interval_ps = positive_float(report_interval_ps, "report_interval_ps")
    timestep_fs = positive_float(timestep_fs if timestep_fs is not None else (2.0 if solvent == "explicit" else 1.0),
                            "timestep_fs")
    friction_per_ps = positive_float(friction_per_ps, "friction_per_ps")
    rmsd_threshold_nm = positive_float(rmsd_threshold_nm, "rmsd_threshold_nm")
    if temperature_K is None:
        temperature_K = molecular_system.temperature_K
    temperature_K = to_kelvin(temperature_K, "temperature_K")
    if report_interval_ps > length_ps:
        raise ConfSampleError(f"report_interval_ps ({report_interval_ps}) must not exceed length_ps ({length_ps}).")
    timestep_ps = timestep_fs / 1000.0
    steps_per_report = max(1, int(round(report_interval_ps / timestep_ps)))
    n_reports = max(1, int(round(length_ps / (steps_per_report * timestep_ps))))
    equilibration_steps = 0
    if solvent == "explicit":
        equilibration_ps = float(equilibration_ps)
        if not np.isfinite(equilibration_ps) or equilibration_ps < 0:
            raise ConfSampleError(f"equilibration_ps must be zero or positive, got {equilibration_ps}.")
        equilibration_steps = int(round(equilibration_ps / timestep_ps))
        padding_nm = positive_float(padding_nm, "padding_nm")
        cutoff_nm = positive_float(cutoff_nm, "cutoff_nm")
        pressure_bar = positive_float(pressure_bar, "pressure_bar")
        try:
            forcefield = app.ForceField(*forcefield_files)
        except Exception as exc:  # OpenMM raises ValueError or file errors
            raise ConfSampleError(f"force-field files {list(forcefield_files)} could not be loaded: {exc}") from exc
    if int(minimize_max_iterations) != minimize_max_iterations or minimize_max_iterations < 0:
        raise ConfSampleError(
            f"minimize_max_iterations must be a non-negative integer, got {minimize_max_iterations}."
        )
    minimize_tolerance = positive_float(minimize_tolerance, "minimize_tolerance")
    platform_name = platform or ("CPU" if solvent == "explicit" else "Reference")
    platform_obj = get_platform(platform_name)

    import mdtraj

    md_topology = molecular_system.mdtraj_topology()
    heavy = np.array([a.index for a in md_topology.atoms if a.element is None or a.element.symbol != "H"], dtype=int)
    if len(heavy) == 0:
        heavy = np.arange(n_solute)

    n_structures = len(structures)
    time_ps = np.arange(n_reports + 1) * steps_per_report * timestep_ps
    energies = np.full((n_structures, n_reports + 1), np.nan)
    rmsd = np.full((n_structures, n_reports + 1), np.nan)
    failed = np.zeros(n_structures, dtype=bool)
    messages = [""] * n_structures
    n_simulated = np.zeros(n_structures, dtype=int)
    seeds = np.random.default_rng(seed).integers(1, 2**31 - 1, size=n_structures)  # 0 would mean "pick one"

    total_steps = n_structures * (equilibration_steps + n_reports * steps_per_report)
    bar = progress_bar(None, progress, f"validate ({solvent})", "step", total=total_steps, unit_scale=True)
    try:
        for m, structure in enumerate(structures):
            solute_frames = np.full((n_reports + 1, n_solute, 3), np.nan)
            recorded = 0
            done_steps = 0
            context = None
            try:
                if solvent == "implicit":
                    context, integrator, n_simulated[m] = _implicit_simulation(
                        molecular_system, structure, temperature_K, friction_per_ps, timestep_ps, platform_obj,
                        int(seeds[m]))
                else:
                    context, integrator, n_simulated[m] = _solvated_simulation(
                        molecular_system, structure, heavy, forcefield, padding_nm, cutoff_nm, temperature_K,
                        friction_per_ps, timestep_ps, pressure_bar, platform_obj, int(seeds[m]))
                openmm.LocalEnergyMinimizer.minimize(context, minimize_tolerance, int(minimize_max_iterations))
                context.setVelocitiesToTemperature(temperature_K * unit.kelvin, int(seeds[m]))
                if equilibration_steps:
                    for chunk in _chunks(equilibration_steps, steps_per_report):
                        integrator.step(chunk)
                        done_steps += chunk
                        bar.update(chunk)
                    _energy_and_solute(context, n_solute)
                    context.setParameter(_RESTRAINT_PARAMETER, 0.0)
                energies[m, 0], solute_frames[0] = _energy_and_solute(context, n_solute)
                recorded = 1
                ceiling_kJ = energies[m, 0] + BLOWUP_KJ_PER_ATOM * n_simulated[m]
                for report in range(1, n_reports + 1):
                    integrator.step(steps_per_report)
                    done_steps += steps_per_report
                    bar.update(steps_per_report)
                    energies[m, report], solute_frames[report] = _energy_and_solute(context, n_solute, ceiling_kJ)
                    recorded = report + 1
            except (_BlowUp, openmm.OpenMMException) as exc:
                failed[m] = True
                stage = "during production" if recorded else "before production (minimization/equilibration)"
                where = f" at t = {time_ps[recorded]:.3f} ps" if recorded and recorded <= n_reports else ""
                messages[m] = f"structure {m} blew up {stage}{where}: {str(exc).strip().splitlines()[0]}"
                energies[m, recorded:] = np.nan
                bar.update(n_reports * steps_per_report + equilibration_steps - done_steps)
            finally:
                del context
            if recorded:
                trajectory = mdtraj.Trajectory(solute_frames[:recorded], md_topology)
                reference = mdtraj.Trajectory(structure[None], md_topology)
                rmsd[m, :recorded] = mdtraj.rmsd(trajectory, reference, 0, atom_indices=heavy)
    finally:
        bar.close()

    wall = time.perf_counter() - start
    result = ValidationResult(time_ps, energies, rmsd, failed, messages, solvent, rmsd_threshold_nm)
    ok = ~failed
    result.summary = {
        "system": molecular_system.name,
        "solvent": solvent,
        "n_structures": int(n_structures),
        "n_failed": int(failed.sum()),
        "failed_indices": np.nonzero(failed)[0].tolist(),
        "failure_messages": [msg for msg in messages if msg],
        "mean_final_rmsd_nm": float(np.mean(rmsd[ok, -1])) if ok.any() else float("nan"),
        "max_rmsd_nm": float(np.max(rmsd[ok])) if ok.any() else float("nan"),
        "rmsd_threshold_nm": rmsd_threshold_nm,
        "fraction_stable": float(result.stable.mean()),
        "energy": ("potential energy of the whole solvated system, kJ/mol" if solvent == "explicit"
                   else "potential energy of the solute in implicit solvent, kJ/mol"),
        "rmsd": "solute heavy-atom RMSD to the given structure after superposition, nm",
        "length_ps": float(time_ps[-1]),
        "report_interval_ps": float(steps_per_report * timestep_ps),
        "timestep_fs": timestep_fs,
        "equilibration_ps": equilibration_steps * timestep_ps,
        "temperature_K": temperature_K,
        "friction_per_ps": friction_per_ps,
        "platform": platform_name,
        "seed": int(seed),
        "n_atoms_simulated": n_simulated.tolist(),
        "wall_seconds": wall,
        "seconds_per_structure": wall / n_structures,
    }
    if solvent == "explicit":
        summary = result.summary
        summary.update({"padding_nm": padding_nm, "cutoff_nm": cutoff_nm, "pressure_bar": pressure_bar,
                        "forcefield_files": list(forcefield_files), "water_model": "tip3p",
                        "protocol": "minimize and NPT-equilibrate with solute heavy atoms restrained "
                                    f"({RESTRAINT_K} kJ/mol/nm^2), then unrestrained NPT production"})
    return result


def _chunks(total: int, size: int):
    while total > 0:
        chunk = min(size, total)
        yield chunk
        total -= chunk


def plot_validation(result: ValidationResult, path: str) -> str:
    """Energy and RMSD traces of ``result`` as a PNG at ``path`` (written to ``path.partial``, then renamed).

    Implicit-solvent energies are plotted as they are; explicit-solvent energies (whole solvated boxes with
    different water counts) relative to each run's first value. Failed runs are drawn in red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfSampleError(f"plot path '{path}' cannot be written: directory '{parent}' does not exist.")
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    energy_axis, rmsd_axis = figure.subplots(1, 2)
    relative = result.solvent == "explicit"
    for m in range(len(result.energies)):
        color = "tab:red" if result.failed[m] else "tab:blue"
        trace = result.energies[m] - (result.energies[m, 0] if relative else 0.0)
        energy_axis.plot(result.time_ps, trace, color=color, alpha=0.5, lw=0.8)
        rmsd_axis.plot(result.time_ps, result.rmsd_nm[m], color=color, alpha=0.5, lw=0.8)
    rmsd_axis.axhline(result.rmsd_threshold_nm, color="k", ls="--", lw=0.8, label=f"{result.rmsd_threshold_nm} nm")
    energy_axis.set_xlabel("time (ps)")
    energy_axis.set_ylabel("E - E(0) (kJ/mol), whole system" if relative else "potential energy (kJ/mol)")
    rmsd_axis.set_xlabel("time (ps)")
    rmsd_axis.set_ylabel("heavy-atom RMSD (nm)")
    rmsd_axis.legend(loc="best", frameon=False)
    summary = result.summary
    figure.suptitle(
        f"{summary.get('system', 'structures')}, {result.solvent}-solvent MD: {len(result.energies)} structures, "
        f"{100 * result.stable.mean():.0f}% below {result.rmsd_threshold_nm} nm, {int(result.failed.sum())} failed",
        fontsize=10)
    tmp = path + ".partial"
    figure.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path
