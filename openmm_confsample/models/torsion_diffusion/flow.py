"""The exact discrete flow of a torsion diffusion model, in numpy float64 (the proposal MH uses).

Let ``f(x, t) = -0.5 g^2(t) s(x, t) / sampling_scale`` be the probability-flow drift,
``g^2 = d sigma^2 / dt``. The encoder ``Psi`` is ``n_steps`` explicit Euler steps from data
(``t = 0``) to noise (``t = 1``)::

    x_{n+1} = wrap(x_n + h f(x_n, t_n)),    h = 1 / n_steps,  t_n = n h.

The latent prior is the uniform distribution on the torus. The proposal draws
``z ~ U[-pi, pi)^k`` and returns ``x = Psi^{-1}(z)``, each Euler step ``x + h f(x, t_n) = y``
solved in float64 by chord iterations from ``y - (I + hJ)^{-1} h f(y)`` with the Jacobian at
``(y, t_n)`` (Newton with exact Jacobians where they do not converge) until the residual is below
``newton_tol`` (1e-10 rad) at the returned point (:func:`invert_steps`). Its density is, exactly for this
discrete map (no ODE-trace estimate, no continuous-time approximation)::

    log q(x) = -k log(2 pi) + sum_n log det(I + h J_f(x_n, t_n)),

with the full ``k x k`` Jacobian computed in closed form (forward-mode through the MLP). A step
``x -> x + h f(x)`` is a bijection of the torus when ``h Lip(f) < 1`` (the model's
``check_invertibility`` estimates the constant; every step also checks ``det > 0``).

Each step inverted to 1e-10 is not yet the composition inverted: a residual left at step n reaches
the latent multiplied by the Jacobian of the later steps. For a sharp drift that product is huge:
a ``ScoreNetwork(2, hidden=16, n_layers=2)`` with weights x8 (n_steps = 575, ``h Lip = 0.5``, so
every step *is* a bijection) has ``||dPsi/dx||`` of 1e8-1e10 where its draws land, the decoded
points went back through ``Psi`` to latents up to 3 rad away from the drawn ones, and their
``log_prob`` differed from the log q returned with them by up to 6.1 nats (issue 13.6; weights x3:
stretch < 10, agreement to 1e-9). So every decoded point is verified through the very forward
pass that ``log_prob`` runs (:func:`forward`), which also gives its log q; where the round trip
misses ``latent_tol`` (1e-6 rad), up to three Newton steps on the whole map ``Psi(x) = z`` with
the accumulated Jacobian ``dPsi/dx`` polish it (:func:`invert`), and what still misses is refused
(counted apart, in ``n_round_trip_failures``; none occurred below ``max_stretch`` in the
measurements below, where this refusal, not mirrored in ``log_prob``, would cost exactness).

Float64 itself limits how stretched a map can be evaluated consistently: after polishing, the
round trip is about ``stretch * 1e-14`` rad and the batched and single-point ``log_prob`` paths
differ by up to ``stretch * 2e-14`` nats (measured on the x5, x6 and x8 models above: 2e-8 at
stretch 1e6, 1e-6 at 1e8). Points where the Frobenius norm of ``dPsi/dx`` exceeds ``max_stretch``
(1e6) are therefore outside the flow's support: ``log_prob`` gives the flow part ``-inf`` there and a
draw that lands there is refused. The criterion depends on the point alone, so it is symmetric in
the current and the proposed state and the move stays exact (a current state there has ``q = 0``
and its moves are rejected as impossible; MD carries it out).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit

from ...checks import wrap_angle
from .network import NoiseSchedule, ScoreNetwork

__all__ = ["InvertibilityError", "NumpyDrift", "Forward", "forward", "invert_steps", "invert", "one_blas_thread"]


class InvertibilityError(RuntimeError):
    """The discrete flow was not invertible at some point (Newton failed, ``det <= 0``, or too ill-conditioned).

    The proposal density would not be exact there. Raise ``n_steps`` (smaller ``h``) or the
    ``sampling_scale``; :meth:`TorsionDiffusionModel.check_invertibility` shows the margin.
    """


_BLAS = None


def one_blas_thread():
    """Context that runs numpy's BLAS on one thread (a no-op without threadpoolctl).

    The matrices of the exact path are small (128 x 128); on 2 shared cores, BLAS threads
    doubled the wall time of ``sample`` in our measurements instead of halving it.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController  # optional, so imported only when first needed

            _BLAS = ThreadpoolController()
        except ImportError:  # optional: only a speed-up
            _BLAS = False
    if _BLAS is False:
        return nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


class NumpyDrift:
    """float64 numpy copy of the network with the drift ``f(x, t_n)`` and its Jacobian.

    The Jacobian is propagated forward-mode alongside the value: rows ``1..k`` of the
    ``(B, 1 + k, H)`` activation stack hold ``d a / d x_j``. Time-dependent pieces (the time
    features' contribution to the first layer, the drift prefactor) are precomputed per step.
    This one object defines the map used by both ``sample`` and ``log_prob``.
    """

    def __init__(self, network: ScoreNetwork, schedule: NoiseSchedule, n_steps: int, sampling_scale: float):
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
        self.coef = -0.5 * schedule.g2(self.t) * sqrt_norm / float(sampling_scale)  # f = coef * net
        self.k = k
        self.width = b_in.shape[0]

    def drift_jac_single(self, x: np.ndarray, n: int):
        """``f (k,)`` and ``J (k, k)`` at one point ``x (k,)``."""
        # The MH hot path: matrix-vector products on (H,) and (H, k) arrays keep the number of
        # numpy calls, whose overhead dominates at this size, to a minimum.
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
            f, jac = self.drift_jac_single(x[0], n)
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


def det_i_plus(hj: np.ndarray) -> np.ndarray:
    """``det(I + hJ)`` for a batch ``(B, k, k)``; closed form for k <= 2."""
    k = hj.shape[-1]
    if k == 1:
        return 1.0 + hj[:, 0, 0]
    if k == 2:
        return (1.0 + hj[:, 0, 0]) * (1.0 + hj[:, 1, 1]) - hj[:, 0, 1] * hj[:, 1, 0]
    return np.linalg.det(np.eye(k) + hj)


def solve_i_plus(hj: np.ndarray, r: np.ndarray) -> np.ndarray:
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
# forward: data -> latent, with the log-determinant and the Jacobian of the whole map


@dataclass
class Forward:
    """``Psi`` at N points: ``latent (N, k)``, ``log_det (N,)``, ``jacobian (N, k, k)`` (``dPsi/dx``),
    ``stretch (N,)`` (its Frobenius norm; inf or NaN where it overflowed), ``bad (N,)`` (some step had
    ``det <= 0`` or NaN) and ``min_det`` (smallest step determinant)."""

    latent: np.ndarray
    log_det: np.ndarray
    jacobian: np.ndarray
    stretch: np.ndarray
    bad: np.ndarray
    min_det: float


def forward(drift: NumpyDrift, x: np.ndarray, chunk_size: int = 4096) -> Forward:
    """Apply ``Psi`` to ``x (N, k)`` radians; one point goes through the single-point path."""
    if x.shape[0] == 1:
        return _forward_single(drift, x[0])
    h, k = drift.h, drift.k
    n_points = x.shape[0]
    latent, log_det = np.empty_like(x), np.zeros(n_points)
    jacobian, bad = np.empty((n_points, k, k)), np.zeros(n_points, dtype=bool)
    min_det = math.inf
    eye = np.eye(k)
    for start in range(0, n_points, chunk_size):
        part = slice(start, start + chunk_size)
        y = x[part].copy()
        jac_total = np.broadcast_to(eye, (y.shape[0], k, k)).copy()
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing product is refused by its stretch
            for n in range(drift.n_steps):
                f, jac = drift.drift_jac(y, n)
                hj = h * jac
                det = det_i_plus(hj)
                bad[part] |= ~(det > 0)  # also catches NaN
                min_det = min(min_det, float(det.min()))
                log_det[part] += np.log(np.abs(det))
                jac_total = np.matmul(eye + hj, jac_total)
                y += h * f  # the drift is 2 pi-periodic: wrapping once at the end suffices
        latent[part] = wrap_angle(y)
        jacobian[part] = jac_total
    with np.errstate(over="ignore", invalid="ignore"):
        stretch = np.sqrt(np.sum(jacobian**2, axis=(1, 2)))
    return Forward(latent, log_det, jacobian, stretch, bad, min_det)


def _forward_single(drift: NumpyDrift, x: np.ndarray) -> Forward:
    # The MH hot path: one point, plain floats wherever numpy's per-call overhead would
    # dominate (k x k determinant and product, logs, the running minimum).
    h, k = drift.h, drift.k
    y = x.copy()
    log_det, min_det, bad = 0.0, math.inf, False
    p00, p01, p10, p11 = 1.0, 0.0, 0.0, 1.0  # dPsi/dx for k <= 2 (p00 alone for k = 1)
    jac_total = np.eye(k)
    for n in range(drift.n_steps):
        f, jac = drift.drift_jac_single(y, n)
        if k == 2:
            (a, b), (c, d) = (h * jac).tolist()
            a, d = 1.0 + a, 1.0 + d
            det = a * d - b * c
            p00, p01, p10, p11 = a * p00 + b * p10, a * p01 + b * p11, c * p00 + d * p10, c * p01 + d * p11
        elif k == 1:
            det = 1.0 + h * float(jac[0, 0])
            p00 *= det
        else:
            step = np.eye(k) + h * jac
            det = float(np.linalg.det(step))
            jac_total = step @ jac_total
        if det > 0:
            log_det += math.log(det)
            min_det = min(min_det, det)
        else:  # also NaN
            bad, log_det, min_det = True, math.nan, det
        y += h * f  # the drift is 2 pi-periodic: wrapping once at the end suffices
    if k == 2:
        jac_total, stretch = np.array([[p00, p01], [p10, p11]]), math.hypot(p00, p01, p10, p11)
    elif k == 1:
        jac_total, stretch = np.array([[p00]]), abs(p00)
    else:
        stretch = float(np.linalg.norm(jac_total))
    return Forward(wrap_angle(y)[None], np.array([log_det]), jac_total[None], np.array([stretch]), np.array([bad]),
                   min_det)


# --------------------------------------------------------------------------------------
# inverse: latent -> data


def invert_steps(drift: NumpyDrift, z: np.ndarray, newton_tol: float, max_newton_iter: int,
                 chunk_size: int = 2048):
    """Invert the Euler steps one by one (last to first): chord iterations, then Newton where needed.

    Each step ``x + h f(x, t_n) = y`` starts from ``y - (I + hJ)^{-1} h f(y)`` with the Jacobian at
    ``(y, t_n)``, and iterates with that frozen matrix on drift values alone until the residual is
    below ``newton_tol``: 3.3 drift values and one Jacobian per step on the shipped model. (The
    Jacobian at the previous step's solution, at ``t_{n+1}``, needed 5.4 values per step; the values
    saved pay for the verifying forward pass of :func:`invert`.) Points not converged after
    ``max_newton_iter`` chord iterations get as many Newton iterations with exact Jacobians. Returns ``x (N, k)``, ``failed (N,)`` (not
    converged) and a dict of counts; determinants are checked by the forward pass.
    """
    h, tol = drift.h, newton_tol
    out = np.empty_like(z)
    failed = np.zeros(z.shape[0], dtype=bool)
    n_value = n_jac = 0
    max_iter_used = 0
    for start in range(0, z.shape[0], chunk_size):
        y = z[start : start + chunk_size].copy()
        size = y.shape[0]
        bad = np.zeros(size, dtype=bool)
        for n in range(drift.n_steps - 1, -1, -1):
            f, jac = drift.drift_jac(y, n)
            n_jac += size
            frozen_hj = h * jac
            x = wrap_angle(y - solve_i_plus(frozen_hj, h * f))
            active = np.arange(size)
            for _ in range(max_newton_iter):  # chord phase: drift values only
                r = wrap_angle(x[active] + h * drift.drift(x[active], n) - y[active])
                n_value += active.size
                moving = np.max(np.abs(r), axis=1) >= tol
                active = active[moving]
                if active.size == 0:
                    break
                x[active] = wrap_angle(x[active] - solve_i_plus(frozen_hj[active], r[moving]))
            for it in range(1, max_newton_iter + 1 if active.size else 1):  # Newton phase: exact Jacobians
                f, jac = drift.drift_jac(x[active], n)
                n_jac += active.size
                r = wrap_angle(x[active] + h * f - y[active])
                moving = np.max(np.abs(r), axis=1) >= tol
                max_iter_used = max(max_iter_used, it)
                active = active[moving]
                if active.size == 0:
                    break
                x[active] = wrap_angle(x[active] - solve_i_plus(h * jac[moving], r[moving]))
            bad[active] = True  # not converged: flagged; the last iterate is kept so the chain can go on
            y = x
        out[start : start + chunk_size] = y
        failed[start : start + chunk_size] = bad
    per_step = max(1, z.shape[0] * drift.n_steps)
    counts = {
        "drift_evaluations_per_step": n_value / per_step,
        "jacobian_evaluations_per_step": n_jac / per_step,
        "max_newton_iterations": max_iter_used,
    }
    return out, failed, counts


def invert(drift: NumpyDrift, z: np.ndarray, newton_tol: float, max_newton_iter: int, latent_tol: float,
           max_stretch: float, n_polish: int = 3):
    """``Psi^{-1}(z)`` verified through the forward pass (see the module docstring).

    Returns ``x (N, k)``, ``log_det (N,)`` (from :func:`forward` at ``x``, NaN where refused),
    ``refused (N,)`` and a dict of diagnostics (counts of each kind of refusal).
    """
    x, step_failed, counts = invert_steps(drift, z, newton_tol, max_newton_iter)
    fwd = forward(drift, x)
    latent, jacobian, log_det, stretch, bad = fwd.latent, fwd.jacobian, fwd.log_det, fwd.stretch, fwd.bad
    miss = np.max(np.abs(wrap_angle(latent - z)), axis=1)
    n_polished = 0
    for _ in range(n_polish):
        todo = np.flatnonzero(~(miss <= latent_tol) & ~step_failed & ~bad & (stretch <= max_stretch))
        if todo.size == 0:
            break
        n_polished += todo.size
        try:
            delta = np.linalg.solve(jacobian[todo], wrap_angle(latent[todo] - z[todo])[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular dPsi/dx (underflow): these points stay as they are
            break
        x[todo] = wrap_angle(x[todo] - np.where(np.isfinite(delta), delta, 0.0))
        again = forward(drift, x[todo])
        latent[todo], jacobian[todo], log_det[todo] = again.latent, again.jacobian, again.log_det
        stretch[todo], bad[todo] = again.stretch, again.bad
        miss[todo] = np.max(np.abs(wrap_angle(again.latent - z[todo])), axis=1)
    step_failed |= bad
    ill_conditioned = ~(stretch <= max_stretch) & ~step_failed
    missed = ~(miss <= latent_tol) & ~step_failed & ~ill_conditioned
    refused = step_failed | ill_conditioned | missed
    counts.update({
        "n_step_failures": int(step_failed.sum()),
        "n_ill_conditioned": int(ill_conditioned.sum()),
        "n_round_trip_failures": int(missed.sum()),
        "n_polished": n_polished,
        "max_stretch": float(np.nanmax(stretch, initial=0.0)),
        "min_step_det": fwd.min_det,
    })
    return x, np.where(refused, np.nan, log_det), refused, counts
