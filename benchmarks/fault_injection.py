"""Reliability figures of issue 13: 10^5 faulty MH moves of each kind, and memory over 10^5 reporter moves.

    python benchmarks/fault_injection.py                  # 10^5 moves per fault kind, 10^5 reporter moves
    python benchmarks/fault_injection.py --moves 20000    # quicker

Prints a markdown table: per fault kind the candidates tried, accepted, rejected as faulty, exceptions
caught, non-finite states left in the Context (must be 0), whether the counters add up, and the mean
kinetic temperature (the thermostat is at 300 K; the 4-atom chain has 12 degrees of freedom, so its
instantaneous temperature fluctuates by about 120 K); then the resident memory (RSS) of a plain
``Simulation`` with the one-line reporter before and after 10^5 moves.
"""

from __future__ import annotations

import argparse
import os
import time

import openmm
from openmm import app, unit

from openmm_confsample.faults import FAULTS, run_fault_injection
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves import LearnedMoveReporter, VonMisesTorsionProposal
from openmm_confsample.testing import four_atom_torsion_system


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def memory_over_reporter_moves(n_moves: int) -> dict:
    chain = four_atom_torsion_system()
    torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 1 * unit.femtosecond)
    simulation = app.Simulation(chain.topology, chain.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(chain.positions_nm)
    reporter = LearnedMoveReporter(VonMisesTorsionProposal(torsions, kappa=0.0), interval=1)
    simulation.reporters.append(reporter)
    simulation.step(5000)  # warm-up: caches and allocator pools settle
    before = rss_mb()
    simulation.step(n_moves)
    after = rss_mb()
    return {"moves": n_moves, "accepted": reporter.statistics["n_accepted"], "rss_before_mb": before,
            "rss_after_mb": after}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=100_000, help="MH candidates per fault kind (default 1e5)")
    args = parser.parse_args(argv)
    chain = four_atom_torsion_system()
    torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)
    print("| fault | tried | accepted | rejected as faulty | exceptions caught | non-finite states left | "
          "counters add up | mean T (K) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fault in FAULTS:
        start = time.perf_counter()
        r = run_fault_injection(chain, VonMisesTorsionProposal(torsions, kappa=1.0), fault, args.moves)
        print(f"| {r.fault} | {r.n_proposed} | {r.n_accepted} | {r.n_rejected_faulty} | {r.n_raised} | "
              f"{r.n_nonfinite_states} | {r.counters_add_up} | {r.temperature_K:.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
    memory = memory_over_reporter_moves(args.moves)
    print(f"\nreporter moves: {memory['moves']} ({memory['accepted']} accepted); RSS {memory['rss_before_mb']:.1f} MB "
          f"-> {memory['rss_after_mb']:.1f} MB")


if __name__ == "__main__":
    main()
