"""Tests of openmm_confsample.analysis: statistics, free energies, TICA/MSM and plots.

Synthetic processes with known answers; every random draw is seeded, and tolerances are
a few standard errors of the estimator on the sample size used (derivation next to each).
"""

import warnings

import numpy as np
import pytest
from scipy.signal import lfilter

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.analysis.statistics import (
    autocorrelation,
    block_average_error,
    bootstrap_error,
    effective_sample_size,
    ess_per_second,
    integrated_autocorrelation_time,
    jensen_shannon_divergence,
)
from openmm_confsample.analysis.free_energy import (
    RAMACHANDRAN_REGIONS,
    basin_free_energy,
    free_energy_1d,
    free_energy_surface_2d,
    region_free_energies,
    region_populations,
)
from openmm_confsample.analysis.kinetics import (
    fit_tica,
    implied_timescales,
    tica_project,
    torsion_features,
)
from openmm_confsample.analysis import plots


def ar1(a, n, seed):
    """x_{t+1} = a x_t + N(0, 1); stationary variance 1 / (1 - a^2), tau_int = (1 + a) / (1 - a)."""
    rng = np.random.default_rng(seed)
    x = lfilter([1.0], [1.0, -a], rng.normal(size=n + 1000))
    return x[1000:]  # drop the start-up transient


def two_state_chain(p01, p10, n, seed):
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    s = np.empty(n, dtype=np.int64)
    s[0] = 0
    for t in range(1, n):
        flip = p01 if s[t - 1] == 0 else p10
        s[t] = 1 - s[t - 1] if u[t] < flip else s[t - 1]
    return s


# ---------------------------------------------------------------------------- statistics

def test_autocorrelation_of_ar1_decays_geometrically():
    rho = autocorrelation(ar1(0.5, 100_000, seed=1))
    assert rho[0] == 1.0
    # standard error of rho_t is about 1/sqrt(N) * sqrt((1 + a^2)/(1 - a^2)) ~ 0.004
    np.testing.assert_allclose(rho[1:4], [0.5, 0.25, 0.125], atol=0.02)


def test_tau_int_of_ar1_matches_theory():
    a = 0.9
    tau = integrated_autocorrelation_time(ar1(a, 200_000, seed=0))
    # Sokal: var(tau_hat) ~ 2 (2M + 1) / N tau^2 with window M ~ 100 -> sd ~ 5 % of 19.
    assert tau == pytest.approx((1 + a) / (1 - a), rel=0.10)


def test_ess_of_iid_is_about_n():
    n = 20_000
    x = np.random.default_rng(2).normal(size=n)
    ess = effective_sample_size(x)
    # rho_t of iid noise is ~ 1/sqrt(N) = 0.007, so tau_int <= 1 + a few percent.
    assert 0.9 * n <= ess <= n
    assert integrated_autocorrelation_time(x) >= 1.0


def test_constant_series_has_one_effective_sample():
    x = np.full(500, 3.2)
    assert effective_sample_size(x) == 1.0
    assert integrated_autocorrelation_time(x) == 500.0
    assert np.all(np.isfinite(autocorrelation(x)))


def test_ess_of_independent_chains_sums():
    chains = [ar1(0.5, 20_000, seed=s) for s in (3, 4)]
    total = effective_sample_size(chains)
    assert total == pytest.approx(sum(effective_sample_size(c) for c in chains))
    # tau = 3 for a = 0.5
    assert total == pytest.approx(40_000 / 3, rel=0.15)
    assert ess_per_second(chains, 2.0) == pytest.approx(total / 2.0)


def test_block_average_error_of_ar1_matches_theory():
    a, n = 0.9, 200_000
    x = ar1(a, n, seed=5)
    expected = np.sqrt(1 / (1 - a**2) * (1 + a) / (1 - a) / n)  # sqrt(var * tau / N)
    # 50 blocks of 4000 >> tau = 19: relative sd of the estimate ~ 1/sqrt(2*49) = 10 %.
    assert block_average_error(x, n_blocks=50) == pytest.approx(expected, rel=0.3)


def test_block_average_error_uniform_weights_equal_unweighted():
    x = np.random.default_rng(6).normal(size=1003)
    assert block_average_error(x, 10, weights=np.full(1003, 7.0)) == pytest.approx(block_average_error(x, 10))


def test_bootstrap_error_iid_and_moving_block():
    rng = np.random.default_rng(7)
    x = rng.normal(size=4000)
    # 200 replicates: relative sd of a bootstrap sd ~ 1/sqrt(2*200) = 5 %.
    assert bootstrap_error(np.mean, x, seed=1) == pytest.approx(1 / np.sqrt(4000), rel=0.2)
    a, n = 0.9, 50_000
    y = ar1(a, n, seed=8)
    expected = np.sqrt(1 / (1 - a**2) * (1 + a) / (1 - a) / n)
    err = bootstrap_error(np.mean, y, block_size=500, n_bootstrap=200, seed=2)
    # 100 blocks of 500 frames (~26 tau): block-bootstrap sd is within ~15 % of the truth.
    assert err == pytest.approx(expected, rel=0.35)
    # the naive bootstrap ignores correlation and underestimates by ~sqrt(tau)
    assert bootstrap_error(np.mean, y, seed=2) < 0.5 * expected
    # deterministic for a seed
    assert bootstrap_error(np.mean, x, seed=3) == bootstrap_error(np.mean, x, seed=3)


def test_bootstrap_error_passes_weights():
    x = np.random.default_rng(9).normal(size=500)
    w = np.ones(500)
    err = bootstrap_error(lambda v, ww: np.sum(v * ww) / np.sum(ww), x, weights=w, seed=0)
    assert err == pytest.approx(bootstrap_error(np.mean, x, seed=0))


def test_jsd_identical_and_disjoint():
    rng = np.random.default_rng(10)
    a = rng.uniform(-np.pi, np.pi, size=(3000, 2))
    assert jensen_shannon_divergence(a, a[::-1]) == 0.0
    left = np.column_stack([rng.uniform(-3.0, -0.2, 2000), rng.uniform(-3, 3, 2000)])
    right = np.column_stack([rng.uniform(0.2, 3.0, 1500), rng.uniform(-3, 3, 1500)])
    assert jensen_shannon_divergence(left, right) == pytest.approx(np.log(2.0), abs=1e-12)
    # a pseudocount pulls well-separated histograms below ln 2 but stays in range
    assert 0.0 < jensen_shannon_divergence(left, right, pseudocount=0.5) < np.log(2.0)


def test_jsd_wraps_periodic_angles():
    a = np.random.default_rng(11).uniform(-np.pi, np.pi, size=(1000, 2))
    shifted = np.where(a < 0, a + 2 * np.pi, a)  # same angles written in [0, 2 pi)
    assert jensen_shannon_divergence(a, shifted) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- free energy

def test_basin_free_energy_known_population():
    n, p = 20_000, 0.02
    rng = np.random.default_rng(12)
    phi = np.where(rng.random(n) < p, rng.uniform(0.1, 3.0, n), rng.uniform(-3.0, -0.1, n))
    value, error = basin_free_energy(phi)
    exact = -np.log(p / (1 - p))
    # binomial: sd(P) = sqrt(p(1-p)/N) -> sd(dF) = 1/sqrt(N p (1-p)) = 0.05 kT; allow 4 sd.
    sd = 1 / np.sqrt(n * p * (1 - p))
    assert value == pytest.approx(exact, abs=4 * sd)
    # block error of iid samples estimates the binomial sd (10 blocks: ~25 % noise)
    assert 0.5 * sd < error < 2.0 * sd
    value_b, error_b = basin_free_energy(phi, error_method="bootstrap", seed=1)
    assert value_b == value
    assert error_b == pytest.approx(sd, rel=0.25)
    # kT scales the result
    value_kj, _ = basin_free_energy(phi, kT=2.494)
    assert value_kj == pytest.approx(2.494 * value)


def test_basin_free_energy_empty_basin_is_inf_without_warnings():
    phi = np.full(100, -1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, error = basin_free_energy(phi)
        assert value == np.inf and error == np.inf
        value, error = basin_free_energy(-phi, error_method="bootstrap")
        assert value == -np.inf and error == np.inf


def test_weighted_equals_duplicated_samples():
    rng = np.random.default_rng(13)
    n = 400
    phi = rng.uniform(-np.pi, np.pi, n)
    psi = rng.uniform(-np.pi, np.pi, n)
    counts = rng.integers(0, 4, n)
    dphi, dpsi = np.repeat(phi, counts), np.repeat(psi, counts)

    assert basin_free_energy(phi, weights=counts)[0] == pytest.approx(basin_free_energy(dphi)[0])
    pw = region_populations(phi, psi, weights=counts)
    pd = region_populations(dphi, dpsi)
    assert pw == pytest.approx(pd)
    Fw, _ = free_energy_surface_2d(phi, psi, bins=12, weights=counts)
    Fd, _ = free_energy_surface_2d(dphi, dpsi, bins=12)
    np.testing.assert_allclose(Fw, Fd)
    Fw1, ew = free_energy_1d(phi, bins=20, weights=counts, range=(-np.pi, np.pi))
    Fd1, ed = free_energy_1d(dphi, bins=20, range=(-np.pi, np.pi))
    np.testing.assert_allclose(Fw1, Fd1)
    a = np.column_stack([phi, psi])
    assert jensen_shannon_divergence(a, np.column_stack([dphi, dpsi]), weights_a=counts) == pytest.approx(0.0, abs=1e-12)


def test_region_populations_and_free_energies():
    deg = np.radians
    # 6 beta, 3 alpha_R, 1 alpha_L, 2 in the bridge region (psi = 80 deg, phi < 0)
    phi = deg(np.array([-80, -150, -70, -120, -60, -90, -70, -60, -100, 60, -80, -90]))
    psi = deg(np.array([150, 170, -170, 130, 160, -160, -40, 0, 30, 40, 80, 100]))
    pops = region_populations(phi, psi)
    assert pops == pytest.approx({"beta": 6 / 12, "alpha_R": 3 / 12, "alpha_L": 1 / 12, "other": 2 / 12})
    F = region_free_energies(phi, psi)
    assert F["beta"] == 0.0
    assert F["alpha_R"] == pytest.approx(np.log(2.0))
    assert F["alpha_L"] == pytest.approx(np.log(6.0))
    assert region_free_energies(phi, psi, reference="alpha_L")["alpha_L"] == 0.0
    assert set(RAMACHANDRAN_REGIONS) == {"beta", "alpha_R", "alpha_L"}


def test_free_energy_surfaces_have_min_zero_and_inf_in_empty_bins():
    rng = np.random.default_rng(14)
    phi = rng.normal(-1.3, 0.3, 5000)
    psi = rng.normal(2.5, 0.3, 5000)
    F, edges = free_energy_surface_2d(phi, psi, bins=36)
    assert F.shape == (36, 36) and edges.shape == (37,)
    assert np.nanmin(F) == 0.0 and np.isinf(F).any()
    assert edges[0] == pytest.approx(-np.pi) and edges[-1] == pytest.approx(np.pi)
    F1, e1 = free_energy_1d(phi, bins=30)
    assert F1.shape == (30,) and e1.shape == (31,) and F1.min() == 0.0
    # Gaussian profile: F(mu + sigma) - F(mu) = 1/2 kT, checked on wide bins for low noise
    F2, e2 = free_energy_1d(rng.normal(0, 1, 200_000), bins=[-1.1, -0.9, -0.1, 0.1, 0.9, 1.1])
    assert F2[2] - min(F2) == pytest.approx(0.0, abs=0.05)
    assert F2[0] - F2[2] == pytest.approx(0.5, abs=0.05)


# ---------------------------------------------------------------------------- kinetics

def test_torsion_features_are_periodic():
    f = torsion_features(np.array([[np.pi - 1e-9, 0.0], [-np.pi, np.pi / 2]]))
    assert f.shape == (2, 4)
    np.testing.assert_allclose(f[0, :2], f[1, :2], atol=1e-8)  # sin, cos of +pi and -pi
    np.testing.assert_allclose(f[1, 2:], [1.0, 0.0], atol=1e-12)


def test_tica_finds_slow_switching_coordinate():
    n = 20_000
    s = 2.0 * two_state_chain(0.01, 0.01, n, seed=15) - 1.0  # slow: mean dwell 100 frames
    rng = np.random.default_rng(16)
    slow = s + 0.3 * rng.normal(size=n)
    fast1 = 3.0 * ar1(0.2, n, seed=17)  # large-variance fast noise: PCA would pick these
    fast2 = 3.0 * rng.normal(size=n)
    mix = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    features = np.column_stack([slow, fast1, fast2]) @ mix
    model = fit_tica([features[: n // 2], features[n // 2 :]], lagtime=10, dim=2)
    proj = tica_project(model, features)
    assert proj.shape == (n, 2)
    assert abs(np.corrcoef(proj[:, 0], s)[0, 1]) > 0.9
    assert isinstance(tica_project(model, [features[:100], features[100:300]]), list)


def test_implied_timescale_of_two_state_chain():
    p01, p10 = 0.01, 0.02
    dtraj = two_state_chain(p01, p10, 100_000, seed=18)
    dt_ps = 0.5
    exact_ps = -1.0 / np.log(1.0 - p01 - p10) * dt_ps  # same at every lag for a Markov chain
    its = implied_timescales([dtraj], lagtimes=[1, 5, 20], dt_ps=dt_ps, n_timescales=3)
    assert its.shape == (3, 3)
    # ~2000 transitions: the rate estimate has ~3 % relative error
    np.testing.assert_allclose(its[:, 0], exact_ps, rtol=0.15)
    assert np.all(np.isnan(its[:, 1:]))  # two states have one process
    # the same from continuous features clustered by k-means
    feats = dtraj[:, None] + 0.1 * np.random.default_rng(19).normal(size=(dtraj.size, 1))
    its_f = implied_timescales(feats, lagtimes=[1, 5], n_clusters=2, seed=0, dt_ps=dt_ps)
    np.testing.assert_allclose(its_f[:, 0], exact_ps, rtol=0.15)


# ---------------------------------------------------------------------------- plots

def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(20)
    phi, psi = rng.normal(-1.3, 0.4, 3000), rng.normal(2.5, 0.4, 3000)
    w = rng.random(3000)
    out = {}
    out["rama"] = plots.plot_ramachandran(phi, psi, weights=w, title="MD", path=tmp_path / "rama.png")
    out["cmp"] = plots.plot_ramachandran_comparison(
        {"MD": (phi, psi), "model": (phi + 0.1, psi, w)}, path=tmp_path / "cmp.png"
    )
    out["f1d"] = plots.plot_free_energy_1d(
        {"MD": np.degrees(phi), "model": (np.degrees(phi), w)}, bins=40, xlabel=r"$\phi$ (deg)",
        path=tmp_path / "f1d.png",
    )
    proj = rng.normal(size=(2000, 2))
    out["tica"] = plots.plot_tica(proj, path=tmp_path / "tica.png")
    out["tica_dict"] = plots.plot_tica({"MD": [proj[:1000], proj[1000:]], "model": proj + 0.5}, path=tmp_path / "tica_dict.png")
    out["traces"] = plots.plot_traces(
        {"MD": rng.normal(size=200), "model": (np.arange(100) * 2.0, rng.normal(size=100))},
        xlabel="time (ps)", ylabel="potential energy (kJ/mol)", path=tmp_path / "traces.png",
    )
    out["loss"] = plots.plot_loss_curves({"train": [3.0, 2.0, 1.5], "val": [3.2, 2.4, 1.9]}, path=tmp_path / "loss.png")
    its = np.array([[10.0, 3.0], [11.0, np.nan], [11.5, 2.5]])
    out["its"] = plots.plot_implied_timescales([1, 2, 5], its, dt_ps=0.5, path=tmp_path / "sub" / "its.png")
    for name, fig in out.items():
        assert fig.axes, name
    for name in ["rama", "cmp", "f1d", "tica", "tica_dict", "traces", "loss"]:
        _assert_png(tmp_path / f"{name}.png")
    _assert_png(tmp_path / "sub" / "its.png")
    assert out["rama"].axes[0].get_xlabel() == r"$\phi$ (deg)"


def test_plot_into_existing_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    rng = np.random.default_rng(21)
    assert plots.plot_ramachandran(rng.normal(size=500), rng.normal(size=500), ax=ax) is fig


# ---------------------------------------------------------------------------- bad input

GOOD = np.linspace(-3.0, 3.0, 100)


@pytest.mark.parametrize(
    "call",
    [
        lambda: effective_sample_size(np.r_[GOOD, np.nan]),
        lambda: integrated_autocorrelation_time([]),
        lambda: effective_sample_size(np.ones((3, 10))),
        lambda: ess_per_second(GOOD, 0.0),
        lambda: block_average_error(GOOD, n_blocks=1),
        lambda: block_average_error(GOOD[:5], n_blocks=10),
        lambda: block_average_error(GOOD, weights=-np.ones(100)),
        lambda: bootstrap_error(np.mean, GOOD, block_size=1000),
        lambda: jensen_shannon_divergence(np.zeros((10, 2)), np.zeros((10, 3))),
        lambda: jensen_shannon_divergence(np.zeros((10, 2)), np.zeros((10, 2)), weights_a=np.ones(9)),
        lambda: jensen_shannon_divergence(np.full((10, 2), 90.0), np.zeros((10, 2))),  # degrees
        lambda: basin_free_energy(np.r_[GOOD, np.nan]),
        lambda: basin_free_energy(GOOD, weights=np.r_[-1.0, np.ones(99)]),
        lambda: basin_free_energy(GOOD, weights=np.zeros(100)),
        lambda: basin_free_energy(GOOD, error_method="jackknife"),
        lambda: basin_free_energy(GOOD, kT=-1.0),
        lambda: region_populations(GOOD, GOOD[:50]),
        lambda: region_free_energies(GOOD, GOOD, reference="C7ax"),
        lambda: free_energy_surface_2d(GOOD, GOOD[:-1]),
        lambda: free_energy_surface_2d(GOOD, GOOD, weights=np.full(100, np.nan)),
        lambda: free_energy_1d(GOOD, bins=0),
        lambda: torsion_features(np.r_[GOOD, np.inf]),
        lambda: fit_tica(np.ones((5, 2)), lagtime=10),
        lambda: fit_tica([np.ones((50, 2)), np.ones((50, 3))], lagtime=1),
        lambda: implied_timescales([np.array([0, 1, 1, 0])], lagtimes=[10]),
        lambda: implied_timescales([np.array([0, 1, 1, 0])], lagtimes=[0]),
        lambda: plots.plot_ramachandran(GOOD, GOOD[:10]),
        lambda: plots.plot_ramachandran_comparison({}),
        lambda: plots.plot_loss_curves({"val": [1.0]}),
        lambda: plots.plot_implied_timescales([1, 2], np.ones((3, 1))),
        lambda: plots.plot_traces({"MD": np.r_[1.0, np.nan]}),
    ],
)
def test_bad_input_raises_confsample_error(call):
    with pytest.raises(ConfSampleError):
        call()
