"""The examples run: each script's --tiny mode, in a subprocess, exits 0 and prints its result lines.

A script is skipped only when a framework it needs is not installed (checked
without importing it: TensorFlow alone takes seconds).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TIMEOUT = 240


def run_example(script: str, needs: tuple[str, ...]) -> str:
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{script} needs {', '.join(missing)}")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--tiny"], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=os.path.dirname(EXAMPLES))
    assert proc.returncode == 0, f"{script} --tiny exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def result_lines(stdout: str) -> dict[str, str]:
    return {line[:3]: line for line in stdout.splitlines() if line[:3] in ("(a)", "(b)", "(c)")}


@pytest.mark.timeout(TIMEOUT + 30)
def test_torch_digits_runs():
    lines = result_lines(run_example("torch_digits.py", ("torch", "sklearn", "PIL")))
    assert sorted(lines) == ["(a)", "(b)", "(c)"], lines
    for line in lines.values():
        assert line.rstrip().endswith("%") and " s " in line, line


@pytest.mark.timeout(TIMEOUT + 30)
def test_keras_tfdata_runs():
    lines = result_lines(run_example("keras_tfdata.py", ("tensorflow", "sklearn", "PIL")))
    assert sorted(lines) == ["(a)", "(b)"], lines
    for line in lines.values():
        assert line.rstrip().endswith("%") and " s " in line, line
