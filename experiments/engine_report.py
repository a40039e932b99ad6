"""Results of engine experiments: files of a run, plots, one-page report.md, sweep combination.

A run dir (written by `engine_run.run_engine_experiment`, read back by everything here):
    summary.json          the contract in engine_run's docstring (+ resolved config, versions)
    requests.csv          one row per request and arm (`Record` fields)
    ttft_cdf.png          TTFT distribution per arm
    ttft_by_request.png   TTFT per round (multi-round workloads) or per request index, per arm
    hit_rate_over_time.png  cumulative token hit rate against request index, per arm
    report.md             tables + the PNGs
A sweep dir (Hydra `-m`) holds run dirs; `build_report(sweep)` writes engine_sweep.csv,
ttft_vs_capacity.png, hit_rate_vs_capacity.png (one line per policy) and a report.md that combines
every run. Everything is rebuilt from saved files only: `python -m lmcache_lab.report DIR`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmcache_lab.experiments import report as base

RECORDS = "requests.csv"
ARM_ORDER = ("cold", "engine_cache", "lmcache_lab")


def _arms(names) -> list[str]:
    return sorted(names, key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else len(ARM_ORDER), a))


# ================================================================================= one run
def save_run(out_dir: Path, summary: dict[str, Any], records, cfg=None) -> Path:
    """Write summary.json and requests.csv, then the plots and report.md from them."""
    from dataclasses import asdict

    base.write_summary(out_dir, summary, cfg)
    pd.DataFrame([asdict(r) for r in records]).to_csv(out_dir / RECORDS, index=False)
    return build_run_report(out_dir)


def load_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / base.SUMMARY).read_text())
    return summary, pd.read_csv(run_dir / RECORDS)


def _save(fig, ax, path: Path, title: str = "", legend_size: float | None = None) -> Path:
    """The finish every plot here shares: grid, legend, title, written as a PNG and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    base._pyplot().close(fig)
    return path


def plot_ttft_cdf(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    plt = base._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm in _arms(df["arm"].unique()):
        t = np.sort(df.loc[df["arm"] == arm, "ttft_ms"].to_numpy())
        ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, path, title)


def plot_ttft_by_request(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Mean TTFT per round when the workload has rounds (multi_round_qa), else TTFT per request."""
    plt = base._pyplot()
    by_round = df["round"].nunique() > 1 and df.groupby(["arm", "round"]).size().min() > 1
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm in _arms(df["arm"].unique()):
        d = df[df["arm"] == arm]
        if by_round:
            g = d.groupby("round")["ttft_ms"].mean()
            ax.plot(g.index, g.to_numpy(), marker="o", label=arm)
        else:   # several passes (`repeats`): their mean per request
            g = d.groupby("index")["ttft_ms"].mean()
            ax.plot(g.index, g.to_numpy(), marker=".", lw=0.8, label=arm)
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round: user turn or question number (mean over users/documents)" if by_round else "request index")
    ax.set_ylabel("TTFT (ms, log scale)")
    return _save(fig, ax, path, title)


def plot_hit_rate_over_time(df: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Cumulative token hit rate (cached / prompt tokens) against request index, per arm."""
    plt = base._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm in _arms(df["arm"].unique()):
        d = df[df["arm"] == arm].groupby("index")[["cached_tokens", "prompt_tokens"]].sum()  # passes pooled
        rate = d["cached_tokens"].cumsum() / d["prompt_tokens"].cumsum().clip(lower=1)
        ax.plot(d.index, rate.to_numpy(), label=arm)
    ax.set_xlabel("request index")
    ax.set_ylabel("token hit rate (cumulative)")
    ax.set_ylim(0, 1)
    return _save(fig, ax, path, title)


def arm_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per arm: requests, TTFT mean/p50/p90, token hit rate, p50 speed-up over cold."""
    arms = summary["arms"]
    cold = arms.get("cold", {}).get("ttft_ms", {}).get("p50")
    rows = []
    for name in _arms(arms):
        a = arms[name]
        rows.append({"arm": name, "requests": a["requests"], "ttft_p50_ms": a["ttft_ms"]["p50"],
                     "ttft_p90_ms": a["ttft_ms"]["p90"], "ttft_mean_ms": a["ttft_ms"]["mean"],
                     "token_hit_rate": a["token_hit_rate"],
                     "speedup_p50_vs_cold": cold / a["ttft_ms"]["p50"] if cold else float("nan")})
    return pd.DataFrame(rows)


def repeat_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per pass: each arm's TTFT p50 and the lmcache_lab arm's p50 speed-ups."""
    arms = summary["arms"]
    df = pd.DataFrame({name: arms[name]["ttft_p50_ms_per_repeat"] for name in _arms(arms)})
    for ref in ("cold", "engine_cache"):
        if f"speedup_p50_vs_{ref}_per_repeat" in summary:
            df[f"speedup_p50_vs_{ref}"] = summary[f"speedup_p50_vs_{ref}_per_repeat"]
    df.insert(0, "pass", range(len(df)))
    return df


def _md_table(df: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        return str(v)
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def _title(s: dict[str, Any]) -> str:
    return (f"{s['workload']} · {s['model']} · {s['engine']} · policy {s.get('policy')} · "
            f"CPU tier {s.get('capacity_bytes', 0) / 2**20:.0f} MiB")


def build_run_report(run_dir: Path) -> Path:
    """Plots and report.md of one run dir, from summary.json and requests.csv."""
    run_dir = Path(run_dir)
    s, df = load_run(run_dir)
    title = _title(s)
    plot_ttft_cdf(df, run_dir / "ttft_cdf.png", title)
    plot_ttft_by_request(df, run_dir / "ttft_by_request.png", title)
    plot_hit_rate_over_time(df, run_dir / "hit_rate_over_time.png", title)
    lines = [f"# Engine experiment: {s['workload']}", "", f"{title}  ", f"driver {s.get('driver')}, "
             f"chunk_size {s.get('chunk_size')}, engine KV blocks {s.get('num_gpu_blocks') or 'default'}, "
             f"{s['arms'][next(iter(s['arms']))]['requests']} requests per arm", "",
             _md_table(arm_table(s)), ""]
    if s.get("repeats", 1) > 1:
        lines += [f"{s['repeats']} passes per arm, each on a fresh engine, arms rotated between passes; "
                  "the table pools them. TTFT p50 per pass (ms):", "", _md_table(repeat_table(s)), ""]
    conn = s["arms"].get("lmcache_lab", {}).get("connector")
    if conn:
        a = s["arms"]["lmcache_lab"]
        counters = {k: v for k, v in conn.items() if k != "miss_tokens"}
        lines += ["Connector metrics (lmcache_lab arm, scraped from its endpoint):", "",
                  _md_table(pd.DataFrame([{**counters, "metrics_token_hit_rate": a["metrics_token_hit_rate"],
                                           "engine_token_hit_rate": a["token_hit_rate"]}])), "",
                  f"Missed tokens by reason (docs/observability.md): {_misses(conn)}", ""]
    lines += ["![TTFT CDF](ttft_cdf.png)", "", "![TTFT per request](ttft_by_request.png)", "",
              "![hit rate over time](hit_rate_over_time.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def print_run(summary: dict[str, Any]) -> None:
    print(_title(summary))
    base.print_table(arm_table(summary))
    if summary.get("repeats", 1) > 1:
        print(f"TTFT p50 per pass (ms; {summary['repeats']} passes, each on a fresh engine; "
              "the table above pools them):")
        base.print_table(repeat_table(summary))
    a = summary["arms"].get("lmcache_lab", {})
    if "connector" in a:
        c = a["connector"]
        print(f"connector endpoint: {c['hit_tokens']:.0f} tokens loaded + {c['engine_prefix_hit_tokens']:.0f} "
              f"already in the engine = token hit rate {a['metrics_token_hit_rate']:.4f} "
              f"(engine-reported {a['token_hit_rate']:.4f}); {c['stored_chunks']:.0f} chunks stored, "
              f"{c['evictions']:.0f} evicted")
        print(f"missed tokens by reason: {_misses(c)}")


def _misses(connector: dict[str, Any]) -> str:
    misses = connector.get("miss_tokens") or {}
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(misses.items(), key=lambda kv: -kv[1])) or "none"


# ================================================================================= sweeps
def sweep_runs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for p in sorted(Path(root).rglob(base.SUMMARY)):
        if p.parent == Path(root):
            continue
        s = json.loads(p.read_text())
        if s.get("experiment") == "engine":
            out.append((p.parent, s))
    return out


def sweep_table(runs) -> pd.DataFrame:
    rows = []
    for run_dir, s in runs:
        for arm, a in s["arms"].items():
            rows.append({"run": run_dir.name, "workload": s["workload"], "policy": s.get("policy"),
                         "capacity_mib": s.get("capacity_bytes", 0) / 2**20, "arm": arm,
                         "requests": a["requests"], "ttft_p50_ms": a["ttft_ms"]["p50"],
                         "ttft_p90_ms": a["ttft_ms"]["p90"], "ttft_mean_ms": a["ttft_ms"]["mean"],
                         "token_hit_rate": a["token_hit_rate"]})
    return pd.DataFrame(rows).sort_values(["workload", "arm", "policy", "capacity_mib"]).reset_index(drop=True)


def plot_vs_capacity(df: pd.DataFrame, column: str, ylabel: str, path: Path, arm: str = "lmcache_lab") -> Path:
    """`column` against CPU-tier capacity, one line per policy, for `arm`; other arms (they do
    not depend on policy or capacity) as horizontal reference lines."""
    plt = base._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    d = df[df["arm"] == arm]
    for policy, g in d.groupby("policy"):
        g = g.groupby("capacity_mib")[column].mean()
        ax.plot(g.index, g.to_numpy(), marker="o", label=f"{arm} · {policy}")
    for other in _arms(set(df["arm"]) - {arm}):
        ax.axhline(df.loc[df["arm"] == other, column].mean(), ls="--", lw=1, color="gray")
        ax.annotate(other, (d["capacity_mib"].min() if len(d) else 0, df.loc[df["arm"] == other, column].mean()),
                    fontsize=8, color="gray", va="bottom")
    ax.set_xlabel("CPU tier capacity (MiB)")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path, legend_size=8)


def build_sweep_report(root: Path) -> Path | None:
    """Combine the engine runs under a sweep dir (each run's own report is rebuilt too)."""
    root = Path(root)
    runs = sweep_runs(root)
    if not runs:
        return None
    for run_dir, _ in runs:
        build_run_report(run_dir)
    df = sweep_table(runs)
    df.to_csv(root / "engine_sweep.csv", index=False)
    plot_vs_capacity(df, "ttft_p50_ms", "TTFT p50 (ms)", root / "ttft_vs_capacity.png")
    plot_vs_capacity(df, "token_hit_rate", "token hit rate", root / "hit_rate_vs_capacity.png")
    lm = df[df["arm"] == "lmcache_lab"]
    pivot = lm.pivot_table(index="policy", columns="capacity_mib", values="ttft_p50_ms").reset_index()
    pivot.columns = ["policy", *[f"p50 ms @ {c:g} MiB" for c in pivot.columns[1:]]]
    hits = lm.pivot_table(index="policy", columns="capacity_mib", values="token_hit_rate").reset_index()
    hits.columns = ["policy", *[f"hit rate @ {c:g} MiB" for c in hits.columns[1:]]]
    first = runs[0][1]
    lines = [f"# Engine sweep: {first['workload']} on {first['model']} ({first['engine']})", "",
             f"{len(runs)} runs under `{root}`.", "",
             "## lmcache_lab arm: TTFT p50 by policy and CPU-tier capacity", "",
             _md_table(pivot), "", "## lmcache_lab arm: token hit rate", "", _md_table(hits), "",
             "![TTFT vs capacity](ttft_vs_capacity.png)", "", "![hit rate vs capacity](hit_rate_vs_capacity.png)", "",
             "## Every run and arm", "", _md_table(df), "",
             "Per-run reports: " + ", ".join(f"[{d.name}]({d.relative_to(root)}/report.md)" for d, _ in runs), ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    base.print_table(df.drop(columns=["workload"]))
    return out


def build_report(path: Path) -> Path:
    """report.md for a run dir (it has summary.json) or a sweep dir (run dirs below it)."""
    path = Path(path)
    if (path / base.SUMMARY).is_file():
        s = json.loads((path / base.SUMMARY).read_text())
        if s.get("experiment") != "engine":
            raise ValueError(f"{path}: a {s.get('experiment')!r} run; only engine runs have a report here "
                             f"(replay sweeps: lmcache_lab.experiments.report.replay_sweep_report)")
        return build_run_report(path)
    out = build_sweep_report(path)
    replay_csv = base.replay_sweep_report(path)
    if out is None and replay_csv is None:
        raise FileNotFoundError(f"{path}: no summary.json here or in any run dir below it")
    return out if out is not None else replay_csv


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra is a core dependency; this only guards odd partial installs
    Callback = object


class EngineSweepReport(Callback):
    """Hydra callback: after a `-m` sweep of engine runs, write the combined report."""

    def on_multirun_end(self, config, **kwargs) -> None:
        out = build_sweep_report(Path(config.hydra.sweep.dir))
        if out is not None:
            print(f"engine sweep report: {out}")
