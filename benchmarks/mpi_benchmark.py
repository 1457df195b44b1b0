"""Scale-out under MPI (issue 17): parallel tempering with learned moves and independent walkers, 1 rank vs 2.

    python benchmarks/mpi_benchmark.py --quick                          # CI-sized: checks that it runs (~1-2 min)
    python benchmarks/mpi_benchmark.py --out benchmarks/out/mpi         # the measurement (~3-5 min, idle machine)

(a) Parallel tempering of alanine-dipeptide-implicit, 4 replicas 300-450 K, each iteration
    ``LangevinDynamicsMove`` then ``TorsionDiffusionMove`` with the shipped model, run for the same number
    of iterations under ``mpiexec -n 1`` and ``mpiexec -n 2``: wall-time speedup, and per iteration the
    cost that does not shrink with more ranks: storage (rank 0 writes), exchange (rank 0 mixes, then
    broadcasts), gathering (positions to rank 0, move statistics to all, the energy matrix; measured as
    the time the distributed calls take beyond the slowest rank's own work).
(b) Independent walkers (``parallel.run_walkers``, MD + TorsionDiffusionMove), 1 walker on 1 rank vs 2
    walkers on 2 ranks, the same length each: pooled ESS per wall second of ``phi > 0``.

Each configuration runs as ``mpiexec -n R python benchmarks/mpi_benchmark.py --worker ...`` (one JSON file
per run); every rank keeps to ``--threads`` CPU threads (default 1, so the 1-rank run uses one core and the
2-rank run two). The timings mean something only on an otherwise idle machine with at least 2 free cores.
Writes ``results.json`` and ``results.md`` into ``--out``; exits 1 if a run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.abspath(__file__)
MODES = {
    "quick": {"iterations": 3, "steps_per_iteration": 100, "walker_ps": 1.0, "segment_ps": 0.1},
    "full": {"iterations": 30, "steps_per_iteration": 500, "walker_ps": 100.0, "segment_ps": 0.1},
}
PHASES = ("propagate", "propagate_work", "energies", "energies_work", "exchange", "storage")


# --- workers: run under mpiexec ---------------------------------------------------------------------------

def _timed_sampler_class():
    """MPIParallelTemperingSampler with each phase of an iteration timed on every rank."""
    from openmm_confsample.parallel.replica import MPIParallelTemperingSampler

    def timed(name, method):
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self.phase_seconds[name] += time.perf_counter() - start
        return wrapper

    base = MPIParallelTemperingSampler
    return type("TimedParallelTemperingSampler", (base,), {
        "_propagate_replicas": timed("propagate", base._propagate_replicas),
        "_propagate_replica": timed("propagate_work", base._propagate_replica),
        "_compute_energies": timed("energies", base._compute_energies),
        "_compute_replica_energies": timed("energies_work", base._compute_replica_energies),
        "_mix_replicas": timed("exchange", base._mix_replicas),
        "_report_iteration": timed("storage", base._report_iteration),
    })


def worker_pt(args) -> dict:
    from openmm import unit
    from openmmtools import mcmc, multistate

    from openmm_confsample.models import shipped_model_path
    from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
    from openmm_confsample.parallel import configure_rank, get_comm
    from openmm_confsample.parallel.replica import learned_move_statistics
    from openmm_confsample.systems import get_system

    config = configure_rank(seed=args.seed, n_threads=args.threads)
    comm = get_comm()
    ala = get_system("alanine-dipeptide-implicit")
    # Each state's copy of the move fills its own buffer of pre-drawn proposals on each rank that runs it: with 2
    # ranks up to 8 buffers instead of 4. 128 proposals (0.09 s to draw; 32 iterations of 4) keeps that small.
    move = TorsionDiffusionMove(shipped_model_path(), ala, n_proposals=4, buffer_size=128, seed=args.seed)
    dynamics = mcmc.LangevinDynamicsMove(timestep=1.0 * unit.femtosecond, collision_rate=1.0 / unit.picosecond,
                                         n_steps=args.steps_per_iteration, reassign_velocities=True)
    sampler = _timed_sampler_class()(mcmc_moves=mcmc.SequenceMove([dynamics, move]),
                                     number_of_iterations=args.iterations + 1, online_analysis_interval=None)
    sampler.phase_seconds = defaultdict(float)
    storage = os.path.join(args.scratch, "pt.nc")
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=10)
    with contextlib.redirect_stdout(io.StringIO()):  # citations
        sampler.create(ala.thermodynamic_state(), ala.sampler_state(), reporter, min_temperature=300 * unit.kelvin,
                       max_temperature=450 * unit.kelvin, n_temperatures=4)
        sampler.energy_context_cache = config.context_cache("Reference")
        sampler.sampler_context_cache = config.context_cache("Reference")
        sampler.run(n_iterations=1)  # warm-up: numba compiles the mixing, contexts are created, models load
        sampler.phase_seconds.clear()
        if comm is not None:
            comm.barrier()
        start = time.perf_counter()
        sampler.run(n_iterations=args.iterations)
        wall = time.perf_counter() - start
    reporter.close()
    phases = comm.gather(dict(sampler.phase_seconds), root=0) if comm else [dict(sampler.phase_seconds)]
    statistics = learned_move_statistics(sampler)
    return {"kind": "pt", "n_ranks": config.size, "iterations": args.iterations, "wall_seconds": wall,
            "phase_seconds_by_rank": phases, "acceptance": [s.get("acceptance_rate") for s in statistics],
            "n_proposed": [s.get("n_proposed") for s in statistics], "rank_config": config.as_dict()}


def worker_walkers(args) -> dict:
    from openmm_confsample.models import shipped_model_path
    from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
    from openmm_confsample.parallel import configure_rank, run_walkers
    from openmm_confsample.systems import get_system

    config = configure_rank(seed=args.seed, n_threads=args.threads)
    ala = get_system("alanine-dipeptide-implicit")
    path = shipped_model_path()
    TorsionDiffusionMove(path, ala)  # load the model before the clock starts, as the PT warm-up does
    result = run_walkers(ala, lambda walker, generator: TorsionDiffusionMove(path, ala, n_proposals=4, seed=generator),
                         config.size, args.walker_ps, os.path.join(args.scratch, "walkers"), seed=args.seed,
                         segment_ps=args.segment_ps, equilibration_ps=args.segment_ps)
    summary = result.summary
    return {"kind": "walkers", "n_ranks": config.size, "n_walkers": summary["n_walkers"],
            "wall_seconds": summary["wall_seconds"], "failed": summary["failed"],
            "phi_positive": summary["indicators"]["phi > 0"], "move_statistics": summary["move_statistics"],
            "rank_config": config.as_dict()}


def run_worker(args) -> None:
    result = (worker_pt if args.worker == "pt" else worker_walkers)(args)
    from openmm_confsample.parallel import rank_and_size

    if rank_and_size()[0] == 0:
        tmp = args.result + ".partial"
        with open(tmp, "w") as handle:
            json.dump(result, handle, indent=2)
        os.replace(tmp, args.result)


# --- driver -----------------------------------------------------------------------------------------------

def _mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if found is None:
        sys.exit("mpiexec not found: pip install -e '.[mpi]'")
    return found


def launch(kind: str, n_ranks: int, settings: dict, args, scratch: str) -> dict:
    os.makedirs(scratch, exist_ok=True)
    result = os.path.join(scratch, "result.json")
    command = [_mpiexec(), "-n", str(n_ranks), sys.executable, HERE, "--worker", kind, "--result", result,
               "--scratch", scratch, "--seed", str(args.seed), "--threads", str(args.threads),
               "--iterations", str(settings["iterations"]), "--steps-per-iteration",
               str(settings["steps_per_iteration"]), "--walker-ps", str(settings["walker_ps"]),
               "--segment-ps", str(settings["segment_ps"])]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0 or not os.path.exists(result):
        raise RuntimeError(f"{kind} on {n_ranks} rank(s) failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    with open(result) as handle:
        data = json.load(handle)
    data["launch_seconds"] = time.perf_counter() - start
    return data


def per_iteration_costs(run: dict) -> dict:
    """Seconds per iteration of each phase on rank 0, and the part of the distributed calls beyond the slowest
    rank's own work (gathering and waiting)."""
    ranks, n = run["phase_seconds_by_rank"], run["iterations"]
    rank0 = {phase: ranks[0].get(phase, 0.0) / n for phase in PHASES}
    slowest_propagate = max(r.get("propagate_work", 0.0) for r in ranks) / n
    slowest_energies = max(r.get("energies_work", 0.0) for r in ranks) / n
    gathering = (rank0["propagate"] - slowest_propagate) + (rank0["energies"] - slowest_energies)
    total = run["wall_seconds"] / n
    return {"iteration": total, "md_and_moves": slowest_propagate, "energy_matrix": slowest_energies,
            "storage": rank0["storage"], "exchange": rank0["exchange"], "gathering": gathering,
            "non_scaling": rank0["storage"] + rank0["exchange"] + gathering}


def markdown(results: dict) -> str:
    lines = [f"# MPI scale-out ({results['mode']} mode)", "", f"- machine: {results['machine']}",
             f"- command: `{results['command']}`", "", "## (a) Parallel tempering, 4 replicas, learned moves", "",
             "| ranks | iterations | wall s | s/iteration | MD+moves | energy matrix | storage | exchange | gathering |"
             " non-scaling |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["pt"]:
        c = run["per_iteration"]
        lines.append(f"| {run['n_ranks']} | {run['iterations']} | {run['wall_seconds']:.2f} | {c['iteration']:.3f} | "
                     f"{c['md_and_moves']:.3f} | {c['energy_matrix']:.4f} | {c['storage']:.4f} | {c['exchange']:.4f} | "
                     f"{c['gathering']:.4f} | {c['non_scaling']:.4f} |")
    if results["mode"] == "quick":
        lines += ["", "Quick mode checks that the runs work; its timings mean nothing (warm-up dominates)."]
    lines += ["", f"Speedup 2 ranks vs 1: **{results['pt_speedup']:.2f}x** (issue target >= 1.7x)", "",
              "## (b) Independent walkers, MD + TorsionDiffusionMove", "",
              "| walkers (= ranks) | ps each | wall s | P(phi>0) | pooled ESS | ESS/s | R-hat |",
              "|---|---|---|---|---|---|---|"]
    for run in results["walkers"]:
        p = run["phi_positive"]
        r_hat = "n/a" if p["r_hat"] is None else f"{p['r_hat']:.3f}"
        lines.append(f"| {run['n_walkers']} | {results['settings']['walker_ps']} | {run['wall_seconds']:.2f} | "
                     f"{p['mean']:.4f} | {p['ess']:.1f} | {p['ess_per_second']:.3f} | {r_hat} |")
    lines += ["", f"Pooled ESS/s, 2 walkers vs 1: **{results['walker_ess_ratio']:.2f}x** (issue target >= 1.8x)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized runs: checks that everything works")
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    # worker mode (used by the driver)
    parser.add_argument("--worker", choices=("pt", "walkers"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps-per-iteration", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--walker-ps", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--segment-ps", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    out = args.out or tempfile.mkdtemp(prefix=f"confsample-mpi-{mode}-")
    os.makedirs(out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="confsample-mpi-scratch-")
    results = {"mode": mode, "settings": settings, "seed": args.seed, "threads_per_rank": args.threads,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start",
               "command": "python benchmarks/mpi_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "pt": [], "walkers": []}
    try:
        for n_ranks in (1, 2):
            run = launch("pt", n_ranks, settings, args, os.path.join(scratch, f"pt{n_ranks}"))
            run["per_iteration"] = per_iteration_costs(run)
            results["pt"].append(run)
            print(f"PT, {n_ranks} rank(s): {run['wall_seconds']:.2f} s for {run['iterations']} iterations", flush=True)
        for n_ranks in (1, 2):
            run = launch("walkers", n_ranks, settings, args, os.path.join(scratch, f"walkers{n_ranks}"))
            results["walkers"].append(run)
            print(f"walkers, {n_ranks}: pooled ESS/s of phi > 0 = {run['phi_positive']['ess_per_second']:.3f}",
                  flush=True)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["pt_speedup"] = results["pt"][0]["wall_seconds"] / results["pt"][1]["wall_seconds"]
    one, two = (run["phi_positive"]["ess_per_second"] for run in results["walkers"])
    results["walker_ess_ratio"] = two / one if one else float("nan")
    results["load_average_at_end"] = os.getloadavg()
    for name, text in (("results.json", json.dumps(results, indent=2)), ("results.md", markdown(results))):
        with open(os.path.join(out, name + ".partial"), "w") as handle:
            handle.write(text)
        os.replace(os.path.join(out, name + ".partial"), os.path.join(out, name))
    print(markdown(results))
    print(f"wrote {out}/results.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
