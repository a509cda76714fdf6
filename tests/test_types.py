"""mypy on the files configured in pyproject.toml ([tool.mypy]: the comm package, the running
average, the arena, the compatibility modules, the capture record, the op modules, the step
pipeline, the block's base class and saved-state record, the inverse kinds, the preconditioning,
the options, the engine, the optimisers, the capture, the factor statistics and the adaptive step
so far)."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_is_clean_on_the_configured_files(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
         "--cache-dir", str(tmp_path / "mypy_cache"), "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
