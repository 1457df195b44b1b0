"""Torsion diffusion as an exact independence move.

The model proposes new values for the chosen torsions of the current structure; the move sets them by
rigid rotation and accepts with the independence-sampler rule

    min(1, exp(-(u' - u)) q(tau) / q(tau'))

No other factor enters: in bond-angle-torsion coordinates the Jacobian does not depend on the torsions,
and a rigid rotation of one side of a bond changes only its torsion (the exactness tests check this).

Proposals do not depend on the current state, so they and their log-densities are drawn in large
batches ahead of time (``buffer_size``); only the current state's log-density is evaluated afresh, and
not even that when the state is the last accepted proposal.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfSampleError
from ..geometry.torsions import TorsionSet
from ..models.torsion_diffusion import TorsionDiffusionModel
from ..systems import MolecularSystem
from . import model_cache
from .engine import Proposal, ProposalBatch
from .mcmc import LearnedMCMCMove
from .proposals import torsion_set_config, torsion_set_from_config


def _load(path):
    model = TorsionDiffusionModel.load(path)
    model.checkpoint_path = path
    return model


def check_model_matches_system(model: TorsionDiffusionModel, molecular_system: MolecularSystem, label: str) -> np.ndarray:
    """The model's torsions as a (k, 4) array, after checking they and the topology fit ``molecular_system``."""
    torsions = model.metadata.get("torsions") or []
    quads = np.array([t["atoms"] for t in torsions], dtype=int).reshape(-1, 4)
    if len(quads) != model.n_torsions:
        raise ConfSampleError(f"model {label} does not record its {model.n_torsions} torsion definitions.")
    fingerprint = model.metadata.get("topology_fingerprint")
    if fingerprint and fingerprint != molecular_system.fingerprint():
        raise ConfSampleError(
            f"model {label} was trained on another topology (fingerprint {fingerprint}) than system "
            f"'{molecular_system.name}' ({molecular_system.fingerprint()})."
        )
    if quads.max() >= molecular_system.n_atoms:
        raise ConfSampleError(f"model {label} torsions {quads.tolist()} do not fit the system's {molecular_system.n_atoms} atoms.")
    return quads


class TorsionDiffusionProposal(Proposal):
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

    cartesian = False

    def __init__(self, model, torsion_set: TorsionSet, buffer_size: int = 2048):
        if isinstance(model, str):
            self.model_key = model if model.startswith("memory:") else os.path.abspath(model)
            self.model = model_cache.get_model(self.model_key, _load)
        else:
            self.model = model
            self.model_key = model_cache.model_key(model, getattr(model, "checkpoint_path", None))
        if not isinstance(self.model, TorsionDiffusionModel):
            raise ConfSampleError(f"model must be a TorsionDiffusionModel, got {type(self.model).__name__}.")
        if len(torsion_set) != self.model.n_torsions:
            raise ConfSampleError(
                f"the model samples {self.model.n_torsions} torsions but the torsion set has {len(torsion_set)}."
            )
        if int(buffer_size) < 1:
            raise ConfSampleError(f"buffer_size must be at least 1, got {buffer_size}.")
        self.torsion_set = torsion_set
        self.buffer_size = int(buffer_size)
        self._angles = np.empty((0, len(torsion_set)))
        self._log_q = np.empty(0)
        self._cursor = 0
        self._last_angles = None
        self._last_log_q = None
        self.n_density_evaluations = 0

    @classmethod
    def for_system(cls, model, molecular_system: MolecularSystem, buffer_size: int = 2048):
        """Build from a model (or checkpoint path) and the system it was trained on, checking they match."""
        label = f"'{model}'" if isinstance(model, str) else "(in memory)"
        if isinstance(model, str):
            model = model_cache.get_model(os.path.abspath(model), _load)
        quads = check_model_matches_system(model, molecular_system, label)
        names = [t["name"] for t in model.metadata["torsions"]]
        torsion_set = TorsionSet(molecular_system.bonds, molecular_system.n_atoms, quads, names=names)
        return cls(model, torsion_set, buffer_size)

    def _draw(self, n: int, rng: np.random.Generator):
        if self._cursor + n > len(self._log_q):
            fresh_angles, fresh_log_q = self.model.sample(max(self.buffer_size, n), seed=int(rng.integers(2**63)),
                                                          strict=False)
            self._angles = np.concatenate([self._angles[self._cursor:], fresh_angles])
            self._log_q = np.concatenate([self._log_q[self._cursor:], fresh_log_q])
            self._cursor = 0
        angles = self._angles[self._cursor:self._cursor + n]
        log_q = self._log_q[self._cursor:self._cursor + n]
        self._cursor += n
        return angles, log_q

    def current_log_density(self, angles: np.ndarray) -> float:
        """log q of the current torsions; reuses the last accepted proposal's value when they are the same."""
        if self._last_angles is not None and np.allclose(angles, self._last_angles, rtol=0.0, atol=1e-9):
            return self._last_log_q
        self.n_density_evaluations += 1
        log_q = float(self.model.log_prob(angles))
        self._last_angles, self._last_log_q = angles.copy(), log_q
        return log_q

    def propose(self, positions_nm, n_proposals, rng):
        current = self.torsion_set.values(positions_nm)
        log_q_current = self.current_log_density(current)
        angles, log_q = self._draw(n_proposals, rng)
        batch = np.broadcast_to(positions_nm, (n_proposals,) + positions_nm.shape)
        positions = self.torsion_set.set_values(batch, angles)
        # a draw whose inversion failed has log_q = nan: the engine rejects it as non-finite
        return ProposalBatch(positions, log_q_current - log_q, info={"angles": angles, "log_q": log_q})

    def accepted(self, batch, index):
        self._last_angles = self.torsion_set.values(batch.positions[index])
        self._last_log_q = float(batch.info["log_q"][index])

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
    model : TorsionDiffusionModel or str
        The model or its checkpoint path.
    molecular_system : MolecularSystem
        The system the model was trained on (topology and torsions are checked).
    n_proposals : int, default 1
        MH steps per application, proposed together (cheap: proposals are pre-drawn).
    n_attempts : int, default 1
    buffer_size : int, default 2048
    seed : int, optional

    Examples
    --------
    >>> move = TorsionDiffusionMove("ala_diffusion.pt", get_system("alanine-dipeptide-implicit"))  # doctest: +SKIP
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=50), move])  # doctest: +SKIP
    """

    def __init__(self, model, molecular_system: MolecularSystem, n_proposals: int = 1, n_attempts: int = 1,
                 buffer_size: int = 2048, seed=None):
        proposal = TorsionDiffusionProposal.for_system(model, molecular_system, buffer_size)
        super().__init__(proposal, n_proposals=n_proposals, n_attempts=n_attempts, seed=seed)
