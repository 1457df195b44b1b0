"""Engine and reporter overhead on alanine-dipeptide-implicit (Reference and CPU platforms).

(a) The MH engine's own cost per move, excluding the proposal call and the candidate's energy evaluation:
    ``(total_seconds - proposal_seconds - energy_seconds) / n_moves`` from the engine statistics, with a
    trivial proposal (the current structure, always accepted). Two cases: the caller passes the current
    positions and energy (consecutive moves), or the engine reads them from the Context (first move after MD;
    that read is one more energy evaluation and is counted in the overhead here). Target: < 0.5 ms.
(b) The extra wall time of ``LearnedMoveReporter(move, interval=500)`` on an ``openmm.app.Simulation``
    against the same simulation without it (target < 5 %), for the trivial move and for a
    TorsionDiffusionMove with the shipped model (its buffer refills are amortized in the timing; one
    warm-up move fills the first buffer before the clock).

    python benchmarks/engine_overhead.py [--steps 50000] [--repeats 3] [--platforms Reference CPU]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from openmm_confsample.moves.engine import MetropolisHastingsEngine, Proposal, ProposalBatch
from openmm_confsample.moves.reporter import LearnedMoveReporter
from openmm_confsample.systems import get_system


class TrivialProposal(Proposal):
    """Proposes the current structure (zero Hastings term): isolates the engine's own bookkeeping."""

    cartesian = False

    def propose(self, positions_nm, n_proposals, rng):
        return ProposalBatch(np.repeat(positions_nm[None], n_proposals, axis=0), np.zeros(n_proposals))


def engine_overhead(molsys, platform: str, n_moves: int = 2000) -> dict:
    context = molsys.create_context(platform)
    rows = {}
    for mode in ("positions passed", "read from context"):
        engine = MetropolisHastingsEngine(TrivialProposal(), 1, seed=0)
        engine.step(context, molsys.kT)  # warm-up
        engine.reset_statistics()
        positions = energy = None
        for _ in range(n_moves):
            result = engine.step(context, molsys.kT, positions, energy)
            if mode == "positions passed":
                positions, energy = result.positions_nm, result.potential_kJ
        s = engine.statistics
        rows[mode] = {
            "overhead_ms_per_move": 1e3 * (s["total_seconds"] - s["proposal_seconds"] - s["energy_seconds"]) / s["n_moves"],
            "proposal_ms_per_move": 1e3 * s["proposal_seconds"] / s["n_moves"],
            "energy_ms_per_move": 1e3 * s["energy_seconds"] / s["n_moves"],
            "total_ms_per_move": 1e3 * s["total_seconds"] / s["n_moves"],
        }
    return rows


def _simulation(molsys, platform: str, seed: int):
    integrator = openmm.LangevinMiddleIntegrator(molsys.temperature_K * unit.kelvin, 1 / unit.picosecond,
                                                 1 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(molsys.topology, molsys.system, integrator, openmm.Platform.getPlatformByName(platform))
    simulation.context.setPositions(molsys.positions_nm)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(molsys.temperature_K * unit.kelvin, seed)
    simulation.step(500)
    return simulation


def reporter_overhead(molsys, platform: str, make_move, n_steps: int, repeats: int, interval: int = 500) -> dict:
    """Median wall time of ``n_steps`` with and without the reporter (runs alternate, same process)."""
    plain, with_move = [], []
    statistics_last = None
    for r in range(repeats):
        simulation = _simulation(molsys, platform, seed=r + 1)
        t0 = time.perf_counter()
        simulation.step(n_steps)
        plain.append(time.perf_counter() - t0)

        simulation = _simulation(molsys, platform, seed=r + 1)
        move = make_move()
        reporter = LearnedMoveReporter(move, interval=interval)
        reporter.engine.step(simulation.context, molsys.kT)  # warm-up: model load, first proposal buffer
        reporter.engine.reset_statistics()
        simulation.reporters.append(reporter)
        t0 = time.perf_counter()
        simulation.step(n_steps)
        with_move.append(time.perf_counter() - t0)
        statistics_last = reporter.statistics
    base, extra = statistics.median(plain), statistics.median(with_move)
    return {"plain_s": base, "with_reporter_s": extra, "overhead_percent": 100.0 * (extra - base) / base,
            "moves": statistics_last["n_moves"], "acceptance": statistics_last["acceptance_rate"],
            "ms_per_move": 1e3 * statistics_last["total_seconds"] / max(statistics_last["n_moves"], 1),
            "plain_all_s": plain, "with_reporter_all_s": with_move}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50000, help="MD steps per timed simulation (default 50000)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians reported (default 3)")
    parser.add_argument("--moves", type=int, default=2000, help="engine steps for (a) (default 2000)")
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--model", default=None, help="torsion diffusion model (default: the shipped one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from openmm_confsample.bench.alanine import SHIPPED_MODEL
    from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove

    molsys = get_system("alanine-dipeptide-implicit")
    model = args.model or SHIPPED_MODEL
    results = {"engine": {}, "reporter": {}}
    for platform in args.platforms:
        results["engine"][platform] = engine_overhead(molsys, platform, args.moves)
        moves = {"trivial": lambda: MetropolisHastingsEngine(TrivialProposal(), 1, seed=0)}
        if os.path.isfile(model):
            moves["TorsionDiffusionMove"] = lambda: TorsionDiffusionMove(model, molsys, buffer_size=256, seed=0)
        results["reporter"][platform] = {
            name: reporter_overhead(molsys, platform, make, args.steps, args.repeats) for name, make in moves.items()}

    print("(a) engine overhead per move, excluding proposal and candidate energy (target < 0.5 ms)")
    print(f"| platform | mode | overhead ms | proposal ms | energy ms | total ms |\n|---|---|---|---|---|---|")
    for platform, modes in results["engine"].items():
        for mode, r in modes.items():
            print(f"| {platform} | {mode} | {r['overhead_ms_per_move']:.3f} | {r['proposal_ms_per_move']:.3f} | "
                  f"{r['energy_ms_per_move']:.3f} | {r['total_ms_per_move']:.3f} |")
    print(f"\n(b) LearnedMoveReporter(move, interval=500) on app.Simulation, {args.steps} steps, median of "
          f"{args.repeats} (target < 5 %)")
    print("| platform | move | without s | with s | overhead % | moves | acceptance | ms/move |\n|---|---|---|---|---|---|---|---|")
    for platform, by_move in results["reporter"].items():
        for name, r in by_move.items():
            print(f"| {platform} | {name} | {r['plain_s']:.2f} | {r['with_reporter_s']:.2f} | "
                  f"{r['overhead_percent']:+.1f} | {r['moves']} | {r['acceptance']:.2f} | {r['ms_per_move']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
