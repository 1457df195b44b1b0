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


def _cmd_systems(args):
    from .systems import get_system, list_systems

    for name in list_systems():
        molsys = get_system(name)
        print(f"{name:32s} {molsys.n_atoms:5d} atoms  {molsys.temperature_K:.0f} K  torsions: "
              f"{', '.join(molsys.torsion_names)}  ({molsys.description})")


def _cmd_simulate(args):
    from .data.md import run_md
    from .systems import resolve_system

    molsys = resolve_system(args.system, args.forcefield, args.temperature)
    result = run_md(molsys, args.out, args.length_ps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction,
                    save_interval_ps=args.save_interval_ps, seed=args.seed, platform=args.platform,
                    trajectory_format=args.format, progress=not args.quiet)
    print(f"wrote {result.trajectory_path} ({result.n_frames} frames), {result.topology_path}, {result.metadata_path}")
    print(f"throughput: {result.ns_per_day:.1f} ns/day ({result.wall_seconds:.1f} s wall)")


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
    simulate.add_argument("--quiet", action="store_true", help="no progress bar")
    simulate.set_defaults(func=_cmd_simulate)

    for register in _EXTRA_COMMANDS:
        register(commands)
    return parser


#: Functions ``register(subparsers)`` that add further commands (train, sample, reweight, benchmark, demo).
_EXTRA_COMMANDS: list = []


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
