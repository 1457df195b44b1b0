"""Biased MD with a learned torsion bias, reweighted back to the unbiased ensemble.

1. short unbiased MD of alanine dipeptide (implicit solvent), which stays at phi < 0;
2. a small torsion diffusion model trained on its (phi, psi) (or ``--model PATH`` to load one);
3. the model's free energy F = -kT log q, capped at ``--cap-kt``, added as a bias on phi/psi
   (TorchForce when openmm-torch imports, else OpenMM's PythonForce);
4. biased MD on the Reference platform: when is phi > 0 first reached, and the reweighted
   P(phi > 0) and Delta F = F(phi > 0) - F(phi < 0).

Run:  python examples/learned_bias_md.py            (about 1.5 minutes on 2 idle CPU cores)
      python examples/learned_bias_md.py --model my_model.pt --length-ps 500
"""

import argparse
import os
import tempfile
import time

import numpy as np

from openmm_confsample.analysis.free_energy import basin_free_energy, region_populations
from openmm_confsample.bias import LearnedTorsionBias, run_biased_md
from openmm_confsample.data.datasets import torsion_angles
from openmm_confsample.data.md import run_md
from openmm_confsample.models.torsion_diffusion import TorsionDiffusionModel, TorsionDiffusionTrainer
from openmm_confsample.systems import get_system


def first_time(time_ps, mask):
    hits = np.nonzero(mask)[0]
    return float(time_ps[hits[0]]) if len(hits) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved TorsionDiffusionModel (phi, psi); default: train one")
    parser.add_argument("--train-ps", type=float, default=300.0, help="unbiased MD for training data, ps")
    parser.add_argument("--epochs", type=int, default=250,
                        help="training epochs (a fixed count keeps runs reproducible)")
    parser.add_argument("--length-ps", type=float, default=200.0, help="biased MD length, ps")
    parser.add_argument("--cap-kt", type=float, default=10.0, help="deepest bias, in kT")
    parser.add_argument("--max-frequency", type=int, default=10, help="Fourier wave numbers per torsion")
    parser.add_argument("--backend", default="auto", choices=["auto", "torchforce", "pythonforce"])
    parser.add_argument("--platform", default="Reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-model", help="write the trained model here")
    args = parser.parse_args()

    ala = get_system("alanine-dipeptide-implicit")
    kT = ala.kT
    torsions = [("phi", ala.torsions["phi"]), ("psi", ala.torsions["psi"])]
    t_start = time.perf_counter()

    if args.model:
        model = TorsionDiffusionModel.load(args.model)
        print(f"loaded model {args.model}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            # seed + 1: OpenMM reads a random-number seed of 0 as "pick one at random"
            md = run_md(ala, os.path.join(tmp, "train"), args.train_ps, save_interval_ps=args.train_ps / 1000.0,
                        seed=args.seed + 1, platform=args.platform, progress=False)
            angles = torsion_angles(md.load(), ala)
        populations = region_populations(angles[:, 0], angles[:, 1])
        print(f"unbiased MD: {args.train_ps:g} ps in {md.wall_seconds:.0f} s, {len(angles)} frames; populations "
              + ", ".join(f"{name} {value:.3f}" for name, value in populations.items()))
        trainer = TorsionDiffusionTrainer(hidden=64, n_layers=3, max_epochs=args.epochs, patience=30, batch_size=256,
                                          seed=args.seed, progress=False)
        t0 = time.perf_counter()
        model = trainer.fit(angles, metadata={"torsions": torsions, "temperature": ala.temperature_K}).fetch_model()
        n_epochs = len(model.history["val_loss"])
        print(f"trained torsion diffusion: {n_epochs} epochs in {time.perf_counter() - t0:.0f} s, "
              f"n_steps={model.n_steps}")
        if args.save_model:
            model.save(args.save_model)

    t0 = time.perf_counter()
    bias = LearnedTorsionBias.from_model(model, [q for _, q in torsions], kT, cap_kT=args.cap_kt,
                                         max_frequency=args.max_frequency)
    print(f"bias tabulated and fitted in {time.perf_counter() - t0:.1f} s: {bias.modes.shape[0]} Fourier modes, "
          f"fit RMSE {bias.fit_rmse_kJ / kT:.3f} kT, max error {bias.fit_max_error_kJ / kT:.3f} kT "
          f"(cap {args.cap_kt:g} kT)")

    result = run_biased_md(ala, bias, args.length_ps, torsions=dict(torsions), save_interval_ps=0.1, seed=args.seed,
                           platform=args.platform, backend=args.backend)
    phi = result.angle("phi")
    biased = region_populations(phi, result.angle("psi"))
    print("biased frames (unweighted): " + ", ".join(f"{name} {value:.3f}" for name, value in biased.items()))
    hit = first_time(result.time_ps, phi > 0)
    print(f"biased MD: {args.length_ps:g} ps in {result.wall_seconds:.0f} s ({result.extra['ns_per_day']:.1f} ns/day), "
          f"backend {result.backend}")
    forward = int(np.sum((phi[1:] > 0) & (phi[:-1] <= 0)))
    backward = int(np.sum((phi[1:] <= 0) & (phi[:-1] > 0)))
    print(f"first frame with phi > 0: {'never' if hit is None else f'{hit:.1f} ps'}; "
          f"fraction of biased frames with phi > 0: {np.mean(phi > 0):.3f}; "
          f"frame-to-frame sign changes of phi: {forward} up, {backward} down")
    w = result.weights
    kish = 1.0 / np.sum(w**2)
    p_plus = float(np.sum(w * (phi > 0)))
    delta_f_kT, error_kT = basin_free_energy(phi, weights=w, kT=1.0)
    print(f"reweighted P(phi > 0) = {p_plus:.4f}; Kish effective sample size {kish:.0f} of {len(w)}")
    print(f"reweighted Delta F(phi>0 - phi<0) = {delta_f_kT:.2f} +- {error_kT:.2f} kT "
          f"= {delta_f_kT * kT:.2f} +- {error_kT * kT:.2f} kJ/mol (block error, 10 blocks)")
    if min(forward, backward) < 5:
        print("note: fewer than 5 transitions each way, so the reweighted estimate is not converged; run longer "
              "(--length-ps) or retrain the model on the biased frames")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
