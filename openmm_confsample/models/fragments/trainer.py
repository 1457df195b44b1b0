"""Training a fragment model by maximum likelihood (deeptime's estimator/model split).

``FragmentModelTrainer(...).fit(data).fetch_model()`` returns a
:class:`~openmm_confsample.models.fragments.FragmentTorsionModel`. The loss is the exact negative
log-likelihood of the training torsions under the model's tables (a cell's log-probability; a block with
one torsion absent, e.g. proline's phi, uses the marginal of the other), averaged per context so that
every residue type weighs the same, plus a smoothness penalty sum (k^2 + l^2) c_kl^2 on the Fourier
coefficients. Frames are counted into the grid's cells once, so an optimisation step costs one network
call per context, whatever the number of frames.

Each context is seen in four versions: as it is, without its residue one-hot, without its neighbours, and
without both. The model thereby learns what to propose for a residue type it never saw (from its features)
and next to neighbours it never saw (averaged over the neighbours in the data): the fallbacks the model
uses at inference (:mod:`.model`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ...checks import positive_float, positive_int
from ...errors import ConfSampleError
from ...progress import progress_bar
from .context import BLOCKS, KINDS
from .data import FragmentData
from .model import FragmentNetwork, FragmentTorsionModel, context_vector
from .tables import cells

__all__ = ["FragmentModelTrainer"]

#: Frames per validation block (50 frames: 10 ps at the default 0.2 ps spacing).
_BLOCK_FRAMES = 50
#: (residue one-hot, neighbours) switched on in each of the four versions of a context.
_VERSIONS = ((True, True), (False, True), (True, False), (False, False))


def _counts(angles: np.ndarray, n_grid: int):
    """Cell counts of one context's frames: joint (3, G, G), only-first-axis (3, G), only-second-axis (3, G)."""
    joint = np.zeros((len(BLOCKS), n_grid, n_grid))
    first = np.zeros((len(BLOCKS), n_grid))
    second = np.zeros((len(BLOCKS), n_grid))
    for b, (a0, a1) in enumerate(BLOCKS):
        x, y = angles[:, KINDS.index(a0)], angles[:, KINDS.index(a1)]
        has_x, has_y = np.isfinite(x), np.isfinite(y)
        both = has_x & has_y
        np.add.at(joint[b], (cells(x[both], n_grid), cells(y[both], n_grid)), 1.0)
        np.add.at(first[b], cells(x[has_x & ~has_y], n_grid), 1.0)
        np.add.at(second[b], cells(y[has_y & ~has_x], n_grid), 1.0)
    return joint, first, second


class FragmentModelTrainer:
    """Fit a :class:`FragmentTorsionModel` to :class:`~.data.FragmentData`.

    Parameters
    ----------
    n_grid : int
        Cells per torsion (72: 5 degrees).
    order : int
        Highest Fourier frequency per torsion of each block's log-density.
    hidden : int
        Width of the network's two hidden layers.
    steps : int
        Full-batch Adam steps.
    lr, weight_decay : float
    smoothness : float
        Weight of the penalty sum (k^2 + l^2) c_kl^2 (per context and block, averaged).
    uniform_weight : float in [0, 1)
        Stored in the model: the uniform floor of its tables.
    validation_fraction : float
        Fraction of every context's frames held out, as whole blocks of 50 consecutive frames spread over the
        data (so every run and temperature contributes, and time-correlated neighbours stay on one side).
    seed : int
    max_time_s : float, optional
        Stop after this many seconds of optimisation.
    num_threads : int
        torch threads during ``fit`` (restored afterwards).
    progress : bool

    Examples
    --------
    >>> trainer = FragmentModelTrainer(n_grid=24, order=3, hidden=16, steps=50, progress=False)  # doctest: +SKIP
    >>> model = trainer.fit(data).fetch_model()  # doctest: +SKIP
    """

    def __init__(self, n_grid: int = 72, order: int = 8, hidden: int = 64, steps: int = 1500, lr: float = 3e-3,
                 weight_decay: float = 1e-5, smoothness: float = 1e-3, uniform_weight: float = 0.05,
                 validation_fraction: float = 0.1, seed: int = 0, max_time_s: float | None = None,
                 num_threads: int = 1, progress: bool = True):
        self.n_grid, self.order = positive_int(n_grid, "n_grid", 4), positive_int(order, "order")
        self.hidden, self.steps = positive_int(hidden, "hidden"), positive_int(steps, "steps")
        self.lr, self.weight_decay = positive_float(lr, "lr"), positive_float(weight_decay, "weight_decay", True)
        self.smoothness = positive_float(smoothness, "smoothness", allow_zero=True)
        self.uniform_weight = float(uniform_weight)
        if not 0.0 <= validation_fraction < 1.0:
            raise ConfSampleError(f"validation_fraction must lie in [0, 1), got {validation_fraction!r}.")
        self.validation_fraction = float(validation_fraction)
        self.seed, self.max_time_s = int(seed), max_time_s
        self.num_threads, self.progress = positive_int(num_threads, "num_threads"), bool(progress)
        self._model = None

    def _tensors(self, data: FragmentData, seen, neighbours):
        contexts, train, valid = [], [], []
        for context, angles in zip(data.contexts, data.angles):
            held = self._held_out(len(angles))
            for flags in _VERSIONS:
                contexts.append(context_vector(*context, seen, neighbours, *flags))
            train.append(_counts(angles[~held], self.n_grid))
            valid.append(_counts(angles[held], self.n_grid))

        def stack(parts, i):
            return torch.tensor(np.stack([p[i] for p in parts]), dtype=torch.float32)

        return (torch.tensor(np.stack(contexts), dtype=torch.float32), [stack(train, i) for i in range(3)],
                [stack(valid, i) for i in range(3)])

    def _held_out(self, n: int) -> np.ndarray:
        """(n,) bool: whole blocks of ``_BLOCK_FRAMES`` consecutive frames, evenly spread (every run and temperature
        contributes; correlated neighbours stay on one side)."""
        held = np.zeros(n, dtype=bool)
        if self.validation_fraction > 0:
            block = np.arange(n) // _BLOCK_FRAMES
            every = max(2, int(round(1.0 / self.validation_fraction)))
            held = block % every == every - 1
        return held

    @staticmethod
    def _nll(log_p: torch.Tensor, counts) -> torch.Tensor:
        """Mean per-context negative log-likelihood per frame; log_p (C, 3, G, G), counts as from _counts."""
        joint, first, second = counts
        total = (joint * log_p).sum(dim=(1, 2, 3))
        total = total + (first * torch.logsumexp(log_p, dim=-1)).sum(dim=(1, 2))
        total = total + (second * torch.logsumexp(log_p, dim=-2)).sum(dim=(1, 2))
        frames = (joint.sum(dim=(2, 3)) + first.sum(dim=2) + second.sum(dim=2)).max(dim=1).values
        return -(total / frames.clamp(min=1.0)).mean()

    def fit(self, data: FragmentData) -> "FragmentModelTrainer":
        """Train on ``data``; the model is then :meth:`fetch_model`."""
        if not isinstance(data, FragmentData) or not data.contexts:
            raise ConfSampleError("data must be a non-empty FragmentData (models.fragments.sample_fragment_md).")
        seen = tuple(sorted({c[0] for c in data.contexts}))
        neighbours = tuple(sorted({c[i] for c in data.contexts for i in (1, 2)}))
        torch.manual_seed(self.seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            network = FragmentNetwork(self.n_grid, self.order, self.hidden)
            contexts, train, valid = self._tensors(data, seen, neighbours)
            n_versions = len(_VERSIONS)
            has_validation = bool(valid[0].sum() + valid[1].sum() + valid[2].sum() > 0)  # else: select on training
            repeat = [c.repeat_interleave(n_versions, dim=0) for c in train]
            optimizer = torch.optim.Adam(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            history = {"train_nll": [], "val_nll": [], "step": []}
            best, best_loss = None, float("inf")
            start = time.perf_counter()
            bar = progress_bar(range(self.steps), enabled=self.progress, desc="fragment model", unit="step")
            for step in bar:
                optimizer.zero_grad()
                log_p = network(contexts)
                nll = self._nll(log_p, repeat)
                coefficients = network.coefficients(contexts)
                penalty = (coefficients ** 2 * network.frequency_squared).sum(dim=-1).mean()
                (nll + self.smoothness * penalty).backward()
                optimizer.step()
                if step % 25 == 0 or step == self.steps - 1:
                    with torch.no_grad():
                        val = self._nll(network(contexts[::n_versions]), valid).item() if has_validation \
                            else nll.item()
                    history["train_nll"].append(nll.item())
                    history["val_nll"].append(val)
                    history["step"].append(step)
                    if val < best_loss:
                        best_loss, best = val, copy.deepcopy(network.state_dict())
                    bar.set_postfix(train=f"{nll.item():.3f}", val=f"{val:.3f}", refresh=False)
                if self.max_time_s is not None and time.perf_counter() - start > self.max_time_s:
                    break
            network.load_state_dict(best)
            seconds = time.perf_counter() - start
        finally:
            torch.set_num_threads(threads)
        metadata = {"training": {"seconds": seconds, "threads": self.num_threads, "steps": history["step"][-1] + 1,
                                 "best_val_nll": best_loss, "frames": {" ".join(c): len(a) for c, a in
                                                                       zip(data.contexts, data.angles)},
                                 "sources": data.sources, "settings": self._settings()},
                    "seen_residues": list(seen)}
        self._model = FragmentTorsionModel(network, seen, neighbours, self.uniform_weight, history, metadata)
        return self

    def _settings(self) -> dict:
        return {"n_grid": self.n_grid, "order": self.order, "hidden": self.hidden, "steps": self.steps, "lr": self.lr,
                "weight_decay": self.weight_decay, "smoothness": self.smoothness,
                "uniform_weight": self.uniform_weight, "validation_fraction": self.validation_fraction,
                "seed": self.seed}

    def fetch_model(self) -> FragmentTorsionModel:
        if self._model is None:
            raise ConfSampleError("call fit(data) before fetch_model().")
        return self._model
