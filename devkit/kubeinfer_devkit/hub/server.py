"""A local Hugging Face Hub: enough of the Hub's HTTP API for the real ``huggingface_hub`` client (2.x) to
read a repository's info and download its files, plus hooks that make the network misbehave on purpose.

Repositories are directories, ``<root>/<org>/<name>/...``. Each has one branch, ``main``, whose commit
sha is derived from the files' contents (stable across restarts); the sha itself is accepted as a revision
too. A repository holding ``.hub-gated`` is gated: its files need ``Authorization: Bearer <token>`` equal to
the server's token. Files and folders whose name starts with ``.hub-`` are neither listed nor served.

What it implements, and why (the client calls that need it in brackets):

- ``GET /api/models/{org}/{name}[/revision/{rev}]``, ``?blobs=true`` adding the siblings' sizes, git blob
  ids and LFS sha256 (``HfApi.model_info(files_metadata=True)``, ``repo_info``). As on the Hub, a gated
  repository's info is public (``"gated": "manual"``): only its files are gated.
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]?recursive=true``: the listing ``snapshot_download``
  reads before it downloads anything (``list_repo_tree``); one page, no ``Link`` header.
- ``HEAD /{org}/{name}/resolve/{rev}/{path}``: the metadata ``hf_hub_download`` needs: ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, or the sha256 for LFS-like files), for LFS-like files ``X-Linked-Etag`` and
  ``X-Linked-Size``, and ``Content-Length``. Always 200 (the Hub redirects LFS files to its CDN; the
  client reads the same headers either way). No ``X-Xet-*`` header and no ``xetHash`` in listings, so
  the client (with ``hf_xet`` installed) never tries the Xet protocol.
- ``GET`` of the same URL, honouring ``Range: bytes=a-[b]`` (206 + ``Content-Range``) so a download
  broken mid-file resumes where it stopped.
- Errors as the Hub sends them, which ``huggingface_hub.utils.hf_raise_for_status`` maps to its typed
  errors by the ``X-Error-Code`` header: ``RepoNotFound`` (401 without a token, 404 with one: the Hub does
  not tell anonymous callers whether a private repository exists), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404), ``GatedRepo`` (401 without a token, 403 with a token not granted access); and a
  401 with ``X-Error-Message: Invalid credentials in Authorization header`` for a token in
  :attr:`HubServer.reject_tokens` (a revoked token).

A file is "LFS-like" (listed with ``lfs`` metadata, its ETag the sha256) when its suffix is a weight format
or it is over 10 MB, the Hub's limit for plain git files.

Test hooks: :meth:`HubServer.fail_next` (drop the connection part-way through a file's body),
:meth:`HubServer.corrupt_next` (serve other bytes than the advertised sha256),
:attr:`HubServer.rate_limit_bps` (throttle file bodies) and :attr:`HubServer.requests` (every request's
method, path and status).

Command line: ``python -m kubeinfer_devkit.hub.server --root DIR [--host H] [--port P] [--token T]
[--access-log]`` prints its URL and serves until interrupted (with ``--access-log``, then a line per
request); point a client at it with ``HF_ENDPOINT=<url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import hashlib
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

MAIN = "main"
HIDDEN_PREFIX = ".hub-"
GATED_MARKER = ".hub-gated"
LFS_SUFFIXES = frozenset(
    {".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npz", ".model"}
)
LFS_MIN_SIZE = 10 * 1000 * 1000
CHUNK = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_LOGGED = web.RequestKey("kubeinfer_devkit.hub.logged", bool)


@dataclass(frozen=True)
class HubFile:
    path: str
    """Repo-relative, '/'-separated."""
    disk: Path
    size: int
    sha256: str
    blob_id: str
    """The git blob sha1: of the content, or of the LFS pointer for LFS-like files (as git stores them)."""
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    gated: bool
    sha: str
    files: dict[str, HubFile]


@dataclass
class _Fault:
    remaining: int
    glob: str
    reset: bool = False


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


class HubServer:
    """Serves ``root``'s repositories on ``host:port`` (port 0: a free one) until :meth:`stop`."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self.token = token
        self.url = ""
        self.rate_limit_bps: float | None = None
        """Throttle every file body to about this many bytes per second (None: as fast as possible)."""
        self.reject_tokens: set[str] = set()
        """Tokens answered with 401 'Invalid credentials' on every request, as the Hub does a revoked one."""
        self.requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every request, in order (a file body's as it starts); 499 where the
        client went away before an answer."""
        self.on_request: Callable[[str, str, int, bool], None] | None = None
        """Called with (method, path, status, whether it carried a token) as each request is logged
        (the command line's ``--access-log``)."""
        self.range_requests: list[tuple[str, str]] = []
        """(path, Range header) of every file GET that asked for a range: the resumed downloads."""
        self._faults: list[_Fault] = []
        self._corrupt: list[_Fault] = []
        self._digests: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._runner: web.AppRunner | None = None

    # -- test hooks -----------------------------------------------------------------------------------

    def fail_next(self, n: int, path_glob: str = "*", *, reset: bool = False) -> None:
        """The next ``n`` GETs of files matching ``path_glob`` (fnmatch on the repo-relative path) send half
        of their body, then drop the connection: closed cleanly (the client sees a short body, which
        ``huggingface_hub`` resumes itself with a Range request) or, with ``reset``, reset (a TCP RST: the
        client sees a read error, which ``huggingface_hub`` passes up to its caller)."""
        self._faults.append(_Fault(n, path_glob, reset))

    def corrupt_next(self, n: int, path_glob: str = "*") -> None:
        """The next ``n`` GETs of matching files serve a flipped first byte: the length is right, the
        sha256 is not what the listing and the ETag advertise."""
        self._corrupt.append(_Fault(n, path_glob))

    def file_gets(self) -> list[str]:
        """The paths of the file downloads (GET .../resolve/...) so far."""
        return [path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]

    @staticmethod
    def _take(faults: list[_Fault], path: str) -> _Fault | None:
        for fault in faults:
            if fault.remaining > 0 and fnmatch.fnmatchcase(path, fault.glob):
                fault.remaining -= 1
                return fault
        return None

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._log])
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}/{path:.*}", self._tree)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)  # HEAD too
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- repositories ---------------------------------------------------------------------------------

    def _digest(self, path: Path, size: int, mtime_ns: int) -> tuple[str, str]:
        """(sha256, git blob sha1) of a file's content, cached by (path, size, mtime)."""
        key = (str(path), size, mtime_ns)
        if key not in self._digests:
            sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\x00" % size)
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    sha256.update(block)
                    sha1.update(block)
            self._digests[key] = (sha256.hexdigest(), sha1.hexdigest())
        return self._digests[key]

    def _scan(self, org: str, name: str) -> HubRepo | None:
        if not (_NAME.fullmatch(org) and _NAME.fullmatch(name)):
            return None
        base = self.root / org / name
        if not base.is_dir():
            return None
        files: dict[str, HubFile] = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(HIDDEN_PREFIX) and d != ".git")
            for fname in sorted(filenames):
                if fname.startswith(HIDDEN_PREFIX):
                    continue
                disk = Path(dirpath) / fname
                st = disk.stat()
                rel = disk.relative_to(base).as_posix()
                sha256, content_sha1 = self._digest(disk, st.st_size, st.st_mtime_ns)
                lfs = disk.suffix.lower() in LFS_SUFFIXES or st.st_size > LFS_MIN_SIZE
                blob_id = git_blob_sha1(lfs_pointer(sha256, st.st_size)) if lfs else content_sha1
                files[rel] = HubFile(rel, disk, st.st_size, sha256, blob_id, lfs)
        commit = hashlib.sha1()
        for rel in sorted(files):
            commit.update(f"{rel}\x00{files[rel].sha256}\n".encode())
        return HubRepo(f"{org}/{name}", (base / GATED_MARKER).exists(), commit.hexdigest(), files)

    # -- requests -------------------------------------------------------------------------------------

    @web.middleware
    async def _log(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            self._record(request, exc.status)
            raise
        except (ConnectionError, asyncio.CancelledError):
            if not request.get(_LOGGED):
                self._record(request, 499)
            raise
        if not request.get(_LOGGED):
            self._record(request, resp.status)
        return resp

    def _record(self, request: web.Request, status: int) -> None:
        self.requests.append((request.method, request.path, status))
        if self.on_request is not None:
            self.on_request(request.method, request.path, status, self._bearer(request) is not None)

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        value = request.headers.get("Authorization", "")
        if value[:7].lower() != "bearer ":
            return None
        return value[7:].strip() or None

    @staticmethod
    def _error(status: int, code: str | None, message: str, commit: str | None = None) -> web.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        return web.json_response({"error": message}, status=status, headers=headers)

    async def _open(self, request: web.Request, *, files: bool) -> tuple[HubRepo | None, web.Response | None]:
        """The request's repository at its revision, or the error the Hub would answer."""
        token = self._bearer(request)
        if token is not None and token in self.reject_tokens:
            return None, self._error(401, None, "Invalid credentials in Authorization header")
        org, name = request.match_info["org"], request.match_info["name"]
        repo = await asyncio.to_thread(self._scan, org, name)
        if repo is None:
            return None, self._error(404 if token else 401, "RepoNotFound", "Repository not found")
        rev = request.match_info.get("rev", MAIN)
        if rev not in (MAIN, repo.sha):
            return None, self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if files and repo.gated and token != self.token:
            if token is None:
                msg = (
                    f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                return None, self._error(401, "GatedRepo", msg)
            msg = (
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.url}/{repo.repo_id} to ask for access."
            )
            return None, self._error(403, "GatedRepo", msg)
        return repo, None

    async def _info(self, request: web.Request) -> web.Response:
        repo, err = await self._open(request, files=False)
        if repo is None:
            assert err is not None
            return err
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for f in repo.files.values():
            sibling: dict[str, object] = {"rfilename": f.path}
            if blobs:
                sibling |= {"size": f.size, "blobId": f.blob_id}
                if f.lfs:
                    pointer = len(lfs_pointer(f.sha256, f.size))
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": pointer}
            siblings.append(sibling)
        body = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": repo.sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        return web.json_response(body, headers={"X-Repo-Commit": repo.sha})

    async def _tree(self, request: web.Request) -> web.Response:
        repo, err = await self._open(request, files=False)
        if repo is None:
            assert err is not None
            return err
        prefix = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive", "").lower() in ("1", "true")
        under = [f for f in repo.files.values() if not prefix or f.path.startswith(prefix + "/")]
        if prefix and not under:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {MAIN}", repo.sha)
        entries: list[dict[str, object]] = []
        dirs: set[str] = set()
        for f in under:
            rest = f.path[len(prefix) + 1 :] if prefix else f.path
            parts = rest.split("/")
            # Folders: every level when recursive, else the first below `prefix`.
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                dirs.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if len(parts) > 1 and not recursive:
                continue
            entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                pointer = len(lfs_pointer(f.sha256, f.size))
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": pointer}
            entries.append(entry)
        for d in sorted(dirs):
            oid = hashlib.sha1(f"{repo.sha}:{d}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo, err = await self._open(request, files=True)
        if repo is None:
            assert err is not None
            return err
        f = repo.files.get(request.match_info["path"])
        if f is None:
            return self._error(404, "EntryNotFound", f"{request.match_info['path']} not found", repo.sha)
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        if request.method == "HEAD":
            # aiohttp keeps an explicit Content-Length on a bodiless HEAD answer.
            return web.Response(status=200, headers=headers | {"Content-Length": str(f.size)})
        return await self._send(request, f, headers)

    async def _send(self, request: web.Request, f: HubFile, headers: dict[str, str]) -> web.StreamResponse:
        start, end, status = 0, f.size - 1, 200
        if "Range" in request.headers:
            self.range_requests.append((request.path, request.headers["Range"]))
            m = _RANGE.fullmatch(request.headers["Range"].strip())
            if m is None or m.groups() == ("", ""):
                return self._error(416, None, f"bad Range {request.headers['Range']!r}")
            first, last = m.groups()
            if first == "":  # a suffix: the last N bytes
                start = max(0, f.size - int(last))
            else:
                start, end = int(first), min(int(last), f.size - 1) if last else f.size - 1
            if start >= f.size or start > end:
                bad = self._error(416, None, "Requested Range Not Satisfiable")
                bad.headers["Content-Range"] = f"bytes */{f.size}"
                return bad
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = end - start + 1
        fault = self._take(self._faults, f.path)
        corrupt = self._take(self._corrupt, f.path) is not None
        # A dropped body stops after half of what was asked (at least one byte when there is more than one).
        stop_at = start + max(1, length // 2) if fault is not None and length > 1 else end + 1
        # Logged as the body starts: the client may have it all (and a test look at the log) before
        # this handler returns.
        self._record(request, status)
        request[_LOGGED] = True
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        chunk = CHUNK if not self.rate_limit_bps else int(min(CHUNK, max(1024, self.rate_limit_bps / 20)))
        pos = start
        with f.disk.open("rb") as fh:
            fh.seek(start)
            while pos < stop_at:
                data = fh.read(min(chunk, stop_at - pos))
                if not data:
                    break  # the file shrank under us: the client's length check will notice
                if corrupt and pos == start:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                await resp.write(data)
                pos += len(data)
                if self.rate_limit_bps:
                    await asyncio.sleep(len(data) / self.rate_limit_bps)
        if fault is not None and stop_at <= end:
            self._drop(request, reset=fault.reset)
            return resp
        await resp.write_eof()
        return resp

    @staticmethod
    def _drop(request: web.Request, *, reset: bool) -> None:
        transport = request.transport
        if transport is None:
            return
        if reset:
            # SO_LINGER 0: close() sends an RST instead of a FIN.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


def _access_line(method: str, path: str, status: int, token: bool) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} {method} {path} {status}{' token' if token else ''}", flush=True)


async def run_forever(
    root: Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None, access_log: bool = False
) -> None:
    """Serve until SIGINT/SIGTERM, printing the URL first (one line, flushed); with `access_log`, then
    one line per request: ``<UTC time> <method> <path> <status>[ token]``."""
    server = HubServer(root, host, port, token)
    if access_log:
        server.on_request = _access_line
    url = await server.start()
    print(url, flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.hub.server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--root", required=True, type=Path, help="folder of <org>/<name>/ repositories")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--token", help="the token gated repositories (those holding .hub-gated) accept")
    p.add_argument(
        "--access-log", action="store_true", help="print a line per request: time, method, path, status"
    )
    args = p.parse_args(argv)
    if not args.root.is_dir():
        p.error(f"{args.root}: no such folder")
    asyncio.run(run_forever(args.root, args.host, args.port, args.token, args.access_log))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
