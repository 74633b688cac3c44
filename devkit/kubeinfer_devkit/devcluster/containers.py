"""One container of a pod as a local process: start it, probe it, restart it with back-off, stop it.

:class:`ContainerRunner` carries out a :class:`~kubeinfer_devkit.devcluster.podplan.Launch` and keeps
the container's kubelet-style state (waiting/running/terminated, ready, started, restartCount) for the
pod status. Its pod (:class:`~kubeinfer_devkit.devcluster.pods.PodWorker`) supplies the launch, the
events and the status writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.devcluster.podplan import Launch, Unrunnable, container_ports

if TYPE_CHECKING:
    from kubeinfer_devkit.devcluster.pods import PodWorker

# The startup probe (or the first readiness check) is polled this often until it first succeeds: a
# local process has no image pull to wait for, and a 10 s probe period would only add latency.
FIRST_SUCCESS_POLL = 0.5
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 300.0  # the kubelet's crash-loop back-off
# A container that cannot be set up yet (its claim not bound, the node's read of it not yet allowed:
# the Node authorizer trails the pod's binding) is usually fine a moment later: retry from 1 s.
SETUP_RETRY_FIRST = 1.0
BACKOFF_RESET = 600.0  # a container that ran this long starts over at no back-off
MIN_KILL_GRACE = 2.0  # the kubelet's minimum after a preStop hook used up the grace period


def now() -> str:
    """The API's timestamp of this moment."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        self.ready = self.started = False
        self.finished = False  # exited for good (restartPolicy Never/OnFailure)
        self.container_id = ""
        if previous and previous.get("containerID"):
            # A container of an earlier agent: its process is gone (it died with that agent).
            lost = {
                "exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now(),
                "message": "the node agent restarted; the container's process was not running any more",
            }  # fmt: skip
            ended = (previous.get("state") or {}).get("terminated")
            policy = worker.pod["spec"].get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and ended and ended.get("exitCode") == 0):
                # Not to be run again (a Job's pod): it ended, or ends now as lost, as a kubelet says of
                # a container that vanished; the pod turns Succeeded or Failed and the Job controller
                # decides what next.
                self.restart_count = int(previous.get("restartCount") or 0)
                self.state = {"terminated": ended or lost}
                self.container_id = previous["containerID"]
                self.finished = True
            else:
                self.restart_count = int(previous.get("restartCount") or 0) + 1
                self.last_state = {"terminated": lost}
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
        setup_retry = SETUP_RETRY_FIRST
        while not self.stopping.is_set() and not self.finished:
            try:
                launch = await self.worker.prepare(self.spec)
            except Unrunnable as exc:
                self._set(state={"waiting": {"reason": exc.reason, "message": exc.message}}, ready=False)
                await self.worker.event("Warning", "Failed", f"Error: {exc.message}", self.name, once=True)
                if await self._sleep(setup_retry):
                    return
                setup_retry = min(setup_retry * 2, BACKOFF_MAX)
                continue
            retry = BACKOFF_FIRST
            setup_retry = SETUP_RETRY_FIRST
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
