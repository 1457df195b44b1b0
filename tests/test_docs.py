"""The docstring examples are executed: every module's doctests run here, so an example that no longer works fails CI.

Examples that cannot run in a test (they need a trained checkpoint the user names, or a long run) carry
``# doctest: +SKIP``; everything else runs as written, in a temporary working directory.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import openmm_confsample

MODULES = sorted(info.name for info in pkgutil.walk_packages(openmm_confsample.__path__, "openmm_confsample."))


def _examples(module) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [test for test in finder.find(module) if test.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for test in _examples(module):
        result = runner.run(test, out=failures.append)
        assert result.failed == 0, f"docstring example of {test.name} failed:\n{''.join(failures)}"


def test_the_package_has_runnable_examples():
    """The test above cannot pass by finding nothing: the package's docstrings hold dozens of runnable examples."""
    runnable = 0
    for name in MODULES:
        for test in _examples(importlib.import_module(name)):
            runnable += sum(1 for example in test.examples if not example.options.get(doctest.SKIP))
    assert runnable >= 30, f"only {runnable} runnable docstring examples were found"
