"""Scale-out with MPI (issue 17): rank set-up, walkers, replica exchange with learned moves under ``mpiexec -n 2``.

The MPI tests start ``mpiexec -n 2 python tests/mpi_jobs/<job>.py`` in a subprocess and read the line
``RESULT {json}`` its rank 0 prints. They skip, saying why, where mpi4py or mpiexec is missing
(``pip install -e '.[mpi]'``); CI sets CONFSAMPLE_REQUIRE_MPI=1, which turns that skip into a failure.
Exactness is judged as on one process: the 300 K torsion histogram of the closed-form 4-atom chain against
its exact bin probabilities (``testing.chi_square_test``, p > 1e-3).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from openmm_confsample.errors import ConfSampleError
from openmm_confsample.geometry.torsions import TorsionSet
from openmm_confsample.moves.mcmc import LearnedMCMCMove
from openmm_confsample.moves.proposals import VonMisesTorsionProposal
from openmm_confsample.parallel import (WalkersResult, chain_summary, run_walkers, spawn_seeds, split_r_hat,
                                        sum_statistics)
from openmm_confsample.parallel import mpi
from openmm_confsample.testing import chi_square_test, four_atom_torsion_system, torsion_bin_probabilities

EDGES = np.linspace(-np.pi, np.pi, 13)
JOBS = Path(__file__).parent / "mpi_jobs"
# CI installs the [mpi] extra and sets this, so that a broken MPI install fails these tests instead of skipping.
REQUIRE_MPI = os.environ.get("CONFSAMPLE_REQUIRE_MPI") == "1"


def _mpi_status() -> tuple[str | None, str]:
    """(path of mpiexec, '') when MPI jobs can run here, else (None, why not)."""
    if importlib.util.find_spec("mpi4py") is None:
        return None, "mpi4py is not installed (pip install -e '.[mpi]')"
    beside_python = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        return None, "no mpiexec on PATH (pip install -e '.[mpi]' brings mpich's)"
    return mpiexec, ""


MPIEXEC, MPI_MISSING = _mpi_status()
# mpiexec (MPICH's hydra) binds no rank to cores, so each of 2 ranks on this node takes half the cores
SHARE_OF_TWO = max(1, len(os.sched_getaffinity(0)) // 2)
needs_mpi = pytest.mark.skipif(MPIEXEC is None and not REQUIRE_MPI, reason=MPI_MISSING)


def _mpi_command(job: str, *args) -> list[str]:
    assert MPIEXEC is not None, f"CONFSAMPLE_REQUIRE_MPI=1 but MPI cannot run here: {MPI_MISSING}"
    return [MPIEXEC, "-n", "2", sys.executable, str(JOBS / job), *map(str, args)]


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, "the job printed no RESULT line"
    return json.loads(lines[-1][len("RESULT "):])


def _run_mpi_job(job: str, *args, timeout: float = 240.0) -> dict:
    run = subprocess.run(_mpi_command(job, *args), capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{job} exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return _result(run.stdout)


def _torsion_move(chain, seed) -> LearnedMCMCMove:
    torsions = TorsionSet(chain.bonds, chain.n_atoms, chain.torsion_array)
    return LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=2.0, mu=0.7, mode="random_walk"), seed=seed)


def _load_job(name: str):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- without MPI ------------------------------------------------------------------------------------------

def test_seed_streams_do_not_depend_on_how_many_are_drawn():
    first = [np.random.default_rng(s).integers(2**62, size=3).tolist() for s in spawn_seeds(7, 3)]
    again = [np.random.default_rng(s).integers(2**62, size=3).tolist() for s in spawn_seeds(7, 8)[:3]]
    assert first == again
    assert len({tuple(f) for f in first}) == 3
    assert mpi.shared_seed(None) != mpi.shared_seed(None)  # None draws entropy (rank 0's, broadcast under MPI)
    with pytest.raises(ConfSampleError, match="seed must be a non-negative integer"):
        mpi.shared_seed(-1)


def test_a_launch_without_mpi4py_is_refused(monkeypatch):
    monkeypatch.setattr(mpi.mpiplus, "get_mpicomm", lambda: None)
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(ConfSampleError, match=r"started by an MPI launcher \(PMI_SIZE=4\) but mpi4py"):
        mpi.get_comm()
    monkeypatch.setenv("PMI_SIZE", "1")
    assert mpi.get_comm() is None


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    class FakePlatform:
        defaults = {}

        def setPropertyDefaultValue(self, name, value):
            self.defaults[name] = value

    platform = FakePlatform()
    monkeypatch.setattr(mpi, "_available_platforms", lambda: ["Reference", "CPU", "OpenCL", "CUDA"])
    monkeypatch.setattr(mpi.openmm.Platform, "getPlatformByName", lambda name: platform)
    monkeypatch.setattr(mpi, "_gpu_count", lambda: 2)
    config = mpi.RankConfig(rank=5, size=8, local_rank=3, local_size=4, n_threads=1, seed=0)
    mpi._choose_device(config, None)  # local rank 3 of 4, 2 GPUs
    assert (config.platform_name, config.device_index, platform.defaults) == ("CUDA", 1, {"DeviceIndex": "1"})
    assert config.notes == ["4 ranks share 2 GPU(s) on this node; one rank per GPU is the usual layout."]
    monkeypatch.setattr(mpi, "_gpu_count", lambda: 0)  # e.g. OpenCL on a CPU: not chosen by itself
    config = mpi.RankConfig(rank=0, size=1, local_rank=0, local_size=1, n_threads=2, seed=0)
    mpi._choose_device(config, None)
    assert config.platform_name is None and config.device_index is None
    with pytest.raises(ConfSampleError, match="OpenMM platform 'HIP' is not available here"):
        mpi._choose_device(config, "HIP")


def test_chain_diagnostics():
    rng = np.random.default_rng(3)
    agree = [rng.random(4000) < 0.3 for _ in range(3)]
    summary = chain_summary(agree)
    assert summary["ess"] == pytest.approx(sum(c["ess"] for c in summary["per_chain"]))
    assert abs(summary["mean"] - 0.3) < 4 * summary["error"]
    assert summary["r_hat"] < 1.01
    # each walker stuck in the basin it started in: R-hat says so
    stuck = [np.full(1000, 1.0) - (rng.random(1000) < 0.05), rng.random(1000) < 0.05]
    assert split_r_hat(stuck) > 2.0
    assert chain_summary([np.ones(100), np.ones(100)])["r_hat"] is None  # undefined, not 1
    total = sum_statistics([{"n_proposed": 4, "n_accepted": 1, "acceptance_rate": 0.25, "exact": True},
                            {"n_proposed": np.int64(6), "n_accepted": 4, "acceptance_rate": 0.66}])
    assert total == {"n_proposed": 10, "n_accepted": 5, "acceptance_rate": 0.5}


def test_sampler_copies_of_a_learned_move_draw_distinct_streams(tmp_path):
    """openmmtools deep-copies a SequenceMove through its __getstate__: every state's copy of the learned
    move restores the same generator state (the negative control); the package's samplers key them apart."""
    from openmm import unit
    from openmmtools import mcmc, multistate

    from openmm_confsample.parallel.replica import MPIReplicaExchangeSampler, distinct_streams

    chain = four_atom_torsion_system()
    states = [chain.thermodynamic_state(t) for t in (300.0, 330.0, 360.0)]
    first_draws = {}
    for sampler_class in (multistate.ReplicaExchangeSampler, MPIReplicaExchangeSampler):
        moves = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=5, timestep=1.0 * unit.femtosecond),
                                   _torsion_move(chain, seed=7)])
        sampler = sampler_class(mcmc_moves=moves, number_of_iterations=1)
        reporter = multistate.MultiStateReporter(str(tmp_path / f"{sampler_class.__name__}.nc"))
        sampler.create(states, chain.sampler_state(), reporter)
        if sampler_class is MPIReplicaExchangeSampler:  # what its _propagate_replicas does first
            assert distinct_streams(sampler._mcmc_moves, rank=0) == 3
            assert distinct_streams(sampler._mcmc_moves, rank=0) == 0  # once per copy
        engines = [m.move_list[1].engine for m in sampler._mcmc_moves]
        first_draws[sampler_class.__name__] = {copy.deepcopy(e.rng).random() for e in engines}
        reporter.close()
    assert len(first_draws["ReplicaExchangeSampler"]) == 1
    assert len(first_draws["MPIReplicaExchangeSampler"]) == 3


def test_walkers_on_one_process_survive_a_failing_walker(tmp_path):
    chain = four_atom_torsion_system()

    def move_factory(walker, generator):
        if walker == 1:
            raise ValueError("no model for walker 1")
        return _torsion_move(chain, seed=generator)

    result = run_walkers(chain, move_factory, 3, 1.0, tmp_path, seed=0, segment_ps=0.05)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == result.summary
    assert result.failed == {1: "ValueError: no model for walker 1"}
    assert summary["failed"] == [1] and "Traceback" in summary["walkers"][1]["traceback"]
    assert [w["n_frames"] for w in summary["walkers"]] == [20, 0, 20]
    assert sorted(os.listdir(tmp_path)) == ["summary.json"] + [f"walker_{i:03d}{s}" for i in (0, 2)
                                                               for s in (".dcd", ".json", ".npz", ".pdb")]
    assert result.torsions(2)["phi"].shape == (20,)
    assert summary["move_statistics"]["n_proposed"] == 40
    phi_positive = summary["indicators"]["phi > 0"]
    assert len(phi_positive["per_chain"]) == 2 and 0.0 <= phi_positive["mean"] <= 1.0
    with pytest.raises(ConfSampleError, match="all 1 walkers failed \\(walker 0: ValueError"):
        run_walkers(chain, lambda walker, generator: move_factory(1, generator), 1, 0.1, tmp_path / "none",
                    seed=0, segment_ps=0.05)
    assert (tmp_path / "none" / "summary.json").exists()
    with pytest.raises(ConfSampleError, match="indicator 'phi' must be a function"):
        run_walkers(chain, None, 1, 0.1, tmp_path / "bad", segment_ps=0.05, indicators={"phi": "phi > 0"})
    with pytest.raises(ConfSampleError, match=r"indicator 'first' returned shape \(1,\) for 2 frames"):
        run_walkers(chain, None, 1, 0.1, tmp_path / "bad", segment_ps=0.05,
                    indicators={"first": lambda torsions: torsions["phi"][:1]})


# --- under mpiexec -n 2 ----------------------------------------------------------------------------------

@needs_mpi
def test_replica_exchange_with_a_learned_move_is_exact_under_mpi(tmp_path):
    result = _run_mpi_job("replica_exchange_exactness.py", tmp_path, 200)
    assert result["n_ranks"] == 2 and result["n_threads"] == SHARE_OF_TWO  # (1 on 2 cores)
    test = chi_square_test(result["phi_300K"], EDGES, torsion_bin_probabilities(EDGES))
    assert test.p_value > 1e-3, test
    # every state's learned move counted once per iteration (8 proposals), on both ranks alike
    assert result["n_proposed_by_rank"] == [[1600] * 4, [1600] * 4]
    assert result["storage_open_by_rank"] == [True, False]  # storage written by rank 0 only
    assert result["reused_stream_states"] == 0
    assert result["control_reused_stream_states"] > 0  # openmmtools' own sampler replays streams


@needs_mpi
def test_walkers_under_mpi_are_exact_and_match_one_process(tmp_path):
    result = _run_mpi_job("walkers_exactness.py", tmp_path / "mpi", 30.0)
    assert result["n_ranks"] == 2 and result["threads_by_rank"] == [SHARE_OF_TWO] * 2
    assert [w["rank"] for w in result["walkers"]] == [0, 1, 0]
    assert result["failed"] == [2] and "injected failure" in result["walkers"][2]["error"]
    summary_path = tmp_path / "mpi" / "summary.json"
    mpi_run = WalkersResult(json.loads(summary_path.read_text()), str(summary_path), str(tmp_path / "mpi"))
    phi = np.concatenate([mpi_run.torsions(w)["phi"] for w in (0, 1)])
    test = chi_square_test(phi, EDGES, torsion_bin_probabilities(EDGES, temperature_K=300.0))
    assert test.p_value > 1e-3, test
    # the walkers' streams do not depend on the ranks: one process draws the same trajectories
    serial = _load_job("walkers_exactness").run_job(str(tmp_path / "serial"), 30.0)
    for walker in (0, 1):
        np.testing.assert_array_equal(serial.torsions(walker)["phi"], mpi_run.torsions(walker)["phi"])


def _wait_gone(pids, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as handle:
                    if handle.read().split(")")[-1].split()[0] == "Z":  # a zombie runs nothing
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"process {pid} of the killed job is still running")


@needs_mpi
def test_parallel_tempering_resumes_after_sigkill_under_mpi(tmp_path):
    storage = tmp_path / "pt.nc"
    job = subprocess.Popen(_mpi_command("parallel_tempering_resume.py", storage, 8), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pids, output = [job.pid], []
    try:
        deadline = time.monotonic() + 180.0
        for line in job.stdout:
            output.append(line)
            if line.startswith("PIDS "):
                pids += [int(p) for p in line.split()[1:]]
            if line.startswith("ITERATION ") and int(line.split()[1]) >= 3 or time.monotonic() > deadline:
                break
    finally:  # SIGKILL the whole job as a scheduler does: mpiexec and each rank (hydra gives each its own session)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait(timeout=30)
    assert any(line.startswith("ITERATION 3") for line in output), "".join(output)[-3000:]
    _wait_gone(pids[1:])
    result = _run_mpi_job("parallel_tempering_resume.py", storage, 8, "--resume")
    resumed_at = result["resumed_at"]
    assert 3 <= resumed_at < 8 and result["iteration"] == 8
    # statistics restored with the sampler: 2 proposals per state per iteration (the moves are stored after the
    # sampler states, so a kill between the two can leave them one iteration ahead of the checkpoint)
    assert set(result["n_proposed_at_resume"]) <= {2 * resumed_at, 2 * resumed_at + 2}
    final = result["n_proposed_by_rank"]
    assert final[0] == final[1] and set(final[0]) == {result["n_proposed_at_resume"][0] + 2 * (8 - resumed_at)}
    assert result["model_loads_by_rank"] == [1, 1]  # each rank loads the checkpoint once, by the stored path


@needs_mpi
def test_ncmc_and_fragment_moves_in_replica_exchange_under_mpi(tmp_path):
    """Issue 17: the NCMC (issue 16) and fragment-local (issue 15) moves run in MPIReplicaExchangeSampler under
    mpiexec -n 2, with the moves' statistics gathered to every rank and storage written by rank 0."""
    result = _run_mpi_job("ncmc_and_fragment_moves.py", tmp_path, 4)
    assert result["n_ranks"] == 2
    first, second = result["by_rank"]
    for kind, proposals_per_iteration in (("ncmc", 1), ("fragment", 2)):
        assert first[kind]["n_proposed"] == second[kind]["n_proposed"]  # the same statistics on every rank
        assert first[kind]["n_proposed"] == [4 * proposals_per_iteration] * 2  # each replica's, not rank 0's only
        assert first[kind]["finite"] and second[kind]["finite"]
        assert first[kind]["stored_iterations"] == 4 and second[kind]["stored_iterations"] is None
    assert first["ncmc"]["ncmc_protocols"] == [4, 4]  # one protocol per iteration per replica
