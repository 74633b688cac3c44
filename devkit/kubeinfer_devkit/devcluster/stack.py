"""`kubeinfer up` / `kubeinfer down`: the whole local stack on one machine, no GPU, no Docker.

`up` starts the stack's supervisor (:mod:`kubeinfer_devkit.devcluster.supervisor`) detached (unless
``--foreground``), shows its progress, and returns when the stack is ready; with ``-f`` it also
applies a model, waits for Ready and sends a first chat completion through the gateway. A second `up`
finds the running stack (the supervisor holds a lock on ``stack.lock``) or restarts a stopped one on
the same state: the cluster's etcd data, certificates and (if free) ports are kept, so models applied
earlier come back. `down` stops the supervisor and kills whatever it left behind. The state
directory is described in :mod:`kubeinfer_devkit.devcluster.stackstate`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubeinfer import contract
from kubeinfer_devkit.devcluster import localhub, procs
from kubeinfer_devkit.devcluster.stackstate import (
    DEFAULT_GATEWAY_PORT,
    MODELS_CLAIM,
    NAMESPACE,
    Layout,
    default_state_dir,
    running,
    say,
    try_lock,
)
from kubeinfer_devkit.devcluster.supervisor import Stack, ensure_claim, run

READY_TIMEOUT = 900.0  # apply -> Ready: vLLM on CPU takes 45-95 s, a first vLLM import longer


def _spawn_supervisor(layout: Layout, gateway_port: int) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / "stack.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeinfer_devkit.devcluster.supervisor", "--state-dir", str(layout.root),
             "--gateway-port", str(gateway_port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: outlives this command and the terminal's Ctrl-C
        )  # fmt: skip


def _follow(layout: Layout, supervisor: subprocess.Popen[bytes] | None, offset: int) -> bool:
    """Show the supervisor's log until the stack is ready (True) or failed (False)."""
    log = layout.logs / "stack.log"
    while True:
        with contextlib.suppress(OSError), open(log, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
            offset += len(chunk)
            if chunk:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
        status = layout.read().get("status")
        if status == "ready":
            return True
        exited = supervisor.poll() is not None if supervisor is not None else not running(layout)
        if status in ("failed", "stopped") or exited:
            return False
        time.sleep(0.3)


def summary(layout: Layout, model: str = "tiny-gguf") -> str:
    info = layout.read()
    url = info.get("gateway", f"http://127.0.0.1:{DEFAULT_GATEWAY_PORT}")
    kubectl_dir = str(Path(info.get("kubectl", "kubectl")).parent)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32})
    sdk = (
        f'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); '
        f'print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello"}}])'
        ".choices[0].message.content)"
    )
    return "\n".join([
        f"kubeinfer local stack is up (state in {layout.root}):",
        f"  gateway (OpenAI API): {url}/v1",
        f"  export KUBECONFIG={layout.kubeconfig} PATH={kubectl_dir}:$PATH",
        f"  models (claim {MODELS_CLAIM}): {layout.claim_dir(MODELS_CLAIM)}",
        f"  Hugging Face Hub (the download Jobs' HF_ENDPOINT): {info.get('hub', '-')}, repos "
        f"{localhub.ORG}/..., gated ones with the token {localhub.TOKEN}",
        f"  logs: {layout.logs}, pods: {layout.node / 'pods'}",
        "try:",
        "  kubectl apply -f examples/tiny-gguf-cpu.yaml && kubectl get llm -w",
        "  kubectl apply -f examples/tiny-gguf-cached.yaml   # weights and LoRA adapters from the Hub",
        f"  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d {shlex.quote(body)}",
        f"  python -c {shlex.quote(sdk)}",
        "stop: kubeinfer down",
    ])  # fmt: skip


def _models_in(manifest: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if isinstance(d, dict)]
    return [d for d in docs if d.get("kind") == contract.KIND]


def apply_and_first_token(layout: Layout, manifest: Path) -> int:
    """kubectl apply -f, wait for Ready, then one streamed chat completion through the gateway."""
    import httpx

    from kubeinfer_devkit.devcluster import build

    info = layout.read()
    kubectl = info.get("kubectl") or str(build.binary_path("kubectl"))

    def k(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kubectl, "--kubeconfig", str(layout.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip

    models = _models_in(manifest)
    for doc in models:  # pvc:// sources need their claim in the model's namespace
        source = str(((doc.get("spec") or {}).get("model") or {}).get("source") or "")
        ns = (doc.get("metadata") or {}).get("namespace") or NAMESPACE
        if source.startswith("pvc://"):
            ensure_claim(k, layout, ns, source.removeprefix("pvc://").split("/")[0])
    say(f"kubectl apply -f {manifest}")
    t0 = time.monotonic()
    try:
        out = k("apply", "-f", str(manifest))
    except subprocess.CalledProcessError as exc:
        say(f"kubectl apply failed:\n{exc.stderr}")
        return 1
    sys.stderr.write(out.stdout)
    gateway = info["gateway"]
    for doc in models:
        meta = doc["metadata"]
        name, ns = meta["name"], meta.get("namespace") or NAMESPACE
        served = ((doc.get("spec") or {}).get("model") or {}).get("servedName") or name
        last = ""
        while True:
            obj = json.loads(k("get", "llm", name, "-n", ns, "-o", "json").stdout)
            conds = (obj.get("status") or {}).get("conditions") or []
            text = ", ".join(f"{c['type']}={c['status']}({c.get('reason', '')})" for c in conds)
            if text and text != last:
                say(f"{name}: {text}")
                last = text
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                break
            if time.monotonic() - t0 > READY_TIMEOUT:
                say(f"{name} not Ready after {READY_TIMEOUT:.0f}s; see kubectl describe pods -n {ns}")
                return 1
            time.sleep(0.5)
        ready = time.monotonic() - t0
        say(f"{name} Ready {ready:.1f}s after apply; asking it something through the gateway")
        body = {"model": served, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 24,
                "stream": True}  # fmt: skip
        reply, first, replica = "", None, "?"
        with httpx.Client(timeout=120, trust_env=False) as http:
            for attempt in range(60):  # the gateway sees the replica a moment after the model is Ready
                with http.stream("POST", f"{gateway}/v1/chat/completions", json=body) as resp:
                    if resp.status_code in (404, 503) and attempt < 59:
                        time.sleep(0.5)
                        continue
                    resp.raise_for_status()
                    replica = resp.headers.get("x-kubeinfer-replica", "?")
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                        if delta.get("content"):
                            first = first or time.monotonic() - t0
                            reply += delta["content"]
                break
        print(f"{served} (replica {replica}) says: {reply!r}")
        print(f"apply -> Ready {ready:.1f}s, apply -> first token {first or 0:.1f}s")
    return 0


def up(
    state_dir: Path | None = None,
    manifest: Path | None = None,
    foreground: bool = False,
    gateway_port: int = DEFAULT_GATEWAY_PORT,
) -> int:
    layout = Layout(state_dir or default_state_dir())
    t0 = time.monotonic()
    if running(layout):
        say(f"already running (state in {layout.root})")
        if not _follow(layout, None, _log_size(layout)):
            say(f"the running stack is not ready: {layout.read().get('message')}")
            return 1
    elif foreground:
        return _foreground(layout, manifest, gateway_port)
    else:
        info = layout.read()
        if info.get("status") not in (None, "stopped"):
            say("the last stack was not stopped cleanly; cleaning up its processes")
        _sweep(layout)
        offset = _log_size(layout)
        say(f"starting the local stack (state in {layout.root}, log {layout.logs / 'stack.log'})")
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.write(status="starting", message="")  # not the last run's "stopped"
        supervisor = _spawn_supervisor(layout, gateway_port)
        try:
            ok = _follow(layout, supervisor, offset)
        except KeyboardInterrupt:
            say("interrupted: stopping what was started")
            supervisor.terminate()
            supervisor.wait()
            return 130
        if not ok:
            say(f"the stack did not start: {layout.read().get('message') or 'see the log above'}")
            return 1
        say(f"up in {time.monotonic() - t0:.1f}s")
    print(summary(layout, _first_served(manifest)))
    return apply_and_first_token(layout, manifest) if manifest else 0


def _first_served(manifest: Path | None) -> str:
    for doc in _models_in(manifest) if manifest else []:
        return str(((doc.get("spec") or {}).get("model") or {}).get("servedName") or doc["metadata"]["name"])
    return "tiny-gguf"


def _log_size(layout: Layout) -> int:
    try:
        return (layout.logs / "stack.log").stat().st_size
    except OSError:
        return 0


def _foreground(layout: Layout, manifest: Path | None, gateway_port: int) -> int:
    with try_lock(layout.lock) as lock:
        if lock is None:
            say(f"a stack already runs in {layout.root}")
            return 1
        _sweep(layout)

        def after_start() -> int:
            print(summary(layout, _first_served(manifest)), flush=True)
            if manifest and apply_and_first_token(layout, manifest) != 0:
                return 1
            say("running in the foreground; Ctrl-C stops everything")
            return 0

        return run(Stack(layout, gateway_port), after_start)


def _sweep(layout: Layout) -> list[str]:
    """Kill what a stack that is gone left behind: recorded processes and engine process groups."""
    killed = []
    for name, p in (layout.read().get("processes") or {}).items():
        if procs.alive(p["pid"], p.get("ticks")):
            procs.kill_group(p["pid"], signal.SIGTERM)
            killed.append(f"{name} ({p['pid']})")
    for record in layout.node.glob("pods/*/record.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            for c in json.loads(record.read_text())["containers"].values():
                if procs.alive(c["pid"], c.get("ticks")):
                    procs.kill_group(c["pid"])
                    killed.append(f"engine ({c['pid']})")
    if killed:
        time.sleep(2)
        for p in (layout.read().get("processes") or {}).values():
            if procs.alive(p["pid"], p.get("ticks")):
                procs.kill_group(p["pid"])
    return killed


def down(state_dir: Path | None = None, purge: bool = False) -> int:
    layout = Layout(state_dir or default_state_dir())
    if not layout.root.exists():
        say(f"no stack in {layout.root}")
        return 0
    info = layout.read()
    pid = info.get("pid")
    if running(layout) and pid and procs.alive(pid, info.get("ticks")):
        say(f"stopping the stack (supervisor {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while running(layout) and time.monotonic() < deadline:
            time.sleep(0.3)
        if running(layout):
            say("the supervisor did not stop in 120s; killing it")
            procs.kill_group(pid)
    killed = _sweep(layout)
    if killed:
        say(f"killed leftovers: {', '.join(killed)}")
    if layout.state.exists():
        layout.write(status="stopped", processes={})
    if purge:
        import shutil

        shutil.rmtree(layout.root, ignore_errors=True)
        say(f"removed {layout.root}")
    say("down")
    return 0
