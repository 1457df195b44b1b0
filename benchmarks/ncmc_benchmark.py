"""Explicit solvent: learned torsion moves relaxed by NCMC on alanine-dipeptide-explicit (issue 16).

    python benchmarks/ncmc_benchmark.py --quick                       # ~2 min: checks that every sampler works
    python benchmarks/ncmc_benchmark.py --out benchmarks/out/ncmc    # full: 30 min per method, about 5 h

Methods, each for the same wall time on the same prepared structure (minimised, equilibrated): MD (2 fs
LangevinMiddle, the system's barostat); MD + the learned move applied instantaneously (ncmc_steps 0); MD +
the NCMC learned move at each ``--ncmc-steps`` length with each ``--protocols`` (the solute softened around a
midpoint jump, or the torsions dragged by a moving restraint); parallel tempering (openmmtools) with the replicas water
needs, estimated from the potential-energy fluctuation of the MD run: n = 1 + ln(T_max/T_min) / r,
r = 1.46 kT / sigma_U for about 30 % neighbour acceptance between Gaussian energy distributions
(erfc(sigma_U dbeta / 2) = 0.3), sigma_U growing with T. The learned move is the shipped torsion diffusion
model (trained in implicit solvent; ``--model`` for another, ``--proposal basins`` for the von Mises basin
mixture). Every NCMC length also gets an independent check of P(phi > 0): the same protocol with the other
proposal (``--check-seconds``), which shares no proposal and no random stream with it; populations must agree
within 2 sigma between the exact methods.

Writes results.md (ESS/s of phi > 0 with ratios to MD and PT, acceptance against protocol length, ms and
MD-step equivalents per move, populations with z-scores), results.json and acceptance.png into ``--out``.
Timings need a quiet machine: other processes on the cores change every ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

QUICK = {"seconds": 6.0, "check_seconds": 4.0, "ncmc_steps": [0, 20], "equilibration_steps": 20,
         "md_steps_per_segment": 50, "pt_replicas": 2, "pt_steps_per_iteration": 10, "energy_samples": 5}
FULL = {"seconds": 1800.0, "check_seconds": 1800.0, "ncmc_steps": [0, 1000, 4000, 10000], "equilibration_steps": 5000,
        "md_steps_per_segment": 250, "pt_replicas": None, "pt_steps_per_iteration": 500, "energy_samples": 200}


def replicas_needed(sigma_U_kJ: float, kT_kJ: float, t_min: float, t_max: float, acceptance: float = 0.3) -> int:
    """Temperatures for ``acceptance`` between neighbours of a geometric ladder (Gaussian energy distributions).

    sigma_U : potential-energy standard deviation at t_min, kJ/mol; it grows about as T, so the spacing
    dbeta / beta = x kT / sigma_U with erfc(x / 2) = acceptance is the same all along the ladder.
    """
    from scipy.special import erfcinv

    x = 2.0 * erfcinv(acceptance)
    return int(math.ceil(1.0 + math.log(t_max / t_min) / (x * kT_kJ / sigma_U_kJ)))


def _potential_sigma(molsys, positions_nm, samples: int, platform_name: str, seed: int) -> float:
    """Standard deviation (kJ/mol) of the potential energy in MD at the system's temperature (samples 20 steps apart)."""
    from openmm_confsample.runner import langevin_context

    context = langevin_context(molsys, timestep_fs=molsys.timestep_fs, seed=seed, platform=platform_name,
                               positions_nm=positions_nm, minimize=False)
    energies = []
    for _ in range(samples):
        context.getIntegrator().step(20)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    return float(np.std(energies))


def _prepare(molsys, settings, platform_name: str, seed: int):
    """Minimised and equilibrated positions (nm), and the box after equilibration (barostat)."""
    from openmm import unit

    from openmm_confsample.runner import langevin_context

    context = langevin_context(molsys, timestep_fs=molsys.timestep_fs, seed=seed, platform=platform_name,
                               equilibration_steps=settings["equilibration_steps"])
    state = context.getState(getPositions=True)
    molsys.system.setDefaultPeriodicBoxVectors(*state.getPeriodicBoxVectors())
    return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def _proposal(kind: str, molsys, model):
    from openmm_confsample.bench.alanine import basin_proposal
    from openmm_confsample.moves.ncmc import solute_diffusion_proposal

    return basin_proposal(molsys) if kind == "basins" else solute_diffusion_proposal(model, molsys)


def _ncmc_run(molsys, proposal, steps: int, seconds: float, settings, args, positions, label: str, seed: int,
              protocol: str = "decouple"):
    from openmm_confsample.bench.samplers import run_md_with_moves
    from openmm_confsample.moves.ncmc import NCMCEngine

    engine = NCMCEngine.for_system(proposal, molsys, ncmc_steps=steps, seed=seed, protocol=protocol,
                                   electrostatics_midpoint=args.electrostatics_midpoint,
                                   sterics_midpoint=args.sterics_midpoint)
    return run_md_with_moves(molsys, engine, seconds, md_steps_per_segment=settings["md_steps_per_segment"],
                             seed=seed, timestep_fs=molsys.timestep_fs, platform=args.platform, equilibration_steps=0,
                             method=label, progress=not args.quiet, positions_nm=positions, cvs=("phi", "psi"))


def _method(steps: int, protocol: str = "decouple") -> str:
    if steps == 0:
        return "MD+instantaneous"
    return f"MD+NCMC({steps})" if protocol == "decouple" else f"MD+NCMC-drive({steps})"


def _protocol_rows(runs, md_ms_per_step: float) -> list[dict]:
    rows = []
    for run in runs:
        stats = run.acceptance
        ms = 1e3 * stats["total_seconds"] / max(stats["n_proposed"], 1)
        protocol = ("instantaneous" if not stats.get("ncmc_steps")
                    else "drive" if "drive" in run.method else "decouple")
        rows.append({"method": run.method, "protocol": protocol, "ncmc_steps": stats.get("ncmc_steps", 0),
                     "moves": stats["n_proposed"],
                     "acceptance": stats["acceptance_rate"], "ms_per_move": ms,
                     "md_step_equivalents_per_move": stats.get("md_step_equivalents_per_move", 1.0),
                     "measured_md_steps_per_move": ms / md_ms_per_step if md_ms_per_step else float("nan"),
                     "mean_work_kT": stats.get("mean_work_kT", float("nan"))})
    return rows


def _protocol_table(rows) -> str:
    lines = ["| method | protocol | ncmc steps | moves | acceptance | ms/move | MD-step equiv./move (counted) "
             "| (measured) | mean work (kT) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['protocol']} | {r['ncmc_steps']} | {r['moves']} | {r['acceptance']:.3f} "
                     f"| {r['ms_per_move']:.0f} "
                     f"| {r['md_step_equivalents_per_move']:.0f} | {r['measured_md_steps_per_move']:.0f} "
                     f"| {r['mean_work_kT']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    instantaneous = [r for r in rows if r["protocol"] == "instantaneous"]
    for protocol, marker in (("decouple", "o-"), ("drive", "s--")):
        series = instantaneous + [r for r in rows if r["protocol"] == protocol]
        if len(series) == len(instantaneous):
            continue
        label = {"decouple": "solute softened, jump at midpoint", "drive": "torsions dragged (TorsionDrive)"}[protocol]
        left.plot([r["ncmc_steps"] for r in series], [r["acceptance"] for r in series], marker, label=label)
        for r in series[len(instantaneous):] if protocol == "drive" and len(rows) > len(series) else series:
            left.annotate(f"{round(r['acceptance'] * r['moves'])}/{r['moves']}", (r["ncmc_steps"], r["acceptance"]),
                          textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        worked = [r for r in series if r["ncmc_steps"] > 0 and math.isfinite(r["mean_work_kT"])]
        right.plot([r["ncmc_steps"] for r in worked], [r["mean_work_kT"] for r in worked], marker, label=label)
    left.set(xlabel="NCMC protocol length (steps; 0 = instantaneous)", ylabel="acceptance",
             ylim=(0, max(0.05, 1.3 * max(r["acceptance"] for r in rows))), title="acceptance against protocol length")
    left.legend(fontsize=7)
    right.set(xlabel="NCMC protocol length (steps)", ylabel="mean work (kT)", title="mean protocol work",
              xscale="log", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _z(a, b) -> float:
    """Difference of two populations over their combined block errors."""
    error = math.hypot(a["p_error"], b["p_error"])
    return (a["p"] - b["p"]) / error if error > 0 and math.isfinite(error) else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks that every sampler runs")
    parser.add_argument("--seconds", type=float, default=None, help="wall seconds per method")
    parser.add_argument("--check-seconds", type=float, default=None,
                        help="wall seconds of each independent check run (the other proposal)")
    parser.add_argument("--ncmc-steps", type=int, nargs="+", default=None, help="protocol lengths (0: instantaneous)")
    parser.add_argument("--proposal", choices=("diffusion", "basins"), default="diffusion")
    parser.add_argument("--protocols", nargs="+", choices=("decouple", "drive"), default=["decouple", "drive"],
                        help="NCMC protocols run at each length: decouple (solute softened, jump at the midpoint), "
                             "drive (torsions dragged by a moving restraint); default both")
    parser.add_argument("--electrostatics-midpoint", type=float, default=0.0, help="lambda_electrostatics at the jump")
    parser.add_argument("--sterics-midpoint", type=float, default=0.5, help="lambda_sterics at the jump")
    parser.add_argument("--model", default="alanine-dipeptide", help="torsion diffusion model (name or path)")
    parser.add_argument("--pt-replicas", type=int, default=None, help="default: estimated for ~30 %% exchange")
    parser.add_argument("--pt-t-max", type=float, default=450.0)
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "out", "ncmc"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("seconds", "check_seconds", "ncmc_steps", "pt_replicas"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)

    from openmm_confsample.bench.alanine import ALANINE_INDICATORS, PHI_POSITIVE
    from openmm_confsample.bench.samplers import run_parallel_tempering, run_plain_md
    from openmm_confsample.bench.summary import markdown_table, population_estimate, summarize
    from openmm_confsample.systems import get_system

    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    molsys = get_system("alanine-dipeptide-explicit")
    positions = _prepare(molsys, settings, args.platform, args.seed)
    molsys.positions_nm = positions  # every sampler (PT too) starts from the prepared structure
    runs = [run_plain_md(molsys, settings["seconds"], timestep_fs=molsys.timestep_fs, seed=args.seed,
                         platform=args.platform, equilibration_steps=0, method="MD", progress=not args.quiet,
                         positions_nm=positions, cvs=("phi", "psi"))]
    md_ms_per_step = 1e3 * runs[0].wall_seconds / max(runs[0].settings["md_steps"], 1)

    learned = _proposal(args.proposal, molsys, args.model)
    other_kind = "basins" if args.proposal == "diffusion" else "diffusion"
    move_runs, checks = [], {}
    for i, steps in enumerate(settings["ncmc_steps"]):
        for k, protocol in enumerate(args.protocols if steps > 0 else args.protocols[:1]):
            method = _method(steps, protocol)
            move_runs.append(_ncmc_run(molsys, learned, steps, settings["seconds"], settings, args, positions,
                                       method, args.seed + 1 + i + 50 * k, protocol))
            if steps > 0 and settings["check_seconds"] > 0:
                other = _proposal(other_kind, molsys, args.model)
                checks[method] = _ncmc_run(molsys, other, steps, settings["check_seconds"], settings, args, positions,
                                           f"check: {other_kind} {method[3:]}", args.seed + 101 + i + 50 * k, protocol)
    runs += move_runs

    sigma_U = _potential_sigma(molsys, positions, settings["energy_samples"], args.platform, args.seed)
    estimated = replicas_needed(sigma_U, molsys.kT, molsys.temperature_K, args.pt_t_max)
    n_replicas = settings["pt_replicas"] or estimated
    runs.append(run_parallel_tempering(molsys, settings["seconds"], n_replicas=n_replicas,
                                       t_min=molsys.temperature_K, t_max=args.pt_t_max,
                                       steps_per_iteration=settings["pt_steps_per_iteration"], seed=args.seed,
                                       timestep_fs=molsys.timestep_fs, platform=args.platform, method="PT",
                                       progress=not args.quiet, equilibration_steps=0, cvs=("phi", "psi")))
    for run in runs + list(checks.values()):
        run.check()

    rows = summarize(runs, ALANINE_INDICATORS, primary=PHI_POSITIVE.name, md_method="MD", pt_method="PT")
    protocol_rows = _protocol_rows(move_runs, md_ms_per_step)
    _plot(protocol_rows, os.path.join(args.out, "acceptance.png"))
    populations = {run.method: population_estimate(run.indicator(PHI_POSITIVE)).to_dict()
                   for run in runs + list(checks.values())}
    agreement = []
    pt = populations["PT"]
    for run in move_runs:
        entry = {"method": run.method, "p": populations[run.method]["p"], "z_vs_pt": _z(populations[run.method], pt)}
        if run.method in checks:
            entry["z_vs_check"] = _z(populations[run.method], populations[checks[run.method].method])
        agreement.append(entry)

    header = [f"# NCMC benchmark: alanine-dipeptide-explicit ({datetime.date.today()}, {platform.node()}, "
              f"{os.cpu_count()} cores, platform {args.platform}, {'quick' if args.quick else 'full'})", "",
              f"{settings['seconds']:g} s per method; protocols: {', '.join(args.protocols)} (decouple: solute "
              f"softened to lambda_electrostatics {args.electrostatics_midpoint:g}, lambda_sterics "
              f"{args.sterics_midpoint:g} at the jump; drive: TorsionDrive defaults); proposal: {args.proposal}"
              f"{' (' + str(args.model) + ')' if args.proposal == 'diffusion' else ''}; MD {md_ms_per_step:.1f} ms "
              f"per 2 fs step.", "",
              f"Parallel tempering: {n_replicas} replicas {molsys.temperature_K:g}-{args.pt_t_max:g} K "
              f"({estimated} estimated from sigma_U = {sigma_U:.0f} kJ/mol at {molsys.temperature_K:g} K for ~30 % "
              f"neighbour exchange{'; quick mode runs fewer' if args.quick else ''}).", ""]
    text = "\n".join(header) + "\n## ESS/s of phi > 0\n\n" + markdown_table(rows) + "\n## Protocol length\n\n" \
        + _protocol_table(protocol_rows) + "\n## P(phi > 0) agreement (|z| < 2 expected)\n\n" \
        + "\n".join(f"- {a['method']}: P = {a['p']:.4f}, z vs PT {a['z_vs_pt']:+.2f}"
                    + (f", z vs independent check {a['z_vs_check']:+.2f}" if "z_vs_check" in a else "")
                    for a in agreement) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump({"settings": settings, "args": vars(args), "rows": rows, "protocol": protocol_rows,
                   "populations": populations, "agreement": agreement, "sigma_U_kJ": sigma_U,
                   "pt_replicas_estimated": estimated, "runs": [r.to_dict() for r in runs],
                   "checks": [r.to_dict() for r in checks.values()],
                   "wall_seconds": time.perf_counter() - started}, handle, indent=1, default=str)
    print(text)
    print(f"wrote {args.out}/results.md, results.json, acceptance.png ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
