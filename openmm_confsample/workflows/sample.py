"""Sampling workflows the command line runs: one Simulation with the one added reporter line, or N walkers.

Both write into one output directory and end with ``summary.json``: acceptance, ms per proposal and, per
torsion, the populations of its basins with errors and the ESS of each state's indicator
(:mod:`.report`).

::

    OUT/trajectory.dcd  .csv  .pdb  .json     one run (sample_with_moves): DCD, StateDataReporter log,
                                              topology, run metadata (read_metadata reads it: the
                                              trajectory can be training data)
    OUT/walker_000.dcd  .pdb  .npz  .json     N walkers (sample_walkers, parallel.run_walkers)
    OUT/summary.json                          what the run measured
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ..checks import positive_float, positive_int, whole_steps
from ..data.outputs import OutputSet, write_json
from ..errors import ConfSampleError
from ..systems import MolecularSystem
from .report import TORSION_STATES_DEG, torsion_states_report

__all__ = ["SamplingResult", "sample_with_moves", "sample_walkers", "move_torsions"]

_SUFFIXES = (".dcd", ".csv", ".pdb", ".json")


@dataclass
class SamplingResult:
    """What a sampling workflow wrote and measured.

    summary : dict  (the contents of ``summary_path``; keys ``acceptance``, ``ms_per_proposal``, ``torsions``, ...)
    """

    out_dir: str
    summary_path: str
    summary: dict
    trajectory_path: str | None = None
    log_path: str | None = None
    wall_seconds: float = 0.0

    @property
    def statistics(self) -> dict:
        return self.summary["move_statistics"]


def move_torsions(move, molecular_system: MolecularSystem) -> dict:
    """The torsions worth reporting for a move: those it turns (its torsion set, if it has one), then the
    system's named torsions about other bonds (name -> (i, j, k, l))."""
    torsions = {}
    engine = getattr(move, "engine", move)
    torsion_set = getattr(getattr(engine, "proposal", engine), "torsion_set", None)
    if torsion_set is not None:
        for name, quad in zip(torsion_set.names, np.asarray(torsion_set.torsions).tolist()):
            torsions[str(name)] = tuple(int(a) for a in quad)
    bonds = {frozenset(q[1:3]) for q in torsions.values()}
    for name, quad in molecular_system.torsions.items():
        if frozenset(quad[1:3]) not in bonds and name not in torsions:
            torsions[name] = tuple(quad)
    return torsions


class _TorsionRecorder:
    """An OpenMM reporter that records the torsions ``quads`` (k, 4) at every ``interval`` steps, radians."""

    def __init__(self, quads: np.ndarray, interval: int):
        self.quads, self.interval, self.rows = np.asarray(quads, dtype=int).reshape(-1, 4), int(interval), []

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state):
        from openmm import unit

        from ..geometry.torsions import dihedral_angles

        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        self.rows.append(dihedral_angles(positions, self.quads) if len(self.quads) else np.zeros(0))

    def angles(self) -> np.ndarray:
        return np.array(self.rows, dtype=float).reshape(len(self.rows), len(self.quads))


def _headline(statistics: dict) -> dict:
    return {"acceptance": float(statistics.get("acceptance_rate", 0.0)),
            "ms_per_proposal": 1e3 * float(statistics.get("seconds_per_proposal", 0.0)),
            "exact": bool(statistics.get("exact", True))}


def sample_with_moves(molsys: MolecularSystem, move, out_dir: str, length_ps: float, move_interval_steps: int = 500,
                      n_attempts: int = 1, timestep_fs: float = 1.0, friction_per_ps: float = 1.0,
                      save_interval_ps: float = 1.0, seed: int = 0, platform: str = "Reference",
                      torsions: dict | None = None, progress: bool = True) -> SamplingResult:
    """Hybrid sampling: an ``openmm.app.Simulation`` with a DCDReporter, a StateDataReporter and the one added
    ``LearnedMoveReporter`` line; then ``out_dir/summary.json`` with what it measured.

    Parameters
    ----------
    molsys : MolecularSystem
    move : LearnedMCMCMove, MetropolisHastingsEngine or Proposal
    out_dir : str
        Gets ``trajectory.dcd/.csv/.pdb/.json`` (one all-or-nothing output set) and ``summary.json``.
    length_ps : float, ps
    move_interval_steps : int
        MD steps between moves; ``n_attempts`` MH steps each time.
    save_interval_ps : float, ps
        Frame (and log) interval: the populations and ESS are measured on these frames.
    torsions : dict name -> (i, j, k, l), optional
        What the summary reports; default :func:`move_torsions`.

    Returns
    -------
    SamplingResult
    """
    import openmm.app as app
    from openmm import unit

    from ..moves.reporter import LearnedMoveReporter
    from ..progress import progress_bar
    from ..runner import langevin_integrator, openmm_seed
    from ..systems import get_platform

    length_ps = positive_float(length_ps, "length_ps")
    save_steps = whole_steps(save_interval_ps, timestep_fs)
    move_interval_steps = positive_int(move_interval_steps, "move_interval_steps")
    n_steps = int(round(length_ps * 1000.0 / timestep_fs))
    if n_steps < save_steps:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one save interval ({save_interval_ps} ps).")
    torsions = dict(torsions) if torsions is not None else move_torsions(move, molsys)
    reporter = LearnedMoveReporter(move, interval=move_interval_steps, n_attempts=n_attempts)
    reporter.engine.reset_statistics()
    out_dir = os.path.abspath(out_dir)
    with OutputSet(os.path.join(out_dir, "trajectory"), _SUFFIXES) as outputs:
        # openmm_seed: OpenMM reads 0 as "random", so seed 0 (the CLI default) was not reproducible (issue 13.5).
        integrator = langevin_integrator(molsys.temperature_K, friction_per_ps, timestep_fs, seed=seed)
        simulation = app.Simulation(molsys.topology, molsys.system, integrator, get_platform(platform))
        simulation.context.setPositions(molsys.positions_nm)
        simulation.minimizeEnergy(maxIterations=500)
        simulation.context.setVelocitiesToTemperature(molsys.temperature_K * unit.kelvin, openmm_seed(seed, offset=1))
        with open(outputs.temporary(".pdb"), "w") as handle:
            app.PDBFile.writeFile(molsys.topology, simulation.context.getState(getPositions=True).getPositions(), handle)
        dcd = app.DCDReporter(outputs.temporary(".dcd"), save_steps)
        log = app.StateDataReporter(outputs.temporary(".csv"), save_steps, step=True, time=True,
                                    potentialEnergy=True, temperature=True, speed=True)
        recorder = _TorsionRecorder(np.array(list(torsions.values()), dtype=int), save_steps)
        simulation.reporters.extend([dcd, log, recorder, reporter])
        chunk = max(move_interval_steps, save_steps) * 10
        bar = progress_bar(total=n_steps, enabled=progress, desc="MD + learned moves", unit="step", unit_scale=True)
        start = time.perf_counter()
        done = 0
        while done < n_steps:
            steps = min(chunk, n_steps - done)
            simulation.step(steps)
            done += steps
            bar.update(steps)
            bar.set_postfix(acceptance=f"{reporter.statistics['acceptance_rate']:.2f}")
        wall = time.perf_counter() - start
        bar.close()
        simulation.reporters.clear()
        dcd._out.close()  # OpenMM's reporters close their files only in __del__
        log._out.close()
        statistics = reporter.statistics
        n_frames = n_steps // save_steps
        metadata = {"system": molsys.name, "force_field": molsys.description, "topology_fingerprint": molsys.fingerprint(),
                    "n_atoms": molsys.n_atoms, "temperature_K": molsys.temperature_K, "timestep_fs": timestep_fs,
                    "friction_per_ps": friction_per_ps, "save_interval_ps": save_interval_ps,
                    "length_ps": n_steps * timestep_fs / 1000.0, "n_frames": n_frames, "seed": int(seed),
                    "platform": platform, "wall_seconds": wall, "move_interval_steps": move_interval_steps,
                    "n_attempts": n_attempts, "move_statistics": statistics, "exact": statistics.get("exact", True),
                    "trajectory": "trajectory.dcd", "topology": "trajectory.pdb", "bias": None}
        paths = outputs.commit(metadata)
    angles = recorder.angles()  # the DCD's frames (same reporter steps), without reading the file back
    report = torsion_states_report({name: angles[:, i] for i, name in enumerate(torsions)}) if torsions else {}
    summary = {**_headline(statistics), "system": molsys.name, "length_ps": metadata["length_ps"],
               "n_frames": int(len(angles)), "wall_seconds": wall, "move_statistics": statistics,
               "settings": {k: metadata[k] for k in ("move_interval_steps", "n_attempts", "timestep_fs",
                                                     "friction_per_ps", "save_interval_ps", "seed", "platform",
                                                     "temperature_K")},
               "torsions": report, "files": {"trajectory": paths[".dcd"], "log": paths[".csv"],
                                             "topology": paths[".pdb"], "metadata": paths[".json"]}}
    per_fragment = getattr(reporter.engine.proposal, "fragment_statistics", None)
    if callable(per_fragment):  # fragment moves: acceptance per residue and per move kind
        summary["fragment_statistics"] = per_fragment()
    summary_path = os.path.join(out_dir, "summary.json")
    write_json(summary_path, summary)
    return SamplingResult(out_dir, summary_path, summary, paths[".dcd"], paths[".csv"], wall)


def _state_indicators(torsions) -> dict:
    """Indicators of every state of every torsion, as ``parallel.run_walkers`` takes them."""
    from ..bench.observables import angle_range

    indicators = {}
    for name in torsions:
        for template, (low, high) in TORSION_STATES_DEG.items():
            state = template.format(t=name)
            indicators[state] = angle_range(name, low, high, name=state)
    return indicators


def sample_walkers(molsys: MolecularSystem, move_factory, n_walkers: int, out_dir: str, length_ps: float,
                   move_interval_steps: int = 500, n_attempts: int = 1, timestep_fs: float = 1.0,
                   seed: int | None = 0, platform: str | None = None, torsions: dict | None = None,
                   progress: bool = True) -> SamplingResult:
    """``n_walkers`` independent chains of MD + learned moves (:func:`openmm_confsample.parallel.run_walkers`:
    one per MPI rank under ``mpiexec``, all on this process otherwise), one trajectory each, and
    ``out_dir/summary.json`` with the pooled acceptance, ms per proposal and per-torsion states (``p`` pooled
    over walkers with its error, ``ess`` pooled, ``ess_per_chain``, ``r_hat``; an ESS is None where the state was
    never entered or never left, a state None where every walker failed)
    besides run_walkers' own keys.

    ``move_factory(walker, generator)`` builds walker ``walker``'s move from its own random stream; a segment
    is ``move_interval_steps`` of MD followed by ``n_attempts`` MH steps, and one frame is kept per segment.
    ``torsions`` (name -> quad) are recorded and reported (default: the system's named torsions).
    """
    from ..parallel import run_walkers

    n_walkers = positive_int(n_walkers, "n_walkers")
    segment_ps = positive_int(move_interval_steps, "move_interval_steps") * positive_float(timestep_fs,
                                                                                          "timestep_fs") / 1000.0
    torsions = dict(torsions if torsions is not None else molsys.torsions)
    recorded = dataclasses.replace(molsys, torsions=torsions)  # the walkers record these torsions
    result = run_walkers(recorded, move_factory, n_walkers, length_ps, out_dir, seed, segment_ps=segment_ps,
                         moves_per_segment=n_attempts, timestep_fs=timestep_fs, platform=platform,
                         indicators=_state_indicators(torsions), progress=progress)
    walkers = result.summary
    report = {}
    for name in torsions:
        states = {}
        for template in TORSION_STATES_DEG:
            pooled = walkers["indicators"].get(template.format(t=name))
            measured = pooled is not None and 0.0 < pooled["mean"] < 1.0  # never entered or never left: no ESS
            states[template.format(t=name)] = None if pooled is None else {
                "p": pooled["mean"], "p_error": pooled["error"], "ess": pooled["ess"] if measured else None,
                "r_hat": pooled["r_hat"],
                "ess_per_chain": [chain["ess"] if 0.0 < chain["mean"] < 1.0 else None for chain in pooled["per_chain"]]}
        report[name] = {"n_frames": int(walkers["n_frames"]) * (n_walkers - len(walkers["failed"])), "states": states}
    summary = {**walkers, **_headline(walkers["move_statistics"]), "torsions": report}
    write_json(result.summary_path, summary)
    return SamplingResult(result.out_dir, result.summary_path, summary, wall_seconds=walkers["wall_seconds"])
