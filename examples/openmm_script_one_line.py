"""A plain OpenMM script with its usual reporters, plus ONE line that adds learned torsion moves.

Run:  python examples/openmm_script_one_line.py        (about 30 s on 2 CPU cores)
"""

import sys

import openmm
import openmm.app as app
from openmm import unit

from openmm_confsample.moves import LearnedMoveReporter, TorsionDiffusionMove
from openmm_confsample.systems import get_system

# --- an ordinary OpenMM script -------------------------------------------------------------------
ala = get_system("alanine-dipeptide-implicit")  # amber99sbildn + OBC, no constraints, 300 K
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
simulation = app.Simulation(ala.topology, ala.system, integrator, openmm.Platform.getPlatformByName("Reference"))
simulation.context.setPositions(ala.positions_nm)
simulation.minimizeEnergy()
simulation.reporters.append(app.DCDReporter("one_line.dcd", 500))
simulation.reporters.append(app.StateDataReporter(sys.stdout, 5000, step=True, potentialEnergy=True, speed=True))

# --- the one added line: 4 torsion-diffusion MH steps every 50 MD steps (shipped model, by name) -----------
simulation.reporters.append(LearnedMoveReporter(TorsionDiffusionMove("alanine-dipeptide", simulation, n_proposals=4,
                                                                     seed=0), interval=50))

simulation.step(20000)
stats = simulation.reporters[-1].statistics
print(f"learned moves: {stats['n_proposed']} proposals, acceptance {stats['acceptance_rate']:.2f}, "
      f"{1e3 * stats['seconds_per_proposal']:.2f} ms per proposal")
