"""Every Python snippet of the README runs exactly as printed; the one-line script's outputs are checked.

Each ```python block is run on its own, in a fresh interpreter and an empty directory, as a user would paste
it; the one-line block is followed by checks of what its reporters wrote (the checks are appended to the
script, the snippet itself is not changed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SNIPPETS = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
ONE_LINE = ('simulation.reporters.append(LearnedMoveReporter(TorsionDiffusionMove("alanine-dipeptide", simulation), '
            'interval=500))')

ONE_LINE_CHECKS = '''
import mdtraj, numpy as np
from openmm import LangevinMiddleIntegrator
frames = mdtraj.load_dcd("trajectory.dcd", top=mdtraj.Topology.from_openmm(pdb.topology))
assert frames.n_frames == 20, frames.n_frames
rows = [line for line in open("log.csv") if not line.startswith("#")]
assert len(rows) == 20, len(rows)
temperatures = np.array([float(row.split(",")[2]) for row in rows])
# 22 atoms: one row's temperature spreads by 18 % (a row outside 150-500 K in 2 % of runs); the mean of 20 by 4 %
assert np.all(np.isfinite(temperatures)) and 250 < temperatures.mean() < 350, temperatures
statistics = simulation.reporters[-1].statistics
assert statistics["n_moves"] == 40 and statistics["n_proposed"] == 40, statistics
assert 0 < statistics["n_accepted"] < 40 and statistics["exact"], statistics
restored = app.Simulation(pdb.topology, system, LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                                         1 * unit.femtosecond))
restored.loadCheckpoint("state.chk")
saved = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
loaded = restored.context.getState(getPositions=True).getPositions(asNumpy=True)
assert np.allclose(saved._value, loaded._value), "checkpoint does not restore the positions"
print("one-line checks passed")
'''


def _run(code: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_the_one_line_snippet():
    assert SNIPPETS, "no python snippets found in README.md"
    assert sum(ONE_LINE in snippet for snippet in SNIPPETS) == 1


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_printed(index, tmp_path):
    snippet = SNIPPETS[index]
    code = snippet + ONE_LINE_CHECKS if ONE_LINE in snippet else snippet
    result = _run(code, tmp_path)
    assert result.returncode == 0, f"README snippet {index} failed:\n{snippet}\n--- stderr ---\n{result.stderr[-3000:]}"
    if ONE_LINE in snippet:
        assert "one-line checks passed" in result.stdout
