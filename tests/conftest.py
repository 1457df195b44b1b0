import os

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def ala_implicit():
    from openmm_confsample.systems import get_system

    return get_system("alanine-dipeptide-implicit")


@pytest.fixture(scope="session")
def short_md(tmp_path_factory, ala_implicit):
    """A 40 ps alanine-dipeptide MD run (0.5 ps frames) shared by the data tests."""
    from openmm_confsample.data.md import run_md

    out = tmp_path_factory.mktemp("md") / "ala"
    return run_md(ala_implicit, str(out), length_ps=40.0, save_interval_ps=0.5, seed=7, progress=False)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small models on a 2-core machine: torch threads fight each other (measured 20x slower with 2)."""
    import torch

    torch.set_num_threads(1)
