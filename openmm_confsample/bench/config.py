"""What a benchmark measures on a system, and the table of methods it compares.

A :class:`BenchmarkConfig` names the collective variables the samplers record, the indicators the summary
measures (one of them primary: its ESS per second is the figure of merit), and, where the system has known
basins, a broad exact proposal over them (the 'MD+VonMises basins' baseline, the reference sampler and
basin-crossing training data). :func:`default_config` serves any system with named torsions: it records
them all and measures each torsion's sign. The alanine dipeptide is one configuration
(:func:`openmm_confsample.bench.alanine.alanine_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import ConfSampleError
from ..systems import MolecularSystem
from .observables import CollectiveVariables, Indicator, sign_indicators
from .samplers import SamplerRun, run_md_with_moves, run_parallel_tempering, run_plain_md

__all__ = ["BenchmarkConfig", "default_config", "method_table", "DEFAULT_REFERENCE_SETTINGS"]

#: Segments of the reference sampler: MD steps, moves and candidates per segment, the basin proposal's
#: options and the blocks of the error estimate.
DEFAULT_REFERENCE_SETTINGS = {"proposal": {}, "md_steps_per_segment": 10, "moves_per_segment": 4, "n_proposals": 1,
                              "n_blocks": 20}


@dataclass
class BenchmarkConfig:
    """The collective variables, indicators and baseline proposal of a benchmark on one kind of system.

    Attributes
    ----------
    name : str
    indicators : sequence of Indicator
        What the summary measures.
    primary : str, optional
        Name of the indicator whose ESS/s is compared (default the first).
    cvs : optional
        What the samplers record (see :meth:`CollectiveVariables.for_system`; None: all named torsions).
    basin_proposal : callable ``(molsys, **options) -> Proposal``, optional
        A broad, exact proposal over known basins; None where none is known.
    reference_settings : dict
        Settings of :func:`~openmm_confsample.bench.reference.run_reference`.
    plot_torsions : (str, str), optional
        The torsion pair drawn as a 2-D free-energy map (default the first two recorded torsions).
    """

    name: str
    indicators: Sequence[Indicator]
    primary: str | None = None
    cvs: object = None
    basin_proposal: Callable | None = None
    reference_settings: dict = field(default_factory=lambda: dict(DEFAULT_REFERENCE_SETTINGS))
    plot_torsions: tuple | None = None

    def __post_init__(self):
        self.indicators = tuple(self.indicators)
        names = [i.name for i in self.indicators]
        if not names:
            raise ConfSampleError(f"benchmark configuration '{self.name}' has no indicators.")
        if len(set(names)) != len(names):
            raise ConfSampleError(f"indicator names must be unique, got {names}.")
        if self.primary is not None and self.primary not in names:
            raise ConfSampleError(f"primary indicator '{self.primary}' is not among the indicators {names}.")

    @property
    def primary_name(self) -> str:
        return self.primary or self.indicators[0].name

    @property
    def primary_indicator(self) -> Indicator:
        return next(i for i in self.indicators if i.name == self.primary_name)

    def recorded(self, molsys: MolecularSystem) -> CollectiveVariables:
        """The collective variables recorded on ``molsys``."""
        return CollectiveVariables.for_system(molsys, self.cvs)

    def torsion_pair(self, molsys: MolecularSystem) -> tuple:
        """The two torsions of the 2-D maps (``plot_torsions`` or the first two recorded; () with fewer)."""
        if self.plot_torsions is not None:
            return tuple(self.plot_torsions)
        names = self.recorded(molsys).torsion_names
        return tuple(names[:2]) if len(names) >= 2 else ()


def default_config(molsys: MolecularSystem, torsions: Sequence[str] | None = None) -> BenchmarkConfig:
    """Any system: record its named torsions (or ``torsions``) and measure each one's sign (the first is primary)."""
    recorded = CollectiveVariables.for_system(molsys, torsions)
    return BenchmarkConfig(f"{molsys.name} torsions", sign_indicators(recorded.torsion_names), cvs=torsions)


def method_table(molsys: MolecularSystem, config: BenchmarkConfig, torsion_model: str | None = None,
                 timewarp_model: str | None = None, md_steps_per_segment: int = 10, moves_per_segment: int = 4,
                 n_proposals: int = 1, pt_learned: bool = False, pt_moves_per_iteration: int = 40,
                 learned_bias: str | None = None,
                 timewarp_n_proposals: int = 16) -> dict[str, Callable[..., SamplerRun]]:
    """name -> ``runner(wall_seconds, seed, progress)`` for every method the benchmark compares.

    'MD' and 'PT' are always present; 'MD+VonMises basins' when ``config`` has a basin proposal;
    'MD+TorsionDiffusionMove' (and, with ``pt_learned``, 'PT+TorsionDiffusionMove': ``pt_moves_per_iteration``
    learned MH steps after each replica's 500 MD steps) when ``torsion_model`` is given; 'MD+TimewarpMove'
    when ``timewarp_model`` is given (imported only then, so the benchmark never depends on it otherwise);
    'MD+learned bias' (plain MD with the saved :class:`~openmm_confsample.bias.LearnedTorsionBias` at
    ``learned_bias``, reweighted) when that path is given. Move methods share ``md_steps_per_segment``,
    ``moves_per_segment`` and ``n_proposals``, except Timewarp: one engine step of ``timewarp_n_proposals``
    MH steps (one batched flow call, plus one per acceptance) per segment: ~1.2 ms per proposal for the
    shipped 2-block flow at 5.7 % acceptance, ~2 ms for a 4-block one of width 64 (64 candidates per call:
    2.3 ms). Every run records ``config.cvs``.
    """
    segment = {"md_steps_per_segment": md_steps_per_segment, "moves_per_segment": moves_per_segment,
               "n_proposals": n_proposals}
    cvs = config.cvs
    table: dict[str, Callable[..., SamplerRun]] = {
        "MD": lambda wall_seconds, seed=0, progress=False: run_plain_md(
            molsys, wall_seconds, seed=seed, method="MD", progress=progress, cvs=cvs),
    }
    if config.basin_proposal is not None:
        table["MD+VonMises basins"] = lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, config.basin_proposal(molsys), wall_seconds, seed=seed, method="MD+VonMises basins",
            progress=progress, cvs=cvs, **segment)
    table["PT"] = lambda wall_seconds, seed=0, progress=False: run_parallel_tempering(
        molsys, wall_seconds, seed=seed, method="PT", progress=progress, cvs=cvs, indicators=config.indicators)
    if torsion_model is not None:
        # Deferred: the torsion model pulls in torch, which the MD-only and PT-only tables never need.
        from ..moves.torsion_diffusion import TorsionDiffusionMove, TorsionDiffusionProposal

        table["MD+TorsionDiffusionMove"] = lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, TorsionDiffusionProposal.for_system(torsion_model, molsys), wall_seconds, seed=seed,
            method="MD+TorsionDiffusionMove", progress=progress, cvs=cvs, **segment)
        if pt_learned:
            table["PT+TorsionDiffusionMove"] = lambda wall_seconds, seed=0, progress=False: run_parallel_tempering(
                molsys, wall_seconds, seed=seed, method="PT+TorsionDiffusionMove", progress=progress, cvs=cvs,
                indicators=config.indicators,
                learned_move=TorsionDiffusionMove(torsion_model, molsys, n_proposals=n_proposals,
                                                  n_attempts=pt_moves_per_iteration, seed=seed + 101))
    if learned_bias is not None:
        table["MD+learned bias"] = lambda wall_seconds, seed=0, progress=False: run_plain_md(
            molsys, wall_seconds, seed=seed, method="MD+learned bias", progress=progress, bias=learned_bias, cvs=cvs)
    if timewarp_model is not None:
        timewarp_segment = {**segment, "n_proposals": timewarp_n_proposals, "moves_per_segment": 1}
        table["MD+TimewarpMove"] = lambda wall_seconds, seed=0, progress=False: run_md_with_moves(
            molsys, _timewarp_proposal(timewarp_model, molsys), wall_seconds, seed=seed, method="MD+TimewarpMove",
            progress=progress, cvs=cvs, **timewarp_segment)
    return table


def _timewarp_proposal(model_path: str, molsys: MolecularSystem):
    """The Timewarp slot: a TimewarpProposal from ``model_path`` (the module is imported only here)."""
    try:
        from ..moves.timewarp import TimewarpProposal
    except ImportError as exc:
        raise ConfSampleError(f"a Timewarp model was given ({model_path}) but moves.timewarp cannot be imported: "
                              f"{exc}") from exc
    return TimewarpProposal(model_path, molsys)
