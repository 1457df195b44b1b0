"""Potential energies as a differentiable torch op: U(x) with -forces as its gradient (for acceptance training)."""

from __future__ import annotations

import numpy as np
import torch


def energies_and_forces(energy_fn, positions_nm: np.ndarray):
    """(energies (B,) kJ/mol, forces (B, n, 3) kJ/mol/nm) of ``energy_fn``; non-finite ones become (inf, 0)."""
    if hasattr(energy_fn, "energies_and_forces"):
        energies, forces = energy_fn.energies_and_forces(positions_nm, forces=True)
    else:
        energies, forces = energy_fn(positions_nm)
    energies = np.asarray(energies, dtype=np.float64).reshape(len(positions_nm))
    forces = np.asarray(forces, dtype=np.float64).reshape(positions_nm.shape)
    bad = ~np.isfinite(energies) | ~np.all(np.isfinite(forces), axis=(1, 2))
    energies = np.where(bad, np.inf, energies)
    forces[bad] = 0.0
    return energies, forces


class PotentialEnergy(torch.autograd.Function):
    """U(x) in kJ/mol of a batch of conformations, with dU/dx = -forces (kJ/mol/nm) as its gradient.

    ``energy_fn`` is an :class:`~openmm_confsample.systems.EnergyEvaluator` or any callable taking (B, n, 3)
    float64 nm and returning ``(energies (B,) kJ/mol, forces (B, n, 3) kJ/mol/nm)``. Conformations OpenMM
    refuses (or with non-finite energy) get ``inf`` and a zero gradient.
    """

    @staticmethod
    def forward(ctx, positions_nm: torch.Tensor, energy_fn):
        x = positions_nm.detach().double().cpu().numpy()
        energies, forces = energies_and_forces(energy_fn, x)
        ctx.save_for_backward(torch.as_tensor(-forces, dtype=positions_nm.dtype, device=positions_nm.device))
        return torch.as_tensor(energies, dtype=torch.float64, device=positions_nm.device)

    @staticmethod
    def backward(ctx, grad_energy):
        (gradient,) = ctx.saved_tensors
        return grad_energy.to(gradient.dtype)[:, None, None] * gradient, None


def potential_energy(positions_nm: torch.Tensor, energy_fn) -> torch.Tensor:
    """(B,) float64 kJ/mol of (B, n, 3) nm positions; backpropagates -forces. See :class:`PotentialEnergy`."""
    return PotentialEnergy.apply(positions_nm, energy_fn)
