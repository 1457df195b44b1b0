"""MD trajectories in, training sets out.

* :func:`torsion_angles` -- (N, k) dihedral angles in radians for the diffusion model.
* :func:`lagged_pairs` -- (x(t), x(t+tau)) position pairs in nm, with per-atom labels, for the flow model.
* :func:`block_split` -- train/validation split by contiguous blocks, never frame-interleaved, so the
  validation loss measures generalisation rather than memorisation of neighbouring frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import positive_float
from ..errors import ConfSampleError
from ..systems import MolecularSystem


def _as_list(trajectories):
    return list(trajectories) if isinstance(trajectories, (list, tuple)) else [trajectories]


def _torsion_array(torsions, n_atoms: int) -> np.ndarray:
    if isinstance(torsions, MolecularSystem):
        torsions = torsions.torsion_array
    elif isinstance(torsions, dict):
        torsions = list(torsions.values())
    array = np.asarray(torsions, dtype=int)
    if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
        raise ConfSampleError(f"torsions must be a (k, 4) list of atom quadruples, got shape {array.shape}.")
    if array.min() < 0 or array.max() >= n_atoms:
        raise ConfSampleError(f"torsions refer to atoms outside [0, {n_atoms}): {array.tolist()}.")
    return array


def torsion_angles(trajectories, torsions) -> np.ndarray:
    """Dihedral angles of every frame, in radians in [-pi, pi).

    Parameters
    ----------
    trajectories : mdtraj.Trajectory or list of them
    torsions : (k, 4) int, dict name -> quadruple, or MolecularSystem (its named torsions)

    Returns
    -------
    (N, k) float, radians; frames of several trajectories are concatenated in order.
    """
    import mdtraj

    out = []
    for traj in _as_list(trajectories):
        quads = _torsion_array(torsions, traj.n_atoms)
        out.append(mdtraj.compute_dihedrals(traj, quads, periodic=False).astype(float))
    return np.concatenate(out, axis=0)


@dataclass
class PairDataset:
    """Pairs (x(t), x(t+tau)) for the conditional flow.

    Attributes
    ----------
    x0, x1 : (N, n_atoms, 3) float32, nm
    atom_labels : list of str, one per atom ('RES:NAME')
    tau_ps : float
    trajectory_index : (N,) int, which input trajectory each pair came from
    """

    x0: np.ndarray
    x1: np.ndarray
    atom_labels: list
    tau_ps: float
    trajectory_index: np.ndarray

    def __len__(self):
        return len(self.x0)

    def subset(self, index) -> "PairDataset":
        return PairDataset(self.x0[index], self.x1[index], self.atom_labels, self.tau_ps, self.trajectory_index[index])


def lag_in_frames(tau_ps: float, save_interval_ps: float) -> int:
    """The lag in frames; raises when tau is not a positive multiple of the save interval."""
    tau_ps, save_interval_ps = positive_float(tau_ps, "tau_ps"), positive_float(save_interval_ps, "save_interval_ps")
    ratio = tau_ps / save_interval_ps
    if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
        raise ConfSampleError(
            f"tau_ps={tau_ps} is not a multiple of the trajectory's save interval ({save_interval_ps} ps)."
        )
    return int(round(ratio))


def lagged_pairs(trajectories, tau_ps: float, save_interval_ps: float, atom_labels=None) -> PairDataset:
    """All pairs (x(t), x(t+tau)) within each trajectory (never across two trajectories).

    Parameters
    ----------
    trajectories : mdtraj.Trajectory or list of them (same topology)
    tau_ps : float, ps
    save_interval_ps : float, ps between saved frames
    atom_labels : list of str, optional; default 'RES:NAME' from the topology
    """
    trajectories = _as_list(trajectories)
    lag = lag_in_frames(tau_ps, save_interval_ps)
    n_atoms = trajectories[0].n_atoms
    for t in trajectories:
        if t.n_atoms != n_atoms:
            raise ConfSampleError(f"all trajectories must have the same atom count; got {n_atoms} and {t.n_atoms}.")
    if atom_labels is None:
        atom_labels = [f"{a.residue.name}:{a.name}" for a in trajectories[0].topology.atoms]
    x0, x1, index = [], [], []
    for i, traj in enumerate(trajectories):
        if traj.n_frames <= lag:
            continue
        x0.append(traj.xyz[:-lag])
        x1.append(traj.xyz[lag:])
        index.append(np.full(traj.n_frames - lag, i))
    if not x0:
        raise ConfSampleError(f"no trajectory is longer than the lag of {lag} frames ({tau_ps} ps).")
    return PairDataset(np.concatenate(x0).astype(np.float32), np.concatenate(x1).astype(np.float32),
                       list(atom_labels), float(tau_ps), np.concatenate(index))


def block_split(n_samples: int, val_fraction: float = 0.1, n_blocks: int = 10, seed: int = 0, gap: int = 0):
    """Split indices 0..n-1 into train/validation by whole contiguous blocks.

    The series is cut into ``n_blocks`` equal contiguous blocks; ``round(val_fraction * n_blocks)`` of them
    (at least one), chosen with ``seed``, form the validation set. ``gap`` frames at each edge of a
    validation block are dropped from training too (use the lag for pair datasets so no pair straddles).

    Returns
    -------
    train_index, val_index : int arrays
    """
    if n_samples < 2:
        raise ConfSampleError(f"need at least 2 samples to split, got {n_samples}.")
    if not 0 < val_fraction < 1:
        raise ConfSampleError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    n_blocks = max(2, min(int(n_blocks), n_samples))
    edges = np.linspace(0, n_samples, n_blocks + 1).astype(int)
    n_val = max(1, int(round(val_fraction * n_blocks)))
    rng = np.random.default_rng(seed)
    val_blocks = np.sort(rng.choice(n_blocks, size=n_val, replace=False))
    is_val = np.zeros(n_samples, bool)
    excluded = np.zeros(n_samples, bool)
    for b in val_blocks:
        is_val[edges[b]:edges[b + 1]] = True
        excluded[max(0, edges[b] - gap):min(n_samples, edges[b + 1] + gap)] = True
    return np.nonzero(~excluded)[0], np.nonzero(is_val)[0]


def split_by_trajectory(trajectory_index: np.ndarray, val_trajectories) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices when whole trajectories are held out."""
    val = np.isin(trajectory_index, np.atleast_1d(val_trajectories))
    if val.all() or not val.any():
        raise ConfSampleError("val_trajectories must hold out some but not all trajectories.")
    return np.nonzero(~val)[0], np.nonzero(val)[0]
