"""Train a Timewarp flow on saved alanine-dipeptide MD and measure its held-out MH acceptance.

    OMP_NUM_THREADS=1 python benchmarks/timewarp_experiment.py --data /tmp/timewarp_work/md \\
        --val-data /tmp/timewarp_work/md_val --out /tmp/timewarp_work/run1.pt --coordinates internal --minutes 20

Trajectories are the ``traj_*.npy`` files of ``benchmarks/timewarp_data.py`` (frames every 0.05 ps). Pairs
at lag ``tau`` are formed inside each trajectory; the last trajectory is the validation set of the likelihood
phase. Held-out acceptance uses starting states from ``--val-data`` (an MD run with another seed, never
trained on): for each of ``--n-states`` states, ``--n-proposals`` proposals are drawn exactly as
``TimewarpProposal`` draws them, and the expected MH acceptance ``mean(min(1, exp(log alpha)))`` is reported
(chirality flips and out-of-support draws count as 0), next to the RMS displacement of proposals and of
accepted moves (weighted by acceptance probability), the change of phi, the fraction of proposals that cross
phi = 0 and their expected acceptance per proposal (what makes entries into phi > 0), and ms per proposal.
"""

import argparse
import glob
import json
import os
import time

import numpy as np
import torch

from openmm_confsample.models.timewarp import TimewarpModel, TimewarpTrainer, zmatrix_for
from openmm_confsample.moves.timewarp import TimewarpProposal
from openmm_confsample.systems import EnergyEvaluator, get_system


def load_pairs(folder, lag, stride=1):
    files = sorted(glob.glob(os.path.join(folder, "traj_*.npy")))
    x0, x1 = [], []
    for f in files:
        frames = np.load(f)
        x0.append(frames[:-lag:stride])
        x1.append(frames[lag::stride])
    return x0, x1


def phi_psi(x):
    from openmm_confsample.geometry.torsions import dihedral_angles

    return dihedral_angles(x, [[4, 6, 8, 14], [6, 8, 14, 16]])


def evaluate(model, ala, states, n_proposals, seed=0):
    """Held-out MH statistics of ``model`` from each of ``states`` (S, 22, 3) nm."""
    proposal = TimewarpProposal(model, ala)
    evaluator = EnergyEvaluator(ala)
    rng = np.random.default_rng(seed)
    kT = ala.kT
    acc, rms, rms_acc_w, dphi_w, log_alpha_all, n_valid, t_prop = [], [], [], [], [], 0, 0.0
    crossing, crossing_w = [], []
    for x in states:
        x = np.asarray(x, np.float64)
        u0 = evaluator.energies(x) / kT
        t0 = time.perf_counter()
        batch = proposal.propose(x, n_proposals, rng)
        t_prop += time.perf_counter() - t0
        valid = np.ones(n_proposals, bool) if batch.valid is None else batch.valid
        u1 = np.full(n_proposals, np.inf)
        if valid.any():
            u1[valid] = evaluator.energies(batch.positions[valid]) / kT
        log_alpha = -(u1 - u0) + batch.log_correction
        log_alpha[~valid] = -np.inf
        a = np.exp(np.minimum(0.0, np.nan_to_num(log_alpha, nan=-np.inf)))
        d = np.sqrt(np.square(batch.positions - x).sum(-1).mean(-1))
        acc.append(a)
        rms.append(d[valid])
        rms_acc_w.append((a, d))
        phi_new, phi_old = phi_psi(batch.positions)[:, 0], phi_psi(x[None])[0, 0]
        crosses = valid & ((phi_new > 0) != (phi_old > 0))
        crossing.append(crosses)
        crossing_w.append(a * crosses)
        dphi = np.abs(np.angle(np.exp(1j * (phi_new - phi_old))))
        dphi_w.append((a, dphi))
        log_alpha_all.append(log_alpha[valid])
        n_valid += valid.sum()
    acc = np.concatenate(acc)
    w = np.concatenate([a for a, _ in rms_acc_w])
    d = np.concatenate([d for _, d in rms_acc_w])
    dp = np.concatenate([p for _, p in dphi_w])
    la = np.concatenate(log_alpha_all)
    return {
        "acceptance": float(acc.mean()),
        "acceptance_sem": float(acc.std() / np.sqrt(len(acc))),
        "fraction_valid": float(n_valid / len(acc)),
        "median_log_alpha": float(np.median(la)) if len(la) else float("nan"),
        "rms_displacement_nm": float(np.sqrt(np.mean(np.concatenate(rms) ** 2))),
        "accepted_rms_displacement_nm": float(np.sqrt(np.sum(w * d ** 2) / max(w.sum(), 1e-300))),
        "expected_sq_jump_nm2_per_proposal": float(np.mean(w * d ** 2)),
        "accepted_mean_abs_dphi_rad": float(np.sum(w * dp) / max(w.sum(), 1e-300)),
        "fraction_proposals_crossing_phi0": float(np.concatenate(crossing).mean()),
        "crossing_acceptance_per_proposal": float(np.concatenate(crossing_w).mean()),
        "ms_per_proposal": 1000 * t_prop / len(acc),
        "n_proposals_total": int(len(acc)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/timewarp_work/md")
    parser.add_argument("--val-data", default="/tmp/timewarp_work/md_val")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tau-ps", type=float, default=0.5)
    parser.add_argument("--save-interval-ps", type=float, default=0.05)
    parser.add_argument("--stride", type=int, default=1, help="keep every stride-th pair")
    parser.add_argument("--coordinates", default="internal", choices=["cartesian", "internal"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--attention-layers", type=int, default=1)
    parser.add_argument("--max-log-scale", type=float, default=2.0)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--acceptance-steps", type=int, default=0)
    parser.add_argument("--acceptance-minutes", type=float, default=5.0)
    parser.add_argument("--beta-ent", type=float, default=0.1)
    parser.add_argument("--acc-lr", type=float, default=1e-4)
    parser.add_argument("--diagonal-baseline", action="store_true",
                        help="internal coordinates: one spread per coordinate, no fitted residual correlation")
    parser.add_argument("--init", default=None, help="continue from this checkpoint")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--n-states", type=int, default=100)
    parser.add_argument("--n-proposals", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ala = get_system("alanine-dipeptide-implicit")
    lag = int(round(args.tau_ps / args.save_interval_ps))
    val_frames = np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(args.val_data, "traj_*.npy")))])
    states = val_frames[np.linspace(0, len(val_frames) - 1, args.n_states).astype(int)]
    report = {"args": vars(args)}
    if args.eval_only:
        model = TimewarpModel.load(args.init or args.out, molecular_system=ala)
    else:
        x0s, x1s = load_pairs(args.data, lag, args.stride)
        x0, x1 = np.concatenate(x0s[:-1]), np.concatenate(x1s[:-1])
        x0v, x1v = x0s[-1][::10], x1s[-1][::10]
        config = {"n_coupling_layers": args.layers, "hidden_dim": args.hidden,
                  "n_attention_layers": args.attention_layers, "max_log_scale": args.max_log_scale,
                  "coordinates": args.coordinates}
        if args.coordinates == "internal":
            config["zmatrix"] = zmatrix_for(ala.atom_labels, topology=ala.topology)
        if args.init:
            trainer = TimewarpTrainer(model=TimewarpModel.load(args.init, molecular_system=ala), seed=args.seed)
        else:
            trainer = TimewarpTrainer(config, seed=args.seed, full_covariance=not args.diagonal_baseline)
        print(f"{len(x0)} training pairs, {len(x0v)} validation pairs", flush=True)
        t0 = time.perf_counter()
        if args.minutes > 0 or not args.init:
            trainer.fit_likelihood(x0, x1, ala.atom_labels, val=(x0v, x1v),
                                   epochs=args.epochs if args.minutes > 0 else 0,
                                   batch_size=args.batch_size, lr=args.lr, patience=None, max_minutes=args.minutes,
                                   tau_ps=args.tau_ps, temperature_K=ala.temperature_K,
                                   topology_fingerprint=ala.fingerprint())
        t_like = time.perf_counter() - t0
        model = trainer.fetch_model()
        report["likelihood_seconds"] = t_like
        report["history_likelihood"] = {k: v for k, v in trainer.history.items() if v}
        model.save(args.out)
        report["after_likelihood"] = evaluate(model, ala, states, args.n_proposals, args.seed)
        print(json.dumps(report["after_likelihood"], indent=1), flush=True)
        if args.acceptance_steps:
            t1 = time.perf_counter()
            trainer.fit_acceptance(x0[::20], EnergyEvaluator(ala), ala.kT, steps=args.acceptance_steps,
                                   batch_size=16, lr=args.acc_lr, beta_ent=args.beta_ent,
                                   max_minutes=args.acceptance_minutes)
            report["acceptance_seconds"] = time.perf_counter() - t1
            model = trainer.fetch_model()
            model.save(args.out.replace(".pt", "_acc.pt"))
            hist = trainer.history
            report["acceptance_history_tail"] = {k: hist[k][-20:] for k in ("acceptance_rate",
                                                 "proposal_rms_displacement_nm", "median_delta_u_kT")}
        trainer.plot_history(args.out.replace(".pt", "_history.png"))
    report["final"] = evaluate(model, ala, states, args.n_proposals, args.seed + 1)
    print(json.dumps(report["final"], indent=1), flush=True)
    with open(args.out.replace(".pt", ".json"), "w") as fh:
        json.dump(report, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
