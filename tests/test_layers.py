"""The layers, enforced by import-linter: the core never imports the lab (pyproject's contract).

`lint-imports` finds a package by walking its folder, so it runs on a copy of the package
assembled as a wheel installs it (each `package-dir` entry of pyproject at its dotted place:
`experiments/` as `lmcache_lab/experiments/`, ...). The same copy with one core module importing
the lab shows the contract has teeth.
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
CONTRACT = next(c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["id"] == "core-not-lab")
DATA_ONLY = {"lmcache_lab.conf"}    # the Hydra configs: YAML files, no code


def assemble(dest: Path) -> Path:
    for package, folder in sorted(PYPROJECT["tool"]["setuptools"]["package-dir"].items()):
        shutil.copytree(ROOT / folder, dest / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "data"))
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([exe, "--config", ROOT / "pyproject.toml", "--no-cache"], cwd=tree,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path) -> Path:
    return assemble(tmp_path)


def test_the_core_never_imports_the_lab(tree):
    proc = lint_imports(tree)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout + proc.stderr


def test_the_contract_fails_when_a_core_module_imports_the_lab(tree):
    keys = tree / "lmcache_lab" / "keys.py"
    keys.write_text(keys.read_text() + "\nfrom lmcache_lab.experiments import replay  # noqa: E402\n")
    proc = lint_imports(tree)
    assert proc.returncode != 0 and "1 broken" in proc.stdout, proc.stdout + proc.stderr
    assert "lmcache_lab.keys -> lmcache_lab.experiments.replay" in proc.stdout


def test_every_module_of_the_package_is_core_or_lab(tree):
    """A new module must be placed in the contract, or it would escape it."""
    classified = set(CONTRACT["source_modules"]) | set(CONTRACT["forbidden_modules"]) | DATA_ONLY
    modules = {f"lmcache_lab.{m.name}" for m in pkgutil.iter_modules([str(tree / "lmcache_lab")])}
    assert modules == classified
