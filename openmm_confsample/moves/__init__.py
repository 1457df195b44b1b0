"""The one MH engine, its proposals, and the adapters (openmmtools MCMCMove, Simulation reporter, replica exchange)."""

from .engine import MetropolisHastingsEngine, MoveResult, Proposal, ProposalBatch
from .mcmc import LearnedMCMCMove
from .proposals import GaussianDisplacementProposal, VonMisesMixtureProposal, VonMisesTorsionProposal
from .replica import LearnedMoveReplicaExchangeSampler
from .reporter import LearnedMoveReporter, apply_learned_move
from .timewarp import TimewarpMove, TimewarpProposal
from .torsion_diffusion import TorsionDiffusionMove, TorsionDiffusionProposal
from .torsion_resampling import TorsionResamplingProposal

__all__ = ["MetropolisHastingsEngine", "MoveResult", "Proposal", "ProposalBatch", "LearnedMCMCMove",
           "GaussianDisplacementProposal", "VonMisesMixtureProposal", "VonMisesTorsionProposal",
           "LearnedMoveReplicaExchangeSampler", "LearnedMoveReporter", "apply_learned_move",
           "TimewarpMove", "TimewarpProposal", "TorsionDiffusionMove", "TorsionDiffusionProposal",
           "TorsionResamplingProposal"]
