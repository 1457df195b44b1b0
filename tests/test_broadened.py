"""Training data that reaches the basins (data.broadened): the coverage report and its warning, hot MD pooled
with its temperature, biased frames reweighted by systematic resampling."""

import json

import numpy as np
import pytest

from openmm_confsample.data.broadened import (coverage_report, pool_torsion_angles, run_training_md,
                                              systematic_resample, torsion_coverage)
from openmm_confsample.errors import ConfSampleError


def _alanine_like(rng, n=600):
    """phi only in (-170, -40) degrees (300 K MD), psi everywhere."""
    return np.column_stack([np.radians(rng.uniform(-170, -40, n)), rng.uniform(-np.pi, np.pi, n)])


def test_coverage_counts_bins_and_names_the_empty_half(rng):
    coverage = torsion_coverage(_alanine_like(rng), ["phi", "psi"])
    phi, psi = coverage
    assert phi.covered_fraction == pytest.approx(13 / 36)  # bins (-170, -160) ... (-50, -40)
    assert phi.sign_gap == "> 0" and phi.gap_deg == (-40.0, -170.0)  # the arc through 0 and 180 degrees
    assert phi.warning == ("all frames have phi < 0: the model will rarely propose phi > 0; add --hot or --bias")
    assert psi.covered_fraction == 1.0 and psi.gap_deg is None and psi.warning is None
    text = coverage_report(coverage)
    assert "phi" in text and "36.1%" in text and text.endswith("add --hot or --bias.")


def test_coverage_warns_about_an_empty_arc_only_where_the_model_rarely_goes(rng):
    # chi1 visits g- and t but never g+ (0, 120) degrees: an arc, not a sign
    chi = np.radians(np.concatenate([rng.uniform(-100, -20, 300), rng.uniform(130, 230, 300)]))
    data = np.angle(np.exp(1j * chi))[:, None]
    sharp = np.radians(rng.normal(-60, 10, (1000, 1)))            # a model that stays where the data were
    broad = rng.uniform(-np.pi, np.pi, (1000, 1))                   # one that proposes everywhere
    (quiet,) = torsion_coverage(data, ["chi1"], model_angles=broad)
    (loud,) = torsion_coverage(data, ["chi1"], model_angles=sharp, hint="train on more data")
    assert quiet.gap_deg == loud.gap_deg == (-20.0, 130.0)
    assert quiet.sign_gap is None and quiet.warning is None and quiet.model_fraction_in_gap > 0.3
    assert loud.model_fraction_in_gap < 0.01
    assert loud.warning.startswith("no frame has chi1 between -20 and 130 degrees: the model will rarely propose "
                                   "that arc (")
    assert loud.warning.endswith("% of its draws); train on more data")
    # a narrower hole than min_gap_deg is not reported
    assert torsion_coverage(data, ["chi1"], min_gap_deg=180)[0].gap_deg is None


def test_coverage_refuses_bad_input():
    with pytest.raises(ConfSampleError, match=r"angles must be \(N, 2\) radians"):
        torsion_coverage(np.zeros((5, 3)), ["phi", "psi"])
    with pytest.raises(ConfSampleError, match="NaN"):
        torsion_coverage(np.full((5, 1), np.nan), ["phi"])
    with pytest.raises(ConfSampleError, match="bin_deg must divide 360"):
        torsion_coverage(np.zeros((5, 1)), ["phi"], bin_deg=7)


def test_systematic_resampling_is_sorted_and_follows_the_weights(rng):
    weights = rng.exponential(size=50)
    picks = np.concatenate([systematic_resample(weights, np.random.default_rng(s)) for s in range(2000)])
    assert np.all(np.diff(systematic_resample(weights, rng)) >= 0)  # time order kept
    frequencies = np.bincount(picks, minlength=50) / len(picks)
    np.testing.assert_allclose(frequencies, weights / weights.sum(), atol=2e-3)  # |error| <= 1/N per draw
    with pytest.raises(ConfSampleError, match="non-negative"):
        systematic_resample([1.0, -1.0], rng)


def test_hot_md_is_pooled_with_its_temperature(tmp_path, ala_implicit, short_md):
    paths = run_training_md(ala_implicit, tmp_path / "data", hot_temperatures_K=[600], length_ps=2.0,
                            save_interval_ps=0.1, seed=3, progress=False)
    assert [p.endswith("hot_600K.dcd") for p in paths] == [True]
    assert json.load(open(tmp_path / "data" / "hot_600K.json"))["temperature_K"] == 600
    parts = pool_torsion_angles(ala_implicit, [short_md.trajectory_path, *paths], ala_implicit.torsions)
    assert [p.temperature_K for p in parts] == [300.0, 600.0]
    assert [p.angles.shape for p in parts] == [(80, 2), (20, 2)]
    assert not any(p.reweighted for p in parts)


def test_biased_frames_are_resampled_by_exp_bias_over_kT(tmp_path, ala_implicit, short_md):
    """A fake biased run: the trajectory's metadata names bias energies; reweighting must follow exp(+B/kT)."""
    import shutil

    from openmm_confsample.units import kT_kJ_per_mol

    prefix = tmp_path / "biased"
    shutil.copy(short_md.trajectory_path, f"{prefix}.dcd")
    shutil.copy(short_md.topology_path, f"{prefix}.pdb")
    metadata = json.load(open(short_md.metadata_path))
    metadata.update(trajectory="biased.dcd", topology="biased.pdb", files={},
                    bias={"path": "bias.pt", "energies": "biased.bias.npy", "force_group": 31})
    json.dump(metadata, open(f"{prefix}.json", "w"))
    energies = np.zeros(80)
    energies[10] = 5.0 * kT_kJ_per_mol(300.0)  # frame 10 weighs e^5 = 148 times the others
    np.save(f"{prefix}.bias.npy", energies)
    (as_sampled,) = pool_torsion_angles(ala_implicit, [f"{prefix}.dcd"], ala_implicit.torsions)
    (reweighted,) = pool_torsion_angles(ala_implicit, [f"{prefix}.dcd"], ala_implicit.torsions, reweight=True)
    assert as_sampled.bias == "bias.pt" and not as_sampled.reweighted
    assert reweighted.reweighted and reweighted.kish_ess == pytest.approx((148.41 + 79) ** 2 / (148.41**2 + 79), rel=1e-3)
    copies = np.sum(np.all(reweighted.angles == as_sampled.angles[10], axis=1))
    assert copies == pytest.approx(80 * 148.41 / (148.41 + 79), abs=1)  # systematic: within one copy
    np.save(f"{prefix}.bias.npy", energies[:40])
    with pytest.raises(ConfSampleError, match="80 frames but 40 bias energies"):
        pool_torsion_angles(ala_implicit, [f"{prefix}.dcd"], ala_implicit.torsions, reweight=True)
