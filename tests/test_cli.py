"""The confsample command: help, the simulate/train/sample/reweight path, one-sentence errors."""

import json
import os

import mdtraj
import numpy as np
import pytest

from openmm_confsample.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("simulate", "train", "sample", "reweight"):
        assert command in out


def test_simulate_writes_trajectory_and_prints_throughput(tmp_path, capsys):
    prefix = tmp_path / "md"
    assert main(["simulate", "alanine-dipeptide-implicit", "--length-ps", "5", "--save-interval-ps", "0.5",
                 "--out", str(prefix), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ns/day" in out
    traj = mdtraj.load(f"{prefix}.dcd", top=f"{prefix}.pdb")
    assert traj.n_frames == 10
    phi = mdtraj.compute_phi(traj)[1]
    assert np.all(phi < 0)  # 5 ps from the extended structure stays in the phi < 0 basins
    assert json.load(open(f"{prefix}.json"))["n_frames"] == 10


@pytest.mark.parametrize("argv, message", [
    (["simulate", "alanine-tripeptide", "--quiet"], "neither a known system name"),
    (["simulate", "alanine-dipeptide-implicit", "--length-ps", "-1", "--quiet"], "length_ps must be positive"),
    (["simulate", "missing.pdb", "--quiet"], "PDB file 'missing.pdb' does not exist"),
    (["sample", "alanine-dipeptide-implicit", "--move", "diffusion", "--quiet"], "--model is required"),
    (["train", "diffusion", "alanine-dipeptide-implicit", "--trajectories", "nope.dcd", "--out", "m.pt"],
     "'nope.dcd' does not exist"),
])
def test_bad_input_is_one_sentence_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_train_then_sample_with_the_model(tmp_path, capsys, short_md):
    model = tmp_path / "diffusion.pt"
    assert main(["train", "diffusion", "alanine-dipeptide-implicit", "--trajectories", short_md.trajectory_path,
                 "--out", str(model), "--epochs", "2", "--quiet"]) == 0
    assert model.exists() and (tmp_path / "diffusion_loss.png").exists()
    prefix = tmp_path / "hybrid"
    assert main(["sample", "alanine-dipeptide-implicit", "--model", str(model), "--length-ps", "2",
                 "--move-interval", "100", "--save-interval-ps", "0.5", "--out", str(prefix), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "acceptance" in out
    summary = json.load(open(f"{prefix}.json"))
    assert summary["move_statistics"]["n_moves"] == 20 and summary["exact"] is True
    assert mdtraj.load(f"{prefix}.dcd", top=f"{prefix}.pdb").n_frames == 4
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]


def test_reweight_pipeline_command(tmp_path, capsys):
    from openmm_confsample.models import shipped_model_path

    out_dir = tmp_path / "rw"
    assert main(["reweight", "alanine-dipeptide-implicit", "--model", shipped_model_path(), "--n-samples", "20",
                 "--validate-ps", "0.5", "--validate-count", "2", "--out", str(out_dir), "--quiet"]) == 0
    for name in ("resampled.pdb", "resampled.dcd", "weights.csv", "summary.json", "validation.png"):
        assert (out_dir / name).exists(), name


def test_bias_command_writes_a_loadable_bias_and_its_rounds(tmp_path, capsys, short_md):
    from openmm_confsample.bias import LearnedTorsionBias

    out = tmp_path / "bias.pt"
    assert main(["bias", "alanine-dipeptide-implicit", "--trajectories", short_md.trajectory_path, "--out", str(out),
                 "--rounds", "1", "--round-ps", "2", "--train-minutes", "0.05", "--backend", "pythonforce",
                 "--quiet"]) == 0
    assert "bias round 1" in capsys.readouterr().out
    bias = LearnedTorsionBias.load(out)
    assert bias.n_torsions == 2 and bias.bias_factor == 6.0 and bias.cap_kJ == pytest.approx(20.0 * bias.kT)
    summary = json.load(open(tmp_path / "bias.json"))
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["unbiased_frames"] == 80 and summary["rounds"][0]["training_frames"] == 80  # 40 ps, 0.5 ps frames
    assert summary["rounds"][0]["frames"] == 40  # 2 ps of biased MD, 0.05 ps frames
    assert bias.metadata["refinement"][-1]["round"] == 1
    # the bias drives `simulate --bias`, which writes each frame's bias energy beside the trajectory
    prefix = tmp_path / "biased"
    assert main(["simulate", "alanine-dipeptide-implicit", "--length-ps", "4", "--save-interval-ps", "0.1",
                 "--bias", str(out), "--bias-backend", "pythonforce", "--out", str(prefix), "--quiet"]) == 0
    assert "bias energies" in capsys.readouterr().out
    assert np.load(f"{prefix}.bias.npy").shape == (40,)
    assert json.load(open(f"{prefix}.json"))["bias"]["path"] == str(out)
    # ... and its trajectory trains a Timewarp flow in internal coordinates that remembers the bias
    from openmm_confsample.models.timewarp import TimewarpModel

    model_path = tmp_path / "timewarp.pt"
    assert main(["train", "timewarp", "alanine-dipeptide-implicit", "--trajectories", f"{prefix}.dcd",
                 "--coordinates", "internal", "--tau-ps", "0.5", "--epochs", "1", "--out", str(model_path),
                 "--quiet"]) == 0
    assert "n_pairs_train" in capsys.readouterr().out
    model = TimewarpModel.load(model_path)
    assert model.config.internal and model.tau_ps == 0.5 and len(model.blocks) == 4
    assert model.metadata["data_bias"] == [str(out)]
    assert main(["train", "timewarp", "alanine-dipeptide-implicit", "--trajectories", f"{prefix}.dcd",
                 "--coordinates", "internal", "--coupling-layers", "0", "--tau-ps", "0.5", "--epochs", "0",
                 "--out", str(model_path), "--quiet"]) == 0
    assert len(TimewarpModel.load(model_path).blocks) == 0
    assert main(["train", "timewarp", "alanine-dipeptide-implicit", "--trajectories", f"{prefix}.dcd",
                 "--coupling-layers", "0", "--out", str(model_path), "--quiet"]) == 2
    assert "n_coupling_layers must be an integer >= 1" in capsys.readouterr().err
