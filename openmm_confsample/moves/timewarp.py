"""Timewarp: conditional-flow proposals x(t) -> x(t + tau), exact MH in the augmented space.

The flow draws y = (x', v') ~ p(. | x) through the conditional density protocol
(``model.sample_and_log_prob(x, n, generator=rng)``: one numpy generator drives the whole chain), with
auxiliary velocities v' in the latent's units. Before each step a fresh v ~ N(0, I) is drawn for the current
state (a Gibbs refresh: the target is pi(x) N(v)), and the candidate is accepted with

    min(1, exp(-(u(x') - u(x)) - (K(v') - K(v)) + log p(x, v | x') - log p(x', v' | x))),   K(v) = |v|^2 / 2,

the reverse density coming from a full inverse pass of the flow conditioned on x'. Candidates that flip
the chirality of a stereocentre are refused (the criterion is symmetric in x and x', so the move stays exact
on the current stereoisomer). Systems with constraints are refused: the flow moves every atom freely.

A flow in internal coordinates (``config.coordinates='internal'``) keeps the pose of x and moves on that
fibre; its ``log_prob`` already holds the Jacobian term, so the same acceptance rule is exact there. Its draws
outside the support (a torsion change of pi or more, a negative bond length) come back as NaN and are
rejected without an energy evaluation; the reverse move of any accepted one is inside the support.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfSampleError
from ..geometry.chirality import chirality_signs, find_stereocentres
from ..models.shipped import resolve_model_path
from ..models.timewarp import AugmentedState, TimewarpModel
from ..systems import MolecularSystem, as_molecular_system
from . import model_cache
from .engine import Proposal, ProposalBatch
from .mcmc import LearnedMCMCMove


class TimewarpProposal(Proposal):
    """State-dependent Cartesian proposal from a :class:`TimewarpModel`.

    Parameters
    ----------
    model : TimewarpModel or str
        The model or its checkpoint path (loaded once per process).
    molecular_system : MolecularSystem, optional
        Checked against the model (atom count, labels, fingerprint) and for constraints; its
        stereocentres are found with RDKit when ``stereocentres`` is not given.
    stereocentres : (m, 4) int, optional
        Centre and three neighbours of each stereocentre; ``[]`` disables the chirality check.
    """

    cartesian = True

    def __init__(self, model, molecular_system: MolecularSystem | None = None, stereocentres=None):
        if isinstance(model, (str, os.PathLike)) and not os.fspath(model).startswith("memory:"):
            model = resolve_model_path(model, kind="timewarp")
        self.model, self.model_key = model_cache.resolve(model, TimewarpModel.load)
        if not isinstance(self.model, TimewarpModel):
            raise ConfSampleError(f"model must be a TimewarpModel, got {type(self.model).__name__}.")
        if molecular_system is not None:
            self.model.check_compatible(molecular_system)
            self.check_system(molecular_system.system)
            if stereocentres is None:
                stereocentres = find_stereocentres(molecular_system.topology, molecular_system.positions_nm)
        self.stereocentres = np.asarray([] if stereocentres is None else stereocentres, dtype=int).reshape(-1, 4)

    def propose(self, positions_nm, n_proposals, rng):
        y, log_p_forward = self.model.sample_and_log_prob(positions_nm, n_proposals, generator=rng)
        x_new = y.x
        v_current = rng.standard_normal(x_new.shape)
        # A flow in internal coordinates returns NaN for draws outside its support (a torsion change of pi or
        # more, a negative bond): those are rejected proposals, never evaluated.
        inside = np.all(np.isfinite(x_new), axis=(1, 2)) & np.isfinite(log_p_forward)
        x_new[~inside] = positions_nm
        log_correction = np.zeros(len(x_new))
        if inside.any():
            # The reverse move: from x' back to the current state x with its fresh velocities.
            reverse = AugmentedState(np.broadcast_to(positions_nm, x_new[inside].shape), v_current[inside])
            log_p_reverse = self.model.log_prob(x_new[inside], reverse)
            kinetic_change = 0.5 * (np.square(y.v[inside]).sum(axis=(1, 2))
                                    - np.square(v_current[inside]).sum(axis=(1, 2)))
            log_correction[inside] = -kinetic_change + log_p_reverse - log_p_forward[inside]
        valid = None if inside.all() else inside
        if len(self.stereocentres):
            same = np.all(chirality_signs(x_new, self.stereocentres) == chirality_signs(positions_nm, self.stereocentres),
                          axis=-1)
            valid = same if valid is None else valid & same
        return ProposalBatch(x_new, log_correction, valid)

    def get_config(self):
        return {"model": self.model_key, "stereocentres": self.stereocentres.tolist()}

    @classmethod
    def from_config(cls, config):
        return cls(config["model"], stereocentres=config["stereocentres"])


class TimewarpMove(LearnedMCMCMove):
    """openmmtools MCMC move proposing x(t + tau) from a Timewarp flow, exact MH in the augmented space.

    Parameters
    ----------
    model : str, path or TimewarpModel
        A shipped model's name (``"alanine-dipeptide-timewarp"``), a checkpoint path, or a model.
    system : openmm.app.Simulation or MolecularSystem
        What the move acts on (a Simulation: its System, Topology, positions and integrator's temperature);
        checked against the model. The flow moves every atom, so the System must have no constraints.
    n_proposals : int, default 1
        MH steps per application, proposed in one batched flow call (re-proposed after an acceptance).
    exploration_threshold_kT : float, optional
        Biased exploration mode (no MH; accept unless the energy rises by more than this): NOT exact.
    seed : int, optional
    temperature : float K or Quantity, optional
        Only for a Simulation whose integrator has no temperature.

    Examples
    --------
    >>> simulation.reporters.append(LearnedMoveReporter(TimewarpMove("alanine-dipeptide-timewarp", simulation,
    ...                                                              n_proposals=16), interval=500))  # doctest: +SKIP
    """

    def __init__(self, model, system, n_proposals: int = 1, n_attempts: int = 1, seed=None,
                 exploration_threshold_kT: float | None = None, temperature=None):
        proposal = TimewarpProposal(model, as_molecular_system(system, temperature))
        super().__init__(proposal, n_proposals=n_proposals, n_attempts=n_attempts, seed=seed,
                         exploration_threshold_kT=exploration_threshold_kT)
