"""The layers, enforced by import-linter: the core never imports the lab (pyproject's contracts).

`lint-imports` finds a package by walking its folder, so it runs on a copy of the package
assembled as a wheel installs it (each `package-dir` entry of pyproject at its dotted place:
`experiments/` as `lmcache_lab/experiments/`, ...). The same copy with one core module importing
the lab shows the contracts have teeth.
"""
from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONTRACTS = PYPROJECT["tool"]["importlinter"]["contracts"]
CORE = next(c for c in CONTRACTS if c["id"] == "core-not-lab")
DATA_ONLY = {"lmcache_lab.conf"}    # the Hydra configs: YAML files, no code


def assemble(dest: Path) -> Path:
    for package, folder in sorted(PYPROJECT["tool"]["setuptools"]["package-dir"].items()):
        shutil.copytree(ROOT / folder, dest / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([exe, ROOT / "pyproject.toml", "--no-cache"], cwd=tree,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path) -> Path:
    return assemble(tmp_path)


def test_the_core_never_imports_the_lab(tree):
    proc = lint_imports(tree)
    assert proc.returncode == 0 and f"{len(CONTRACTS)} kept, 0 broken" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("core_module, importer, broken", [
    ("keys.py", "lmcache_lab.keys", {"core-not-lab", "init-not-lab"}),   # __init__ imports keys
    ("__init__.py", "lmcache_lab", {"init-not-lab"}),
])
def test_the_contracts_fail_when_a_core_module_imports_the_lab(tree, core_module, importer, broken):
    path = tree / "lmcache_lab" / core_module
    path.write_text(path.read_text() + "\nfrom lmcache_lab.experiments import replay  # noqa: E402\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert {c["id"] for c in CONTRACTS if f"{c['name']} BROKEN" in proc.stdout} == broken, proc.stdout
    assert f"{importer} -> lmcache_lab.experiments.replay" in proc.stdout


def test_every_module_of_the_package_is_core_or_lab(tree):
    """A new module must be placed in the contract, or it would escape it."""
    classified = set(CORE["source_modules"]) | set(CORE["forbidden_modules"]) | DATA_ONLY
    modules = {f"lmcache_lab.{m.name}" for m in pkgutil.iter_modules([str(tree / "lmcache_lab")])}
    assert modules == classified
