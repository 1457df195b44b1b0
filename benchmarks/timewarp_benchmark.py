"""MD against MD + TimewarpMove on alanine-dipeptide-implicit: acceptance, ms/proposal, ESS/s of phi > 0.

    OMP_NUM_THREADS=1 python benchmarks/timewarp_benchmark.py --timewarp-model /tmp/timewarp_work/run1.pt \\
        --seconds 180 --n-proposals 8 --out /tmp/timewarp_work/bench

A slimmer companion of ``benchmarks/run.py --timewarp-model``: only the two methods that the Timewarp goal
compares, through the same public runners (``run_plain_md``, ``run_md_with_moves``, ``summarize``), with the
move's batch size and segment length as options. P(phi > 0) for the indicator ESS comes from the reference
run of ``benchmarks/run.py`` when ``--reference-seconds`` is given (cached), else from ``--p-phi-positive``.
"""

import argparse
import json
import os

import torch

from openmm_confsample import bench as B
from openmm_confsample.moves.timewarp import TimewarpProposal
from openmm_confsample.systems import get_system


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timewarp-model", required=True)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--md-steps-per-segment", type=int, default=10)
    parser.add_argument("--moves-per-segment", type=int, default=4)
    parser.add_argument("--n-proposals", type=int, default=1)
    parser.add_argument("--reference-seconds", type=float, default=None)
    parser.add_argument("--cache", default="/tmp/timewarp_work/cache")
    parser.add_argument("--p-phi-positive", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-md", action="store_true")
    parser.add_argument("--out", default="/tmp/timewarp_work/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    molsys = get_system("alanine-dipeptide-implicit")
    reference = None
    if args.reference_seconds:
        cache = os.path.join(args.cache, f"reference_{molsys.name}_{args.reference_seconds:g}s.npz")
        reference = B.run_reference(molsys, args.reference_seconds, B.alanine_config(), cache_path=cache,
                                    progress=False)
    runs = []
    if not args.skip_md:
        runs.append(B.run_plain_md(molsys, args.seconds, seed=args.seed + 10, method="MD"))
    proposal = TimewarpProposal(args.timewarp_model, molsys)
    runs.append(B.run_md_with_moves(molsys, proposal, args.seconds, md_steps_per_segment=args.md_steps_per_segment,
                                    moves_per_segment=args.moves_per_segment, n_proposals=args.n_proposals,
                                    seed=args.seed + 20, method="MD+TimewarpMove"))
    p_reference = None if args.p_phi_positive is None else {"phi > 0": args.p_phi_positive}
    rows = B.summarize(runs, B.alanine_config().indicators, reference, p_reference=p_reference)
    print(B.markdown_table(rows))
    move = runs[-1]
    extra = {"moves": move.acceptance, "settings": vars(args),
             "simulated_ps": {r.method: r.settings.get("simulated_ps") for r in runs}}
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"rows": rows, **extra}, fh, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    print(json.dumps(extra, indent=1, default=str))


if __name__ == "__main__":
    main()
