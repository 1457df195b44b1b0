"""A plain OpenMM script plus the shipped Timewarp flow as an exact MH move (one added line).

Run:  python examples/timewarp_move.py        (about 20 s on 2 CPU cores)

The flow (internal coordinates, tau = 5 ps) was trained on MD with a learned torsion bias, so it proposes
phi flips that plain MD at 300 K makes a few times per nanosecond; the MH test against this System's
potential keeps the sampling Boltzmann. The script prints the move's acceptance and the fraction of frames
with phi > 0 (about 0.02 at equilibrium; plain MD from this start stays near 0 for nanoseconds).
"""

import sys

import mdtraj
import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from openmm_confsample.moves import LearnedMoveReporter, TimewarpMove
from openmm_confsample.systems import get_system

# --- an ordinary OpenMM script -------------------------------------------------------------------
ala = get_system("alanine-dipeptide-implicit")  # amber99sbildn + OBC, no constraints (the flow moves every atom)
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
simulation = app.Simulation(ala.topology, ala.system, integrator, openmm.Platform.getPlatformByName("Reference"))
simulation.context.setPositions(ala.positions_nm)
simulation.minimizeEnergy()
simulation.reporters.append(app.DCDReporter("timewarp_move.dcd", 50))
simulation.reporters.append(app.StateDataReporter(sys.stdout, 5000, step=True, potentialEnergy=True, speed=True))

# --- the one added line: 16 Timewarp MH steps (one batched flow call) every 20 MD steps ----------------
simulation.reporters.append(LearnedMoveReporter(TimewarpMove("alanine-dipeptide-timewarp", simulation, n_proposals=16,
                                                             seed=0), interval=20))

simulation.step(20000)
stats = simulation.reporters[-1].statistics
traj = mdtraj.load("timewarp_move.dcd", top=ala.mdtraj_topology())
phi = mdtraj.compute_phi(traj)[1][:, 0]
print(f"Timewarp moves: {stats['n_proposed']} proposals, acceptance {stats['acceptance_rate']:.3f}, "
      f"{1e3 * stats['seconds_per_proposal']:.2f} ms per proposal")
print(f"frames with phi > 0: {np.mean(phi > 0):.3f} of {len(phi)} "
      f"(entries into phi > 0: {int(np.sum(np.diff((phi > 0).astype(int)) > 0))})")
