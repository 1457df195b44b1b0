"""The ``confsample`` command: parses arguments and calls the library; no logic lives here."""

from __future__ import annotations

import argparse
import sys

from .errors import ConfSampleError


def _add_system_arguments(parser):
    parser.add_argument("system", help="a registered system name (see `confsample systems`) or a PDB file")
    parser.add_argument("--forcefield", nargs="+", default=None, metavar="XML",
                        help="force-field XML files for a PDB input (default: amber99sbildn.xml amber99_obc.xml)")
    parser.add_argument("--temperature", type=float, default=None, help="temperature in K (default: the system's)")


def _add_trajectory_arguments(parser, what: str, out_help: str):
    parser.add_argument("--trajectories", nargs="+", required=True, metavar="FILE",
                        help=f"{what}DCD/XTC/HDF5 trajectories (e.g. from `confsample simulate`)")
    parser.add_argument("--topology", default=None, help="topology PDB for DCD/XTC files (default: the system's)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--allow-truncated", action="store_true",
                        help="use the readable frames of a truncated DCD (header claims more frames) instead of refusing")


def _cmd_systems(args):
    from .systems import get_system, list_systems

    for name in list_systems():
        molsys = get_system(name)
        print(f"{name:32s} {molsys.n_atoms:5d} atoms  {molsys.temperature_K:.0f} K  torsions: "
              f"{', '.join(molsys.torsion_names)}  ({molsys.description})")


def _cmd_simulate(args):
    from .data.md import BiasRecord, run_md
    from .systems import resolve_system

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    record = None
    if args.bias:
        from .bias import with_learned_bias  # torch: imported only for a biased run

        molsys, added = with_learned_bias(molsys, args.bias, args.bias_backend)
        record = BiasRecord.of(added, args.bias)
    result = run_md(molsys, args.out, args.length_ps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction,
                    save_interval_ps=args.save_interval_ps, seed=args.seed, platform=args.platform,
                    trajectory_format=args.format, progress=not args.quiet, bias=record)
    print(f"wrote {result.trajectory_path} ({result.n_frames} frames), {result.topology_path}, {result.metadata_path}"
          + (f", {args.out}.bias.npy (bias energies, kJ/mol)" if args.bias else ""))
    print(f"throughput: {result.ns_per_day:.1f} ns/day ({result.wall_seconds:.1f} s wall)")


def _cmd_train(args):
    from .systems import resolve_system
    from .workflows import train_timewarp, train_torsion_diffusion

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    if args.model_kind == "diffusion":
        _, summary = train_torsion_diffusion(molsys, args.trajectories, args.out, topology=args.topology,
                                             max_epochs=args.epochs, max_minutes=args.max_minutes, seed=args.seed,
                                             progress=not args.quiet, allow_truncated=args.allow_truncated)
    else:
        config = {"n_coupling_layers": args.coupling_layers, "hidden_dim": args.hidden}
        if args.coordinates == "internal":
            from .models.timewarp import zmatrix_for

            config.update(coordinates="internal", zmatrix=zmatrix_for(molsys.atom_labels, topology=molsys.topology))
        _, summary = train_timewarp(molsys, args.trajectories, args.out, args.tau_ps, topology=args.topology,
                                    epochs=args.epochs, acceptance_steps=args.acceptance_steps,
                                    max_minutes=args.max_minutes, seed=args.seed, progress=not args.quiet,
                                    config=config, allow_truncated=args.allow_truncated)
    for key, value in summary.items():
        print(f"{key}: {value}")


def _cmd_bias(args):
    from .systems import resolve_system
    from .workflows import build_learned_bias

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    _, summary = build_learned_bias(molsys, args.trajectories, args.out, topology=args.topology, rounds=args.rounds,
                                    round_ps=args.round_ps, bias_factor=args.bias_factor, cap_kT=args.cap_kt,
                                    train_minutes_per_round=args.train_minutes, seed=args.seed,
                                    platform=args.platform, backend=args.backend, progress=not args.quiet,
                                    allow_truncated=args.allow_truncated)
    print(f"wrote {summary['bias']} and {summary['summary']} ({summary['wall_seconds']:.0f} s)")


def _make_move(args, molsys):
    if args.move == "diffusion":
        from .moves.torsion_diffusion import TorsionDiffusionMove

        return TorsionDiffusionMove(args.model, molsys, n_proposals=args.n_proposals, seed=args.seed)
    if args.move == "timewarp":
        from .moves.timewarp import TimewarpMove

        return TimewarpMove(args.model, molsys, n_proposals=args.n_proposals, seed=args.seed,
                            exploration_threshold_kT=args.explore_kT)
    from .geometry.torsions import TorsionSet
    from .moves.mcmc import LearnedMCMCMove
    from .bench.alanine import alanine_basin_proposal

    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array, names=molsys.torsion_names)
    return LearnedMCMCMove(alanine_basin_proposal(torsion_set), n_proposals=args.n_proposals, seed=args.seed)


def _cmd_sample(args):
    from .systems import resolve_system
    from .workflows import sample_with_moves

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    if args.move in ("diffusion", "timewarp") and not args.model:
        raise ConfSampleError(f"--model is required with --move {args.move}.")
    move = _make_move(args, molsys)
    result = sample_with_moves(molsys, move, args.out, args.length_ps, move_interval_steps=args.move_interval,
                               n_attempts=args.n_attempts, save_interval_ps=args.save_interval_ps, seed=args.seed,
                               platform=args.platform, progress=not args.quiet)
    stats = result.statistics
    label = "" if stats.get("exact", True) else "  [BIASED exploration mode: not Boltzmann]"
    print(f"wrote {result.trajectory_path}, {result.log_path}, {result.summary_path}")
    print(f"moves: {stats['n_moves']}, proposals: {stats['n_proposed']}, acceptance: {stats['acceptance_rate']:.3f}, "
          f"{1e3 * stats['seconds_per_proposal']:.2f} ms/proposal, wall {result.wall_seconds:.1f} s{label}")


def _cmd_reweight(args):
    from .models.torsion_diffusion import TorsionDiffusionModel
    from .moves.torsion_diffusion import check_model_matches_system
    from .reweight import reweight_pipeline
    from .systems import resolve_system

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    model = TorsionDiffusionModel.load(args.model)
    check_model_matches_system(model, molsys, f"'{args.model}'")
    angles = model.sample(args.n_samples, generator=args.seed)
    result = reweight_pipeline(molsys, angles, n_resample=args.n_resample, energy=args.energy,
                               temperature_K=args.reweight_temperature, seed=args.seed, out_dir=args.out,
                               progress=not args.quiet)
    print(f"rebuilt {len(angles)} structures; Kish ESS of the Boltzmann weights: {result.ess:.1f}")
    for name, path in (result.files or {}).items():
        print(f"wrote {name}: {path}")
    if args.validate_ps > 0:
        import os

        from .reweight import plot_validation, validate_structures

        count = min(args.validate_count, len(result.resampled_positions_nm))
        validation = validate_structures(molsys, result.resampled_positions_nm[:count], length_ps=args.validate_ps,
                                         solvent=args.solvent, seed=args.seed, progress=not args.quiet)
        png = os.path.join(args.out, "validation.png")
        plot_validation(validation, png)
        print(f"validation of {count} structures ({args.solvent} solvent, {args.validate_ps} ps): {validation.summary}")
        print(f"wrote {png}")


def _cmd_demo(args):
    from .bench.demo import run_demo

    run_demo(args.out, args.seconds, args.model, args.system, args.train, progress=not args.quiet, seed=args.seed,
             forcefield_files=args.forcefield)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confsample",
        description="Learned generative models (torsion diffusion, Timewarp) as exact Metropolis-Hastings moves "
                    "for OpenMM simulations.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    systems = commands.add_parser("systems", help="list the registered systems")
    systems.set_defaults(func=_cmd_systems)

    simulate = commands.add_parser("simulate", help="run reference MD and write an mdtraj-readable trajectory",
                                   description="Run Langevin MD (LangevinMiddleIntegrator) and write PREFIX.dcd/.xtc, "
                                               "PREFIX.pdb (topology) and PREFIX.json (metadata).")
    _add_system_arguments(simulate)
    simulate.add_argument("--length-ps", type=float, default=100.0, help="simulated time in ps (default 100)")
    simulate.add_argument("--timestep-fs", type=float, default=1.0, help="timestep in fs (default 1)")
    simulate.add_argument("--friction", type=float, default=1.0, help="friction in 1/ps (default 1)")
    simulate.add_argument("--save-interval-ps", type=float, default=1.0, help="ps between saved frames (default 1)")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    simulate.add_argument("--platform", default="Reference",
                          help="OpenMM platform (default Reference, fastest for ~22 atoms; CPU for large systems)")
    simulate.add_argument("--format", choices=("dcd", "xtc"), default="dcd", help="trajectory format (default dcd)")
    simulate.add_argument("--out", default="runs/md", help="output path prefix (default runs/md)")
    simulate.add_argument("--bias", default=None, metavar="BIAS.pt",
                          help="run on the potential plus this learned torsion bias (from `confsample bias`); "
                               "writes each frame's bias energy to OUT.bias.npy")
    simulate.add_argument("--bias-backend", choices=("auto", "torchforce", "pythonforce"), default="auto",
                          help="how the bias enters OpenMM (default auto)")
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(func=_cmd_simulate)

    train = commands.add_parser("train", help="train a torsion diffusion model or a Timewarp flow on trajectories",
                                description="Train a model on MD trajectories (several runs may be pooled, e.g. 300 K "
                                            "and 500 K: the MH correction keeps the moves exact whatever the data).")
    train.add_argument("model_kind", choices=("diffusion", "timewarp"), help="which model")
    _add_system_arguments(train)
    _add_trajectory_arguments(train, "", "checkpoint path to write (.pt)")
    train.add_argument("--epochs", type=int, default=200, help="maximum epochs (default 200)")
    train.add_argument("--max-minutes", type=float, default=5.0, help="training wall-clock budget (default 5)")
    train.add_argument("--tau-ps", type=float, default=0.5, help="Timewarp lag time in ps (default 0.5)")
    train.add_argument("--coordinates", choices=("cartesian", "internal"), default="cartesian",
                       help="Timewarp: flow on Cartesian displacements (the reference design, default) or on the "
                            "system's bond lengths, angles and torsions (internal; far higher acceptance)")
    train.add_argument("--coupling-layers", type=int, default=4,
                       help="Timewarp: coupling blocks (default 4; 0 with --coordinates internal: the fitted "
                            "linear-Gaussian baseline alone, no transformer)")
    train.add_argument("--hidden", type=int, default=64, help="Timewarp: transformer width (default 64)")
    train.add_argument("--acceptance-steps", type=int, default=0,
                       help="Timewarp: optimizer steps of the acceptance objective after likelihood (default 0)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    sample = commands.add_parser("sample", help="run MD with learned MC moves (an OpenMM Simulation + one reporter)",
                                 description="Run Langevin MD with a learned move every --move-interval steps and "
                                             "write PREFIX.dcd, PREFIX.csv (StateDataReporter), PREFIX.pdb, PREFIX.json.")
    _add_system_arguments(sample)
    sample.add_argument("--move", choices=("diffusion", "timewarp", "basins"), default="diffusion",
                        help="diffusion / timewarp (need --model) or basins (a von Mises mixture on alanine's basins)")
    sample.add_argument("--model", default=None, help="model checkpoint (.pt)")
    sample.add_argument("--length-ps", type=float, default=100.0, help="simulated MD time in ps (default 100)")
    sample.add_argument("--move-interval", type=int, default=500, help="MD steps between moves (default 500)")
    sample.add_argument("--n-attempts", type=int, default=1, help="moves per application (default 1)")
    sample.add_argument("--n-proposals", type=int, default=1, help="MH steps proposed per model call (default 1)")
    sample.add_argument("--explore-kT", type=float, default=None,
                        help="Timewarp exploration mode: accept unless the energy rises by more than this many kT "
                             "(BIASED, not Boltzmann)")
    sample.add_argument("--save-interval-ps", type=float, default=1.0, help="ps between saved frames (default 1)")
    sample.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="runs/sample", help="output path prefix (default runs/sample)")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")
    sample.set_defaults(func=_cmd_sample)

    reweight = commands.add_parser("reweight", help="the original study's pipeline: sample torsions, rebuild with "
                                                    "RDKit, MMFF94 energies, Boltzmann-reweight, validate with OpenMM MD")
    _add_system_arguments(reweight)
    reweight.add_argument("--model", required=True, help="torsion diffusion checkpoint (.pt)")
    reweight.add_argument("--n-samples", type=int, default=500, help="torsion samples to rebuild (default 500)")
    reweight.add_argument("--n-resample", type=int, default=None, help="structures to resample (default: n-samples)")
    reweight.add_argument("--energy", choices=("mmff", "openmm"), default="mmff",
                          help="score with MMFF94 (default) or the system's OpenMM force field")
    reweight.add_argument("--reweight-temperature", type=float, default=298.15,
                          help="temperature of the Boltzmann weights in K (default 298.15)")
    reweight.add_argument("--validate-ps", type=float, default=0.0, help="short MD validation per structure (ps)")
    reweight.add_argument("--validate-count", type=int, default=5, help="structures to validate (default 5)")
    reweight.add_argument("--solvent", choices=("implicit", "explicit"), default="implicit",
                          help="validation solvent (explicit: TIP3P box, NPT equilibration)")
    reweight.add_argument("--seed", type=int, default=0)
    reweight.add_argument("--out", default="runs/reweight", help="output directory (default runs/reweight)")
    reweight.add_argument("--quiet", action="store_true", help="no progress bar")
    reweight.set_defaults(func=_cmd_reweight)

    bias = commands.add_parser("bias", help="build a learned torsion bias from MD and refine it by rounds of biased MD",
                               description="Train a torsion diffusion model on unbiased trajectories, turn its free "
                                           "energy into a well-tempered, capped bias on the system's torsions, and "
                                           "refine it by rounds of biased MD (TorchForce when openmm-torch imports, "
                                           "else PythonForce). Writes the bias (.pt, LearnedTorsionBias.load) and a "
                                           "JSON summary; reweight biased frames by exp(+B/kT).")
    _add_system_arguments(bias)
    _add_trajectory_arguments(bias, "unbiased ", "bias file to write (.pt)")
    bias.add_argument("--rounds", type=int, default=3, help="refinement rounds of biased MD (default 3)")
    bias.add_argument("--round-ps", type=float, default=200.0, help="biased MD per round in ps (default 200)")
    bias.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered gamma (default 6; inf: flat)")
    bias.add_argument("--cap-kt", type=float, default=20.0, help="largest free energy removed, in kT (default 20)")
    bias.add_argument("--train-minutes", type=float, default=1.0, help="training budget per round (default 1)")
    bias.add_argument("--backend", choices=("auto", "torchforce", "pythonforce"), default="auto",
                      help="force backend of the bias (default auto: TorchForce if openmm-torch imports)")
    bias.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    bias.add_argument("--seed", type=int, default=0)
    bias.add_argument("--quiet", action="store_true", help="no progress bars")
    bias.set_defaults(func=_cmd_bias)

    demo = commands.add_parser("demo", help="the main job: plain MD vs MD + learned torsion moves, same wall time",
                               description="Run plain MD and MD + TorsionDiffusionMove for the same wall time on "
                                           "alanine-dipeptide-implicit with the model the package ships; print "
                                           "acceptance, P(phi>0) and the ESS/s ratio; write ramachandran.png and "
                                           "summary.json.")
    demo.add_argument("--out", default="confsample-demo", help="output folder (default confsample-demo)")
    demo.add_argument("--seconds", type=float, default=60.0, help="wall seconds per method (default 60)")
    demo.add_argument("--model", default=None, help="torsion diffusion checkpoint (default: the shipped model)")
    demo.add_argument("--system", default="alanine-dipeptide-implicit", help="registry name or PDB file")
    demo.add_argument("--forcefield", nargs="+", default=None, metavar="XML", help="force fields for a PDB system")
    demo.add_argument("--train", action="store_true", help="train a model for the system first (own MD data)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except ConfSampleError as exc:
        print(f"confsample: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("confsample: interrupted; outputs not finished are left as *.partial files", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
