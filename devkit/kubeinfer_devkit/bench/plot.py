"""Figures of `kubeinfer bench overhead|routing|engines` results (`--plot FILE`, `kubeinfer bench plot`).

matplotlib is not a dependency of kubeinfer: it comes with the `bench` extra
(`pip install 'kubeinfer[bench]'`). The kind of result is told by its keys; the format by the file's
extension (PNG, SVG, anything matplotlib writes).
"""

from __future__ import annotations

from typing import Any


class PlotError(Exception):
    """Nothing to plot, or matplotlib is missing."""


def kind(result: dict[str, Any]) -> str:
    if "policies" in result and "comparison" in result:
        return "routing"
    if "vllm" in result:
        return "engines"
    if any(k in result for k in ("small", "large", "stream")):
        return "overhead"
    raise PlotError("not the JSON of bench overhead, routing or engines")


def plot(result: dict[str, Any], path: str) -> None:
    what = kind(result)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'kubeinfer[bench]'") from None
    fig = {"routing": _routing, "engines": _engines, "overhead": _overhead}[what](plt, result)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, labels: list[str], series: dict[str, list[float | None]], title: str, unit: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ys = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[_label(v) for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    if len(series) > 1:
        ax.legend(fontsize=8)


# The figures compared across targets when peers or variants ran (a second row of panels).
_PER_TARGET = (
    ("small", "gateway_cpu_us_per_request", "CPU per request"),
    ("large", "gateway_cpu_us_per_request", "CPU per request"),
    ("stream", "gateway_cpu_us_per_chunk", "CPU per chunk"),
)


def targets(result: dict[str, Any], phase: str, key: str) -> dict[str, float | None]:
    """kubeinfer's figure and each peer's (or variant's) in one phase, kubeinfer first."""
    p = result.get(phase) or {}
    out: dict[str, float | None] = {"kubeinfer": p.get(key)}
    for name, figures in (p.get("peers") or {}).items():
        out[name] = figures.get(key)
    return out


def _overhead(plt: Any, result: dict[str, Any]) -> Any:
    phases = [p for p in ("small", "large", "stream") if result.get(p)]
    compared = any((result.get(p) or {}).get("peers") for p in phases)
    rows = 2 if compared else 1
    fig, axes = plt.subplots(rows, len(phases), figsize=(4.2 * len(phases), 3.6 * rows), squeeze=False)
    if compared:
        for ax, (name, key, what) in zip(axes[1], [t for t in _PER_TARGET if t[0] in phases], strict=True):
            figures = targets(result, name, key)
            ax.bar(range(len(figures)), [v or 0.0 for v in figures.values()],
                   color=["tab:orange"] + ["tab:gray"] * (len(figures) - 1))  # fmt: skip
            ax.bar_label(ax.containers[0], labels=[_label(v) for v in figures.values()], fontsize=7)
            ax.set_xticks(range(len(figures)), list(figures), rotation=20, ha="right", fontsize=7)
            ax.set_title(f"{name}: gateway {what} (same run)", fontsize=10)
            ax.set_ylabel("µs")
    for ax, name in zip(axes[0], phases, strict=True):
        p = result[name]
        key = "itl_ms" if name == "stream" else "latency_ms"
        qs = ["p50", "p90", "p99"]
        _bars(
            ax, qs, {t: [p[t][key][q] for q in qs] for t in ("direct", "gateway")},
            f"{name}: {'inter-chunk' if name == 'stream' else 'latency'} ({p['body_bytes']} B bodies"
            + (f", {p['rate']:g}/s)" if p.get("rate") else ")"), "ms",
        )  # fmt: skip
    load = result.get("load_average_before")
    fig.suptitle(f"bench overhead: direct vs through the gateway (load average {load})", fontsize=10)
    return fig


def _routing(plt: Any, result: dict[str, Any]) -> Any:
    policies = list(result["policies"])
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    figures = (
        ("mean TTFT", "mean_ttft_ms", "ms", 1.0), ("p90 TTFT", "p90_ttft_ms", "ms", 1.0),
        ("output tokens/s", "output_tok_s", "tokens/s", 1.0),
        ("prefix-cache hit rate", "prefix_cache_hit_rate", "%", 100.0),
    )  # fmt: skip
    for ax, (title, key, unit, scale) in zip(axes, figures, strict=True):
        values = [result["policies"][p][key] for p in policies]
        _bars(ax, policies, {title: [v * scale if v is not None else None for v in values]}, title, unit)
        ax.tick_params(axis="x", labelsize=8)
    cfg = result["config"]
    fig.suptitle(
        f"bench routing, {cfg['workload']}: {cfg['replicas']} sims, {cfg['groups']} groups, concurrency "
        f"{cfg['concurrency']} (load average {result.get('load_average_before')})",
        fontsize=10,
    )
    return fig


def _engines(plt: Any, result: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    kinds = [k for k in ("vllm", "sim") if result.get(k)]
    policies = list(result["vllm"])
    _bars(
        axes[0], policies,
        {k: [(result[k][p]["hit_rate"] or 0) * 100 for p in policies] for k in kinds},
        "prefix-cache hit rate", "%",
    )  # fmt: skip
    _bars(
        axes[1], policies, {k: [result[k][p]["mean_ttft_ms"] for p in policies] for k in kinds},
        "mean TTFT", "ms",
    )  # fmt: skip
    fig.suptitle(f"bench engines: {result['config']['replicas']} vLLM-on-CPU replicas vs sims", fontsize=10)
    return fig


def _label(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
