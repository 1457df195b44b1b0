"""Reference MD with OpenMM, written as mdtraj-readable trajectories, and loading of existing trajectories.

:func:`run_md` writes three files next to each other::

    PREFIX.dcd (or .xtc)   the trajectory, one frame per save interval
    PREFIX.pdb             the topology (first frame)
    PREFIX.json            metadata: system, force field, temperature, timestep, save interval, seed, version
    PREFIX.bias.npy        with ``bias=``: the bias energy (kJ/mol) of every frame, for reweighting

Every file is written under a temporary name and renamed when complete, so an interrupted run never
leaves a file that looks finished.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from .. import __version__
from ..errors import ConfSampleError
from ..systems import MolecularSystem, get_platform, to_kelvin

_TRAJECTORY_FORMATS = ("dcd", "xtc")


@dataclass
class MDResult:
    """Where a run's files are and how fast it went."""

    trajectory_path: str
    topology_path: str
    metadata_path: str
    n_frames: int
    wall_seconds: float
    ns_per_day: float

    def load(self):
        """The trajectory as an mdtraj.Trajectory."""
        return load_trajectory(self.trajectory_path, self.topology_path)


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ConfSampleError(f"{name} must be positive, got {value}.")
    return value


def _replace(tmp_path: str, final_path: str) -> None:
    os.replace(tmp_path, final_path)


def write_json(path: str, payload: dict) -> None:
    """Write JSON through a temporary file and a rename."""
    tmp = path + ".partial"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    _replace(tmp, path)


def run_md(molecular_system: MolecularSystem, out_prefix: str, length_ps: float, *, timestep_fs: float = 1.0,
           friction_per_ps: float = 1.0, save_interval_ps: float = 1.0, temperature=None, seed: int = 0,
           platform: str | None = "Reference", trajectory_format: str = "dcd", minimize: bool = True,
           positions_nm: np.ndarray | None = None, progress: bool = True, bias=None,
           bias_backend: str = "auto") -> MDResult:
    """Run Langevin MD (LangevinMiddleIntegrator) and write trajectory, topology and metadata.

    Parameters
    ----------
    molecular_system : MolecularSystem
    out_prefix : str
        Output path without extension; its directory is created if needed.
    length_ps : float, ps
        Simulated time after minimization (no equilibration is discarded: do that in analysis).
    timestep_fs : float, fs
    friction_per_ps : float, 1/ps
    save_interval_ps : float, ps
        Must be a whole number of timesteps.
    temperature : Quantity or float K, optional
        Defaults to the system's temperature.
    seed : int
        Seeds the initial velocities and the integrator's noise.
    platform : str or None
        OpenMM platform name; 'Reference' is fastest for ~22 atoms, 'CPU' for larger systems.
    trajectory_format : 'dcd' or 'xtc'
    positions_nm : (n_atoms, 3) float, nm, optional
        Start here instead of the system's positions.
    bias : LearnedTorsionBias or path, optional
        Run on the biased potential (:mod:`openmm_confsample.bias`, e.g. from ``confsample bias``): frames
        cross barriers the plain potential keeps, e.g. as Timewarp training data (its MH test is against
        the unbiased potential, so the move stays exact). Each frame's bias energy B (kJ/mol) is written to
        ``PREFIX.bias.npy``; weights exp(B/kT) make frame averages unbiased.
    bias_backend : {'auto', 'torchforce', 'pythonforce'}

    Returns
    -------
    MDResult
    """
    length_ps = _positive(length_ps, "length_ps")
    timestep_fs = _positive(timestep_fs, "timestep_fs")
    save_interval_ps = _positive(save_interval_ps, "save_interval_ps")
    friction_per_ps = float(friction_per_ps)
    if friction_per_ps < 0:
        raise ConfSampleError(f"friction_per_ps must be non-negative, got {friction_per_ps}.")
    if trajectory_format not in _TRAJECTORY_FORMATS:
        raise ConfSampleError(f"trajectory_format must be one of {_TRAJECTORY_FORMATS}, got '{trajectory_format}'.")
    steps_per_save = save_interval_ps * 1000.0 / timestep_fs
    if abs(steps_per_save - round(steps_per_save)) > 1e-6 or round(steps_per_save) < 1:
        raise ConfSampleError(
            f"save_interval_ps={save_interval_ps} is not a whole number of {timestep_fs} fs timesteps."
        )
    steps_per_save = int(round(steps_per_save))
    n_frames = int(round(length_ps / save_interval_ps))
    if n_frames < 1:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one save interval ({save_interval_ps} ps).")
    temperature_K = to_kelvin(temperature) if temperature is not None else molecular_system.temperature_K

    directory = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(directory, exist_ok=True)
    trajectory_path = f"{out_prefix}.{trajectory_format}"
    topology_path = f"{out_prefix}.pdb"
    metadata_path = f"{out_prefix}.json"
    bias_path = f"{out_prefix}.bias.npy"
    bias_info, bias_groups = None, None
    if bias is not None:
        from ..bias import with_learned_bias

        bias_source = os.fspath(bias) if isinstance(bias, (str, os.PathLike)) else None
        molecular_system, added = with_learned_bias(molecular_system, bias, bias_backend)
        bias_groups = {added.force_group}
        bias_info = {"path": bias_source, "backend": added.backend, "force_group": added.force_group,
                     "bias_factor": added.module.bias_factor, "energies": os.path.basename(bias_path),
                     "energy_unit": "kJ/mol"}
    elif os.path.exists(bias_path):
        os.remove(bias_path)  # a previous biased run's energies would not belong to this trajectory

    integrator = openmm.LangevinMiddleIntegrator(temperature_K * unit.kelvin, friction_per_ps / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    # OpenMM reads a seed of 0 as "pick one at random": shift so that every user seed is reproducible.
    openmm_seed = int(seed) % 2147483646 + 1
    integrator.setRandomNumberSeed(openmm_seed)
    context = molecular_system.create_context(platform, integrator, positions_nm)
    if minimize:
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    context.setVelocitiesToTemperature(temperature_K * unit.kelvin, openmm_seed)

    first = context.getState(getPositions=True)
    tmp_topology = topology_path + ".partial"
    with open(tmp_topology, "w") as handle:
        app.PDBFile.writeFile(molecular_system.topology, first.getPositions(), handle)
    _replace(tmp_topology, topology_path)

    tmp_trajectory = trajectory_path + ".partial"
    writer = _open_writer(tmp_trajectory, trajectory_format)
    bar = _progress_bar(n_frames, progress, "MD" if bias is None else "biased MD")
    bias_kJ = np.zeros(n_frames if bias is not None else 0)
    start = time.perf_counter()
    ns_per_day = 0.0
    try:
        for frame in range(n_frames):
            integrator.step(steps_per_save)
            positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            if not np.all(np.isfinite(positions)):
                raise ConfSampleError(
                    f"MD blew up (NaN coordinates) at frame {frame}; try a smaller timestep_fs than {timestep_fs}."
                )
            _write_frame(writer, trajectory_format, positions)
            if bias_groups is not None:
                bias_kJ[frame] = context.getState(getEnergy=True, groups=bias_groups).getPotentialEnergy().value_in_unit(
                    unit.kilojoule_per_mole)
            elapsed = time.perf_counter() - start
            ns_per_day = (frame + 1) * save_interval_ps * 1e-3 / max(elapsed, 1e-9) * 86400.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ns_per_day=f"{ns_per_day:.1f}")
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    if bias_groups is not None:
        tmp_bias = bias_path + ".partial"
        with open(tmp_bias, "wb") as handle:
            np.save(handle, bias_kJ)
        _replace(tmp_bias, bias_path)
    _replace(tmp_trajectory, trajectory_path)

    metadata = {
        "system": molecular_system.name,
        "force_field": molecular_system.description,
        "topology_fingerprint": molecular_system.fingerprint(),
        "n_atoms": molecular_system.n_atoms,
        "temperature_K": temperature_K,
        "timestep_fs": timestep_fs,
        "friction_per_ps": friction_per_ps,
        "save_interval_ps": save_interval_ps,
        "length_ps": n_frames * save_interval_ps,
        "n_frames": n_frames,
        "seed": int(seed),
        "platform": platform,
        "minimized": bool(minimize),
        "wall_seconds": wall,
        "ns_per_day": ns_per_day,
        "trajectory": os.path.basename(trajectory_path),
        "topology": os.path.basename(topology_path),
        "openmm_version": openmm.__version__,
        "package_version": __version__,
        "bias": bias_info,
    }
    write_json(metadata_path, metadata)
    return MDResult(trajectory_path, topology_path, metadata_path, n_frames, wall, ns_per_day)


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame")


def _open_writer(path: str, trajectory_format: str):
    from mdtraj.formats import DCDTrajectoryFile, XTCTrajectoryFile

    if trajectory_format == "dcd":
        return DCDTrajectoryFile(path, "w", force_overwrite=True)
    return XTCTrajectoryFile(path, "w", force_overwrite=True)


def _write_frame(writer, trajectory_format: str, positions_nm: np.ndarray) -> None:
    if trajectory_format == "dcd":
        writer.write((positions_nm[None] * 10.0).astype(np.float32))  # DCD stores angstrom
    else:
        writer.write(positions_nm[None].astype(np.float32))


def _n_atoms_in_file(path: str) -> int | None:
    """Atom count stored in a trajectory file, read from its first frame (None when the format carries no count)."""
    import mdtraj

    try:
        with mdtraj.open(path) as handle:
            xyz = handle.read(n_frames=1)[0]
    except Exception as exc:
        raise ConfSampleError(f"trajectory file '{path}' could not be read: {exc}") from exc
    return int(xyz.shape[1]) if len(xyz) else 0


def load_trajectory(trajectory_path: str, topology=None, stride: int = 1):
    """Load a DCD/XTC (with a topology PDB or MolecularSystem) or HDF5 trajectory as an mdtraj.Trajectory.

    Raises ConfSampleError for a missing file, an unsupported format, or a trajectory whose atom count
    differs from the topology's.
    """
    import mdtraj

    if not os.path.isfile(trajectory_path):
        raise ConfSampleError(f"trajectory file '{trajectory_path}' does not exist.")
    extension = os.path.splitext(trajectory_path)[1].lower()
    if extension in (".h5", ".hdf5"):
        return mdtraj.load(trajectory_path, stride=stride)
    if extension not in (".dcd", ".xtc"):
        raise ConfSampleError(f"trajectory file '{trajectory_path}' must be .dcd, .xtc or .h5.")
    if topology is None:
        raise ConfSampleError(f"trajectory file '{trajectory_path}' needs a topology (a PDB file or a system).")
    if isinstance(topology, MolecularSystem):
        md_topology = topology.mdtraj_topology()
        label = f"system '{topology.name}'"
    elif isinstance(topology, str):
        if not os.path.isfile(topology):
            raise ConfSampleError(f"topology file '{topology}' does not exist.")
        md_topology = mdtraj.load_topology(topology)
        label = f"topology file '{topology}'"
    else:
        md_topology = topology if isinstance(topology, mdtraj.Topology) else mdtraj.Topology.from_openmm(topology)
        label = "the topology"
    n_file = _n_atoms_in_file(trajectory_path)
    if n_file is not None and n_file != md_topology.n_atoms:
        raise ConfSampleError(
            f"trajectory file '{trajectory_path}' has {n_file} atoms but {label} has {md_topology.n_atoms}."
        )
    return mdtraj.load(trajectory_path, top=md_topology, stride=stride)


def read_metadata(trajectory_path: str) -> dict | None:
    """The metadata JSON written beside a trajectory by :func:`run_md`, or None if there is none."""
    path = os.path.splitext(trajectory_path)[0] + ".json"
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)
