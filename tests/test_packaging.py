"""The package as a user installs it: a wheel, in a fresh virtual environment, run outside the checkout.

The fresh environment reuses the heavy dependencies (torch, vLLM, ...) of the interpreter running
the tests through one `.pth` line naming its site-packages. (`venv --system-site-packages` would not
do: a venv made from a venv sees the *base* interpreter's site-packages.) A plain path line in a
`.pth` file is only appended to `sys.path`; the `.pth` files inside that folder, the editable
install's import hook among them, are not run, so `lmcache_lab` comes from the wheel alone, and
the test checks that it does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "lmcache_lab", "kernels", "experiments", "conf"]
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
pytestmark = pytest.mark.packaging


def sh(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources: setuptools' build/ folder would otherwise sit in the
    checkout and carry files deleted since into later wheels."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=JUNK)
        else:
            shutil.copy2(ROOT / name, src / name)
    t0 = time.perf_counter()
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src], src)
    (whl,) = out.glob("lmcache_lab-*.whl")
    print(f"{whl.name} built in {time.perf_counter() - t0:.1f} s")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel, seeing the test interpreter's dependencies; its bin dir."""
    env = tmp_path_factory.mktemp("venv")
    sh([sys.executable, "-m", "venv", "--without-pip", env], env)
    purelib = Path(sh([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                      env).stdout.strip())
    (purelib / "reuse_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    sh([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], env)
    return env / "bin"


def test_the_wheel_holds_the_configs_and_the_sample_trace(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert confs and {f"lmcache_lab/conf/{c}" for c in confs} <= names
    assert "lmcache_lab/experiments/data/sample_trace.jsonl" in names
    assert not any(n.startswith(("conf/", "experiments/", "kernels/")) for n in names)


def test_installed_wheel_runs_a_replay_sweep_reports_it_and_loads_the_connector(venv, tmp_path):
    py = venv / "python"
    assert not tmp_path.resolve().is_relative_to(ROOT)
    probe = sh([py, "-c", "import lmcache_lab, torch, vllm; print(lmcache_lab.__file__)"], tmp_path)
    assert Path(probe.stdout.strip()).is_relative_to(venv.parent), probe.stdout

    sh([py, "-m", "lmcache_lab.run", "-m", "experiment=replay", "policy=lru,lfu", "workload.limit=200",
        "progress=false", "hydra.sweep.dir=sweep"], tmp_path)
    runs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    summaries = [json.loads(p.read_text()) for p in runs]
    assert [(s["policy"], s["requests"]) for s in summaries] == [("lru", 200), ("lfu", 200)]

    report = sh([py, "-m", "lmcache_lab.report", "sweep"], tmp_path).stdout
    assert "report:" in report and "sweep" in report

    cfg = sh([venv / "lmcache-lab", "--cfg", "job", "experiment=replay", "+policy=lfu"], tmp_path).stdout
    assert "name: replay" in cfg and "name: lfu" in cfg

    connector = sh([py, "-c", "from lmcache_lab.integrations import vllm as m\n"
                              "print(m.LMCacheLabConnector and m.__file__)"], tmp_path)
    assert Path(connector.stdout.strip()).is_relative_to(venv.parent)
