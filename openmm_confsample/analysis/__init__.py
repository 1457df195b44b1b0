"""Analysis of samples: ESS, populations of states, free energies, JSD, TICA/MSM (deeptime); plots live in
``analysis.plots``.

Names are imported from their submodule on first use (PEP 562): the statistics do not load matplotlib
(``plots``) or deeptime (``kinetics``).
"""

import importlib as _importlib

_SUBMODULE = {
    "free_energy": ("RAMACHANDRAN_REGIONS", "basin_free_energy", "free_energy_1d", "free_energy_surface_2d",
                    "region_free_energies", "region_populations"),
    "kinetics": ("fit_tica", "implied_timescales", "tica_project", "torsion_features"),
    "populations": ("PopulationEstimate", "indicator_entries", "indicator_ess", "population_estimate"),
    "statistics": ("autocorrelation", "block_average_error", "bootstrap_error", "effective_sample_size",
                   "ess_per_second", "integrated_autocorrelation_time", "jensen_shannon_divergence"),
}
_WHERE = {name: module for module, names in _SUBMODULE.items() for name in names}
__all__ = ["plots", *_WHERE]


def __getattr__(name):
    if name == "plots":
        return _importlib.import_module(".plots", __name__)
    if name in _WHERE:
        return getattr(_importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
