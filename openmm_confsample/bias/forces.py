"""Force backends: a torch module inside an OpenMM System, as ``openmmtorch.TorchForce`` or ``openmm.PythonForce``.

:func:`add_learned_bias` (and :func:`add_torch_force` for any ``positions -> energy`` module) adds the
module to a System as ``openmmtorch.TorchForce`` when ``openmmtorch`` imports, otherwise as OpenMM's
built-in ``openmm.PythonForce`` running the same module with autograd forces (a
:class:`~openmm_confsample.bias.LearnedTorsionBias` runs there as its analytic series,
:class:`FourierBiasComputation`). Both give the same energies; TorchForce avoids the Python call per step
and is the backend for GPU platforms, the PythonForce the faster one on Reference/CPU
(measurements: ``docs/openmm-torch.md``). :func:`with_learned_bias` is the public way to make a biased copy
of a MolecularSystem; the bias sits in a force group of its own, so :func:`unbiased_potential` reads the
energy without it.

Import order matters for openmm-torch (``docs/openmm-torch.md``): torch must be loaded before
``openmmtorch`` is imported (this module imports torch at the top), and OpenMM's plugin loader skips the
openmm-torch Reference plugin when openmm was imported first, so :func:`openmmtorch_status` loads it again.

Units: positions in nm, energies in kJ/mol, forces in kJ/mol/nm.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn

from ..checks import positive_int, positive_kT
from ..errors import ConfSampleError
from .torch_module import LearnedTorsionBias, check_torsions

__all__ = [
    "BACKENDS",
    "DEFAULT_BIAS_GROUP",
    "AddedForce",
    "TorchModuleComputation",
    "FourierBiasComputation",
    "openmmtorch_status",
    "add_torch_force",
    "add_learned_bias",
    "with_learned_bias",
    "unbiased_potential",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchforce", "pythonforce")
#: Default force group of the bias: its own group, so the unbiased energy stays readable.
DEFAULT_BIAS_GROUP = 31


@dataclass
class AddedForce:
    """What :func:`add_torch_force` / :func:`add_learned_bias` added.

    Attributes
    ----------
    backend : 'torchforce' or 'pythonforce'
    force : openmm.Force
    force_index : int
        Index in ``system.getForces()``.
    force_group : int
    module : torch.nn.Module
        The module the force runs.
    message : str
        The line that was logged, e.g. "learned bias: TorchForce (openmm-torch)".
    torchscript_path : str or None
        The TorchScript file a TorchForce was built from.
    """

    backend: str
    force: openmm.Force
    force_index: int
    force_group: int
    module: nn.Module
    message: str
    torchscript_path: str | None = None


# --------------------------------------------------------------------------------------
# is openmm-torch there?


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


_TORCH_PLUGINS_LOADED = False


def _load_torch_plugins() -> None:
    """Load the openmm-torch platform plugins that failed because openmm was imported before torch.

    OpenMM loads its plugins when it is first imported; the openmm-torch Reference plugin needs libtorch
    already in the process, so after ``import openmm`` before ``import torch`` a TorchForce would make
    Context creation fail ("does not support all required kernels"). Retrying those libraries now, with
    torch loaded, registers their kernels. GPU (CUDA/OpenCL) plugins are left alone.
    """
    global _TORCH_PLUGINS_LOADED
    if _TORCH_PLUGINS_LOADED:
        return
    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.match(r"Error loading library (.+?OpenMMTorch(Reference|CPU)[^/]*?): ", failure)
        if match:
            openmm.Platform.loadPluginLibrary(match.group(1))
    _TORCH_PLUGINS_LOADED = True


def openmmtorch_status() -> tuple[bool, str]:
    """``(True, version)`` when ``openmmtorch`` imports, else ``(False, reason)`` (the import error, one line).

    This module imports torch and openmm first, which the PyPI wheel of openmmtorch 1.5 needs on Linux: it
    finds libOpenMM.so and libtorch's CUDA libraries (libnvrtc.so.12) only when those packages are loaded.
    With a CPU-only torch the import fails with "libnvrtc.so.12: cannot open shared object file". When
    openmm was imported before torch, the openmm-torch Reference plugin is loaded again here (see
    :func:`_load_torch_plugins`).
    """
    try:
        import openmmtorch  # optional: only its absence is reported; deferred so the package imports without it
    except Exception as exc:  # ImportError, or OSError from a missing CUDA library in the wheel
        return False, _one_line(exc)
    try:
        _load_torch_plugins()
    except Exception as exc:  # openmm.OpenMMException
        return False, f"the openmm-torch Reference/CPU plugin does not load: {_one_line(exc)}"
    version = getattr(openmmtorch, "__version__", None)
    if version is None:
        try:
            version = metadata.version("openmmtorch")
        except metadata.PackageNotFoundError:
            version = "unknown version"
    return True, str(version)


# --------------------------------------------------------------------------------------
# the PythonForce callables


class TorchModuleComputation:
    """The ``PythonForce`` callable: energy and autograd forces of a torch module from an OpenMM State.

    Top-level and holding a plain module, so OpenMM can pickle it (XmlSerializer, deepcopy of the System).
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, state):
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        x = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
        energy = self.module(x)
        (grad,) = torch.autograd.grad(energy, x)
        return float(energy.detach()), -grad.numpy()


class FourierBiasComputation:
    """The ``PythonForce`` callable of a :class:`LearnedTorsionBias`: analytic energy and forces, no torch.

    Same energies and forces as the torch module (to rounding), about ten times cheaper per call than
    torch autograd on a few atoms. ``particles`` are the torsion atoms (``PythonForce.setParticles``),
    ``local_torsions`` index into them.
    """

    def __init__(self, bias: LearnedTorsionBias):
        torsions = bias.torsions.numpy()
        self.particles = np.unique(torsions)
        self.local_torsions = np.searchsorted(self.particles, torsions)
        self.modes = bias.modes.numpy().copy()
        self.cos_coefficients = bias.cos_coefficients.numpy().copy()
        self.sin_coefficients = bias.sin_coefficients.numpy().copy()
        self._quads = [tuple(int(a) for a in quad) for quad in self.local_torsions]

    def __call__(self, state):
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return self.energy_and_forces(np.asarray(x))

    def energy_and_forces(self, x: np.ndarray):
        """Energy (kJ/mol) and forces (len(particles), 3) kJ/mol/nm of the torsion atoms' positions ``x`` (nm).

        The geometry is plain-float Python per torsion: for a few torsions, numpy's per-call overhead on
        3-vectors cost ~80 us a step (most of the PythonForce's cost), the scalar code ~10 us.
        """
        xs = x.tolist()
        angles, gradients = [], []
        for i0, i1, i2, i3 in self._quads:
            (x0, y0, z0), (x1, y1, z1), (x2, y2, z2), (x3, y3, z3) = xs[i0], xs[i1], xs[i2], xs[i3]
            ax, ay, az = x1 - x0, y1 - y0, z1 - z0  # b1
            bx, by, bz = x2 - x1, y2 - y1, z2 - z1  # b2
            cx, cy, cz = x3 - x2, y3 - y2, z3 - z2  # b3
            n1x, n1y, n1z = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
            n2x, n2y, n2z = by * cz - bz * cy, bz * cx - bx * cz, bx * cy - by * cx
            b2_sq = bx * bx + by * by + bz * bz
            b2_norm = math.sqrt(b2_sq)
            angles.append(math.atan2((ax * n2x + ay * n2y + az * n2z) * b2_norm, n1x * n2x + n1y * n2y + n1z * n2z))
            # Gradient of the dihedral (Blondel & Karplus 1996) in terms of the bond vectors b1, b2, b3.
            s0 = -b2_norm / (n1x * n1x + n1y * n1y + n1z * n1z)
            s3 = b2_norm / (n2x * n2x + n2y * n2y + n2z * n2z)
            g0 = (s0 * n1x, s0 * n1y, s0 * n1z)
            g3 = (s3 * n2x, s3 * n2y, s3 * n2z)
            r1 = (ax * bx + ay * by + az * bz) / b2_sq
            r3 = (cx * bx + cy * by + cz * bz) / b2_sq
            g1 = tuple(-(r1 + 1.0) * u + r3 * v for u, v in zip(g0, g3))
            g2 = tuple(r1 * u - (r3 + 1.0) * v for u, v in zip(g0, g3))
            gradients.append((g0, g1, g2, g3))
        phase = self.modes @ np.array(angles)
        cos_p, sin_p = np.cos(phase), np.sin(phase)
        energy = float(cos_p @ self.cos_coefficients + sin_p @ self.sin_coefficients)
        dB_dtau = ((self.sin_coefficients * cos_p - self.cos_coefficients * sin_p) @ self.modes).tolist()
        forces = [[0.0, 0.0, 0.0] for _ in range(len(xs))]
        for quad, grads, slope in zip(self._quads, gradients, dB_dtau):
            for atom, g in zip(quad, grads):
                f = forces[atom]
                f[0] -= slope * g[0]
                f[1] -= slope * g[1]
                f[2] -= slope * g[2]
        return energy, np.array(forces)


# --------------------------------------------------------------------------------------
# adding a module to a System


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfSampleError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    return backend


def _check_system(system) -> openmm.System:
    if not isinstance(system, openmm.System):
        raise ConfSampleError(f"system must be an openmm.System, got {type(system).__name__}.")
    return system


def _check_force_group(force_group) -> int:
    force_group = positive_int(force_group, "force_group", minimum=0)
    if force_group > 31:
        raise ConfSampleError(f"force_group must be an integer in [0, 31], got {force_group!r}.")
    return force_group


def _torch_force(module: nn.Module, torchscript_path):
    """An ``openmmtorch.TorchForce`` of ``module``, scripted to ``torchscript_path`` (None: a temporary file)."""
    import openmmtorch  # optional dependency: only reached after openmmtorch_status() said it imports

    scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.script(module)
    if torchscript_path is not None:
        scripted.save(str(torchscript_path))
        return openmmtorch.TorchForce(str(torchscript_path))
    # TorchForce loads the module when it is constructed, so a temporary file is enough.
    handle, temporary = tempfile.mkstemp(prefix="confsample-", suffix=".pt")
    os.close(handle)
    try:
        scripted.save(temporary)
        return openmmtorch.TorchForce(temporary)
    finally:
        os.remove(temporary)


def _python_force(module: nn.Module) -> openmm.PythonForce:
    """An ``openmm.PythonForce`` of ``module``: the analytic series for a bias, autograd for any other module."""
    if isinstance(module, LearnedTorsionBias):
        computation = FourierBiasComputation(module)
        force = openmm.PythonForce(computation)
        force.setParticles([int(a) for a in computation.particles])
        return force
    return openmm.PythonForce(TorchModuleComputation(module))


def add_torch_force(system: openmm.System, module: nn.Module, backend: str = "auto", force_group: int = 0,
                    torchscript_path=None, label: str = "torch force") -> AddedForce:
    """Add a torch module ``positions (n_atoms, 3) nm -> energy kJ/mol`` to ``system`` as a force.

    Parameters
    ----------
    system : openmm.System
        Modified in place (one force appended).
    module : torch.nn.Module
        TorchScript-compatible for the TorchForce backend.
    backend : {'auto', 'torchforce', 'pythonforce'}
        'auto' uses TorchForce when ``openmmtorch`` imports, else PythonForce.
    force_group : int in [0, 31]
    torchscript_path : str, optional
        Where the TorchScript file for TorchForce is kept (default: a temporary file, removed once the
        TorchForce has loaded it).
    label : str
        Prefix of the logged line.

    Returns
    -------
    AddedForce
    """
    backend = _check_backend(backend)
    _check_system(system)
    if not isinstance(module, nn.Module):
        raise ConfSampleError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    force_group = _check_force_group(force_group)
    available, detail = openmmtorch_status()
    if backend == "torchforce" and not available:
        raise ConfSampleError(f"backend 'torchforce' was requested but openmmtorch is not importable ({detail}).")
    module = module.eval()
    if backend == "torchforce" or (backend == "auto" and available):
        force = _torch_force(module, torchscript_path)
        message = f"{label}: TorchForce (openmm-torch {detail})"
        name = "torchforce"
    else:
        force = _python_force(module)
        reason = ("pythonforce backend requested" if backend == "pythonforce"
                  else f"openmm-torch not importable: {detail}")
        message = f"{label}: PythonForce fallback ({reason})"
        name = "pythonforce"
        torchscript_path = None
    force.setForceGroup(force_group)
    index = system.addForce(force)
    logger.info(message)
    return AddedForce(name, force, index, force_group, module, message,
                      None if torchscript_path is None else str(torchscript_path))


def _checked_bias(bias: LearnedTorsionBias, torsions, kT, n_atoms: int) -> LearnedTorsionBias:
    """``bias``, after checking that the given ``torsions`` and ``kT`` (either may be None) are its own."""
    if torsions is not None:
        t = check_torsions(torsions, n_atoms)
        if t.shape[0] != bias.n_torsions:
            raise ConfSampleError(
                f"the bias has {bias.n_torsions} torsions but {t.shape[0]} torsion quadruples were given."
            )
        if not np.array_equal(t, bias.torsions.numpy()):
            raise ConfSampleError(f"torsions {t.tolist()} differ from the bias's torsions {bias.torsions.tolist()}.")
    if kT is not None and not math.isclose(kT, bias.kT, rel_tol=1e-6):
        raise ConfSampleError(f"kT={kT} kJ/mol differs from the kT={bias.kT} kJ/mol the bias was built for.")
    return bias


def add_learned_bias(system: openmm.System, bias_module_or_model, torsions=None, kT: float | None = None,
                     backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP, torchscript_path=None,
                     verbose: bool = True, **options) -> AddedForce:
    """Add the learned torsion bias of a model (or a ready :class:`LearnedTorsionBias`) to ``system``.

    Parameters
    ----------
    system : openmm.System
        Modified in place.
    bias_module_or_model : LearnedTorsionBias or a model with ``log_prob``
        A model is tabulated and fitted with :meth:`LearnedTorsionBias.from_model` (``options``:
        cap_kT, grid_points, max_frequency, smoothing_kT, smoothing_rad, bias_factor).
    torsions : (k, 4) int or dict name -> quad, optional
        Must match the module's/model's torsions (count; for a module also the atoms).
    kT : float, kJ/mol
        Required for a model; for a module it must equal the module's ``kT`` if given.
    backend : {'auto', 'torchforce', 'pythonforce'}
    force_group : int, default 31
        The bias's own group: read the unbiased energy with :func:`unbiased_potential`.
    verbose : bool
        Also print the backend line (it is always logged).

    Returns
    -------
    AddedForce  (``.backend`` is 'torchforce' or 'pythonforce'; ``.module`` the bias)

    Examples
    --------
    >>> import numpy as np
    >>> from openmm_confsample.bias import LearnedTorsionBias, add_learned_bias
    >>> from openmm_confsample.testing import four_atom_torsion_system
    >>> chain = four_atom_torsion_system()
    >>> log_q = lambda tau: 3.0 * np.cos(tau[:, 0] - 1.0)          # any model's log density
    >>> bias = LearnedTorsionBias.from_log_density(log_q, [(0, 1, 2, 3)], kT=chain.kT)
    >>> added = add_learned_bias(chain.system, bias, backend="pythonforce", verbose=False)
    >>> added.backend, added.force_group
    ('pythonforce', 31)
    """
    _check_backend(backend)
    n_atoms = _check_system(system).getNumParticles()
    kT = None if kT is None else positive_kT(kT)
    if isinstance(bias_module_or_model, LearnedTorsionBias):
        bias = _checked_bias(bias_module_or_model, torsions, kT, n_atoms)
    else:
        bias = LearnedTorsionBias.from_model(bias_module_or_model, torsions, kT, **options)
    check_torsions(bias.torsions.numpy(), n_atoms)
    force_group = _check_force_group(force_group)
    sharing = [type(f).__name__ for f in system.getForces() if f.getForceGroup() == force_group]
    if sharing:
        raise ConfSampleError(
            f"force_group {force_group} is already used by {', '.join(sharing)}; the bias needs a group of its own "
            "so that the unbiased energy stays readable."
        )
    added = add_torch_force(system, bias, backend, force_group, torchscript_path, label="learned bias")
    if verbose:
        print(added.message)
    return added


def biased_copy(molsys, bias_module_or_model, torsions=None, backend: str = "auto",
                force_group: int = DEFAULT_BIAS_GROUP, verbose: bool = False, **options):
    """A copy of ``molsys`` with :func:`add_learned_bias` applied to a deep copy of its System, and the AddedForce."""
    system = copy.deepcopy(molsys.system)
    added = add_learned_bias(system, bias_module_or_model, torsions, molsys.kT, backend=backend,
                             force_group=force_group, verbose=verbose, **options)
    return dataclasses.replace(molsys, system=system), added


def with_learned_bias(molsys, bias, backend: str = "auto", force_group: int = DEFAULT_BIAS_GROUP):
    """A copy of the MolecularSystem ``molsys`` whose System carries ``bias``, and the :class:`AddedForce`.

    ``bias`` is a :class:`LearnedTorsionBias` or the path of one saved with :meth:`LearnedTorsionBias.save`;
    ``molsys`` itself is not changed. This is the way to run any sampler on the biased potential; each
    frame's bias energy is the energy of the AddedForce's ``force_group``, and
    :func:`~openmm_confsample.bias.reweighting_weights` turns those into weights. For reference MD::

        biased, added = with_learned_bias(ala, "bias.pt", "auto")
        run_md(biased, "run", 100.0, bias=BiasRecord.of(added, "bias.pt"))   # openmm_confsample.data.md
    """
    if isinstance(bias, (str, os.PathLike)):
        bias = LearnedTorsionBias.load(bias)
    if not isinstance(bias, LearnedTorsionBias):
        raise ConfSampleError(
            f"bias must be a LearnedTorsionBias or the path of a saved one, got {type(bias).__name__}."
        )
    n_atoms = molsys.system.getNumParticles()
    if int(bias.torsions.max()) >= n_atoms:
        raise ConfSampleError(f"the bias's torsions name atom {int(bias.torsions.max())} but system "
                              f"'{molsys.name}' has {n_atoms} atoms.")
    return biased_copy(molsys, bias, backend=backend, force_group=force_group)


def unbiased_potential(context: openmm.Context, added: AddedForce) -> float:
    """Potential energy (kJ/mol) of every force group except the bias's."""
    groups = set(range(32)) - {added.force_group}
    state = context.getState(getEnergy=True, groups=groups)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
