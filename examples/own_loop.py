"""For users who run their own MD loop: apply_learned_move on any Context.

Run:  python examples/own_loop.py        (about 15 s on 2 CPU cores)
"""

import openmm
from openmm import unit

from openmm_confsample.models import shipped_model_path
from openmm_confsample.moves.reporter import apply_learned_move
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.systems import get_system

ala = get_system("alanine-dipeptide-implicit")
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
context = ala.create_context("Reference", integrator)
context.setVelocitiesToTemperature(300 * unit.kelvin, 0)
move = TorsionDiffusionMove(shipped_model_path(), ala, seed=3)

accepted = 0
for segment in range(1000):
    integrator.step(50)
    accepted += apply_learned_move(context, move)  # temperature taken from the integrator
print(f"{accepted} of {move.statistics['n_proposed']} learned moves accepted")
