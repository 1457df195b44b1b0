"""Langevin MD of alanine-dipeptide-implicit for Timewarp training: frames every 0.05 ps, one .npy per trajectory.

    OMP_NUM_THREADS=1 python benchmarks/timewarp_data.py --out /tmp/timewarp_work/md --n-traj 8 --length-ps 1000

Each trajectory starts from the minimised PDB structure with its own seed and 20 ps of equilibration; pairs
are later formed within one trajectory only. Frames are float32 nm, shape (n_frames, 22, 3).

With ``--bias learned_bias.pt`` (a ``LearnedTorsionBias``, e.g. from ``confsample bias`` or the benchmark's
``learned_bias.pt``) the MD runs on the biased potential, so phi crosses its barrier often; the bias energy
of every frame (kJ/mol) is saved as ``bias_SEED.npy``. A Timewarp flow trained on such pairs is still
an exact proposal: the MH test is against the unbiased potential.
"""

import argparse
import json
import os
import time

import numpy as np
from openmm import unit

from openmm_confsample.bias import with_learned_bias
from openmm_confsample.runner import langevin_context
from openmm_confsample.systems import get_system


def run(out, n_traj, length_ps, save_interval_ps, seed0, timestep_fs=1.0, friction_per_ps=1.0, bias=None):
    ala = get_system("alanine-dipeptide-implicit")
    added = None
    if bias is not None:
        ala, added = with_learned_bias(ala, bias, backend="pythonforce")
    os.makedirs(out, exist_ok=True)
    steps_per_frame = int(round(save_interval_ps * 1000 / timestep_fs))
    n_frames = int(round(length_ps / save_interval_ps))
    for i in range(n_traj):
        seed = seed0 + i
        context = langevin_context(ala, friction_per_ps=friction_per_ps, timestep_fs=timestep_fs, seed=seed,
                                   equilibration_steps=int(round(20.0 * 1000 / timestep_fs)))
        integrator = context.getIntegrator()
        frames = np.empty((n_frames, len(ala.atom_labels), 3), np.float32)
        bias_kJ = np.zeros(n_frames)
        t0 = time.time()
        for f in range(n_frames):
            integrator.step(steps_per_frame)
            frames[f] = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            if added is not None:
                bias_kJ[f] = context.getState(getEnergy=True, groups={added.force_group}).getPotentialEnergy().value_in_unit(
                    unit.kilojoule_per_mole)
        if added is not None:
            np.save(os.path.join(out, f"bias_{seed}.npy"), bias_kJ)
        np.save(os.path.join(out, f"traj_{seed}.npy"), frames)
        with open(os.path.join(out, f"traj_{seed}.json"), "w") as fh:
            json.dump({"seed": seed, "save_interval_ps": save_interval_ps, "length_ps": length_ps,
                       "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps,
                       "temperature_K": ala.temperature_K, "seconds": time.time() - t0, "bias": bias}, fh)
        print(f"trajectory {seed}: {n_frames} frames in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/timewarp_work/md")
    parser.add_argument("--n-traj", type=int, default=8)
    parser.add_argument("--length-ps", type=float, default=1000.0)
    parser.add_argument("--save-interval-ps", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--bias", default=None, help="LearnedTorsionBias checkpoint to add to the potential")
    args = parser.parse_args()
    run(args.out, args.n_traj, args.length_ps, args.save_interval_ps, args.seed, bias=args.bias)
