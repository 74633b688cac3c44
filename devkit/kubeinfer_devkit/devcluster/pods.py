"""One pod bound to the node: its loopback pod IP, its containers, its status and its deletion.

:class:`PodWorker` admits the pod, takes a pod IP from the :class:`LoopbackPool`, runs a
:class:`~kubeinfer_devkit.devcluster.containers.ContainerRunner` per container, turns their states
into the pod status (phase, conditions, containerStatuses) and writes it through the agent
(:class:`~kubeinfer_devkit.devcluster.node.NodeAgent`); on deletion it stops the containers and
deletes the pod, as a kubelet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import socket
from typing import TYPE_CHECKING, Any

from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer_devkit.devcluster import podplan, procs
from kubeinfer_devkit.devcluster.containers import BACKOFF_FIRST, ContainerRunner, now
from kubeinfer_devkit.devcluster.podplan import Launch

if TYPE_CHECKING:
    from kubeinfer_devkit.devcluster.node import NodeAgent

_log = logging.getLogger("kubeinfer.nodeagent")

FIRST_POD_IP = "127.0.0.10"  # below: left to tests that start engines by hand (tests/engine)


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
        self.rejected = podplan.admission_rejection(self.pod)
        if self.rejected is not None:
            await self.event("Warning", self.rejected["reason"], self.rejected["message"])
            self.status_changed()
            return
        ports = podplan.pod_ports(self.pod)
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
        podplan.check_supported(self.pod["spec"], container)
        if self.volumes is None:  # the apiserver's part (claims): once per pod
            self.volumes = await self.agent.resolve_volumes(self)
        mounts = podplan.volume_mounts(container, self.volumes)
        own = await self.agent.resolve_env(self, container)
        env = podplan.container_env(podplan.base_env(os.environ), own, mounts)
        return self.agent.runtime.launch(podplan.with_expanded_args(container, own), self.ip, mounts, env)

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
        # A pod that ran to its end (a Job's) is not ready because it completed, as a kubelet says.
        not_ready = ("PodCompleted", "") if phase in ("Succeeded", "Failed") else ("ContainersNotReady", why)
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", bool(self.ip)),
                self._condition("Initialized", True),
                self._condition("ContainersReady", ready, *not_ready),
                self._condition("Ready", ready, *not_ready),
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
