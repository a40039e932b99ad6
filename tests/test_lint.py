"""ruff, configured in pyproject ([tool.ruff]), passes on the tree; its rules are the ones in force.

Format (`ruff format`) is not checked here: the tree predates it (see .pre-commit-config.yaml).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


def ruff_check(*paths, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([RUFF, "check", "--no-cache", "--output-format", "concise",
                           "--config", ROOT / "pyproject.toml", *paths],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_passes_on_the_tree():
    proc = ruff_check(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_configured_rules_catch_an_unused_import_and_a_long_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = '" + "a" * 120 + "'\n")
    proc = ruff_check(bad, cwd=tmp_path)
    assert proc.returncode == 1
    assert "F401" in proc.stdout and "E501" in proc.stdout, proc.stdout
