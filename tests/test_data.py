import json
import os

import mdtraj
import numpy as np
import pytest

from openmm_confsample.data.datasets import block_split, lag_in_frames, lagged_pairs, torsion_angles
from openmm_confsample.data.md import dcd_header_frames, load_trajectory, read_metadata, run_md
from openmm_confsample.errors import ConfSampleError


def test_md_writes_loadable_trajectory_and_metadata(short_md, ala_implicit):
    traj = short_md.load()
    assert traj.n_frames == 80 and traj.n_atoms == 22
    meta = read_metadata(short_md.trajectory_path)
    assert meta["save_interval_ps"] == 0.5 and meta["seed"] == 7 and meta["temperature_K"] == 300.0
    assert meta["topology_fingerprint"] == ala_implicit.fingerprint()
    assert short_md.ns_per_day > 0
    assert not [f for f in os.listdir(os.path.dirname(short_md.trajectory_path)) if f.endswith(".partial")]
    # 300 K alanine dipeptide started in the extended basin stays at phi < 0 in 40 ps
    phi = torsion_angles(traj, ala_implicit)[:, 0]
    assert np.all(phi < 0.2)
    # bonds stay physical: CA-C bond length within 0.02 nm of 0.152
    ca_c = np.linalg.norm(traj.xyz[:, 8] - traj.xyz[:, 14], axis=1)
    assert np.all(np.abs(ca_c - 0.152) < 0.02)


def test_same_seed_same_trajectory(tmp_path, ala_implicit):
    a = run_md(ala_implicit, str(tmp_path / "a"), 2.0, save_interval_ps=0.5, seed=0, progress=False).load()
    b = run_md(ala_implicit, str(tmp_path / "b"), 2.0, save_interval_ps=0.5, seed=0, progress=False).load()
    np.testing.assert_allclose(a.xyz, b.xyz, atol=1e-5)


def test_torsion_angles_match_mdtraj(short_md, ala_implicit):
    traj = short_md.load()
    angles = torsion_angles(traj, ala_implicit)
    _, phi = mdtraj.compute_phi(traj)
    _, psi = mdtraj.compute_psi(traj)
    np.testing.assert_allclose(angles, np.hstack([phi, psi]), atol=1e-6)


def test_pairs_are_lagged_by_tau(short_md):
    traj = short_md.load()
    pairs = lagged_pairs(traj, tau_ps=1.5, save_interval_ps=0.5)
    assert len(pairs) == traj.n_frames - 3
    np.testing.assert_allclose(pairs.x0[5], traj.xyz[5])
    np.testing.assert_allclose(pairs.x1[5], traj.xyz[8])
    assert pairs.atom_labels[8] == "ALA:CA"
    two = lagged_pairs([traj[:30], traj[30:]], tau_ps=1.0, save_interval_ps=0.5)
    assert len(two) == 28 + 48  # no pair crosses the trajectory boundary
    np.testing.assert_allclose(two.x1[27], traj.xyz[29])


def test_tau_must_be_multiple_of_save_interval():
    assert lag_in_frames(2.0, 0.5) == 4
    with pytest.raises(ConfSampleError, match="not a multiple"):
        lag_in_frames(0.75, 0.5)


def test_block_split_is_contiguous_and_disjoint():
    train, val = block_split(1000, val_fraction=0.2, n_blocks=10, seed=1, gap=3)
    assert len(np.intersect1d(train, val)) == 0
    assert len(val) == 200
    runs = np.split(val, np.nonzero(np.diff(val) != 1)[0] + 1)
    assert all(len(r) >= 100 for r in runs)  # whole blocks of 100, never interleaved
    for r in runs:  # the gap keeps training frames 3 away from each validation block
        assert not np.any((train >= r[0] - 3) & (train <= r[-1] + 3))


@pytest.mark.parametrize("kwargs, message", [
    ({"length_ps": 0.0}, "length_ps must be positive"),
    ({"length_ps": 1.0, "save_interval_ps": -1.0}, "save_interval_ps must be positive"),
    ({"length_ps": 1.0, "save_interval_ps": 0.0015}, "not a whole number"),
    ({"length_ps": 1.0, "trajectory_format": "pdb"}, "trajectory_format"),
])
def test_md_bad_arguments(tmp_path, ala_implicit, kwargs, message):
    with pytest.raises(ConfSampleError, match=message):
        run_md(ala_implicit, str(tmp_path / "x"), progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_trajectory_with_wrong_atom_count(tmp_path, short_md):
    traj = short_md.load()
    sub = traj.atom_slice(range(20))
    sub.save_dcd(str(tmp_path / "sub.dcd"))
    with pytest.raises(ConfSampleError, match="has 20 atoms but topology file .* has 22"):
        load_trajectory(str(tmp_path / "sub.dcd"), short_md.topology_path)
    with pytest.raises(ConfSampleError, match="does not exist"):
        load_trajectory(str(tmp_path / "missing.dcd"), short_md.topology_path)


def test_xtc_and_hdf5_load(tmp_path, ala_implicit):
    result = run_md(ala_implicit, str(tmp_path / "x"), 1.0, save_interval_ps=0.25, trajectory_format="xtc",
                    progress=False)
    traj = load_trajectory(result.trajectory_path, ala_implicit)
    assert traj.n_frames == 4
    traj.save_hdf5(str(tmp_path / "x.h5"))
    assert load_trajectory(str(tmp_path / "x.h5")).n_frames == 4


def _truncated_copy(short_md, tmp_path, n_frames_kept):
    """short_md's DCD cut inside frame ``n_frames_kept + 1``, its header still claiming 80 (a killed writer)."""
    data = open(short_md.trajectory_path, "rb").read()
    frame_bytes = 3 * (4 + 22 * 4 + 4)  # x, y and z records of 22 float32, no unit cell
    header_bytes = len(data) - 80 * frame_bytes
    path = tmp_path / "cut.dcd"
    path.write_bytes(data[:header_bytes + n_frames_kept * frame_bytes + 5])
    return str(path)


def test_truncated_dcd_is_refused_unless_allowed(tmp_path, short_md, ala_implicit):
    path = _truncated_copy(short_md, tmp_path, 30)
    with pytest.raises(ConfSampleError, match=r"'.*cut.dcd' is truncated: its header claims 80 frames but it holds 30"):
        load_trajectory(path, short_md.topology_path)
    assert dcd_header_frames(path) == 80
    with pytest.warns(UserWarning, match="claims 80 frames; using the 30 frames"):
        traj = load_trajectory(path, ala_implicit, allow_truncated=True)
    assert traj.n_frames == 30
    np.testing.assert_allclose(traj.xyz, short_md.load().xyz[:30])
    assert load_trajectory(short_md.trajectory_path, ala_implicit).n_frames == 80  # a whole file passes


def test_training_refuses_a_truncated_dcd(tmp_path, short_md, ala_implicit):
    from openmm_confsample.cli import build_parser
    from openmm_confsample.workflows import train_torsion_diffusion

    path = _truncated_copy(short_md, tmp_path, 30)
    with pytest.raises(ConfSampleError, match="truncated"):
        train_torsion_diffusion(ala_implicit, [path], str(tmp_path / "m.pt"), max_epochs=1, max_minutes=0.01,
                                progress=False, plot=False)
    assert not (tmp_path / "m.pt").exists()
    for command in (["train", "diffusion"], ["bias"]):
        args = build_parser().parse_args([*command, "alanine-dipeptide-implicit", "--trajectories", path, "--out",
                                          "m.pt", "--allow-truncated"])
        assert args.allow_truncated


def test_angstrom_positions_are_refused_where_they_enter(tmp_path, ala_implicit):
    from openmm import unit
    from openmmtools import cache, states

    from openmm_confsample.geometry.torsions import TorsionSet
    from openmm_confsample.moves.mcmc import LearnedMCMCMove
    from openmm_confsample.moves.proposals import VonMisesTorsionProposal
    from openmm_confsample.systems import system_from_openmm

    angstrom = ala_implicit.positions_nm * 10.0
    with pytest.raises(ConfSampleError, match=r"positions of system .user-system. look like angstrom \(median bond "
                                              r"1.* nm vs 0.1.* nm in the force field\); pass nm or a Quantity"):
        system_from_openmm(ala_implicit.system, ala_implicit.topology, angstrom)
    with pytest.raises(ConfSampleError, match="positions_nm look like angstrom"):
        run_md(ala_implicit, str(tmp_path / "x"), 1.0, positions_nm=angstrom, progress=False)
    assert not list(tmp_path.iterdir())
    # a Quantity in angstrom is converted, not refused
    system_from_openmm(ala_implicit.system, ala_implicit.topology, angstrom * unit.angstrom)
    # openmmtools sampler states hold plain numbers as dimensionless: checked once per context
    torsions = TorsionSet(ala_implicit.bonds, ala_implicit.n_atoms, ala_implicit.torsion_array)
    move = LearnedMCMCMove(VonMisesTorsionProposal(torsions, kappa=0.5), seed=1)
    context_cache = cache.ContextCache(platform=ala_implicit.create_context().getPlatform())
    with pytest.raises(ConfSampleError, match="sampler state's positions look like angstrom"):
        move.apply(ala_implicit.thermodynamic_state(), states.SamplerState(angstrom), context_cache)
    move.apply(ala_implicit.thermodynamic_state(), states.SamplerState(ala_implicit.positions_nm), context_cache)


def test_celsius_temperatures_are_refused(tmp_path, ala_implicit):
    from openmm_confsample.systems import get_system

    with pytest.raises(ConfSampleError, match="temperature of 27 K is outside 50-2000 K"):
        run_md(ala_implicit, str(tmp_path / "x"), 1.0, temperature=27, progress=False)
    with pytest.raises(ConfSampleError, match="27 K is outside"):
        get_system("alanine-dipeptide-vacuum", temperature=27)
    with pytest.raises(ConfSampleError, match="27 K is outside"):
        ala_implicit.thermodynamic_state(27)
    assert not list(tmp_path.iterdir())


def test_run_md_takes_a_biased_system_without_importing_bias():
    import subprocess
    import sys

    code = ("import sys, openmm_confsample.data.md, openmm_confsample.cli; "
            "print(any(m.startswith('openmm_confsample.bias') or m == 'torch' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
