"""Sampling benchmark on alanine-dipeptide-implicit: ESS per wall second of the phi > 0 indicator.

    python benchmarks/run.py --mode quick                 # CI: ~1-2 min, checks that every sampler works
    python benchmarks/run.py --mode full --out benchmarks/out/full   # ~25 min: the numbers in benchmarks/README.md

Methods (same wall budget each): plain MD; MD + TorsionDiffusionMove; MD + von Mises basin mixture (the
non-learned baseline); parallel tempering (openmmtools, 4 replicas 300-550 K); MD with a learned torsion
bias (built in the run from unbiased MD by ``bench.training.train_learned_bias``, reweighted); optionally
PT + TorsionDiffusionMove (``--pt-learned``); MD + TimewarpMove with the shipped Timewarp flow
(``--timewarp-model PATH`` for another, ``--no-timewarp`` to leave it out).
Every run is compared with an exact reference (MD + basin torsion moves, cached under benchmarks/cache/).
The system is one configuration of the harness (``bench.alanine.alanine_config``: phi/psi recorded, phi > 0
the primary indicator, alpha_R and beta also measured).
The learned model's data generation and training time are reported separately and amortized
(``ESS/s incl. training``).

Writes results.md, results.json and ramachandran.png, free_energy_phi.png, tic0.png into ``--out``. Exits
with status 1 when a sampler crashes or produces non-finite output; quick mode asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = {
    # seconds per method, reference seconds, training budgets (data, train) when a model is trained here,
    # and the learned bias's build (unbiased MD seconds, refinement rounds, ps per round, training s per round)
    "quick": {"seconds": 8.0, "reference_seconds": 15.0, "data_seconds": 10.0, "train_seconds": 10.0,
              "bias": {"data_seconds": 3.0, "rounds": 1, "round_ps": 5.0, "train_seconds_per_round": 3.0}},
    "full": {"seconds": 180.0, "reference_seconds": 300.0, "data_seconds": 120.0, "train_seconds": 120.0,
             "bias": {"data_seconds": 15.0, "rounds": 3, "round_ps": 200.0, "train_seconds_per_round": 60.0,
                      "cap_kT": 20.0, "bias_factor": 6.0}},
}


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _write(path: str, text: str) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _model_training_seconds(path: str) -> tuple[float, float] | None:
    from openmm_confsample.models.torsion_diffusion import TorsionDiffusionModel

    training = TorsionDiffusionModel.load(path).metadata.get("training") or {}
    if "data_wall_seconds" in training and "train_wall_seconds" in training:
        return float(training["data_wall_seconds"]), float(training["train_wall_seconds"])
    return None


def _timewarp_training(path: str) -> dict | None:
    """The data and training seconds recorded in a Timewarp checkpoint's metadata, or None."""
    from openmm_confsample.models.timewarp import TimewarpModel

    training = TimewarpModel.load(path).metadata.get("training") or {}
    if "data_wall_seconds" in training and "train_wall_seconds" in training:
        return {"data_wall_seconds": float(training["data_wall_seconds"]),
                "train_wall_seconds": float(training["train_wall_seconds"])}
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/out/<mode>)")
    parser.add_argument("--seconds", type=float, default=None, help="wall seconds per method (overrides the mode)")
    parser.add_argument("--reference-seconds", type=float, default=None, help="wall seconds of the reference")
    parser.add_argument("--torsion-model", default=None,
                        help="torsion diffusion checkpoint (default: full mode trains one, quick mode uses the shipped one)")
    parser.add_argument("--timewarp-model", default=None,
                        help="Timewarp checkpoint for MD+TimewarpMove (default: the one the package ships)")
    parser.add_argument("--no-timewarp", action="store_true", help="leave out MD+TimewarpMove")
    parser.add_argument("--pt-learned", action="store_true", help="add PT with the TorsionDiffusionMove in each replica")
    parser.add_argument("--learned-bias", default=None,
                        help="saved LearnedTorsionBias for MD+learned bias (default: built in the run from unbiased MD)")
    parser.add_argument("--no-learned-bias", action="store_true", help="leave out MD+learned bias")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the methods to run, e.g. 'MD,MD+learned bias' (default: all); "
                             "models are trained or built only for methods that run")
    parser.add_argument("--cache", default=os.path.join(HERE, "cache"), help="reference cache folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from openmm_confsample import __version__
    from openmm_confsample import bench as B
    from openmm_confsample.bench.alanine import SHIPPED_MODEL, SHIPPED_MODEL_SETTINGS, SHIPPED_TIMEWARP_MODEL
    from openmm_confsample.bench.demo import DEMO_MOVE_SETTINGS
    from openmm_confsample.errors import ConfSampleError
    from openmm_confsample.systems import get_system

    mode = dict(MODES[args.mode])
    seconds = args.seconds or mode["seconds"]
    reference_seconds = args.reference_seconds or mode["reference_seconds"]
    out = args.out or os.path.join(HERE, "out", args.mode)
    os.makedirs(out, exist_ok=True)
    progress = not args.quiet
    started = time.perf_counter()
    molsys = get_system("alanine-dipeptide-implicit")
    config = B.alanine_config()
    state = config.primary_name  # the primary indicator, e.g. 'phi > 0'
    failures: list[str] = []

    # -- the reference (cached) --------------------------------------------------------------------
    cache_path = os.path.join(args.cache, f"reference_{molsys.name}_{reference_seconds:g}s.npz")
    print(f"reference: MD + basin torsion moves, {reference_seconds:g} s (cache {cache_path})", flush=True)
    reference = B.run_reference(molsys, reference_seconds, config, cache_path=cache_path, progress=progress)
    print(f"  P({state}) = {reference.estimate.p:.4f} ± {reference.estimate.p_error:.4f}, "
          f"ΔF = {reference.estimate.delta_f_kT:.3f} ± {reference.estimate.delta_f_error_kT:.3f} kT"
          f"{' (cached)' if reference.from_cache else ''}", flush=True)

    chosen = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    wants = lambda name: chosen is None or name in chosen  # noqa: E731
    learned_methods = ("MD+TorsionDiffusionMove", "PT+TorsionDiffusionMove")

    # -- the learned model -------------------------------------------------------------------------
    training = None
    model_path = args.torsion_model
    if model_path is None and args.mode == "full" and any(wants(m) for m in learned_methods):
        model_path = os.path.join(out, "torsion_model.pt")
        settings = {**SHIPPED_MODEL_SETTINGS, "data_seconds": mode["data_seconds"],
                    "train_seconds": mode["train_seconds"]}
        print(f"training a torsion diffusion model: {settings}", flush=True)
        result = B.train_torsion_model(molsys, model_path, config, progress=progress, **settings)
        training = {"data_seconds": result.data_seconds, "train_seconds": result.train_seconds,
                    "settings": result.settings, "path": model_path, "trained_here": True}
    elif model_path is None:
        model_path = SHIPPED_MODEL
    if training is None:
        recorded = _model_training_seconds(model_path)
        training = {"path": model_path, "trained_here": False,
                    "data_seconds": recorded[0] if recorded else None,
                    "train_seconds": recorded[1] if recorded else None}
    print(f"torsion model: {model_path}", flush=True)

    # -- the learned bias (openmm-torch issue): unbiased MD -> model -> refined by rounds of biased MD --------
    bias_path, bias_build = args.learned_bias, None
    if bias_path is None and not args.no_learned_bias and wants("MD+learned bias"):
        bias_path = os.path.join(out, "learned_bias.pt")
        print(f"building a learned bias: {mode['bias']}", flush=True)
        try:
            built = B.train_learned_bias(molsys, bias_path, config, seed=args.seed, progress=progress,
                                         verbose=progress, **mode["bias"])
            bias_build = {"data_seconds": built.data_seconds, "train_seconds": built.train_seconds,
                          "settings": built.settings, "path": bias_path}
            print(f"  {built.data_seconds:.0f} s unbiased MD + {built.train_seconds:.0f} s refinement", flush=True)
        except Exception as exc:
            traceback.print_exc()
            failures.append(f"learned bias build: {type(exc).__name__}: {exc}")
            bias_path = None

    # -- the Timewarp flow (trained elsewhere: benchmarks/README.md) ----------------------------------
    timewarp_path = None
    if not args.no_timewarp and wants("MD+TimewarpMove"):
        timewarp_path = args.timewarp_model or SHIPPED_TIMEWARP_MODEL
    timewarp_training = _timewarp_training(timewarp_path) if timewarp_path else None
    if timewarp_path:
        print(f"timewarp model: {timewarp_path}", flush=True)

    # -- the methods -------------------------------------------------------------------------------
    table = B.method_table(molsys, config, torsion_model=model_path, timewarp_model=timewarp_path,
                           pt_learned=args.pt_learned, learned_bias=bias_path, **DEMO_MOVE_SETTINGS)
    if chosen is not None:
        unknown = [m for m in chosen if m not in table]
        if unknown:
            parser.error(f"--methods names {unknown}, which this run does not have; it has {list(table)}")
    runs = []
    for index, (name, runner) in enumerate(table.items()):
        if not wants(name):
            continue
        print(f"{name}: {seconds:g} s", flush=True)
        try:
            run = runner(seconds, seed=args.seed + 10 * (index + 1), progress=progress)
            run.check()
        except Exception as exc:  # a crash of one sampler must not hide the others' results
            traceback.print_exc()
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        runs.append(run)

    extra = {}
    if training.get("data_seconds") is not None:
        one_off = training["data_seconds"] + training["train_seconds"]
        extra = {r.method: one_off for r in runs if "TorsionDiffusion" in r.method}
    if bias_build is not None:
        extra["MD+learned bias"] = bias_build["data_seconds"] + bias_build["train_seconds"]
    if timewarp_training is not None:
        extra["MD+TimewarpMove"] = timewarp_training["data_wall_seconds"] + timewarp_training["train_wall_seconds"]
    rows = []
    if runs:
        try:
            rows = B.summarize(runs, config.indicators, reference, extra_seconds=extra)
            B.plot_comparison(runs, reference, out, config.torsion_pair(molsys))
        except ConfSampleError as exc:
            failures.append(f"summary: {exc}")
    for row in rows:
        for key in ("wall_s", "p", "ess_per_s", "delta_f_kT"):
            value = row.get(key)
            if value is None or not np.isfinite(value):
                if not (key == "delta_f_kT" and value in (float("inf"), float("-inf"))):
                    failures.append(f"{row['method']}: {key} is {value}")

    # -- report ------------------------------------------------------------------------------------
    table_md = B.markdown_table(rows) if rows else "(no runs)\n"
    pt_row = next((r for r in rows if r["method"] == "PT"), None)
    lines = [
        f"# Sampling benchmark ({args.mode})",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, OpenMM Reference platform",
        f"- command: `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- system: {molsys.name} at {molsys.temperature_K:g} K; {seconds:g} s wall per method",
        f"- reference: {reference_seconds:g} s MD + basin torsion moves (seed 12345): P({state}) = "
        f"{reference.estimate.p:.4f} ± {reference.estimate.p_error:.4f}, ΔF = {reference.estimate.delta_f_kT:.3f} ± "
        f"{reference.estimate.delta_f_error_kT:.3f} kT, acceptance {reference.run.acceptance.get('acceptance_rate', 0):.3f}",
    ]
    if pt_row is not None:
        lines.append(f"- cross-check, PT at 300 K: P({state}) = {pt_row['p']:.4f} ± {pt_row['p_error']:.4f}, "
                     f"ΔF = {pt_row['delta_f_kT']:.3f} ± {pt_row['delta_f_error_kT']:.3f} kT "
                     f"(z = {pt_row['z_vs_reference'] if pt_row['z_vs_reference'] is not None else float('nan'):+.1f})")
    if training.get("data_seconds") is not None:
        lines.append(f"- torsion model: data {training['data_seconds']:.0f} s + training {training['train_seconds']:.0f} s "
                     f"({'trained in this run' if training['trained_here'] else 'recorded in the checkpoint'}), "
                     f"amortized in `ESS/s incl. training`")
    if bias_build is not None:
        rounds = bias_build["settings"]["rounds"]
        first_ps = bias_build["settings"].get("round0_first_primary_ps")
        first = "never" if first_ps is None else f"at {first_ps:.1f} ps"
        kish = ", ".join(f"{r['kish_ess']:.0f}/{r['frames']}" for r in rounds if "kish_ess" in r)
        lines.append(f"- learned bias: {bias_build['data_seconds']:.0f} s unbiased MD + {len(rounds) - 1} refinement "
                     f"rounds ({bias_build['train_seconds']:.0f} s: training and biased MD), bias factor "
                     f"{bias_build['settings']['bias_factor']:g}, cap {bias_build['settings']['cap_kT']:g} kT; "
                     f"Kish ESS per round: {kish}; round 0's biased MD first reached {state} {first}")
    if timewarp_training is not None:
        lines.append(f"- timewarp model: data {timewarp_training['data_wall_seconds']:.0f} s + training "
                     f"{timewarp_training['train_wall_seconds']:.0f} s (recorded in the checkpoint), amortized in "
                     f"`ESS/s incl. training`")
    lines += ["", table_md]
    learned = [r for r in rows if r.get("ess_per_s_incl_training") is not None]
    for r in learned:
        lines.append(f"- {r['method']}: ESS/s incl. training = {r['ess_per_s_incl_training']:.3g}")
    if rows:
        lines += ["", "Every indicator of the configuration (P and ΔF with 10-block errors, ESS/s and its ratio to MD "
                  "as above):", "", B.populations_table(rows)]
    lines += ["", f"ESS({state}) = min(N / tau_int, two-state ESS N r / (2 - r) with r = entries / (N p_ref (1 - p_ref))) "
              "(see `bench.summary.indicator_ess`); for the reweighted MD+learned bias, p_ref (1 - p_ref) / sigma_P^2 "
              f"with sigma_P its weighted block error; '≤' marks a run that never entered {state} (ESS of one entry, an "
              "upper bound; ratios against it are lower bounds, '≥'); a ratio is measured only where both runs "
              f"entered {state} at least 10 times, otherwise 'not measurable'. acceptance is the MH acceptance (exchange "
              "acceptance for PT); ms/proposal is the engine's wall time per MH candidate (model, geometry and "
              f"energy). ΔF = F({state}) - F(not {state}) with 10-block errors; z = (ΔF - ΔF_ref) / combined error; JSD on "
              "36 x 36 phi/psi bins against the reference; TIC0 from deeptime TICA (lag 1 sample) on the "
              "reference's sin/cos(phi, psi).", ""]
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    _write(os.path.join(out, "results.md"), "\n".join(lines))
    payload = {"mode": args.mode, "seconds_per_method": seconds, "reference": reference.to_dict(),
               "training": training, "learned_bias": bias_build, "timewarp_model": timewarp_path,
               "timewarp_training": timewarp_training, "rows": rows, "runs": [r.to_dict() for r in runs], "failures": failures,
               "total_seconds": time.perf_counter() - started, "package_version": __version__,
               "created": datetime.datetime.now().isoformat(timespec="seconds")}
    _write(os.path.join(out, "results.json"), json.dumps(payload, indent=2, default=_json_default))
    print("\n".join(lines))
    print(f"wrote {out}/results.md, results.json and PNGs in {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
