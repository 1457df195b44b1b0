"""A learned bias on torsions: flatten a model's free-energy landscape inside an OpenMM System.

A torsion model (e.g. :class:`~openmm_confsample.models.torsion_diffusion.TorsionDiffusionModel`)
has an exact log density ``log q(tau)`` on the torus; ``F(tau) = -kT log q(tau)`` is its free energy
along the torsions. Adding the bias ``B(tau) ~ -(F(tau) - F_min)`` to the potential makes the biased
torsion landscape roughly flat, so MD crosses barriers it would wait nanoseconds for; frames are
reweighted by ``exp(+B/kT)`` to recover unbiased averages (:func:`reweighting_weights`).

The modules follow the data:

* :mod:`.fourier` -- the maths on the torsion grid: the capped, well-tempered bias of ``log q``
  (:func:`tabulate_bias`), WHAM for frames pooled from biased runs, the Fourier fit
  (:func:`fit_fourier_series`); the exact form is written out there;
* :mod:`.torch_module` -- :class:`LearnedTorsionBias`, the fitted series as a TorchScript-ready module
  (positions in nm -> kJ/mol), built from any model's ``log_prob``;
* :mod:`.forces` -- the module inside a System as ``openmmtorch.TorchForce`` or ``openmm.PythonForce``
  (:func:`add_learned_bias`, :func:`with_learned_bias`);
* :mod:`.biased_md` -- biased Langevin MD and the reweighting (:func:`run_biased_md`,
  :func:`reweighting_weights`);
* :mod:`.refinement` -- the bias refined by rounds of biased MD (:func:`refine_learned_bias`).

Units: positions in nm, energies in kJ/mol, angles in radians, ``kT`` in kJ/mol.
"""

from .biased_md import BiasedMDResult, bias_energies, reweighting_weights, run_biased_md
from .forces import (
    BACKENDS,
    DEFAULT_BIAS_GROUP,
    AddedForce,
    FourierBiasComputation,
    TorchModuleComputation,
    add_learned_bias,
    add_torch_force,
    openmmtorch_status,
    unbiased_potential,
    with_learned_bias,
)
from .fourier import MAX_GRID_POINTS, fit_fourier_series, tabulate_bias
from .refinement import DEFAULT_REFINE_TRAINER, BiasRefinement, refine_learned_bias
from .torch_module import BIAS_KIND, LearnedTorsionBias, torsion_angles_torch

__all__ = [
    "LearnedTorsionBias",
    "AddedForce",
    "BiasedMDResult",
    "FourierBiasComputation",
    "TorchModuleComputation",
    "torsion_angles_torch",
    "tabulate_bias",
    "fit_fourier_series",
    "add_torch_force",
    "add_learned_bias",
    "with_learned_bias",
    "openmmtorch_status",
    "bias_energies",
    "reweighting_weights",
    "unbiased_potential",
    "run_biased_md",
    "BiasRefinement",
    "refine_learned_bias",
    "BACKENDS",
    "DEFAULT_BIAS_GROUP",
    "BIAS_KIND",
    "MAX_GRID_POINTS",
    "DEFAULT_REFINE_TRAINER",
]
