"""`kubeinfer bench coldstart`: time from the first request at zero replicas to the first token, split
into phases, on the local stack (`kubeinfer up`) with the tiny GGUF model on llama-server.

The bench applies its own LLMModel (examples/tiny-gguf-cpu.yaml renamed, `autoscaling.minReplicas: 0`,
a long `scaleDownDelay` so the autoscaler leaves it alone mid-run), then per run scales it to zero
(once the autoscaler's window has forgotten the last run: it would scale straight back up), waits
until no pod is left and the gateway lists it as `scaled-to-zero`, watches the model, its Deployment
and its pods, waits a random 0..pause s (out of step with the autoscaler's rounds), and sends one
streaming chat completion through the gateway. Kubernetes
timestamps have one-second resolution, so every mark is the bench's own monotonic clock when a watch
event (or a stream line) showed the change:

    request            the request is sent
    first_comment      the gateway's first `: kubeinfer: starting ...` SSE comment
    replicas_1         the LLMModel's spec.replicas became 1 (the gateway's or the autoscaler's)
    deployment_scaled  the Deployment's spec.replicas became 1 (the operator reacted)
    pod_created        the pod exists
    pod_scheduled      its PodScheduled condition is True
    container_running  its container runs (the node agent started llama-server)
    pod_ready          its Ready condition is True (llama-server answers /health)
    first_token        the first SSE chunk with content
    end                the stream ended

Phases: scale_requested (request -> replicas_1), schedule (request -> pod_scheduled), engine_start
(pod_scheduled -> pod_ready), first_token (pod_ready -> first_token: the gateway noticing readiness,
then prefill and the first decode step), total (request -> first token). The goal: every run's first
token within 10 s of its request.

The pure parts (`pod_marks`, `replicas_mark`, `zero_step`, `phases`, `offsets`, `summarize_phases`,
`goal`, `format_coldstart`) take numbers and dicts; `run_coldstart` talks to the stack.

This file is over 500 lines because the marks, their arithmetic and the watcher that records them
read as one story; the pure half (the first 180 lines) is what the unit tests cover.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import ssl
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kubeinfer import contract
from kubeinfer_devkit.bench.report import _columns, _num
from kubeinfer_devkit.bench.stats import percentile, spread

TARGET_S = 10.0
PHASES: tuple[tuple[str, str, str], ...] = (
    # (phase, from mark, to mark)
    ("scale_requested", "request", "replicas_1"),
    ("schedule", "request", "pod_scheduled"),
    ("engine_start", "pod_scheduled", "pod_ready"),
    ("first_token", "pod_ready", "first_token"),
    ("total", "request", "first_token"),
)
MARKS = (
    "first_comment",
    "replicas_1",
    "deployment_scaled",
    "pod_created",
    "pod_scheduled",
    "container_running",
    "pod_ready",
    "first_token",
    "end",
)
# Marks the watches must have seen before a run's observation stops (the stream gives the others).
WATCHED = (
    "replicas_1",
    "deployment_scaled",
    "pod_created",
    "pod_scheduled",
    "container_running",
    "pod_ready",
)
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "tiny-gguf-cpu.yaml"


# --- Pure: marks, phases, statistics, goal, table ------------------------------------------------------


def _condition(obj: Mapping[str, Any], kind: str) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conds)


def pod_marks(pod: Mapping[str, Any], now: float, marks: dict[str, float]) -> None:
    """Record in `marks` what `pod` shows at time `now`, each mark only the first time it is seen."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return  # a pod on its way out (from before the run) says nothing about this start
    seen = {
        "pod_created": True,
        "pod_scheduled": _condition(pod, "PodScheduled"),
        "pod_ready": _condition(pod, "Ready"),
    }
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    seen["container_running"] = any((s.get("state") or {}).get("running") for s in statuses)
    for mark, shown in seen.items():
        if shown:
            marks.setdefault(mark, now)


def replicas_mark(obj: Mapping[str, Any], now: float, marks: dict[str, float], mark: str) -> None:
    """`mark` at `now` the first time `obj` (the LLMModel, the Deployment) asks for a replica or more."""
    if int((obj.get("spec") or {}).get("replicas") or 0) >= 1:
        marks.setdefault(mark, now)


def _between(marks: Mapping[str, float], start: str, end: str) -> float | None:
    if start not in marks or end not in marks:
        return None
    return marks[end] - marks[start]


def phases(marks: Mapping[str, float]) -> dict[str, float | None]:
    """Seconds of each phase from the observed marks (a `request` mark included); None when a mark
    the phase needs was not observed."""
    return {name: _between(marks, start, end) for name, start, end in PHASES}


def offsets(marks: Mapping[str, float]) -> dict[str, float | None]:
    """Every mark in seconds after the request (None when not observed): the timeline of one run."""
    return {mark: _between(marks, "request", mark) for mark in MARKS}


def summarize_phases(runs: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """{phase: {min, median, max, mean, stddev, runs}} over the runs' phase dicts (None skipped)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, _, _ in PHASES:
        values = [v for run in runs if (v := run.get(name)) is not None]
        s = spread(values)
        out[name] = {"min": s["min"], "median": percentile(values, 50), "max": s["max"], "mean": s["mean"],
                     "stddev": s["stddev"], "runs": len(values)}  # fmt: skip
    return out


def goal(totals: Sequence[float | None], target: float = TARGET_S) -> dict[str, Any]:
    """Met when every run produced a first token within `target` seconds of its request."""
    within = sum(1 for t in totals if t is not None and t <= target)
    known = [t for t in totals if t is not None]
    return {"target_s": target, "met": bool(totals) and within == len(totals), "runs_within": within,
            "runs": len(totals), "worst_s": max(known) if known else None}  # fmt: skip


def _s(v: float | None) -> str:
    return "-" if v is None else _num(round(v, 3))


def format_coldstart(result: Mapping[str, Any]) -> str:
    """The human report: one column per run and min/median/max per phase, the timeline, the goal."""
    runs: list[Mapping[str, Any]] = result["runs"]
    head = f"model {result['model']} on {result['gateway']}; {len(runs)} runs, seconds"
    rows = [["phase", *(f"run {i + 1}" for i in range(len(runs))), "min", "median", "max"]]
    for name, _, _ in PHASES:
        s = result["summary"][name]
        rows.append(
            [name, *(_s(run["phases"][name]) for run in runs), _s(s["min"]), _s(s["median"]), _s(s["max"])]
        )
    timeline = [["after the request", *(f"run {i + 1}" for i in range(len(runs)))]]
    timeline += [[mark, *(_s(run["offsets"][mark]) for run in runs)] for mark in MARKS]
    g = result["goal"]
    verdict = "goal met" if g["met"] else "goal missed"
    errors = [f"run {i + 1}: {run['error']}" for i, run in enumerate(runs) if run.get("error")]
    return (
        f"{head}\n\n{_columns(rows)}\n\n{_columns(timeline)}\n\n"
        f"{verdict}: {g['runs_within']}/{g['runs']} runs had a first token within {g['target_s']:g} s of "
        f"the request (worst {_s(g['worst_s'])} s)\n" + "".join(f"{e}\n" for e in errors)
    )


# --- Against the local stack ---------------------------------------------------------------------------


class StackError(RuntimeError):
    pass


@dataclass
class ColdstartConfig:
    state_dir: Path
    runs: int = 5
    model_name: str = "coldstart-tiny"
    timeout: float = 120.0
    keep: bool = False
    max_tokens: int = 8
    pause: float = 2.0
    """Each request waits a random 0..pause s (seeded) once the watches are open, so that runs do not
    fall in step with the operator's periodic autoscaler rounds (the wait for zero ends on one)."""
    seed: int = 0
    namespace: str = "default"

    def validate(self) -> None:
        if self.runs < 1:
            raise ValueError("--runs must be at least 1")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.pause < 0:
            raise ValueError("--pause must not be negative")


@dataclass
class RunResult:
    phases: dict[str, float | None]
    offsets: dict[str, float | None]
    comments: list[str] = field(default_factory=list)
    status: int | None = None
    error: str = ""


def model_manifest(name: str, namespace: str = "default") -> dict[str, Any]:
    """examples/tiny-gguf-cpu.yaml as the bench's model: renamed, at zero, autoscaled from zero."""
    try:
        doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    except OSError as exc:
        raise StackError(f"{EXAMPLE}: {exc.strerror} (the bench runs from a kubeinfer checkout)") from None
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["model"]["servedName"] = name
    doc["spec"]["replicas"] = 0
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelay": "10m"}
    return doc


class Stack:
    """The running local stack: its API server (bearer token and CA from its kubeconfig), kubectl,
    and the gateway."""

    def __init__(self, state_dir: Path) -> None:
        from kubeinfer_devkit.devcluster.stackstate import Layout, running

        layout = Layout(state_dir)
        info = layout.read()
        if not layout.state.exists() or not running(layout) or info.get("status") != "ready":
            raise StackError(f"no local stack is ready in {layout.root}: start it with `kubeinfer up`")
        self.gateway = str(info["gateway"]).rstrip("/")
        self.kubectl_bin = str(info["kubectl"])
        self.kubeconfig = layout.kubeconfig
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.server = str(cluster["server"])
        self.token = str(cfg["users"][0]["user"]["token"])
        self.ssl = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )

    def kubectl(self, *args: str, input: str | None = None) -> str:
        r = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if r.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def api_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server, verify=self.ssl, headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(10.0, read=None), trust_env=False,
        )  # fmt: skip


def _paths(config: ColdstartConfig) -> dict[str, str]:
    ns, name = config.namespace, config.model_name
    return {
        "model": f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{ns}/{contract.PLURAL}"
        f"?fieldSelector=metadata.name%3D{name}",
        "deployment": f"/apis/apps/v1/namespaces/{ns}/deployments"
        f"?fieldSelector=metadata.name%3D{contract.child_name(name)}",
        "pods": f"/api/v1/namespaces/{ns}/pods?labelSelector={contract.LABEL_MODEL}%3D{name}",
    }


class Watcher:
    """List + watch of the model, its Deployment and its pods, turning each change into marks."""

    def __init__(self, api: httpx.AsyncClient, config: ColdstartConfig) -> None:
        self.api, self.paths = api, _paths(config)
        self.marks: dict[str, float] = {}
        self.changed = asyncio.Event()
        self._opened: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []

    def _see(self, kind: str, obj: Mapping[str, Any], now: float) -> None:
        if kind == "model":
            replicas_mark(obj, now, self.marks, "replicas_1")
        elif kind == "deployment":
            replicas_mark(obj, now, self.marks, "deployment_scaled")
        else:
            pod_marks(obj, now, self.marks)
        self.changed.set()

    async def start(self) -> None:
        for kind, path in self.paths.items():
            opened = asyncio.Event()
            self._opened.append(opened)
            self._tasks.append(asyncio.create_task(self._watch(kind, path, opened)))
        # The apiserver sends a watch's headers at once: from then on no change is missed.
        deadline = time.monotonic() + 15
        while not all(e.is_set() for e in self._opened):
            failed = [t for t in self._tasks if t.done()]
            if failed:
                raise StackError(f"watch of {list(self.paths)} ended: {failed[0].exception()}")
            if time.monotonic() > deadline:
                raise StackError("the watches did not open within 15 s")
            await asyncio.sleep(0.01)

    async def _watch(self, kind: str, path: str, opened: asyncio.Event) -> None:
        listed = (await self.api.get(path)).raise_for_status().json()
        now = time.monotonic()
        for obj in listed.get("items") or []:
            self._see(kind, obj, now)
        rv = listed["metadata"]["resourceVersion"]
        params = {"watch": "1", "resourceVersion": rv, "timeoutSeconds": "600"}
        async with self.api.stream("GET", path, params=params) as resp:
            resp.raise_for_status()
            opened.set()
            async for line in resp.aiter_lines():
                now = time.monotonic()
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") in ("ADDED", "MODIFIED"):
                    self._see(kind, event["object"], now)

    async def wait_all(self, timeout: float) -> None:
        """Until every watched mark is in (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while not all(m in self.marks for m in WATCHED) and time.monotonic() < deadline:
            self.changed.clear()
            failed = [t for t in self._tasks if t.done() and t.exception()]
            if failed:
                raise StackError(f"watch failed: {failed[0].exception()}")
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _content(data: str) -> str | None:
    try:
        chunk = json.loads(data)
        delta = chunk["choices"][0].get("delta") or {}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    content = delta.get("content")
    return content if isinstance(content, str) else None


async def stream_once(
    http: httpx.AsyncClient, gateway: str, model: str, max_tokens: int, marks: dict[str, float]
) -> RunResult:
    """One streaming chat completion; marks request, first_comment, first_token and end."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "stream": True}  # fmt: skip
    result = RunResult(phases={}, offsets={})
    empty_at: float | None = None  # a chunk with empty content: the first token if no text ever comes
    marks["request"] = time.monotonic()
    async with http.stream("POST", f"{gateway}/v1/chat/completions", json=body) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            result.error = f"status {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
        else:
            async for line in resp.aiter_lines():
                now = time.monotonic()
                if line.startswith(":"):
                    marks.setdefault("first_comment", now)
                    result.comments.append(line)
                elif line.startswith("data: ") and line != "data: [DONE]":
                    if '"error"' in line and not result.error:
                        result.error = line[6:300]
                    content = _content(line[6:])
                    if content:
                        marks.setdefault("first_token", now)
                    elif content is not None and empty_at is None:
                        empty_at = now
    marks["end"] = time.monotonic()
    if "first_token" not in marks and empty_at is not None and not result.error:
        marks["first_token"] = empty_at
    if "first_token" not in marks and not result.error:
        result.error = "the stream ended without a token"
    return result


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


async def _listed_state(http: httpx.AsyncClient, gateway: str, model: str) -> str | None:
    try:
        data = (await http.get(f"{gateway}/v1/models")).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return next((str(m.get("state")) for m in data if m.get("id") == model), None)


def zero_step(model: Mapping[str, Any] | None, pods: int, listed: str | None) -> str:
    """What getting a model to zero needs next, from what is seen now: "scale" (`kubectl scale` to 0),
    "autoscaler" (its window still holds the last run's load, so it would scale straight back up:
    wait until it recommends 0), "wait" (pods still stopping, the gateway not yet told) or "done"."""
    if model is None:
        raise StackError("the bench's model is gone")
    if int((model.get("spec") or {}).get("replicas") or 0) != 0:
        auto = (model.get("status") or {}).get("autoscaling") or {}
        return "autoscaler" if int(auto.get("desiredReplicas") or 0) > 0 else "scale"
    return "done" if pods == 0 and listed == "scaled-to-zero" else "wait"


async def _at_zero(
    stack: Stack, api: httpx.AsyncClient, http: httpx.AsyncClient, config: ColdstartConfig
) -> None:
    """Scale the model to zero and wait until no pod is left, the gateway lists it at zero, and it
    stays there (the autoscaler does not scale it back up)."""
    name, paths = config.model_name, _paths(config)
    deadline = time.monotonic() + config.timeout
    done_since: float | None = None
    step = ""
    while True:
        items = (await api.get(paths["model"])).raise_for_status().json()["items"]
        pods = len((await api.get(paths["pods"])).raise_for_status().json()["items"])
        step = zero_step(items[0] if items else None, pods, await _listed_state(http, stack.gateway, name))
        if step == "scale":
            await asyncio.to_thread(
                stack.kubectl, "scale", f"{contract.PLURAL}/{name}", "--replicas=0", "-n", config.namespace
            )
        if step != "done":
            done_since = None
        elif done_since is None:
            done_since = time.monotonic()
        elif time.monotonic() - done_since >= 1.0:  # and stayed so: the scale-down has settled
            return
        if time.monotonic() > deadline:
            waiting = {
                "autoscaler": "the autoscaler to recommend 0 replicas",
                "scale": "the scale to 0",
                "wait": "no pods and the gateway listing it as scaled-to-zero",
            }.get(step, step)
            raise StackError(
                f"timed out after {config.timeout:.0f}s getting {name} to zero: waiting for {waiting}"
            )
        await asyncio.sleep(0.25)


async def _one_run(
    stack: Stack, api: httpx.AsyncClient, http: httpx.AsyncClient, config: ColdstartConfig, index: int
) -> RunResult:
    await _at_zero(stack, api, http, config)
    watcher = Watcher(api, config)
    try:
        await watcher.start()
        await asyncio.sleep(random.Random(config.seed + index).uniform(0, config.pause))
        if any(m in watcher.marks for m in WATCHED):
            raise StackError(f"{config.model_name} left zero replicas before the request of run {index + 1}")
        marks = watcher.marks  # the stream adds its marks to the same dict
        try:
            result = await asyncio.wait_for(
                stream_once(http, stack.gateway, config.model_name, config.max_tokens, marks), config.timeout
            )
        except (TimeoutError, httpx.HTTPError) as exc:
            result = RunResult(phases={}, offsets={}, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        await watcher.wait_all(timeout=5.0)
    finally:
        await watcher.stop()
    result.phases, result.offsets = phases(marks), offsets(marks)
    return result


async def run_coldstart(
    config: ColdstartConfig, on_step: Callable[[str], None] | None = None
) -> dict[str, Any]:
    say = on_step or (lambda _: None)
    config.validate()
    stack = Stack(config.state_dir)
    doc = model_manifest(config.model_name, config.namespace)
    runs: list[RunResult] = []
    load_before = os.getloadavg()
    async with stack.api_client() as api, httpx.AsyncClient(timeout=config.timeout, trust_env=False) as http:
        say(f"applying {config.model_name} (replicas 0, autoscaling from zero)")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            fh.write(yaml.safe_dump(doc))
            fh.flush()
            await asyncio.to_thread(stack.kubectl, "apply", "-f", fh.name)
        try:

            async def listed() -> bool:
                return await _listed_state(http, stack.gateway, config.model_name) == "scaled-to-zero"

            await _until(f"the gateway to list {config.model_name} as scaled-to-zero", listed, config.timeout)
            for i in range(config.runs):
                say(f"run {i + 1}/{config.runs}")
                run = await _one_run(stack, api, http, config, i)
                total = run.phases["total"]
                say(
                    f"run {i + 1}/{config.runs}: first token {_s(total)} s after the request"
                    + (f" ({run.error})" if run.error else "")
                )
                runs.append(run)
        finally:
            if not config.keep:
                say(f"deleting {config.model_name}")
                await asyncio.to_thread(
                    stack.kubectl, "delete", contract.PLURAL, config.model_name, "-n", config.namespace,
                    "--ignore-not-found", "--wait=false",
                )  # fmt: skip
    per_run = [r.phases for r in runs]
    return {
        "model": config.model_name,
        "gateway": stack.gateway,
        "state_dir": str(config.state_dir),
        "runs_requested": config.runs,
        "max_tokens": config.max_tokens,
        "pause_s": config.pause,
        "seed": config.seed,
        "cpus": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "runs": [asdict(r) for r in runs],
        "summary": summarize_phases(per_run),
        "goal": goal([p["total"] for p in per_run]),
    }
