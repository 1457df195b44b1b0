"""What the workflows report: per torsion, a sampling run's basin populations with errors and their ESS;
a training run's data, losses and coverage.

Every torsion gets the same states, whatever the system: its sign (``phi > 0`` / ``phi < 0``: on a peptide
backbone, alpha_L/C7ax against the rest) and its three staggered arcs, g+ (0, 120), t (120, -120) and
g- (-120, 0) degrees (the rotamers of a side chain). Each state's population comes with a block-averaging
error (:func:`~openmm_confsample.analysis.populations.population_estimate`), its entries and the ESS of its 0/1
series (:func:`~openmm_confsample.analysis.populations.indicator_ess`: bounded by the transitions actually seen, so a
run that entered a state once does not claim thousands of effective samples; a run that never entered it
gets one entry's worth as an upper bound, flagged).
"""

from __future__ import annotations

import numpy as np

from ..analysis.populations import indicator_ess, population_estimate
from ..errors import ConfSampleError

__all__ = ["TORSION_STATES_DEG", "torsion_states_report", "format_torsion_report", "format_training_summary"]

#: State name (``{t}`` is the torsion) -> open arc in degrees (counter-clockwise from the first to the second).
TORSION_STATES_DEG = {
    "{t} > 0": (0.0, 180.0),
    "{t} < 0": (-180.0, 0.0),
    "{t} g+": (0.0, 120.0),
    "{t} t": (120.0, -120.0),
    "{t} g-": (-120.0, 0.0),
}


def torsion_states_report(angles: dict, n_blocks: int = 10) -> dict:
    """Per torsion, each state of :data:`TORSION_STATES_DEG`: population, error, entries and ESS.

    Parameters
    ----------
    angles : dict name -> (N,) float, radians
        The torsions of every frame of one run (frames in time order).
    n_blocks : int
        Blocks of the population error.

    Returns
    -------
    dict name -> {"n_frames": N, "states": {state name -> {p, p_error, delta_f_kT, delta_f_error_kT, entries,
    ess, ess_upper_bound}}}. Non-finite values (Delta F of a state never visited, the error of a single
    frame) are None, and so is the ESS of a state never entered or never left (not measurable).
    """
    from ..bench.observables import angle_range

    if not angles:
        raise ConfSampleError("no torsions to report.")
    report = {}
    for name, values in angles.items():
        values = np.asarray(values, dtype=float)
        if values.ndim != 1 or len(values) == 0:
            raise ConfSampleError(f"torsion '{name}' must be a non-empty (N,) series of radians, got shape "
                                  f"{values.shape}.")
        states = {}
        for template, (low, high) in TORSION_STATES_DEG.items():
            state = template.format(t=name)
            inside = angle_range(name, low, high, name=state)({name: values}).astype(float)
            estimate = population_estimate(inside, n_blocks=n_blocks)
            ess, _, entries, upper = indicator_ess(inside)
            measured = 0.0 < estimate.p < 1.0  # a state never entered (or never left) has no ESS
            states[state] = {k: (v if np.isfinite(v) else None) for k, v in estimate.to_dict().items()}
            states[state].update(entries=entries, ess=float(ess) if measured else None,
                                 ess_upper_bound=bool(upper) if measured else False)
        report[name] = {"n_frames": int(len(values)), "states": states}
    return report


def format_torsion_report(report: dict) -> str:
    """Lines for a terminal: per torsion its sign populations and rotamer arcs, with errors and ESS."""
    lines = []
    width = max(len(name) for name in report)
    for name, entry in report.items():
        states = entry["states"]
        cells = []
        for template in TORSION_STATES_DEG:
            s = states[template.format(t=name)]
            label = template.format(t="").strip()
            if s["p"] == 0.0:
                cells.append(f"{label} never")
            elif s["p"] == 1.0:
                cells.append(f"{label} always")
            else:
                error = "inf" if s["p_error"] is None else f"{s['p_error']:.3f}"
                bound = "≤" if s["ess_upper_bound"] else ""
                cells.append(f"{label} {s['p']:.3f}±{error} (ESS {bound}{s['ess']:.0f}, {s['entries']} entries)")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def format_training_summary(summary: dict, loss_rows: int = 8) -> str:
    """Lines for a terminal from :func:`~openmm_confsample.workflows.train.train_torsion_diffusion`'s summary:
    the data runs, the losses (at most ``loss_rows`` epochs), the model written, and the coverage report."""
    from ..data.broadened import coverage_report

    lines = [f"data: {summary['n_train']} training and {summary['n_val']} validation frames from "
             f"{len(summary['data_runs'])} run(s):"]
    for run in summary["data_runs"]:
        temperature = "?" if run["temperature_K"] is None else f"{run['temperature_K']:g} K"
        extra = "" if run["bias"] is None else (", biased, reweighted" if run["reweighted"] else ", biased")
        lines.append(f"    {run['path']}: {run['n_frames']} frames, {temperature}{extra}")
    train, val = summary["history"].get("train_loss", []), summary["history"].get("val_loss", [])
    if train:
        step = max(1, len(train) // loss_rows)
        lines.append("epoch  train loss  val loss")
        for e in sorted(set(range(0, len(train), step)) | {len(train) - 1}):
            lines.append(f"{e + 1:5d}  {train[e]:10.4f}  {val[e] if e < len(val) else float('nan'):8.4f}")
    lines.append(f"wrote {summary['model']} (torsions {', '.join(summary['torsions'])}; {summary['epochs']} epochs in "
                 f"{summary['training_seconds']:.1f} s; flow steps {summary['n_steps']}; uniform weight "
                 f"{summary['uniform_weight']:g})" + (f" and {summary['loss_plot']}" if "loss_plot" in summary else ""))
    lines.append("coverage of the training data (10-degree bins with at least one frame):")
    lines.append(coverage_report(summary["coverage"]))
    return "\n".join(lines)
