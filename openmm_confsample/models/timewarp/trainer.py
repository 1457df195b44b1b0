"""Fitting a Timewarp flow (deeptime's estimator/model split): likelihood on MD pairs, then MH acceptance.

``TimewarpTrainer(config).fit_likelihood(x0, x1, atom_labels)`` maximises log p(x(t+tau), v | x(t)) with
fresh auxiliary velocities every batch (and, for a new model, first fits the closed-form baseline: per-atom-type
latent scales, or in internal coordinates the linear-Gaussian model of :mod:`.model`);
``fit_acceptance(x0, energy_fn, kT)`` then optionally fine-tunes on the MH acceptance of its own proposals.
``fetch_model()`` returns the :class:`~.model.TimewarpModel`, which is what is saved and handed to a move.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from ...checks import positive_float, positive_int, positive_kT, wrap_angle
from ...errors import ConfSampleError
from ...progress import progress_bar
from ...units import to_nm_batch
from .config import TimewarpConfig
from .energy import energies_and_forces, potential_energy
from .model import TimewarpModel, _short
from .zmatrix import zmatrix_for


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, 3) rotation matrices, uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=1).view(n, 3, 3)
    return rot.to(dtype)


class TimewarpTrainer:
    """Fits a :class:`TimewarpModel`: maximum likelihood on (x(t), x(t+tau)) pairs, then optionally acceptance.

    Parameters
    ----------
    config : TimewarpConfig, dict or None
        Network sizes for a new model (ignored when ``model`` is given).
    model : TimewarpModel, optional
        Continue training this model (e.g. a loaded checkpoint) instead of creating one.
    seed : int
        Seeds the weight initialisation, batch order, rotations and auxiliary velocities.
    device : str
        Torch device, e.g. 'cpu' or 'cuda'.
    progress : bool
        Show progress bars (pairs/s and ETA).
    full_covariance : bool
        Internal coordinates only: fit the baseline's residual correlation between all 3n - 6 coordinates
        (e.g. the angles around one atom), not only one spread per coordinate.

    Examples
    --------
    >>> trainer = TimewarpTrainer({"n_coupling_layers": 2}, seed=0, progress=False)  # doctest: +SKIP
    >>> trainer.fit_likelihood(x0, x1, ala.atom_labels, val=(x0v, x1v), epochs=20)    # doctest: +SKIP
    >>> trainer.fit_acceptance(x0, EnergyEvaluator(ala), ala.kT, steps=200)           # doctest: +SKIP
    >>> model = trainer.fetch_model(); model.save("timewarp.pt")                       # doctest: +SKIP
    """

    def __init__(self, config=None, *, model: TimewarpModel | None = None, seed: int = 0, device: str = "cpu",
                 progress: bool = True, full_covariance: bool = True):
        if model is not None and not isinstance(model, TimewarpModel):
            raise ConfSampleError(f"model must be a TimewarpModel, got {type(model).__name__}.")
        self.config = model.config if model is not None else TimewarpConfig.from_any(config)
        self.seed = int(seed)
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfSampleError(f"device {device!r} is not a valid torch device.") from exc
        self.progress = bool(progress)
        self.full_covariance = bool(full_covariance)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._model = model.to(self.device) if model is not None else None
        self.history: dict[str, list] = {
            "train_nll": [], "val_nll": [], "initial_val_nll": [], "epoch_seconds": [], "pairs_per_second": [],
            "acceptance_loss": [], "acceptance_rate": [], "mean_clipped_log_alpha": [], "median_delta_u_kT": [],
            "proposal_rms_displacement_nm": [], "proposal_log_prob": [],
        }

    # -- helpers -----------------------------------------------------------------------------------
    def _new_model(self, atom_labels, metadata):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = TimewarpModel(atom_labels, self.config, metadata)
        return model.to(self.device)

    def _tensor(self, array):
        return torch.as_tensor(array, dtype=torch.float32, device=self.device)

    def _randn(self, shape):
        return torch.randn(shape, generator=self.generator).to(self.device)

    @torch.no_grad()
    def _mean_nll(self, x0, x1, v, batch_size=512) -> float:
        total = 0.0
        for start in range(0, len(x0), batch_size):
            sl = slice(start, start + batch_size)
            total += -self._model._log_prob_tensor(x0[sl], x1[sl], v[sl]).double().sum().item()
        return total / len(x0)

    @torch.no_grad()
    def _init_base_scales(self, x0, x1):
        """Start each atom type's latent scale at the data's displacement spread (the flow starts as identity).

        In internal coordinates: fit the per-coordinate baseline q' = m + c (q - m) + sd * y by least squares
        (torsions: circular mean m, regression of the wrapped change on the wrapped deviation), so the untrained
        flow is that linear-Gaussian model and the latent scales start at 1.
        """
        if self.config.internal:
            self._fit_internal_baseline(x0, x1)
            return
        y = (x1 - x0) / self.config.displacement_scale_nm
        y = y - y.mean(dim=1, keepdim=True)
        per_atom = y.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-3)  # (n,)
        types = self._model.atom_types
        sums = torch.zeros(len(self._model.vocabulary), device=self.device).index_add_(0, types, per_atom.log())
        counts = torch.zeros_like(sums).index_add_(0, types, torch.ones_like(per_atom))
        self._model.log_sigma_x.copy_(sums / counts.clamp_min(1))

    @torch.no_grad()
    def _fit_internal_baseline(self, x0, x1, batch_size=4096):
        """Least-squares fit of m, c, sd per coordinate and (``full_covariance``) of the residual correlation L."""
        model = self._model
        ic = model.internal
        q0 = torch.cat([ic.to_internal(x0[i:i + batch_size].double()) for i in range(0, len(x0), batch_size)])
        q1 = torch.cat([ic.to_internal(x1[i:i + batch_size].double()) for i in range(0, len(x1), batch_size)])
        mean = 0.5 * (q0.mean(0) + q1.mean(0))
        d0, d1 = q0 - mean, q1 - mean
        coef = ((d0 * d1).mean(0) / d0.pow(2).mean(0).clamp_min(1e-12)).clamp(0.0, 1.0)
        resid = d1 - coef * d0
        # Torsions on the circle.
        phi0, phi1 = q0[..., 2], q1[..., 2]
        m_phi = torch.atan2(torch.sin(phi0).mean(0), torch.cos(phi0).mean(0))
        dev = wrap_angle(phi0 - m_phi)
        delta = wrap_angle(phi1 - phi0)
        slope = ((dev * delta).mean(0) / dev.pow(2).mean(0).clamp_min(1e-12)).clamp(-1.0, 0.0)  # c - 1
        resid_phi = delta - slope * dev
        mean[:, 2], coef[:, 2] = m_phi, 1.0 + slope
        sd = resid.pow(2).mean(0).sqrt()
        sd[:, 2] = resid_phi.pow(2).mean(0).sqrt()
        mask = ic.mask.double()
        if self.full_covariance:
            std_resid = torch.stack([resid[..., 0], resid[..., 1], resid_phi], dim=-1) / sd.clamp_min(1e-5)
            active = std_resid.reshape(len(std_resid), -1)[:, model.ic_active]
            corr = active.T @ active / len(active)
            corr = corr + 1e-6 * torch.eye(len(corr), dtype=corr.dtype)
            model.ic_chol.copy_(torch.linalg.cholesky(corr).float())
        model.ic_mean.copy_((mean * mask).float())
        model.ic_coef.copy_(torch.where(mask > 0, coef, torch.ones_like(coef)).float())
        model.ic_log_sd.copy_(torch.where(mask > 0, sd.clamp_min(1e-5).log(), torch.zeros_like(sd)).float())
        model.log_sigma_x.zero_()

    # -- phase 1 -----------------------------------------------------------------------------------
    def fit_likelihood(self, x0, x1, atom_labels, val=None, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                       weight_decay: float = 1e-5, patience: int | None = 10, max_minutes: float | None = None,
                       rotate: bool = True, max_grad_norm: float = 10.0, tau_ps: float | None = None,
                       temperature_K: float | None = None, topology_fingerprint: str | None = None,
                       metadata: dict | None = None):
        """Maximum likelihood of x(t+tau) given x(t), with fresh N(0, I) auxiliary velocities every batch.

        Parameters
        ----------
        x0, x1 : (N, n_atoms, 3) float, nm
            Pairs (x(t), x(t+tau)).
        atom_labels : sequence of str, length n_atoms
        val : (x0v, x1v), optional
            Held-out pairs; the best-validation weights are kept (else the best training epoch).
        epochs, batch_size, lr, weight_decay : training settings (AdamW); ``epochs=0`` fits the baseline only.
        patience : int or None
            Stop after this many epochs without improvement of the monitored NLL.
        max_minutes : float or None
            Stop after the epoch that passes this wall-clock budget.
        rotate : bool
            Random rotation augmentation (x(t) and x(t+tau) rotated together about x(t)'s centroid).
        tau_ps, temperature_K, topology_fingerprint : recorded in the model's metadata.
        metadata : dict, optional
            Further entries for the model's metadata (JSON-like), e.g. ``data_source``.

        NLL in the history is nats per pair, -log p(x1, v | x0) in nm-coordinates, velocities included
        (their part is 3n/2 log(2 pi e) = 93.6 nats for 22 atoms at best). A model created here starts as a
        Gaussian whose per-atom-type scales are fitted to the training displacements; ``initial_val_nll``
        records that starting point on the validation pairs.
        """
        labels = [str(a) for a in atom_labels]
        n_atoms = len(labels)
        x0 = to_nm_batch(x0, n_atoms, "x0")
        x1 = to_nm_batch(x1, n_atoms, "x1")
        if len(x0) != len(x1):
            raise ConfSampleError(f"x0 has {len(x0)} conformations but x1 has {len(x1)}; they must be pairs.")
        # epochs=0 only creates the model and fits its baseline (the per-atom-type scales, or in internal
        # coordinates the linear-Gaussian model): a closed-form start that is already a usable proposal there.
        epochs = positive_int(epochs, "epochs", minimum=0)
        batch_size = positive_int(batch_size, "batch_size")
        lr = positive_float(lr, "lr")
        weight_decay = positive_float(weight_decay, "weight_decay", allow_zero=True)
        if val is not None:
            if not isinstance(val, (tuple, list)) or len(val) != 2:
                raise ConfSampleError("val must be a pair (x0_val, x1_val) of (N, n_atoms, 3) arrays in nm.")
            x0v = to_nm_batch(val[0], n_atoms, "val[0]")
            x1v = to_nm_batch(val[1], n_atoms, "val[1]")
            if len(x0v) != len(x1v):
                raise ConfSampleError(f"val[0] has {len(x0v)} conformations but val[1] has {len(x1v)}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise ConfSampleError(f"metadata must be a dict, got {type(metadata).__name__}.")
        metadata = dict(metadata or {})
        if "temperature_K" in metadata and "temperature" not in metadata:
            metadata["temperature"] = metadata.pop("temperature_K")
        metadata.update({k: v for k, v in (("tau_ps", tau_ps), ("temperature", temperature_K),
                                           ("topology_fingerprint", topology_fingerprint)) if v is not None})
        if self._model is None:
            if self.config.internal and not self.config.zmatrix:
                self.config.zmatrix = zmatrix_for(labels, x0[:10])
            self._model = self._new_model(labels, metadata)
            fresh = True
        else:
            if labels != self._model.atom_labels:
                raise ConfSampleError(
                    f"atom_labels differ from the model's ({n_atoms} atoms {_short(labels)} vs "
                    f"{self._model.n_atoms} atoms {_short(self._model.atom_labels)})."
                )
            self._model.metadata.update(metadata)
            fresh = False
        model = self._model
        x0_t, x1_t = self._tensor(x0), self._tensor(x1)
        if fresh:
            self._init_base_scales(x0_t, x1_t)
        if val is not None:
            x0v_t, x1v_t = self._tensor(x0v), self._tensor(x1v)
            # Fixed validation velocities make the validation NLL comparable between epochs.
            vv_t = self._randn(x0v_t.shape)

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        n_batches = math.ceil(len(x0_t) / batch_size)
        best_nll, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
        if val is not None:
            # The starting point competes too: a run that only gets worse returns the weights it started from.
            best_nll = self._mean_nll(x0v_t, x1v_t, vv_t)
            self.history["initial_val_nll"].append(best_nll)
        t_start = time.perf_counter()
        bar = progress_bar(total=epochs * len(x0_t), enabled=self.progress, desc="Timewarp likelihood", unit="pair")
        try:
            for epoch in range(epochs):
                t_epoch = time.perf_counter()
                model.train()
                order = torch.randperm(len(x0_t), generator=self.generator).to(self.device)
                epoch_loss = 0.0
                for b in range(n_batches):
                    idx = order[b * batch_size:(b + 1) * batch_size]
                    xa, xb = x0_t[idx], x1_t[idx]
                    if rotate and not model.config.internal:  # internal coordinates are invariant already
                        rot = random_rotations(len(idx), self.generator).to(self.device)
                        centre = xa.mean(dim=1, keepdim=True)
                        xa = torch.matmul(xa - centre, rot.transpose(1, 2))
                        xb = torch.matmul(xb - centre, rot.transpose(1, 2))
                    v = self._randn(xa.shape)
                    loss = -model._log_prob_tensor(xa, xb, v).mean()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite likelihood loss at epoch {epoch}; lower lr.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    epoch_loss += loss.item() * len(idx)
                    bar.update(len(idx))
                model.eval()
                train_nll = epoch_loss / len(x0_t)
                val_nll = self._mean_nll(x0v_t, x1v_t, vv_t) if val is not None else math.nan
                seconds = time.perf_counter() - t_epoch
                self.history["train_nll"].append(train_nll)
                self.history["val_nll"].append(val_nll)
                self.history["epoch_seconds"].append(seconds)
                self.history["pairs_per_second"].append(len(x0_t) / seconds)
                bar.set_postfix(train_nll=f"{train_nll:.2f}", val_nll=f"{val_nll:.2f}")
                monitored = val_nll if val is not None else train_nll
                if monitored < best_nll:
                    best_nll, best_state, stale = monitored, copy.deepcopy(model.state_dict()), 0
                else:
                    stale += 1
                if patience is not None and stale >= patience:
                    break
                if max_minutes is not None and time.perf_counter() - t_start > 60.0 * max_minutes:
                    break
        finally:
            bar.close()
        model.load_state_dict(best_state)
        model.metadata["history"] = {k: list(v) for k, v in self.history.items() if v}
        return self

    fit = fit_likelihood

    # -- phase 2 -----------------------------------------------------------------------------------
    def fit_acceptance(self, x0, energy_fn, kT: float, steps: int = 200, batch_size: int = 16, lr: float = 1e-4,
                       beta_ent: float = 0.1, beta_energy: float = 0.0, weight_decay: float = 1e-5,
                       max_grad_norm: float = 1.0, max_minutes: float | None = None):
        """Fine-tune on the MH acceptance of proposals from the states ``x0``.

        Per step, for a batch of states x with fresh velocities v and proposals (x', v') ~ p(.|x), maximise

            mean(min(0, log alpha)) - beta_ent * mean(log p(x', v' | x)) - beta_energy * mean(u(x') - u(x)),
            log alpha = -(u(x') - u(x)) - (K(v') - K(v)) + log p(x, v | x') - log p(x', v' | x),

        with K(v) = |v|^2 / 2 and u = U / kT. The energy gradient is -forces through :class:`PotentialEnergy`.

        Parameters
        ----------
        x0 : (N, n_atoms, 3) float, nm
            States to propose from (e.g. MD frames).
        energy_fn : EnergyEvaluator or callable (B, n, 3) nm -> (energies kJ/mol, forces kJ/mol/nm)
        kT : float, kJ/mol
        steps, batch_size, lr, weight_decay, max_grad_norm : optimisation settings (AdamW).
        beta_ent : float
            Weight of the entropy term; without it the flow shrinks its steps until every proposal is accepted.
            A flow that can only shrink its steps settles where the mean energy change is about
            ``1.5 * n_atoms * beta_ent`` kT (~3.3 kT for alanine dipeptide at 0.1): watch
            ``proposal_rms_displacement_nm`` in the history, high acceptance of tiny steps is no gain.
        beta_energy : float
            Optional weight of the mean reduced energy change of proposals.

        The raw objective is used on purpose, clashes at 1e8 kT included; only the global gradient norm is
        clipped. Capping the energy lets the flow buy acceptance with density ratio instead of energy, and
        squashing very negative log alpha hands the step to the entropy term: both diverged in tests on
        alanine dipeptide, while the raw objective took a likelihood-trained model from 0 to ~10% acceptance
        (by shrinking its steps; see ``beta_ent``).

        The history records, per step, ``acceptance_rate`` (mean min(1, alpha), proposals OpenMM refuses count
        as 0), ``mean_clipped_log_alpha``, ``median_delta_u_kT``, ``proposal_rms_displacement_nm`` (root mean
        square over atoms of x' - x, no alignment) and ``proposal_log_prob``.
        """
        if self._model is None:
            raise ConfSampleError("fit_acceptance needs a model: call fit_likelihood first or pass model= to the trainer.")
        model = self._model
        x0 = to_nm_batch(x0, model.n_atoms, "x0")
        kT = positive_kT(kT)
        steps, batch_size = positive_int(steps, "steps"), positive_int(batch_size, "batch_size")
        lr = positive_float(lr, "lr")
        beta_ent = positive_float(beta_ent, "beta_ent", allow_zero=True)
        beta_energy = positive_float(beta_energy, "beta_energy", allow_zero=True)
        if not (hasattr(energy_fn, "energies_and_forces") or callable(energy_fn)):
            raise ConfSampleError("energy_fn must be an EnergyEvaluator or a callable returning (energies, forces).")
        u0 = energies_and_forces(energy_fn, x0)[0] / kT
        if not np.all(np.isfinite(u0)):
            bad = np.nonzero(~np.isfinite(u0))[0][:5].tolist()
            raise ConfSampleError(f"x0 has conformations with non-finite energy (indices {bad}).")
        x0_t = self._tensor(x0)
        u0_t = torch.as_tensor(u0, dtype=torch.float64, device=self.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        t_start = time.perf_counter()
        bar = progress_bar(total=steps, enabled=self.progress, desc="Timewarp acceptance", unit="step")
        model.train()
        try:
            for _ in range(steps):
                idx = torch.randint(len(x0_t), (batch_size,), generator=self.generator).to(self.device)
                x, u_old = x0_t[idx], u0_t[idx]
                v = self._randn(x.shape)
                x_new, v_new, log_p_forward = model._rsample(x, None, self.generator)
                inside = torch.isfinite(log_p_forward) & torch.isfinite(x_new).all(dim=(1, 2))
                # Draws outside the support (internal coordinates) are rejected proposals: acceptance 0, no gradient.
                x_safe = torch.where(inside[:, None, None], x_new, x)
                log_p_reverse = model._log_prob_tensor(x_safe, x, v)
                delta_u = potential_energy(x_safe, energy_fn) / kT - u_old
                finite = torch.isfinite(delta_u) & inside
                if not finite.any():
                    bar.update(1)
                    continue
                delta_u = delta_u[finite]
                delta_k = 0.5 * (v_new[finite].pow(2).sum(dim=(1, 2)) - v[finite].pow(2).sum(dim=(1, 2)))
                log_alpha = (-delta_u - delta_k.double() + log_p_reverse[finite].double()
                             - log_p_forward[finite].double())
                clipped = log_alpha.clamp(max=0.0)
                objective = clipped.mean() - beta_ent * log_p_forward[finite].double().mean()
                if beta_energy:
                    objective = objective - beta_energy * delta_u.mean()
                loss = -objective
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                # Rejected-for-infinite-energy proposals count as acceptance 0.
                rate = torch.exp(clipped.detach()).sum().item() / batch_size
                self.history["acceptance_loss"].append(loss.item())
                self.history["acceptance_rate"].append(rate)
                self.history["mean_clipped_log_alpha"].append(clipped.mean().item())
                self.history["median_delta_u_kT"].append(delta_u.median().item())
                self.history["proposal_rms_displacement_nm"].append(
                    (x_new - x)[inside].detach().pow(2).sum(-1).mean().sqrt().item())
                self.history["proposal_log_prob"].append(log_p_forward.detach().mean().item())
                bar.update(1)
                bar.set_postfix(acceptance=f"{rate:.3f}")
                if max_minutes is not None and time.perf_counter() - t_start > 60.0 * max_minutes:
                    break
        finally:
            bar.close()
            model.eval()
        model.metadata["history"] = {k: list(v) for k, v in self.history.items() if v}
        return self

    # -- results -----------------------------------------------------------------------------------
    def fetch_model(self) -> TimewarpModel:
        """The trained model (best weights of the likelihood phase, then any acceptance fine-tuning)."""
        if self._model is None:
            raise ConfSampleError("the trainer has no model yet: call fit_likelihood first.")
        return self._model

    def plot_history(self, path) -> str:
        """Save a PNG of the training curves (NLL per epoch; acceptance per step) to ``path``."""
        # Deferred: matplotlib is slow to import and only the plot needs it.
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        has_acc = bool(self.history["acceptance_rate"])
        fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.5), squeeze=False)
        ax = axes[0, 0]
        epochs = np.arange(1, len(self.history["train_nll"]) + 1)
        ax.plot(epochs, self.history["train_nll"], label="train")
        if any(np.isfinite(self.history["val_nll"])):
            ax.plot(epochs, self.history["val_nll"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("NLL (nats per pair)")
        ax.set_title("likelihood phase")
        ax.legend()
        if has_acc:
            ax = axes[0, 1]
            rate = np.asarray(self.history["acceptance_rate"])
            ax.plot(rate, alpha=0.4, label="per step")
            window = max(1, len(rate) // 20)
            ax.plot(np.convolve(rate, np.ones(window) / window, mode="valid"), label=f"running mean ({window})")
            ax.set_xlabel("step")
            ax.set_ylabel("mean min(1, alpha)")
            ax.set_title("acceptance phase")
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)
