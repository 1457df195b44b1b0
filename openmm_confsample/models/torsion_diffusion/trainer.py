"""Training a torsion diffusion model by denoising score matching (deeptime's estimator/model split).

``TorsionDiffusionTrainer(...).fit(angles).fetch_model()`` returns a
:class:`~openmm_confsample.models.torsion_diffusion.TorsionDiffusionModel`; the trainer is not saved,
the model is. Each noise level is weighted by ``1 / E|score|^2`` as in torsional diffusion (Jing, Corso
et al. 2022): the network regresses the score divided by ``sqrt(E[s^2](sigma))``. Training uses AdamW
and keeps an exponential moving average of the weights, which is what is validated, early-stopped on
and returned. After training the flow's step count is raised until every Euler step is invertible with
margin (``h * Lip(f) <= 0.5``), and how stretched the whole map is on the data is recorded.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import numpy as np
import torch

from ...checks import finite_float, positive_float, positive_int, wrap_angle
from ...errors import ConfSampleError
from ...progress import progress_bar
from .. import torus
from ..checkpoint import normalize_torsions
from .flow import InvertibilityError
from .model import TorsionDiffusionModel, _subset
from .network import NoiseSchedule, ScoreNetwork, check_angles, torch_threads

__all__ = ["TorsionDiffusionTrainer"]


def _fraction(value, name: str, low_open: bool) -> float:
    """``value`` in ``(0, 1)`` (``low_open``) or ``[0, 1)``, else one sentence naming ``name``."""
    number = finite_float(value, name)
    if not (0.0 < number < 1.0 if low_open else 0.0 <= number < 1.0):
        raise ConfSampleError(f"{name} must lie in {'(0, 1)' if low_open else '[0, 1)'}, got {value!r}.")
    return number


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
        self.hidden, self.n_layers = positive_int(hidden, "hidden"), positive_int(n_layers, "n_layers")
        self.n_frequencies = positive_int(n_frequencies, "n_frequencies", minimum=0)
        self.lr = positive_float(lr, "lr")
        self.weight_decay = positive_float(weight_decay, "weight_decay", allow_zero=True)
        self.ema_decay = _fraction(ema_decay, "ema_decay", low_open=False)
        self.val_fraction = _fraction(val_fraction, "val_fraction", low_open=True)
        self.batch_size, self.patience = positive_int(batch_size, "batch_size"), positive_int(patience, "patience")
        self.max_epochs = positive_int(max_epochs, "max_epochs")
        self.n_steps, self.max_steps = positive_int(n_steps, "n_steps"), positive_int(max_steps, "max_steps")
        self.auto_steps = bool(auto_steps)
        self.seed = int(seed)
        self.num_threads = 1 if num_threads is None else int(num_threads)
        self.max_time_s = max_time_s
        self.progress = bool(progress)
        self._model: TorsionDiffusionModel | None = None

    def _loss(self, net, schedule, x0, t, eps):
        sigma = schedule.sigma(t)[:, None]
        xt = wrap_angle(x0 + sigma * eps)
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

        start_time = time.perf_counter()
        with torch_threads(self.num_threads):
            bar = progress_bar(range(self.max_epochs), self.progress, desc="torsion diffusion", unit="epoch")
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
            model.metadata["invertibility"] = {**check, "step_lipschitz": step_lip, "invertible": step_lip < 1.0,
                                               **_stretch_on_data(model, np.concatenate([train, val]))}
        self._model = model
        return self

    def fetch_model(self) -> TorsionDiffusionModel:
        """The model from the last :meth:`fit`."""
        if self._model is None:
            raise ConfSampleError("fetch_model was called before fit; call fit(train_angles) first.")
        return self._model


def _stretch_on_data(model: TorsionDiffusionModel, data: np.ndarray) -> dict:
    """How stretched the trained flow is where the data lie (see ``flow``), with a warning past ``max_stretch``."""
    try:
        stretch = model.stretch(_subset(data, 2048))
    except InvertibilityError:  # max_steps was too few: already warned, and sampling will say so
        return {}
    outside = float(np.mean(~(stretch <= model.max_stretch)))
    if outside > 0:
        warnings.warn(
            f"the trained flow stretches by more than max_stretch={model.max_stretch:g} at {100 * outside:.3g}% of "
            "the training data (too sharp for a float64 density there): proposals landing there are refused; "
            "a larger sampling_scale broadens the model.",
            stacklevel=3,
        )
    return {"max_stretch_on_data": float(np.nanmax(stretch, initial=0.0)), "fraction_outside_support": outside}
