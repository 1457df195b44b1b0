"""An exact, independent reference for the comparison: MD with broad torsion moves, cached to an .npz.

:func:`run_reference` runs :func:`~openmm_confsample.bench.samplers.run_md_with_moves` with the
configuration's broad basin proposal (an exact MH independence proposal, e.g. a von Mises mixture over
known basins) so that the chain crosses between the states of interest many times per second, and
estimates every indicator's population and free energy with a block-averaging error::

    reference = run_reference(molsys, 300, alanine_config(), cache_path="benchmarks/cache/ala_reference.npz")
    reference.estimate.p, reference.estimate.delta_f_kT     # the primary indicator
    reference.estimates["alpha_R"].p                        # any other
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from ..checks import positive_float
from ..errors import ConfSampleError
from ..systems import MolecularSystem
from .config import BenchmarkConfig
from .samplers import SamplerRun, plain, run_md_with_moves
from .summary import PopulationEstimate, population_estimate

__all__ = ["ReferenceEstimate", "run_reference"]


@dataclass
class ReferenceEstimate:
    """Exact, independent estimates of every indicator's population, with block-averaging errors.

    Attributes
    ----------
    run : SamplerRun
        The samples (used for JSD and the TICA fit).
    estimates : dict indicator name -> PopulationEstimate
        P, its error, Delta F = F(in) - F(out) in kT and its error.
    primary : str
        The indicator the properties below refer to.
    settings : dict
    from_cache : bool
    cache_path : str or None
    """

    run: SamplerRun
    estimates: dict
    primary: str
    settings: dict
    from_cache: bool = False
    cache_path: str | None = None

    @property
    def estimate(self) -> PopulationEstimate:
        """The primary indicator's estimate (``reference.estimate.p``, ``.delta_f_kT``, ...)."""
        return self.estimates[self.primary]

    def to_dict(self) -> dict:
        return {
            "primary": self.primary,
            **self.estimate.to_dict(),
            "estimates": {name: est.to_dict() for name, est in self.estimates.items()},
            "n_samples": self.run.n_samples,
            "wall_seconds": self.run.wall_seconds,
            "acceptance": plain(self.run.acceptance),
            "settings": plain(self.settings),
            "from_cache": self.from_cache,
            "cache_path": self.cache_path,
        }


def run_reference(molsys: MolecularSystem, wall_seconds: float, config: BenchmarkConfig, seed: int = 12345,
                  cache_path: str | None = None, settings: dict | None = None,
                  progress: bool = False) -> ReferenceEstimate:
    """Exact estimates of ``config``'s indicators from MD with its broad basin moves, cached to .npz.

    Parameters
    ----------
    wall_seconds : float, s
    config : BenchmarkConfig
        Its ``basin_proposal`` makes the moves, its ``reference_settings`` the segments (MD steps, moves and
        candidates per segment, ``proposal`` options, ``n_blocks`` of the errors), its ``cvs`` what is recorded.
    seed : int
        Use a seed no benchmarked run uses, so the reference is independent.
    cache_path : str, optional
        An .npz written after the run (temporary file, then rename) and reused by later calls with the same
        system fingerprint, temperature, seed, settings and indicators and at least the requested budget.
    settings : dict, optional
        Overrides of ``config.reference_settings``.
    """
    wall_seconds = positive_float(wall_seconds, "wall_seconds")
    if config.basin_proposal is None:
        raise ConfSampleError(f"benchmark configuration '{config.name}' has no basin_proposal; the reference needs "
                              "an exact, broad proposal for the system.")
    options = {**config.reference_settings, **(settings or {})}
    names = [i.name for i in config.indicators]
    key = {"system": molsys.name, "fingerprint": molsys.fingerprint(), "temperature_K": molsys.temperature_K,
           "seed": int(seed), "indicators": names, **plain(options)}
    if cache_path and os.path.isfile(cache_path):
        cached = _load_reference(cache_path, key, wall_seconds, config.primary_name)
        if cached is not None:
            return cached
    proposal = config.basin_proposal(molsys, **options.get("proposal", {}))
    run = run_md_with_moves(molsys, proposal, wall_seconds, options["md_steps_per_segment"],
                            options["moves_per_segment"], options["n_proposals"], seed=seed, method="reference",
                            progress=progress, cvs=config.cvs)
    run.check()
    estimates = {i.name: population_estimate(run.indicator(i), n_blocks=int(options["n_blocks"]))
                 for i in config.indicators}
    estimate = ReferenceEstimate(run, estimates, config.primary_name, {**key, "wall_seconds": run.wall_seconds},
                                 False, cache_path)
    if cache_path:
        _save_reference(cache_path, estimate)
    return estimate


def _save_reference(path: str, estimate: ReferenceEstimate) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    run = estimate.run
    tmp = os.path.join(directory, f".{os.path.basename(path)}.partial.npz")
    arrays = {f"cv_{i}": run.cvs[name] for i, name in enumerate(run.cvs)}
    np.savez_compressed(tmp, sample_times=run.sample_times, cv_names=json.dumps(list(run.cvs)),
                        settings=json.dumps(plain(estimate.settings), sort_keys=True),
                        summary=json.dumps({**estimate.to_dict(), "run": run.to_dict()}, sort_keys=True), **arrays)
    os.replace(tmp, path)


def _load_reference(path: str, key: dict, wall_seconds: float, primary: str) -> ReferenceEstimate | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            summary = json.loads(str(data["summary"]))
            names = json.loads(str(data["cv_names"]))
            cvs = {name: data[f"cv_{i}"] for i, name in enumerate(names)}
            times = data["sample_times"]
    except Exception as exc:  # a corrupt, foreign or older file: recompute rather than fail
        logging.getLogger(__name__).warning("reference cache %s unreadable (%s); recomputing", path, exc)
        return None
    same = all(settings.get(k) == v for k, v in plain(key).items())
    if not same or settings.get("wall_seconds", 0.0) < 0.95 * wall_seconds:
        return None
    info = summary["run"]
    run = SamplerRun("reference", cvs, info["wall_seconds"], info["n_energy_evaluations"], info["acceptance"],
                     info["exact"], None, times, info["settings"], info["angle_names"])
    estimates = {name: PopulationEstimate(**est) for name, est in summary["estimates"].items()}
    return ReferenceEstimate(run, estimates, primary, settings, True, path)
