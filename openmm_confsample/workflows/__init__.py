"""End-to-end workflows the command line runs: train a model from trajectories, sample with learned moves.

* :mod:`.train`: :func:`train_torsion_diffusion` (with hot/biased data and a coverage report),
  :func:`train_timewarp`, :func:`build_learned_bias`
* :mod:`.sample`: :func:`sample_with_moves` (one Simulation + the one reporter line), :func:`sample_walkers`
  (N walkers over MPI ranks); both end with ``summary.json``
* :mod:`.report`: per-torsion basin populations with errors and ESS

Names are imported on first use (PEP 562): the command line checks its arguments before torch is loaded.
"""

import importlib as _importlib

_LAZY = {
    "train_torsion_diffusion": ".train", "train_timewarp": ".train", "build_learned_bias": ".train",
    "resolve_torsions": ".train",
    "SamplingResult": ".sample", "sample_with_moves": ".sample", "sample_walkers": ".sample", "move_torsions": ".sample",
    "torsion_states_report": ".report", "format_torsion_report": ".report", "format_training_summary": ".report",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
