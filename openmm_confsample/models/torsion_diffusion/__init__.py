"""Torsional diffusion on the k-torus, and its exact proposal density for Metropolis-Hastings.

The estimator/model split follows deeptime::

    trainer = TorsionDiffusionTrainer(max_epochs=100, progress=False)
    model = trainer.fit(train_angles).fetch_model()        # angles: (N, k) float, radians
    angles, log_q = model.sample_and_log_prob(1000, generator=1)   # (1000, k) in [-pi, pi), (1000,)
    model.log_prob(angles)                                  # == log_q (to ~1e-9 in our tests)

The model follows the density protocol of :mod:`openmm_confsample.models.protocol`, so any
torsion-resampling proposal can use it (``moves.torsion_diffusion.TorsionDiffusionProposal`` loads
one from its checkpoint).

Modules, one seam each:

* :mod:`.network` -- the noise schedule and the score network (torch); the angle input check;
* :mod:`.flow` -- the exact discrete flow in float64 (encode/decode, log-determinant, the
  verification that makes every returned log q reproducible by ``log_prob``), with its derivation;
* :mod:`.model` -- :class:`TorsionDiffusionModel`: sampling, ``log_prob``, invertibility check,
  checkpoints;
* :mod:`.trainer` -- :class:`TorsionDiffusionTrainer` (denoising score matching), and
  :mod:`.plots` -- the loss curve.
"""

from .flow import InvertibilityError
from .model import TorsionDiffusionModel
from .network import SIGMA_MAX, SIGMA_MIN, NoiseSchedule, ScoreNetwork, check_angles
from .plots import plot_loss
from .trainer import TorsionDiffusionTrainer

__all__ = [
    "SIGMA_MIN",
    "SIGMA_MAX",
    "NoiseSchedule",
    "ScoreNetwork",
    "TorsionDiffusionTrainer",
    "TorsionDiffusionModel",
    "InvertibilityError",
    "check_angles",
    "plot_loss",
]
