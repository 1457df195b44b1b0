"""The comparison: ESS per second, populations and free energies of named indicators, and their tables.

For every run and every :class:`~openmm_confsample.bench.observables.Indicator` the caller names,
:func:`summarize` gives the population P with a block-averaging error, the free energy
Delta F = F(in) - F(out) = -ln(P / (1 - P)) in kT, the number of entries into the state, and the effective
sample size of the indicator's time series (:func:`indicator_ess`). One indicator is the primary one: its
ESS per second is the figure of merit, and the ``ratio_vs_md`` / ``ratio_vs_pt`` columns divide it by the
MD and parallel-tempering runs' values. A ratio is a measurement only where both runs entered the state at
least ``min_entries`` times; otherwise it is a bound ('≤' / '≥', when one run never entered the state and
its ESS is an upper bound) or not measurable. TICA (deeptime, through :mod:`openmm_confsample.analysis.kinetics`)
on the recorded torsions gives a second, state-free observable (TIC 0). Reweighted (biased) runs are
measured with their weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..analysis.kinetics import fit_tica, tica_project, torsion_features
from ..analysis.populations import (PopulationEstimate, indicator_entries, indicator_ess, population_estimate,
                                    weighted_indicator_ess)
from ..analysis.statistics import effective_sample_size, jensen_shannon_divergence
from ..errors import ConfSampleError
from .observables import Indicator
from .samplers import SamplerRun

__all__ = ["PopulationEstimate", "population_estimate", "indicator_entries", "indicator_ess", "summarize",
           "markdown_table", "populations_table", "format_ratio", "shows_bound", "tica_model", "tic0",
           "BOUND_LEGEND", "MIN_ENTRIES"]

#: Entries into a state each run needs before an ESS ratio between two runs counts as measured.
MIN_ENTRIES = 10

#: The line that explains '≤' / '≥' (printed only where a bound is shown).
BOUND_LEGEND = ("≤ / ≥: a bound, not a measurement: a run that never entered the state has no measurable ESS "
                "(one entry's worth is its upper bound); ratios are measured only where both runs entered the "
                f"state at least {MIN_ENTRIES} times, otherwise 'not measurable'")


def _measure(run: SamplerRun, indicator: Indicator, p_best: float | None, n_blocks: int) -> dict:
    """Population, Delta F, entries and ESS of one indicator in one run."""
    x = run.indicator(indicator).astype(float)
    estimate = population_estimate(x, run.weights, n_blocks)
    if run.weights is None:
        ess, ess_autocorrelation, entries, upper_bound = indicator_ess(x, p_best)
    else:
        ess, entries, upper_bound = weighted_indicator_ess(x, estimate.p_error,
                                                            estimate.p if p_best is None else p_best)
        ess_autocorrelation = float("nan")
    return {**estimate.to_dict(), "ess": ess, "ess_per_s": ess / run.wall_seconds,
            "ess_autocorrelation": ess_autocorrelation, "entries": entries, "ess_upper_bound": upper_bound}


def tica_model(reference, runs: Sequence[SamplerRun], lagtime: int):
    """(TICA model, torsion names) fitted on sin/cos of the reference's torsions (or, without one, the first
    run long enough); (None, ()) when no run can be fitted."""
    candidates = ([reference.run] if reference is not None else []) + list(runs)
    for run in candidates:
        if run.n_samples > 10 * lagtime and run.angle_names:
            try:
                return fit_tica([torsion_features(run.angles)], lagtime=lagtime, dim=2), run.angle_names
            except Exception:  # a degenerate run (e.g. constant) cannot be fitted; try the next one
                continue
    return None, ()


def tic0(model, names: Sequence[str], run: SamplerRun) -> np.ndarray | None:
    """(N,) TIC 0 of ``run`` under a model from :func:`tica_model` (None when the run lacks its torsions)."""
    if model is None or any(n not in run.cvs for n in names):
        return None
    return tica_project(model, torsion_features(run.values(names)))[:, 0]


def _status(stats: dict, min_entries: int) -> str:
    if stats["ess_upper_bound"]:
        return "upper"
    return "measured" if stats["entries"] >= min_entries else "few"


def _ratio_bound(numerator: str, denominator: str) -> str:
    """'' for a measured ratio, '>=' / '<=' where one side's ESS is an upper bound, '?' (not measurable)."""
    if numerator == denominator == "measured":
        return ""
    if denominator == "upper" and numerator != "upper":
        return ">="
    if numerator == "upper" and denominator != "upper":
        return "<="
    return "?"


def summarize(runs: Sequence[SamplerRun], indicators: Sequence[Indicator], reference=None,
              primary: str | None = None, md_method: str = "MD", pt_method: str = "PT",
              extra_seconds: dict | None = None, n_blocks: int = 10, tica_lagtime: int = 1,
              p_reference: dict | None = None, min_entries: int = MIN_ENTRIES) -> list[dict]:
    """One row per run: cost, acceptance, per-indicator populations, Delta F and ESS/s, TIC 0, JSD.

    Parameters
    ----------
    runs : sequence of SamplerRun
    indicators : sequence of Indicator
        What to measure; ``primary`` (default the first) fills the row's top-level columns and the ratios.
    reference : ReferenceEstimate, optional
        Gives each indicator's best P (for the ESS), ``z_vs_reference`` (Delta F difference over the
        combined error), the JSD and the TICA fit.
    md_method, pt_method : str
        Methods whose ESS/s are the denominators of ``ratio_vs_md`` and ``ratio_vs_pt``.
    extra_seconds : dict method -> s, optional
        One-off costs (data generation + training) added for ``ess_per_s_incl_training``.
    n_blocks : int
        Blocks of the population and Delta F errors.
    tica_lagtime : int, frames
    p_reference : dict indicator name -> float, optional
        Best available P for the ESS of an indicator when there is no ``reference`` (otherwise each run's
        own estimate is used, which overstates the ESS of a run that barely visited the state).
    min_entries : int
        Entries into a state both runs need for their ESS ratio to count as measured.

    Returns
    -------
    list of dict
        Keys: method, exact, wall_s, n_samples, energy_evaluations, acceptance, ms_per_proposal, indicator
        (the primary's name) and its p, p_error, delta_f_kT, delta_f_error_kT, ess (see
        :func:`indicator_ess`), ess_per_s, ess_autocorrelation, entries, ess_upper_bound, ratio_vs_md,
        ratio_vs_md_bound, ratio_vs_pt, ratio_vs_pt_bound, z_vs_reference; ess_tic0, ess_tic0_per_s, jsd,
        ess_per_s_incl_training; and ``indicators``: name -> the same per-indicator keys. The reference row
        (when given) comes last with ``method='reference'``.
    """
    runs = list(runs)
    if not runs:
        raise ConfSampleError("runs is empty; pass at least one SamplerRun.")
    for run in runs:
        if not isinstance(run, SamplerRun):
            raise ConfSampleError(f"runs must hold SamplerRun objects, got {type(run).__name__}.")
        run.check()
    indicators = list(indicators)
    if not indicators or not all(isinstance(i, Indicator) for i in indicators):
        raise ConfSampleError("indicators must be a non-empty sequence of Indicator objects.")
    names = [i.name for i in indicators]
    primary = names[0] if primary is None else primary
    if primary not in names:
        raise ConfSampleError(f"primary indicator '{primary}' is not among the indicators {names}.")
    extra_seconds = extra_seconds or {}
    p_best = dict(p_reference or {})
    if reference is not None:
        p_best.update({name: est.p for name, est in reference.estimates.items()})
    tica, tica_names = tica_model(reference, runs, tica_lagtime)
    jsd_names = tuple(reference.run.angle_names[:2]) if reference is not None else ()
    rows = []
    for run in runs:
        per_indicator = {i.name: _measure(run, i, p_best.get(i.name), n_blocks) for i in indicators}
        for name, stats in per_indicator.items():
            stats["z_vs_reference"] = None
            if reference is not None and name in reference.estimates:
                ref = reference.estimates[name]
                combined = float(np.hypot(stats["delta_f_error_kT"], ref.delta_f_error_kT))
                if np.isfinite(stats["delta_f_kT"]) and combined > 0 and np.isfinite(combined):
                    stats["z_vs_reference"] = (stats["delta_f_kT"] - ref.delta_f_kT) / combined
        ess_tic0 = float("nan")
        projection = tic0(tica, tica_names, run) if run.weights is None else None
        if projection is not None:  # an ESS of a reweighted time series is not the same quantity
            ess_tic0 = effective_sample_size(projection) if len(projection) > 1 else float(len(projection))
        jsd = None
        if jsd_names and all(n in run.cvs for n in jsd_names):
            w = None if run.weights is None else run.weights / run.weights.sum()
            jsd = jensen_shannon_divergence(run.values(jsd_names), reference.run.values(jsd_names), bins=36,
                                            weights_a=w)
        main = per_indicator[primary]
        row = {
            "method": run.method,
            "exact": run.exact,
            "wall_s": run.wall_seconds,
            "n_samples": run.n_samples,
            "energy_evaluations": run.n_energy_evaluations,
            "acceptance": run.acceptance.get("acceptance_rate", run.acceptance.get("exchange_acceptance")),
            "ms_per_proposal": run.acceptance.get("ms_per_proposal"),
            "indicator": primary,
            **main,
            "ess_tic0": ess_tic0,
            "ess_tic0_per_s": ess_tic0 / run.wall_seconds,
            "jsd": jsd,
            "ess_per_s_incl_training": None,
            "indicators": per_indicator,
        }
        if run.method in extra_seconds:
            row["ess_per_s_incl_training"] = main["ess"] / (run.wall_seconds + float(extra_seconds[run.method]))
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        for name, stats in row["indicators"].items():
            for key, base in (("ratio_vs_md", md_method), ("ratio_vs_pt", pt_method)):
                base_stats = by_method[base]["indicators"][name] if base in by_method else None
                denominator = base_stats["ess_per_s"] if base_stats else None
                stats[key] = stats["ess_per_s"] / denominator if denominator else None
                stats[key + "_bound"] = "" if row["method"] == base or base_stats is None else _ratio_bound(
                    _status(stats, min_entries), _status(base_stats, min_entries))
        row.update({k: v for k, v in row["indicators"][primary].items() if k.startswith("ratio_vs")})
    if reference is not None:
        rows.append(_reference_row(reference, indicators, primary))
    return rows


def _reference_row(reference, indicators: Sequence[Indicator], primary: str) -> dict:
    ref = reference.run
    per_indicator = {}
    for indicator in indicators:
        if indicator.name not in reference.estimates:
            continue
        ess, ess_autocorrelation, entries, _ = indicator_ess(ref.indicator(indicator))
        per_indicator[indicator.name] = {
            **reference.estimates[indicator.name].to_dict(), "ess": ess, "ess_per_s": ess / ref.wall_seconds,
            "ess_autocorrelation": ess_autocorrelation, "entries": entries, "ess_upper_bound": False,
            "ratio_vs_md": None, "ratio_vs_md_bound": "", "ratio_vs_pt": None, "ratio_vs_pt_bound": "",
            "z_vs_reference": 0.0}
    main = per_indicator.get(primary, {})
    return {"method": "reference", "exact": ref.exact, "wall_s": ref.wall_seconds, "n_samples": ref.n_samples,
            "energy_evaluations": ref.n_energy_evaluations, "acceptance": ref.acceptance.get("acceptance_rate"),
            "ms_per_proposal": ref.acceptance.get("ms_per_proposal"), "indicator": primary, **main,
            "ess_tic0": None, "ess_tic0_per_s": None, "jsd": 0.0, "ess_per_s_incl_training": None,
            "indicators": per_indicator}


# ------------------------------------------------------------------------------------------------
# tables


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def format_ratio(value, bound: str, spec: str = ".3g") -> str:
    """A ratio with its bound sign ('≥ 12.3'), 'not measurable', or '-' when there is none."""
    if value is None:
        return "-"
    if bound == "?":
        return "not measurable"
    return f"{bound} {format(value, spec)}".replace(">=", "≥").replace("<=", "≤").strip()


def shows_bound(rows: Sequence[dict]) -> bool:
    """Whether any row shows a bound or an unmeasurable ratio (then the legend belongs under the table)."""
    for row in rows:
        for stats in row.get("indicators", {}).values():
            if stats.get("ess_upper_bound") or stats.get("ratio_vs_md_bound") or stats.get("ratio_vs_pt_bound"):
                return True
    return False


def markdown_table(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`summarize` rows for the primary indicator."""
    name = rows[0]["indicator"] if rows else "state"
    header = (f"| method | wall s | energy evals | acceptance | ms/proposal | entries {name} | ESS({name}) | "
              f"ESS/s ({name}) | x MD | x PT | ESS/s (TIC0) | P({name}) | ΔF (kT) | z vs ref | JSD |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        delta_f = f"{_fmt(r['delta_f_kT'], '.2f')} ± {_fmt(r['delta_f_error_kT'], '.2f')}"
        p = f"{_fmt(r['p'], '.4f')} ± {_fmt(r['p_error'], '.4f')}"
        exact = "" if r.get("exact", True) else " (biased)"
        bound = "≤ " if r.get("ess_upper_bound") else ""
        md_ratio = format_ratio(r.get("ratio_vs_md"), r.get("ratio_vs_md_bound", ""))
        pt_ratio = format_ratio(r.get("ratio_vs_pt"), r.get("ratio_vs_pt_bound", ""))
        lines.append(
            f"| {r['method']}{exact} | {_fmt(r['wall_s'], '.1f')} | {_fmt(r['energy_evaluations'], ',d')} | "
            f"{_fmt(r['acceptance'], '.3f')} | {_fmt(r['ms_per_proposal'], '.2f')} | "
            f"{_fmt(r.get('entries'), 'd')} | {bound}{_fmt(r['ess'], '.1f')} | "
            f"{bound}{_fmt(r['ess_per_s'], '.3g')} | {md_ratio} | {pt_ratio} | "
            f"{_fmt(r['ess_tic0_per_s'], '.3g')} | {p} | {delta_f} | {_fmt(r['z_vs_reference'], '+.1f')} | "
            f"{_fmt(r['jsd'], '.3f')} |")
    return "\n".join(lines) + "\n"


def populations_table(rows: Sequence[dict]) -> str:
    """A Markdown table of every indicator in every row: P, Delta F, entries, ESS/s and its ratio to MD."""
    lines = ["| method | indicator | P | ΔF (kT) | entries | ESS/s | x MD |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, s in r.get("indicators", {}).items():
            bound = "≤ " if s.get("ess_upper_bound") else ""
            lines.append(
                f"| {r['method']} | {name} | {_fmt(s['p'], '.4f')} ± {_fmt(s['p_error'], '.4f')} | "
                f"{_fmt(s['delta_f_kT'], '.2f')} ± {_fmt(s['delta_f_error_kT'], '.2f')} | {_fmt(s['entries'], 'd')} | "
                f"{bound}{_fmt(s['ess_per_s'], '.3g')} | {format_ratio(s.get('ratio_vs_md'), s.get('ratio_vs_md_bound', ''))} |")
    return "\n".join(lines) + "\n"
