"""The benchmark harness: budgeted samplers, an exact reference, training, the summary tables and the demo.

How much equilibrium sampling does a wall-clock second buy? Every sampler runs for the same wall budget and
records named collective variables (by default the system's torsions); the summary measures the population,
free energy and ESS per second of indicators the caller names. The alanine dipeptide is one configuration::

    from openmm_confsample.bench import (alanine_config, method_table, run_reference, summarize,
                                         markdown_table)
    config = alanine_config()
    ala = get_system("alanine-dipeptide-implicit")
    reference = run_reference(ala, 300, config, cache_path="benchmarks/cache/ala_reference.npz")
    runs = [runner(60) for runner in method_table(ala, config, torsion_model=SHIPPED_MODEL).values()]
    print(markdown_table(summarize(runs, config.indicators, reference)))

Modules: :mod:`.observables` (collective variables, indicators), :mod:`.samplers` (MD, MD + moves,
parallel tempering), :mod:`.config` (what a benchmark measures; the table of methods), :mod:`.reference`,
:mod:`.training`, :mod:`.summary`, :mod:`.plots`, :mod:`.alanine` (the alanine-dipeptide configuration and
shipped model) and :mod:`.demo`.
"""

import importlib

# Names are loaded from their submodule on first use (PEP 562): importing one light submodule (say
# .observables for the CLI's summaries) must not pull in torch, openmmtools and matplotlib through the others.
_SUBMODULE = {
    "alanine": ("ALANINE_BASINS_DEG", "SHIPPED_MODEL", "SHIPPED_MODEL_SETTINGS", "SHIPPED_TIMEWARP_MODEL",
                "alanine_basin_proposal", "alanine_config", "basin_proposal", "make_shipped_model"),
    "config": ("BenchmarkConfig", "default_config", "method_table"),
    "demo": ("config_for_system", "run_demo"),
    "observables": ("CollectiveVariables", "Indicator", "above", "angle_range", "positive", "sign_indicators",
                    "torsion_box"),
    "plots": ("plot_comparison",),
    "reference": ("ReferenceEstimate", "run_reference"),
    "samplers": ("SamplerRun", "run_md_with_moves", "run_parallel_tempering", "run_plain_md"),
    "summary": ("PopulationEstimate", "indicator_entries", "indicator_ess", "markdown_table", "population_estimate",
                "populations_table", "summarize"),
    "training": ("TrainingResult", "train_learned_bias", "train_torsion_model"),
}
_WHERE = {name: module for module, names in _SUBMODULE.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
