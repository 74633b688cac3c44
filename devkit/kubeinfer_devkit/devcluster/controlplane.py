"""A real, local Kubernetes control plane for tests: etcd + kube-apiserver (+ controller-manager,
scheduler and kwok for fake nodes), all as plain processes bound to 127.0.0.1 on free ports.

This file is ~530 lines because :class:`ControlPlane` is one lifecycle (prepare, start in order and
wait, stop) whose steps share its state; its pure parts are already apart: the components' command
lines in :mod:`~kubeinfer_devkit.devcluster.components`, certificates, tokens and kubeconfigs in
:mod:`~kubeinfer_devkit.devcluster.pki`.

    with ControlPlane(state_dir) as cp:
        subprocess.run([cp.bin["kubectl"], "--kubeconfig", cp.kubeconfig, "get", "nodes"])

Binaries come from ``kubeinfer_devkit.devcluster.build`` (built once, cached by version). Everything the
processes write (etcd data, certificates, kubeconfigs, one log file per component under logs/)
stays in the state dir; a state dir made by us (``state_dir=None``) is removed on stop unless
``keep_state=True``.

With ``reuse_state=True`` a second start keeps the certificates, tokens, etcd data and (if still
free) the ports of the first, so objects and a user's kubeconfig survive a restart (``kubeinfer
up``/``down``); by default every start is a fresh cluster.

Authentication is a static token file: ``token`` (the admin, group system:masters, written into
``kubeconfig``), plus one token each for the controller-manager and the scheduler so that they run
as the users the bootstrap RBAC policy expects, and one per name in ``node_users`` for
``system:node:<name>``, what a kubelet authenticates as (:meth:`ControlPlane.node_kubeconfig`), and
one per name in ``users`` (no groups: what RBAC bindings grant them is all they may do;
:meth:`ControlPlane.user_kubeconfig`), for components that act as themselves (the local stack's
volume provisioner).
TLS uses a CA generated here; the kubeconfig holds that CA, so clients verify the server normally.
The CA is also the apiserver's client CA.

kwok runs one fake node (``node_name``) advertising ``nvidia.com/gpu`` and makes pods bound to it
Running/Ready with an IP from ``pod_cidr``. Those pod IPs, the node's and Service ClusterIPs are
only data: nothing listens there, and nothing should ever dial them. kwok manages only nodes
annotated ``kwok.x-k8s.io/node: fake``: a node registered by someone else (the local stack's node
agent, which runs real processes) is left alone.

CLI (keeps running until Ctrl-C)::

    python -m kubeinfer_devkit.devcluster.controlplane [--state-dir DIR] [--no-kwok] ...
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubeinfer_devkit.devcluster import build, components, pki, procs


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Processes -------------------------------------------------------------------------------------


class ControlPlane:
    """Start/stop a local control plane; see the module docstring.

    Attributes set by start(): ``server`` (https URL), ``kubeconfig`` (Path), ``token`` (admin bearer
    token), ``ca_file`` (Path), ``bin`` ({component: Path}), ``ports`` ({name: port}).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        binaries: Mapping[str, os.PathLike[str] | str] | None = None,
        with_controllers: bool = True,
        with_scheduler: bool = True,
        with_kwok: bool = True,
        node_name: str = "kwok-gpu-node",
        node_gpus: int = 8,
        node_cpu: str = "32",
        node_memory: str = "256Gi",
        pod_cidr: str = components.DEFAULT_POD_CIDR,
        keep_state: bool = False,
        reuse_state: bool = False,
        node_users: Sequence[str] = (),
        users: Sequence[str] = (),
        disabled_controllers: Sequence[str] = (),
        startup_timeout: float = 120.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.with_controllers = with_controllers
        self.with_scheduler = with_scheduler
        self.with_kwok = with_kwok
        self.node_name = node_name
        self.node_gpus = node_gpus
        self.node_cpu = node_cpu
        self.node_memory = node_memory
        self.pod_cidr = pod_cidr
        self.startup_timeout = startup_timeout
        self._log = log or (lambda msg: print(f"[kubeinfer controlplane] {msg}", file=sys.stderr, flush=True))
        self._own_state = state_dir is None
        self._keep_state = keep_state
        self.reuse_state = reuse_state
        self.node_users = tuple(node_users)
        self.users = tuple(users)
        self.disabled_controllers = tuple(disabled_controllers)
        self.state_dir = (
            Path(state_dir)
            if state_dir is not None
            else Path(tempfile.mkdtemp(prefix="kubeinfer-controlplane-"))
        )
        self._binaries = dict(binaries) if binaries is not None else None

        self.bin: dict[str, Path] = {}
        self.ports: dict[str, int] = {}
        self.server = ""
        self.token = ""
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.pki_dir = self.state_dir / "pki"
        self.ca_file = self.pki_dir / "ca.crt"
        self.log_dir = self.state_dir / "logs"
        self.startup_seconds: float | None = None
        self._procs: list[_Proc] = []
        self._ssl: ssl.SSLContext | None = None
        self._started = False

    # -- public API ---------------------------------------------------------------------------------

    @property
    def components(self) -> list[str]:
        names = ["etcd", "kube-apiserver"]
        if self.with_controllers:
            names.append("kube-controller-manager")
        if self.with_scheduler:
            names.append("kube-scheduler")
        if self.with_kwok:
            names.append("kwok")
        return names

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self._started:
            return self
        t0 = time.monotonic()
        self._started = True
        atexit.register(self.stop)
        try:
            if self._binaries is None:
                self.bin = build.ensure_binaries(self.components)
            else:
                self.bin = {k: Path(v) for k, v in self._binaries.items()}
                missing = [c for c in self.components if c not in self.bin]
                if missing:
                    raise ControlPlaneError(f"no binary given for {missing}")
            self._prepare()
            self._start_etcd()
            self._start_apiserver()
            if self.with_controllers:
                self._start_controller_manager()
            if self.with_scheduler:
                self._start_scheduler()
            if self.with_kwok:
                self._start_kwok()
            if self.with_controllers:
                # The ServiceAccount admission plugin rejects pods until the namespace's `default`
                # ServiceAccount exists; the controller-manager creates it shortly after start.
                sa_path = "/api/v1/namespaces/default/serviceaccounts/default"
                self._wait("default ServiceAccount", lambda: self._get(sa_path) is not None)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        self._log(f"ready in {self.startup_seconds:.1f}s: {self.server} (kubeconfig {self.kubeconfig})")
        return self

    def stop(self) -> None:
        """Terminate all processes (newest first), then remove a state dir we created."""
        if not self._started:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        for proc in reversed(self._procs):
            self._terminate(proc)
        self._procs.clear()
        if self._own_state and not self._keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG pointing at this control plane (for subprocesses)."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this control plane (`input` goes to its stdin)."""
        kubectl = self.bin.get("kubectl") or build.ensure_binaries(["kubectl"])["kubectl"]
        return subprocess.run(
            [str(kubectl), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def node_kubeconfig(self, node: str) -> Path:
        """Kubeconfig of `system:node:<node>` (group system:nodes), for a name in `node_users`: the
        Node authorizer and the NodeRestriction admission plugin hold it to what a kubelet may do."""
        return self.state_dir / f"node-{node}.kubeconfig"

    def user_kubeconfig(self, user: str) -> Path:
        """Kubeconfig of a name in `users` (a static token, no groups)."""
        return self.state_dir / f"user-{user.replace(':', '-')}.kubeconfig"

    def get(self, path: str) -> Any:
        """GET an API path as the admin (JSON); None on 404."""
        return self._get(path)

    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        """The running components by name (for a supervisor that records and watches them)."""
        return {p.name: p.popen for p in self._procs}

    # -- setup --------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        reuse = (
            self.reuse_state
            and (self.pki_dir / "apiserver.crt").is_file()
            and (self.pki_dir / "tokens.json").is_file()
        )
        if not reuse:
            # A fresh cluster: certificates and tokens are new, so old data would be useless.
            shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)
            pki.write_cluster_pki(self.pki_dir, components.KUBERNETES_SERVICE_IP)
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))

        names = ["etcd-client", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"]
        ports_json = self.state_dir / "ports.json"
        old_ports: dict[str, int] = (
            json.loads(ports_json.read_text()) if reuse and ports_json.is_file() else {}
        )
        # The same apiserver port as last time keeps a user's `export KUBECONFIG=...` working.
        if sorted(old_ports) == sorted(names) and all(_port_free(p) for p in old_ports.values()):
            self.ports = old_ports
        else:
            self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        ports_json.write_text(json.dumps(self.ports))
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"

        users = {
            "admin": '"system:masters"',
            "system:kube-controller-manager": "",
            "system:kube-scheduler": "",
            **{f"system:node:{n}": '"system:nodes"' for n in self.node_users},
            **{u: "" for u in self.users},
        }
        tokens = pki.write_tokens(self.pki_dir, users, reuse)
        self.token = tokens["admin"]
        self._write_kubeconfig(self.kubeconfig, "admin", self.token)
        self._write_kubeconfig(
            self.state_dir / "controller-manager.kubeconfig",
            "system:kube-controller-manager",
            tokens["system:kube-controller-manager"],
        )
        self._write_kubeconfig(
            self.state_dir / "scheduler.kubeconfig", "system:kube-scheduler", tokens["system:kube-scheduler"]
        )
        for node in self.node_users:
            self._write_kubeconfig(
                self.node_kubeconfig(node), f"system:node:{node}", tokens[f"system:node:{node}"]
            )
        for user in self.users:
            self._write_kubeconfig(self.user_kubeconfig(user), user, tokens[user])

    def _write_kubeconfig(self, path: Path, user: str, token: str) -> None:
        pki.write_kubeconfig(path, self.server, self.ca_file, user, token)

    def _start_etcd(self) -> None:
        client, peer = self.ports["etcd-client"], self.ports["etcd-peer"]
        self._spawn("etcd", components.etcd(self.bin["etcd"], self.state_dir / "etcd", client, peer))
        self._wait("etcd", lambda: self._http_ok(f"http://127.0.0.1:{client}/health"))

    def _start_apiserver(self) -> None:
        argv = components.kube_apiserver(
            self.bin["kube-apiserver"], self.ports["etcd-client"], self.ports["apiserver"], self.pki_dir
        )
        self._spawn("kube-apiserver", argv)
        self._wait("kube-apiserver /readyz", lambda: self._http_ok(f"{self.server}/readyz", api=True))

    def _start_controller_manager(self) -> None:
        port = self.ports["controller-manager"]
        argv = components.kube_controller_manager(
            self.bin["kube-controller-manager"], self.state_dir / "controller-manager.kubeconfig", port,
            self.state_dir / "controller-manager-certs", self.pki_dir, self.disabled_controllers,
        )  # fmt: skip
        self._spawn("kube-controller-manager", argv)
        self._wait(
            "kube-controller-manager /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", verify=False),
        )

    def _start_scheduler(self) -> None:
        port = self.ports["scheduler"]
        argv = components.kube_scheduler(
            self.bin["kube-scheduler"], self.state_dir / "scheduler.kubeconfig", port,
            self.state_dir / "scheduler-certs",
        )  # fmt: skip
        self._spawn("kube-scheduler", argv)
        self._wait(
            "kube-scheduler /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", verify=False),
        )

    def _start_kwok(self) -> None:
        # kwok itself has no built-in behaviour: the Stages (kwokctl's defaults, saved next to the
        # binary by build.py) say how nodes get Ready and how pods get Running.
        stages_dir = self.bin["kwok"].parent / "stages"
        stages = sorted(stages_dir.glob("*.yaml"))
        if not stages:
            raise ControlPlaneError(f"no kwok stages in {stages_dir}; rebuild kwok with build.py --force")
        config = self.state_dir / "kwok.yaml"
        config.write_text("\n---\n".join(p.read_text().strip() for p in stages) + "\n")
        self._spawn("kwok", components.kwok(self.bin["kwok"], self.kubeconfig, config, self.pod_cidr))
        node = components.kwok_node(
            self.node_name, self.node_cpu, self.node_memory, self.node_gpus, build.KUBERNETES_VERSION
        )
        self._request("POST", "/api/v1/nodes", node)
        self._wait(f"node {self.node_name} Ready", self._node_ready)

    def _node_ready(self) -> bool:
        node = self._get(f"/api/v1/nodes/{self.node_name}")
        if node is None:
            return False
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        # The node lifecycle controller taints a node that was not (yet) Ready; wait until it
        # has lifted that, or the scheduler would keep pods off the node for a while.
        tainted = any(
            t.get("key", "").startswith("node.kubernetes.io/")
            for t in node.get("spec", {}).get("taints", []) or []
        )
        return ready and not tainted

    # -- plumbing -----------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> None:
        log_path = self.log_path(name)
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in _terminate
        self._log(f"starting {name}")
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=self.state_dir,
            # Own process group: a terminal's Ctrl-C reaches only us, and we stop them in order.
            start_new_session=True,
            preexec_fn=procs.die_with_parent(),
        )
        self._procs.append(_Proc(name, popen, log_path, log_file))

    def _terminate(self, proc: _Proc, grace: float = 15.0) -> None:
        p = proc.popen
        try:
            if p.poll() is None:
                p.terminate()  # SIGTERM: etcd and the kube-* binaries shut down gracefully on it
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._log(f"{proc.name} did not stop in {grace:.0f}s; killing it")
                    # The process leads its own group (start_new_session): kill all of it.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        finally:
            proc.log_file.close()

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float | None = None) -> None:
        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        last_error: Exception | None = None
        while True:
            for proc in self._procs:
                if proc.popen.poll() is not None:
                    raise ControlPlaneError(
                        f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}; "
                        f"last lines of {proc.log_path}:\n{_tail(proc.log_path)}"
                    )
            try:
                if ready():
                    self._log(f"{what}: ok after {time.monotonic() - t0:.1f}s")
                    return
            except (OSError, ValueError, ControlPlaneError) as exc:  # not up yet (refused, 403 ...)
                last_error = exc
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.log_path}:\n{_tail(p.log_path, 15)}" for p in self._procs)
                raise ControlPlaneError(
                    f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})\n{logs}"
                )
            time.sleep(0.25)

    def _http_ok(self, url: str, *, api: bool = False, verify: bool = True) -> bool:
        req = urllib.request.Request(url)
        if api:
            req.add_header("Authorization", f"Bearer {self.token}")
        ctx = None
        if url.startswith("https"):
            if verify:
                ctx = self._ssl
            else:  # controller-manager/scheduler serve with self-signed certs of their own
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                status: int = resp.status
                return status == 200
        except urllib.error.HTTPError:
            return False

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ssl) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ControlPlaneError(f"{method} {path} -> {exc.code}: {detail}") from exc

    def _get(self, path: str) -> Any:
        """GET a JSON object; None on 404."""
        try:
            return self._request("GET", path)
        except ControlPlaneError as exc:
            if isinstance(exc.__cause__, urllib.error.HTTPError) and exc.__cause__.code == 404:
                return None
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.devcluster.controlplane",
        description="Run a local control plane until Ctrl-C.",
    )
    parser.add_argument("--state-dir", help="where data, certs, kubeconfig and logs go (default: temp)")
    parser.add_argument("--no-controllers", action="store_true")
    parser.add_argument("--no-scheduler", action="store_true")
    parser.add_argument("--no-kwok", action="store_true")
    args = parser.parse_args(argv)
    cp = ControlPlane(
        args.state_dir,
        with_controllers=not args.no_controllers,
        with_scheduler=not args.no_scheduler,
        with_kwok=not args.no_kwok,
        keep_state=args.state_dir is not None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with cp:
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
