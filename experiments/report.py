"""Saving results and turning them into tables and plots (single runs and Hydra sweeps)."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY = "summary.json"


def versions() -> dict[str, str]:
    import torch

    import lmcache_lab
    out = {"python": sys.version.split()[0], "lmcache_lab": lmcache_lab.__version__,
           "torch": torch.__version__, "numpy": np.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine()}
    try:
        import vllm
        out["vllm"] = vllm.__version__
    except ImportError:
        pass
    return out


def write_summary(out_dir: Path, summary: dict[str, Any], cfg=None) -> Path:
    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    data = dict(summary)
    if cfg is not None:
        data["config"] = OmegaConf.to_container(cfg, resolve=True)
    data["versions"] = versions()
    path = out_dir / SUMMARY
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_hit_rate_over_time(path: Path, hit_blocks: np.ndarray, blocks: np.ndarray, title: str,
                            window: int = 200) -> Path:
    """Cumulative and windowed chunk hit rate against request index."""
    plt = _pyplot()
    cum = np.cumsum(hit_blocks) / np.maximum(1, np.cumsum(blocks))
    w = max(1, min(window, len(blocks)))
    kernel = np.ones(w)
    rolling = np.convolve(hit_blocks, kernel, "valid") / np.maximum(1, np.convolve(blocks, kernel, "valid"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(len(cum)), cum, label="cumulative")
    ax.plot(np.arange(w - 1, len(blocks)), rolling, alpha=0.6, label=f"last {w} requests")
    ax.set_xlabel("request")
    ax.set_ylabel("chunk hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_summaries(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob(SUMMARY)) if p.parent != Path(root)]


def replay_sweep_report(root: Path) -> Path | None:
    """Combine the replay runs under a sweep dir: CSV + one plot per trace of hit rate and FLOPs
    saved against capacity, one line per policy."""
    import pandas as pd

    rows = [s for s in load_summaries(root) if s.get("experiment") == "replay"]
    if not rows:
        return None
    cols = ["trace", "policy", "capacity_fraction", "capacity_blocks", "capacity_bytes", "chunk_hit_rate",
            "token_hit_rate", "flops_saved_fraction", "bytes_written", "evictions", "requests"]
    df = pd.DataFrame(rows)
    df = df[[c for c in cols if c in df.columns]].sort_values(["trace", "policy", "capacity_blocks"])
    csv = Path(root) / "replay_sweep.csv"
    df.to_csv(csv, index=False)
    plt = _pyplot()
    for trace, group in df.groupby("trace"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for policy, g in group.groupby("policy"):
            x = g["capacity_fraction"] if g["capacity_fraction"].notna().all() else g["capacity_blocks"]
            axes[0].plot(x, g["chunk_hit_rate"], marker="o", label=policy)
            axes[1].plot(x, g["flops_saved_fraction"], marker="o", label=policy)
        xlabel = "capacity (fraction of unique blocks)" if group["capacity_fraction"].notna().all() else "capacity (blocks)"
        for ax, ylabel in zip(axes, ["chunk hit rate", "prefill FLOPs saved (fraction)"]):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(Path(str(trace)).name, fontsize=10)
        fig.tight_layout()
        fig.savefig(Path(root) / f"hit_rate_vs_capacity_{Path(str(trace)).stem}.png", dpi=110)
        plt.close(fig)
    print_table(df)
    return csv


def print_table(df) -> None:
    with __import__("pandas").option_context("display.width", 160, "display.max_columns", 20,
                                              "display.float_format", "{:.4f}".format):
        print(df.to_string(index=False))


def print_summary(summary: dict[str, Any], keys: list[str]) -> None:
    width = max(len(k) for k in keys)
    print("-" * (width + 24))
    for k in keys:
        v = summary.get(k)
        text = f"{v:.4f}" if isinstance(v, float) and abs(v) < 1e4 else (f"{v:.3e}" if isinstance(v, float) else str(v))
        print(f"{k:<{width}}  {text}")
    print("-" * (width + 24))


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra is a core dependency; this only guards odd partial installs
    Callback = object


class SweepReport(Callback):
    """Hydra callback: after a `-m` sweep, combine every run's summary into one report."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        csv = replay_sweep_report(root)
        if csv is not None:
            print(f"sweep report: {csv} and {root}/hit_rate_vs_capacity_*.png")
