"""The architecture rules of docs/ARCHITECTURE.md ("Layers"), checked on the real source and import graph."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "ingestion", "cleaning", "training", "evaluation", "orchestration"]
STAGE_PACKAGES = ["core", "ingestion", "cleaning", "training", "evaluation"]


def direct_importers(top_level: str) -> list[str]:
    """Project files with an import statement of ``top_level`` (or a submodule of it)."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                if any(n.split(".")[0] == top_level for n in names):
                    found.append(str(path.relative_to(ROOT)))
                    break
    return found


def test_only_the_engine_imports_deepspeed():
    assert direct_importers("deepspeed") == ["training/engine.py"]


def test_only_orchestration_imports_ray_and_mlflow():
    for lib in ("ray", "mlflow"):
        assert all(p.startswith("orchestration/") for p in direct_importers(lib)), lib


def test_stage_packages_load_without_ray():
    modules = [
        str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
        for pkg in STAGE_PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if p.stem != "__init__"
    ]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps('ray' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False


def test_the_command_line_and_the_config_load_without_the_heavy_libraries():
    """`lmforge --help` / `validate` start in about a second: the CLI and every config model import without
    torch, transformers, DeepSpeed, MLflow or Ray (each loads where it is used: 7 s of imports before)."""
    code = (
        "import json, sys\n"
        "import orchestration.cli, orchestration.config, training.config, evaluation.config\n"
        "heavy = ('torch', 'transformers', 'deepspeed', 'mlflow', 'ray')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


LAYERS = ["orchestration", "evaluation", "training", "cleaning", "ingestion", "core"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def test_the_layers_contract_holds():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert [c["layers"] for c in contracts if c["type"] == "layers"] == [LAYERS]
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_back_import_breaks_the_contract(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "training" / "back.py").write_text("from orchestration.config import PipelineConfig\n")
    done = _lint_imports(tmp_path)
    assert done.returncode == 1
    assert "training.back -> orchestration.config" in done.stdout


def test_the_engine_stays_small_and_no_orchestration_function_is_long():
    """docs/ARCHITECTURE.md, "The engine": orchestration/pipeline.py under 300 lines, knowing no stage by name
    (no stage name as a string in it); no function of orchestration/ over 60 lines."""
    engine = (ROOT / "orchestration" / "pipeline.py").read_text()
    assert len(engine.splitlines()) < 300
    strings = {
        n.value
        for n in ast.walk(ast.parse(engine))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    stages = {"crawl", "clean", "dedup", "tokenize", "train", "evaluate", "labeled", "finetune"}
    assert not strings & stages, strings & stages
    long = [
        f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted((ROOT / "orchestration").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60
    ]
    assert long == []
