"""Output of `kubeinfer bench serve`: the human table, the JSON document and the progress bar."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from kubeinfer_devkit.bench.loadgen import BenchResult, LoadConfig

# (label, path into a run dict / summary dict)
ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("requests/s", ("requests_per_s",)),
    ("output tokens/s", ("output_tokens_per_s",)),
    ("success", ("success",)),
    ("failed", ("failed",)),
    *(
        (f"{label} {q} (ms)", (key, q))
        for label, key in (("latency", "latency_ms"), ("TTFT", "ttft_ms"), ("ITL", "itl_ms"))
        for q in ("mean", "p50", "p90", "p99")
    ),
)


def describe(config: LoadConfig, repeat: int) -> str:
    if config.dataset == "synthetic":
        data = f"synthetic prompts of ~{config.input_len} tokens"
    elif config.dataset == "shared-prefix":
        data = (
            f"shared-prefix: {config.groups} groups, system prompt ~{config.system_prompt_len} tokens, "
            f"question ~{config.question_len}"
        )
    else:
        data = f"prompts from {config.dataset_path}"
    load = (
        f"concurrency {config.concurrency or 1}" if config.rate is None else f"Poisson {config.rate:g} req/s"
    )
    if config.rate is not None and config.concurrency:
        load += f" (at most {config.concurrency} in flight)"
    out_len = config.output_len if config.output_len is not None else config.max_tokens
    seeds = (
        f"{repeat} runs, seeds {config.seed}..{config.seed + repeat - 1}"
        if repeat > 1
        else f"seed {config.seed}"
    )
    return (
        f"{config.endpoint_url} model {config.model}\n"
        f"{data}, max {out_len} output tokens, {'stream' if config.stream else 'no stream'}, {load}, "
        f"{config.iterations} requests + {config.warmup} warm-up, {seeds}"
    )


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or v == 0:
        return str(int(v))
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_table(result: BenchResult) -> str:
    """The human report: one value per figure, or mean/stddev/min/max/CV over repeated runs."""
    runs = [run.to_dict() for run in result.runs]
    head = describe(result.config, len(runs))
    if len(runs) == 1:
        run = runs[0]
        rows = [["figure", "value"]]
        for label, path in ROWS:
            value = _get(run, path)
            rows.append([label, f"{value}/{run['requests']}" if path == ("success",) else _num(value)])
        errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "none"
        counted = ", ".join(f"{k} {v}" for k, v in run["output_tokens_from"].items()) or "-"
        return (
            f"{head}\n\n{_columns(rows)}\n\nerrors: {errors}\n"
            f"output tokens counted from (requests): {counted}; duration {run['duration_s']:.2f} s\n"
        )
    summary = result.summary()
    rows = [["figure", "mean", "stddev", "min", "max", "CV"]]
    labelled = [*ROWS, *((f"errors {k}", ("errors", k)) for k in summary.get("errors", {}))]
    for label, path in labelled:
        s = _get(summary, path)
        if not isinstance(s, dict):
            rows.append([label, "-", "-", "-", "-", "-"])
            continue
        cv = "-" if s["cv"] is None else f"{100 * s['cv']:.1f}%"
        rows.append([label, *(_num(s[k]) for k in ("mean", "stddev", "min", "max")), cv])
    return f"{head}\n\n{_columns(rows)}\n"


def to_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)


class Progress:
    """A progress bar on `stream` per run: tqdm when it is installed (it is not a dependency of
    kubeinfer), else one line rewritten in place, at most ten times a second."""

    def __init__(self, repeat: int, stream: TextIO | None = None) -> None:
        self.repeat = repeat
        self.stream = stream or sys.stderr  # looked up now: sys.stderr may be replaced (tests, tools)
        self.bar: Any = None
        self.run = -1
        self.started = 0.0
        self.shown = 0.0
        try:
            from tqdm import tqdm

            self.tqdm: Any = tqdm
        except ImportError:
            self.tqdm = None

    def __call__(self, run: int, done: int, total: int) -> None:
        desc = f"run {run + 1}/{self.repeat}" if self.repeat > 1 else "requests"
        if run != self.run:
            self.close()
            self.run, self.started = run, time.monotonic()
            if self.tqdm is not None:
                self.bar = self.tqdm(total=total, desc=desc, file=self.stream, unit="req", leave=True)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if done < total and now - self.shown < 0.1:
            return
        self.shown = now
        filled = 30 * done // total
        rate = done / (now - self.started) if now > self.started else 0.0
        self.stream.write(f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {rate:.1f} req/s")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
