"""Output sets of run_md: claimed atomically, replaced all or nothing (issue 13, items 7 and 8)."""

import copy
import dataclasses
import glob
import os
import signal
import subprocess
import sys
import time

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import pytest

from openmm_confsample.cli import main
from openmm_confsample.data import md
from openmm_confsample.data.md import BiasRecord, load_trajectory, read_metadata, run_md
from openmm_confsample.data.outputs import OutputSet
from openmm_confsample.errors import ConfSampleError
from openmm_confsample.testing import four_atom_torsion_system

# Runs run_md on a serialized system until killed (a long run that the test interrupts).
_LONG_RUN = """
import sys
import openmm, openmm.app as app
from openmm_confsample.systems import system_from_openmm
from openmm_confsample.data.md import run_md
xml, pdb, prefix = sys.argv[1:4]
structure = app.PDBFile(pdb)
with open(xml) as handle:
    system = openmm.XmlSerializer.deserialize(handle.read())
molsys = system_from_openmm(system, structure.topology, structure.positions, torsions={})
run_md(molsys, prefix, 1e6, save_interval_ps=0.01, seed=1, progress=False)
"""


@pytest.fixture(scope="module")
def chain():
    return four_atom_torsion_system()


def _biased(molsys, group=5):
    """The chain with a torsion bias in its own force group (a stand-in for with_learned_bias, no torch)."""
    system = copy.deepcopy(molsys.system)
    force = openmm.CustomTorsionForce("2.0 * (1 + cos(theta))")
    force.addTorsion(0, 1, 2, 3, [])
    force.setForceGroup(group)
    system.addForce(force)
    return dataclasses.replace(molsys, system=system), BiasRecord(group, backend="custom")


def _snapshot(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if not name.endswith((".partial", ".lock"))}


def _complete_biased_set(chain, prefix):
    biased, record = _biased(chain)
    result = run_md(biased, str(prefix), 0.5, save_interval_ps=0.01, seed=3, progress=False, bias=record)
    assert sorted(os.listdir(prefix.parent)) == ["x.bias.npy", "x.dcd", "x.json", "x.pdb"]
    return result


def _start_long_run(chain, tmp_path, prefix):
    (tmp_path / "in").mkdir()
    xml, pdb = tmp_path / "in" / "chain.xml", tmp_path / "in" / "chain.pdb"
    xml.write_text(openmm.XmlSerializer.serialize(chain.system))
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(chain.topology, chain.positions_nm * 10.0, handle)  # PDBFile writes angstrom
    process = subprocess.Popen([sys.executable, "-c", _LONG_RUN, str(xml), str(pdb), str(prefix)],
                               stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run is inside its frame loop
        partial = glob.glob(f"{prefix}.dcd.*.partial")
        if partial and os.path.getsize(partial[0]) > 20_000:
            return process
        if process.poll() is not None:
            raise AssertionError(f"the long run exited early: {process.stderr.read().decode()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the long run did not start writing within 120 s")


def test_a_second_run_on_a_claimed_prefix_refuses_and_touches_nothing(tmp_path, chain):
    prefix = tmp_path / "x"
    _complete_biased_set(chain, prefix)
    before = _snapshot(tmp_path)
    with OutputSet(str(prefix), (".dcd",)):
        with pytest.raises(ConfSampleError, match=f"output prefix '{prefix}' is in use by another run"):
            run_md(chain, str(prefix), 0.1, save_interval_ps=0.01, progress=False)
    assert _snapshot(tmp_path) == before
    # the CLI says it in one line, exit code 2
    with OutputSet(str(prefix), (".dcd",)):
        assert main(["simulate", "alanine-dipeptide-vacuum", "--length-ps", "0.01", "--save-interval-ps", "0.01",
                     "--out", str(prefix), "--quiet"]) == 2
    assert _snapshot(tmp_path) == before
    run_md(chain, str(prefix), 0.1, save_interval_ps=0.01, progress=False)  # released: the prefix is free again


def test_concurrent_process_and_sigkill_leave_the_earlier_set_intact(tmp_path, chain):
    prefix = tmp_path / "out" / "x"
    out = prefix.parent
    earlier = _complete_biased_set(chain, prefix)
    before = _snapshot(out)
    process = _start_long_run(chain, tmp_path, prefix)
    try:
        # another process holds the prefix: this run refuses instead of writing into its files
        with pytest.raises(ConfSampleError, match="is in use by another run"):
            run_md(chain, str(prefix), 0.1, save_interval_ps=0.01, progress=False)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    # killed mid-run: the earlier set is byte for byte what it was, and self-consistent
    assert _snapshot(out) == before
    assert read_metadata(earlier.trajectory_path)["bias"]["energies"] == "x.bias.npy"
    assert earlier.load().n_frames == 50 == len(np.load(out / "x.bias.npy"))
    leftovers = set(os.listdir(out)) - set(before)
    assert leftovers and all(name.endswith((".partial", ".lock")) for name in leftovers)
    # the dead run's lock does not block the prefix; the new set replaces the old one whole
    result = run_md(chain, str(prefix), 0.2, save_interval_ps=0.01, seed=2, progress=False)
    assert sorted(os.listdir(out)) == ["x.dcd", "x.json", "x.pdb"]
    meta = read_metadata(result.trajectory_path)
    assert meta["bias"] is None and meta["n_frames"] == 20 and meta["run_id"] == result.run_id


def test_a_failed_rerun_replaces_nothing(tmp_path, chain, monkeypatch):
    prefix = tmp_path / "x"
    earlier = _complete_biased_set(chain, prefix)
    before = _snapshot(tmp_path)
    write_frame = md._write_frame
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write_frame(*args)

    monkeypatch.setattr(md, "_write_frame", failing)
    with pytest.raises(KeyboardInterrupt):
        run_md(chain, str(prefix), 0.1, save_interval_ps=0.01, progress=False, trajectory_format="xtc")
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # the earlier PDB, DCD, JSON and bias energies are all still there
    assert read_metadata(earlier.trajectory_path)["run_id"] == earlier.run_id
    assert not os.path.exists(tmp_path / "x.lock")
    # a finished unbiased rerun in the other format replaces the whole set, stale energies and DCD included
    result = run_md(chain, str(prefix), 0.1, save_interval_ps=0.01, progress=False, trajectory_format="xtc")
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.pdb", "x.xtc"]
    assert read_metadata(result.trajectory_path)["bias"] is None


def test_a_mixed_set_is_refused(tmp_path, chain):
    a = run_md(chain, str(tmp_path / "a"), 0.1, save_interval_ps=0.01, progress=False)
    b = run_md(chain, str(tmp_path / "b"), 0.2, save_interval_ps=0.01, progress=False)
    os.replace(b.trajectory_path, a.trajectory_path)  # what a kill in the middle of a commit could leave
    with pytest.raises(ConfSampleError, match="a.json.*recorded .* bytes for 'a.dcd' but it has .* bytes"):
        read_metadata(a.trajectory_path)


def test_bias_energies_come_from_the_recorded_force_group(tmp_path, chain):
    biased, record = _biased(chain)
    result = run_md(biased, str(tmp_path / "x"), 0.2, save_interval_ps=0.01, seed=3, progress=False, bias=record)
    frames = load_trajectory(result.trajectory_path, result.topology_path)
    phi = mdtraj.compute_dihedrals(frames, [[0, 1, 2, 3]])[:, 0].astype(float)
    np.testing.assert_allclose(np.load(tmp_path / "x.bias.npy"), 2.0 * (1 + np.cos(phi)), atol=1e-3)
    assert read_metadata(result.trajectory_path)["bias"] == {
        "path": None, "backend": "custom", "force_group": 5, "bias_factor": None, "energies": "x.bias.npy",
        "energy_unit": "kJ/mol"}
    with pytest.raises(ConfSampleError, match="force group 7 holds no force"):
        run_md(biased, str(tmp_path / "y"), 0.1, save_interval_ps=0.01, progress=False, bias=BiasRecord(7))
    with pytest.raises(ConfSampleError, match="with_learned_bias"):
        run_md(chain, str(tmp_path / "y"), 0.1, save_interval_ps=0.01, progress=False, bias="bias.pt")
