"""Remake the fragment model shipped at openmm_confsample/resources/peptide_fragments.pt.

    python benchmarks/make_fragment_model.py --out PATH          # a new model, wherever you like
    python benchmarks/make_fragment_model.py --into-package      # replaces the package's shipped model

Runs MD of the capped dipeptides Ac-X-NMe of the registry (systems.peptides.DIPEPTIDE_RESIDUES) at 300 K and
500 K with the package's own code (models.fragments.sample_fragment_md), with exact uniform fragment moves
between samples (``--moves uniform``: 100 ps of plain MD visit one or two side-chain rotamers; the moves
sample them all, and alpha_L, at their Boltzmann weights), leaves one residue type out of
training (``--leave-out``, default LEU: the zero-shot check of benchmarks/fragment_benchmark.py), trains a
FragmentTorsionModel (models.fragments.FragmentModelTrainer) on one thread and saves it through
models.checkpoint with its metadata (residues, temperatures, MD and training seconds, settings). The MD
frames are kept in ``--data`` (an .npz of plain arrays) and reused when the file exists, so retraining with
other settings costs only the training. Measured on 2 shared, loaded cores: see docs/fragments.md.
"""

import argparse
import os
import sys
import time

from openmm_confsample.models.fragments import FragmentData, FragmentModelTrainer, sample_fragment_md
from openmm_confsample.moves.fragment import FragmentProposal
from openmm_confsample.systems import get_system
from openmm_confsample.systems.peptides import DIPEPTIDE_RESIDUES

PACKAGE_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "openmm_confsample",
                             "resources", "peptide_fragments.pt")
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", "fragment_md.npz")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", default=None, help="checkpoint path")
    target.add_argument("--into-package", action="store_true", help=f"replace the shipped model {PACKAGE_MODEL}")
    parser.add_argument("--data", default=DEFAULT_DATA, help="MD frames (.npz): reused if present, else written")
    parser.add_argument("--residues", nargs="+", default=list(DIPEPTIDE_RESIDUES), help="dipeptides to simulate")
    parser.add_argument("--leave-out", nargs="*", default=["LEU"], help="residue types kept out of training")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[300.0, 500.0], help="MD temperatures, K")
    parser.add_argument("--length-ps", type=float, default=100.0, help="MD per system and temperature, ps")
    parser.add_argument("--sample-every-ps", type=float, default=0.2)
    parser.add_argument("--moves", choices=["uniform", "none"], default="uniform",
                        help="exact MH moves between MD samples: uniform fragment moves (every rotamer), or none")
    parser.add_argument("--steps", type=int, default=1500, help="optimisation steps")
    parser.add_argument("--order", type=int, default=8, help="Fourier order of each block's log-density")
    parser.add_argument("--hidden", type=int, default=64, help="width of the network's hidden layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    out = PACKAGE_MODEL if args.into_package else args.out

    md_seconds = 0.0
    wanted = sorted((f"dipeptide-{code.upper()}", float(t), float(args.length_ps), args.moves)
                    for code in args.residues for t in args.temperatures)
    data = FragmentData.load(args.data) if args.data and os.path.isfile(args.data) else None
    if data is not None and sorted((s["system"], s["temperature_K"], s["length_ps"], s.get("moves_option", "none"))
                                   for s in data.sources) == wanted:
        print(f"reusing MD frames from {args.data} ({data.n_frames} fragment frames, {len(data.sources)} runs)")
    else:
        start = time.perf_counter()
        systems = [get_system(f"dipeptide-{code.upper()}") for code in args.residues]
        proposal = None
        if args.moves == "uniform":
            proposal = lambda molsys: FragmentProposal.for_system(molsys, "uniform", moves=("fragment", "sidechain"))  # noqa: E731
        data = sample_fragment_md(systems, args.temperatures, args.length_ps, args.sample_every_ps, seed=args.seed,
                                  progress=not args.quiet, proposal=proposal)
        for source in data.sources:
            source["moves_option"] = args.moves
        md_seconds = time.perf_counter() - start
        if args.data:
            os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
            data.save(args.data)
    md_seconds = md_seconds or sum(s["wall_seconds"] for s in data.sources)
    training = data.without(args.leave_out)
    trainer = FragmentModelTrainer(order=args.order, hidden=args.hidden, steps=args.steps, seed=args.seed,
                                   progress=not args.quiet)
    model = trainer.fit(training).fetch_model()
    model.metadata.update({"left_out": [r.upper() for r in args.leave_out], "md_seconds": md_seconds,
                           "temperatures_K": args.temperatures, "length_ps": args.length_ps,
                           "command": "python benchmarks/make_fragment_model.py " + " ".join(argv or sys.argv[1:])})
    model.save(out)
    info = model.metadata["training"]
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.0f} KB): trained on {', '.join(model.seen_residues)} "
          f"(left out {', '.join(args.leave_out) or 'none'}); MD {md_seconds:.0f} s, training {info['seconds']:.0f} s "
          f"on {info['threads']} thread(s), {info['steps']} steps, held-out NLL {info['best_val_nll']:.3f} nats/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
