"""Torsional diffusion on the k-torus, and its exact proposal density for Metropolis-Hastings.

The estimator/model split follows deeptime::

    trainer = TorsionDiffusionTrainer(max_epochs=100, progress=False)
    model = trainer.fit(train_angles).fetch_model()      # angles: (N, k) float, radians
    angles, log_q = model.sample(1000, seed=1)           # (1000, k) in [-pi, pi), (1000,)
    model.log_prob(angles)                               # == log_q (to ~1e-9 in our tests)

What is learned
---------------
A variance-exploding diffusion on ``[-pi, pi)^k``: ``x_t = wrap(x_0 + sigma(t) eps)`` with
``sigma(t) = sigma_min^(1-t) sigma_max^t`` (``sigma_min = 0.01 pi``, ``sigma_max = pi``). A small
MLP on ``(sin x, cos x, features of t)`` is trained by denoising score matching against the
score of the wrapped-normal kernel, each noise level weighted by ``1 / E|score|^2`` as in
torsional diffusion (Jing, Corso et al. 2022). The network predicts the score divided by
``sqrt(E[s^2](sigma))``, so its regression target has unit variance at every noise level.
Training uses AdamW and keeps an exponential moving average of the weights, which is what
is validated, early-stopped on and returned.

The proposal used by MH (exact by construction)
-----------------------------------------------
Let ``f(x, t) = -0.5 g^2(t) s(x, t) / temperature`` be the probability-flow drift,
``g^2 = d sigma^2 / dt``. The encoder ``Psi`` is ``n_steps`` explicit Euler steps from data
(``t = 0``) to noise (``t = 1``)::

    x_{n+1} = wrap(x_n + h f(x_n, t_n)),    h = 1 / n_steps,  t_n = n h.

The latent prior is the uniform distribution on the torus. The proposal draws
``z ~ U[-pi, pi)^k`` and returns ``x = Psi^{-1}(z)``, each Euler step ``x + h f(x, t_n) = y``
solved in float64 from the guess ``y - h f(y, t_n)``: chord iterations with the Jacobian of the
previous step, then Newton with the exact Jacobian until the residual is below ``newton_tol``
(1e-10 rad), checked at the returned point. Its density is, exactly for this discrete map (no
ODE-trace estimate, no continuous-time approximation)::

    log q(x) = -k log(2 pi) + sum_n log det(I + h J_f(x_n, t_n)),

with the full ``k x k`` Jacobian computed in closed form (forward-mode through the MLP).
A step ``x -> x + h f(x)`` is a bijection of the torus when ``h Lip(f) < 1``. After training,
:meth:`TorsionDiffusionModel.check_invertibility` estimates ``max_t Lip(f(., t))`` on a dense
grid of the torus (k <= 3) plus the data, and the trainer raises ``n_steps`` until
``h Lip(f) <= 0.5`` there. At run time every step also checks ``det > 0`` and Newton
convergence; failures raise :class:`InvertibilityError` (or are flagged with ``strict=False``),
they are never dropped silently.

``temperature`` divides the score in the drift (a heuristic way to broaden, ``> 1``, or sharpen,
``< 1``, the proposal). ``uniform_weight = w`` mixes in the uniform distribution,
``q_mix = (1 - w) q + w / (2 pi)^k``: a floor under the proposal density, so the ratio
``p / q`` stays bounded and an independence chain cannot stick in a state the flow misses. ``sample`` draws from the mixture and both
``sample`` and ``log_prob`` return the mixture log-density. Both are plain attributes of the
model (stored in checkpoints); change them at any time.

``sample_sde`` runs the reverse SDE (Euler-Maruyama); it has no tractable density and is for
analysis only.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from ..errors import ConfSampleError
from . import torus
from .checkpoint import load_checkpoint, normalize_torsions, save_checkpoint

__all__ = [
    "SIGMA_MIN",
    "SIGMA_MAX",
    "NoiseSchedule",
    "ScoreNetwork",
    "TorsionDiffusionTrainer",
    "TorsionDiffusionModel",
    "InvertibilityError",
    "plot_loss",
]

SIGMA_MIN = 0.01 * math.pi
SIGMA_MAX = math.pi
_LOG_2PI = math.log(2.0 * math.pi)
_KIND = "torsion_diffusion"


_BLAS = None


def _one_blas_thread():
    """Context that runs numpy's BLAS on one thread (a no-op without threadpoolctl).

    The matrices of the exact path are small (128 x 128); on 2 shared cores, BLAS threads
    doubled the wall time of ``sample`` in our measurements instead of halving it.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # optional: only a speed-up
            _BLAS = False
    if _BLAS is False:
        return nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


class InvertibilityError(RuntimeError):
    """The discrete flow was not invertible at some point (Newton failed or ``det <= 0``).

    The proposal density would not be exact there. Raise ``n_steps`` (smaller ``h``) or the
    ``temperature``; :meth:`TorsionDiffusionModel.check_invertibility` shows the margin.
    """


# --------------------------------------------------------------------------------------
# input checks


def _positive_int(value, name: str) -> int:
    try:
        ok = int(value) == value and int(value) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ConfSampleError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_seed_generator(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise ConfSampleError(f"seed must be an int, None or numpy.random.Generator, got {type(seed).__name__}.")


def check_angles(angles, name: str, n_torsions: int | None = None, allow_single: bool = False) -> np.ndarray:
    """Validate torsion angles and return them as float64 ``(N, k)`` wrapped to ``[-pi, pi)``.

    Raises :class:`ConfSampleError` for a wrong shape, non-finite values, an empty array, or
    values that look like degrees (``max |angle| > pi + 1e-3``).
    """
    try:
        a = np.asarray(angles, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfSampleError(f"{name} must be a numeric array of angles in radians.") from None
    if allow_single and a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ConfSampleError(
            f"{name} must have shape (n_frames, n_torsions), got shape {a.shape}; reshape a single "
            "torsion series to (n_frames, 1)."
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ConfSampleError(f"{name} is empty (shape {a.shape}).")
    if n_torsions is not None and a.shape[1] != n_torsions:
        raise ConfSampleError(f"{name} has {a.shape[1]} torsions per row, the model has {n_torsions}.")
    if not np.all(np.isfinite(a)):
        raise ConfSampleError(f"{name} contains NaN or infinite values.")
    amax = float(np.max(np.abs(a)))
    if amax > math.pi + 1e-3:
        raise ConfSampleError(
            f"{name} look like degrees (max |angle| = {amax:.4g} > pi); pass radians, e.g. np.deg2rad(angles)."
        )
    return torus.wrap(a)


# --------------------------------------------------------------------------------------
# noise schedule


class NoiseSchedule:
    """Geometric variance-exploding schedule ``sigma(t) = sigma_min^(1-t) sigma_max^t`` on t in [0, 1].

    ``g2(t) = d sigma^2 / dt = 2 log(sigma_max / sigma_min) sigma(t)^2``; ``exp(log_score_norm(t))`` is
    ``E[s^2]`` of the 1-D wrapped normal at ``sigma(t)`` (tabulated, linear in ``t``).
    Works on numpy arrays and torch tensors.
    """

    def __init__(self, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX):
        if not 0.0 < sigma_min < sigma_max:
            raise ConfSampleError(f"sigma_min must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)
        _, log_norm = torus.score_norm_table(self.sigma_min, self.sigma_max)
        self._log_norm = np.asarray(log_norm, dtype=np.float64)
        self._log_norm_torch = torch.tensor(self._log_norm, dtype=torch.float64)

    def sigma(self, t):
        if isinstance(t, torch.Tensor):
            return self.sigma_min * torch.exp(self.log_ratio * t)
        return self.sigma_min * np.exp(self.log_ratio * np.asarray(t, dtype=np.float64))

    def g2(self, t):
        return 2.0 * self.log_ratio * self.sigma(t) ** 2

    def log_score_norm(self, t):
        """``log E[s^2]`` at ``sigma(t)``, linear interpolation of the table in t (= log sigma)."""
        n = len(self._log_norm) - 1
        if isinstance(t, torch.Tensor):
            u = torch.clamp(t.to(torch.float64), 0.0, 1.0) * n
            i = torch.clamp(torch.floor(u).long(), max=n - 1)
            frac = u - i
            table = self._log_norm_torch
            return ((1.0 - frac) * table[i] + frac * table[i + 1]).to(t.dtype)
        u = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0) * n
        i = np.minimum(np.floor(u).astype(np.int64), n - 1)
        frac = u - i
        return (1.0 - frac) * self._log_norm[i] + frac * self._log_norm[i + 1]


# --------------------------------------------------------------------------------------
# network


class ScoreNetwork(nn.Module):
    """MLP ``(sin x, cos x, time features) -> normalised score``, SiLU activations.

    Parameters
    ----------
    n_torsions : int
        k, the number of angles.
    hidden : int
        Width of each hidden layer.
    n_layers : int
        Number of hidden layers (activations); ``n_layers + 1`` linear maps in all.
    n_frequencies : int
        Time features are ``t, sin(pi 2^j t), cos(pi 2^j t)`` for ``j < n_frequencies``; since
        ``t`` is affine in ``log sigma`` these are sinusoidal features of ``log sigma``.

    ``forward(x, t)`` takes ``x : (B, k)`` radians and ``t : (B,)`` in [0, 1] and returns
    ``(B, k)``; the score is that output times ``sqrt(E[s^2](sigma(t)))``.
    """

    def __init__(self, n_torsions: int, hidden: int = 64, n_layers: int = 3, n_frequencies: int = 6):
        super().__init__()
        if n_torsions < 1 or hidden < 1 or n_layers < 1 or n_frequencies < 0:
            raise ConfSampleError("ScoreNetwork needs n_torsions, hidden and n_layers >= 1 and n_frequencies >= 0.")
        self.n_torsions = int(n_torsions)
        self.hidden = int(hidden)
        self.n_layers = int(n_layers)
        self.n_frequencies = int(n_frequencies)
        self.register_buffer(
            "frequencies", math.pi * 2.0 ** torch.arange(self.n_frequencies, dtype=torch.float32), persistent=False
        )
        n_in = 2 * self.n_torsions + 1 + 2 * self.n_frequencies
        self.layers = nn.ModuleList(
            [nn.Linear(n_in, self.hidden)] + [nn.Linear(self.hidden, self.hidden) for _ in range(self.n_layers - 1)]
        )
        self.out = nn.Linear(self.hidden, self.n_torsions)

    @property
    def config(self) -> dict:
        return {
            "n_torsions": self.n_torsions,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "n_frequencies": self.n_frequencies,
        }

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1)
        arg = t * self.frequencies.to(t.dtype)
        return torch.cat([t, torch.sin(arg), torch.cos(arg)], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.sin(x), torch.cos(x), self.time_features(t).expand(x.shape[0], -1)], dim=-1)
        for layer in self.layers:
            h = nn.functional.silu(layer(h))
        return self.out(h)


class _NumpyDrift:
    """float64 numpy copy of the network with the drift ``f(x, t_n)`` and its Jacobian.

    The Jacobian is propagated forward-mode alongside the value: rows ``1..k`` of the
    ``(B, 1 + k, H)`` activation stack hold ``d a / d x_j``. Time-dependent pieces (the time
    features' contribution to the first layer, the drift prefactor) are precomputed per step.
    This one object defines the map used by both ``sample`` and ``log_prob``.
    """

    def __init__(self, network: ScoreNetwork, schedule: NoiseSchedule, n_steps: int, temperature: float):
        k = network.n_torsions
        with torch.no_grad():
            w_in = network.layers[0].weight.detach().to(torch.float64).numpy()
            b_in = network.layers[0].bias.detach().to(torch.float64).numpy()
            self.ws_t = np.ascontiguousarray(w_in[:, :k].T)  # (k, H)
            self.wc_t = np.ascontiguousarray(w_in[:, k : 2 * k].T)
            w_time = w_in[:, 2 * k :]
            self.hidden = [
                (
                    np.ascontiguousarray(layer.weight.detach().to(torch.float64).numpy().T),
                    layer.bias.detach().to(torch.float64).numpy().copy(),
                )
                for layer in network.layers[1:]
            ]
            self.wout_t = np.ascontiguousarray(network.out.weight.detach().to(torch.float64).numpy().T)  # (H, k)
            self.bout = network.out.bias.detach().to(torch.float64).numpy().copy()
            self.n_steps = int(n_steps)
            self.h = 1.0 / self.n_steps
            self.t = np.arange(self.n_steps, dtype=np.float64) * self.h
            tf = network.time_features(torch.tensor(self.t, dtype=torch.float64)).numpy()
        self.bias = tf @ w_time.T + b_in  # (n_steps, H)
        # (out, in) layouts for the single-point path.
        self.ws, self.wc = w_in[:, :k].copy(), w_in[:, k : 2 * k].copy()
        self.hidden_single = [(np.ascontiguousarray(w_t.T), b) for w_t, b in self.hidden]
        self.wout = np.ascontiguousarray(self.wout_t.T)
        sqrt_norm = np.exp(0.5 * schedule.log_score_norm(self.t))
        self.coef = -0.5 * schedule.g2(self.t) * sqrt_norm / float(temperature)  # f = coef * net
        self.k = k
        self.width = b_in.shape[0]

    def _drift_jac_single(self, x: np.ndarray, n: int):
        # One point (the MH hot path): matrix-vector products on (H,) and (H, k) arrays keep
        # the number of numpy calls, whose overhead dominates at this size, to a minimum.
        s, c = np.sin(x), np.cos(x)
        z = self.ws @ s + self.wc @ c + self.bias[n]
        jac = self.ws * c - self.wc * s  # (H, k), column j = dz / dx_j
        for w, b in self.hidden_single:
            sig = expit(z)
            a = z * sig
            jac = w @ (jac * (sig + a - a * sig)[:, None])
            z = w @ a + b
        sig = expit(z)
        a = z * sig
        jac = self.wout @ (jac * (sig + a - a * sig)[:, None])
        cn = self.coef[n]
        return cn * (self.wout @ a + self.bout), cn * jac

    def drift(self, x: np.ndarray, n: int) -> np.ndarray:
        z = np.sin(x) @ self.ws_t + np.cos(x) @ self.wc_t + self.bias[n]
        for w_t, b in self.hidden:
            z = (z * expit(z)) @ w_t + b
        return self.coef[n] * ((z * expit(z)) @ self.wout_t + self.bout)

    def drift_jac(self, x: np.ndarray, n: int):
        """Return ``f (B, k)`` and ``J (B, k, k)`` with ``J[b, i, j] = d f_i / d x_j``."""
        b_size, k, width = x.shape[0], self.k, self.width
        if b_size == 1:
            f, jac = self._drift_jac_single(x[0], n)
            return f[None], jac[None]
        sx, cx = np.sin(x), np.cos(x)
        stack = np.empty((b_size, 1 + k, width))
        stack[:, 0] = sx @ self.ws_t + cx @ self.wc_t + self.bias[n]
        stack[:, 1:] = cx[:, :, None] * self.ws_t - sx[:, :, None] * self.wc_t
        layers = self.hidden + [(self.wout_t, self.bout)]
        for w_t, b in layers:
            z = stack[:, 0]
            sig = expit(z)
            stack[:, 1:] *= (sig * (1.0 + z * (1.0 - sig)))[:, None, :]
            stack[:, 0] = z * sig
            stack = (stack.reshape(-1, stack.shape[-1]) @ w_t).reshape(b_size, 1 + k, -1)
            stack[:, 0] += b
        c = self.coef[n]
        return c * stack[:, 0], c * np.swapaxes(stack[:, 1:], 1, 2)


def _det_i_plus(hj: np.ndarray) -> np.ndarray:
    """``det(I + hJ)`` for a batch ``(B, k, k)``; closed form for k <= 2."""
    k = hj.shape[-1]
    if k == 1:
        return 1.0 + hj[:, 0, 0]
    if k == 2:
        return (1.0 + hj[:, 0, 0]) * (1.0 + hj[:, 1, 1]) - hj[:, 0, 1] * hj[:, 1, 0]
    return np.linalg.det(np.eye(k) + hj)


def _solve_i_plus(hj: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Solve ``(I + hJ) d = r`` for a batch; closed form for k <= 2."""
    k = hj.shape[-1]
    if k == 1:
        return r / (1.0 + hj[:, 0])
    if k == 2:
        a, b = 1.0 + hj[:, 0, 0], hj[:, 0, 1]
        c, d = hj[:, 1, 0], 1.0 + hj[:, 1, 1]
        det = a * d - b * c
        return np.stack([(d * r[:, 0] - b * r[:, 1]) / det, (a * r[:, 1] - c * r[:, 0]) / det], axis=-1)
    return np.linalg.solve(np.eye(k) + hj, r[..., None])[..., 0]


# --------------------------------------------------------------------------------------
# model


class TorsionDiffusionModel:
    """A trained torsion diffusion model: an independence proposal with exact density.

    Parameters
    ----------
    network : ScoreNetwork
        Trained score network (kept in float32 for ``sample_sde``; copied to float64 for the
        exact path).
    sigma_min, sigma_max : float, radians
        Noise schedule it was trained with.
    n_steps : int
        Euler steps of the discrete flow ``Psi`` (``h = 1 / n_steps``).
    temperature : float > 0
        Dimensionless factor dividing the score in the drift (1 = as learned). Not the
        simulation temperature, which lives in ``metadata['temperature']`` (kelvin).
    uniform_weight : float in [0, 1)
        Weight ``w`` of the uniform component: ``q_mix = (1 - w) q + w / (2 pi)^k``.
    newton_tol : float, radians
        Max-abs residual at which the inversion of one Euler step is accepted.
    max_newton_iter : int
        Chord and Newton iterations (each) per step before a point counts as failed.
    lipschitz_estimate : float, optional
        ``sup ||J_f||_2`` of the drift at temperature 1, as found by
        :meth:`check_invertibility` (the trainer sets it); guards ``sample``/``log_prob``.
    history : dict of lists, optional
        Per-epoch training record (``train_loss``, ``val_loss``, ``epoch_time_s``).
    metadata : dict, optional
        ``torsions``, ``topology_fingerprint``, ``data_source``, ``temperature`` (K), ... .

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.models.torsion_diffusion import ScoreNetwork, TorsionDiffusionModel
    >>> model = TorsionDiffusionModel(ScoreNetwork(2, hidden=16, n_layers=2), n_steps=20)
    >>> x, log_q = model.sample(5, seed=0)
    >>> bool(np.allclose(model.log_prob(x), log_q, atol=1e-6))
    True
    """

    kind = _KIND

    def __init__(
        self,
        network: ScoreNetwork,
        *,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        n_steps: int = 100,
        temperature: float = 1.0,
        uniform_weight: float = 0.0,
        newton_tol: float = 1e-10,
        max_newton_iter: int = 50,
        lipschitz_estimate: float | None = None,
        history: dict | None = None,
        metadata: dict | None = None,
    ):
        if not isinstance(network, ScoreNetwork):
            raise ConfSampleError(f"network must be a ScoreNetwork, got {type(network).__name__}.")
        self.network = network.eval()
        self.schedule = NoiseSchedule(sigma_min, sigma_max)
        self.n_steps = n_steps
        self.temperature = temperature
        self.uniform_weight = uniform_weight
        if not newton_tol > 0:
            raise ConfSampleError(f"newton_tol must be positive, got {newton_tol}.")
        self.newton_tol = float(newton_tol)
        self.max_newton_iter = _positive_int(max_newton_iter, "max_newton_iter")
        #: Estimated ``sup ||J_f||_2`` of the drift at temperature 1 (set by
        #: :meth:`check_invertibility`); when known, ``sample``/``log_prob`` refuse to run with
        #: ``lipschitz_estimate / (temperature * n_steps) >= 1``.
        self.lipschitz_estimate = None if lipschitz_estimate is None else float(lipschitz_estimate)
        self.history = {k: list(v) for k, v in (history or {}).items()}
        meta = dict(metadata or {})
        meta["torsions"] = normalize_torsions(meta.get("torsions"), self.n_torsions)
        self.metadata = meta
        #: Statistics of the last ``sample``/``log_prob`` call (plain dict, openmmtools-style).
        self.last_diagnostics: dict = {}
        self._drift_cache: dict = {}

    # -- options ---------------------------------------------------------------------
    @property
    def n_torsions(self) -> int:
        return self.network.n_torsions

    @property
    def n_steps(self) -> int:
        return self._n_steps

    @n_steps.setter
    def n_steps(self, value):
        self._n_steps = _positive_int(value, "n_steps")

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        number = _as_float(value)
        if not (math.isfinite(number) and number > 0):
            raise ConfSampleError(f"temperature must be a positive number, got {value!r}.")
        self._temperature = number

    @property
    def uniform_weight(self) -> float:
        return self._uniform_weight

    @uniform_weight.setter
    def uniform_weight(self, value):
        number = _as_float(value)
        if not 0.0 <= number < 1.0:
            raise ConfSampleError(f"uniform_weight must lie in [0, 1), got {value!r}.")
        self._uniform_weight = number

    @property
    def config(self) -> dict:
        """Everything needed to rebuild the model (network shape, schedule, sampling options)."""
        return {
            **self.network.config,
            "sigma_min": self.schedule.sigma_min,
            "sigma_max": self.schedule.sigma_max,
            "n_steps": self.n_steps,
            "temperature": self.temperature,
            "uniform_weight": self.uniform_weight,
            "newton_tol": self.newton_tol,
            "max_newton_iter": self.max_newton_iter,
            "lipschitz_estimate": self.lipschitz_estimate,
        }

    def _drift(self, n_steps: int | None = None) -> _NumpyDrift:
        key = (self.n_steps if n_steps is None else int(n_steps), self.temperature)
        drift = self._drift_cache.get(key)
        if drift is None:
            if len(self._drift_cache) > 8:
                self._drift_cache.clear()
            drift = self._drift_cache[key] = _NumpyDrift(self.network, self.schedule, key[0], key[1])
        return drift

    def _require_invertible(self) -> None:
        if self.lipschitz_estimate is None:
            return
        step_lip = self.lipschitz_estimate / (self.temperature * self.n_steps)
        if step_lip >= 1.0:
            needed = math.ceil(2.0 * self.lipschitz_estimate / self.temperature)
            raise InvertibilityError(
                f"h * Lip(f) = {step_lip:.3g} >= 1 with n_steps={self.n_steps} and temperature={self.temperature:g}, "
                f"so an Euler step may not be invertible; set n_steps >= {needed}."
            )

    def invalidate_cache(self) -> None:
        """Forget the float64 weight copies; call after changing ``network`` parameters in place."""
        self._drift_cache.clear()

    # -- score -----------------------------------------------------------------------
    def score(self, angles, t) -> np.ndarray:
        """Learned score ``d log p_t / dx`` (without ``temperature``), float64.

        angles : (N, k) radians; t : float or (N,) in [0, 1]. Returns (N, k).
        """
        x = check_angles(angles, "angles", self.n_torsions, allow_single=True)
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
        with torch.no_grad(), _torch_threads(1):
            net64 = copy.deepcopy(self.network).double()
            out = net64(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(t))).numpy()
        return out * np.exp(0.5 * self.schedule.log_score_norm(t))[:, None]

    # -- the exact discrete flow -----------------------------------------------------
    def encode(self, angles, chunk_size: int = 4096):
        """Apply ``Psi`` (data -> latent) and its log-Jacobian determinant.

        Parameters
        ----------
        angles : (N, k) radians
        Returns
        -------
        latent : (N, k) radians in [-pi, pi)
        log_det : (N,) float64, ``sum_n log det(I + h J_f(x_n, t_n))``
        """
        x = check_angles(angles, "angles", self.n_torsions, allow_single=True)
        with _one_blas_thread():
            return self._encode(x, chunk_size)

    def _encode(self, x: np.ndarray, chunk_size: int = 4096):
        self._require_invertible()
        drift = self._drift()
        if x.shape[0] == 1:
            latent, log_det, min_det, n_bad = self._encode_single(drift, x[0])
        else:
            h = drift.h
            latent = np.empty_like(x)
            log_det = np.zeros(x.shape[0])
            min_det, n_bad = np.inf, 0
            for start in range(0, x.shape[0], chunk_size):
                y = x[start : start + chunk_size].copy()
                ld = np.zeros(y.shape[0])
                bad = np.zeros(y.shape[0], dtype=bool)
                for n in range(drift.n_steps):
                    f, jac = drift.drift_jac(y, n)
                    det = _det_i_plus(h * jac)
                    bad |= ~(det > 0)  # also catches NaN
                    min_det = min(min_det, float(det.min()))
                    ld += np.log(np.abs(det))
                    y += h * f  # the drift is 2 pi-periodic: wrapping once at the end suffices
                latent[start : start + chunk_size] = torus.wrap(y)
                log_det[start : start + chunk_size] = ld
                n_bad += int(bad.sum())
        self.last_diagnostics = {"n_points": int(x.shape[0]), "min_step_det": min_det}
        if n_bad:
            raise InvertibilityError(
                f"an Euler step of the flow has det(I + hJ) <= 0 (min {min_det:.3g}) at {n_bad} of {x.shape[0]} "
                f"input point(s); the map is not invertible there (raise n_steps above {drift.n_steps})."
            )
        return latent, log_det

    @staticmethod
    def _encode_single(drift: _NumpyDrift, x: np.ndarray):
        # The MH hot path: one point, plain floats wherever numpy's per-call overhead would
        # dominate (k x k determinant, logs, the running minimum).
        h, k = drift.h, drift.k
        y = x.copy()
        log_det, min_det, n_bad = 0.0, math.inf, 0
        for n in range(drift.n_steps):
            f, jac = drift._drift_jac_single(y, n)
            if k == 2:
                (a, b), (c, d) = (h * jac).tolist()
                det = (1.0 + a) * (1.0 + d) - b * c
            elif k == 1:
                det = 1.0 + h * float(jac[0, 0])
            else:
                det = float(np.linalg.det(np.eye(k) + h * jac))
            if det > 0:
                log_det += math.log(det)
                min_det = min(min_det, det)
            else:  # also NaN
                n_bad, log_det, min_det = 1, math.nan, det
            y += h * f  # the drift is 2 pi-periodic: wrapping once at the end suffices
        return torus.wrap(y)[None], np.array([log_det]), min_det, n_bad

    def decode(self, latent, strict: bool = True, chunk_size: int = 2048):
        """Apply ``Psi^{-1}`` (latent -> data) by inverting each Euler step with Newton's method.

        Parameters
        ----------
        latent : (N, k) radians
        strict : bool
            If True, raise :class:`InvertibilityError` when any point fails (Newton did not
            reach ``newton_tol`` in ``max_newton_iter`` iterations, or ``det <= 0``). If False,
            return those points with ``log_det = nan`` and count them in ``last_diagnostics``.

        Returns
        -------
        angles : (N, k) radians in [-pi, pi)
        log_det : (N,) float64, the log-determinant of the *forward* map at ``angles``
            (so ``log q = -k log 2 pi + log_det``).
        """
        z = check_angles(latent, "latent", self.n_torsions, allow_single=True)
        with _one_blas_thread():
            return self._decode(z, strict, chunk_size)

    def _decode(self, z: np.ndarray, strict: bool, chunk_size: int = 2048):
        self._require_invertible()
        drift = self._drift()
        h, tol, k = drift.h, self.newton_tol, self.n_torsions
        out = np.empty_like(z)
        log_det = np.zeros(z.shape[0])
        failed = np.zeros(z.shape[0], dtype=bool)
        n_value = n_jac = 0
        max_iter_used = 0
        min_det = np.inf
        for start in range(0, z.shape[0], chunk_size):
            y = z[start : start + chunk_size].copy()
            size = y.shape[0]
            ld = np.zeros(size)
            bad = np.zeros(size, dtype=bool)
            # I + hJ at the solution of the previous (later-time) step: the Jacobian changes by
            # O(h) from one step to the next, so it is a good frozen matrix for chord iterations
            # that need only drift values. Every accepted point is then checked, and its det
            # taken, with a fresh Jacobian at that very point.
            frozen_hj = None
            for n in range(drift.n_steps - 1, -1, -1):
                x = y.copy()
                if frozen_hj is None:
                    f, jac = drift.drift_jac(y, n)
                    frozen_hj = h * jac
                    n_jac += size
                else:
                    f = drift.drift(y, n)
                    n_value += size
                # chord phase: residual at y is h f(y); iterate with the frozen matrix
                active = np.arange(size)
                r = h * f
                for _ in range(self.max_newton_iter):
                    delta = _solve_i_plus(frozen_hj[active], r)
                    x[active] = torus.wrap(x[active] - delta)
                    moving = np.max(np.abs(delta), axis=1) >= tol
                    active = active[moving]
                    if active.size == 0:
                        break
                    r = torus.wrap(x[active] + h * drift.drift(x[active], n) - y[active])
                    n_value += active.size
                    moving = np.max(np.abs(r), axis=1) >= tol
                    active = active[moving]
                    r = r[moving]
                    if active.size == 0:
                        break
                # Newton phase: verify (and, where needed, finish) with exact Jacobians
                active = np.arange(size)
                for it in range(1, self.max_newton_iter + 1):
                    f, jac = drift.drift_jac(x[active], n)
                    n_jac += active.size
                    hj = h * jac
                    r = torus.wrap(x[active] + h * f - y[active])
                    done = np.max(np.abs(r), axis=1) < tol
                    if np.any(done):
                        idx = active[done]
                        det = _det_i_plus(hj[done])
                        min_det = min(min_det, float(det.min()))
                        bad[idx[~(det > 0)]] = True
                        ld[idx] += np.log(np.abs(det))
                        frozen_hj[idx] = hj[done]
                    max_iter_used = max(max_iter_used, it)
                    todo = ~done
                    if not np.any(todo):
                        active = active[:0]
                        break
                    step = _solve_i_plus(hj[todo], r[todo])
                    active = active[todo]
                    frozen_hj[active] = hj[todo]
                    x[active] = torus.wrap(x[active] - step)
                if active.size:
                    # Not converged: flag, keep the last iterate so the chain can go on.
                    bad[active] = True
                y = x
            out[start : start + chunk_size] = y
            ld[bad] = np.nan
            log_det[start : start + chunk_size] = ld
            failed[start : start + chunk_size] = bad
        n_failed = int(failed.sum())
        per_step = max(1, z.shape[0] * drift.n_steps)
        self.last_diagnostics = {
            "n_points": int(z.shape[0]),
            "n_failed": n_failed,
            "fraction_failed": n_failed / max(1, z.shape[0]),
            "drift_evaluations_per_step": n_value / per_step,
            "jacobian_evaluations_per_step": n_jac / per_step,
            "max_newton_iterations": max_iter_used,
            "min_step_det": min_det,
        }
        if n_failed and strict:
            raise InvertibilityError(
                f"{n_failed} of {z.shape[0]} proposals ({100.0 * n_failed / z.shape[0]:.3g}%) could not be "
                f"inverted through the flow (Newton did not reach {tol:g} in {self.max_newton_iter} iterations "
                f"or det <= 0); raise n_steps above {drift.n_steps}."
            )
        return out, log_det

    # -- the distribution ----------------------------------------------------------------
    def _mix(self, log_q_flow: np.ndarray) -> np.ndarray:
        w = self.uniform_weight
        if w == 0.0:
            return log_q_flow
        return np.logaddexp(math.log1p(-w) + log_q_flow, math.log(w) - self.n_torsions * _LOG_2PI)

    def log_prob(self, angles):
        """Exact log-density of the proposal (including the uniform mixture), radians^-k.

        Parameters
        ----------
        angles : (N, k) or (k,) float, radians

        Returns
        -------
        (N,) float64, or a float for a single ``(k,)`` point.
        """
        a = np.asarray(angles, dtype=np.float64)
        single = a.ndim == 1
        x = check_angles(a, "angles", self.n_torsions, allow_single=True)
        with _one_blas_thread():
            _, log_det = self._encode(x)
        log_q = self._mix(log_det - self.n_torsions * _LOG_2PI)
        return float(log_q[0]) if single else log_q

    def sample(self, n: int, seed=None, strict: bool = True):
        """Draw from the proposal and return the exact log-density of each draw.

        Parameters
        ----------
        n : int
            Number of samples.
        seed : int, None or numpy.random.Generator
        strict : bool
            See :meth:`decode`; with False, failed draws get ``log_prob = nan`` (an MH move must
            reject them) and are counted in ``last_diagnostics['n_failed']``.

        Returns
        -------
        angles : (n, k) float64, radians in [-pi, pi)
        log_prob : (n,) float64, equal to ``log_prob(angles)`` up to the Newton tolerance.
        """
        n = _positive_int(n, "n")
        rng = _as_seed_generator(seed)
        k = self.n_torsions
        from_uniform = rng.random(n) < self.uniform_weight
        z = rng.uniform(-math.pi, math.pi, size=(n, k))
        angles = z.copy()
        log_det = np.empty(n)
        flow = ~from_uniform
        diagnostics = {"n_points": n, "n_failed": 0, "fraction_failed": 0.0}
        with _one_blas_thread():
            if np.any(flow):
                angles[flow], log_det[flow] = self._decode(z[flow], strict)
                diagnostics = dict(self.last_diagnostics)
            if np.any(from_uniform):
                _, log_det[from_uniform] = self._encode(z[from_uniform])
        diagnostics["n_from_uniform"] = int(from_uniform.sum())
        diagnostics["n_points"] = n
        diagnostics["fraction_failed"] = diagnostics["n_failed"] / n
        self.last_diagnostics = diagnostics
        return angles, self._mix(log_det - k * _LOG_2PI)

    def sample_sde(self, n: int, steps: int = 500, seed=None) -> np.ndarray:
        """Reverse-SDE samples (Euler-Maruyama from the uniform prior at t = 1 to t = 0).

        No density is available for these samples: use for analysis, not as an MH proposal.
        The score is divided by ``temperature`` as in the exact path.

        Returns
        -------
        (n, k) float64, radians in [-pi, pi)
        """
        n, steps, k = _positive_int(n, "n"), _positive_int(steps, "steps"), self.n_torsions
        rng = _as_seed_generator(seed)
        gen = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        x = torch.from_numpy(rng.uniform(-math.pi, math.pi, size=(n, k))).float()
        dt = 1.0 / steps
        # One torch thread: intra-op threading of this small MLP costs more than it saves.
        with torch.no_grad(), _torch_threads(1):
            for i in range(steps):
                t = torch.full((n,), 1.0 - i * dt)
                g2 = self.schedule.g2(t)[:, None]
                s = self.network(x, t) * torch.exp(0.5 * self.schedule.log_score_norm(t))[:, None]
                noise = torch.randn(x.shape, generator=gen)
                x = torus.wrap(x + g2 * s / self.temperature * dt + torch.sqrt(g2 * dt) * noise)
        return torus.wrap(x.double().numpy())

    # -- invertibility ---------------------------------------------------------------------
    def step_lipschitz(self, points, n_times: int = 51, chunk_size: int = 4096) -> np.ndarray:
        """``max_x ||J_f(x, t)||_2`` over ``points`` at ``n_times`` equally spaced t in [0, 1).

        points : (M, k) radians. Returns (n_times,) float64. A step of size h is a bijection
        of the torus when ``h`` times the *global* supremum is below one.
        """
        x = check_angles(points, "points", self.n_torsions, allow_single=True)
        drift = self._drift(n_steps=n_times)
        lip = np.zeros(n_times)
        for n in range(n_times):
            for start in range(0, x.shape[0], chunk_size):
                _, jac = drift.drift_jac(x[start : start + chunk_size], n)
                lip[n] = max(lip[n], float(np.max(np.linalg.norm(jac, ord=2, axis=(1, 2)))))
        return lip

    def check_invertibility(self, angles=None, n_grid: int | None = None, safety: float = 0.5) -> dict:
        """Estimate the invertibility margin of the discrete flow.

        The drift's Lipschitz constant is estimated as the largest spectral norm of ``J_f``
        over a regular grid of the torus (``n_grid`` points per angle; default 1024 for k = 1,
        64 for k = 2, 20 for k = 3; for k > 3, 8192 uniform random points) plus up to 2048 of
        ``angles`` (e.g. the training data), at 51 times in [0, 1). A grid estimate, not a proof: keep
        ``h * L`` well below one. The estimate (rescaled to temperature 1) is stored in
        ``lipschitz_estimate`` and guards later ``sample``/``log_prob`` calls.

        Returns
        -------
        dict with ``lipschitz`` (max over x and t), ``step_lipschitz`` (``h * lipschitz``
        at the current ``n_steps``), ``n_steps_required`` (smallest n_steps with
        ``h * lipschitz <= safety``), ``invertible`` (``step_lipschitz < 1``).
        """
        k = self.n_torsions
        if n_grid is None:
            n_grid = {1: 1024, 2: 64, 3: 20}.get(k, 0)
        if k <= 3 and n_grid > 0:
            axis = -math.pi + 2.0 * math.pi * np.arange(n_grid) / n_grid
            pts = np.stack(np.meshgrid(*([axis] * k), indexing="ij"), axis=-1).reshape(-1, k)
        else:
            pts = np.random.default_rng(0).uniform(-math.pi, math.pi, size=(8192, k))
        if angles is not None:
            data = check_angles(angles, "angles", k)
            if data.shape[0] > 2048:
                data = data[np.random.default_rng(1).choice(data.shape[0], 2048, replace=False)]
            pts = np.concatenate([pts, data])
        with _one_blas_thread():
            lip = float(np.max(self.step_lipschitz(pts)))
        self.lipschitz_estimate = lip * self.temperature
        return {
            "lipschitz": lip,
            "step_lipschitz": lip / self.n_steps,
            "n_steps_required": max(1, math.ceil(lip / safety)),
            "invertible": lip / self.n_steps < 1.0,
        }

    # -- persistence -----------------------------------------------------------------
    def save(self, path, metadata: dict | None = None):
        """Write a checkpoint (see :mod:`openmm_confsample.models.checkpoint`).

        ``metadata`` entries (``torsions``, ``topology_fingerprint``, ``data_source``,
        ``temperature`` in kelvin, ...) are merged over ``self.metadata``; the training
        ``history`` is always stored. Returns the path.
        """
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta["torsions"] = normalize_torsions(meta.get("torsions"), self.n_torsions)
        meta["history"] = self.history
        return save_checkpoint(path, _KIND, self.config, self.network.state_dict(), meta)

    @classmethod
    def load(cls, path) -> "TorsionDiffusionModel":
        """Read a model written by :meth:`save`; raises ConfSampleError for a wrong file."""
        ckpt = load_checkpoint(path, kind=_KIND)
        cfg = dict(ckpt["config"])
        net_keys = ("n_torsions", "hidden", "n_layers", "n_frequencies")
        try:
            network = ScoreNetwork(**{key: cfg.pop(key) for key in net_keys})
            network.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as exc:
            raise ConfSampleError(f"checkpoint file {str(path)!r} does not match the ScoreNetwork layout ({exc}).") from None
        meta = dict(ckpt["metadata"])
        history = meta.pop("history", {}) or {}
        return cls(network, history=history, metadata=meta, **cfg)


# --------------------------------------------------------------------------------------
# trainer


@contextmanager
def _torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorsionDiffusionTrainer:
    """Fit a :class:`TorsionDiffusionModel` to torsion angles by denoising score matching.

    Parameters
    ----------
    hidden, n_layers, n_frequencies : int
        Score network shape (see :class:`ScoreNetwork`).
    lr, weight_decay : float
        AdamW settings.
    ema_decay : float in [0, 1)
        Per-update decay of the exponential moving average of the weights (0 disables it).
        The averaged weights are the ones validated, early-stopped on and returned; they
        give a smoother score than the raw iterates.
    batch_size : int
    max_epochs : int
    patience : int
        Stop after this many epochs without a lower validation loss; the best weights are kept.
    val_fraction : float
        Fraction of ``train_angles`` held out when no ``val_angles`` are given.
    n_steps : int
        Minimum number of Euler steps of the model's flow; raised after training when the
        invertibility check (``auto_steps``) asks for more.
    auto_steps : bool
        Run :meth:`TorsionDiffusionModel.check_invertibility` after training and set
        ``n_steps`` so that ``h * Lip(f) <= 0.5`` on the grid and the data.
    max_steps : int
        Upper limit for ``auto_steps``; a warning is issued if it is not enough.
    seed : int
    num_threads : int or None
        torch threads during ``fit`` (restored afterwards). None means 1: for an MLP this
        small, thread synchronisation costs more than it saves (on 2 shared cores one
        training step took 4 ms with 1 thread and 60-120 ms with 2).
    max_time_s : float or None
        Wall-clock budget for the epoch loop; stops after the epoch that exceeds it.
    progress : bool
        Show a tqdm progress bar over epochs.

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.models.torsion_diffusion import TorsionDiffusionTrainer
    >>> rng = np.random.default_rng(0)
    >>> angles = np.angle(np.exp(1j * rng.normal([-1.4, 2.5], 0.3, size=(2000, 2))))
    >>> trainer = TorsionDiffusionTrainer(hidden=32, n_layers=2, max_epochs=2, progress=False)
    >>> model = trainer.fit(angles).fetch_model()
    >>> sorted(model.history)
    ['epoch_time_s', 'train_loss', 'val_loss']
    """

    def __init__(
        self,
        hidden: int = 64,
        n_layers: int = 3,
        n_frequencies: int = 6,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        ema_decay: float = 0.999,
        batch_size: int = 512,
        max_epochs: int = 100,
        patience: int = 15,
        val_fraction: float = 0.1,
        n_steps: int = 50,
        auto_steps: bool = True,
        max_steps: int = 1000,
        seed: int = 0,
        num_threads: int | None = None,
        max_time_s: float | None = None,
        progress: bool = True,
    ):
        for name, value in (
            ("hidden", hidden), ("n_layers", n_layers), ("batch_size", batch_size),
            ("max_epochs", max_epochs), ("patience", patience), ("n_steps", n_steps), ("max_steps", max_steps),
        ):
            _positive_int(value, name)
        if not _as_float(lr) > 0:
            raise ConfSampleError(f"lr must be positive, got {lr!r}.")
        if not _as_float(weight_decay) >= 0:
            raise ConfSampleError(f"weight_decay must be non-negative, got {weight_decay!r}.")
        if not 0.0 <= _as_float(ema_decay) < 1.0:
            raise ConfSampleError(f"ema_decay must lie in [0, 1), got {ema_decay!r}.")
        if not 0.0 < _as_float(val_fraction) < 1.0:
            raise ConfSampleError(f"val_fraction must lie in (0, 1), got {val_fraction!r}.")
        self.hidden, self.n_layers, self.n_frequencies = int(hidden), int(n_layers), int(n_frequencies)
        self.lr, self.weight_decay, self.ema_decay = float(lr), float(weight_decay), float(ema_decay)
        self.batch_size, self.max_epochs, self.patience = int(batch_size), int(max_epochs), int(patience)
        self.val_fraction = float(val_fraction)
        self.n_steps, self.auto_steps, self.max_steps = int(n_steps), bool(auto_steps), int(max_steps)
        self.seed = int(seed)
        self.num_threads = 1 if num_threads is None else int(num_threads)
        self.max_time_s = max_time_s
        self.progress = bool(progress)
        self._model: TorsionDiffusionModel | None = None

    def _loss(self, net, schedule, x0, t, eps):
        sigma = schedule.sigma(t)[:, None]
        xt = torus.wrap(x0 + sigma * eps)
        target = torus.wrapped_normal_score_torch(sigma * eps, sigma)
        target = target * torch.exp(-0.5 * schedule.log_score_norm(t))[:, None]
        return torch.mean((net(xt, t) - target) ** 2)

    def fit(self, train_angles, val_angles=None, metadata: dict | None = None) -> "TorsionDiffusionTrainer":
        """Train on ``train_angles`` (N, k) radians; returns ``self`` (see :meth:`fetch_model`).

        ``val_angles`` (M, k) radians are used for early stopping; when None, a random
        ``val_fraction`` of ``train_angles`` is held out. ``metadata`` (torsions, topology
        fingerprint, data source, temperature in K, ...) is attached to the model.

        The model's ``history`` holds, per epoch, ``train_loss`` (mean over the epoch's batches,
        raw weights), ``val_loss`` (averaged weights, noise fixed across epochs) and
        ``epoch_time_s``. Raises :class:`ConfSampleError` for NaN, empty, constant or
        degree-valued input.
        """
        train = check_angles(train_angles, "train_angles")
        k = train.shape[1]
        constant = [j for j in range(k) if np.ptp(train[:, j]) == 0.0]
        if train.shape[0] < 2 or constant:
            raise ConfSampleError(
                f"train_angles is constant (torsion column(s) {constant or list(range(k))} never change); "
                "a density cannot be learned from it."
            )
        rng = np.random.default_rng(self.seed)
        if val_angles is None:
            if train.shape[0] < 20:
                raise ConfSampleError(
                    f"train_angles has only {train.shape[0]} rows; pass val_angles or at least 20 rows."
                )
            perm = rng.permutation(train.shape[0])
            n_val = max(1, int(round(self.val_fraction * train.shape[0])))
            val, train = train[perm[:n_val]], train[perm[n_val:]]
        else:
            val = check_angles(val_angles, "val_angles", k)
        meta = dict(metadata or {})
        meta["torsions"] = normalize_torsions(meta.get("torsions"), k)

        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        schedule = NoiseSchedule()
        net = ScoreNetwork(k, self.hidden, self.n_layers, self.n_frequencies)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        x_train = torch.tensor(train, dtype=torch.float32)
        # Repeat small validation sets so that at least ~50k (point, noise) pairs average out
        # the noise of the loss; the noise is drawn once, so the curve moves only when the
        # weights do.
        repeats = max(1, math.ceil(50_000 / val.shape[0]))
        x_val = torch.tensor(np.tile(val, (repeats, 1)), dtype=torch.float32)
        val_t = torch.rand(x_val.shape[0], generator=gen)
        val_eps = torch.randn(x_val.shape, generator=gen)
        history = {"train_loss": [], "val_loss": [], "epoch_time_s": []}
        # Exponential moving average of the weights: the model that is validated and kept.
        ema_net = copy.deepcopy(net).eval()
        ema_params, params = list(ema_net.parameters()), list(net.parameters())
        n_updates = 0
        best_val, best_state, since_best = math.inf, copy.deepcopy(ema_net.state_dict()), 0
        n_batches = max(1, math.ceil(x_train.shape[0] / self.batch_size))

        from tqdm.auto import tqdm

        start_time = time.perf_counter()
        with _torch_threads(self.num_threads):
            bar = tqdm(range(self.max_epochs), desc="torsion diffusion", unit="epoch", disable=not self.progress)
            for _epoch in bar:
                t0 = time.perf_counter()
                net.train()
                perm = torch.randperm(x_train.shape[0], generator=gen)
                total = 0.0
                for b in range(n_batches):
                    idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
                    x0 = x_train[idx]
                    t = torch.rand(x0.shape[0], generator=gen)
                    eps = torch.randn(x0.shape, generator=gen)
                    loss = self._loss(net, schedule, x0, t, eps)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    n_updates += 1
                    with torch.no_grad():
                        decay = min(self.ema_decay, (1.0 + n_updates) / (10.0 + n_updates))
                        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
                    total += loss.item() * x0.shape[0]
                with torch.no_grad():
                    val_loss = 0.0
                    for s in range(0, x_val.shape[0], 8192):
                        sl = slice(s, s + 8192)
                        batch_loss = self._loss(ema_net, schedule, x_val[sl], val_t[sl], val_eps[sl])
                        val_loss += float(batch_loss) * x_val[sl].shape[0]
                    val_loss /= x_val.shape[0]
                history["train_loss"].append(total / x_train.shape[0])
                history["val_loss"].append(val_loss)
                history["epoch_time_s"].append(time.perf_counter() - t0)
                if val_loss < best_val:
                    best_val, best_state, since_best = val_loss, copy.deepcopy(ema_net.state_dict()), 0
                else:
                    since_best += 1
                bar.set_postfix(train=f"{history['train_loss'][-1]:.4f}", val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
                if since_best >= self.patience:
                    break
                if self.max_time_s is not None and time.perf_counter() - start_time > self.max_time_s:
                    break
            bar.close()
        net.load_state_dict(best_state)
        model = TorsionDiffusionModel(net, n_steps=self.n_steps, history=history, metadata=meta)
        if self.auto_steps:
            check = model.check_invertibility(np.concatenate([train, val]))
            needed = check["n_steps_required"]
            if needed > self.max_steps:
                warnings.warn(
                    f"the trained drift has Lipschitz estimate {check['lipschitz']:.3g}; n_steps={needed} would be "
                    f"needed for h*L <= 0.5 but max_steps={self.max_steps}; using {self.max_steps}.",
                    stacklevel=2,
                )
                needed = self.max_steps
            model.n_steps = max(self.n_steps, needed)
            step_lip = check["lipschitz"] / model.n_steps
            model.metadata["invertibility"] = {**check, "step_lipschitz": step_lip, "invertible": step_lip < 1.0}
        self._model = model
        return self

    def fetch_model(self) -> TorsionDiffusionModel:
        """The model from the last :meth:`fit`."""
        if self._model is None:
            raise ConfSampleError("fetch_model was called before fit; call fit(train_angles) first.")
        return self._model


def plot_loss(history: dict, path) -> None:
    """Write a PNG of the per-epoch training and validation loss.

    history : dict with ``train_loss`` and ``val_loss`` lists (``model.history``).
    path : str or PathLike of the PNG to write.
    """
    if not isinstance(history, dict) or "train_loss" not in history or "val_loss" not in history:
        raise ConfSampleError("history must be a dict with 'train_loss' and 'val_loss' lists (model.history).")
    # The Figure API draws without pyplot, so no GUI backend or global state is touched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], label="train")
    ax.plot(np.arange(1, len(history["val_loss"]) + 1), history["val_loss"], label="validation")
    if history["val_loss"]:
        best = int(np.argmin(history["val_loss"]))
        ax.axvline(best + 1, color="0.6", ls=":", label=f"best (epoch {best + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("denoising score-matching loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
