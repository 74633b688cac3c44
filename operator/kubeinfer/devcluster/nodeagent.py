"""The local stack's node agent: a GPU-less Node whose pods run as local processes.

`kubeinfer up` runs one of these beside the control plane. It stands in for the kubelet of one node
(``kubeinfer-local``) so that ``kubectl apply`` of an LLMModel ends in a real engine answering
through the gateway, on a laptop without Docker or a GPU. See docs/local-stack.md.

What it does, as a kubelet would:

- registers the Node (capacity from this machine, ``nvidia.com/gpu: 0``), renews its Lease in
  ``kube-node-lease`` and posts node status, authenticated as ``system:node:<name>`` so the Node
  authorizer and NodeRestriction admission hold it to a kubelet's permissions;
- runs each container of a pod bound to the node as a local process: the engine images map to the
  cached llama-server binary and to vLLM in this Python (:class:`Runtime`); volume mount paths in
  args and env map to local directories (a claim's hostPath PersistentVolume, temp dirs for
  emptyDir); each pod gets its own loopback address (127.0.0.10, .11, ...) as its pod IP, and
  ``--host 0.0.0.0`` becomes that address;
- runs the startup, readiness and liveness probes (httpGet, tcpSocket) and writes the pod status
  (phase, podIP, conditions, containerStatuses with waiting/running/terminated, restartCount);
- restarts exited containers per restartPolicy with the kubelet's back-off (CrashLoopBackOff);
- on deletion runs the preStop hook (sleep, httpGet), sends SIGTERM, waits out the grace period,
  SIGKILLs, then deletes the pod with grace period 0;
- reports what cannot run here (an unknown image, a GPU-only vLLM quantization, a missing volume)
  as a waiting reason with a message and a Warning Event, and retries with back-off;
- writes each container's output to ``<state>/pods/<ns>_<pod>_<uid>/<container>/<restart>.log``
  and serves it to ``kubectl logs`` (the apiserver's kubelet port, TLS, 127.0.0.1 only).

What it does not do: no container runtime or image pulls, no cgroups or namespaces (limits are not
enforced, every process sees the whole machine), no exec/attach/port-forward, no init containers,
no exec probes. Engine processes die with the agent (process group + watchdog); a restarted agent
kills any that are left and starts its pods' containers again (restartCount + 1).

CLI::

    python -m kubeinfer.devcluster.nodeagent --kubeconfig NODE_KUBECONFIG --state-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import ipaddress
import json
import logging
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import kube
from kubeinfer.devcluster import procs
from kubeinfer.render.config import RenderConfig, load_config

_log = logging.getLogger("kubeinfer.nodeagent")

NODE_NAME = "kubeinfer-local"
AGENT = "kubeinfer-node-agent"
FIRST_POD_IP = "127.0.0.10"  # below: left to tests that start engines by hand (tests/engine)
GPU_RESOURCE = "nvidia.com/gpu"
LEASE_NAMESPACE = "kube-node-lease"
LOCALHOST = "127.0.0.1"  # the node's address: the apiserver reaches the log server here
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0
# The startup probe (or the first readiness check) is polled this often until it first succeeds: a
# local process has no image pull to wait for, and a 10 s probe period would only add latency.
FIRST_SUCCESS_POLL = 0.5
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 300.0  # the kubelet's crash-loop back-off
BACKOFF_RESET = 600.0  # a container that ran this long starts over at no back-off
MIN_KILL_GRACE = 2.0  # the kubelet's minimum after a preStop hook used up the grace period
# Keyword arguments of the client calls: raw JSON responses, and the patch flavours (the client would
# send a dict as a JSON patch). Typed Any: the client's stubs name one model class per body.
_RAW: dict[str, Any] = dict(kube.RAW)
_STRATEGIC: dict[str, Any] = {"_content_type": "application/strategic-merge-patch+json", **kube.RAW}
_MERGE: dict[str, Any] = {"_content_type": kube.MERGE, **kube.RAW}

# vLLM quantization methods whose kernels exist for NVIDIA GPUs only: on CPU vLLM would load for a
# minute and then fail with a kernel error; the agent says so before starting it.
VLLM_GPU_ONLY_QUANTIZATION = frozenset(
    {"awq_marlin", "gptq_marlin", "fbgemm_fp8", "modelopt_fp4", "nvfp4_per_token", "mxfp4", "gpt_oss_mxfp4"}
)
# Well-known upstream images, besides the configured ones: repository -> engine.
_UPSTREAM_IMAGES = {"vllm/vllm-openai": "vllm", "ggml-org/llama.cpp": "llama-server"}
# Environment of the agent that must not reach an engine: the agent's own credentials, and the
# vLLM CPU variable that silently overrides the rendered --kv-cache-memory-bytes.
_ENV_DROP = ("KUBECONFIG", "VLLM_CPU_KVCACHE_SPACE")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class Unrunnable(Exception):
    """A container that cannot run here: a kubelet-style waiting reason and a message for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclasses.dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    note: str  # what the image stands for here (the "Pulled" event)


# --- Pure helpers ----------------------------------------------------------------------------------


def image_repository(image: str) -> str:
    """'reg:5000/org/name:tag@sha256:..' -> 'reg:5000/org/name'."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def path_mapper(mounts: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """A function that rewrites in-container paths under any mount path to the local directory.

    Handles a whole argument (`/models/x`), `--flag=/models/x`, and quoted paths inside JSON
    arguments (`{"model": "/models/x"}`). The longest mount path wins.
    """
    table = sorted(((m.rstrip("/") or "/", local) for m, local in mounts), key=lambda t: -len(t[0]))

    def one(path: str) -> str | None:
        for mount, local in table:
            if path == mount:
                return local
            if path.startswith(mount + "/"):
                return local + path[len(mount) :]
        return None

    def mapped(value: str) -> str:
        if value.startswith("/"):
            return one(value) or value
        if value.startswith("-") and "=" in value:
            flag, _, rest = value.partition("=")
            if rest.startswith("/"):
                return f"{flag}={one(rest) or rest}"
            return value
        if value.startswith(("{", "[")):
            for mount, local in table:
                value = value.replace(f'"{mount}/', f'"{local}/').replace(f'"{mount}"', f'"{local}"')
        return value

    return mapped


def resource_quantity(resources: dict[str, Any] | None, name: str) -> int:
    """Whole units of an extended resource requested or limited by a container (GPUs)."""
    res = resources or {}
    value = (res.get("limits") or {}).get(name) or (res.get("requests") or {}).get(name) or 0
    try:
        return int(str(value))
    except ValueError:
        return 1


def machine_capacity(state_dir: Path) -> dict[str, str]:
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    disk = shutil.disk_usage(state_dir).total
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_kib}Ki",
        "pods": "110",
        "ephemeral-storage": str(disk),
        GPU_RESOURCE: "0",
    }


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def node_object(
    name: str, capacity: dict[str, str], kubelet_port: int, kubelet_version: str
) -> dict[str, Any]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    os_image = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in _read("/etc/os-release").splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        "Linux",
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "kubeinfer.io/local-node": "true",
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": node_conditions(),
            "addresses": [
                {"type": "InternalIP", "address": LOCALHOST},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id"),
                "systemUUID": _read("/sys/class/dmi/id/product_uuid"),
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": os_image,
                "containerRuntimeVersion": f"{AGENT}://local-processes",
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch,
            },
        },
    }


def node_conditions(ready: bool = True) -> list[dict[str, Any]]:
    t = now()
    rows = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
        (
            "Ready",
            "True" if ready else "False",
            "KubeletReady" if ready else "KubeletNotReady",
            f"{AGENT} is posting ready status" if ready else f"{AGENT} stopped",
        ),
    ]
    return [
        {"type": k, "status": s, "reason": r, "message": m, "lastHeartbeatTime": t, "lastTransitionTime": t}
        for k, s, r, m in rows
    ]


class LoopbackPool:
    """Pod IPs from 127.0.0.10 up (Linux answers on all of 127/8), one per pod; an address whose
    container ports cannot be bound (something else listens there) is skipped."""

    def __init__(self, first: str = FIRST_POD_IP) -> None:
        self.first = int(ipaddress.IPv4Address(first))
        self.last = int(ipaddress.IPv4Address("127.255.255.254"))
        self.next = self.first
        self.owner: dict[str, str] = {}  # ip -> pod uid

    def _usable(self, ip: str, uid: str, ports: list[int]) -> bool:
        if self.owner.get(ip, uid) != uid:
            return False
        value = int(ipaddress.IPv4Address(ip))
        return self.first <= value <= self.last and all(_bindable(ip, p) for p in ports)

    def take(self, uid: str, ports: list[int], preferred: str | None = None) -> str | None:
        with contextlib.suppress(ValueError):
            if preferred and self._usable(preferred, uid, ports):
                self.owner[preferred] = uid
                return preferred
        for _ in range(4096):
            ip = str(ipaddress.IPv4Address(self.next))
            self.next = self.next + 1 if self.next < self.last else self.first
            if self._usable(ip, uid, ports):
                self.owner[ip] = uid
                return ip
        return None

    def release(self, uid: str) -> None:
        for ip in [ip for ip, owner in self.owner.items() if owner == uid]:
            del self.owner[ip]


def _bindable(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is fine
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    """Named ports and, under their number as a string, unnamed ones (TCP)."""
    out: dict[str, int] = {}
    for p in container.get("ports") or []:
        if p.get("protocol", "TCP") == "TCP":
            out[p.get("name") or str(p["containerPort"])] = int(p["containerPort"])
    return out


class Runtime:
    """Which local program a container image stands for, and its command line here."""

    def __init__(self, config: RenderConfig, llama_server: Path | None, python: str = sys.executable) -> None:
        self.config, self.llama_server, self.python = config, llama_server, python
        self.images = {
            image_repository(config.image_for("llama-server")): "llama-server",
            image_repository(config.image_for("vllm")): "vllm",
            **_UPSTREAM_IMAGES,
        }
        self._vllm: bool | None = None

    def engine_for(self, image: str) -> str | None:
        repo = image_repository(image)
        for known, engine in self.images.items():
            if repo == known or repo.endswith("/" + known):
                return engine
        return None

    def vllm_available(self) -> bool:
        if self._vllm is None:
            if self.python == sys.executable:
                self._vllm = importlib.util.find_spec("vllm") is not None
            else:
                probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
                self._vllm = subprocess.run([self.python, "-c", probe], timeout=60).returncode == 0
        return self._vllm

    def launch(
        self, container: dict[str, Any], pod_ip: str, mounts: list[tuple[str, str]], env: dict[str, str]
    ) -> Launch:
        image = container.get("image") or ""
        engine = self.engine_for(image)
        known = ", ".join(sorted(f"{repo} ({e})" for repo, e in self.images.items()))
        if engine is None:
            raise Unrunnable(
                "CreateContainerError",
                f"image {image!r} cannot run on {NODE_NAME}: the node agent has no container runtime and "
                f"runs only the engine images as local programs ({known})",
            )
        mapped = path_mapper(mounts)
        command = [mapped(a) for a in container.get("command") or []]
        args = [mapped(a) for a in container.get("args") or []]
        # Listen on the pod's own address, not on every interface of the machine.
        args = [
            pod_ip if a == "0.0.0.0" else "--host=" + pod_ip if a == "--host=0.0.0.0" else a for a in args
        ]
        if "--host" not in args and not any(a.startswith("--host=") for a in args):
            args += ["--host", pod_ip]
        env = {**env}
        if engine == "llama-server":
            if command and Path(command[0]).name != "llama-server":
                raise Unrunnable("CreateContainerError", f"command {command[0]!r} is not llama-server")
            if self.llama_server is None or not self.llama_server.is_file():
                raise Unrunnable(
                    "CreateContainerError", "llama-server is not built here: run `make llama-server`"
                )
            argv = [str(self.llama_server), *command[1:], *args]
            note = f"{image} runs as the local llama-server {self.llama_server}"
        else:
            if command[:2] == ["vllm", "serve"] or not command:
                rest = command[2:] + args
                if rest and not rest[0].startswith("-"):  # `vllm serve MODEL`: the module wants --model
                    rest = ["--model", *rest]
            elif len(command) >= 3 and command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
                rest = command[3:] + args
            else:
                raise Unrunnable("CreateContainerError", f"command {' '.join(command)!r} is not `vllm serve`")
            quant = _flag_value(rest, "--quantization")
            if quant in VLLM_GPU_ONLY_QUANTIZATION:
                raise Unrunnable(
                    "CreateContainerError",
                    f"--quantization {quant} has GPU kernels only; vLLM on this CPU cannot load it "
                    "(run it on a GPU node, or pick a method vLLM supports on CPU)",
                )
            if not self.vllm_available():
                raise Unrunnable(
                    "CreateContainerError",
                    f"vLLM is not installed for {self.python}: run `make install-engines`",
                )
            # vllm-cpu's `vllm` console script cannot find its own distribution: run the server module.
            argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", *rest]
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # never download: models are local
            note = f"{image} runs as vLLM from {self.python}"
        cwd = mapped(container["workingDir"]) if container.get("workingDir") else ""
        return Launch(argv=argv, env=env, cwd=cwd, note=note)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    return env


async def _body(resp: Any) -> Any:
    """JSON of a raw (`_preload_content=False`) response; ApiException on an error status."""
    async with resp:
        raw = await resp.read()
    if not 200 <= resp.status <= 299:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = raw.decode(errors="replace")
        raise exc
    return json.loads(raw) if raw else None


# --- Containers ------------------------------------------------------------------------------------


class ContainerRunner:
    """One container of a pod as a local process: start, probe, restart with back-off, stop."""

    def __init__(self, worker: PodWorker, spec: dict[str, Any], previous: dict[str, Any] | None) -> None:
        self.worker, self.spec = worker, spec
        self.name: str = spec["name"]
        self.image = spec.get("image", "")
        self.ports = container_ports(spec)
        self.restart_count = 0
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        if previous and previous.get("containerID"):
            # A container of an earlier agent: its process is gone (it died with that agent).
            self.restart_count = int(previous.get("restartCount") or 0) + 1
            self.last_state = {
                "terminated": {
                    "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now(),
                    "message": "the node agent restarted; the container's process was not running any more",
                }
            }  # fmt: skip
        self.ready = self.started = False
        self.finished = False  # exited for good (restartPolicy Never/OnFailure)
        self.container_id = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = asyncio.Event()
        self.backoff = 0.0
        self.task: asyncio.Task[None] | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.reported: set[str] = set()

    # -- status -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "image": self.image, "imageID": self.image, "ready": self.ready,
            "started": self.started, "restartCount": self.restart_count, "state": self.state,
        }  # fmt: skip
        if self.container_id:
            out["containerID"] = self.container_id
        if self.last_state:
            out["lastState"] = self.last_state
        return out

    def _set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        self.worker.status_changed()

    def log_path(self, restart: int | None = None) -> Path:
        n = self.restart_count if restart is None else restart
        return self.worker.dir / self.name / f"{n}.log"

    # -- lifecycle ----------------------------------------------------------------------------------

    async def run(self) -> None:
        retry = BACKOFF_FIRST
        while not self.stopping.is_set():
            try:
                launch = await self.worker.prepare(self.spec)
            except Unrunnable as exc:
                self._set(state={"waiting": {"reason": exc.reason, "message": exc.message}}, ready=False)
                await self.worker.event("Warning", "Failed", f"Error: {exc.message}", self.name, once=True)
                if await self._sleep(retry):
                    return
                retry = min(retry * 2, BACKOFF_MAX)
                continue
            retry = BACKOFF_FIRST
            if self.stopping.is_set():
                return
            if f"pulled:{launch.note}" not in self.reported:
                self.reported.add(f"pulled:{launch.note}")
                await self.worker.event("Normal", "Pulled", f"Image {launch.note}", self.name)
            started_at = time.monotonic()
            try:
                await self._start(launch)
            except OSError as exc:
                self._set(state={"waiting": {"reason": "RunContainerError", "message": str(exc)}})
                await self.worker.event("Warning", "Failed", f"Error: {exc}", self.name)
                if await self._sleep(retry):
                    return
                continue
            if self.stopping.is_set():  # stop() came while the process was being started
                await self.terminate(0.0, pre_stop=False)
            code = await self._supervise()
            if self.stopping.is_set():
                return
            await self._exited(code)
            policy = self.worker.pod["spec"].get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._set(finished=True)
                return
            if time.monotonic() - started_at >= BACKOFF_RESET:
                self.backoff = 0.0
            if self.backoff > 0:
                last = _last_line(self.log_path())
                message = (
                    f"back-off {self.backoff:.0f}s restarting failed container={self.name} "
                    f"pod={self.worker.name}_{self.worker.namespace}({self.worker.uid})"
                    + (f"; last output: {last}" if last else "")
                )
                self._set(state={"waiting": {"reason": "CrashLoopBackOff", "message": message}})
                await self.worker.event(
                    "Warning", "BackOff", "Back-off restarting failed container", self.name
                )
                if await self._sleep(self.backoff):
                    return
            # The first restart is immediate, then 10 s, 20 s, ... (the kubelet's back-off).
            self.backoff = min(max(self.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
            self.restart_count += 1

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True if stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def _start(self, launch: Launch) -> None:
        log = self.log_path()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=launch.env,
                cwd=launch.cwd or str(self.worker.dir),
                start_new_session=True,  # its own process group: stop() takes its children too
                preexec_fn=procs.die_with_parent(signal.SIGKILL),
            )
        self.watchdog = procs.start_watchdog(self.proc.pid)  # for engines that outlive a SIGKILLed agent
        self.container_id = f"kubeinfer://{self.proc.pid}"  # the local pid, for people and tests
        self.worker.record()
        self._set(state={"running": {"startedAt": now()}}, ready=False, started=False)
        await self.worker.event("Normal", "Started", f"Started container {self.name}", self.name)

    async def _supervise(self) -> int:
        assert self.proc is not None
        probes = asyncio.create_task(self._probes())
        try:
            code = await self.proc.wait()
        finally:
            probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probes
            procs.kill_group(self.proc.pid)  # whatever the process left behind in its group
            if self.watchdog is not None:
                self.watchdog.kill()
                await asyncio.to_thread(self.watchdog.wait)
                self.watchdog = None
        return code if code >= 0 else 128 - code  # killed by a signal: 128 + signal, as runtimes say

    async def _exited(self, code: int) -> None:
        running = self.state.get("running") or {}
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": running.get("startedAt", now()),
            "finishedAt": now(),
        }
        last = _last_line(self.log_path())
        if code != 0 and last:
            terminated["message"] = last
        self._set(state={"terminated": terminated}, last_state={"terminated": terminated}, ready=False)
        if code != 0:
            what = f"Container {self.name} exited with code {code}" + (f": {last}" if last else "")
            await self.worker.event("Warning", "Failed", what, self.name)

    # -- probes -------------------------------------------------------------------------------------

    async def _probes(self) -> None:
        startup = self.spec.get("startupProbe")
        readiness = self.spec.get("readinessProbe")
        liveness = self.spec.get("livenessProbe")
        if startup:
            await asyncio.sleep(startup.get("initialDelaySeconds", 0))
            budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
            deadline = time.monotonic() + budget
            while not await self._probe(startup):
                if time.monotonic() > deadline:
                    await self._unhealthy("Startup", f"not successful within {budget}s")
                    return
                await asyncio.sleep(FIRST_SUCCESS_POLL)
        self._set(started=True)
        tasks = [asyncio.create_task(self._readiness(readiness))]
        if liveness:
            tasks.append(asyncio.create_task(self._liveness(liveness)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _readiness(self, probe: dict[str, Any] | None) -> None:
        if not probe:
            self._set(ready=True)
            return
        ok_needed = probe.get("successThreshold", 1)
        fail_needed = probe.get("failureThreshold", 3)
        oks = fails = 0
        while True:
            if await self._probe(probe):
                oks, fails = oks + 1, 0
                if not self.ready and oks >= ok_needed:
                    self._set(ready=True)
            else:
                oks, fails = 0, fails + 1
                if self.ready and fails >= fail_needed:
                    self._set(ready=False)
            # Until the first success, poll quickly (see FIRST_SUCCESS_POLL); then at the period.
            await asyncio.sleep(probe.get("periodSeconds", 10) if self.ready else FIRST_SUCCESS_POLL)

    async def _liveness(self, probe: dict[str, Any]) -> None:
        fails = 0
        period = probe.get("periodSeconds", 10)
        await asyncio.sleep(max(period, probe.get("initialDelaySeconds", 0)))
        while True:
            fails = 0 if await self._probe(probe) else fails + 1
            if fails >= probe.get("failureThreshold", 3):
                await self._unhealthy("Liveness", f"failed {fails} times in a row")
                return
            await asyncio.sleep(period)

    async def _unhealthy(self, kind: str, why: str) -> None:
        await self.worker.event("Warning", "Unhealthy", f"{kind} probe {why}", self.name)
        await self.worker.event(
            "Normal",
            "Killing",
            f"Container {self.name} failed {kind.lower()} probe, will be restarted",
            self.name,
        )
        grace = float(self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30))
        await self.terminate(grace, pre_stop=False)

    async def _probe(self, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = self._url(get, get.get("scheme", "HTTP").lower())
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                resp = await self.worker.agent.http.get(url, headers=headers, timeout=timeout)
                return 200 <= resp.status_code < 400
            if "tcpSocket" in probe:
                sock = probe["tcpSocket"]
                host = sock.get("host") or self.worker.ip
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, self._port(sock["port"])), timeout
                )
                writer.close()
                return True
        except (httpx.HTTPError, OSError, TimeoutError):
            return False
        return False  # other probe kinds are refused in PodWorker.prepare

    def _url(self, get: dict[str, Any], scheme: str = "http") -> str:
        host = get.get("host") or self.worker.ip
        return f"{scheme}://{host}:{self._port(get['port'])}{get.get('path', '/')}"

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        return self.ports[str(port)]

    # -- stopping -----------------------------------------------------------------------------------

    async def terminate(self, grace: float, pre_stop: bool = True) -> None:
        """preStop hook, SIGTERM, wait out the grace period, SIGKILL the process group."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        deadline = time.monotonic() + grace
        hook = ((self.spec.get("lifecycle") or {}).get("preStop") or {}) if pre_stop else {}
        if hook:
            await self._pre_stop(hook, deadline)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # the process itself, as a runtime signals PID 1
            wait = max(deadline - time.monotonic(), MIN_KILL_GRACE if hook else 0.0)
            try:
                await asyncio.wait_for(proc.wait(), wait)
            except TimeoutError:
                procs.kill_group(proc.pid)
                await proc.wait()

    async def _pre_stop(self, hook: dict[str, Any], deadline: float) -> None:
        left = max(0.0, deadline - time.monotonic())
        if "sleep" in hook:
            await asyncio.sleep(min(float(hook["sleep"].get("seconds", 0)), left))
        elif "httpGet" in hook:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                await self.worker.agent.http.get(self._url(hook["httpGet"]), timeout=max(left, 0.1))
        else:
            await self.worker.event(
                "Warning", "FailedPreStopHook", "only sleep and httpGet preStop hooks run here", self.name
            )

    async def stop(self, grace: float, pre_stop: bool = True) -> None:
        self.stopping.set()
        await self.terminate(grace, pre_stop)
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.ready = False


def _last_line(path: Path, limit: int = 300) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


# --- Pods ------------------------------------------------------------------------------------------


class PodWorker:
    """One pod bound to the node: its containers, its status and its deletion."""

    def __init__(self, agent: NodeAgent, pod: dict[str, Any]) -> None:
        self.agent, self.pod = agent, pod
        meta = pod["metadata"]
        self.uid, self.name, self.namespace = meta["uid"], meta["name"], meta["namespace"]
        self.dir = agent.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.ip = ""
        self.start_time = (pod.get("status") or {}).get("startTime") or now()
        self.changed = asyncio.Event()
        self.dirty = asyncio.Event()
        self.deleted = False
        self.runners: list[ContainerRunner] = []
        self.rejected: dict[str, str] | None = None
        self.conditions: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, str] | None = None
        self.task = asyncio.create_task(self.run())

    @property
    def terminating(self) -> bool:
        return bool(self.pod["metadata"].get("deletionTimestamp"))

    def update(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.changed.set()

    def gone(self) -> None:
        self.deleted = True
        self.changed.set()

    def status_changed(self) -> None:
        self.dirty.set()

    # -- main loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        pusher = asyncio.create_task(self._push_status())
        try:
            if not self.terminating and not self.deleted:
                await self._admit_and_start()
            while True:
                if self.deleted:  # deleted with grace period 0 (forced): no hook, no grace
                    await self._stop_all(0.0, pre_stop=False)
                    return
                if self.terminating:
                    grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
                    grace = float(
                        self.pod["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace
                    )
                    await self._stop_all(grace, pre_stop=grace > 0)
                    await self.agent.delete_pod(self)
                    return
                await self.changed.wait()
                self.changed.clear()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("pod %s/%s: worker failed", self.namespace, self.name)
        finally:
            pusher.cancel()
            for r in self.runners:  # never leave a process behind a worker that is gone
                if r.proc is not None and r.proc.returncode is None:
                    procs.kill_group(r.proc.pid)
            self.agent.ips.release(self.uid)
            shutil.rmtree(self.dir / "volumes", ignore_errors=True)
            (self.dir / "record.json").unlink(missing_ok=True)
            self.agent.forget(self)

    async def _admit_and_start(self) -> None:
        spec = self.pod["spec"]
        # Admission, as the kubelet's: more GPUs than the node has is a rejected pod (the scheduler
        # would not have placed it here; this catches pods bound by name).
        for c in spec.get("containers") or []:
            want = resource_quantity(c.get("resources"), GPU_RESOURCE)
            if want > 0:
                self.rejected = {
                    "reason": f"OutOf{GPU_RESOURCE}",
                    "message": f"Pod was rejected: Node didn't have enough resource: {GPU_RESOURCE}, "
                    f"requested: {want}, used: 0, capacity: 0 ({NODE_NAME} has no GPU)",
                }
                await self.event("Warning", self.rejected["reason"], self.rejected["message"])
                self.status_changed()
                return
        ports = [p for c in spec.get("containers") or [] for p in container_ports(c).values()]
        previous = {cs["name"]: cs for cs in (self.pod.get("status") or {}).get("containerStatuses") or []}
        self.runners = [
            ContainerRunner(self, c, previous.get(c["name"])) for c in spec.get("containers") or []
        ]
        ip = self.agent.ips.take(self.uid, ports, (self.pod.get("status") or {}).get("podIP"))
        while ip is None:  # e.g. another program listens on 0.0.0.0:<port>: retry until it is gone
            message = f"no loopback address with ports {ports} free (something else listens on 0.0.0.0?)"
            for r in self.runners:
                r.state = {"waiting": {"reason": "CreateContainerError", "message": message}}
            await self.event("Warning", "FailedCreatePodSandBox", message)
            self.status_changed()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), BACKOFF_FIRST)
            self.changed.clear()
            if self.terminating or self.deleted:
                return
            ip = self.agent.ips.take(self.uid, ports)
        self.ip = ip
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status_changed()
        for r in self.runners:
            r.task = asyncio.create_task(r.run())

    async def _stop_all(self, grace: float, pre_stop: bool = True) -> None:
        await asyncio.gather(*(r.stop(grace, pre_stop) for r in self.runners))

    async def prepare(self, container: dict[str, Any]) -> Launch:
        """The local command line of a container (raises Unrunnable)."""
        spec = self.pod["spec"]
        if spec.get("initContainers"):
            raise Unrunnable("CreateContainerConfigError", "init containers do not run on the node agent")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe and not ({"httpGet", "tcpSocket"} & set(probe)):
                raise Unrunnable("CreateContainerConfigError", f"{kind}: only httpGet and tcpSocket run here")
        if self.volumes is None:
            self.volumes = await self.agent.resolve_volumes(self)
        mounts = []
        for m in container.get("volumeMounts") or []:
            local = self.volumes.get(m["name"])
            if local is None:
                raise Unrunnable("CreateContainerConfigError", f"volume {m['name']!r} not found in the pod")
            if m.get("subPath"):
                local = str(Path(local) / m["subPath"])
            mounts.append((m["mountPath"], local))
        own = await self.agent.resolve_env(self, container)
        # $(VAR) in command and args refers to the container's variables, as in a kubelet.
        container = {
            **container,
            "command": [_expand(a, own) for a in container.get("command") or []],
            "args": [_expand(a, own) for a in container.get("args") or []],
        }
        mapped = path_mapper(mounts)
        env = {**base_env(), **{k: mapped(v) for k, v in own.items()}}
        return self.agent.runtime.launch(container, self.ip, mounts, env)

    # -- status -------------------------------------------------------------------------------------

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        old = self.conditions.get(kind)
        cond: dict[str, Any] = {"type": kind, "status": status}
        cond["lastTransitionTime"] = old["lastTransitionTime"] if old and old["status"] == status else now()
        if not ok and reason:
            cond.update(reason=reason, message=message)
        self.conditions[kind] = cond
        return cond

    def build_status(self) -> dict[str, Any]:
        if self.rejected is not None:
            return {"phase": "Failed", **self.rejected, "startTime": self.start_time}
        statuses = [r.status() for r in self.runners]
        unready = [r.name for r in self.runners if not r.ready]
        ready = bool(self.runners) and not unready
        ever_started = any(r.container_id for r in self.runners)
        if self.runners and all(r.finished for r in self.runners):
            codes = [(r.state.get("terminated") or {}).get("exitCode", 1) for r in self.runners]
            phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        else:
            phase = "Running" if ever_started else "Pending"
        why = f"containers with unready status: [{' '.join(unready)}]"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", bool(self.ip)),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready, "ContainersNotReady", why),
                self._condition("Ready", ready, "ContainersNotReady", why),
            ],
            "containerStatuses": statuses,
        }
        if self.ip:
            status.update(podIP=self.ip, podIPs=[{"ip": self.ip}])
        return status

    async def _push_status(self) -> None:
        last: dict[str, Any] | None = None
        while True:
            await self.dirty.wait()
            await asyncio.sleep(0.02)  # coalesce a burst of changes into one write
            self.dirty.clear()
            status = self.build_status()
            if status == last:
                continue
            try:
                await self.agent.patch_pod_status(self, status)
                last = status
            except ApiException as exc:
                if exc.status == 404:
                    return
                _log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc.reason)
                await asyncio.sleep(1)
                self.dirty.set()
            except (OSError, TimeoutError) as exc:
                _log.warning("pod %s/%s: status update failed: %s", self.namespace, self.name, exc)
                await asyncio.sleep(1)
                self.dirty.set()

    async def flush_not_ready(self) -> None:
        """At agent shutdown: tell the cluster at once that nothing here serves any more."""
        for r in self.runners:
            r.ready = False
        with contextlib.suppress(ApiException, OSError, TimeoutError):
            await asyncio.wait_for(self.agent.patch_pod_status(self, self.build_status()), 3)

    def record(self) -> None:
        """What a restarted agent needs to find (and kill) this pod's processes."""
        containers = {}
        for r in self.runners:
            if r.proc is not None:
                containers[r.name] = {"pid": r.proc.pid, "ticks": procs.start_ticks(r.proc.pid)}
        data = {"namespace": self.namespace, "name": self.name, "uid": self.uid, "ip": self.ip}
        (self.dir / "record.json").write_text(json.dumps({**data, "containers": containers}))

    async def event(
        self, type_: str, reason: str, message: str, container: str | None = None, once: bool = False
    ) -> None:
        await self.agent.event(self, type_, reason, message, container, once)


# --- The agent -------------------------------------------------------------------------------------


class NodeAgent:
    def __init__(
        self,
        api: client.ApiClient,
        state_dir: Path,
        runtime: Runtime,
        name: str = NODE_NAME,
        kubelet_version: str = "v0.0.0",
    ) -> None:
        self.api, self.state_dir, self.runtime, self.name = api, state_dir, runtime, name
        self.kubelet_version = kubelet_version
        self.core = client.CoreV1Api(api)
        self.ips = LoopbackPool()
        self.workers: dict[str, PodWorker] = {}
        self.http = httpx.AsyncClient(trust_env=False)
        self.kubelet_port = 0
        self._events: dict[tuple[str, str, str], float] = {}
        self._claims: dict[tuple[str, str], str] = {}

    # -- node ---------------------------------------------------------------------------------------

    async def register(self) -> None:
        body: Any = node_object(
            self.name, machine_capacity(self.state_dir), self.kubelet_port, self.kubelet_version
        )
        try:
            await _body(await self.core.create_node(body, **_RAW))
            _log.info("registered node %s", self.name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await self.post_node_status(body["status"])
            _log.info("node %s exists; status updated", self.name)

    async def post_node_status(self, status: dict[str, Any] | None = None) -> None:
        if status is None:
            status = {"conditions": node_conditions()}
        await _body(await self.core.patch_node_status(self.name, {"status": status}, **_STRATEGIC))

    async def renew_lease(self) -> None:
        coord = client.CoordinationV1Api(self.api)
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            await _body(
                await coord.patch_namespaced_lease(self.name, LEASE_NAMESPACE, {"spec": spec}, **_MERGE)
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body: Any = {"metadata": {"name": self.name, "namespace": LEASE_NAMESPACE}, "spec": spec}
            await _body(await coord.create_namespaced_lease(LEASE_NAMESPACE, body, **_RAW))

    async def heartbeat(self) -> None:
        last_status = time.monotonic()
        while True:
            try:
                await self.renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                    await self.post_node_status()
                    last_status = time.monotonic()
            except (ApiException, OSError, TimeoutError) as exc:
                _log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    # -- pods ---------------------------------------------------------------------------------------

    def on_pod(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
            return  # finished before we saw it; nothing to run
        self.workers[uid] = PodWorker(self, pod)

    def on_gone(self, uid: str) -> None:
        worker = self.workers.get(uid)
        if worker is not None:
            worker.gone()

    def forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]

    async def watch_pods(self) -> None:
        """List then watch the pods bound to this node (the only pods the Node authorizer lets a
        node list); a re-list also finds pods deleted while the watch was down."""
        selector = f"spec.nodeName={self.name}"
        while True:
            try:
                data = await _body(
                    await self.core.list_pod_for_all_namespaces(field_selector=selector, **_RAW)
                )
                listed = {p["metadata"]["uid"] for p in data["items"]}
                for uid in [u for u in self.workers if u not in listed]:
                    self.on_gone(uid)
                for pod in data["items"]:
                    self.on_pod(pod)
                version = data["metadata"]["resourceVersion"]
                async with watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector,
                    resource_version=version, timeout_seconds=300,
                ) as events:  # fmt: skip
                    async for event in events:
                        obj = event.get("raw_object") or {}
                        if event["type"] == "DELETED":
                            self.on_gone(obj["metadata"]["uid"])
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self.on_pod(obj)
            except asyncio.CancelledError:
                raise
            except (ApiException, OSError, ValueError, KeyError, TimeoutError) as exc:
                _log.warning("pod watch restarts after %s", exc)
                await asyncio.sleep(1)

    async def patch_pod_status(self, worker: PodWorker, status: dict[str, Any]) -> None:
        await _body(
            await self.core.patch_namespaced_pod_status(
                worker.name, worker.namespace, {"status": status}, **_STRATEGIC
            )
        )

    async def delete_pod(self, worker: PodWorker) -> None:
        """The kubelet's last word on a pod it stopped: delete it now, if it is still that pod."""
        body: Any = {"gracePeriodSeconds": 0, "preconditions": {"uid": worker.uid}}
        try:
            await _body(
                await self.core.delete_namespaced_pod(worker.name, worker.namespace, body=body, **_RAW)
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                _log.warning("pod %s/%s: delete failed: %s", worker.namespace, worker.name, exc.reason)

    async def event(
        self,
        worker: PodWorker,
        type_: str,
        reason: str,
        message: str,
        container: str | None = None,
        once: bool = False,
    ) -> None:
        key = (worker.uid, reason, message)
        last = self._events.get(key)
        if last is not None and (once or time.monotonic() - last < 60):
            return  # the same news again: not worth an apiserver write
        self._events[key] = time.monotonic()
        _log.info("pod %s/%s: %s %s: %s", worker.namespace, worker.name, type_, reason, message)
        obj = {"kind": "Pod", "apiVersion": "v1", "namespace": worker.namespace, "name": worker.name,
               "uid": worker.uid}  # fmt: skip
        if container:
            obj["fieldPath"] = f"spec.containers{{{container}}}"
        t = now()
        body: Any = {
            "metadata": {"name": f"{worker.name}.{uuid.uuid4().hex[:16]}", "namespace": worker.namespace},
            "involvedObject": obj, "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": AGENT, "host": self.name}, "firstTimestamp": t, "lastTimestamp": t,
            "count": 1, "reportingComponent": AGENT, "reportingInstance": self.name,
        }  # fmt: skip
        with contextlib.suppress(ApiException, OSError, TimeoutError):
            await _body(await self.core.create_namespaced_event(worker.namespace, body, **_RAW))

    # -- volumes and env ----------------------------------------------------------------------------

    async def resolve_volumes(self, worker: PodWorker) -> dict[str, str]:
        out: dict[str, str] = {}
        for vol in worker.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                out[name] = await self._claim_path(
                    worker.namespace, vol["persistentVolumeClaim"]["claimName"]
                )
            elif "hostPath" in vol:
                out[name] = vol["hostPath"]["path"]
            elif {"emptyDir", "projected", "configMap", "secret", "downwardAPI"} & set(vol):
                # Scratch space (and, empty, what the engines never read: the service-account token).
                path = worker.dir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                out[name] = str(path)
            else:
                kind = next((k for k in vol if k != "name"), "?")
                raise Unrunnable(
                    "CreateContainerConfigError", f"volume {name!r}: {kind} is not supported here"
                )
        return out

    async def _claim_path(self, namespace: str, claim: str) -> str:
        """A claim's local directory: the hostPath of the PersistentVolume it is bound to."""
        key = (namespace, claim)
        if key not in self._claims:
            try:
                pvc = await _body(
                    await self.core.read_namespaced_persistent_volume_claim(claim, namespace, **_RAW)
                )
                pv_name = (pvc.get("spec") or {}).get("volumeName")
                if not pv_name:
                    raise Unrunnable(
                        "CreateContainerConfigError", f"claim {claim!r} is not bound to a volume"
                    )
                pv = await _body(await self.core.read_persistent_volume(pv_name, **_RAW))
            except ApiException as exc:
                raise Unrunnable(
                    "CreateContainerConfigError", f"claim {claim!r}: {exc.status} {exc.reason}"
                ) from None
            path = ((pv.get("spec") or {}).get("hostPath") or {}).get("path")
            if not path:
                raise Unrunnable(
                    "CreateContainerConfigError",
                    f"claim {claim!r} is bound to {pv_name}, which is not a hostPath volume",
                )
            self._claims[key] = path
        path = self._claims[key]
        if not Path(path).is_dir():
            del self._claims[key]
            raise Unrunnable("CreateContainerConfigError", f"claim {claim!r}: {path} does not exist here")
        return path

    async def resolve_env(self, worker: PodWorker, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        if container.get("envFrom"):
            raise Unrunnable("CreateContainerConfigError", "envFrom is not supported here")
        fields = {
            "metadata.name": worker.name, "metadata.namespace": worker.namespace, "metadata.uid": worker.uid,
            "spec.nodeName": self.name, "status.podIP": worker.ip, "status.hostIP": "127.0.0.1",
        }  # fmt: skip
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = _expand(var.get("value", ""), env)
                continue
            src = var["valueFrom"]
            if "fieldRef" in src and src["fieldRef"].get("fieldPath") in fields:
                env[name] = fields[src["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                ref = src.get("secretKeyRef") or src["configMapKeyRef"]
                value = await self._key_ref(worker.namespace, "secretKeyRef" in src, ref)
                if value is not None:
                    env[name] = value
            else:
                raise Unrunnable(
                    "CreateContainerConfigError", f"env {name}: this valueFrom is not supported here"
                )
        return env

    async def _key_ref(self, namespace: str, secret: bool, ref: dict[str, Any]) -> str | None:
        import base64

        kind = "secret" if secret else "configmap"
        try:
            if secret:
                obj = await _body(await self.core.read_namespaced_secret(ref["name"], namespace, **_RAW))
            else:
                obj = await _body(await self.core.read_namespaced_config_map(ref["name"], namespace, **_RAW))
        except ApiException as exc:
            if ref.get("optional"):
                return None
            raise Unrunnable(
                "CreateContainerConfigError", f'{kind} "{ref["name"]}" not found ({exc.status})'
            ) from None
        data = obj.get("data") or {}
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise Unrunnable(
                "CreateContainerConfigError",
                f"couldn't find key {ref['key']} in {kind.title()} {ref['name']}",
            )
        value = data[ref["key"]]
        return base64.b64decode(value).decode() if secret else str(value)

    # -- start and stop -----------------------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Kill processes an earlier agent left (its watchdogs normally got them already)."""
        for record in (self.state_dir / "pods").glob("*/record.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(record.read_text())
                for c in data["containers"].values():
                    if procs.alive(c["pid"], c.get("ticks")):
                        _log.info(
                            "killing leftover process %s of pod %s/%s",
                            c["pid"],
                            data["namespace"],
                            data["name"],
                        )
                        procs.kill_group(c["pid"])
            record.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        workers = list(self.workers.values())
        for w in workers:
            for r in w.runners:
                r.stopping.set()
        await asyncio.gather(*(r.terminate(5.0, pre_stop=False) for w in workers for r in w.runners))
        await asyncio.gather(*(w.flush_not_ready() for w in workers))
        for w in workers:
            w.task.cancel()
        await self.http.aclose()


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references to earlier variables, as the kubelet expands them ($$ escapes)."""
    if "$(" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2 : end]
            out.append(env.get(name, value[i : end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


# --- kubectl logs ----------------------------------------------------------------------------------


def _self_signed(pki: Path) -> ssl.SSLContext:
    """A serving certificate for the kubelet port (the apiserver does not verify it: no
    --kubelet-certificate-authority is set on the local control plane)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    crt, key_path = pki / "kubelet.crt", pki / "kubelet.key"
    if not crt.is_file() or not key_path.is_file():
        pki.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_NAME)])
        t = dt.datetime.now(dt.UTC)
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCALHOST))])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(t - dt.timedelta(hours=1))
            .not_valid_after(t + dt.timedelta(days=3650)).add_extension(san, False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key_path)
    return ctx


class LogServer:
    """The slice of the kubelet API that `kubectl logs` needs: GET /containerLogs/{ns}/{pod}/{c}."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.runner: Any = None

    async def start(self, port: int = 0) -> int:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self.logs)
        app.router.add_get("/healthz", self.healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ctx = _self_signed(self.agent.state_dir / "pki")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        await web.SockSite(self.runner, sock, ssl_context=ctx).start()
        return int(sock.getsockname()[1])

    async def healthz(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok")

    def _find(self, namespace: str, pod: str, container: str, previous: bool) -> tuple[Path, Any] | None:
        for w in self.agent.workers.values():
            if (w.namespace, w.name) == (namespace, pod):
                for r in w.runners:
                    if r.name == container:
                        n = r.restart_count - 1 if previous else r.restart_count
                        return (r.log_path(n), r) if n >= 0 else None
        # A pod the agent no longer runs: its newest log file, if any.
        found = sorted((self.agent.state_dir / "pods").glob(f"{namespace}_{pod}_*/{container}/*.log"))
        found.sort(key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not found:
            return None
        return (found[-2] if previous and len(found) > 1 else found[-1]), None

    async def logs(self, request: Any) -> Any:
        from aiohttp import web

        q = request.query
        m = request.match_info
        found = self._find(m["namespace"], m["pod"], m["container"], q.get("previous") == "true")
        if found is None or not found[0].is_file():
            raise web.HTTPNotFound(text=f"no log for container {m['container']} of pod {m['pod']}\n")
        path, runner = found
        data = path.read_bytes()
        if q.get("tailLines", "").isdigit():
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(q["tailLines"]) :]) if int(q["tailLines"]) else b""
        if q.get("limitBytes", "").isdigit():
            data = data[: int(q["limitBytes"])]
        if q.get("follow") != "true":
            return web.Response(body=data, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        await resp.write(data)
        offset = path.stat().st_size
        proc = runner.proc if runner is not None else None
        while True:  # until the process is gone and its output read, or the client leaves
            await asyncio.sleep(0.25)
            size = path.stat().st_size
            if size > offset:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(size - offset)
                offset = size
                await resp.write(chunk)
            elif proc is None or proc.returncode is not None:
                break
        return resp

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# --- main ------------------------------------------------------------------------------------------


async def run_agent(args: argparse.Namespace) -> None:
    from kubeinfer.devcluster.build import KUBERNETES_VERSION

    state = Path(args.state_dir)
    (state / "pods").mkdir(parents=True, exist_ok=True)
    llama = Path(args.llama_server) if args.llama_server else None
    if llama is None:
        from kubeinfer.engines import llamacpp

        llama = llamacpp.binary_path() if llamacpp.is_cached() else None
    runtime = Runtime(load_config(args.config), llama, args.python)
    cfg = await kube.load_client_config(args.kubeconfig)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with kube.api_client(cfg) as api:
        agent = NodeAgent(api, state, runtime, name=args.name, kubelet_version=KUBERNETES_VERSION)
        agent.clean_leftovers()
        logs = LogServer(agent)
        try:
            agent.kubelet_port = await logs.start()
        except (ImportError, OSError) as exc:  # cryptography is a dev dependency
            _log.warning("kubectl logs will not work: %s", exc)
        await agent.register()
        tasks = [asyncio.create_task(agent.heartbeat()), asyncio.create_task(agent.watch_pods())]
        _log.info("node %s ready (kubelet port %s)", args.name, agent.kubelet_port)
        try:
            await stop.wait()
        finally:
            _log.info("stopping: killing the pods' processes")
            for t in tasks:
                t.cancel()
            await agent.shutdown()
            await logs.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer.devcluster.nodeagent",
        description="Register a GPU-less node and run the pods bound to it as local processes.",
    )
    parser.add_argument("--kubeconfig", required=True, help="credentials of system:node:<name>")
    parser.add_argument("--state-dir", required=True, help="pod logs, scratch volumes, process records")
    parser.add_argument("--name", default=NODE_NAME)
    parser.add_argument("--llama-server", help="llama-server binary (default: the cached build)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs vLLM")
    parser.add_argument("--config", help="operator configuration file (which images are the engines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    asyncio.run(run_agent(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
