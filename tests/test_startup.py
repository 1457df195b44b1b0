"""Start-up (issue 14, item 5): help and refusals of bad input come before the heavy imports.

Timing asserts are flaky on a loaded machine, so these tests assert which heavy modules are *not* imported
(torch ~2.5 s, openmmtools ~2 s, matplotlib ~0.5-2 s, deeptime) after a command, in a fresh interpreter.
The measured times are in the issue's note; `python -X importtime -c "..."` reproduces them.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "openmmtools", "matplotlib", "deeptime")

_PROBE = """
import json, sys
{body}
print("MODULES=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""

_CLI = """
from openmm_confsample.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
print("CODE=" + str(code))
"""


def _probe(body: str, cwd) -> tuple[list[str], str, str]:
    run = subprocess.run([sys.executable, "-c", _PROBE.format(body=body, heavy=HEAVY)], capture_output=True,
                         text=True, cwd=cwd, timeout=300)
    modules = next(line for line in run.stdout.splitlines() if line.startswith("MODULES="))
    return json.loads(modules[len("MODULES="):]), run.stdout, run.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["--help"], 0, "COMMAND"),
    (["sample", "alanine-dipeptide-implicit", "--length-ps", "-1", "--model", "x.pt"], 2,
     "length_ps must be positive"),
    (["sample", "alanine-dipeptide-implicit", "--model", "no/such/model.pt"], 2, "not a shipped model"),
    (["train", "diffusion", "alanine-dipeptide-implicit", "--trajectories", "nope.dcd", "--out", "m.pt"], 2,
     "'nope.dcd' does not exist"),
    (["demo", "--seconds", "0"], 2, "seconds must be positive"),
    (["models"], 0, "alanine-dipeptide"),
    (["systems"], 0, "alanine-dipeptide-implicit"),
])
def test_commands_answer_before_heavy_imports(argv, code, message, tmp_path):
    modules, out, err = _probe(_CLI.format(argv=argv), tmp_path)
    assert f"CODE={code}" in out, out + err
    assert message in out + err
    assert modules == [], f"confsample {' '.join(argv)} imported {modules}"


def test_the_one_line_imports_only_what_its_path_needs(tmp_path):
    modules, _, _ = _probe("from openmm_confsample.moves import LearnedMoveReporter", tmp_path)
    assert modules == []
    # the torsion move needs torch (its model) and openmmtools (it is an MCMCMove), not plotting or Timewarp
    modules, out, _ = _probe("from openmm_confsample.moves import TorsionDiffusionMove, LearnedMoveReporter\n"
                             "print('TIMEWARP=' + str('openmm_confsample.models.timewarp' in sys.modules))", tmp_path)
    assert modules == ["openmmtools", "torch"] and "TIMEWARP=False" in out


@pytest.mark.parametrize("statement", [
    "import openmm_confsample.workflows",
    "from openmm_confsample.analysis import effective_sample_size, block_average_error",
    "from openmm_confsample.models import shipped_models, resolve_model_path",
    "from openmm_confsample.data.broadened import torsion_coverage",
    "from openmm_confsample.systems import get_system; get_system('alanine-dipeptide-implicit')",
])
def test_light_entry_points_stay_light(statement, tmp_path):
    modules, _, _ = _probe(statement, tmp_path)
    assert modules == [], f"{statement} imported {modules}"
