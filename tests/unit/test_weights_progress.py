"""Reading a weight fetch's log (kubeinfer.weights.progress): events from log lines, where the fetch
stands, and the kubectl column."""

from __future__ import annotations

import json

from kubeinfer.weights.progress import (
    DOWNLOADING,
    FAILED,
    PENDING,
    READY,
    RETRYING,
    Progress,
    format_bytes,
    format_duration,
    format_summary,
    parse_event,
    summarize,
)

MiB = 1024 * 1024


def test_parse_event_takes_json_event_lines_only():
    assert parse_event('{"event":"done","path":"/c/k"}\n') == {"event": "done", "path": "/c/k"}
    stamped = '2026-01-01T00:00:00.123456789Z {"event":"retry","attempt":1}'  # kubectl logs --timestamps
    assert parse_event(stamped) == {"event": "retry", "attempt": 1}
    for line in ("", "Traceback (most recent call last):", "{not json", '{"no":"event"}', '["event"]',
                 '{"event": 3}', "Trying to resume download..."):  # fmt: skip
        assert parse_event(line) is None, line


def _events(*evs):
    lines = [json.dumps(e) for e in evs] + ["a stray warning"]
    return [e for e in map(parse_event, lines) if e is not None]


def test_summarize_follows_a_download_to_ready():
    assert summarize([]) == Progress(PENDING)
    start = {"event": "start", "repo": "o/x", "sha": "a" * 40, "files_total": 2, "bytes_total": 30 * MiB}
    p = summarize(_events(start))
    assert (p.phase, p.bytes_done, p.bytes_total, p.files_total) == (DOWNLOADING, 0, 30 * MiB, 2)
    progress = {"event": "progress", "bytes_done": 12 * MiB, "bytes_total": 30 * MiB, "files_done": 1,
                "files_total": 2, "rate_bps": 2 * MiB, "eta_seconds": 9.0}  # fmt: skip
    p = summarize(_events(start, progress))
    assert (p.bytes_done, p.files_done, p.rate_bps, p.eta_seconds) == (12 * MiB, 1, 2 * MiB, 9.0)
    retry = {"event": "retry", "attempt": 1, "delay": 1, "error": "ReadError: reset"}
    p = summarize(_events(start, progress, retry))
    assert (p.phase, p.message, p.bytes_done, p.rate_bps) == (RETRYING, "ReadError: reset", 12 * MiB, None)
    assert summarize(_events(start, progress, retry, progress)).phase == DOWNLOADING
    done = {"event": "done", "bytes_downloaded": 30 * MiB, "bytes_total": 30 * MiB, "files": ["a", "b"],
            "path": "/c/k"}  # fmt: skip
    assert summarize(_events(start, progress, done)) == Progress(READY, 30 * MiB, 30 * MiB, 2, 2)


def test_summarize_a_cached_entry_and_a_failure():
    cached = {"event": "done", "bytes_downloaded": 0, "bytes_total": 5, "files": ["c.json"], "path": "/c/k"}
    assert summarize([cached]).phase == READY  # a tail with no start
    err = {"event": "error", "reason": "GatedRepo", "message": "o/x is gated", "permanent": True}
    p = summarize([{"event": "start", "bytes_total": 10}, err])
    assert (p.phase, p.reason, p.message, p.bytes_total) == (FAILED, "GatedRepo", "o/x is gated", 10)


def test_summarize_tolerates_odd_values():
    p = summarize([{"event": "progress", "bytes_done": "12", "bytes_total": True, "rate_bps": None}])
    assert (p.phase, p.bytes_done, p.bytes_total, p.rate_bps) == (DOWNLOADING, 0, 0, None)


def test_format_summary():
    p = Progress(DOWNLOADING, int(12.3 * MiB), 30 * MiB, 1, 2, rate_bps=2.1 * MiB, eta_seconds=8.2)
    assert format_summary(p) == "41% 12.3/30.0 MiB 2.1 MiB/s ETA 8s"
    assert format_summary(Progress(DOWNLOADING, 0, 3 * 1024**3)) == "0% 0.0/3.0 GiB"
    assert format_summary(Progress(DOWNLOADING, 500, 900)) == "56% 500/900 B"
    assert format_summary(Progress(RETRYING, 5 * MiB, 10 * MiB, message="x")) == "50% 5.0/10.0 MiB retrying"
    assert format_summary(Progress(DOWNLOADING, 999, 1000)).startswith("99% ")  # 100% only when complete
    assert format_summary(Progress(READY, 1, 1)) == "Ready"
    assert format_summary(Progress(FAILED, reason="GatedRepo")) == "Failed: GatedRepo"
    assert format_summary(Progress(PENDING)) == "Pending"
    assert format_summary(Progress(RETRYING)) == "Retrying"


def test_units():
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536 * MiB, 5 * 1024**4)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "5.0 TiB",
    ]  # fmt: skip
    assert [format_duration(s) for s in (0, 8.4, 59.6, 125, 3720, -3)] == [
        "0s",
        "8s",
        "1m00s",
        "2m05s",
        "1h02m",
        "0s",
    ]
