"""Local runs on a devcluster ControlPlane: the operator as a child process, `kubeinfer demo`, and
`kubeinfer bench operator`. Used by the CLI and the k8s test tier."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kubeinfer import contract, kube
from kubeinfer.crdgen import crd
from kubeinfer_devkit.devcluster import procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`kubeinfer operator` as a child process, with its own kubeconfig and log file."""

    def __init__(
        self, kubeconfig: Path, log: Path, port: int, refresh_seconds: float = 2.0, args: tuple[str, ...] = ()
    ):
        self.kubeconfig, self.log, self.port, self.refresh = kubeconfig, log, port, refresh_seconds
        self.args = args  # more `kubeinfer operator` flags (autoscaler settings in tests)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        cmd = [
            sys.executable, "-m", "kubeinfer.cli", "operator", "--liveness-host", "127.0.0.1",
            "--liveness-port", str(self.port), "--refresh-seconds", str(self.refresh), *self.args,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not live after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop_process(self.proc, 15.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 60) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )

    def peak_rss_mib(self) -> float | None:
        """The operator's peak resident memory (VmHWM), while it runs."""
        if not self.proc or self.proc.poll() is not None:
            return None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None


def _say(msg: str) -> None:
    print(f"[kubeinfer] {msg}", file=sys.stderr, flush=True)


def _start_control_plane(state: Path, controllers: bool = True) -> Any:
    from kubeinfer_devkit.devcluster.build import CONTROL_PLANE_COMPONENTS, ensure_binaries
    from kubeinfer_devkit.devcluster.controlplane import ControlPlane

    binaries = ensure_binaries([*CONTROL_PLANE_COMPONENTS, "kubectl"])
    state.mkdir(parents=True, exist_ok=True)
    cp = ControlPlane(
        state / "controlplane",
        binaries=binaries,
        with_controllers=controllers,
        with_scheduler=controllers,
        with_kwok=controllers,
    )
    cp.start()
    return cp


def _conditions(obj: dict[str, Any]) -> str:
    conds = (obj.get("status") or {}).get("conditions") or []
    return ", ".join(f"{c['type']}={c['status']}({c.get('reason', '')})" for c in conds)


async def _demo(cp: Any, state: Path, manifest: Path, keep: bool) -> int:
    doc = yaml.safe_load(manifest.read_text())
    ns = "demo"
    doc.setdefault("metadata", {})["namespace"] = ns
    name = doc["metadata"]["name"]
    cfg = await kube.load_client_config(str(cp.kubeconfig))
    async with kube.api_client(cfg) as api:
        _say("installing the LLMModel CRD")
        await kube.install_crd(api, crd())
        await kube.ensure_namespace(api, ns)
        source = str(doc["spec"].get("model", {}).get("source", ""))
        if source.startswith("pvc://"):
            claim = source.removeprefix("pvc://").split("/")[0]
            await kube.ensure_local_claim(api, ns, claim)
        op = OperatorProcess(cp.kubeconfig, state / "operator.log", free_port(), refresh_seconds=5)
        _say("starting the operator")
        op.start()
        try:
            _say(f"kubectl apply -f {manifest}")
            started = time.monotonic()
            await kube.apply_model(api, doc)
            last = ""
            while time.monotonic() - started < 120:
                obj = await kube.get_model(api, ns, name) or {}
                text = _conditions(obj)
                if text and text != last:
                    _say(f"{name}: {text}")
                    last = text
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in (obj.get("status") or {}).get("conditions") or [])  # fmt: skip
                if ready:
                    break
                await asyncio.sleep(0.5)
            else:
                _say(f"{name} did not become Ready; operator log:\n{op.tail()}")
                return 1
            elapsed = time.monotonic() - started
            _say(f"{name} Ready {elapsed:.1f}s after apply (kwok runs its pods: no engine process yet)")
            print(cp.kubectl("get", "llm", "-n", ns, "-o", "wide").stdout)
            print(cp.kubectl("get", "deploy,svc,pods", "-n", ns, "-o", "wide").stdout)
            st = obj["status"]
            print(f"estimate: {st.get('estimate', {}).get('message')}")
            print(f"endpoint: {st.get('endpoint')}")
            dep = cp.kubectl("get", "deploy", contract.child_name(name), "-n", ns, "-o", "json").stdout
            container = json.loads(dep)["spec"]["template"]["spec"]["containers"][0]
            print("engine command: " + " ".join(container["command"] + container["args"]))
            if keep:
                print(f"\nexport KUBECONFIG={cp.kubeconfig}")
                print("(the control plane and the operator keep running; Ctrl-C stops them)")
                while True:
                    await asyncio.sleep(3600)
            return 0
        finally:
            op.stop()


def demo(manifest: Path, state: Path, keep: bool = False) -> int:
    """Local control plane + operator + one model, to Ready; then tear down (unless keep)."""
    cp = _start_control_plane(state)
    try:
        return asyncio.run(_demo(cp, state, manifest, keep))
    except KeyboardInterrupt:
        return 0
    finally:
        cp.stop()


async def _bench(cp: Any, state: Path, models: int, concurrency: int, timeout: float) -> dict[str, Any]:
    ns = "bench"
    cfg = await kube.load_client_config(str(cp.kubeconfig))
    async with kube.api_client(cfg) as api:
        await kube.install_crd(api, crd())
        await kube.ensure_namespace(api, ns)
        op = OperatorProcess(cp.kubeconfig, state / "bench-operator.log", free_port(), refresh_seconds=60)
        op.start()
        try:
            seen: dict[str, float] = {}
            watcher = asyncio.create_task(kube.watch_deployment_names(api, ns, seen))
            await asyncio.sleep(0.5)
            created: dict[str, float] = {}
            sem = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                name = f"bench-{i:04d}"
                body = {
                    "apiVersion": contract.API_VERSION, "kind": contract.KIND,
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"engine": "llama-server", "model": {"source": "kubeinfer/tiny-GGUF:Q8_0"},
                             "maxModelLen": 512, "resources": {"gpus": 0}},
                }  # fmt: skip
                async with sem:
                    await kube.create_model(api, ns, body)
                created[contract.child_name(name)] = time.monotonic()

            t0 = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(models)))
            t_created = time.monotonic() - t0
            peak = 0.0
            while len([n for n in created if n in seen]) < models and time.monotonic() - t0 < timeout:
                peak = max(peak, op.peak_rss_mib() or 0.0)
                await asyncio.sleep(0.2)
            peak = max(peak, op.peak_rss_mib() or 0.0)
            watcher.cancel()
            lat = sorted(seen[n] - created[n] for n in created if n in seen)
            done = [seen[n] for n in created if n in seen]
            return {
                "models": models,
                "deployments": len(lat),
                "create_seconds": round(t_created, 2),
                "all_deployments_seconds": round(max(done) - t0, 2) if len(lat) == models else None,
                "p50_apply_to_deployment_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
                "p90_apply_to_deployment_ms": round(lat[int(len(lat) * 0.9) - 1] * 1000, 1) if lat else None,
                "max_apply_to_deployment_ms": round(lat[-1] * 1000, 1) if lat else None,
                "operator_peak_rss_mib": round(peak, 1),
            }
        finally:
            op.stop()


def bench_operator(
    models: int, concurrency: int, state: Path, timeout: float = 120, controllers: bool = True
) -> dict[str, Any]:
    """Without controllers only etcd and the apiserver run: that isolates the operator's own
    latency from the controller-manager, scheduler and kwok sharing the same cores."""
    cp = _start_control_plane(state, controllers)
    try:
        result = asyncio.run(_bench(cp, state, models, concurrency, timeout))
        return {"controllers": controllers, "concurrency": concurrency, **result}
    finally:
        cp.stop()
