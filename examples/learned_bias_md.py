"""Biased MD with a learned torsion bias, refined by rounds and reweighted back to the unbiased ensemble.

1. short unbiased MD of alanine dipeptide (implicit solvent), which stays at phi < 0;
2. ``refine_learned_bias``: a torsion diffusion model of those frames gives a well-tempered bias on
   phi/psi (its free energy F = -kT log q times 1 - 1/gamma, capped where the data never went); each round
   runs biased MD, trains a new model on all frames so far and rebuilds the bias (TorchForce when
   openmm-torch imports, else OpenMM's PythonForce);
3. production biased MD with the last bias: reweighted P(phi > 0) and Delta F = F(phi > 0) - F(phi < 0);
4. plots: Ramachandran surfaces (unbiased data, biased production, production reweighted) and F(phi).

Run:  python examples/learned_bias_md.py               (about 8 minutes on 2 CPU cores)
      python examples/learned_bias_md.py --rounds 1 --round-ps 50 --length-ps 100 --train-ps 50   (~2 min)
"""

import argparse
import os
import tempfile
import time

import numpy as np

from openmm_confsample.analysis.free_energy import basin_free_energy
from openmm_confsample.analysis.plots import plot_free_energy_1d, plot_ramachandran_comparison
from openmm_confsample.bias import refine_learned_bias, run_biased_md
from openmm_confsample.data.datasets import torsion_angles
from openmm_confsample.data.md import run_md
from openmm_confsample.systems import get_system


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-ps", type=float, default=200.0, help="unbiased MD for the first model, ps")
    parser.add_argument("--rounds", type=int, default=3, help="refinement rounds of biased MD")
    parser.add_argument("--round-ps", type=float, default=200.0, help="biased MD per round, ps")
    parser.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered gamma (inf: flatten fully)")
    parser.add_argument("--cap-kt", type=float, default=20.0, help="largest free energy the bias removes, kT")
    parser.add_argument("--length-ps", type=float, default=500.0, help="production biased MD, ps")
    parser.add_argument("--backend", default="auto", choices=["auto", "torchforce", "pythonforce"])
    parser.add_argument("--platform", default="Reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="learned-bias", help="folder for the bias, plots and summary")
    args = parser.parse_args()

    ala = get_system("alanine-dipeptide-implicit")
    torsions = {"phi": ala.torsions["phi"], "psi": ala.torsions["psi"]}
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        md = run_md(ala, os.path.join(tmp, "train"), args.train_ps, save_interval_ps=0.05, seed=args.seed + 1,
                    platform=args.platform, progress=False)
        angles = torsion_angles(md.load(), ala)
    print(f"unbiased MD: {args.train_ps:g} ps in {md.wall_seconds:.0f} s, {len(angles)} frames, "
          f"fraction with phi > 0: {np.mean(angles[:, 0] > 0):.4f}")

    refinement = refine_learned_bias(ala, angles, rounds=args.rounds, round_ps=args.round_ps, torsions=torsions,
                                     bias_factor=args.bias_factor, cap_kT=args.cap_kt, seed=args.seed,
                                     platform=args.platform, backend=args.backend)
    if refinement.runs:
        first = refinement.runs[0]
        hits = np.nonzero(first.angle("phi") > 0)[0]
        print("round 0 biased MD: first frame with phi > 0 at "
              + (f"{first.time_ps[hits[0]]:.1f} ps" if len(hits) else f"none in {args.round_ps:g} ps"))
    bias_path = refinement.bias.save(os.path.join(args.out, "learned_bias.pt"))
    print(f"bias: {bias_path} (refinement {refinement.wall_seconds:.0f} s)")

    result = run_biased_md(ala, refinement.bias, args.length_ps, torsions=torsions, save_interval_ps=0.05,
                           seed=args.seed + 100, platform=args.platform, backend=args.backend, verbose=False)
    phi, psi, w = result.angle("phi"), result.angle("psi"), result.weights
    ups = int(np.sum((phi[1:] > 0) & (phi[:-1] <= 0)))
    delta_f, error = basin_free_energy(phi, weights=w, kT=1.0)
    print(f"production: {args.length_ps:g} ps in {result.wall_seconds:.0f} s ({result.extra['ns_per_day']:.0f} ns/day, "
          f"{result.backend}); {ups} entries into phi > 0; biased frames with phi > 0: {np.mean(phi > 0):.3f}; "
          f"Kish ESS {1.0 / np.sum(w**2):.0f} of {len(w)}")
    print(f"reweighted P(phi > 0) = {np.sum(w * (phi > 0)):.4f}; Delta F(phi>0 - phi<0) = {delta_f:.2f} +- "
          f"{error:.2f} kT (10-block error)")

    plot_ramachandran_comparison({"unbiased MD": (angles[:, 0], angles[:, 1]), "biased MD": (phi, psi),
                                  "biased MD, reweighted": (phi, psi, w)},
                                 path=os.path.join(args.out, "ramachandran.png"), title="learned torsion bias")
    plot_free_energy_1d({"biased MD": np.degrees(phi), "reweighted": (np.degrees(phi), w),
                         "unbiased MD": np.degrees(angles[:, 0])}, bins=72, range=(-180, 180),
                        xlabel="phi (deg)", path=os.path.join(args.out, "free_energy_phi.png"))
    print(f"wrote {args.out}/ramachandran.png, free_energy_phi.png; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
