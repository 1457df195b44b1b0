"""The benchmark harness (openmm_confsample.bench): budgeted samplers, indicators, the comparison table and
the demo: small budgets, finite output, known statistics."""

import json
import math

import numpy as np
import pytest

from openmm_confsample import bench as B
from openmm_confsample.bench.alanine import ALANINE_INDICATORS, PHI_POSITIVE, alanine_config, basin_proposal
from openmm_confsample.bench.summary import PopulationEstimate
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.models.torsion_diffusion import TorsionDiffusionTrainer

BUDGET_S = 2.0


def _check_run(run, kind):
    run.check()
    assert run.n_samples >= 5
    assert np.all(np.abs(run.cvs["phi"]) <= np.pi) and np.all(np.abs(run.cvs["psi"]) <= np.pi)
    assert len(run.sample_times) == run.n_samples and np.all(np.diff(run.sample_times) >= 0)
    # the clock runs until the budget is spent, then finishes the current segment/iteration
    assert BUDGET_S <= run.wall_seconds < BUDGET_S + 5.0
    assert run.settings["kind"] == kind
    json.dumps(run.to_dict())  # plain values only


def test_plain_md_counts(ala_implicit):
    run = B.run_plain_md(ala_implicit, BUDGET_S, sample_every_steps=20, seed=1)
    _check_run(run, "md")
    assert run.n_energy_evaluations == 20 * run.n_samples  # one force evaluation per step
    assert run.exact and run.weights is None


def test_md_with_moves_counts(ala_implicit):
    proposal = basin_proposal(ala_implicit)
    run = B.run_md_with_moves(ala_implicit, proposal, BUDGET_S, md_steps_per_segment=20, moves_per_segment=2,
                              seed=1)
    _check_run(run, "md+moves")
    stats = run.acceptance
    assert stats["n_moves"] == 2 * run.n_samples
    assert stats["n_proposed"] == 2 * run.n_samples  # n_proposals=1
    assert 0.0 < stats["acceptance_rate"] < 1.0
    # MD steps + scored candidates + one energy read per segment + one force read per corrected segment
    corrections = run.settings["velocity_corrections"]
    assert 0 < corrections <= run.n_samples
    assert run.n_energy_evaluations == (20 * run.n_samples + stats["n_proposed"] - stats["n_invalid"] + run.n_samples
                                        + corrections)


def test_parallel_tempering_counts(ala_implicit):
    run = B.run_parallel_tempering(ala_implicit, BUDGET_S, n_replicas=3, steps_per_iteration=100, seed=1)
    _check_run(run, "pt")
    assert run.acceptance["iterations"] == run.n_samples
    assert run.n_energy_evaluations == run.n_samples * (3 * 100 + 3**2)
    assert run.settings["temperatures_K"][0] == pytest.approx(300.0)
    assert 0.0 <= run.acceptance["exchange_acceptance"] <= 1.0


def test_samplers_refuse_bad_input(ala_implicit):
    with pytest.raises(ConfSampleError, match="wall_seconds"):
        B.run_plain_md(ala_implicit, -1.0)
    with pytest.raises(ConfSampleError, match="proposal"):
        B.run_md_with_moves(ala_implicit, "not a proposal", 1.0)
    with pytest.raises(ConfSampleError, match="t_max"):
        B.run_parallel_tempering(ala_implicit, 1.0, t_min=400, t_max=300)


# -- the comparison on synthetic runs with known statistics -------------------------------------------


def _synthetic(method, phi, wall=10.0, kind="md"):
    rng = np.random.default_rng(len(method))
    return B.SamplerRun(method, {"phi": np.asarray(phi, float), "psi": rng.uniform(-np.pi, np.pi, len(phi))}, wall,
                        1000, {"acceptance_rate": 0.5}, True, None, np.linspace(0, wall, len(phi)), {"kind": kind})


def test_summarize_known_ess_and_free_energy():
    rng = np.random.default_rng(0)
    n, p = 40000, 0.1
    iid = np.where(rng.random(n) < p, 1.0, -1.0)  # independent draws: ESS = N, Delta F = -ln(p / (1 - p))
    # a two-state Markov chain with entry/exit probabilities a, b: P(phi > 0) = a / (a + b) = p and
    # tau_int = (2 - a - b) / (a + b) = 19, so ESS = N / 19
    a, b = 0.01, 0.09
    state, markov = 0, np.empty(n)
    for i, u in enumerate(rng.random(n)):
        state = (u < a) if state == 0 else (u >= b)
        markov[i] = 1.0 if state else -1.0
    rows = B.summarize([_synthetic("MD", markov), _synthetic("iid", iid)], ALANINE_INDICATORS)
    by = {r["method"]: r for r in rows}
    expected_f = -math.log(p / (1 - p))
    # ESS of iid data: N within the ~10 % noise of the estimate
    assert by["iid"]["ess"] == pytest.approx(n, rel=0.1)
    # Markov chain: N / 19; ~2100 effective samples give ~15 % noise on tau
    assert by["MD"]["ess"] == pytest.approx(n / 19, rel=0.25)
    assert by["iid"]["ratio_vs_md"] == pytest.approx(by["iid"]["ess"] / by["MD"]["ess"])
    assert by["iid"]["ess_per_s"] == pytest.approx(by["iid"]["ess"] / 10.0)
    for row in rows:  # 4 sigma of the block errors
        assert abs(row["delta_f_kT"] - expected_f) < 4 * row["delta_f_error_kT"]
    sigma_f = math.sqrt(p * (1 - p) / n) / (p * (1 - p))  # error of Delta F for N independent draws
    assert by["iid"]["delta_f_error_kT"] == pytest.approx(sigma_f, rel=0.5)  # 10 blocks: ~25 % noise on sigma
    table = B.markdown_table(rows)
    assert table.count("\n") == 2 + len(rows) and "| iid |" in table


def test_indicator_ess_is_bounded_by_entries():
    x = np.zeros(10000)
    x[5000:5002] = 1.0  # one brief visit: the autocorrelation ESS is large, the two-state bound is not
    ess, autocorrelation_ess, entries, upper_bound = B.indicator_ess(x, p=0.02)
    assert entries == 1 and not upper_bound
    assert autocorrelation_ess > 1000
    assert ess == pytest.approx(1 / (2 * 0.02 * 0.98), rel=0.01)  # slow limit: entries / (2 p (1 - p))
    never = B.indicator_ess(np.zeros(10000), p=0.02)  # no visit: one visit's worth, flagged as an upper bound
    assert never[0] == pytest.approx(1 / (2 * 0.02 * 0.98), rel=0.01) and never[3]
    iid = (np.random.default_rng(3).random(20000) < 0.02).astype(float)
    assert B.indicator_ess(iid, p=0.02)[0] == pytest.approx(20000, rel=0.1)  # fast limit: N


def test_summarize_with_reference_gives_z_and_jsd():
    rng = np.random.default_rng(1)
    phi = np.where(rng.random(5000) < 0.2, 1.0, -1.5) + rng.normal(0, 0.1, 5000)
    reference_run = _synthetic("reference", phi, wall=50.0)
    p = float(np.mean(phi > 0))
    reference = B.ReferenceEstimate(reference_run, {"phi > 0": PopulationEstimate(p, 0.005, -math.log(p / (1 - p)),
                                                                                 0.03)}, "phi > 0", {})
    rows = B.summarize([_synthetic("MD", phi[:2500]), _synthetic("PT", phi[2500:], kind="pt")], [PHI_POSITIVE],
                       reference)
    assert [r["method"] for r in rows] == ["MD", "PT", "reference"]
    for row in rows[:2]:
        assert abs(row["z_vs_reference"]) < 4
        assert 0.0 <= row["jsd"] < 0.1  # same distribution, 2500 samples in 36 x 36 bins
        assert np.isfinite(row["ess_tic0"])
    assert rows[1]["ratio_vs_pt"] == pytest.approx(1.0)


def test_reference_is_cached(tmp_path, ala_implicit):
    path = str(tmp_path / "ref.npz")
    config = alanine_config()
    first = B.run_reference(ala_implicit, 2.0, config, seed=5, cache_path=path)
    assert not first.from_cache and 0.0 <= first.estimate.p <= 1.0
    again = B.run_reference(ala_implicit, 2.0, config, seed=5, cache_path=path)
    assert again.from_cache
    assert again.estimate.p == first.estimate.p
    np.testing.assert_array_equal(again.run.cvs["phi"], first.run.cvs["phi"])
    other_seed = B.run_reference(ala_implicit, 1.0, config, seed=6, cache_path=path)
    assert not other_seed.from_cache


# -- the demo ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, ala_implicit):
    rng = np.random.default_rng(2)
    centres = np.array([[-1.4, 2.6], [-1.3, -0.7], [1.0, 0.6]])
    which = rng.choice(3, size=2000, p=[0.6, 0.3, 0.1])
    angles = np.angle(np.exp(1j * rng.normal(centres[which], 0.3)))
    metadata = {"torsions": [(name, list(quad)) for name, quad in ala_implicit.torsions.items()],
                "topology_fingerprint": ala_implicit.fingerprint()}
    model = TorsionDiffusionTrainer(hidden=16, n_layers=2, max_epochs=3, n_steps=10, progress=False).fit(
        angles, metadata=metadata).fetch_model()
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model.save(path)
    return str(path)


def test_demo_writes_plot_and_summary(tmp_path, tiny_model):
    from openmm_confsample.bench.demo import run_demo

    summary = run_demo(str(tmp_path / "demo"), wall_seconds=2.0, model_path=tiny_model, progress=False, quiet=True)
    assert (tmp_path / "demo" / "ramachandran.png").stat().st_size > 1000
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert {"system", "wall_seconds", "model", "methods", "ratio_ess_per_s", "files", "created"} <= set(written)
    assert [m["method"] for m in written["methods"]] == ["MD", "MD+TorsionDiffusionMove"]
    for row in written["methods"]:
        assert {"acceptance", "p", "p_error", "ess_per_s", "ratio_vs_md"} <= set(row)
    assert written["model"]["source"] == "user"
    assert summary["system"] == "alanine-dipeptide-implicit"


def test_demo_refuses_a_model_of_another_system(tmp_path, tiny_model):
    from openmm_confsample.bench.demo import run_demo
    from openmm_confsample.testing import four_atom_torsion_system

    with pytest.raises(ConfSampleError, match="another topology"):
        run_demo(str(tmp_path / "demo"), wall_seconds=1.0, model_path=tiny_model,
                 system=four_atom_torsion_system(), progress=False, quiet=True)


def test_summarize_reweights_a_biased_run():
    # iid draws from a biased P(phi > 0) = 0.5 with weights that turn it into P = 0.1, with log-normal noise
    # inside each state (a bias that also varies along other coordinates): ESS and Delta F are known
    rng = np.random.default_rng(4)
    n, p_target, sigma = 40000, 0.1, 1.5
    positive = rng.random(n) < 0.5
    phi = np.where(positive, 1.0, -1.0)
    weights = np.where(positive, p_target, 1.0 - p_target) * np.exp(sigma * rng.normal(size=n) - sigma**2 / 2)
    run = B.SamplerRun("MD+learned bias", {"phi": phi, "psi": rng.uniform(-np.pi, np.pi, n)}, 10.0, n, {}, True,
                       weights, np.linspace(0, 10.0, n), {"kind": "biased md"})
    (row,) = B.summarize([run], [PHI_POSITIVE], n_blocks=100)
    assert row["p"] == pytest.approx(p_target, abs=0.005)
    expected_f = -math.log(p_target / (1 - p_target))
    assert abs(row["delta_f_kT"] - expected_f) < 4 * row["delta_f_error_kT"]
    # self-normalised importance sampling: Var(P) = E_q[w^2 (I - P)^2] / N with E_q[w] = 1, ESS = P (1 - P) / Var
    w = weights / weights.mean()
    variance = np.mean(w**2 * ((phi > 0) - p_target) ** 2) / n
    expected_ess = p_target * (1 - p_target) / variance
    assert expected_ess < 0.5 * n  # the weights cost samples, so the cap at N does not decide the test
    assert row["ess"] == pytest.approx(expected_ess, rel=0.4)  # 100 blocks: ~14 % noise on the variance
    assert not row["ess_upper_bound"]
    unweighted = B.summarize([B.SamplerRun("MD", {"phi": phi, "psi": run.cvs["psi"]}, 10.0, n)], [PHI_POSITIVE])[0]
    assert abs(unweighted["delta_f_kT"] - expected_f) > 10 * unweighted["delta_f_error_kT"]  # the weights matter


def test_plain_md_with_a_learned_bias_records_weights(ala_implicit, tmp_path):
    from openmm_confsample.bias import LearnedTorsionBias

    log_q = lambda a: 2.0 * np.cos(a[:, 0] + 1.4) + np.cos(a[:, 1] - 2.6)  # noqa: E731
    bias = LearnedTorsionBias.from_log_density(log_q, ala_implicit.torsion_array, ala_implicit.kT,
                                               grid_points=24, max_frequency=4, bias_factor=4.0)
    path = bias.save(tmp_path / "bias.pt")
    run = B.run_plain_md(ala_implicit, BUDGET_S, sample_every_steps=20, seed=1, bias=path, bias_backend="pythonforce")
    _check_run(run, "biased md")
    assert run.weights is not None and run.weights.sum() == pytest.approx(1.0)
    # each weight is exp(B/kT) of the recorded angles (bias energy read from the bias's force group)
    log_w = bias.energies_of_angles(run.angles) / ala_implicit.kT
    np.testing.assert_allclose(run.weights, np.exp(log_w - log_w.max()) / np.exp(log_w - log_w.max()).sum(),
                               rtol=1e-6)
    table = B.method_table(ala_implicit, alanine_config(), learned_bias=path)
    assert "MD+learned bias" in table


def _first_samples_equal(a, b):
    n = min(a.n_samples, b.n_samples)
    assert n > 0
    np.testing.assert_array_equal(a.cvs["phi"][:n], b.cvs["phi"][:n])
    np.testing.assert_array_equal(a.cvs["psi"][:n], b.cvs["psi"][:n])


def test_seed_zero_is_reproducible_for_the_demo_samplers(ala_implicit):
    # issue 13.5: OpenMM reads a seed of 0 as "random"; runner.openmm_seed maps 0 to a fixed non-zero seed.
    runs = [B.run_plain_md(ala_implicit, 1.0, sample_every_steps=20, seed=0, equilibration_steps=10)
            for _ in range(2)]
    _first_samples_equal(*runs)
    runs = [B.run_md_with_moves(ala_implicit, basin_proposal(ala_implicit), 1.0, md_steps_per_segment=20,
                                moves_per_segment=2, seed=0, equilibration_steps=10) for _ in range(2)]
    _first_samples_equal(*runs)


def test_sample_command_with_seed_zero_is_reproducible(tmp_path, capsys):
    import mdtraj

    from openmm_confsample.cli import main
    from openmm_confsample.models import shipped_model_path

    xyz = []
    for name in ("a", "b"):
        prefix = tmp_path / name
        assert main(["sample", "alanine-dipeptide-implicit", "--model", shipped_model_path(), "--length-ps", "0.4",
                     "--move-interval", "100", "--save-interval-ps", "0.1", "--seed", "0", "--out", str(prefix),
                     "--quiet"]) == 0
        xyz.append(mdtraj.load(f"{prefix}/trajectory.dcd", top=f"{prefix}/trajectory.pdb").xyz)  # --out is a folder
    np.testing.assert_array_equal(xyz[0], xyz[1])


# -- the system-agnostic harness: collective variables, indicators, ratios, other systems -----------------


def test_angle_range_indicators_on_the_circle():
    from openmm_confsample.bench.observables import angle_range, positive, torsion_box

    grid = np.linspace(-np.pi, np.pi, 7201)[:-1]  # [-pi, pi), 0.05 degree steps, exactly 0 and -pi included
    cvs = {"phi": grid, "psi": grid[::-1].copy()}
    np.testing.assert_array_equal(positive("phi")(cvs), grid > 0)  # the benchmark's old phi > 0, boundaries too
    across = angle_range("phi", 120.0, -150.0)(cvs)  # wraps through 180 degrees
    np.testing.assert_array_equal(across, (grid > np.deg2rad(120.0)) | (grid < np.deg2rad(-150.0)))
    box = torsion_box("phi", (-180.0, 0.0), "psi", (-120.0, 50.0), name="alpha_R")
    assert box.name == "alpha_R" and set(box.requires) == {"phi", "psi"}
    np.testing.assert_array_equal(box(cvs), (grid < 0) & (grid > -np.pi) & (cvs["psi"] > np.deg2rad(-120.0))
                                  & (cvs["psi"] < np.deg2rad(50.0)))
    either = positive("phi") | positive("psi")
    np.testing.assert_array_equal(either(cvs), (grid > 0) | (cvs["psi"] > 0))
    np.testing.assert_array_equal((~positive("phi"))(cvs), grid <= 0)
    with pytest.raises(ConfSampleError, match="chi1"):
        positive("chi1")(cvs)


def test_runs_record_named_torsions_and_callables(ala_implicit):
    distance = lambda x: float(np.linalg.norm(x[4] - x[14]))  # noqa: E731  (an atom distance, nm)
    run = B.run_plain_md(ala_implicit, 1.0, sample_every_steps=20, seed=2, equilibration_steps=10,
                         cvs={"phi": "phi", "end_to_end": distance})
    assert set(run.cvs) == {"phi", "end_to_end"} and run.angle_names == ("phi",)
    assert run.angles.shape == (run.n_samples, 1)
    assert np.all((run.cvs["end_to_end"] > 0.1) & (run.cvs["end_to_end"] < 1.0))
    with pytest.raises(ConfSampleError, match="no torsion named 'chi9'"):
        B.run_plain_md(ala_implicit, 1.0, cvs=["chi9"])


def test_ratios_only_where_both_runs_entered_the_state_often_enough():
    from openmm_confsample.bench.summary import BOUND_LEGEND, shows_bound

    n = 4000
    never = np.full(n, -1.0)
    few = never.copy()
    few[[100, 900, 2000]] = 1.0  # 3 entries: too few to measure an ESS
    many = np.where((np.arange(n) // 50) % 2 == 0, 1.0, -1.0)  # 40 entries
    runs = [_synthetic("MD", never), _synthetic("PT", few, kind="pt"), _synthetic("learned", many)]
    rows = B.summarize(runs, [PHI_POSITIVE], p_reference={"phi > 0": 0.1})
    by = {r["method"]: r for r in rows}
    assert by["learned"]["ratio_vs_md_bound"] == ">="  # MD never entered: its ESS is an upper bound
    assert by["PT"]["ratio_vs_md_bound"] == ">="
    assert by["learned"]["ratio_vs_pt_bound"] == "?"  # PT entered 3 times: not measurable
    assert by["MD"]["ratio_vs_pt_bound"] == "<="
    assert B.markdown_table(rows).count("not measurable") == 1 and shows_bound(rows)
    measured = B.summarize([_synthetic("MD", many), _synthetic("learned", many[::-1].copy())], [PHI_POSITIVE])
    assert measured[1]["ratio_vs_md_bound"] == "" and not shows_bound(measured)
    assert "10 times" in BOUND_LEGEND


def test_make_shipped_model_writes_into_the_package_only_when_asked():
    from openmm_confsample.bench.alanine import make_shipped_model

    with pytest.raises(ConfSampleError, match="out_path"):
        make_shipped_model()
    with pytest.raises(ConfSampleError, match="not both"):
        make_shipped_model("model.pt", into_package=True)


def test_no_alanine_names_in_the_core():
    import pathlib

    import openmm_confsample

    root = pathlib.Path(openmm_confsample.__file__).parent
    for folder in ("moves", "models", "geometry", "data"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text().lower()
            assert "alanine_basin" not in text and "alanine_basins" not in text, path


def test_demo_on_a_system_without_known_basins(tmp_path, capsys):
    """Any system: the demo trains a small model (MD + hot MD), measures each torsion's sign and prints
    the ratio only as far as it can be measured."""
    from openmm_confsample.bench.demo import run_demo
    from openmm_confsample.testing import four_atom_torsion_system

    molsys = four_atom_torsion_system(mass_amu=4.0)
    summary = run_demo(str(tmp_path / "demo"), wall_seconds=2.0, system=molsys, train=True, progress=False)
    assert summary["indicator"] == "phi > 0" and summary["indicators"] == ["phi > 0"]
    assert (tmp_path / "demo" / "free_energy.png").stat().st_size > 1000
    learned = summary["methods"][1]
    assert learned["method"] == "MD+TorsionDiffusionMove" and learned["entries"] >= 10
    printed = capsys.readouterr().out
    assert "P(phi > 0)" in printed and "ESS/s of the phi > 0 indicator" in printed
    assert ("≤ / ≥" in printed) == any(
        r["ess_upper_bound"] or r["ratio_vs_md_bound"] for r in summary["methods"])
