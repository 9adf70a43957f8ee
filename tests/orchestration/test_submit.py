"""`lmforge submit`'s arguments and hints, checked before anything reaches a cluster (the jobs themselves run
on tests/orchestration/test_cluster.py's two-node cluster)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_nodes import lmforge

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.unit
def test_requirements_name_a_file_or_lmforge(tmp_path):
    """``--requirements``: a file's packages (comments dropped), lmforge's own dependencies, or an error
    naming the missing file, before anything reaches a cluster."""
    from packaging.requirements import Requirement

    from orchestration.cli import _pip_requirements

    reqs = tmp_path / "reqs.txt"
    reqs.write_text("# pinned for the cluster\nnumpy>=1.26  # arrays\n\n--find-links /wheels\nrich\n")
    assert _pip_requirements(str(reqs)) == {
        "packages": ["numpy>=1.26", "--find-links /wheels", "rich"],
        "pip_check": False,
    }
    assert _pip_requirements(None) is None
    # lmforge's: the dependencies pyproject.toml declares, none of the extras'.
    listed = (REPO / "pyproject.toml").read_text().split("\ndependencies = [")[1].split("\n]")[0]
    declared = [Requirement(r) for r in re.findall(r'^    "([^"]+)",', listed, re.M)]
    assert len(declared) > 20
    assert [Requirement(r) for r in _pip_requirements("lmforge")["packages"]] == declared
    missing = lmforge(["submit", REPO / "configs" / "demo.yaml", "--requirements", tmp_path / "nope.txt"],
                      dict(os.environ), check=False)  # fmt: skip
    # The terminal's width wraps the message anywhere (a long path on a line of its own): compare without it.
    said = "".join(missing.stderr.split())
    assert missing.returncode == 2 and f"--requirements{tmp_path / 'nope.txt'}:nosuchfile" in said


@pytest.mark.unit
def test_a_job_that_lacks_a_module_says_which_and_how_to_add_it(tmp_path):
    from orchestration.cli import _missing_module_hint

    crashed = subprocess.run(
        [BIN / "python", "-c", "import lmforge_no_such_module"], capture_output=True, text=True
    )
    logs = "▶ clean (never ran)\n" + crashed.stderr
    assert "lmforge_no_such_module" in _missing_module_hint(logs, None)
    assert "--requirements lmforge" in _missing_module_hint(logs, None)
    assert "add it to the requirements file" in _missing_module_hint(logs, "reqs.txt")
    assert _missing_module_hint("▶ clean (never ran)\nValueError: bad\n", None) is None
