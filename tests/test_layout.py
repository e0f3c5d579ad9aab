"""The package's layout rules hold: import-linter's contracts (and that they catch a leak), the
results side loads without torch or matplotlib, ruff is clean, nothing cites a file outside the
repository, and the library prints nothing (it logs)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _lint_imports(cwd: Path, env_path: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": str(env_path)}
    return subprocess.run([str(BIN / "lint-imports"), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("results/run.py", "import torch", "need no torch"),
    ("results/reducer.py", "import matplotlib", "draws nothing"),
    ("engine/selection.py", "import pyarrow", "engine knows no Ray"),
    ("storage/store.py", "import lrpscale.run.audit", "data flow"),
    ("engine/models.py", "import lrpscale.results", "data flow"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    """The same contracts on a copy of the package with one leak added: lint-imports must fail
    and name the contract (so a contract that cannot fail would show here)."""
    shutil.copytree(ROOT / "lrpscale", tmp_path / "lrpscale", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    target = tmp_path / "lrpscale" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = _lint_imports(tmp_path, env_path=tmp_path)
    assert result.returncode != 0, result.stdout
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    name, = [c["name"] for c in contracts if contract in c["name"]]
    assert f"{name} BROKEN" in " ".join(result.stdout.split()), result.stdout


def test_results_load_without_torch_or_matplotlib():
    code = ("import sys; from lrpscale.results import open_run, Run; import lrpscale.results.comparison, "
            "lrpscale.results.reducer; print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'ray') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_strategies_driver_loads_no_torch():
    """The strategies and the reducer run on results alone; torch costs a driver ~600 MB of memory,
    so only the references' actors (and a driver that starts them) load it."""
    code = ("import sys; import lrpscale.run.strategies, lrpscale.cli; "
            "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ruff_is_clean():
    result = subprocess.run([str(BIN / "ruff"), "check", "lrpscale", "jobs", "tests", "benchmarks", "scripts"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_cites_a_file_outside_the_repository():
    cited = []
    for path in [*ROOT.glob("lrpscale/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("docs/*.md"),
                 ROOT / "README.md"]:
        if path != Path(__file__) and "DESIGN.md" in path.read_text():
            cited.append(str(path.relative_to(ROOT)))
    assert cited == []


def test_the_library_prints_nothing():
    """Progress and messages go through logging; only the command line prints: cli.py and the
    ``main()`` of a module run with ``python -m``."""
    printing = []
    for path in ROOT.glob("lrpscale/**/*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text())
        entry_points = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
        exempt = {id(call) for main in entry_points for call in ast.walk(main)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and id(node) not in exempt:
                printing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert printing == []


def test_test_files_have_unique_names():
    """The test folders are not packages, so pytest imports each file by its base name: two files of
    one name in different folders stop the whole suite at collection."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({name for name in names if names.count(name) > 1}) == []
