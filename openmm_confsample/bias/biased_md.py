"""Biased MD with a learned torsion bias, and the weights that turn its frames into unbiased averages.

Frames sampled with the bias ``B`` follow ``p exp(-B/kT)``; weighting each by ``exp(+B/kT)``
(:func:`reweighting_weights`) recovers averages under ``p``. The weights use the bias energy that was
actually applied (the Fourier series, read from the bias's force group), so they are exact whatever the
model behind the bias.

Units: positions in nm, time in ps (timestep in fs), energies and ``kT`` in kJ/mol, angles in radians.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from openmm import unit
from tqdm.auto import tqdm

from ..checks import positive_float, positive_kT, whole_steps
from ..errors import ConfSampleError
from ..runner import langevin_context
from ..units import to_nm
from .forces import DEFAULT_BIAS_GROUP, biased_copy
from .torch_module import LearnedTorsionBias, check_torsions, torsion_angles_torch

__all__ = ["BiasedMDResult", "run_biased_md", "bias_energies", "reweighting_weights"]


def reweighting_weights(bias_energies_kJ, kT: float) -> np.ndarray:
    """Normalised weights ``w_i ∝ exp(+B_i / kT)`` that turn biased samples into unbiased averages.

    bias_energies_kJ : (N,) float, kJ/mol -- the bias each frame felt (``B``, typically <= 0)
    kT : float, kJ/mol
    Returns (N,) float summing to 1 (computed as a softmax, stable for any offset of ``B``).
    """
    kT = positive_kT(kT)
    b = np.asarray(bias_energies_kJ, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] == 0:
        raise ConfSampleError(f"bias_energies_kJ must be a non-empty 1-D array, got shape {b.shape}.")
    if not np.all(np.isfinite(b)):
        raise ConfSampleError("bias_energies_kJ contains NaN or infinite values.")
    log_w = b / kT
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def bias_energies(bias: LearnedTorsionBias, frames) -> np.ndarray:
    """Bias energies (N,) kJ/mol of frames: an mdtraj.Trajectory, (N, n_atoms, 3) nm positions or (N, k) angles (rad).

    A 2-D array with 3 columns is read as one frame's positions; for k = 3 torsions pass angles to
    :meth:`LearnedTorsionBias.energies_of_angles`.
    """
    if hasattr(frames, "xyz") and hasattr(frames, "n_frames"):
        frames = frames.xyz
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == bias.n_torsions and x.shape[1] != 3:
        return bias.energies_of_angles(x)
    if x.ndim == 2 and x.shape[1] == 3:
        x = x[None]
    if x.ndim != 3 or x.shape[2] != 3:
        raise ConfSampleError(
            f"frames must be (N, n_atoms, 3) nm or (N, {bias.n_torsions}) angles, got shape {x.shape}."
        )
    if int(bias.torsions.max()) >= x.shape[1]:
        raise ConfSampleError(f"frames have {x.shape[1]} atoms but the bias uses atom {int(bias.torsions.max())}.")
    with torch.no_grad():
        return bias(torch.from_numpy(x)).numpy().reshape(-1)


@dataclass
class BiasedMDResult:
    """Frames of a biased MD run and their reweighting.

    Attributes
    ----------
    time_ps : (N,) float
    angles : (N, k) float, radians -- the biased torsions, in the order of ``torsion_names``
    torsion_names : list of str
    bias_kJ : (N,) float -- bias energy of each frame (the bias force group's energy)
    weights : (N,) float -- :func:`reweighting_weights` of ``bias_kJ``
    backend : str, message : str
    wall_seconds : float
    bias : LearnedTorsionBias
    kT : float, kJ/mol
    """

    time_ps: np.ndarray
    angles: np.ndarray
    torsion_names: list
    bias_kJ: np.ndarray
    weights: np.ndarray
    backend: str
    message: str
    wall_seconds: float
    bias: LearnedTorsionBias
    kT: float
    extra: dict = field(default_factory=dict)

    def angle(self, name: str) -> np.ndarray:
        """(N,) radians of the torsion called ``name``."""
        if name not in self.torsion_names:
            raise ConfSampleError(f"no torsion named {name!r}; the run recorded {self.torsion_names}.")
        return self.angles[:, self.torsion_names.index(name)]


def run_biased_md(molsys, model, length_ps: float, *, torsions=None, save_interval_ps: float = 0.5,
                  timestep_fs: float = 1.0, friction_per_ps: float = 1.0, seed: int = 0,
                  platform: str = "Reference", backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP,
                  minimize: bool = True, positions_nm=None, progress: bool = False, verbose: bool = True,
                  **options) -> BiasedMDResult:
    """Langevin MD of ``molsys`` with the learned bias of ``model`` added (to a copy of its System).

    Parameters
    ----------
    molsys : MolecularSystem
    model : model with ``log_prob`` or a LearnedTorsionBias
    length_ps : float, ps
    torsions : dict name -> quad or (k, 4), optional
        Default: a bias's own torsions (named as in ``molsys.torsions``), else the model's metadata
        torsions, else ``molsys.torsions``.
    save_interval_ps : float, ps
        Must be a whole number of timesteps.
    timestep_fs, friction_per_ps, seed, platform, minimize
        The Langevin set-up of :func:`openmm_confsample.runner.langevin_context` (every seed, 0 included,
        reproduces its run).
    positions_nm : (n_atoms, 3) float, nm, optional
        Start here instead of the system's positions.
    backend, force_group, options
        As :func:`~openmm_confsample.bias.add_learned_bias`.

    Returns
    -------
    BiasedMDResult
    """
    length_ps = positive_float(length_ps, "length_ps")
    save_interval_ps = positive_float(save_interval_ps, "save_interval_ps")
    steps_per_frame = whole_steps(save_interval_ps, timestep_fs, "save_interval_ps")
    n_frames = int(round(length_ps / save_interval_ps))
    if n_frames < 1:
        raise ConfSampleError(f"length_ps={length_ps} is shorter than one save interval ({save_interval_ps} ps).")
    if positions_nm is not None:
        positions_nm = to_nm(positions_nm, "positions_nm")
    names, t = _resolve_md_torsions(molsys, model, torsions)
    biased, added = biased_copy(molsys, model, t, backend=backend, force_group=force_group, verbose=verbose,
                                **options)
    context = langevin_context(biased, friction_per_ps=friction_per_ps, timestep_fs=timestep_fs, seed=seed,
                               platform=platform, positions_nm=positions_nm, minimize=minimize)
    integrator = context.getIntegrator()
    bias = added.module
    angles = np.empty((n_frames, t.shape[0]))
    bias_kJ = np.empty(n_frames)
    start = time.perf_counter()
    for i in tqdm(range(n_frames), desc="biased MD", unit="frame", disable=not progress):
        integrator.step(steps_per_frame)
        state = context.getState(getPositions=True, getEnergy=True, groups={added.force_group})
        x = torch.from_numpy(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        angles[i] = torsion_angles_torch(x, bias.torsions).numpy()
        bias_kJ[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    wall = time.perf_counter() - start
    time_ps = save_interval_ps * np.arange(1, n_frames + 1)
    return BiasedMDResult(time_ps, angles, names, bias_kJ, reweighting_weights(bias_kJ, molsys.kT), added.backend,
                          added.message, wall, bias, molsys.kT,
                          {"ns_per_day": length_ps / 1000.0 / wall * 86400.0, "platform": platform})


def _resolve_md_torsions(molsys, model, torsions):
    """Names and (k, 4) atoms of the torsions a biased run records: given, the bias's, the model's or the system's."""
    if torsions is not None:
        if isinstance(torsions, dict):
            return list(torsions), check_torsions(list(torsions.values()), molsys.n_atoms)
        t = check_torsions(torsions, molsys.n_atoms)
        return [f"torsion_{i}" for i in range(len(t))], t
    if isinstance(model, LearnedTorsionBias):
        t = model.torsions.numpy()
        lookup = {tuple(v): k for k, v in molsys.torsions.items()}
        return [lookup.get(tuple(q.tolist()), f"torsion_{i}") for i, q in enumerate(t)], t
    meta = getattr(model, "metadata", {}) or {}
    named = [(item["name"], item["atoms"]) for item in meta.get("torsions", [])]
    if named:
        return [n for n, _ in named], check_torsions([a for _, a in named], molsys.n_atoms)
    if not molsys.torsions:
        raise ConfSampleError(f"system '{molsys.name}' names no torsions and none were given.")
    return list(molsys.torsions), check_torsions(list(molsys.torsions.values()), molsys.n_atoms)
