"""The one MH engine, its proposals, and the adapters (openmmtools MCMCMove, Simulation reporter, replica exchange).

Names are imported from their submodule on first use (PEP 562): ``from openmm_confsample.moves import
LearnedMoveReporter`` loads neither torch nor openmmtools, and ``TorsionDiffusionMove`` loads what it needs
(torch for its model, openmmtools for the MCMCMove it is) but not the Timewarp flow or replica exchange.
"""

import importlib as _importlib

_SUBMODULE = {
    "engine": ("MetropolisHastingsEngine", "MoveResult", "Proposal", "ProposalBatch"),
    "mcmc": ("LearnedMCMCMove",),
    "ncmc": ("NCMCEngine", "NCMCMove", "solute_diffusion_proposal"),
    "ncmc_protocol": ("SoluteDecoupling", "ParameterSoftening"),
    "proposals": ("GaussianDisplacementProposal", "VonMisesMixtureProposal", "VonMisesTorsionProposal"),
    "replica": ("LearnedMoveReplicaExchangeSampler",),
    "reporter": ("LearnedMoveReporter", "apply_learned_move"),
    "timewarp": ("TimewarpMove", "TimewarpProposal"),
    "torsion_diffusion": ("TorsionDiffusionMove", "TorsionDiffusionProposal"),
    "torsion_resampling": ("TorsionResamplingProposal",),
    "fragment": ("FragmentProposal", "FragmentMove"),
}
_WHERE = {name: module for module, names in _SUBMODULE.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
