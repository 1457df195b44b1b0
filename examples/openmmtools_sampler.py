"""Learned moves as openmmtools MCMC moves: MCMCSampler with SequenceMove([Langevin, learned]).

Run:  python examples/openmmtools_sampler.py        (about 20 s on 2 CPU cores)
"""

import numpy as np
import openmm_confsample  # noqa: F401  (first: it silences pymbar's import-time banner)
import openmm
from openmm import unit
from openmmtools import cache, mcmc

from openmm_confsample.geometry import dihedral_angles
from openmm_confsample.models import shipped_model_path
from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionMove
from openmm_confsample.systems import get_system

ala = get_system("alanine-dipeptide-implicit")
learned = TorsionDiffusionMove(shipped_model_path(), ala, n_proposals=4, seed=1)
langevin = mcmc.LangevinDynamicsMove(timestep=1 * unit.femtosecond, collision_rate=1 / unit.picosecond, n_steps=50,
                                     reassign_velocities=False)
sampler = mcmc.MCMCSampler(ala.thermodynamic_state(), ala.sampler_state(), mcmc.SequenceMove([langevin, learned]))
context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))

phi = []
for _ in range(500):
    sampler.run(1, context_cache=context_cache)
    positions = np.asarray(sampler.sampler_state.positions.value_in_unit(unit.nanometer))
    phi.append(dihedral_angles(positions, ala.torsion_array)[0])
stats = learned.statistics
print(f"acceptance {stats['acceptance_rate']:.2f}, P(phi > 0) = {np.mean(np.array(phi) > 0):.3f} "
      f"over {len(phi)} iterations")
