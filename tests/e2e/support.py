"""Helpers of the e2e tier: the running stack (kubectl, API reads, the gateway) and a load generator."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kubeinfer import contract
from kubeinfer_devkit.devcluster.stackstate import Layout

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "examples"
# Durations the tests measured, printed at the end of the run (conftest's terminal summary).
TIMINGS: dict[str, float] = {}


class LocalStack:
    """A stack started by `kubeinfer up`: its kubeconfig, kubectl, gateway and process ids."""

    def __init__(self, root: Path, watchdog: subprocess.Popen[bytes] | None) -> None:
        self.root, self.layout, self.watchdog = root, Layout(root), watchdog
        self._load_kubeconfig()

    def _load_kubeconfig(self) -> None:
        cfg = yaml.safe_load(self.layout.kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = cfg["users"][0]["user"]["token"]
        self._ssl = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )

    @property
    def info(self) -> dict[str, Any]:
        return self.layout.read()

    @property
    def gateway(self) -> str:
        return str(self.info["gateway"])

    def pid(self, component: str) -> int:
        return int(self.info["processes"][component]["pid"])

    # -- Kubernetes ---------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.info["kubectl"], "--kubeconfig", str(self.layout.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120, check=check,
        )  # fmt: skip

    def api(self, path: str) -> Any:
        """GET an API path as the admin; None on 404. Lighter than a kubectl process per poll."""
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def model(self, name: str, ns: str = "default") -> dict[str, Any] | None:
        path = f"/apis/{contract.GROUP}/{contract.VERSION}/namespaces/{ns}/{contract.PLURAL}/{name}"
        result: dict[str, Any] | None = self.api(path)
        return result

    def condition(self, name: str, kind: str) -> dict[str, Any]:
        obj = self.model(name) or {}
        return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})

    def pods(self, model: str, ns: str = "default") -> list[dict[str, Any]]:
        sel = f"{contract.LABEL_MODEL}%3D{model}"
        items: list[dict[str, Any]] = self.api(f"/api/v1/namespaces/{ns}/pods?labelSelector={sel}")["items"]
        return items

    def serving(self, model: str) -> list[dict[str, Any]]:
        """Pods of the model that are Ready and not terminating."""
        return [p for p in self.pods(model) if not p["metadata"].get("deletionTimestamp") and is_ready(p)]

    def events(self, ns: str = "default") -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api(f"/api/v1/namespaces/{ns}/events")["items"]
        return items

    def apply(self, example: str, name: str | None = None, **spec: Any) -> dict[str, Any]:
        """kubectl apply -f of examples/<example>, with spec fields changed (and renamed)."""
        doc = yaml.safe_load((EXAMPLES / example).read_text())
        if name:
            doc["metadata"]["name"] = name
        doc["spec"].update(spec)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
            fh.write(yaml.safe_dump(doc))
            fh.flush()
            self.kubectl("apply", "-f", fh.name)
        return dict(doc)

    def scale(self, model: str, replicas: int) -> None:
        self.kubectl("scale", f"llm/{model}", f"--replicas={replicas}")

    def wait_serving(self, model: str, n: int, timeout: float = 120) -> list[dict[str, Any]]:
        """Until exactly n pods serve and no other pod of the model is left (terminating included)."""

        def done() -> list[dict[str, Any]] | None:
            pods = self.pods(model)
            ok = self.serving(model)
            return ok if len(ok) == n and len(pods) == n else None

        return wait_for(done, timeout, f"{n} serving pods of {model} and no others")

    def gateway_replicas(self, model: str) -> list[dict[str, Any]]:
        data = httpx.get(f"{self.gateway}/v1/admin/models", timeout=10).json()["data"]
        entry = next((m for m in data if m["name"] in (model, f"default/{model}")), None)
        return list(entry["replicaStats"]) if entry else []

    def openai(self) -> Any:
        from openai import OpenAI

        # No SDK retries: every failure must show.
        return OpenAI(base_url=f"{self.gateway}/v1", api_key="none", max_retries=0, timeout=120)


def is_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def engine_pid(pod: dict[str, Any]) -> int:
    """The node agent names a container's local process in its containerID: kubeinfer://<pid>."""
    cid = pod["status"]["containerStatuses"][0]["containerID"]
    assert cid.startswith("kubeinfer://"), cid
    return int(cid.removeprefix("kubeinfer://"))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    t0 = time.monotonic()
    last_exc: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, ValueError, KeyError) as exc:
            last_exc = exc
        if time.monotonic() - t0 > timeout:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})"
            )
        time.sleep(every)


# --- Load ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    status: int | None = None
    replica: str | None = None
    error: str = ""


@dataclass
class Load:
    """`workers` clients sending non-streamed chat completions through the gateway back to back."""

    gateway: str
    model: str
    workers: int = 4
    max_tokens: int = 8
    outcomes: list[Outcome] = field(default_factory=list)

    async def __aenter__(self) -> Load:
        self._stop = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=60, trust_env=False)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    async def _worker(self, i: int) -> None:
        body = {"model": self.model, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": f"worker {i} says hello"}]}  # fmt: skip
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = await self._client.post(f"{self.gateway}/v1/chat/completions", json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
                replica = r.headers.get("x-kubeinfer-replica")
                error = "" if ok else r.text[:300]
                self.outcomes.append(Outcome(t0, time.monotonic(), ok, r.status_code, replica, error))
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.outcomes.append(Outcome(t0, time.monotonic(), False, None, None, repr(exc)))
                await asyncio.sleep(0.05)  # the gateway is down: do not spin

    def failures(self, after: float = 0.0, before: float = float("inf")) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and o.started >= after and o.ended <= before]

    def succeeded(self, after: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok and o.started >= after]

    async def wait_requests(self, n: int, timeout: float = 60) -> None:
        """Until n more requests succeeded (traffic is really flowing)."""
        target = len(self.succeeded()) + n
        t0 = time.monotonic()
        while len(self.succeeded()) < target:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"load: fewer than {n} requests succeeded in {timeout}s: {self.failures()[-3:]}"
                )
            await asyncio.sleep(0.1)


@dataclass
class StreamResult:
    replica: str | None
    status: int
    chunks: int = 0
    done: bool = False  # ended with data: [DONE]
    error: dict[str, Any] | None = None  # an SSE `data: {"error": ...}` event


async def stream_chat(
    client: httpx.AsyncClient,
    gateway: str,
    model: str,
    max_tokens: int,
    on_first: Callable[[str | None], Any] | None = None,
) -> StreamResult:
    """One streamed chat completion; `on_first(replica)` runs when the first content chunk arrives."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}  # fmt: skip
    async with client.stream("POST", f"{gateway}/v1/chat/completions", json=body) as resp:
        result = StreamResult(resp.headers.get("x-kubeinfer-replica"), resp.status_code)
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                result.done = True
                continue
            data = json.loads(line[6:])
            if "error" in data:
                result.error = data["error"]
                continue
            result.chunks += 1
            if result.chunks == 1 and on_first is not None:
                on_first(result.replica)
    return result
