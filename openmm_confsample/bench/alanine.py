"""The alanine dipeptide as one configuration of the benchmark harness.

Everything that knows alanine dipeptide lives here: its basins (:data:`ALANINE_BASINS_DEG`) and the von Mises
mixture over them (:func:`alanine_basin_proposal`), the indicators the benchmark measures (phi > 0, the rare
alpha_L/C7ax half, is the primary one; alpha_R and beta), the reference settings tuned on it, and the model
the package ships for it (:data:`SHIPPED_MODEL`, remade by :func:`make_shipped_model`)::

    config = alanine_config()
    reference = run_reference(ala, 300, config, cache_path="benchmarks/cache/ala_reference.npz")
    rows = summarize(runs, config.indicators, reference)
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfSampleError
from ..geometry.torsions import TorsionSet
from ..models.shipped import SHIPPED_MODELS
from ..moves.engine import Proposal
from ..moves.proposals import VonMisesMixtureProposal
from ..systems import MolecularSystem, get_system
from .config import DEFAULT_REFERENCE_SETTINGS, BenchmarkConfig
from .observables import CollectiveVariables, angle_range, positive, torsion_box
from .training import TrainingResult, train_torsion_model

__all__ = ["ALANINE_BASINS_DEG", "alanine_basin_proposal", "basin_proposal", "PHI_POSITIVE", "ALPHA_R", "BETA",
           "ALANINE_INDICATORS", "REFERENCE_SETTINGS", "SHIPPED_MODEL", "SHIPPED_TIMEWARP_MODEL",
           "SHIPPED_MODEL_SETTINGS", "alanine_config", "is_alanine", "make_shipped_model"]

#: Basin centres (phi, psi) in degrees of alanine dipeptide: C7eq/beta, PII, alpha_R, alpha_L, C7ax.
ALANINE_BASINS_DEG = ((-80.0, 150.0), (-70.0, 140.0), (-75.0, -40.0), (60.0, 40.0), (70.0, -60.0))

#: phi > 0: the rare alpha_L/C7ax half (about 2 % at 300 K in implicit solvent); the primary indicator.
PHI_POSITIVE = positive("phi")
#: The right-handed helix basin: phi < 0, psi in (-120, 50) degrees (analysis.free_energy.RAMACHANDRAN_REGIONS).
ALPHA_R = torsion_box("phi", (-180.0, 0.0), "psi", (-120.0, 50.0), name="alpha_R")
#: C7eq / C5 / PII: phi < 0, psi from 120 through 180 to -150 degrees.
BETA = (angle_range("phi", -180.0, 0.0) & angle_range("psi", 120.0, -150.0)).renamed("beta")
ALANINE_INDICATORS = (PHI_POSITIVE, ALPHA_R, BETA)

#: Settings of :func:`~openmm_confsample.bench.reference.run_reference`, tuned on alanine-dipeptide-implicit at
#: 300 K (see benchmarks/README.md): von Mises basin moves of kappa 3, 10 MD steps + 4 moves per segment.
REFERENCE_SETTINGS = {**DEFAULT_REFERENCE_SETTINGS, "proposal": {"kappa": 3.0, "weights": None}}

#: The torsion diffusion model for alanine-dipeptide-implicit that the package ships ("alanine-dipeptide").
SHIPPED_MODEL = SHIPPED_MODELS["alanine-dipeptide"].path

#: The Timewarp flow for alanine-dipeptide-implicit that the package ships: internal coordinates, 2 coupling
#: blocks of width 32, tau = 5 ps, trained 15 min on one CPU core on pairs from MD with a learned torsion bias (its
#: metadata['training'] says how; benchmarks/README.md has the commands that remake it).
SHIPPED_TIMEWARP_MODEL = SHIPPED_MODELS["alanine-dipeptide-timewarp"].path

#: The settings :func:`make_shipped_model` passes to :func:`~openmm_confsample.bench.training.train_torsion_model`.
SHIPPED_MODEL_SETTINGS = {
    "data": "md+basin",
    "data_seconds": 120.0,
    "train_seconds": 120.0,
    "sample_every_steps": 20,
    "hidden": 32,
    "n_layers": 2,
    "n_steps": 10,
    "sampling_scale": 1.0,
    "uniform_weight": 0.1,
    "primary_fraction": 0.3,
    "seed": 0,
}


def alanine_basin_proposal(torsion_set: TorsionSet, kappa: float = 3.0, weights=None) -> VonMisesMixtureProposal:
    """A broad mixture over the known alanine-dipeptide basins (phi/psi torsion set)."""
    if len(torsion_set) != 2:
        raise ConfSampleError(f"alanine_basin_proposal needs the two torsions phi and psi, got {len(torsion_set)}.")
    return VonMisesMixtureProposal(torsion_set, np.deg2rad(ALANINE_BASINS_DEG), kappa, weights)


def basin_proposal(molsys: MolecularSystem, kappa: float = 3.0, weights=None) -> Proposal:
    """The non-learned baseline on ``molsys``'s phi/psi: :func:`alanine_basin_proposal`."""
    torsions = CollectiveVariables.for_system(molsys, ("phi", "psi"))
    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, torsions.quads, names=torsions.torsion_names)
    return alanine_basin_proposal(torsion_set, kappa=kappa, weights=weights)


def alanine_config() -> BenchmarkConfig:
    """phi/psi recorded; phi > 0 (primary), alpha_R and beta measured; the basin mixture as the baseline."""
    return BenchmarkConfig("alanine dipeptide", ALANINE_INDICATORS, PHI_POSITIVE.name, cvs=("phi", "psi"),
                           basin_proposal=basin_proposal, reference_settings=dict(REFERENCE_SETTINGS),
                           plot_torsions=("phi", "psi"))


def is_alanine(molsys: MolecularSystem) -> bool:
    """The registry's alanine dipeptides (by name)."""
    return molsys.name.startswith("alanine-dipeptide")


def make_shipped_model(out_path: str | None = None, into_package: bool = False, progress: bool = True,
                       **overrides) -> TrainingResult:
    """Remake the shipped model (about four minutes on two cores); returns the TrainingResult.

    Writes to ``out_path``; only ``into_package=True`` replaces the package's own :data:`SHIPPED_MODEL`
    (``python benchmarks/make_demo_model.py --into-package``). Settings: :data:`SHIPPED_MODEL_SETTINGS`
    with ``overrides``.
    """
    if into_package:
        if out_path is not None:
            raise ConfSampleError("pass either out_path or into_package=True, not both.")
        out_path = SHIPPED_MODEL
    elif out_path is None:
        raise ConfSampleError(f"make_shipped_model needs out_path (or into_package=True to replace {SHIPPED_MODEL}).")
    settings = {**SHIPPED_MODEL_SETTINGS, **overrides}
    return train_torsion_model(get_system("alanine-dipeptide-implicit"), out_path, alanine_config(),
                               progress=progress, **settings)
