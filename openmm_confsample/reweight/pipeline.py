"""The reweighting pipeline of the original study: rebuild, score, weight, resample, write.

:func:`reweight_pipeline` runs :func:`~openmm_confsample.reweight.rebuild.rebuild_conformers`, scores each
relaxed structure with MMFF94 (kcal/mol) or the system's OpenMM force field (kJ/mol), weights the structures
by exp(-E/kT) and resamples them; given ``out_dir`` it writes ``resampled.pdb``, ``resampled.dcd``,
``weights.csv`` and ``summary.json``, each under a ``.partial`` name renamed when complete, the summary
last (a directory with a ``summary.json`` holds a complete set).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..checks import positive_int, wrap_angle
from ..errors import ConfSampleError
from ..systems import MolecularSystem
from ..units import kT_kJ_per_mol, to_kelvin
from .rebuild import _check_angles, rebuild_conformers, template_molecule
from .weights import GAS_CONSTANT_KCAL, boltzmann_weights, kish_effective_sample_size, openmm_energies, resample

_ENERGY_UNITS = {"mmff": "kcal/mol", "openmm": "kJ/mol"}


@dataclass
class ReweightResult:
    """What :func:`reweight_pipeline` produced.

    Attributes
    ----------
    angles_rad : (N, k) float, radians, the target torsions
    torsions_rad : (N, k) float, radians, the torsions reached after relaxation
    positions_nm : (N, n_atoms, 3) float, nm
    energies : (N,) float, in ``energy_unit`` (inf for structures OpenMM could not score)
    energy_unit : 'kcal/mol' (MMFF94) or 'kJ/mol' (OpenMM)
    kT : float, in ``energy_unit``
    weights : (N,) float, normalized Boltzmann weights
    ess : float, Kish effective sample size of ``weights``
    resampled_indices : (n_resample,) int, indices into the N structures
    resampled_positions_nm : (n_resample, n_atoms, 3) float, nm
    converged : (N,) bool, MMFF94 minimization converged
    files : dict kind -> path of the files written (empty without ``out_dir``)
    """

    angles_rad: np.ndarray
    torsions_rad: np.ndarray
    positions_nm: np.ndarray
    energies: np.ndarray
    energy_unit: str
    kT: float
    weights: np.ndarray
    ess: float
    resampled_indices: np.ndarray
    resampled_positions_nm: np.ndarray
    converged: np.ndarray
    summary: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def resampled_trajectory(self, molecular_system: MolecularSystem):
        """The resampled structures as an mdtraj.Trajectory on ``molecular_system``'s topology."""
        import mdtraj

        return mdtraj.Trajectory(self.resampled_positions_nm, molecular_system.mdtraj_topology())


def _check_out_dir(out_dir) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfSampleError(f"out_dir '{out_dir}' exists and is not a directory.")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise ConfSampleError(f"out_dir '{out_dir}' cannot be created: its parent directory '{parent}' does not exist.")
    return out_dir


def _partial(path: str) -> str:
    return path + ".partial"


def _write_json(path: str, payload: dict) -> None:
    with open(_partial(path), "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(_partial(path), path)


def _write_csv(path: str, header: list[str], rows) -> None:
    with open(_partial(path), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(_partial(path), path)


def _write_structures(out_dir: str, positions_nm: np.ndarray, molecular_system: MolecularSystem) -> dict:
    import mdtraj

    trajectory = mdtraj.Trajectory(positions_nm, molecular_system.mdtraj_topology())
    pdb_path = os.path.join(out_dir, "resampled.pdb")
    dcd_path = os.path.join(out_dir, "resampled.dcd")
    # save_pdb/save_dcd (unlike save) do not pick the format from the extension, so '.partial' is safe.
    trajectory.save_pdb(_partial(pdb_path), force_overwrite=True)
    os.replace(_partial(pdb_path), pdb_path)
    trajectory.save_dcd(_partial(dcd_path), force_overwrite=True)
    os.replace(_partial(dcd_path), dcd_path)
    return {"pdb": pdb_path, "dcd": dcd_path}


def reweight_pipeline(molecular_system: MolecularSystem, angles_rad, n_resample: int | None = None,
                      energy: str = "mmff", temperature_K: float = 298.15, optimize: bool = True, seed: int = 0,
                      out_dir: str | None = None, progress: bool = True, max_iters: int = 500,
                      resample_method: str = "multinomial", charge: int = 0,
                      platform: str = "Reference") -> ReweightResult:
    """Rebuild structures from torsion angles, weight them by exp(-E/kT) and resample.

    Parameters
    ----------
    molecular_system : MolecularSystem
        Its ``torsions`` (in insertion order) name the columns of ``angles_rad``.
    angles_rad : (N, k) float, radians
        E.g. samples of (phi, psi) from a generator.
    n_resample : int, optional
        How many structures to draw by weight; default N.
    energy : 'mmff' or 'openmm'
        Score the relaxed structures with MMFF94 (kcal/mol, gas phase) or with the system's own OpenMM
        force field (kJ/mol). kT is taken in the matching unit.
    temperature_K : float or Quantity
        Temperature of the weights; 298.15 K by default, as in the original study.
    optimize : bool
        MMFF94-relax each structure around the held torsions (see :func:`rebuild_conformers`).
    seed : int
        Seed of the resampling draw.
    out_dir : str, optional
        Directory for ``resampled.pdb`` (multi-model), ``resampled.dcd``, ``weights.csv`` and
        ``summary.json``; created if its parent exists. Each file is written under a ``.partial`` name and
        renamed when complete.
    progress : bool
        Show a progress bar while rebuilding.
    max_iters : int
        MMFF94 minimizer iterations per structure.
    resample_method : 'multinomial' or 'systematic'
    charge : int
        Total charge of the molecule, for bond-order assignment.
    platform : str
        OpenMM platform for ``energy='openmm'``.

    Returns
    -------
    ReweightResult

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.systems import get_system
    >>> ala = get_system("alanine-dipeptide-implicit")
    >>> angles = np.random.default_rng(0).uniform(-np.pi, np.pi, size=(5, 2))
    >>> result = reweight_pipeline(ala, angles, n_resample=10, progress=False)
    >>> result.weights.shape, result.resampled_positions_nm.shape
    ((5,), (10, 22, 3))
    """
    start = time.perf_counter()
    if energy not in _ENERGY_UNITS:
        raise ConfSampleError(f"energy must be 'mmff' or 'openmm', got {energy!r}.")
    if not molecular_system.torsions:
        raise ConfSampleError(f"system '{molecular_system.name}' has no named torsions to set.")
    angles = _check_angles(angles_rad, len(molecular_system.torsions))
    temperature_K = to_kelvin(temperature_K, "temperature_K")
    n_resample = positive_int(len(angles) if n_resample is None else n_resample, "n_resample")
    if resample_method not in ("multinomial", "systematic"):
        raise ConfSampleError(f"resample_method must be 'multinomial' or 'systematic', got {resample_method!r}.")
    out_dir = _check_out_dir(out_dir) if out_dir is not None else None

    mol = template_molecule(molecular_system, charge=charge)
    rebuilt = rebuild_conformers(mol, molecular_system.torsions, angles, optimize=optimize, max_iters=max_iters,
                                 progress=progress)
    if energy == "mmff":
        energies, kT = rebuilt.energies_kcal, GAS_CONSTANT_KCAL * temperature_K
    else:
        energies, kT = openmm_energies(molecular_system, rebuilt.positions_nm, platform), kT_kJ_per_mol(temperature_K)
    weights = boltzmann_weights(energies, kT)
    ess = kish_effective_sample_size(weights)
    indices = resample(weights, n_resample, seed, resample_method)
    resampled_positions = rebuilt.positions_nm[indices]

    deviation_deg = np.rad2deg(np.abs(wrap_angle(rebuilt.torsions_rad - angles)))
    finite = np.isfinite(energies)
    summary = {
        "system": molecular_system.name,
        "torsions": {name: list(quad) for name, quad in molecular_system.torsions.items()},
        "n_structures": int(len(angles)),
        "n_resample": n_resample,
        "resample_method": resample_method,
        "seed": int(seed),
        "energy_model": "MMFF94 (RDKit, gas phase)" if energy == "mmff" else f"OpenMM ({molecular_system.description})",
        "energy_unit": _ENERGY_UNITS[energy],
        "temperature_K": temperature_K,
        "kT": kT,
        "optimize": bool(optimize),
        "n_not_converged": int((~rebuilt.converged).sum()),
        "n_unscored": int((~finite).sum()),
        "max_torsion_deviation_deg": float(deviation_deg.max()),
        "energy_min": float(energies[finite].min()),
        "energy_max": float(energies[finite].max()),
        "ess_kish": ess,
        "ess_fraction": ess / len(angles),
        "n_unique_resampled": int(len(np.unique(indices))),
        "smiles": _smiles(mol),
    }
    result = ReweightResult(angles, rebuilt.torsions_rad, rebuilt.positions_nm, np.asarray(energies, dtype=float),
                            _ENERGY_UNITS[energy], float(kT), weights, ess, indices, resampled_positions,
                            rebuilt.converged, summary)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        files = _write_structures(out_dir, resampled_positions, molecular_system)
        counts = np.bincount(indices, minlength=len(angles))
        names = list(molecular_system.torsions)
        energy_column = "energy_kcal_per_mol" if energy == "mmff" else "energy_kJ_per_mol"
        header = (["index"] + [f"{n}_rad" for n in names] + [f"{n}_reached_rad" for n in names]
                  + [energy_column, "weight", "n_resampled", "converged"])
        rows = ([i] + [f"{a:.6f}" for a in angles[i]] + [f"{a:.6f}" for a in rebuilt.torsions_rad[i]]
                + [f"{energies[i]:.6f}", f"{weights[i]:.6e}", int(counts[i]), int(rebuilt.converged[i])]
                for i in range(len(angles)))
        files["weights"] = os.path.join(out_dir, "weights.csv")
        _write_csv(files["weights"], header, rows)
        files["summary"] = os.path.join(out_dir, "summary.json")
        result.files = files
        summary["files"] = {kind: os.path.basename(path) for kind, path in files.items()}
        summary["wall_seconds"] = time.perf_counter() - start
        _write_json(files["summary"], summary)
    else:
        summary["wall_seconds"] = time.perf_counter() - start
    return result


def _smiles(mol) -> str:
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.RemoveHs(mol))
