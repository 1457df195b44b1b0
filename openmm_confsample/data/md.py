"""Reference MD with OpenMM, written as mdtraj-readable trajectories, and loading of existing trajectories.

:func:`run_md` writes one set of files next to each other::

    PREFIX.dcd (or .xtc)   the trajectory, one frame per save interval
    PREFIX.pdb             the topology (first frame)
    PREFIX.json            metadata: system, force field, temperature, timestep, save interval, seed, version,
                           run id and the size of each file of the set
    PREFIX.bias.npy        with ``bias=``: the bias energy (kJ/mol) of every frame, for reweighting

The set is written all or nothing (:mod:`openmm_confsample.data.outputs`): the run claims PREFIX (a second
run on it refuses), writes under its own temporary names, and replaces the earlier set only when its own is
complete, the JSON last. A killed run leaves the earlier set as it was.

A biased run gets a System that already carries the bias (e.g. from
:func:`openmm_confsample.bias.with_learned_bias`) and a :class:`BiasRecord` saying which force group holds it:
this module runs and records MD, it does not build potentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from .. import __version__
from ..checks import positive_float, whole_steps
from ..errors import ConfSampleError
from ..progress import progress_bar
from ..runner import langevin_context
from ..systems import MolecularSystem
from ..units import check_position_scale, to_kelvin, to_nm
from .outputs import OutputSet, check_output_set

_TRAJECTORY_FORMATS = ("dcd", "xtc")
_SUFFIXES = (".dcd", ".xtc", ".pdb", ".json", ".bias.npy")


@dataclass
class MDResult:
    """Where a run's files are and how fast it went."""

    trajectory_path: str
    topology_path: str
    metadata_path: str
    n_frames: int
    wall_seconds: float
    ns_per_day: float
    run_id: str = ""

    def load(self):
        """The trajectory as an mdtraj.Trajectory."""
        return load_trajectory(self.trajectory_path, self.topology_path)


@dataclass(frozen=True)
class BiasRecord:
    """What :func:`run_md` records of a bias the System already carries.

    Attributes
    ----------
    force_group : int
        The force group holding the bias (and nothing else): its energy is written per frame.
    backend : str, optional
        How the bias entered OpenMM ('torchforce' or 'pythonforce').
    bias_factor : float, optional
        Well-tempered gamma of the bias.
    source : str, optional
        The file the bias was loaded from.
    """

    force_group: int
    backend: str | None = None
    bias_factor: float | None = None
    source: str | None = None

    @classmethod
    def of(cls, added, source=None) -> "BiasRecord":
        """The record of an ``AddedForce`` (``openmm_confsample.bias.with_learned_bias``'s second value)."""
        module = getattr(added, "module", None)
        bias_factor = getattr(module, "bias_factor", None)
        return cls(int(added.force_group), getattr(added, "backend", None),
                   None if bias_factor is None else float(bias_factor), None if source is None else os.fspath(source))


def _bias_record(bias, system: openmm.System, name: str) -> BiasRecord | None:
    if bias is None:
        return None
    if isinstance(bias, (str, os.PathLike)):
        raise ConfSampleError(
            f"run_md takes a system that already carries the bias, not the bias file '{os.fspath(bias)}': build it "
            f"with openmm_confsample.bias.with_learned_bias(molsys, path, backend) and pass "
            f"bias=BiasRecord.of(added, path)."
        )
    record = bias if isinstance(bias, BiasRecord) else BiasRecord.of(bias)
    groups = {force.getForceGroup() for force in system.getForces()}
    if record.force_group not in groups:
        raise ConfSampleError(
            f"bias force group {record.force_group} holds no force of system '{name}' (groups {sorted(groups)}); "
            f"pass the biased system, e.g. from openmm_confsample.bias.with_learned_bias."
        )
    return record


def run_md(molecular_system: MolecularSystem, out_prefix: str, length_ps: float, *, timestep_fs: float = 1.0,
           friction_per_ps: float = 1.0, save_interval_ps: float = 1.0, temperature=None, seed: int = 0,
           platform: str | None = "Reference", trajectory_format: str = "dcd", minimize: bool = True,
           positions_nm: np.ndarray | None = None, progress: bool = True, bias: BiasRecord | None = None) -> MDResult:
    """Run Langevin MD (LangevinMiddleIntegrator) and write trajectory, topology and metadata.

    Parameters
    ----------
    molecular_system : MolecularSystem
        With ``bias``: the biased system (its System carries the bias force).
    out_prefix : str
        Output path without extension; its directory is created if needed. Another run writing to the same
        prefix at the same time makes this one refuse in one sentence.
    length_ps : float, ps
        Simulated time after minimization (no equilibration is discarded: do that in analysis).
    timestep_fs : float, fs
    friction_per_ps : float, 1/ps
    save_interval_ps : float, ps
        Must be a whole number of timesteps.
    temperature : Quantity or float K, optional
        Defaults to the system's temperature.
    seed : int
        Seeds the initial velocities and the integrator's noise; every seed (0 included) is reproducible.
    platform : str or None
        OpenMM platform name; 'Reference' is fastest for ~22 atoms, 'CPU' for larger systems.
    trajectory_format : 'dcd' or 'xtc'
    positions_nm : (n_atoms, 3) float, nm (or a Quantity), optional
        Start here instead of the system's positions.
    bias : BiasRecord or AddedForce, optional
        The bias already in ``molecular_system``'s System, e.g.
        ``biased, added = with_learned_bias(molsys, "bias.pt", "auto")`` and ``bias=BiasRecord.of(added,
        "bias.pt")`` (:mod:`openmm_confsample.bias`, from ``confsample bias``): frames cross barriers the plain
        potential keeps, e.g. as Timewarp training data (its MH test is against the unbiased potential, so
        the move stays exact). Each frame's energy B (kJ/mol) in the record's force group is written to
        ``PREFIX.bias.npy``; weights exp(B/kT) make frame averages unbiased.

    Returns
    -------
    MDResult
    """
    length_ps = positive_float(length_ps, "length_ps")
    timestep_fs = positive_float(timestep_fs, "timestep_fs")
    save_interval_ps = positive_float(save_interval_ps, "save_interval_ps")
    friction_per_ps = positive_float(friction_per_ps, "friction_per_ps", allow_zero=True)
    if trajectory_format not in _TRAJECTORY_FORMATS:
        raise ConfSampleError(f"trajectory_format must be one of {_TRAJECTORY_FORMATS}, got '{trajectory_format}'.")
    steps_per_save = whole_steps(save_interval_ps, timestep_fs)
    n_frames = int(round(length_ps / save_interval_ps))
    if n_frames < 1:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one save interval ({save_interval_ps} ps).")
    temperature_K = molecular_system.temperature_K if temperature is None else to_kelvin(temperature)
    if positions_nm is not None:
        positions_nm = to_nm(positions_nm, "positions_nm")
        if len(positions_nm) != molecular_system.n_atoms:
            raise ConfSampleError(f"positions_nm has {len(positions_nm)} rows but system '{molecular_system.name}' "
                                  f"has {molecular_system.n_atoms} atoms.")
        check_position_scale(molecular_system.system, positions_nm, "positions_nm")
    record = _bias_record(bias, molecular_system.system, molecular_system.name)

    with OutputSet(out_prefix, _SUFFIXES) as outputs:
        context = langevin_context(molecular_system, temperature_K, friction_per_ps, timestep_fs, seed, platform,
                                   positions_nm, minimize)
        first = context.getState(getPositions=True).getPositions()
        with open(outputs.temporary(".pdb"), "w") as handle:
            app.PDBFile.writeFile(molecular_system.topology, first, handle)
        bias_kJ, wall, ns_per_day = _run_frames(context, outputs.temporary(f".{trajectory_format}"), trajectory_format,
                                                n_frames, steps_per_save, save_interval_ps, timestep_fs, record,
                                                progress)
        if record is not None:
            with open(outputs.temporary(".bias.npy"), "wb") as handle:
                np.save(handle, bias_kJ)
        bias_info = None if record is None else {
            "path": record.source, "backend": record.backend, "force_group": record.force_group,
            "bias_factor": record.bias_factor, "energies": os.path.basename(outputs.path(".bias.npy")),
            "energy_unit": "kJ/mol"}
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
            "trajectory": os.path.basename(outputs.path(f".{trajectory_format}")),
            "topology": os.path.basename(outputs.path(".pdb")),
            "openmm_version": openmm.__version__,
            "package_version": __version__,
            "bias": bias_info,
        }
        paths = outputs.commit(metadata)
    return MDResult(paths[f".{trajectory_format}"], paths[".pdb"], paths[".json"], n_frames, wall, ns_per_day,
                    outputs.run_id)


def _run_frames(context: openmm.Context, path: str, trajectory_format: str, n_frames: int, steps_per_save: int,
                save_interval_ps: float, timestep_fs: float, record: BiasRecord | None, progress: bool):
    """Step and write ``n_frames`` frames to ``path``; returns (bias energies kJ/mol, wall s, ns/day)."""
    integrator = context.getIntegrator()
    writer = _open_writer(path, trajectory_format)
    bar = progress_bar(total=n_frames, enabled=progress, desc="MD" if record is None else "biased MD", unit="frame")
    bias_kJ = np.zeros(n_frames if record is not None else 0)
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
            if record is not None:
                bias_kJ[frame] = context.getState(getEnergy=True, groups={record.force_group}).getPotentialEnergy(
                ).value_in_unit(unit.kilojoule_per_mole)
            elapsed = time.perf_counter() - start
            ns_per_day = (frame + 1) * save_interval_ps * 1e-3 / max(elapsed, 1e-9) * 86400.0
            bar.update(1)
            bar.set_postfix(ns_per_day=f"{ns_per_day:.1f}", refresh=False)
    finally:
        writer.close()
        bar.close()
    return bias_kJ, time.perf_counter() - start, ns_per_day


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


def dcd_header_frames(path: str) -> int | None:
    """The frame count a DCD file's header claims (NSET), or None when the header is not a DCD header.

    A DCD starts with a Fortran record of 84 bytes (marker 84 as a 4- or 8-byte int, either byte order),
    then 'CORD' and NSET as a 4-byte int.
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    for order in "<>":
        for marker_format, size in (("i", 4), ("q", 8)):
            if len(head) >= size + 8 and struct.unpack(order + marker_format, head[:size])[0] == 84 \
                    and head[size:size + 4] == b"CORD":
                return struct.unpack(order + "i", head[size + 4:size + 8])[0]
    return None


@contextlib.contextmanager
def _quiet_dcdplugin():
    """Silence the lines mdtraj's DCD plugin prints from C ("dcdplugin) detected standard 32-bit DCD file ...")
    on every open: they go to file descriptor 1, past Python's sys.stdout, so the descriptor is redirected."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _inspect_file(path: str) -> tuple[int, int | None]:
    """(atom count, frames the file holds or None when counting needs a full pass) of a DCD/XTC file."""
    import mdtraj

    try:
        with _quiet_dcdplugin(), mdtraj.open(path) as handle:
            n_held = len(handle) if path.lower().endswith(".dcd") else None
            xyz = handle.read(n_frames=1)[0]
    except Exception as exc:
        raise ConfSampleError(f"trajectory file '{path}' could not be read: {exc}") from exc
    return (int(xyz.shape[1]) if len(xyz) else 0), n_held


def _check_truncation(path: str, n_held: int | None, allow_truncated: bool) -> None:
    """Refuse a DCD whose header claims more frames than it holds (mdtraj only prints a line and reads the rest)."""
    claimed = dcd_header_frames(path) if n_held is not None else None
    if claimed is None or claimed <= n_held:
        return
    if not allow_truncated:
        raise ConfSampleError(
            f"trajectory file '{path}' is truncated: its header claims {claimed} frames but it holds {n_held} "
            f"(a run killed while writing?); pass allow_truncated=True (--allow-truncated) to use the {n_held} frames."
        )
    warnings.warn(f"trajectory file '{path}' is truncated: its header claims {claimed} frames; using the "
                  f"{n_held} frames it holds (allow_truncated=True).", stacklevel=3)


def load_trajectory(trajectory_path: str, topology=None, stride: int = 1, allow_truncated: bool = False):
    """Load a DCD/XTC (with a topology PDB or MolecularSystem) or HDF5 trajectory as an mdtraj.Trajectory.

    Raises ConfSampleError for a missing file, an unsupported format, a trajectory whose atom count
    differs from the topology's, or a truncated DCD (its header claims more frames than the file holds)
    unless ``allow_truncated`` (then a warning says how many frames were read).
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
    n_atoms, n_held = _inspect_file(trajectory_path)
    if n_atoms != md_topology.n_atoms:
        raise ConfSampleError(
            f"trajectory file '{trajectory_path}' has {n_atoms} atoms but {label} has {md_topology.n_atoms}."
        )
    _check_truncation(trajectory_path, n_held, allow_truncated)
    with _quiet_dcdplugin():
        return mdtraj.load(trajectory_path, top=md_topology, stride=stride)


def read_metadata(trajectory_path: str) -> dict | None:
    """The metadata JSON written beside a trajectory (by :func:`run_md`), or None if none describes this file.

    A JSON naming another trajectory (e.g. ``x.json`` of a DCD run, asked for ``x.xtc``) describes no file
    here: None. A JSON whose recorded file sizes differ from the files beside it is refused
    (:func:`~openmm_confsample.data.outputs.check_output_set`).
    """
    path = os.path.splitext(trajectory_path)[0] + ".json"
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        metadata = json.load(handle)
    named = metadata.get("trajectory") if isinstance(metadata, dict) else None
    if isinstance(named, str) and os.path.basename(named) != os.path.basename(trajectory_path):
        return None
    check_output_set(path, metadata)
    return metadata

