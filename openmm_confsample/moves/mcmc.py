"""Learned moves as openmmtools MCMC moves.

:class:`LearnedMCMCMove` wraps any :class:`~openmm_confsample.moves.engine.Proposal` in the
``openmmtools.mcmc.MCMCMove`` protocol. Unlike openmmtools' ``MetropolizedMove`` it includes the Hastings
term, so it is exact for asymmetric proposals. It works in ``MCMCSampler``, ``SequenceMove``,
``WeightedMove`` and as (part of) the ``mcmc_moves`` of openmmtools' multistate samplers, which deep-copy
and YAML-serialize moves: the state of a move is the proposal's config (models by path, never weights) plus
its statistics as plain numbers, and the state of its random generator. Saving a move (``__getstate__``)
draws nothing, so it never changes the chain's future; a deep copy gets a child stream spawned from its
parent (``Generator.spawn`` leaves the parent's own draws unchanged), so replicas do not share random numbers.

Restoring a stored move imports nothing named in the file: ``proposal_class`` must be one of the package's
own proposal classes (:data:`PROPOSAL_CLASSES`), looked up in that registry.
"""

from __future__ import annotations

import copy

import numpy as np
from openmmtools import mcmc

from ..checks import positive_int
from ..errors import ConfSampleError
from ..units import check_position_scale, kT_of
from .engine import MetropolisHastingsEngine, Proposal

#: The proposal classes a stored move may name (module path as written by ``__getstate__``). A stored
#: string is looked up here, never imported: a tampered storage file cannot make the package import code.
PROPOSAL_CLASSES = {
    "openmm_confsample.moves.proposals.VonMisesTorsionProposal": ("openmm_confsample.moves.proposals",
                                                                   "VonMisesTorsionProposal"),
    "openmm_confsample.moves.proposals.GaussianDisplacementProposal": ("openmm_confsample.moves.proposals",
                                                                        "GaussianDisplacementProposal"),
    "openmm_confsample.moves.proposals.VonMisesMixtureProposal": ("openmm_confsample.moves.proposals",
                                                                   "VonMisesMixtureProposal"),
    "openmm_confsample.moves.torsion_diffusion.TorsionDiffusionProposal": ("openmm_confsample.moves.torsion_diffusion",
                                                                            "TorsionDiffusionProposal"),
    "openmm_confsample.moves.timewarp.TimewarpProposal": ("openmm_confsample.moves.timewarp", "TimewarpProposal"),
    "openmm_confsample.moves.fragment.FragmentProposal": ("openmm_confsample.moves.fragment", "FragmentProposal"),
}


def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _registered_class(path: str):
    if path not in PROPOSAL_CLASSES:
        raise ConfSampleError(
            f"stored proposal class '{path}' is not one of the package's own proposals "
            f"({', '.join(sorted(name.rsplit('.', 1)[1] for name in PROPOSAL_CLASSES))}); refusing to restore it."
        )
    import importlib  # only registered module paths, never a file's string

    module, name = PROPOSAL_CLASSES[path]
    return getattr(importlib.import_module(module), name)


class LearnedMCMCMove(mcmc.MCMCMove):
    """An exact Metropolis-Hastings move driven by a (learned) proposal.

    Parameters
    ----------
    proposal : Proposal
        E.g. a ``TorsionDiffusionProposal``, ``TimewarpProposal`` or ``VonMisesTorsionProposal``.
    n_proposals : int, default 1
        MH steps per engine step, proposed in one batched model call (re-proposed after an acceptance).
    n_attempts : int, default 1
        Engine steps per ``apply``.
    seed : int, optional
    exploration_threshold_kT : float, optional
        Biased exploration mode instead of MH (see ``MetropolisHastingsEngine``); not exact.

    Examples
    --------
    Alternate Langevin dynamics with torsion jumps on alanine dipeptide:

    >>> from openmm import unit
    >>> from openmmtools import cache, mcmc
    >>> from openmm_confsample.systems import get_system
    >>> from openmm_confsample.geometry.torsions import TorsionSet
    >>> from openmm_confsample.moves.proposals import VonMisesTorsionProposal
    >>> ala = get_system("alanine-dipeptide-vacuum")
    >>> torsions = TorsionSet(ala.bonds, ala.n_atoms, ala.torsion_array)
    >>> move = LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=0.5), seed=1)
    >>> sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=50), move])
    >>> sampler = mcmc.MCMCSampler(ala.thermodynamic_state(), ala.sampler_state(), sequence)
    >>> sampler.run(n_iterations=2, context_cache=cache.ContextCache(platform=ala.create_context().getPlatform()))
    >>> move.statistics["n_proposed"]
    2
    """

    def __init__(self, proposal: Proposal, n_proposals: int = 1, n_attempts: int = 1, seed=None,
                 exploration_threshold_kT: float | None = None):
        super().__init__()
        self.n_attempts = positive_int(n_attempts, "n_attempts")
        self.engine = MetropolisHastingsEngine(proposal, n_proposals, seed, exploration_threshold_kT)

    @property
    def proposal(self) -> Proposal:
        return self.engine.proposal

    @property
    def statistics(self) -> dict:
        return self.engine.statistics

    @statistics.setter
    def statistics(self, value: dict) -> None:
        self.engine.statistics = value

    def reset_statistics(self) -> None:
        self.engine.reset_statistics()

    def apply(self, thermodynamic_state, sampler_state, context_cache=None):
        """Apply ``n_attempts`` MH steps to ``sampler_state`` (positions updated in place; velocities kept, except
        for engines that set them, e.g. NCMC: then the sampler state takes the Context's new velocities)."""
        context_cache = self._get_context_cache(context_cache)
        context, _ = context_cache.get_context(thermodynamic_state)
        if getattr(self, "_scale_checked_context", None) is not context:  # once per context: cheap
            check_position_scale(context.getSystem(), sampler_state.positions, "the sampler state's positions")
            self._scale_checked_context = context
        sampler_state.apply_to_context(context, ignore_velocities=True)
        kT = kT_of(thermodynamic_state)
        positions = energy = None
        for _ in range(self.n_attempts):
            result = self.engine.step(context, kT, positions, energy)
            positions, energy = result.positions_nm, result.potential_kJ
        sampler_state.update_from_context(context, ignore_velocities=not getattr(self.engine, "sets_velocities", False))

    # openmmtools deep-copies and YAML-serializes moves: state is config + plain-number statistics.
    def __getstate__(self):
        proposal = self.engine.proposal
        return {
            "proposal_class": _class_path(proposal),
            "proposal_config": proposal.get_config(),
            "n_proposals": self.engine.n_proposals,
            "n_attempts": self.n_attempts,
            "rng_state": self.engine.rng.bit_generator.state,
            "exploration_threshold_kT": self.engine.exploration_threshold_kT,
            "statistics": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.statistics.items()},
        }

    def __setstate__(self, serialization):
        proposal_class = _registered_class(serialization["proposal_class"])
        proposal = proposal_class.from_config(serialization["proposal_config"])
        self.n_attempts = positive_int(serialization["n_attempts"], "n_attempts")
        self.engine = self._engine_from_state(proposal, serialization)
        if "rng_state" in serialization:  # files written before this carry a plain seed instead
            self.engine.rng.bit_generator.state = serialization["rng_state"]
        self.engine.statistics = serialization.get("statistics", {})

    @staticmethod
    def _engine_from_state(proposal: Proposal, serialization: dict) -> MetropolisHastingsEngine:
        """The engine of a restored move (subclasses with another engine override this)."""
        return MetropolisHastingsEngine(proposal, serialization["n_proposals"], serialization.get("seed"),
                                        serialization.get("exploration_threshold_kT"))

    def __deepcopy__(self, memo):
        clone = type(self).__new__(type(self))
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        clone.engine.rng = self.engine.rng.spawn(1)[0]
        return clone
