"""The ``confsample`` command: parses arguments and calls the library; no logic lives here.

Start-up: this module imports only argparse; each command checks its arguments (numbers, files, a model's
name or path) before it imports what its work needs, so ``confsample --help`` and refusals of bad input take
well under a second or two, not the 5-10 s that torch and openmmtools take to import.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfSampleError


# ------------------------------------------------------------------------------------------------
# argument checks (light: run before any heavy import)


def _positive(value, name: str, allow_zero: bool = False) -> float:
    from .checks import positive_float

    return positive_float(value, name, allow_zero)


def _count(value, name: str, minimum: int = 1) -> int:
    from .checks import positive_int

    return positive_int(value, name, minimum)


def _existing(paths, what: str) -> None:
    for path in paths or ():
        if not os.path.isfile(path):
            raise ConfSampleError(f"{what} '{path}' does not exist.")


def _model_path(model, kind: str) -> str:
    """A shipped model's name or a checkpoint path -> the path (one sentence otherwise; imports no torch)."""
    from .models.shipped import resolve_model_path

    return resolve_model_path(model, kind=kind)


def _temperatures(text: str) -> list[float]:
    """``--hot 450,500`` -> [450.0, 500.0] (K)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a temperature in K (or a comma-separated list)") from None
    if not values or any(not (v > 0 and v < 1e4) for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive kelvin, got '{text}'")
    return values


def _system(args):
    from .systems import resolve_system

    return resolve_system(args.system, args.forcefield, args.temperature)


#: Up to this many atoms the Reference platform beats CPU (alanine dipeptide: 22 atoms); beyond it, CPU.
_REFERENCE_MAX_ATOMS = 200


def _platform(args, molsys) -> str | None:
    """--platform, or by default Reference for a few dozen atoms and CPU for larger (solvated) systems."""
    if args.platform is None:
        return "Reference" if molsys.n_atoms <= _REFERENCE_MAX_ATOMS else "CPU"
    return None if args.platform == "auto" else args.platform


def _is_root() -> bool:
    """Whether this process prints (rank 0 under mpiexec; always without MPI)."""
    from .parallel.mpi import get_comm, rank_and_size

    return rank_and_size(get_comm())[0] == 0


# ------------------------------------------------------------------------------------------------
# commands


def _cmd_systems(args):
    from .systems import get_system, list_systems

    if not args.details:  # names only: building every system (solvated boxes, peptides) takes tens of seconds
        print("\n".join(list_systems()))
        print("(`confsample systems --details` builds each: atoms, temperature, named torsions, force field)")
        return
    for name in list_systems():
        molsys = get_system(name)
        print(f"{name:32s} {molsys.n_atoms:5d} atoms  {molsys.temperature_K:.0f} K  torsions: "
              f"{', '.join(molsys.torsion_names)}  ({molsys.description})")


def _cmd_models(args):
    from .models.shipped import shipped_models

    for model in shipped_models():
        print(f"{model.name}  ({model.kind}, system {model.system})\n    {model.path}\n    trained on: {model.trained_on}")


def _cmd_torsions(args):
    from .geometry.selection import torsion_table

    rows = torsion_table(_system(args), args.torsions, include_methyl=args.include_methyl)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'name':<{width}}  {'atoms':<18}  atom names")
    for name, quad, labels in rows:
        print(f"{name:<{width}}  {' '.join(str(a) for a in quad):<18}  {labels}")


def _cmd_simulate(args):
    _positive(args.length_ps, "length_ps"), _positive(args.save_interval_ps, "save_interval_ps")
    _existing([args.bias] if args.bias else [], "bias file")
    from .data.md import BiasRecord, run_md

    molsys = _system(args)
    record = None
    if args.bias:
        from .bias import with_learned_bias  # torch: imported only for a biased run

        molsys, added = with_learned_bias(molsys, args.bias, args.bias_backend)
        record = BiasRecord.of(added, args.bias)
    result = run_md(molsys, args.out, args.length_ps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction,
                    save_interval_ps=args.save_interval_ps, seed=args.seed, platform=_platform(args, molsys),
                    trajectory_format=args.format, progress=not args.quiet, bias=record)
    print(f"wrote {result.trajectory_path} ({result.n_frames} frames), {result.topology_path}, {result.metadata_path}"
          + (f", {args.out}.bias.npy (bias energies, kJ/mol)" if args.bias else ""))
    print(f"throughput: {result.ns_per_day:.1f} ns/day ({result.wall_seconds:.1f} s wall)")


def _cmd_train(args):
    _existing(args.trajectories, "trajectory file")
    _count(args.epochs, "epochs", minimum=0 if args.model_kind == "timewarp" else 1)  # 0: Timewarp's fitted baseline
    _positive(args.max_minutes, "max_minutes")
    if args.model_kind == "timewarp":
        if not args.trajectories:
            raise ConfSampleError("train timewarp needs --trajectories (pairs x(t), x(t + tau) of MD runs).")
        _positive(args.tau_ps, "tau_ps")
        molsys = _system(args)
        from .workflows import train_timewarp

        config = {"n_coupling_layers": args.coupling_layers, "hidden_dim": args.hidden or 64}
        if args.coordinates == "internal":
            from .models.timewarp import zmatrix_for

            config.update(coordinates="internal", zmatrix=zmatrix_for(molsys.atom_labels, topology=molsys.topology))
        _, summary = train_timewarp(molsys, args.trajectories, args.out, args.tau_ps, topology=args.topology,
                                    epochs=args.epochs, acceptance_steps=args.acceptance_steps,
                                    max_minutes=args.max_minutes, seed=args.seed, progress=not args.quiet,
                                    config=config, allow_truncated=args.allow_truncated)
        for key, value in summary.items():
            print(f"{key}: {value}")
        return
    _existing([args.bias] if args.bias else [], "bias file")
    hot = [t for group in args.hot or [] for t in group]
    if not args.trajectories and not hot and not args.bias:
        raise ConfSampleError("no training data: give --trajectories, --hot TEMPERATURE or --bias BIAS.pt.")
    if args.uniform_weight is not None and not 0.0 <= args.uniform_weight < 1.0:
        raise ConfSampleError(f"--uniform-weight must lie in [0, 1), got {args.uniform_weight}.")
    if hot or args.bias:
        _positive(args.data_ps, "data_ps"), _positive(args.data_save_interval_ps, "data_save_interval_ps")
    molsys = _system(args)
    from .workflows import resolve_torsions, train_torsion_diffusion

    torsions = resolve_torsions(molsys, args.torsions, args.include_methyl)  # a bad name fails before any MD
    _, summary = train_torsion_diffusion(
        molsys, args.trajectories, args.out, topology=args.topology, torsions=torsions, hot_temperatures_K=hot,
        bias=args.bias, reweight=args.reweight, data_ps=args.data_ps, data_save_interval_ps=args.data_save_interval_ps,
        uniform_weight=args.uniform_weight, max_epochs=args.epochs, max_minutes=args.max_minutes, seed=args.seed,
        hidden=args.hidden or 32, n_layers=args.layers, min_flow_steps=args.min_flow_steps,
        platform=args.platform, bias_backend=args.bias_backend, progress=not args.quiet,
        allow_truncated=args.allow_truncated)
    from .workflows import format_training_summary

    print(format_training_summary(summary))


def _cmd_bias(args):
    _existing(args.trajectories, "trajectory file")
    molsys = _system(args)
    from .workflows import build_learned_bias

    _, summary = build_learned_bias(molsys, args.trajectories, args.out, topology=args.topology,
                                    torsions=args.torsions, rounds=args.rounds, round_ps=args.round_ps,
                                    bias_factor=args.bias_factor, cap_kT=args.cap_kt,
                                    train_minutes_per_round=args.train_minutes, seed=args.seed,
                                    platform=args.platform, backend=args.backend, progress=not args.quiet,
                                    allow_truncated=args.allow_truncated)
    print(f"wrote {summary['bias']} and {summary['summary']} ({summary['wall_seconds']:.0f} s)")


def _make_move(args, molsys, model_path, seed):
    move = _make_instantaneous_move(args, molsys, model_path, seed)
    if args.ncmc_steps is None:
        return move
    from .moves.ncmc import NCMCMove

    # the same proposal, its jump relaxed by an NCMC protocol of --ncmc-steps steps (0: the instantaneous move)
    return NCMCMove.for_system(move.proposal, molsys, args.ncmc_steps, n_attempts=1, seed=seed,
                               protocol=args.ncmc_protocol)


def _make_instantaneous_move(args, molsys, model_path, seed):
    if args.move == "diffusion":
        from .moves.torsion_diffusion import TorsionDiffusionMove

        return TorsionDiffusionMove(model_path, molsys, n_proposals=args.n_proposals, seed=seed)
    if args.move == "timewarp":
        from .moves.timewarp import TimewarpMove

        return TimewarpMove(model_path, molsys, n_proposals=args.n_proposals, seed=seed,
                            exploration_threshold_kT=args.explore_kT)
    if args.move == "fragment":
        from .moves.fragment import FragmentMove

        return FragmentMove(model_path, molsys, scan=args.scan, n_proposals=args.n_proposals, seed=seed)
    from .bench.alanine import alanine_basin_proposal
    from .geometry.torsions import TorsionSet
    from .moves.mcmc import LearnedMCMCMove

    torsion_set = TorsionSet(molsys.bonds, molsys.n_atoms, molsys.torsion_array, names=molsys.torsion_names)
    return LearnedMCMCMove(alanine_basin_proposal(torsion_set), n_proposals=args.n_proposals, seed=seed)


def _cmd_sample(args):
    length_ps = _positive(args.length_ps, "length_ps")
    _count(args.move_interval, "move_interval"), _count(args.n_attempts, "n_attempts")
    _count(args.n_proposals, "n_proposals"), _positive(args.save_interval_ps, "save_interval_ps")
    walkers = None if args.walkers is None else _count(args.walkers, "walkers")
    if args.ncmc_steps is not None:
        _count(args.ncmc_steps, "ncmc_steps", minimum=0)
        if args.move == "timewarp":
            raise ConfSampleError("--ncmc-steps relaxes torsion moves of the solute (--move diffusion, fragment or "
                                  "basins); Timewarp proposes every atom's position and has no NCMC protocol.")
    model_path = None
    if args.move in ("diffusion", "timewarp"):
        if not args.model:
            raise ConfSampleError(f"--model is required with --move {args.move} (a shipped model's name, see "
                                  "`confsample models`, or a checkpoint path).")
        model_path = _model_path(args.model, args.move)
    elif args.move == "fragment":
        model_path = _model_path(args.model or "peptide-fragments", "fragment")
    molsys = _system(args)
    from .workflows import format_torsion_report, move_torsions, resolve_torsions, sample_walkers, sample_with_moves

    if walkers is None:
        move = _make_move(args, molsys, model_path, args.seed)
        torsions = resolve_torsions(molsys, args.torsions) if args.torsions else move_torsions(move, molsys)
        result = sample_with_moves(molsys, move, args.out, length_ps, move_interval_steps=args.move_interval,
                                   n_attempts=args.n_attempts, save_interval_ps=args.save_interval_ps,
                                   seed=args.seed, platform=_platform(args, molsys), torsions=torsions,
                                   timestep_fs=molsys.timestep_fs or 1.0, progress=not args.quiet)
        written = f"{result.trajectory_path}, {result.log_path}, {result.summary_path}"
    else:
        torsions = (resolve_torsions(molsys, args.torsions) if args.torsions
                    else move_torsions(_make_move(args, molsys, model_path, 0), molsys))
        result = sample_walkers(molsys, lambda walker, rng: _make_move(args, molsys, model_path, rng), walkers,
                                args.out, length_ps, move_interval_steps=args.move_interval,
                                n_attempts=args.n_attempts, seed=args.seed, torsions=torsions,
                                timestep_fs=molsys.timestep_fs or 1.0, platform=_platform(args, molsys),
                                progress=not args.quiet)
        written = f"{walkers} walkers' trajectories and {result.summary_path}"
        if not _is_root():
            return
    summary, stats = result.summary, result.summary["move_statistics"]
    label = "" if summary["exact"] else "  [BIASED exploration mode: not Boltzmann]"
    print(f"wrote {written}")
    print(f"moves: {stats.get('n_moves', 0)}, proposals: {stats.get('n_proposed', 0)}, acceptance: "
          f"{summary['acceptance']:.3f}, {summary['ms_per_proposal']:.2f} ms/proposal, wall "
          f"{summary['wall_seconds']:.1f} s{label}")
    if "ncmc_steps" in stats:
        print(f"NCMC: {stats['ncmc_steps']}-step protocols, {stats.get('md_step_equivalents_per_move', 0):.0f} MD-step "
              f"equivalents per move, mean work {stats.get('mean_work_kT', 0.0):.1f} kT, "
              f"{stats.get('n_stopped_at_midpoint', 0)} refused at the midpoint, {stats.get('n_failed_protocols', 0)} "
              "failed after it (NaN or constraint failure: rejected)"
              + (f"; dragged torsions ended {stats['mean_drive_miss_rad']:.2f} rad from their targets on average"
                 if stats.get("mean_drive_miss_rad") else ""))
    if walkers is not None:
        for failed in summary["failed"]:
            print(f"walker {failed} failed: {summary['walkers'][failed]['error']}")
        for name, entry in summary["torsions"].items():
            s = entry["states"][f"{name} > 0"]
            if s is None:
                continue
            if s["ess"] is None:
                print(f"{name} > 0: {s['p']:.3f} ({'never entered' if s['p'] == 0 else 'never left'} by any walker)")
                continue
            error = "-" if s["p_error"] is None else f"{s['p_error']:.3f}"
            r_hat = "undefined" if s["r_hat"] is None else f"{s['r_hat']:.3f}"
            per_walker = ", ".join("-" if e is None else f"{e:.0f}" for e in s["ess_per_chain"])
            print(f"{name} > 0: {s['p']:.3f} ± {error}, pooled ESS {s['ess']:.0f} (per walker {per_walker}), "
                  f"R-hat {r_hat}")
        return
    print(f"per torsion over {summary['n_frames']} frames: population ± block error (ESS of the state's "
          "indicator, entries into the state; never/always: no ESS can be measured)")
    print(format_torsion_report(summary["torsions"]))


def _cmd_reweight(args):
    model_path = _model_path(args.model, "diffusion")
    molsys = _system(args)
    from .models.torsion_diffusion import TorsionDiffusionModel
    from .moves.torsion_diffusion import check_model_matches_system
    from .reweight import reweight_pipeline

    model = TorsionDiffusionModel.load(model_path)
    check_model_matches_system(model, molsys, f"'{args.model}'")
    angles = model.sample(args.n_samples, generator=args.seed)
    result = reweight_pipeline(molsys, angles, n_resample=args.n_resample, energy=args.energy,
                               temperature_K=args.reweight_temperature, seed=args.seed, out_dir=args.out,
                               progress=not args.quiet)
    print(f"rebuilt {len(angles)} structures; Kish ESS of the Boltzmann weights: {result.ess:.1f}")
    for name, path in (result.files or {}).items():
        print(f"wrote {name}: {path}")
    if args.validate_ps > 0:
        from .reweight import plot_validation, validate_structures

        count = min(args.validate_count, len(result.resampled_positions_nm))
        validation = validate_structures(molsys, result.resampled_positions_nm[:count], length_ps=args.validate_ps,
                                         solvent=args.solvent, seed=args.seed, progress=not args.quiet)
        png = os.path.join(args.out, "validation.png")
        plot_validation(validation, png)
        print(f"validation of {count} structures ({args.solvent} solvent, {args.validate_ps} ps): {validation.summary}")
        print(f"wrote {png}")


def _cmd_demo(args):
    _positive(args.seconds, "seconds")
    model_path = None if args.model is None else _model_path(args.model, "diffusion")
    from .bench.demo import run_demo

    run_demo(args.out, args.seconds, model_path, args.system, args.train, progress=not args.quiet, seed=args.seed,
             forcefield_files=args.forcefield)


# ------------------------------------------------------------------------------------------------
# the parser


def _add_system_arguments(parser):
    parser.add_argument("system", help="a registered system name (see `confsample systems`) or a PDB file")
    parser.add_argument("--forcefield", nargs="+", default=None, metavar="XML",
                        help="force-field XML files for a PDB input (default: amber99sbildn.xml amber99_obc.xml)")
    parser.add_argument("--temperature", type=float, default=None, help="temperature in K (default: the system's)")


def _add_trajectory_arguments(parser, what: str, out_help: str, required: bool = True):
    parser.add_argument("--trajectories", nargs="+", required=required, default=[], metavar="FILE",
                        help=f"{what}DCD/XTC/HDF5 trajectories (e.g. from `confsample simulate`)")
    parser.add_argument("--topology", default=None, help="topology PDB for DCD/XTC files (default: the system's)")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--allow-truncated", action="store_true",
                        help="use the readable frames of a truncated DCD (header claims more frames) instead of refusing")


def _add_torsion_argument(parser, what: str, default=None):
    parser.add_argument("--torsions", default=default, metavar="SPEC",
                        help=f"{what}: 'all' (every rotatable torsion: backbone, side chains; no methyl/hydroxyl "
                             "rotors unless --include-methyl), or names/kinds such as 'phi,psi,chi1' "
                             "(`confsample torsions SYSTEM` lists them)")


def _add_run_arguments(parser, seed_help: str = "random seed (default 0)"):
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confsample",
        description="Learned generative models (torsion diffusion, Timewarp) as exact Metropolis-Hastings moves "
                    "for OpenMM simulations.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    systems = commands.add_parser("systems", help="list the registered systems")
    systems.add_argument("--details", action="store_true", help="build each system and show atoms and torsions")
    systems.set_defaults(func=_cmd_systems)
    commands.add_parser("models", help="list the shipped models (name, path, system, training data); every "
                                       "--model takes a name or a path").set_defaults(func=_cmd_models)

    torsions = commands.add_parser("torsions", help="list a system's rotatable torsions with atom names",
                                   description="List the torsions --torsions selects (default all): name, atom "
                                               "indices and atom names. Peptides: phi, psi, chi1-chi4 per residue "
                                               "(mdtraj templates); other molecules: single, non-ring bonds between "
                                               "heavy atoms that are not amide C-N (RDKit).")
    _add_system_arguments(torsions)
    _add_torsion_argument(torsions, "what to list (default all)", default="all")
    torsions.add_argument("--include-methyl", action="store_true", help="also methyl, amine, hydroxyl and thiol rotors")
    torsions.set_defaults(func=_cmd_torsions)

    simulate = commands.add_parser("simulate", help="run reference MD and write an mdtraj-readable trajectory",
                                   description="Run Langevin MD (LangevinMiddleIntegrator) and write PREFIX.dcd/.xtc, "
                                               "PREFIX.pdb (topology) and PREFIX.json (metadata).")
    _add_system_arguments(simulate)
    simulate.add_argument("--length-ps", type=float, default=100.0, help="simulated time in ps (default 100)")
    simulate.add_argument("--timestep-fs", type=float, default=1.0, help="timestep in fs (default 1)")
    simulate.add_argument("--friction", type=float, default=1.0, help="friction in 1/ps (default 1)")
    simulate.add_argument("--save-interval-ps", type=float, default=1.0, help="ps between saved frames (default 1)")
    simulate.add_argument("--platform", default=None,
                          help="OpenMM platform (default: Reference up to 200 atoms, where it is fastest; CPU beyond)")
    simulate.add_argument("--format", choices=("dcd", "xtc"), default="dcd", help="trajectory format (default dcd)")
    simulate.add_argument("--out", default="runs/md", help="output path prefix (default runs/md)")
    simulate.add_argument("--bias", default=None, metavar="BIAS.pt",
                          help="run on the potential plus this learned torsion bias (from `confsample bias`); "
                               "writes each frame's bias energy to OUT.bias.npy")
    simulate.add_argument("--bias-backend", choices=("auto", "torchforce", "pythonforce"), default="auto",
                          help="how the bias enters OpenMM (default auto)")
    _add_run_arguments(simulate)
    simulate.set_defaults(func=_cmd_simulate)

    train = commands.add_parser(
        "train", help="train a torsion diffusion model or a Timewarp flow on MD data",
        description="Train a model on MD data: existing trajectories and, for diffusion, MD this command runs "
                    "itself at higher temperatures (--hot) or with a learned bias (--bias). Every source is pooled: "
                    "the MH test keeps the moves exact whatever the data. Diffusion prints its losses and, per "
                    "torsion, what fraction of the circle the data covered, with a warning where the model will "
                    "rarely propose.")
    train.add_argument("model_kind", choices=("diffusion", "timewarp"), help="which model")
    _add_system_arguments(train)
    _add_trajectory_arguments(train, "existing ", "checkpoint path to write (.pt)", required=False)
    _add_torsion_argument(train, "diffusion: the torsions the model learns and the move turns (default: the "
                                 "system's named torsions)")
    train.add_argument("--include-methyl", action="store_true", help="diffusion: with --torsions, also hydrogen rotors")
    train.add_argument("--hot", type=_temperatures, action="append", metavar="K[,K...]",
                       help="diffusion: also run --data-ps of MD at this temperature (K) and pool it; repeat or give a "
                            "list (--hot 450 --hot 600, --hot 450,600)")
    train.add_argument("--bias", default=None, metavar="BIAS.pt",
                       help="diffusion: also run --data-ps of MD with this learned torsion bias (`confsample bias`) "
                            "and pool it")
    train.add_argument("--reweight", action="store_true",
                       help="diffusion: resample biased frames by exp(+B/kT) toward the unbiased distribution "
                            "(default: pooled as sampled, broader)")
    train.add_argument("--data-ps", type=float, default=200.0, help="diffusion: ps of each --hot/--bias run (default 200)")
    train.add_argument("--data-save-interval-ps", type=float, default=0.5,
                       help="diffusion: ps between frames of those runs (default 0.5)")
    train.add_argument("--uniform-weight", type=float, default=None,
                       help="diffusion: weight of a uniform mixture in the proposal, stored in the model (e.g. 0.05; "
                            "default 0)")
    train.add_argument("--platform", default="Reference", help="OpenMM platform of the --hot/--bias runs")
    train.add_argument("--bias-backend", choices=("auto", "torchforce", "pythonforce"), default="auto",
                       help="how --bias enters OpenMM (default auto)")
    train.add_argument("--epochs", type=int, default=200, help="maximum epochs (default 200)")
    train.add_argument("--max-minutes", type=float, default=5.0, help="training wall-clock budget (default 5)")
    train.add_argument("--tau-ps", type=float, default=0.5, help="Timewarp lag time in ps (default 0.5)")
    train.add_argument("--coordinates", choices=("cartesian", "internal"), default="cartesian",
                       help="Timewarp: flow on Cartesian displacements (the reference design, default) or on the "
                            "system's bond lengths, angles and torsions (internal; far higher acceptance)")
    train.add_argument("--coupling-layers", type=int, default=4,
                       help="Timewarp: coupling blocks (default 4; 0 with --coordinates internal: the fitted "
                            "linear-Gaussian baseline alone, no transformer)")
    train.add_argument("--hidden", type=int, default=None,
                       help="network width (default: diffusion 32, Timewarp transformer 64); a wider score network "
                            "costs more per proposal")
    train.add_argument("--layers", type=int, default=2, help="diffusion: score network layers (default 2)")
    train.add_argument("--min-flow-steps", type=int, default=10,
                       help="diffusion: fewest Euler steps of the flow, raised until each step is invertible "
                            "(default 10); each step is one network call per proposal")
    train.add_argument("--acceptance-steps", type=int, default=0,
                       help="Timewarp: optimizer steps of the acceptance objective after likelihood (default 0)")
    _add_run_arguments(train)
    train.set_defaults(func=_cmd_train)

    sample = commands.add_parser(
        "sample", help="run MD with learned MC moves and report what it sampled",
        description="Run Langevin MD with a learned move every --move-interval steps (an OpenMM Simulation with "
                    "the one LearnedMoveReporter line) and write OUT/trajectory.dcd/.csv/.pdb/.json and "
                    "OUT/summary.json: acceptance, ms per proposal, and per torsion its basin populations with "
                    "errors and the ESS of each state. --walkers N runs N independent walkers instead (one per "
                    "MPI rank under mpiexec): OUT/walker_*.dcd and a merged summary with R-hat.")
    _add_system_arguments(sample)
    sample.add_argument("--move", choices=("diffusion", "timewarp", "fragment", "basins"), default="diffusion",
                        help="diffusion / timewarp (need --model), fragment (fragment-local torsion moves on any "
                             "capped peptide; --model defaults to the shipped 'peptide-fragments') or basins (a von "
                             "Mises mixture on alanine's basins)")
    sample.add_argument("--scan", choices=("random", "systematic"), default="random",
                        help="--move fragment: which residue each move turns (random, or each in turn)")
    sample.add_argument("--model", default=None,
                        help="a shipped model's name (`confsample models`) or a checkpoint path (.pt)")
    sample.add_argument("--length-ps", type=float, default=100.0, help="simulated MD time in ps (default 100)")
    sample.add_argument("--move-interval", type=int, default=500, help="MD steps between moves (default 500)")
    sample.add_argument("--n-attempts", type=int, default=1, help="moves per application (default 1)")
    sample.add_argument("--n-proposals", type=int, default=1, help="MH steps proposed per model call (default 1)")
    sample.add_argument("--explore-kT", type=float, default=None,
                        help="Timewarp exploration mode: accept unless the energy rises by more than this many kT "
                             "(BIASED, not Boltzmann)")
    sample.add_argument("--ncmc-steps", type=int, default=None, metavar="N",
                        help="relax each move by nonequilibrium candidate MC: the solute is softened over N/2 "
                             "Langevin steps, the move's jump made, and restored over N/2 more (N even; 0: the "
                             "instantaneous move; for solvated systems, where instantaneous jumps land on water)")
    sample.add_argument("--ncmc-protocol", choices=("decouple", "drive"), default="decouple",
                        help="with --ncmc-steps: 'decouple' softens the solute around the jump (default); 'drive' "
                             "drags the move's torsions to the proposed values with a moving restraint, no jump")
    sample.add_argument("--save-interval-ps", type=float, default=1.0, help="ps between saved frames (default 1)")
    _add_torsion_argument(sample, "the torsions to report (default: the move's and the system's named ones)")
    sample.add_argument("--walkers", type=int, default=None, metavar="N",
                        help="N independent walkers (parallel.run_walkers; under mpiexec spread over the ranks); "
                             "one frame per move interval")
    sample.add_argument("--platform", default=None,
                        help="OpenMM platform (default: Reference up to 200 atoms, CPU beyond; with --walkers, "
                             "'auto' picks each rank's GPU)")
    sample.add_argument("--out", default="runs/sample", help="output directory (default runs/sample)")
    _add_run_arguments(sample)
    sample.set_defaults(func=_cmd_sample)

    reweight = commands.add_parser("reweight", help="the original study's pipeline: sample torsions, rebuild with "
                                                    "RDKit, MMFF94 energies, Boltzmann-reweight, validate with OpenMM MD")
    _add_system_arguments(reweight)
    reweight.add_argument("--model", required=True, help="a shipped torsion diffusion model's name or a checkpoint")
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
    reweight.add_argument("--out", default="runs/reweight", help="output directory (default runs/reweight)")
    _add_run_arguments(reweight)
    reweight.set_defaults(func=_cmd_reweight)

    bias = commands.add_parser("bias", help="build a learned torsion bias from MD and refine it by rounds of biased MD",
                               description="Train a torsion diffusion model on unbiased trajectories, turn its free "
                                           "energy into a well-tempered, capped bias on the chosen torsions, and "
                                           "refine it by rounds of biased MD (TorchForce when openmm-torch imports, "
                                           "else PythonForce). Writes the bias (.pt, LearnedTorsionBias.load) and a "
                                           "JSON summary; reweight biased frames by exp(+B/kT).")
    _add_system_arguments(bias)
    _add_trajectory_arguments(bias, "unbiased ", "bias file to write (.pt)")
    _add_torsion_argument(bias, "the torsions to bias (default: the system's named torsions)")
    bias.add_argument("--rounds", type=int, default=3, help="refinement rounds of biased MD (default 3)")
    bias.add_argument("--round-ps", type=float, default=200.0, help="biased MD per round in ps (default 200)")
    bias.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered gamma (default 6; inf: flat)")
    bias.add_argument("--cap-kt", type=float, default=20.0, help="largest free energy removed, in kT (default 20)")
    bias.add_argument("--train-minutes", type=float, default=1.0, help="training budget per round (default 1)")
    bias.add_argument("--backend", choices=("auto", "torchforce", "pythonforce"), default="auto",
                      help="force backend of the bias (default auto: TorchForce if openmm-torch imports)")
    bias.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    _add_run_arguments(bias)
    bias.set_defaults(func=_cmd_bias)

    demo = commands.add_parser("demo", help="the main job: plain MD vs MD + learned torsion moves, same wall time",
                               description="Run plain MD and MD + TorsionDiffusionMove for the same wall time on "
                                           "alanine-dipeptide-implicit with the model the package ships; print "
                                           "acceptance, P(phi>0) and the ESS/s ratio; write ramachandran.png and "
                                           "summary.json.")
    demo.add_argument("--out", default="confsample-demo", help="output folder (default confsample-demo)")
    demo.add_argument("--seconds", type=float, default=60.0, help="wall seconds per method (default 60)")
    demo.add_argument("--model", default=None,
                      help="a shipped torsion diffusion model's name or a checkpoint (default: the shipped model)")
    demo.add_argument("--system", default="alanine-dipeptide-implicit", help="registry name or PDB file")
    demo.add_argument("--forcefield", nargs="+", default=None, metavar="XML", help="force fields for a PDB system")
    demo.add_argument("--train", action="store_true", help="train a model for the system first (own MD data)")
    _add_run_arguments(demo)
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
