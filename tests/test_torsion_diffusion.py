"""Tests of the torsion diffusion model: wrapped-normal maths, the exact discrete flow, training.

The exactness tests use small networks whose output layer is scaled up so that the proposal
is clearly non-uniform (an untrained network at default initialisation moves points by
only ~1e-2 rad, which would make "normalises to one" nearly trivial).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.models import checkpoint, torus
from openmm_confsample.models.torsion_diffusion import (
    InvertibilityError,
    NoiseSchedule,
    ScoreNetwork,
    TorsionDiffusionModel,
    TorsionDiffusionTrainer,
    plot_loss,
)

TWO_PI = 2.0 * math.pi


def grid(n: int) -> tuple[np.ndarray, float]:
    """Regular n x n grid on the 2-torus (cell centres) and the cell area."""
    axis = -math.pi + TWO_PI * (np.arange(n) + 0.5) / n
    pts = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    return pts, (TWO_PI / n) ** 2


def scaled_model(scale: float = 40.0, n_steps: int = 20, seed: int = 0, **kwargs) -> TorsionDiffusionModel:
    torch.manual_seed(seed)
    net = ScoreNetwork(2, hidden=32, n_layers=2, n_frequencies=3)
    with torch.no_grad():
        net.out.weight.mul_(scale)
        net.out.bias.mul_(scale)
    return TorsionDiffusionModel(net, n_steps=n_steps, **kwargs)


def von_mises_mixture(n: int, seed: int = 0):
    """Two modes: (-1.4, 2.5) with weight 0.7 and (1.0, -0.8) with weight 0.3."""
    rng = np.random.default_rng(seed)
    first = rng.random(n) < 0.7
    mu = np.where(first[:, None], [-1.4, 2.5], [1.0, -0.8])
    kappa = np.where(first[:, None], [6.0, 4.0], [8.0, 8.0])
    return rng.vonmises(mu, kappa), first


def mode_of(angles: np.ndarray) -> np.ndarray:
    """True where a point is nearer (on the torus) to the first mode (-1.4, 2.5)."""
    d1 = np.linalg.norm(torus.wrap(angles - np.array([-1.4, 2.5])), axis=1)
    d2 = np.linalg.norm(torus.wrap(angles - np.array([1.0, -0.8])), axis=1)
    return d1 < d2


# ---------------------------------------------------------------------------------------
# wrapped normal


@pytest.mark.parametrize("sigma", [0.01 * math.pi, 0.1, 0.5, 1.0, 2.0, math.pi])
def test_wrapped_normal_score_matches_finite_differences(sigma):
    x = np.linspace(-math.pi + 1e-3, math.pi - 1e-3, 401)
    eps = 1e-5 * sigma
    fd = (torus.log_wrapped_normal(x + eps, sigma) - torus.log_wrapped_normal(x - eps, sigma)) / (2 * eps)
    score = torus.wrapped_normal_score(x, sigma)
    # Central differences are exact for the Gaussian part; what is left is float rounding of
    # log p (~1e-16 |log p|) divided by eps, so the error bound scales like 1 / sigma.
    np.testing.assert_allclose(score, fd, rtol=1e-6, atol=1e-6 / sigma)
    torch_score = torus.wrapped_normal_score_torch(torch.tensor(x), torch.tensor(sigma, dtype=torch.float64))
    np.testing.assert_allclose(torch_score.numpy(), score, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.01 * math.pi, 0.7, math.pi])
def test_wrapped_normal_density_integrates_to_one_and_is_periodic(sigma):
    x = -math.pi + TWO_PI * np.arange(4096) / 4096
    assert np.exp(torus.log_wrapped_normal(x, sigma)).sum() * TWO_PI / 4096 == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(torus.log_wrapped_normal(x + TWO_PI, sigma), torus.log_wrapped_normal(x, sigma))


def test_score_norm_limits_and_monte_carlo():
    sigma_min = 0.01 * math.pi
    assert torus.score_norm(sigma_min) * sigma_min**2 == pytest.approx(1.0, rel=1e-6)
    rng = np.random.default_rng(0)
    x = torus.wrap(rng.normal(0.0, 1.0, 400_000))
    s2 = torus.wrapped_normal_score(x, 1.0) ** 2
    # Monte Carlo at sigma = 1 within 4 standard errors.
    assert torus.score_norm(1.0) == pytest.approx(s2.mean(), abs=4 * s2.std() / math.sqrt(x.size))
    assert torus.score_norm(math.pi) < 1e-3  # nearly uniform: almost no score left


def test_wrap_range():
    x = np.array([-math.pi - 1e-17, -math.pi, math.pi, 3 * math.pi, -7.0, 0.0])
    w = torus.wrap(x)
    assert np.all(w >= -math.pi) and np.all(w < math.pi)
    np.testing.assert_allclose(np.cos(w), np.cos(x), atol=1e-12)


# ---------------------------------------------------------------------------------------
# the exact discrete flow


def test_untrained_log_prob_normalises_on_the_torus():
    model = scaled_model()
    assert model.check_invertibility()["invertible"]
    pts, area = grid(96)
    q = np.exp(model.log_prob(pts))
    assert q.max() / q.min() > 3.0  # far from uniform, so the test is not trivial
    assert q.sum() * area == pytest.approx(1.0, abs=1e-3)


def test_sampling_scale_and_mixture_keep_density_normalised_and_consistent():
    model = scaled_model(sampling_scale=0.7, uniform_weight=0.2)
    pts, area = grid(96)
    q = np.exp(model.log_prob(pts))
    assert q.sum() * area == pytest.approx(1.0, abs=1e-3)
    assert q.min() >= 0.2 / TWO_PI**2 * (1 - 1e-12)  # the uniform floor
    x, log_q = model.sample_and_log_prob(400, generator=3)
    assert model.last_diagnostics["n_from_uniform"] > 40
    np.testing.assert_allclose(model.log_prob(x), log_q, atol=1e-6, rtol=0)


def test_sample_log_prob_round_trip():
    model = scaled_model()
    x, log_q = model.sample_and_log_prob(1000, generator=1)
    assert x.shape == (1000, 2) and log_q.shape == (1000,)
    assert np.all(x >= -math.pi) and np.all(x < math.pi)
    np.testing.assert_allclose(model.log_prob(x), log_q, atol=1e-6, rtol=0)
    assert model.last_diagnostics["min_step_det"] > 0
    # encode(decode(z)) == z
    z = np.random.default_rng(2).uniform(-math.pi, math.pi, (200, 2))
    x, _ = model.decode(z)
    np.testing.assert_allclose(torus.wrap(model.encode(x)[0] - z), 0.0, atol=1e-8)
    # the single-point path agrees with the batched one
    assert model.log_prob(x[0]) == pytest.approx(model.log_prob(x[:1])[0], abs=1e-10)
    # same seed, same draws
    np.testing.assert_array_equal(model.sample(5, generator=7), model.sample(5, generator=7))


def test_samples_follow_log_prob_chi_square():
    model = scaled_model(n_steps=12)
    n_samples, n_bins, sub = 20_000, 10, 8
    x = model.sample(n_samples, generator=11)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=n_bins, range=[[-math.pi, math.pi]] * 2)
    pts, area = grid(n_bins * sub)
    q = np.exp(model.log_prob(pts)).reshape(n_bins, sub, n_bins, sub)
    prob = q.sum(axis=(1, 3)) * area
    assert prob.sum() == pytest.approx(1.0, abs=1e-3)
    expected = n_samples * prob / prob.sum()
    chi2 = np.sum((counts - expected) ** 2 / expected)
    p_value = stats.chi2.sf(chi2, df=n_bins * n_bins - 1)
    assert p_value > 1e-3, (chi2, p_value)
    # and the density is far from uniform, so a broken sampler would fail
    assert expected.max() / expected.min() > 2.0


def test_non_invertible_flow_is_reported_not_dropped():
    model = scaled_model(scale=3000.0, n_steps=1)
    model.max_newton_iter = 5
    with pytest.raises(InvertibilityError, match="could not be inverted"):
        model.sample(200, generator=0)
    x, log_q = model.sample_and_log_prob(200, generator=0, strict=False)
    diag = model.last_diagnostics
    assert diag["n_failed"] == np.isnan(log_q).sum() > 0
    assert diag["fraction_failed"] == pytest.approx(diag["n_failed"] / 200)


def test_lipschitz_estimate_guards_sampling():
    model = scaled_model(scale=400.0, n_steps=1)
    check = model.check_invertibility()
    assert not check["invertible"] and check["n_steps_required"] > 1
    assert model.lipschitz_estimate == pytest.approx(check["lipschitz"])
    with pytest.raises(InvertibilityError, match="n_steps"):
        model.log_prob(np.zeros(2))
    model.n_steps = check["n_steps_required"]
    x, log_q = model.sample_and_log_prob(50, generator=0)
    np.testing.assert_allclose(model.log_prob(x), log_q, atol=1e-6, rtol=0)
    model.sampling_scale = 0.4  # a sharper drift is steeper: the guard scales with 1 / sampling_scale
    with pytest.raises(InvertibilityError, match="sampling_scale"):
        model.sample(5, generator=0)


def test_sample_sde_shape_and_range():
    model = scaled_model()
    x = model.sample_sde(300, steps=50, generator=0)
    assert x.shape == (300, 2) and np.all(np.abs(x) <= math.pi)


# ---------------------------------------------------------------------------------------
# training


def test_briefly_trained_model_normalises_and_records_history(tmp_path):
    data, _ = von_mises_mixture(3000, seed=1)
    trainer = TorsionDiffusionTrainer(hidden=32, n_layers=2, batch_size=256, max_epochs=4, n_steps=10, seed=0, progress=False)
    model = trainer.fit(data, metadata={"torsions": [("phi", (4, 6, 8, 14)), ("psi", (6, 8, 14, 16))]}).fetch_model()
    assert set(model.history) == {"train_loss", "val_loss", "epoch_time_s"}
    assert len(model.history["train_loss"]) == len(model.history["val_loss"]) == 4
    assert model.metadata["invertibility"]["step_lipschitz"] <= 0.5
    assert model.metadata["invertibility"]["fraction_outside_support"] == 0.0  # nowhere near max_stretch
    pts, area = grid(96)
    assert np.exp(model.log_prob(pts)).sum() * area == pytest.approx(1.0, abs=1e-3)
    plot_loss(model.history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mixture_model():
    data, _ = von_mises_mixture(20_000, seed=0)
    val, _ = von_mises_mixture(4_000, seed=1)
    trainer = TorsionDiffusionTrainer(
        hidden=64, n_layers=3, batch_size=256, lr=2e-3, max_epochs=30, patience=8, seed=0, progress=False
    )
    return trainer.fit(data, val_angles=val).fetch_model()


@pytest.mark.slow
def test_training_on_von_mises_mixture_recovers_mode_weights(mixture_model):
    history = mixture_model.history
    assert min(history["val_loss"]) < history["val_loss"][0] - 0.02
    x, log_q = mixture_model.sample_and_log_prob(4000, generator=5)
    assert mixture_model.last_diagnostics["n_failed"] == 0
    # binomial standard error at n = 4000 is 0.007; "a few percent" is the model error allowed
    assert mode_of(x).mean() == pytest.approx(0.7, abs=0.03)
    np.testing.assert_allclose(mixture_model.log_prob(x[:200]), log_q[:200], atol=1e-6, rtol=0)
    # proposal density is higher at the data modes than between them
    modes = np.array([[-1.4, 2.5], [1.0, -0.8]])
    assert np.all(mixture_model.log_prob(modes) > mixture_model.log_prob(np.array([[2.5, 1.5]])))
    pts, area = grid(96)
    assert np.exp(mixture_model.log_prob(pts)).sum() * area == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_reverse_sde_recovers_mode_weights(mixture_model):
    x = mixture_model.sample_sde(4000, steps=200, generator=1)
    assert mode_of(x).mean() == pytest.approx(0.7, abs=0.05)


# ---------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "angles, match",
    [
        (np.array([[0.1, np.nan]] * 30), "NaN"),
        (np.zeros((0, 2)), "empty"),
        (np.tile([0.3, -1.0], (50, 1)), "constant"),
        (np.random.default_rng(0).uniform(-180, 180, (50, 2)), "degrees"),
        (np.zeros(50), "shape"),
    ],
)
def test_bad_training_input_raises(angles, match):
    with pytest.raises(ConfSampleError, match=match):
        TorsionDiffusionTrainer(progress=False).fit(angles)


def test_bad_model_arguments_raise():
    model = scaled_model()
    with pytest.raises(ConfSampleError, match="degrees"):
        model.log_prob(np.array([[90.0, 45.0]]))
    with pytest.raises(ConfSampleError, match="torsions"):
        model.log_prob(np.zeros((3, 3)))
    with pytest.raises(ConfSampleError, match="uniform_weight"):
        model.uniform_weight = 1.0
    with pytest.raises(ConfSampleError, match="sampling_scale"):
        model.sampling_scale = 0.0
    with pytest.raises(ConfSampleError, match="n_steps"):
        model.n_steps = 0
    with pytest.raises(ConfSampleError, match="n must"):
        model.sample(0)
    with pytest.raises(ConfSampleError, match="fetch_model"):
        TorsionDiffusionTrainer().fetch_model()
    with pytest.raises(ConfSampleError, match="lr"):
        TorsionDiffusionTrainer(lr=-1.0)
    with pytest.raises(ConfSampleError, match="torsions"):
        TorsionDiffusionModel(ScoreNetwork(2, hidden=8), metadata={"torsions": [(0, 1, 2, 3)]})


# ---------------------------------------------------------------------------------------
# checkpoint


def test_checkpoint_round_trip_gives_identical_log_prob(tmp_path):
    model = scaled_model(sampling_scale=1.3, uniform_weight=0.05)
    model.history = {"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.6]}
    meta = {
        "torsions": [{"name": "phi", "atoms": [4, 6, 8, 14]}, ("psi", (6, 8, 14, 16))],
        "topology_fingerprint": "sha256:abc",
        "data_source": "synthetic",
        "temperature": np.float64(300.0),
    }
    path = model.save(tmp_path / "td.pt", meta)
    loaded = TorsionDiffusionModel.load(path)
    pts = np.random.default_rng(0).uniform(-math.pi, math.pi, (100, 2))
    np.testing.assert_array_equal(loaded.log_prob(pts), model.log_prob(pts))
    assert loaded.config == model.config
    assert loaded.history == model.history
    assert loaded.metadata["torsions"] == [
        {"name": "phi", "atoms": [4, 6, 8, 14]},
        {"name": "psi", "atoms": [6, 8, 14, 16]},
    ]
    assert loaded.metadata["temperature"] == 300.0
    assert loaded.metadata["topology_fingerprint"] == "sha256:abc"
    raw = checkpoint.load_checkpoint(path)
    assert raw["kind"] == "torsion_diffusion" and raw["format_version"] == checkpoint.FORMAT_VERSION
    from openmm_confsample import __version__

    assert raw["package_version"] == __version__


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ConfSampleError, match="does not exist"):
        TorsionDiffusionModel.load(tmp_path / "missing.pt")
    path = checkpoint.save_checkpoint(tmp_path / "other.pt", "timewarp", {}, {})
    with pytest.raises(ConfSampleError, match="timewarp"):
        TorsionDiffusionModel.load(path)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ConfSampleError, match="format version"):
        checkpoint.load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(ConfSampleError, match=r"written by openmm-confsample .*: upgrade openmm-confsample"):
        checkpoint.load_checkpoint(tmp_path / "future.pt")
    payload["format_version"] = "1"
    torch.save(payload, tmp_path / "odd.pt")
    with pytest.raises(ConfSampleError, match="not a format this package knows"):
        checkpoint.load_checkpoint(tmp_path / "odd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfSampleError, match="could not be read"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfSampleError, match="type"):
        checkpoint.save_checkpoint(tmp_path / "x.pt", "k", {"bad": object()}, {})


def test_noise_schedule_endpoints():
    sched = NoiseSchedule()
    assert sched.sigma(0.0) == pytest.approx(0.01 * math.pi)
    assert sched.sigma(1.0) == pytest.approx(math.pi)
    t = np.linspace(0, 1, 7)
    np.testing.assert_allclose(
        sched.log_score_norm(torch.tensor(t)).numpy(), sched.log_score_norm(t), rtol=1e-12
    )
    np.testing.assert_allclose(np.exp(sched.log_score_norm(t)), torus.score_norm(sched.sigma(t)), rtol=1e-9)


# ---------------------------------------------------------------------------------------
# internals that the exactness rests on


def test_closed_form_jacobian_matches_autograd():
    from openmm_confsample.models.torsion_diffusion.flow import NumpyDrift

    model = scaled_model(scale=5.0)
    drift = NumpyDrift(model.network, model.schedule, n_steps=7, sampling_scale=1.0)
    net64 = __import__("copy").deepcopy(model.network).double()
    x = np.random.default_rng(0).uniform(-math.pi, math.pi, (5, 2))
    for n in (0, 3, 6):
        t = torch.full((1,), drift.t[n], dtype=torch.float64)
        f_batch, jac_batch = drift.drift_jac(x, n)
        for b in range(x.shape[0]):
            xb = torch.tensor(x[b : b + 1])
            auto = torch.autograd.functional.jacobian(lambda v: net64(v, t)[0], xb)[:, 0, :].numpy()
            np.testing.assert_allclose(jac_batch[b], drift.coef[n] * auto, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(f_batch[b], drift.coef[n] * net64(xb, t)[0].detach().numpy(), rtol=1e-12)
            f1, j1 = drift.drift_jac(x[b : b + 1], n)  # the single-point code path
            np.testing.assert_allclose(j1[0], jac_batch[b], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(drift.drift(x, n), f_batch, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [1, 3])
def test_other_torsion_counts(k):
    torch.manual_seed(1)
    net = ScoreNetwork(k, hidden=16, n_layers=2, n_frequencies=2)
    with torch.no_grad():
        net.out.weight.mul_(20.0)
    model = TorsionDiffusionModel(net, n_steps=10)
    assert model.check_invertibility()["invertible"]
    x, log_q = model.sample_and_log_prob(300, generator=0)
    assert x.shape == (300, k)
    np.testing.assert_allclose(model.log_prob(x), log_q, atol=1e-6, rtol=0)
    if k == 1:
        pts = (-math.pi + TWO_PI * (np.arange(512) + 0.5) / 512)[:, None]
        assert np.exp(model.log_prob(pts)).sum() * TWO_PI / 512 == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------
# issue 13.6: every draw's log q is reproduced by log_prob, or the draw is refused


def sharp_model(weight_scale: float) -> TorsionDiffusionModel:
    """The issue's model: every weight of a small network multiplied, n_steps as check_invertibility asks."""
    torch.manual_seed(0)
    net = ScoreNetwork(2, hidden=16, n_layers=2)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(weight_scale)
    model = TorsionDiffusionModel(net, n_steps=20)
    model.n_steps = max(20, model.check_invertibility()["n_steps_required"])
    return model


@pytest.mark.parametrize("weight_scale", [3.0, 8.0])
def test_sharp_models_reproduce_log_q_or_refuse_the_draw(weight_scale):
    # Before the fix, weights x8 (n_steps 575, every Euler step a bijection) returned 512 draws without
    # complaint, and log_prob differed from their log q by up to 6.1 nats on 439 of them: the decoded
    # points were not preimages of their latents (the map stretches by 1e8-1e10 there).
    model = sharp_model(weight_scale)
    x, log_q = model.sample_and_log_prob(512, generator=0, strict=False)
    refused = np.isnan(log_q)
    assert model.last_diagnostics["n_failed"] == refused.sum()
    kept = np.flatnonzero(~refused)
    assert kept.size > 0
    np.testing.assert_allclose(model.log_prob(x[kept]), log_q[kept], atol=1e-6, rtol=0)
    single = np.array([model.log_prob(x[i]) for i in kept[:40]])  # the path the move takes for its current state
    np.testing.assert_allclose(single, log_q[kept[:40]], atol=1e-6, rtol=0)
    z = np.random.default_rng(1).uniform(-math.pi, math.pi, (128, 2))
    decoded, log_det = model.decode(z, strict=False)
    ok = np.isfinite(log_det)  # decode(z) is a preimage of z wherever it is not refused
    assert np.max(np.abs(torus.wrap(model.encode(decoded[ok])[0] - z[ok]))) <= model.latent_tol
    if weight_scale == 3.0:
        assert not refused.any()
        return
    assert refused.mean() > 0.5  # too sharp for float64 over most of where it puts its mass
    with pytest.raises(InvertibilityError, match="could not be inverted exactly"):
        model.sample(512, generator=0)
    # Refused for being too stretched means outside the support: log_prob is -inf there too, so a current
    # state there is never left by this proposal (its reverse move could never be proposed).
    ill = model.stretch(x[refused]) > model.max_stretch
    assert ill.mean() > 0.9
    assert np.all(np.isneginf(model.log_prob(x[refused][ill])))


def test_model_follows_the_density_protocol():
    from openmm_confsample.models.protocol import Density

    model = scaled_model(uniform_weight=0.1)
    assert isinstance(model, Density)
    rng = np.random.default_rng(4)
    x, log_q = model.sample_and_log_prob(30, generator=rng)
    assert x.shape == (30, 2) and log_q.shape == (30,)
    np.testing.assert_array_equal(model.sample(30, generator=9), model.sample_and_log_prob(30, generator=9)[0])
    np.testing.assert_array_equal(model.sample(30, generator=np.random.default_rng(9)), model.sample(30, generator=9))
    with pytest.raises(ConfSampleError, match="generator"):
        model.sample(3, generator="zero")


def test_checkpoint_of_the_first_format_loads_with_its_temperature_as_sampling_scale(tmp_path):
    model = scaled_model(sampling_scale=1.3)
    path = model.save(tmp_path / "new.pt")
    payload = torch.load(path, weights_only=True)
    config = payload["config"]
    config["temperature"] = config.pop("sampling_scale")  # the layout of format version 1
    del config["latent_tol"], config["max_stretch"]
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    old = TorsionDiffusionModel.load(tmp_path / "old.pt")
    assert old.sampling_scale == 1.3 and "temperature" not in old.config
    pts = np.random.default_rng(0).uniform(-math.pi, math.pi, (20, 2))
    np.testing.assert_array_equal(old.log_prob(pts), model.log_prob(pts))

    from openmm_confsample.models import shipped_model_path

    shipped = TorsionDiffusionModel.load(shipped_model_path())  # format version 1, as shipped
    assert shipped.sampling_scale == 1.0
    assert checkpoint.load_checkpoint(shipped_model_path())["format_version"] == 1
