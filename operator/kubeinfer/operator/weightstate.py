"""Where the weight cache's entries stand, from their download Jobs and logs: pure functions.

operator/weights.py gathers the inputs (Jobs, pod log tails) and status.py puts the result in the
model's status (status.weights, the WeightsReady condition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.render.weights import CacheEntry, entries
from kubeinfer.weights import progress


@dataclass(frozen=True)
class EntryState:
    """Where one cache entry stands."""

    entry: CacheEntry
    phase: str  # Pending | Downloading | Ready | Failed
    job: str
    p: progress.Progress
    created: bool = False  # its Job was created on this pass (an Event says so)


def job_phase(job: dict[str, Any] | None) -> str:
    """Complete, Failed, or Running (also for a Job whose pod has not started yet)."""
    for c in (job or {}).get("status", {}).get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "Complete"
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return "Failed"
    return "Running"


def _job_failure(job: dict[str, Any]) -> str:
    for c in job.get("status", {}).get("conditions") or []:
        if c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True":
            return f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    return "the download Job failed"


def entry_state(
    entry: CacheEntry, name: str, job: dict[str, Any] | None, log: list[str], message: str | None
) -> EntryState:
    """An entry's state from its Job and the tail of its pod's log (pure)."""
    p = progress.summarize(e for e in map(progress.parse_event, log) if e is not None)
    phase = job_phase(job)
    if phase == "Complete":
        return EntryState(
            entry, "Ready", name, progress.Progress(progress.READY, p.bytes_total, p.bytes_total)
        )
    if phase == "Failed":
        if p.phase != progress.FAILED:
            # No error event in the log (gone, or the pod was killed): the termination message or the
            # Job's own condition says what happened.
            last = progress.parse_event(message or "")
            if last is not None and last.get("event") == "error":
                p = progress.summarize([last])
            else:
                p = progress.Progress(
                    progress.FAILED, reason="JobFailed", message=message or _job_failure(job or {})
                )
        return EntryState(entry, "Failed", name, p)
    if p.phase in (progress.DOWNLOADING, progress.RETRYING):
        return EntryState(entry, "Downloading", name, p)
    return EntryState(entry, "Pending", name, p)


def ready_in_status(model: LLMModel, previous: dict[str, Any]) -> bool:
    """Whether the last status already saw every entry this spec needs Ready (no API call needed)."""
    wanted = {e.key for e in entries(model)}
    if not wanted:
        return True
    seen = {
        e.get("key")
        for e in (previous.get("weights") or {}).get("entries") or []
        if e.get("phase") == "Ready"
    }
    return wanted <= seen


def weights_status(states: list[EntryState]) -> dict[str, Any] | None:
    """status.weights: every entry, and their sum in one line for `kubectl get llm` (pure)."""
    if not states:
        return None
    phases = [s.phase for s in states]
    if "Failed" in phases:
        phase = "Failed"
    elif all(p == "Ready" for p in phases):
        phase = "Ready"
    elif "Downloading" in phases:
        phase = "Downloading"
    else:
        phase = "Pending"
    done = sum(s.p.bytes_done for s in states)
    total = sum(s.p.bytes_total for s in states)
    rate = sum(s.p.rate_bps or 0.0 for s in states if s.phase == "Downloading") or None
    failed = next((s for s in states if s.phase == "Failed"), None)
    if failed is not None:
        summary = progress.format_summary(failed.p)
    elif phase == "Ready":
        summary = "Ready"
    else:
        retrying = any(s.p.phase == progress.RETRYING for s in states)
        eta = (total - done) / rate if rate and total > done else None
        shown = progress.DOWNLOADING if phase == "Downloading" else progress.PENDING
        summary = progress.format_summary(
            progress.Progress(
                progress.RETRYING if retrying else shown,
                bytes_done=done, bytes_total=total, rate_bps=rate, eta_seconds=eta,
            )
        )  # fmt: skip
    return {
        "phase": phase,
        "summary": summary,
        "bytesDone": done,
        "bytesTotal": total,
        "rateBytesPerSecond": round(rate, 1) if rate else None,
        "etaSeconds": int((total - done) / rate) if rate and total > done else None,
        "entries": [_entry_status(s) for s in states],
    }


def _entry_status(s: EntryState) -> dict[str, Any]:
    out: dict[str, Any] = {"key": s.entry.key, "source": s.entry.source, "phase": s.phase, "job": s.job}
    if s.p.bytes_total:
        out.update(bytesDone=s.p.bytes_done, bytesTotal=s.p.bytes_total)
    if s.p.files_total:
        out.update(filesDone=s.p.files_done, filesTotal=s.p.files_total)
    if s.phase == "Failed":
        out.update(reason=s.p.reason or "Failed", message=(s.p.message or "")[:1000])
    elif s.p.phase == progress.RETRYING and s.p.message:
        out.update(reason="Retrying", message=s.p.message[:1000])
    return out


def weights_condition(states: list[EntryState]) -> tuple[str, str, str] | None:
    """(status, reason, message) of the WeightsReady condition (pure)."""
    if not states:
        return None
    failed = [s for s in states if s.phase == "Failed"]
    if failed:
        s = failed[0]
        what = f"{s.entry.name} weights" if s.entry.role == "model" else f"adapter {s.entry.name}"
        return (
            "False",
            s.p.reason or "DownloadFailed",
            f"{what} from {s.entry.source}: {s.p.message or ''}"[:1000],
        )
    waiting = [s for s in states if s.phase != "Ready"]
    if not waiting:
        return "True", "Cached", f"{len(states)} cache entr{'y' if len(states) == 1 else 'ies'} complete"
    summary = weights_status(waiting)
    line = summary["summary"] if summary else ""
    names = ", ".join(s.entry.source for s in waiting)
    reason = "Downloading" if any(s.phase == "Downloading" for s in waiting) else "DownloadPending"
    return "False", reason, f"fetching {names}: {line}"[:1000]


def progress_milestone(previous: dict[str, Any] | None, current: dict[str, Any] | None) -> str | None:
    """An Event's message when a download passes 25, 50 or 75 % (pure): progress for `kubectl
    describe` and event sinks, without an Event per poll."""

    def quarter(w: dict[str, Any] | None) -> int:
        w = w or {}
        total = int(w.get("bytesTotal") or 0)
        return (
            4 * int(w.get("bytesDone") or 0) // total if total > 0 and w.get("phase") == "Downloading" else 0
        )

    q = quarter(current)
    if current is None or not 0 < q < 4 or q <= quarter(previous):
        return None
    return f"{25 * q}% of the weights downloaded: {current.get('summary', '')}"
