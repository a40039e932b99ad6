"""Rebuild plots and a one-page report.md from saved results.

    python -m lmcache_lab.report outputs/2026-11-27/21-30-00_engine_lfu     # one run
    python -m lmcache_lab.report multirun/2026-11-27/21-40-00_policy_sweep  # a sweep: one report

Reads only what experiments saved (summary.json, requests.csv), so reports can be rebuilt and
combined on any machine, without an engine.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    from lmcache_lab.experiments.engine_report import build_report

    p = argparse.ArgumentParser(prog="python -m lmcache_lab.report", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="a run dir (holds summary.json) or a sweep dir")
    args = p.parse_args(argv)
    out = build_report(args.path)
    print(f"report: {out}")
    return out


if __name__ == "__main__":
    main()
