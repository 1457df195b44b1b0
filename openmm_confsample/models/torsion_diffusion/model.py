"""A trained torsion diffusion model: an exact density on the torus of k torsions (the Density protocol).

``sample(n, generator)``, ``log_prob(x)`` and ``sample_and_log_prob(n, generator)`` run the exact
discrete flow of :mod:`.flow`; every draw is returned with a log q that ``log_prob`` reproduces
(to 1e-9 on the shipped model), or refused with log q = NaN (an MH move rejects it).

``sampling_scale`` divides the score in the drift (a heuristic way to broaden, ``> 1``, or sharpen,
``< 1``, the proposal; dimensionless, not a temperature). ``uniform_weight = w`` mixes in the uniform
distribution, ``q_mix = (1 - w) q + w / (2 pi)^k``: a floor under the proposal density, so the ratio
``p / q`` stays bounded and an independence chain cannot stick in a state the flow misses.
``sample`` draws from the mixture and both ``sample`` and ``log_prob`` return the mixture
log-density. Both are plain attributes of the model (stored in checkpoints); change them at any time.

``sample_sde`` runs the reverse SDE (Euler-Maruyama); it has no tractable density and is for
analysis only.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ...checks import as_generator, finite_float, positive_float, positive_int, wrap_angle
from ...errors import ConfSampleError
from ..checkpoint import load_checkpoint, normalize_torsions, save_checkpoint
from ..protocol import torch_generator
from .flow import InvertibilityError, NumpyDrift, forward, invert, one_blas_thread
from .network import SIGMA_MAX, SIGMA_MIN, NoiseSchedule, ScoreNetwork, check_angles, torch_threads

__all__ = ["TorsionDiffusionModel"]

_LOG_2PI = math.log(2.0 * math.pi)
_KIND = "torsion_diffusion"


def _checked_option(name: str, check, doc: str) -> property:
    """A model option stored as ``_name`` and checked by ``check(value, name)`` whenever it is set."""
    attribute = "_" + name
    return property(lambda self: getattr(self, attribute),
                    lambda self, value: setattr(self, attribute, check(value, name)), doc=doc)


def _unit_interval(value, name: str) -> float:
    number = finite_float(value, name)
    if not 0.0 <= number < 1.0:
        raise ConfSampleError(f"{name} must lie in [0, 1), got {value!r}.")
    return number


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
    sampling_scale : float > 0
        Dimensionless factor dividing the score in the drift (1 = as learned). Not the
        simulation temperature, which lives in ``metadata['temperature']`` (kelvin).
    uniform_weight : float in [0, 1)
        Weight ``w`` of the uniform component: ``q_mix = (1 - w) q + w / (2 pi)^k``.
    newton_tol : float, radians
        Max-abs residual at which the inversion of one Euler step is accepted.
    max_newton_iter : int
        Chord and Newton iterations (each) per step before a point counts as failed.
    latent_tol : float, radians
        Max-abs distance between a draw's latent and ``Psi`` of the decoded point above which the
        draw is refused (after polishing; see :mod:`.flow`).
    max_stretch : float
        Points where ``||dPsi/dx||_F`` exceeds this are outside the flow's support (float64 cannot
        evaluate the density there consistently; see :mod:`.flow`).
    lipschitz_estimate : float, optional
        ``sup ||J_f||_2`` of the drift at ``sampling_scale`` 1, as found by
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
    >>> x, log_q = model.sample_and_log_prob(5, generator=0)
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
        sampling_scale: float = 1.0,
        uniform_weight: float = 0.0,
        newton_tol: float = 1e-10,
        max_newton_iter: int = 50,
        latent_tol: float = 1e-6,
        max_stretch: float = 1e6,
        lipschitz_estimate: float | None = None,
        history: dict | None = None,
        metadata: dict | None = None,
    ):
        if not isinstance(network, ScoreNetwork):
            raise ConfSampleError(f"network must be a ScoreNetwork, got {type(network).__name__}.")
        self.network = network.eval()
        self.schedule = NoiseSchedule(sigma_min, sigma_max)
        self.n_steps = n_steps
        self.sampling_scale = sampling_scale
        self.uniform_weight = uniform_weight
        self.newton_tol = positive_float(newton_tol, "newton_tol")
        self.max_newton_iter = positive_int(max_newton_iter, "max_newton_iter")
        self.latent_tol = positive_float(latent_tol, "latent_tol")
        self.max_stretch = positive_float(max_stretch, "max_stretch")
        #: Estimated ``sup ||J_f||_2`` of the drift at sampling_scale 1 (set by
        #: :meth:`check_invertibility`); when known, ``sample``/``log_prob`` refuse to run with
        #: ``lipschitz_estimate / (sampling_scale * n_steps) >= 1``.
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

    n_steps = _checked_option("n_steps", positive_int, "Euler steps of the discrete flow (int >= 1).")
    sampling_scale = _checked_option("sampling_scale", positive_float, "Divisor of the score in the drift (> 0).")
    uniform_weight = _checked_option("uniform_weight", _unit_interval, "Weight of the uniform mixture, in [0, 1).")

    @property
    def config(self) -> dict:
        """Everything needed to rebuild the model (network shape, schedule, sampling options)."""
        return {
            **self.network.config,
            "sigma_min": self.schedule.sigma_min,
            "sigma_max": self.schedule.sigma_max,
            "n_steps": self.n_steps,
            "sampling_scale": self.sampling_scale,
            "uniform_weight": self.uniform_weight,
            "newton_tol": self.newton_tol,
            "max_newton_iter": self.max_newton_iter,
            "latent_tol": self.latent_tol,
            "max_stretch": self.max_stretch,
            "lipschitz_estimate": self.lipschitz_estimate,
        }

    def _drift(self, n_steps: int | None = None) -> NumpyDrift:
        key = (self.n_steps if n_steps is None else int(n_steps), self.sampling_scale)
        drift = self._drift_cache.get(key)
        if drift is None:
            if len(self._drift_cache) > 8:
                self._drift_cache.clear()
            drift = self._drift_cache[key] = NumpyDrift(self.network, self.schedule, key[0], key[1])
        return drift

    def _require_invertible(self) -> None:
        if self.lipschitz_estimate is None:
            return
        step_lip = self.lipschitz_estimate / (self.sampling_scale * self.n_steps)
        if step_lip >= 1.0:
            needed = math.ceil(2.0 * self.lipschitz_estimate / self.sampling_scale)
            raise InvertibilityError(
                f"h * Lip(f) = {step_lip:.3g} >= 1 with n_steps={self.n_steps} and "
                f"sampling_scale={self.sampling_scale:g}, so an Euler step may not be invertible; "
                f"set n_steps >= {needed}."
            )

    def invalidate_cache(self) -> None:
        """Forget the float64 weight copies; call after changing ``network`` parameters in place."""
        self._drift_cache.clear()

    # -- score -----------------------------------------------------------------------
    def score(self, angles, t) -> np.ndarray:
        """Learned score ``d log p_t / dx`` (without ``sampling_scale``), float64.

        angles : (N, k) radians; t : float or (N,) in [0, 1]. Returns (N, k).
        """
        x = check_angles(angles, "angles", self.n_torsions, allow_single=True)
        t = np.broadcast_to(np.asarray(t, dtype=np.float64), (x.shape[0],))
        with torch.no_grad(), torch_threads(1):
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
        with one_blas_thread():
            fwd = self._forward(x, chunk_size)
        return fwd.latent, fwd.log_det

    def _forward(self, x: np.ndarray, chunk_size: int = 4096):
        self._require_invertible()
        fwd = forward(self._drift(), x, chunk_size)
        self.last_diagnostics = {"n_points": int(x.shape[0]), "min_step_det": fwd.min_det}
        if fwd.bad.any():
            raise InvertibilityError(
                f"an Euler step of the flow has det(I + hJ) <= 0 (min {fwd.min_det:.3g}) at {int(fwd.bad.sum())} "
                f"of {x.shape[0]} input point(s); the map is not invertible there (raise n_steps above {self.n_steps})."
            )
        return fwd

    def decode(self, latent, strict: bool = True):
        """Apply ``Psi^{-1}`` (latent -> data), verified through ``Psi`` (see :mod:`.flow`).

        Parameters
        ----------
        latent : (N, k) radians
        strict : bool
            If True, raise :class:`InvertibilityError` when any point is refused (a step not
            inverted to ``newton_tol``, ``det <= 0``, a round trip missing ``latent_tol``, or a
            point beyond ``max_stretch``). If False, return those points with ``log_det = nan``
            and count them in ``last_diagnostics``.

        Returns
        -------
        angles : (N, k) radians in [-pi, pi)
        log_det : (N,) float64, the log-determinant of the *forward* map at ``angles``
            (so ``log q = -k log 2 pi + log_det``), computed by the pass ``log_prob`` runs.
        """
        z = check_angles(latent, "latent", self.n_torsions, allow_single=True)
        with one_blas_thread():
            self._require_invertible()
            x, log_det, _, counts = invert(self._drift(), z, self.newton_tol, self.max_newton_iter,
                                           self.latent_tol, self.max_stretch)
        self._report_refusals(z.shape[0], int(np.isnan(log_det).sum()), counts, strict)
        return x, log_det

    def _report_refusals(self, n_points: int, n_failed: int, counts: dict, strict: bool, **extra) -> None:
        self.last_diagnostics = {"n_points": n_points, "n_failed": n_failed,
                                 "fraction_failed": n_failed / max(1, n_points), **counts, **extra}
        if n_failed and strict:
            raise InvertibilityError(
                f"{n_failed} of {n_points} draws ({100.0 * n_failed / n_points:.3g}%) could not be inverted "
                f"exactly through the flow: {counts['n_step_failures']} in a step (Newton did not reach "
                f"{self.newton_tol:g} in {self.max_newton_iter} iterations or det <= 0; raise n_steps above "
                f"{self.n_steps}), {counts['n_ill_conditioned']} where the flow stretches by more than "
                f"max_stretch={self.max_stretch:g} (too sharp for float64; a larger sampling_scale broadens it), "
                f"{counts['n_round_trip_failures']} not returning to their latent within "
                f"latent_tol={self.latent_tol:g}."
            )

    # -- the distribution (models.protocol.Density) -------------------------------------
    def _mix(self, log_q_flow: np.ndarray) -> np.ndarray:
        w = self.uniform_weight
        if w == 0.0:
            return log_q_flow
        return np.logaddexp(math.log1p(-w) + log_q_flow, math.log(w) - self.n_torsions * _LOG_2PI)

    def _flow_log_q(self, x: np.ndarray) -> np.ndarray:
        """log q of the flow alone; -inf beyond ``max_stretch`` (outside its support, see :mod:`.flow`)."""
        fwd = self._forward(x)
        outside = ~(fwd.stretch <= self.max_stretch)
        self.last_diagnostics["n_ill_conditioned"] = int(outside.sum())
        return np.where(outside, -np.inf, fwd.log_det - self.n_torsions * _LOG_2PI)

    def log_prob(self, angles):
        """Exact log-density of the proposal (including the uniform mixture), radians^-k.

        Parameters
        ----------
        angles : (N, k) or (k,) float, radians

        Returns
        -------
        (N,) float64, or a float for a single ``(k,)`` point. Where the flow stretches by more than
        ``max_stretch`` its part is zero (outside its support, see :mod:`.flow`): only the uniform
        component is left, and with ``uniform_weight = 0`` the result is ``-inf``.
        """
        a = np.asarray(angles, dtype=np.float64)
        single = a.ndim == 1
        x = check_angles(a, "angles", self.n_torsions, allow_single=True)
        with one_blas_thread():
            log_q = self._mix(self._flow_log_q(x))
        return float(log_q[0]) if single else log_q

    def sample_and_log_prob(self, n: int, generator=None, *, strict: bool = True):
        """Draw from the proposal and return the exact log-density of each draw.

        Parameters
        ----------
        n : int
            Number of samples.
        generator : numpy.random.Generator, int seed or None
        strict : bool
            See :meth:`decode`; with False, refused draws get ``log_prob = nan`` (an MH move must
            reject them) and are counted in ``last_diagnostics['n_failed']``.

        Returns
        -------
        angles : (n, k) float64, radians in [-pi, pi)
        log_prob : (n,) float64, equal to ``log_prob(angles)`` (NaN for a refused draw).
        """
        n = positive_int(n, "n")
        rng = as_generator(generator, "generator")
        k = self.n_torsions
        from_uniform = rng.random(n) < self.uniform_weight
        z = rng.uniform(-math.pi, math.pi, size=(n, k))
        angles = z.copy()
        log_q_flow = np.empty(n)
        flow = ~from_uniform
        counts = {"n_step_failures": 0, "n_ill_conditioned": 0, "n_round_trip_failures": 0}
        with one_blas_thread():
            self._require_invertible()
            if np.any(flow):
                angles[flow], log_det, _, counts = invert(self._drift(), z[flow], self.newton_tol,
                                                          self.max_newton_iter, self.latent_tol, self.max_stretch)
                log_q_flow[flow] = log_det - k * _LOG_2PI
            if np.any(from_uniform):
                log_q_flow[from_uniform] = self._flow_log_q(z[from_uniform])
        log_q = self._mix(log_q_flow)
        self._report_refusals(n, int(np.isnan(log_q).sum()), counts, strict, n_from_uniform=int(from_uniform.sum()))
        return angles, log_q

    def sample(self, n: int, generator=None, *, strict: bool = True) -> np.ndarray:
        """``n`` draws from the proposal, ``(n, k)`` radians (see :meth:`sample_and_log_prob`)."""
        return self.sample_and_log_prob(n, generator, strict=strict)[0]

    def sample_sde(self, n: int, steps: int = 500, generator=None) -> np.ndarray:
        """Reverse-SDE samples (Euler-Maruyama from the uniform prior at t = 1 to t = 0).

        No density is available for these samples: use for analysis, not as an MH proposal.
        The score is divided by ``sampling_scale`` as in the exact path.

        Returns
        -------
        (n, k) float64, radians in [-pi, pi)
        """
        n, steps, k = positive_int(n, "n"), positive_int(steps, "steps"), self.n_torsions
        rng = as_generator(generator, "generator")
        gen = torch_generator(rng)
        x = torch.from_numpy(rng.uniform(-math.pi, math.pi, size=(n, k))).float()
        dt = 1.0 / steps
        # One torch thread: intra-op threading of this small MLP costs more than it saves.
        with torch.no_grad(), torch_threads(1):
            for i in range(steps):
                t = torch.full((n,), 1.0 - i * dt)
                g2 = self.schedule.g2(t)[:, None]
                s = self.network(x, t) * torch.exp(0.5 * self.schedule.log_score_norm(t))[:, None]
                noise = torch.randn(x.shape, generator=gen)
                x = wrap_angle(x + g2 * s / self.sampling_scale * dt + torch.sqrt(g2 * dt) * noise)
        return wrap_angle(x.double().numpy())

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

    def stretch(self, angles) -> np.ndarray:
        """``||dPsi/dx||_F`` at each of ``angles`` (N, k) radians; beyond ``max_stretch`` is outside the support."""
        x = check_angles(angles, "angles", self.n_torsions, allow_single=True)
        with one_blas_thread():
            return self._forward(x).stretch

    def check_invertibility(self, angles=None, n_grid: int | None = None, safety: float = 0.5) -> dict:
        """Estimate the invertibility margin of the discrete flow.

        The drift's Lipschitz constant is estimated as the largest spectral norm of ``J_f``
        over a regular grid of the torus (``n_grid`` points per angle; default 1024 for k = 1,
        64 for k = 2, 20 for k = 3; for k > 3, 8192 uniform random points) plus up to 2048 of
        ``angles`` (e.g. the training data), at 51 times in [0, 1). A grid estimate, not a proof: keep
        ``h * L`` well below one. The estimate (rescaled to sampling_scale 1) is stored in
        ``lipschitz_estimate`` and guards later ``sample``/``log_prob`` calls. How stretched the
        whole map is (:meth:`stretch`) is a separate question, asked once ``n_steps`` is set.

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
            pts = np.concatenate([pts, _subset(check_angles(angles, "angles", k), 2048)])
        with one_blas_thread():
            lip = float(np.max(self.step_lipschitz(pts)))
        self.lipschitz_estimate = lip * self.sampling_scale
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
        if "temperature" in cfg:  # checkpoints written before the sampling divisor was renamed
            cfg["sampling_scale"] = cfg.pop("temperature")
        net_keys = ("n_torsions", "hidden", "n_layers", "n_frequencies")
        try:
            network = ScoreNetwork(**{key: cfg.pop(key) for key in net_keys})
            network.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as exc:
            raise ConfSampleError(
                f"checkpoint file {str(path)!r} does not match the ScoreNetwork layout ({exc})."
            ) from None
        meta = dict(ckpt["metadata"])
        history = meta.pop("history", {}) or {}
        return cls(network, history=history, metadata=meta, **cfg)


def _subset(angles: np.ndarray, n_max: int) -> np.ndarray:
    """At most ``n_max`` rows of ``angles``, chosen reproducibly."""
    if angles.shape[0] <= n_max:
        return angles
    return angles[np.random.default_rng(1).choice(angles.shape[0], n_max, replace=False)]
