"""`kubectl logs` for the node agent's pods: the slice of the kubelet API the apiserver proxies to.

Each container's output is ``<state>/pods/<ns>_<pod>_<uid>/<container>/<restart>.log`` (written by
:class:`~kubeinfer_devkit.devcluster.containers.ContainerRunner`); :class:`LogServer` serves it on
the node's kubelet port (TLS, 127.0.0.1 only) with ``previous``, ``tailLines``, ``limitBytes`` and
``follow``.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from kubeinfer_devkit.devcluster.node import LOCALHOST, NodeAgent
from kubeinfer_devkit.devcluster.pki import kubelet_serving_context
from kubeinfer_devkit.devcluster.podplan import NODE_NAME


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
        ctx = kubelet_serving_context(self.agent.state_dir / "pki", NODE_NAME, LOCALHOST)
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
