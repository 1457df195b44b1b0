"""Torsion diffusion as an exact independence move: the torsion-resampling proposal filled by a
:class:`~openmm_confsample.models.torsion_diffusion.TorsionDiffusionModel` loaded from its checkpoint.

The proposal itself (:class:`~openmm_confsample.moves.torsion_resampling.TorsionResamplingProposal`) uses
only the density protocol; this module adds what a stored move needs (the model by path, the torsions as
plain lists) and the check that a model fits the system it is used on. The model returns every draw with
a log q that its ``log_prob`` reproduces, or refuses it (log q = NaN, rejected before any energy).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import ConfSampleError
from ..geometry.torsions import TorsionSet
from ..models.shipped import resolve_model_path
from ..models.torsion_diffusion import TorsionDiffusionModel
from ..systems import MolecularSystem, as_molecular_system
from . import model_cache
from .mcmc import LearnedMCMCMove
from .proposals import torsion_set_config, torsion_set_from_config
from .torsion_resampling import TorsionResamplingProposal


def _load(path):
    model = TorsionDiffusionModel.load(path)
    model.checkpoint_path = path
    return model


#: (model, system) pairs already told that the model was trained without the system's solvent.
_TOLD = set()


def check_model_matches_system(model: TorsionDiffusionModel, molecular_system: MolecularSystem,
                               label: str) -> np.ndarray:
    """The model's torsions as a (k, 4) array of ``molecular_system``'s atoms, after checking they fit it.

    A model trained on this very system, or on its solute alone (a solvated system whose solute has the
    model's atoms and bonds: trained in vacuum or implicit solvent), fits; the second case is said once (a
    ``UserWarning``): the MH test keeps the move exact whatever the model learned, only its acceptance may be
    lower in water. Any other topology is refused.
    """
    torsions = model.metadata.get("torsions") or []
    quads = np.array([t["atoms"] for t in torsions], dtype=int).reshape(-1, 4)
    if len(quads) != model.n_torsions:
        raise ConfSampleError(f"model {label} does not record its {model.n_torsions} torsion definitions.")
    atoms = np.arange(molecular_system.n_atoms)
    fingerprint = model.metadata.get("topology_fingerprint")
    if fingerprint and fingerprint != molecular_system.fingerprint():
        solvated = molecular_system.system.usesPeriodicBoundaryConditions()
        atoms = molecular_system.solute_atoms if solvated else atoms
        if len(atoms) == molecular_system.n_atoms or fingerprint != molecular_system.fingerprint(atoms):
            raise ConfSampleError(
                f"model {label} was trained on another topology (fingerprint {fingerprint}) than system "
                f"'{molecular_system.name}' ({molecular_system.fingerprint()}"
                + (f", its solute {molecular_system.fingerprint(atoms)}" if len(atoms) < molecular_system.n_atoms
                   else "") + ").")
        key = (label, fingerprint, molecular_system.name)
        if key not in _TOLD:
            _TOLD.add(key)
            warnings.warn(f"model {label} was trained on '{model.metadata.get('system', 'the solute alone')}', "
                          f"without the water of '{molecular_system.name}': allowed (the MH test keeps the move "
                          "exact), but its proposals may fit the solvated ensemble less well.", stacklevel=3)
    if len(quads) and quads.max() >= len(atoms):
        raise ConfSampleError(
            f"model {label} torsions {quads.tolist()} do not fit the system's {len(atoms)} "
            f"{'atoms' if len(atoms) == molecular_system.n_atoms else 'solute atoms'}."
        )
    return atoms[quads]


class TorsionDiffusionProposal(TorsionResamplingProposal):
    """Independence proposal from a :class:`TorsionDiffusionModel` over a set of torsions.

    Parameters
    ----------
    model : TorsionDiffusionModel or str
        A model, or the path of its checkpoint (loaded once per process).
    torsion_set : TorsionSet
        The torsions the model's angles are set on, in the model's order.
    buffer_size : int, default 2048
        Proposals drawn (with their log-densities) per model call.
    """

    def __init__(self, model, torsion_set: TorsionSet, buffer_size: int = 2048):
        if isinstance(model, (str, os.PathLike)) and not os.fspath(model).startswith("memory:"):
            model = resolve_model_path(model, kind="diffusion")
        model, self.model_key = model_cache.resolve(model, _load)
        if not isinstance(model, TorsionDiffusionModel):
            raise ConfSampleError(f"model must be a TorsionDiffusionModel, got {type(model).__name__}.")
        super().__init__(model, torsion_set, buffer_size)

    @property
    def model(self) -> TorsionDiffusionModel:
        return self.density

    def _sample(self, n: int, generator):
        # Refused draws come back with log q = NaN (rejected by the engine) instead of raising mid-chain.
        return self.density.sample_and_log_prob(n, generator, strict=False)

    @classmethod
    def for_system(cls, model, molecular_system: MolecularSystem, buffer_size: int = 2048):
        """Build from a model (or checkpoint path) and the system it was trained on, checking they match."""
        label = f"'{os.fspath(model)}'" if isinstance(model, (str, os.PathLike)) else "(in memory)"
        if isinstance(model, (str, os.PathLike)):
            model = model_cache.get_model(os.path.abspath(resolve_model_path(model, kind="diffusion")), _load)
        quads = check_model_matches_system(model, molecular_system, label)
        names = [t["name"] for t in model.metadata["torsions"]]
        torsion_set = TorsionSet(molecular_system.bonds, molecular_system.n_atoms, quads, names=names)
        return cls(model, torsion_set, buffer_size)

    def get_config(self):
        return {"model": self.model_key, **torsion_set_config(self.torsion_set), "buffer_size": self.buffer_size}

    @classmethod
    def from_config(cls, config):
        model = model_cache.get_model(config["model"], _load)
        return cls(model, torsion_set_from_config(config), config["buffer_size"])


class TorsionDiffusionMove(LearnedMCMCMove):
    """openmmtools MCMC move that resamples torsions from a torsion diffusion model (exact MH).

    Parameters
    ----------
    model : str, path or TorsionDiffusionModel
        A shipped model's name (``"alanine-dipeptide"``; ``confsample models`` lists them), a checkpoint path,
        or a model.
    system : openmm.app.Simulation or MolecularSystem
        What the move acts on: a Simulation (its System, Topology and positions; temperature from its
        integrator) or a MolecularSystem. The model's topology and torsions are checked against it.
    n_proposals : int, default 1
        MH steps per application, proposed together (cheap: proposals are pre-drawn).
    n_attempts : int, default 1
    buffer_size : int, default 2048
    seed : int, optional
    temperature : float K or Quantity, optional
        Only for a Simulation whose integrator has no temperature.

    Examples
    --------
    The one line added to an OpenMM script (``simulation`` is the script's ``openmm.app.Simulation``):

    >>> simulation.reporters.append(LearnedMoveReporter(TorsionDiffusionMove("alanine-dipeptide", simulation),
    ...                                                 interval=500))  # doctest: +SKIP

    In openmmtools:

    >>> move = TorsionDiffusionMove("alanine-dipeptide", get_system("alanine-dipeptide-implicit"))  # doctest: +SKIP
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=50), move])  # doctest: +SKIP
    """

    def __init__(self, model, system, n_proposals: int = 1, n_attempts: int = 1, buffer_size: int = 2048,
                 seed=None, temperature=None):
        molecular_system = as_molecular_system(system, temperature)
        proposal = TorsionDiffusionProposal.for_system(model, molecular_system, buffer_size)
        super().__init__(proposal, n_proposals=n_proposals, n_attempts=n_attempts, seed=seed)
