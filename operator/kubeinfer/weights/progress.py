"""Reading a weight fetch's log: the JSON events `kubeinfer weights fetch` prints on stdout, one per line.

The operator reads the tail of the fetch Job's pod log, folds its events into a :class:`Progress`
(:func:`summarize`) and shows :func:`format_summary` in a kubectl column. Pure: no I/O, no clock.

Events (every one has ``"event"``; other keys as listed):

- ``start``: repo, revision, sha, files_total, bytes_total
- ``progress``: bytes_done, bytes_total, files_done, files_total, rate_bps, eta_seconds (null when unknown)
- ``retry``: attempt, delay, error
- ``log``: level, message (notes for people, e.g. which GGUF file was picked)
- ``done``: bytes_downloaded, bytes_total, files, path
- ``error``: reason, message, permanent
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

PENDING, DOWNLOADING, RETRYING, READY, FAILED = "Pending", "Downloading", "Retrying", "Ready", "Failed"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class Progress:
    phase: str = PENDING
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    rate_bps: float | None = None
    eta_seconds: float | None = None
    reason: str | None = None
    message: str | None = None


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on one log line, or None for anything else (a traceback, a library's warning).

    A ``kubectl logs --timestamps`` prefix (one word before the JSON) is skipped."""
    text = line.strip()
    if not text.startswith("{"):
        _, _, text = text.partition(" ")
        text = text.lstrip()
        if not text.startswith("{"):
            return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


def _int(value: object, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def summarize(events: Iterable[Mapping[str, Any]]) -> Progress:
    """Fold events, oldest first, into where the fetch stands (a tail that misses the start is fine)."""
    p = Progress()
    for ev in events:
        kind = ev.get("event")
        if kind == "start":
            p = Progress(
                DOWNLOADING,
                bytes_total=_int(ev.get("bytes_total")),
                files_total=_int(ev.get("files_total")),
            )
        elif kind == "progress":
            p = replace(
                p,
                phase=DOWNLOADING,
                bytes_done=_int(ev.get("bytes_done")),
                bytes_total=_int(ev.get("bytes_total"), p.bytes_total),
                files_done=_int(ev.get("files_done")),
                files_total=_int(ev.get("files_total"), p.files_total),
                rate_bps=_float(ev.get("rate_bps")),
                eta_seconds=_float(ev.get("eta_seconds")),
                message=None,
            )
        elif kind == "retry":
            p = replace(p, phase=RETRYING, rate_bps=None, eta_seconds=None, message=_str(ev.get("error")))
        elif kind == "done":
            total = _int(ev.get("bytes_total"), p.bytes_total)
            files = ev.get("files")
            n = len(files) if isinstance(files, list) else p.files_total
            p = Progress(READY, bytes_done=total, bytes_total=total, files_done=n, files_total=n)
        elif kind == "error":
            p = replace(p, phase=FAILED, reason=_str(ev.get("reason")), message=_str(ev.get("message")))
    return p


def format_bytes(n: float) -> str:
    """``1.5 GiB``: binary units, one decimal (bytes as a whole number)."""
    value, unit = _scale(n, _unit_for(n))
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def _unit_for(n: float) -> int:
    i = 0
    while abs(n) >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    return i


def _scale(n: float, unit: int) -> tuple[float, str]:
    return n / 1024**unit, _UNITS[unit]


def format_duration(seconds: float) -> str:
    """``8s``, ``2m05s``, ``1h02m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_summary(p: Progress) -> str:
    """One short kubectl column: ``41% 12.3/30.0 MiB 2.1 MiB/s ETA 8s``, ``Ready``, ``Failed: GatedRepo``."""
    if p.phase == READY:
        return "Ready"
    if p.phase == FAILED:
        return f"Failed: {p.reason or 'Unknown'}"
    if p.bytes_total <= 0:
        return "Retrying" if p.phase == RETRYING else p.phase
    unit = _unit_for(p.bytes_total)
    done, _ = _scale(p.bytes_done, unit)
    total, name = _scale(p.bytes_total, unit)
    pct = round(min(1.0, p.bytes_done / p.bytes_total) * 100)
    if pct == 100 and p.bytes_done < p.bytes_total:
        pct = 99  # 100% only once every byte is there
    sizes = f"{done:.0f}/{total:.0f} B" if name == "B" else f"{done:.1f}/{total:.1f} {name}"
    parts = [f"{pct}%", sizes]
    if p.phase == RETRYING:
        parts.append("retrying")
    else:
        if p.rate_bps is not None and p.rate_bps > 0:
            parts.append(f"{format_bytes(p.rate_bps)}/s")
        if p.eta_seconds is not None:
            parts.append(f"ETA {format_duration(p.eta_seconds)}")
    return " ".join(parts)
