"""A five-minute demonstration: plain MD against MD + a learned torsion move, same wall clock.

::

    from openmm_confsample.bench.demo import run_demo
    summary = run_demo("confsample-demo", wall_seconds=60)

runs plain Langevin MD and MD + :class:`~openmm_confsample.moves.torsion_diffusion.TorsionDiffusionMove`
for ``wall_seconds`` each, prints acceptance, the population of each indicator with a block-averaging error,
the ESS per second of its time series and the ratio of the two runs, and writes ``ramachandran.png`` and
``summary.json`` into ``out_dir``.

On alanine dipeptide (the default) the indicators are phi > 0 (primary), alpha_R and beta
(:func:`~openmm_confsample.bench.alanine.alanine_config`); on any other system each named torsion's sign
(:func:`~openmm_confsample.bench.config.default_config`), or whatever ``config`` names. A ratio is printed
only where both runs entered the state at least ten times; otherwise the bound with its sign, or "not
measurable".

The model is the one shipped with the package (:data:`~openmm_confsample.bench.alanine.SHIPPED_MODEL`), a
model of the user's (``model_path``), or one trained on the spot (``train=True``, about ``wall_seconds`` of
data generation and training). A model trained on another topology is refused by the move with a
one-sentence error.
"""

from __future__ import annotations

import datetime
import json
import os
import platform as _platform
import time

import numpy as np

from .. import __version__
from ..analysis.plots import plot_free_energy_1d, plot_ramachandran_comparison
from ..checks import positive_float
from ..errors import ConfSampleError
from ..systems import MolecularSystem, resolve_system
from .alanine import SHIPPED_MODEL, SHIPPED_MODEL_SETTINGS, alanine_config, is_alanine
from .config import BenchmarkConfig, default_config
from .samplers import SamplerRun, run_md_with_moves, run_plain_md
from .summary import BOUND_LEGEND, format_ratio, markdown_table, populations_table, shows_bound, summarize
from .training import train_torsion_model

__all__ = ["run_demo", "config_for_system", "DEMO_MOVE_SETTINGS"]

#: Move settings of the demo (MD steps between moves, moves per segment, candidates per move).
DEMO_MOVE_SETTINGS = {"md_steps_per_segment": 10, "moves_per_segment": 4, "n_proposals": 1}


def config_for_system(molsys: MolecularSystem) -> BenchmarkConfig:
    """The alanine configuration for the registry's alanine dipeptides, the torsion-sign default otherwise."""
    return alanine_config() if is_alanine(molsys) else default_config(molsys)


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def _short_table(rows: list[dict], name: str) -> str:
    """Acceptance, P, ESS/s and the ratio to MD of indicator ``name``, one line per run."""
    lines = [f"{'method':<26} {'acceptance':>10} {f'P({name})':>18} {f'ESS/s ({name})':>16} {'x MD':>14}"]
    for r in rows:
        s = r["indicators"][name]
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        p = f"{s['p']:.4f} ± {s['p_error']:.4f}"
        ratio = format_ratio(s["ratio_vs_md"], s.get("ratio_vs_md_bound", ""), ".1f")
        ess = ("≤ " if s.get("ess_upper_bound") else "") + f"{s['ess_per_s']:.3g}"
        lines.append(f"{r['method']:<26} {acceptance:>10} {p:>18} {ess:>16} {ratio:>14}")
    return "\n".join(lines)


def _plot(runs: list[SamplerRun], torsions: tuple, path: str, title: str) -> None:
    """The two-torsion map (or, with one torsion, its profile), written atomically to ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial.png")
    if len(torsions) >= 2:
        plot_ramachandran_comparison({r.method: (r.cvs[torsions[0]], r.cvs[torsions[1]]) for r in runs}, path=tmp,
                                     bins=36, title=title)  # colour scale fitted to the data
    else:
        plot_free_energy_1d({r.method: np.degrees(r.cvs[torsions[0]]) for r in runs},
                            bins=np.linspace(-180, 180, 37), xlabel=f"{torsions[0]} (deg)", path=tmp, title=title)
    os.replace(tmp, path)


def run_demo(out_dir: str = "confsample-demo", wall_seconds: float = 60.0, model_path: str | None = None,
             system="alanine-dipeptide-implicit", train: bool = False, progress: bool = True, seed: int = 0,
             forcefield_files=None, quiet: bool = False, config: BenchmarkConfig | None = None) -> dict:
    """Plain MD vs MD + TorsionDiffusionMove for the same wall time; writes a torsion map and summary.json.

    Parameters
    ----------
    out_dir : str
        Created if needed.
    wall_seconds : float, s
        Budget of each method (the demo takes about 2 x this, plus ~10 s of set-up, plus the training budget
        when ``train``).
    model_path : str, optional
        A torsion diffusion checkpoint for ``system``; default the shipped alanine-dipeptide model.
    system : str or MolecularSystem
        A registry name, a PDB path (with ``forcefield_files``) or a MolecularSystem with named torsions.
    train : bool
        Train a model for ``system`` first (``wall_seconds`` of data, ``wall_seconds`` of training), saved as
        ``out_dir/model.pt``.
    progress : bool
        Progress bars.
    quiet : bool
        Do not print the table.
    config : BenchmarkConfig, optional
        What to record and measure (default :func:`config_for_system`).

    Returns
    -------
    dict
        The contents of summary.json: system, wall_seconds, indicator (the primary one), model (path,
        source, training timings), methods (one row per method, see
        :func:`~openmm_confsample.bench.summary.summarize`), ratio_ess_per_s and ratio_bound, files,
        created, package_version.
    """
    wall_seconds = positive_float(wall_seconds, "wall_seconds")
    if model_path is not None and train:
        raise ConfSampleError("pass either model_path or train=True, not both.")
    if model_path is not None and not os.path.isfile(model_path):
        raise ConfSampleError(f"model file '{model_path}' does not exist.")
    molsys = system if isinstance(system, MolecularSystem) else resolve_system(system, forcefield_files)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    # Deferred: the learned move pulls in torch; the checks above answer bad input before that cost.
    from ..moves.torsion_diffusion import TorsionDiffusionProposal

    training = None
    if train:
        config = config or config_for_system(molsys)
        settings = dict(SHIPPED_MODEL_SETTINGS, data_seconds=wall_seconds, train_seconds=wall_seconds, seed=seed)
        if config.basin_proposal is None:  # no known basins: MD at the system's temperature and at 500 K
            settings.update(data="md+hot", primary_fraction=None)
        result = train_torsion_model(molsys, os.path.join(out_dir, "model.pt"), config, progress=progress, **settings)
        model_path, source = result.path, "trained"
        training = {"data_seconds": result.data_seconds, "train_seconds": result.train_seconds,
                    "settings": result.settings}
    elif model_path is None:
        if not os.path.isfile(SHIPPED_MODEL):
            raise ConfSampleError(f"the shipped model {SHIPPED_MODEL} is missing; pass model_path or train=True.")
        model_path, source = SHIPPED_MODEL, "shipped"
    else:
        source = "user"
    proposal = TorsionDiffusionProposal.for_system(model_path, molsys)  # refuses a model of another system
    config = config or config_for_system(molsys)

    runs: list[SamplerRun] = [
        run_plain_md(molsys, wall_seconds, seed=seed, method="MD", progress=progress, cvs=config.cvs),
        run_md_with_moves(molsys, proposal, wall_seconds, seed=seed + 1, method="MD+TorsionDiffusionMove",
                          progress=progress, cvs=config.cvs, **DEMO_MOVE_SETTINGS),
    ]
    for run in runs:
        run.check()
    extra = {"MD+TorsionDiffusionMove": training["data_seconds"] + training["train_seconds"]} if training else None
    # No reference here: the learned run (exact, many crossings) gives the best population of each state for
    # the ESS of its indicator; MD's own estimate would credit a run with one brief visit thousands of samples.
    p_learned = {i.name: float(np.mean(runs[1].indicator(i))) for i in config.indicators}
    rows = summarize(runs, config.indicators, primary=config.primary_name, extra_seconds=extra,
                     p_reference={name: p for name, p in p_learned.items() if 0.0 < p < 1.0})

    torsions = config.torsion_pair(molsys) or tuple(config.recorded(molsys).torsion_names[:1])
    plot_name = "ramachandran.png" if len(torsions) >= 2 else "free_energy.png"
    plot_path = os.path.join(out_dir, plot_name)
    if torsions:
        _plot(runs, torsions, plot_path, f"{molsys.name}, {wall_seconds:g} s each")
    primary = config.primary_name
    learned = rows[1]
    summary = {
        "system": molsys.name,
        "temperature_K": molsys.temperature_K,
        "wall_seconds": wall_seconds,
        "indicator": primary,
        "indicators": [i.name for i in config.indicators],
        "model": {"path": os.path.abspath(model_path), "source": source, "training": training},
        "move_settings": DEMO_MOVE_SETTINGS,
        "methods": rows,
        "runs": [r.to_dict() for r in runs],
        "ratio_ess_per_s": learned["ratio_vs_md"],
        "ratio_bound": learned["ratio_vs_md_bound"],
        "table_markdown": markdown_table(rows),
        "populations_markdown": populations_table(rows),
        "files": {"ramachandran" if len(torsions) >= 2 else "free_energy": os.path.abspath(plot_path)}
        if torsions else {},
        "total_seconds": time.perf_counter() - started,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{_platform.machine()}, {os.cpu_count()} cores",
        "package_version": __version__,
    }
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    if not quiet:
        print("\n\n".join(_short_table(rows, i.name) for i in config.indicators))
        if shows_bound(rows):
            print(f"({BOUND_LEGEND})")
        ratio = format_ratio(learned["ratio_vs_md"], learned["ratio_vs_md_bound"], ".1f")
        if learned["ratio_vs_md"] is not None:
            sign = "" if ratio == "not measurable" or ratio[0] in "≤≥" else "= "
            print(f"ESS/s of the {primary} indicator: MD + TorsionDiffusionMove / MD {sign}{ratio}")
        written = [summary["files"][k] for k in summary["files"]] + [os.path.join(out_dir, "summary.json")]
        print(f"wrote {' and '.join(written)}")
    return summary
