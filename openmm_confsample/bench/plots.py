"""The comparison's figures: a 2-D free-energy map of two torsions, a 1-D profile and TIC 0, one panel per run."""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from ..analysis.plots import plot_free_energy_1d, plot_ramachandran_comparison, plot_tica
from .samplers import SamplerRun
from .summary import tica_model, tic0

__all__ = ["plot_comparison"]


def plot_comparison(runs: Sequence[SamplerRun], reference, out_dir: str, torsions: Sequence[str],
                    tica_lagtime: int = 1) -> dict[str, str]:
    """Write ``ramachandran.png`` (the map of ``torsions[0]``/``torsions[1]``), ``free_energy_<first>.png``
    and ``tic0.png`` into ``out_dir``; returns name -> path.

    ``torsions`` names one or two recorded torsions (``BenchmarkConfig.torsion_pair``); with one, the map
    is left out. Reweighted runs (learned bias) are drawn with their weights: the unbiased estimate, not the
    biased frames.
    """
    os.makedirs(out_dir, exist_ok=True)
    runs = list(runs)
    everything = ([reference.run] if reference is not None else []) + runs
    torsions = list(torsions)
    paths = {}
    if len(torsions) >= 2:
        first, second = torsions[:2]
        paths["ramachandran"] = os.path.join(out_dir, "ramachandran.png")
        plot_ramachandran_comparison({r.method: _weighted(r, r.cvs[first], r.cvs[second]) for r in everything},
                                     path=paths["ramachandran"], bins=36)  # colour scale fitted to the data
    if torsions:
        first = torsions[0]
        key = f"free_energy_{re.sub(r'[^A-Za-z0-9_.-]+', '_', first)}"
        paths[key] = os.path.join(out_dir, f"{key}.png")
        plot_free_energy_1d({r.method: _weighted(r, np.degrees(r.cvs[first])) for r in everything},
                            bins=np.linspace(-180, 180, 37), xlabel=f"{first} (deg)", path=paths[key])
    tica, names = tica_model(reference, runs, tica_lagtime)
    # plot_tica takes no weights: a reweighted run would show its biased profile, so it is left out
    projections = {}
    for r in everything:
        projection = tic0(tica, names, r) if r.weights is None else None
        if projection is not None:
            projections[r.method] = projection[:, None]
    if projections:
        paths["tic0"] = os.path.join(out_dir, "tic0.png")
        plot_tica(projections, path=paths["tic0"], bins=40)
    return paths


def _weighted(run: SamplerRun, *values):
    """``values`` as the plots take them: a tuple with the run's weights appended when it has any."""
    packed = values if run.weights is None else values + (run.weights,)
    return packed if len(packed) > 1 else packed[0]
