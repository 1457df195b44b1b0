"""A five-minute demonstration: plain MD against MD + a learned torsion move, same wall clock.

::

    from openmm_confsample.demo import run_demo
    summary = run_demo("confsample-demo", wall_seconds=60)

runs plain Langevin MD and MD + :class:`~openmm_confsample.moves.torsion_diffusion.TorsionDiffusionMove`
for ``wall_seconds`` each on alanine dipeptide in implicit solvent, prints acceptance, P(phi > 0) with a
block-averaging error, the ESS per second of the phi > 0 indicator and the ratio of the two, and writes
``ramachandran.png`` and ``summary.json`` into ``out_dir``.

The model is the one shipped with the package (:data:`SHIPPED_MODEL`, remade by :func:`make_shipped_model`
or ``python benchmarks/make_demo_model.py``), a model of the user's (``model_path``), or one trained on
the spot (``train=True``, about ``wall_seconds`` of data generation and training). A user's own system
(a registry name or a PDB file) works the same way with its own model; a model trained on another
topology is refused by the move with a one-sentence error.
"""

from __future__ import annotations

import datetime
import json
import os
import platform as _platform
import time

import numpy as np

from . import __version__
from .benchmarking import (SamplerRun, markdown_table, run_md_with_moves, run_plain_md, summarize,
                           train_torsion_model)
from .errors import ConfSampleError
from .systems import MolecularSystem, resolve_system

__all__ = ["SHIPPED_MODEL", "SHIPPED_MODEL_SETTINGS", "SHIPPED_TIMEWARP_MODEL", "run_demo", "make_shipped_model"]

#: The torsion diffusion model for alanine-dipeptide-implicit that the package ships.
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources",
                             "alanine_dipeptide_diffusion.pt")

#: The Timewarp flow for alanine-dipeptide-implicit that the package ships: internal coordinates, 2 coupling
#: blocks of width 32, tau = 5 ps, trained 15 min on one CPU core on pairs from MD with a learned torsion bias (its
#: metadata['training'] says how; benchmarks/README.md has the commands that remake it).
SHIPPED_TIMEWARP_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources",
                                      "alanine_dipeptide_timewarp.pt")

#: The settings :func:`make_shipped_model` passes to :func:`~openmm_confsample.benchmarking.train_torsion_model`.
SHIPPED_MODEL_SETTINGS = {
    "data": "md+basin",
    "data_seconds": 120.0,
    "train_seconds": 120.0,
    "sample_every_steps": 20,
    "hidden": 32,
    "n_layers": 2,
    "n_steps": 10,
    "temperature": 1.0,
    "uniform_weight": 0.1,
    "phi_positive_fraction": 0.3,
    "seed": 0,
}

#: Move settings of the demo (MD steps between moves, moves per segment, candidates per move).
DEMO_MOVE_SETTINGS = {"md_steps_per_segment": 10, "moves_per_segment": 4, "n_proposals": 1}


def make_shipped_model(out_path: str = SHIPPED_MODEL, progress: bool = True, **overrides):
    """Remake the shipped model (about four minutes on two cores); returns the TrainingResult.

    ``python benchmarks/make_demo_model.py`` calls this with the defaults in :data:`SHIPPED_MODEL_SETTINGS`.
    """
    from .systems import get_system

    settings = {**SHIPPED_MODEL_SETTINGS, **overrides}
    molsys = get_system("alanine-dipeptide-implicit")
    return train_torsion_model(molsys, out_path, progress=progress, **settings)


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def _short_table(rows: list[dict]) -> str:
    lines = [f"{'method':<26} {'acceptance':>10} {'P(phi>0)':>18} {'ESS/s (phi>0)':>14} {'x MD':>8}"]
    for r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        p = f"{r['p_phi_positive']:.4f} ± {r['p_error']:.4f}"
        ratio = "-" if r["ratio_vs_md"] is None else f"{r.get('ratio_vs_md_bound', '')}{r['ratio_vs_md']:.1f}"
        ess = ("<=" if r.get("ess_phi_upper_bound") else "") + f"{r['ess_phi_per_s']:.3g}"
        lines.append(f"{r['method']:<26} {acceptance:>10} {p:>18} {ess:>14} {ratio:>8}")
    lines.append("(<= / >=: a run that never entered phi > 0 has no measurable ESS; one entry is its upper bound)")
    return "\n".join(lines)


def run_demo(out_dir: str = "confsample-demo", wall_seconds: float = 60.0, model_path: str | None = None,
             system="alanine-dipeptide-implicit", train: bool = False, progress: bool = True, seed: int = 0,
             forcefield_files=None, quiet: bool = False) -> dict:
    """Plain MD vs MD + TorsionDiffusionMove for the same wall time; writes ramachandran.png and summary.json.

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
        A registry name, a PDB path (with ``forcefield_files``) or a MolecularSystem; it must have phi/psi.
    train : bool
        Train a model for ``system`` first (``wall_seconds`` of data, ``wall_seconds`` of training), saved as
        ``out_dir/model.pt``.
    progress : bool
        Progress bars.
    quiet : bool
        Do not print the table.

    Returns
    -------
    dict
        The contents of summary.json: system, wall_seconds, model (path, source, training timings),
        methods (one row per method, see :func:`~openmm_confsample.benchmarking.summarize`), ratio_ess_per_s,
        files, created, package_version.
    """
    try:
        wall_seconds = float(wall_seconds)
    except (TypeError, ValueError):
        raise ConfSampleError(f"wall_seconds must be a number of seconds, got {wall_seconds!r}.") from None
    if not wall_seconds > 0:
        raise ConfSampleError(f"wall_seconds must be positive, got {wall_seconds}.")
    if model_path is not None and train:
        raise ConfSampleError("pass either model_path or train=True, not both.")
    if model_path is not None and not os.path.isfile(model_path):
        raise ConfSampleError(f"model file '{model_path}' does not exist.")
    molsys = system if isinstance(system, MolecularSystem) else resolve_system(system, forcefield_files)
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()

    training = None
    if train:
        settings = dict(SHIPPED_MODEL_SETTINGS, data_seconds=wall_seconds, train_seconds=wall_seconds, seed=seed)
        if not _is_alanine(molsys):  # no known basins: MD at the system's temperature and at 500 K
            settings.update(data="md+hot", phi_positive_fraction=None)
        result = train_torsion_model(molsys, os.path.join(out_dir, "model.pt"), progress=progress, **settings)
        model_path, source = result.path, "trained"
        training = {"data_seconds": result.data_seconds, "train_seconds": result.train_seconds,
                    "settings": result.settings}
    elif model_path is None:
        if not os.path.isfile(SHIPPED_MODEL):
            raise ConfSampleError(f"the shipped model {SHIPPED_MODEL} is missing; pass model_path or train=True.")
        model_path, source = SHIPPED_MODEL, "shipped"
    else:
        source = "user"

    from .moves.torsion_diffusion import TorsionDiffusionProposal

    proposal = TorsionDiffusionProposal.for_system(model_path, molsys)  # refuses a model of another system
    runs: list[SamplerRun] = [
        run_plain_md(molsys, wall_seconds, seed=seed, method="MD", progress=progress),
        run_md_with_moves(molsys, proposal, wall_seconds, seed=seed + 1, method="MD+TorsionDiffusionMove",
                          progress=progress, **DEMO_MOVE_SETTINGS),
    ]
    for run in runs:
        run.check()
    extra = {"MD+TorsionDiffusionMove": training["data_seconds"] + training["train_seconds"]} if training else None
    # No reference here: the learned run (exact, many basin crossings) gives the best P(phi > 0) for the ESS of
    # the rare-state indicator; MD's own estimate would credit a run with one brief visit thousands of samples.
    p_best = float(np.mean(runs[1].phi > 0))
    rows = summarize(runs, extra_seconds=extra, p_phi_positive=p_best if 0.0 < p_best < 1.0 else None)

    from .analysis.plots import plot_ramachandran_comparison

    rama = os.path.join(out_dir, "ramachandran.png")
    tmp_png = os.path.join(out_dir, ".ramachandran.partial.png")
    plot_ramachandran_comparison({r.method: (r.phi, r.psi) for r in runs}, path=tmp_png, bins=36, vmax=10.0,
                                 title=f"{molsys.name}, {wall_seconds:g} s each")
    os.replace(tmp_png, rama)
    summary = {
        "system": molsys.name,
        "temperature_K": molsys.temperature_K,
        "wall_seconds": wall_seconds,
        "model": {"path": os.path.abspath(model_path), "source": source, "training": training},
        "move_settings": DEMO_MOVE_SETTINGS,
        "methods": rows,
        "runs": [r.to_dict() for r in runs],
        "ratio_ess_per_s": rows[1]["ratio_vs_md"],
        "table_markdown": markdown_table(rows),
        "files": {"ramachandran": os.path.abspath(rama)},
        "total_seconds": time.perf_counter() - started,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{_platform.machine()}, {os.cpu_count()} cores",
        "package_version": __version__,
    }
    _write_json(os.path.join(out_dir, "summary.json"), summary)
    if not quiet:
        print(_short_table(rows))
        ratio = summary["ratio_ess_per_s"]
        if ratio is not None:
            bound = rows[1].get("ratio_vs_md_bound", "")
            print(f"ESS/s of the phi>0 indicator: MD + TorsionDiffusionMove / MD {bound or '='} {ratio:.1f}")
        print(f"wrote {rama} and {os.path.join(out_dir, 'summary.json')}")
    return summary


def _is_alanine(molsys: MolecularSystem) -> bool:
    return molsys.name.startswith("alanine-dipeptide")
