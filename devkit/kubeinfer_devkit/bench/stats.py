"""Statistics for the benchmarks. Pure: numbers in, numbers out; no numpy (not a runtime dependency).

Percentiles interpolate linearly between closest ranks, as numpy's default (`method="linear"`) does,
so figures match what people compute from raw samples with numpy or pandas. Across repeated runs,
`spread` gives mean, sample standard deviation (n-1; 0 for a single run), min, max and the coefficient
of variation (stddev / mean), the columns of kanoa's tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) of `values`, linear interpolation; None when there are none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def distribution(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """{p50, p90, p99, mean} of `values` times `scale` (1000 turns seconds into milliseconds)."""
    scaled = [v * scale for v in values]
    out: dict[str, float | None] = {f"p{q}": percentile(scaled, q) for q in PERCENTILES}
    out["mean"] = mean(scaled)
    return out


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """{mean, stddev, min, max, cv} of one figure over repeated runs; cv is None when the mean is 0."""
    if not values:
        return {"mean": None, "stddev": None, "min": None, "max": None, "cv": None}
    m = math.fsum(values) / len(values)
    # Sample standard deviation: the repeats are a sample of the runs one could have made.
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "stddev": sd, "min": min(values), "max": max(values), "cv": sd / m if m else None}


def summarize(runs: Sequence[Mapping[str, Any]], keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Per-figure spread over runs, mirroring the runs' nesting: a number becomes a `spread` dict.

    `runs` are result dicts with the same shape; `keys` limits the top-level figures (default: every
    numeric or nested-numeric key of the first run). A figure missing from a run counts as 0 inside
    dicts of counters such as `errors` (a run without timeouts had 0), and is skipped elsewhere
    (a p99 of None means "no samples", not 0).
    """
    if not runs:
        return {}
    names = list(keys) if keys is not None else list(runs[0])
    out: dict[str, Any] = {}
    for name in names:
        leaves = [run.get(name) for run in runs]
        if all(isinstance(v, Mapping) for v in leaves):
            out[name] = _summarize_dicts([v for v in leaves if isinstance(v, Mapping)])
        elif any(_is_number(v) for v in leaves):
            out[name] = spread([float(v) for v in leaves if _is_number(v)])
    return out


def _summarize_dicts(dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names: list[str] = []
    for d in dicts:
        names += [k for k in d if k not in names]
    # Counters (every value an int, e.g. errors by type) are absent when zero; distributions are not.
    counters = all(isinstance(v, int) and not isinstance(v, bool) for d in dicts for v in d.values())
    out: dict[str, Any] = {}
    for name in names:
        values = [d.get(name, 0 if counters else None) for d in dicts]
        numbers = [float(v) for v in values if _is_number(v)]
        if numbers:
            out[name] = spread(numbers)
    return out


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)
