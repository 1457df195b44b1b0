"""Fragment-local torsion moves on peptides: MD vs MD + fragment moves (vs parallel tempering), per residue.

    python benchmarks/fragment_benchmark.py --quick           # about 2 minutes: checks that everything runs
    python benchmarks/fragment_benchmark.py                   # full: 120 s per method (about 40 minutes)
    python benchmarks/fragment_benchmark.py --seconds 300 --reference-seconds 1200 --model PATH

Sections (one run per method, the same wall time per method, ratios within the run; bench.samplers and
bench.summary do the sampling and the measuring):

1. zero-shot: the dipeptide whose residue type the model never saw (LEU by default): acceptance, ESS/s of its
   slowest backbone indicator vs MD, and the alpha_L/C7ax free energy (phi > 0) against an independent
   reference (MD + von Mises basin moves, run longer, cached under benchmarks/cache).
2. pentapeptide Ac-(Ala)5-NMe: MD, MD + fragment moves and parallel tempering; per residue the slowest
   backbone indicator's ESS/s, ratios to MD and PT, acceptance per residue, PT's neighbour exchange rates.
3. trpzip2 (implicit solvent, folded start): side-chain and backbone acceptance; Trp chi1/chi2 rotamer
   transitions per second, MD vs MD + fragment moves.
4. alanine dipeptide: MD, MD + fragment moves, MD + the von Mises basin mixture and MD + the shipped torsion
   diffusion model, on phi > 0.
5. chain length (1, 3, 5, 12 residues): ms per move and per energy evaluation, acceptance (table and plot);
   far-chain displacement of each move kind on the pentapeptide.

Writes summary.md, results.json and scaling.png to ``--out`` (default benchmarks/out/fragments-<mode>).
Timings are meaningless on a loaded machine: run the full mode on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from openmm_confsample.bench.alanine import ALANINE_INDICATORS, PHI_POSITIVE, alanine_basin_proposal, basin_proposal
from openmm_confsample.bench.config import BenchmarkConfig
from openmm_confsample.bench.observables import angle_range, positive
from openmm_confsample.bench.reference import run_reference
from openmm_confsample.bench.samplers import plain, run_md_with_moves, run_parallel_tempering, run_plain_md
from openmm_confsample.bench.summary import MIN_ENTRIES, format_ratio, markdown_table, summarize
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves.engine import MetropolisHastingsEngine
from openmm_confsample.moves.fragment import SHIPPED_FRAGMENT_MODEL, FragmentProposal
from openmm_confsample.systems import get_system
from openmm_confsample.systems.peptides import capped_peptide

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {"quick": {"seconds": 4.0, "reference_seconds": 8.0, "timing_moves": 40},
         "full": {"seconds": 120.0, "reference_seconds": 600.0, "timing_moves": 400}}
SEGMENT = {"md_steps_per_segment": 10, "moves_per_segment": 4}


def residue_indicators(molsys) -> dict:
    """residue -> its backbone indicators: phi > 0 (alpha_L / C7ax) and psi in (-120, 50) (alpha basins)."""
    out = {}
    for name in molsys.torsions:
        kind, residue = name.split(":", 1)
        if kind == "phi":
            out.setdefault(residue, []).append(positive(name))
        elif kind == "psi":
            out.setdefault(residue, []).append(angle_range(name, -120.0, 50.0, name=f"{name} in (-120, 50)"))
    return out


def slowest_per_residue(rows, by_residue: dict, md_method: str = "MD") -> list[dict]:
    """Per residue: the indicator with the lowest ESS/s in the MD run, and every method's ESS/s and ratios on it."""
    md = next(r for r in rows if r["method"] == md_method)
    table = []
    for residue, indicators in by_residue.items():
        slowest = min((i.name for i in indicators), key=lambda n: md["indicators"][n]["ess_per_s"])
        entry = {"residue": residue, "indicator": slowest}
        for r in rows:
            if r["method"] == "reference":
                continue
            s = r["indicators"][slowest]
            entry[r["method"]] = {"ess_per_s": s["ess_per_s"], "entries": s["entries"],
                                  "ratio_vs_md": format_ratio(s.get("ratio_vs_md"), s.get("ratio_vs_md_bound", "")),
                                  "ratio_vs_pt": format_ratio(s.get("ratio_vs_pt"), s.get("ratio_vs_pt_bound", ""))}
        table.append(entry)
    return table


def residue_table(entries: list[dict], methods: list[str], acceptance: dict) -> str:
    lines = ["| residue | slowest indicator (in MD) | " + " | ".join(f"ESS/s {m}" for m in methods)
             + " | fragment x MD | fragment x PT | fragment-move acceptance |",
             "|---|---|" + "---|" * len(methods) + "---|---|---|"]
    for e in entries:
        fragment = e.get("MD+fragment", {})
        accepted = acceptance.get(e["residue"], {}).get("acceptance_rate")
        lines.append(f"| {e['residue']} | {e['indicator']} | "
                     + " | ".join(f"{e[m]['ess_per_s']:.3g} ({e[m]['entries']} entries)" for m in methods)
                     + f" | {fragment.get('ratio_vs_md', '')} | {fragment.get('ratio_vs_pt', '')} | "
                     + (f"{accepted:.3f}" if accepted is not None else "") + " |")
    return "\n".join(lines) + "\n"


def fragment_run(molsys, model, seconds, seed, progress, method="MD+fragment", **options):
    proposal = FragmentProposal.for_system(molsys, model, **options)
    run = run_md_with_moves(molsys, proposal, seconds, seed=seed, method=method, progress=progress, **SEGMENT)
    run.acceptance["fragments"] = proposal.fragment_statistics()
    return run


# -- 1. zero-shot dipeptide -------------------------------------------------------------------------------

def zero_shot(model, residue, seconds, reference_seconds, seed, progress, cache) -> dict:
    molsys = get_system(f"dipeptide-{residue}")
    by_residue = residue_indicators(molsys)
    indicators = [i for group in by_residue.values() for i in group]
    phi, psi = (f"{k}:{residue}2" for k in ("phi", "psi"))

    def basins(system, kappa=3.0, weights=None):
        return alanine_basin_proposal(TorsionSet(system.bonds, system.n_atoms, [system.torsions[phi], system.torsions[psi]],
                                                 names=[phi, psi]), kappa, weights)

    config = BenchmarkConfig(f"dipeptide-{residue}", indicators, primary=f"{phi} > 0", cvs=(phi, psi),
                             basin_proposal=basins)
    reference = run_reference(molsys, reference_seconds, config, cache_path=os.path.join(
        cache, f"reference_dipeptide-{residue}_{reference_seconds:g}s.npz"), progress=progress)
    runs = [run_plain_md(molsys, seconds, seed=seed, progress=progress, cvs=config.cvs),
            fragment_run(molsys, model, seconds, seed, progress)]
    rows = summarize(runs, indicators, reference, primary=config.primary_name)
    return {"system": molsys.name, "rows": rows, "per_residue": slowest_per_residue(rows, by_residue),
            "acceptance": runs[1].acceptance["fragments"]["per_residue"], "table": markdown_table(rows)}


# -- 2. pentapeptide ----------------------------------------------------------------------------------------

def pentapeptide(model, name, seconds, seed, progress, n_replicas, t_max) -> dict:
    molsys = get_system(name)
    by_residue = residue_indicators(molsys)
    indicators = [i for group in by_residue.values() for i in group]
    runs = [run_plain_md(molsys, seconds, seed=seed, progress=progress),
            fragment_run(molsys, model, seconds, seed, progress),
            run_parallel_tempering(molsys, seconds, n_replicas=n_replicas, t_max=t_max, seed=seed, progress=progress)]
    rows = summarize(runs, indicators, primary=indicators[0].name)
    entries = slowest_per_residue(rows, by_residue)
    acceptance = runs[1].acceptance["fragments"]["per_residue"]
    return {"system": name, "rows": rows, "per_residue": entries, "acceptance": acceptance,
            "per_kind": runs[1].acceptance["fragments"]["per_kind"],
            "pt": {"n_replicas": n_replicas, "t_max_K": t_max,
                   "neighbour_exchange_acceptance": runs[2].acceptance["neighbour_exchange_acceptance"]},
            "table": residue_table(entries, ["MD", "MD+fragment", "PT"], acceptance)}


# -- 3. trpzip2 -----------------------------------------------------------------------------------------------

def rotamer_transitions(run, names) -> dict:
    """Transitions between rotamer states per wall second: chi1 in thirds (0/120/240 deg), chi2 by sign of cos."""
    out = {}
    for name in names:
        values = np.mod(run.cvs[name], 2 * np.pi)
        states = (values // (2 * np.pi / 3)).astype(int) if name.startswith("chi1") else (np.cos(values) > 0).astype(int)
        out[name] = int(np.count_nonzero(np.diff(states))) / run.wall_seconds
    return out


def trpzip(model, seconds, seed, progress) -> dict:
    molsys = get_system("trpzip2-implicit")
    chis = [n for n in molsys.torsions if n.split(":")[0] in ("chi1", "chi2") and "TRP" in n]
    runs = [run_plain_md(molsys, seconds, seed=seed, progress=progress),
            fragment_run(molsys, model, seconds, seed, progress)]
    per_kind = runs[1].acceptance["fragments"]["per_kind"]
    transitions = {r.method: rotamer_transitions(r, chis) for r in runs}
    total = {m: sum(t.values()) for m, t in transitions.items()}
    return {"system": molsys.name, "per_kind": per_kind, "transitions_per_s": transitions, "total_per_s": total,
            "ratio_vs_md": total["MD+fragment"] / total["MD"] if total["MD"] else None,
            "acceptance": runs[1].acceptance["fragments"]["per_residue"]}


# -- 4. alanine dipeptide -----------------------------------------------------------------------------------

def alanine(model, seconds, seed, progress) -> dict:
    from openmm_confsample.moves.torsion_diffusion import TorsionDiffusionProposal

    molsys = get_system("alanine-dipeptide-implicit")
    cvs = ("phi", "psi")
    runs = [run_plain_md(molsys, seconds, seed=seed, progress=progress, cvs=cvs),
            run_md_with_moves(molsys, FragmentProposal.for_system(molsys, model), seconds, seed=seed, cvs=cvs,
                              method="MD+fragment", progress=progress, **SEGMENT),
            run_md_with_moves(molsys, basin_proposal(molsys), seconds, seed=seed, cvs=cvs,
                              method="MD+VonMises basins", progress=progress, **SEGMENT),
            run_md_with_moves(molsys, TorsionDiffusionProposal.for_system("alanine-dipeptide", molsys), seconds,
                              seed=seed, cvs=cvs, method="MD+TorsionDiffusionMove", progress=progress, **SEGMENT)]
    rows = summarize(runs, ALANINE_INDICATORS, primary=PHI_POSITIVE.name)
    by_method = {r["method"]: r for r in rows}
    fragment, basins = by_method["MD+fragment"], by_method["MD+VonMises basins"]
    measurable = min(fragment["entries"], basins["entries"]) >= MIN_ENTRIES and basins["ess_per_s"]
    return {"system": molsys.name, "rows": rows, "table": markdown_table(rows),
            "fragment_vs_basins": fragment["ess_per_s"] / basins["ess_per_s"] if measurable else None}


# -- 5. chain length ------------------------------------------------------------------------------------------

def move_timing(molsys, model, n_moves, seed) -> dict:
    """ms per fragment move (random scan, every kind) and per energy evaluation, on one Context, no MD."""
    proposal = FragmentProposal.for_system(molsys, model)
    engine = MetropolisHastingsEngine(proposal, seed=seed)
    context = molsys.create_context("Reference")
    import openmm

    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    positions = energy = None
    for warm_up in (True, False):  # as LearnedMCMCMove.apply: positions and energy carried from step to step
        engine.reset_statistics()
        start = time.perf_counter()
        for _ in range(5 if warm_up else n_moves):
            result = engine.step(context, molsys.kT, positions, energy)
            positions, energy = result.positions_nm, result.potential_kJ
    move_ms = 1e3 * (time.perf_counter() - start) / n_moves
    positions = context.getState(getPositions=True).getPositions(asNumpy=True)
    start = time.perf_counter()
    for _ in range(n_moves):
        context.setPositions(positions)
        context.getState(getEnergy=True)
    energy_ms = 1e3 * (time.perf_counter() - start) / n_moves
    stats = engine.statistics
    return {"system": molsys.name, "n_residues": len(proposal.fragments), "n_atoms": molsys.n_atoms,
            "ms_per_move": move_ms, "ms_per_energy": energy_ms, "acceptance": stats["acceptance_rate"],
            "proposal_ms": 1e3 * stats["proposal_seconds"] / max(stats["n_proposed"], 1),
            "per_kind": proposal.fragment_statistics()["per_kind"]}


def far_chain_displacement(model, n_proposals, seed) -> dict:
    """RMSD (nm) of the atoms two residues beyond the moved one, after superposing the atoms before it, per move kind.

    Measured on proposals (accepted or not) at the minimised Ac-(Ala)5-NMe, for the middle residue ALA4.
    """
    molsys = get_system("pentapeptide-AAAAA")
    proposal = FragmentProposal.for_system(molsys, model)
    x = molsys.positions_nm
    residue_of = np.array([a.residue.index for a in molsys.topology.atoms()])
    near, far = residue_of <= 2, residue_of >= 5  # ACE1-ALA3 fixed frame; ALA5 onwards measured
    rng = np.random.default_rng(seed)
    out = {}
    for label in ("fragment:ALA4", "sidechain:ALA4", "crankshaft:ALA3-ALA4", "crankshaft:ALA4-ALA5"):
        moves = [m for m in proposal.moves if m.label == label]
        if not moves:
            continue
        move = moves[0]
        rmsd = []
        for _ in range(n_proposals):
            new, _ = proposal._one(move, x, rng)
            y = move.torsion_set.set_values(x, new)
            rmsd.append(_superposed_rmsd(x, y, near, far))
        out[label] = float(np.mean(rmsd))
    return out


def _superposed_rmsd(x, y, fit, measure) -> float:
    a, b = x[fit] - x[fit].mean(0), y[fit] - y[fit].mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    rotation = u @ np.diag([1.0, 1.0, d]) @ vt
    moved = (y[measure] - y[fit].mean(0)) @ rotation + x[fit].mean(0)
    return float(np.sqrt(((moved - x[measure]) ** 2).sum(axis=1).mean()))


def scaling(model, n_moves, seed, out_dir) -> dict:
    systems = [get_system("dipeptide-ALA"), capped_peptide("AAA"), get_system("pentapeptide-AAAAA"),
               get_system("trpzip2-implicit")]
    rows = [move_timing(m, model, n_moves, seed) for m in systems]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    residues = [r["n_residues"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(residues, [r["ms_per_move"] for r in rows], "o-", label="fragment move (proposal + energy)")
    ax.plot(residues, [r["ms_per_energy"] for r in rows], "s--", label="energy evaluation alone")
    ax.set_xlabel("residues")
    ax.set_ylabel("ms")
    ax.set_xticks(residues)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=120)
    plt.close(fig)
    return {"rows": rows, "far_chain_rmsd_nm": far_chain_displacement(model, max(20, n_moves // 4), seed)}


def scaling_table(rows) -> str:
    lines = ["| system | residues | atoms | ms/move | ms/energy | move / energy | acceptance |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['n_residues']} | {r['n_atoms']} | {r['ms_per_move']:.2f} | "
                     f"{r['ms_per_energy']:.2f} | {r['ms_per_move'] / r['ms_per_energy']:.1f} | {r['acceptance']:.3f} |")
    return "\n".join(lines) + "\n"


def _kinds(per_kind: dict) -> str:
    return ", ".join(f"{k} {v['acceptance_rate']:.3f} ({v['n_proposed']})" for k, v in per_kind.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per method: checks that it all runs")
    parser.add_argument("--seconds", type=float, default=None, help="wall seconds per method")
    parser.add_argument("--reference-seconds", type=float, default=None)
    parser.add_argument("--model", default=SHIPPED_FRAGMENT_MODEL, help="fragment model (shipped name or path)")
    parser.add_argument("--zero-shot", default=None, help="left-out residue type (default: the model's left_out)")
    parser.add_argument("--pentapeptide", default="pentapeptide-AAAAA")
    parser.add_argument("--replicas", type=int, default=4, help="parallel-tempering replicas")
    parser.add_argument("--t-max", type=float, default=450.0, help="parallel tempering's highest temperature, K")
    parser.add_argument("--sections", nargs="+", default=["zero-shot", "pentapeptide", "trpzip2", "alanine", "scaling"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=os.path.join(HERE, "cache"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    seconds = args.seconds or mode["seconds"]
    reference_seconds = args.reference_seconds or mode["reference_seconds"]
    out_dir = args.out or os.path.join(HERE, "out", f"fragments-{'quick' if args.quick else 'full'}")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    progress = not args.quiet
    from openmm_confsample.moves.fragment import fragment_density

    model = fragment_density(args.model)
    left_out = args.zero_shot or (getattr(model, "metadata", {}).get("left_out") or ["LEU"])[0]
    results, report = {"seconds": seconds, "model": args.model, "command": " ".join(sys.argv)}, []
    start = time.perf_counter()
    if "zero-shot" in args.sections:
        r = results["zero_shot"] = zero_shot(model, left_out, seconds, reference_seconds, args.seed, progress, args.cache)
        report += [f"## Zero-shot: {r['system']} (never in training)\n", r["table"],
                   residue_table(r["per_residue"], ["MD", "MD+fragment"], r["acceptance"])]
    if "pentapeptide" in args.sections:
        r = results["pentapeptide"] = pentapeptide(model, args.pentapeptide, seconds, args.seed, progress,
                                                   args.replicas, args.t_max)
        report += [f"## {r['system']}\n", r["table"], f"Move kinds: {_kinds(r['per_kind'])}. PT with "
                   f"{r['pt']['n_replicas']} replicas up to {r['pt']['t_max_K']:g} K, neighbour exchange acceptance "
                   f"{[round(a, 3) for a in r['pt']['neighbour_exchange_acceptance']]}.\n"]
    if "trpzip2" in args.sections:
        r = results["trpzip2"] = trpzip(model, seconds, args.seed, progress)
        ratio = f"{r['ratio_vs_md']:.2f}" if r["ratio_vs_md"] is not None else "not measurable (MD: none)"
        report += ["## trpzip2 (implicit solvent, folded start)\n", f"Move kinds: {_kinds(r['per_kind'])}.\n",
                   f"Trp chi1/chi2 rotamer transitions per second: MD {r['total_per_s']['MD']:.3g}, MD+fragment "
                   f"{r['total_per_s']['MD+fragment']:.3g} (x MD: {ratio}).\n"]
    if "alanine" in args.sections:
        r = results["alanine"] = alanine(model, seconds, args.seed, progress)
        report += ["## Alanine dipeptide\n", r["table"],
                   "MD+fragment / MD+VonMises basins ESS/s on phi > 0: "
                   + (f"{r['fragment_vs_basins']:.2f}" if r["fragment_vs_basins"] is not None else
                      f"not measurable (fewer than {MIN_ENTRIES} entries in a run)") + ".\n"]
    if "scaling" in args.sections:
        r = results["scaling"] = scaling(model, mode["timing_moves"], args.seed, out_dir)
        report += ["## Cost against chain length (scaling.png)\n", scaling_table(r["rows"]),
                   "Far-chain RMSD of proposals on Ac-(Ala)5-NMe (nm, ALA5-NME after superposing ACE1-ALA3): "
                   + ", ".join(f"{k} {v:.3f}" for k, v in r["far_chain_rmsd_nm"].items()) + "\n"]
    results["total_seconds"] = time.perf_counter() - start
    text = "\n".join(report)
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(plain({k: v for k, v in results.items()}), handle, indent=2, default=str)
    print(text)
    print(f"wrote {out_dir}/summary.md, results.json, scaling.png in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
