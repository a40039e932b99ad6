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


REPLAY_COLUMNS = ["trace", "policy", "offline", "capacity_fraction", "capacity_blocks", "chunk_hit_rate",
                  "token_hit_rate", "flops_saved_fraction", "bytes_written", "write_amplification", "evictions",
                  "declined", "ttft_mean_s", "ttft_p90_s", "ttft_no_cache_mean_s", "infinite_chunk_hit_rate",
                  "infinite_flops_saved_fraction", "replay_seconds", "requests"]
CEILING = ("belady_prefix", "belady")   # the offline policy a gap is measured to, best first


def gap_table(df):
    """Per trace and capacity: LRU, the best online policy, the Belady ceiling, and the share of
    the LRU -> Belady gap in chunk hit rate that the best online policy closes."""
    import pandas as pd

    rows = []
    for (trace, cap), g in df.groupby(["trace", "capacity_blocks"]):
        by = g.set_index("policy")
        ceiling = next((c for c in CEILING if c in by.index), None)
        online = g[~g["offline"].astype(bool)] if "offline" in g else g
        if ceiling is None or "lru" not in by.index or online.empty:
            continue
        best = online.loc[online["chunk_hit_rate"].idxmax()]
        lru, top = by.loc["lru", "chunk_hit_rate"], by.loc[ceiling, "chunk_hit_rate"]
        rows.append({"trace": Path(str(trace)).name, "capacity_fraction": g["capacity_fraction"].iloc[0],
                     "capacity_blocks": cap, "lru": lru, "best_online": best["policy"],
                     "best_online_hit_rate": best["chunk_hit_rate"], "ceiling": ceiling, "ceiling_hit_rate": top,
                     "infinite": g["infinite_chunk_hit_rate"].iloc[0] if "infinite_chunk_hit_rate" in g else None,
                     "gap_closed": (best["chunk_hit_rate"] - lru) / (top - lru) if top > lru else float("nan"),
                     "lru_flops_saved": by.loc["lru", "flops_saved_fraction"],
                     "best_online_flops_saved": best["flops_saved_fraction"]})
    return pd.DataFrame(rows)


def replay_sweep_report(root: Path) -> Path | None:
    """Combine the replay runs under a sweep dir: `replay_sweep.csv` (one row per run),
    `replay_gap.csv` (LRU -> Belady gap closed by the best online policy, per trace and capacity),
    and one figure per trace: chunk hit rate and prefill FLOPs saved against capacity, one line per
    policy, offline policies dashed, the infinite cache as a dotted ceiling, and LRU's whole
    curve from one pass of stack distances (`lru_stack_curve`, also in `lru_stack_<trace>.csv`)
    where it is exact; the LRU points of the sweep lie on it."""
    import pandas as pd

    rows = [s for s in load_summaries(root) if s.get("experiment") == "replay"]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    if "offline" not in df:
        df["offline"] = False
    df["offline"] = df["offline"].fillna(False).astype(bool)
    df = df[[c for c in REPLAY_COLUMNS if c in df.columns]].sort_values(["trace", "offline", "policy",
                                                                           "capacity_blocks"])
    csv = Path(root) / "replay_sweep.csv"
    df.to_csv(csv, index=False)
    gaps = gap_table(df)
    if not gaps.empty:
        gaps.to_csv(Path(root) / "replay_gap.csv", index=False)
    plt = _pyplot()
    for trace, group in df.groupby("trace"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        by_fraction = group["capacity_fraction"].notna().all()
        xcol = "capacity_fraction" if by_fraction else "capacity_blocks"
        for policy, g in group.groupby("policy", sort=False):
            style = "--" if bool(g["offline"].iloc[0]) else "-"
            axes[0].plot(g[xcol], g["chunk_hit_rate"], style, marker="o", label=policy)
            axes[1].plot(g[xcol], g["flops_saved_fraction"], style, marker="o", label=policy)
        if "requests" in group and group["requests"].notna().all():   # (older summaries: no count)
            caps, rates = lru_stack_curve(str(trace), int(group["requests"].iloc[0]))
            pd.DataFrame({"capacity_blocks": caps, "chunk_hit_rate": rates}).to_csv(
                Path(root) / f"lru_stack_{Path(str(trace)).stem}.csv", index=False)
            shown = caps <= group["capacity_blocks"].max()
            scale = caps[-1] if by_fraction and len(caps) else 1      # the trace's unique blocks
            # a step: at a fraction f the capacity is int(f * unique blocks), as in the replay
            axes[0].step(caps[shown] / scale, rates[shown], where="post", color="0.4",
                         linewidth=1, label="lru (stack distances)")
        for ax, col in zip(axes, ["infinite_chunk_hit_rate", "infinite_flops_saved_fraction"]):
            if col in group and group[col].notna().any():
                ax.axhline(float(group[col].iloc[0]), color="k", linestyle=":", label="infinite cache")
        xlabel = "capacity (fraction of unique blocks)" if by_fraction else "capacity (blocks)"
        for ax, ylabel in zip(axes, ["chunk hit rate", "prefill FLOPs saved (fraction)"]):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, ncol=2)
        fig.suptitle(Path(str(trace)).name, fontsize=10)
        fig.tight_layout()
        fig.savefig(Path(root) / f"hit_rate_vs_capacity_{Path(str(trace)).stem}.png", dpi=110)
        plt.close(fig)
    print_table(df)
    if not gaps.empty:
        print_table(gaps)
    return csv


def lru_stack_curve(trace: str, requests: int) -> tuple[np.ndarray, np.ndarray]:
    """(capacities in blocks, LRU chunk hit rate at each) over the first `requests` requests of
    `trace`, from one pass (`explain.stack_curve`); only the capacities where it is exact (at
    least the longest request's blocks), up to the trace's unique blocks."""
    from lmcache_lab.experiments.explain import stack_curve
    from lmcache_lab.experiments.trace import load_trace

    caps, rates, longest = stack_curve(load_trace(trace, limit=requests))
    return caps[longest:], rates[longest:]


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
