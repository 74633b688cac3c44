"""Fetch a model's files from a Hugging Face Hub into the shared weight cache, as ``<root>/<key>/``.

Runs in the cache Job the operator creates per cache entry (``kubeinfer weights fetch``); the engines
then read ``<root>/<key>/``. The Hub's endpoint and token come from ``HF_ENDPOINT`` and ``HF_TOKEN``.

How:

1. ``<root>/<key>/.kubeinfer-complete.json`` exists: done, nothing downloaded, no request made.
2. Resolve the revision to a commit sha and list the files with sizes and LFS sha256 (``model_info``);
   select the files (``--include``, ``--gguf-quant``/``--gguf-file``, ``--mmproj``).
3. Take ``<root>/.partial/<key>.lock`` (one fetch per key; a second waits, then finds the entry done).
   Check the free space against the bytes still missing, then download with ``snapshot_download`` into
   ``<root>/.partial/<key>/`` (pinned to the sha, only the selected files). A re-run finds the files the
   last run completed there and skips them. A file cut off mid-body is resumed by huggingface_hub itself
   (with a Range request, from its last 10 MiB chunk written) when the connection was closed; after a
   reset or a new run it is downloaded again from its start: huggingface_hub 2.x keeps a broken file's
   partial bytes only within one call (a per-process temporary name, deleted on failure).
4. Verify every file's size, and its sha256 where the Hub has one (LFS files). A mismatch deletes the
   file and downloads it again (twice at most).
5. Write the complete marker, drop ``huggingface_hub``'s ``.cache`` folder and rename the partial folder to
   ``<root>/<key>`` (atomic on one filesystem: nothing half-written is ever at ``<root>/<key>``). If
   another Job got there first, its entry is kept and ours dropped.

Network errors (connection errors, timeouts, 5xx/408/429, short bodies) are retried in-process with
exponential backoff (1, 2, 4 ... s, at most 60 s; ``--retries`` attempts in all), each attempt keeping
what the last one completed.

stdout carries one JSON event per line (:mod:`kubeinfer.weights.progress` reads them back):
``start``, ``progress`` (every ``--progress-interval`` s), ``retry``, ``log``, ``done``, ``error``. The last
one (``done`` or ``error``) also goes to the container's termination message file, where Kubernetes
provides one (``/dev/termination-log``; ``$KUBEINFER_TERMINATION_LOG`` overrides), so the Job's pod status
carries it as one line even when the log is gone.

Exit codes (the Job's podFailurePolicy fails the Job at once on :data:`PERMANENT_EXIT_CODES`, 10-14):

====  ===========================================================================================
 0    done, or the entry was already complete
 1    unexpected error (a bug; a traceback on stderr); the Job's backoffLimit retries it
 2    usage error (a key with ``/`` or ``..``, a bad option): the operator's bug, not the model's
 10   RepoNotFound: no such repository (or a private one and no token)
 11   GatedRepo / Unauthorized: no token, a token not granted access, or a rejected token
 12   RevisionNotFound / FileNotFound: no such revision, quant, file, or nothing matched ``--include``
 13   DiskFull: not enough free space before starting, or ENOSPC while writing
 14   ChecksumMismatch: a file's sha256 kept differing from what the Hub advertises
 20   NetworkError: still failing after ``--retries`` attempts (retryable: a new pod resumes)
====  ===========================================================================================
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from kubeinfer.weights.progress import format_bytes

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_REPO_NOT_FOUND = 10
EXIT_UNAUTHORIZED = 11
EXIT_NOT_FOUND = 12
EXIT_DISK_FULL = 13
EXIT_CHECKSUM = 14
EXIT_NETWORK = 20
PROGRESS_CHUNK_BYTES = 1 << 20
PERMANENT_EXIT_CODES = (EXIT_REPO_NOT_FOUND, EXIT_UNAUTHORIZED, EXIT_NOT_FOUND, EXIT_DISK_FULL, EXIT_CHECKSUM)

COMPLETE_MARKER = ".kubeinfer-complete.json"
PARTIAL_DIR = ".partial"
GGUF_LINK = "model.gguf"
MMPROJ_LINK = "mmproj.gguf"
DEFAULT_ENDPOINT = "https://huggingface.co"
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4000  # bytes; Kubernetes keeps 4096 of a termination message
CHECKSUM_RETRIES = 2
"""Re-downloads of a file whose sha256 differs (a corrupted transfer) before it is a permanent error."""

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_T = TypeVar("_T")


class FetchError(Exception):
    """A failure with a reason the operator shows; ``code`` is the exit code."""

    def __init__(self, reason: str, message: str, code: int) -> None:
        super().__init__(message)
        self.reason, self.message, self.code = reason, message, code

    @property
    def permanent(self) -> bool:
        return self.code in PERMANENT_EXIT_CODES


class _ChecksumMismatch(Exception):
    pass


class _Incomplete(Exception):
    """``snapshot_download`` returned without every file: it falls back to what is on disk when the Hub
    is unreachable. A network error, then."""


@dataclass(frozen=True)
class FetchOptions:
    root: Path
    key: str
    repo: str
    revision: str = "main"
    include: tuple[str, ...] = ()
    gguf_quant: str | None = None
    gguf_file: str | None = None
    mmproj: bool = False
    retries: int = 8
    progress_interval: float = 2.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    endpoint: str | None = None
    """Default: $HF_ENDPOINT, else huggingface.co."""
    token: str | None = None
    """Default: $HF_TOKEN."""


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Selection:
    files: tuple[RepoFile, ...]
    gguf: str | None = None
    """The file ``model.gguf`` links to."""
    mmproj: str | None = None
    """The file ``mmproj.gguf`` links to."""
    notes: tuple[str, ...] = ()

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def links(self) -> dict[str, str]:
        pairs = ((GGUF_LINK, self.gguf), (MMPROJ_LINK, self.mmproj))
        return {name: target for name, target in pairs if target and target != name}


def valid_key(key: str) -> bool:
    """A cache key is one path component: no ``/``, no ``..``, not hidden (``.partial`` is ours)."""
    return bool(_KEY.fullmatch(key)) and ".." not in key and len(key) <= 200


# -- file selection (pure) ----------------------------------------------------------------------------


def _has_token(name: str, token: str) -> bool:
    """``token`` appears in a file name as a whole token: after a separator, before ``-`` or ``.``
    (``Q4_K`` is in ``x-Q4_K.gguf``, not in ``x-Q4_K_M.gguf``; ``_`` belongs to quant names)."""
    pattern = r"(?:^|[-._/])" + re.escape(token) + r"(?=[-.]|$)"
    return re.search(pattern, name, re.IGNORECASE) is not None


def _is_mmproj(path: str) -> bool:
    return path.rsplit("/", 1)[-1].lower().startswith("mmproj")


def gguf_quants(paths: Sequence[str]) -> list[str]:
    """The quant tags of a repo's GGUF files: the name's last ``-``/``.`` token (``x-Q4_K_M.gguf``)."""
    quants = set()
    for path in paths:
        if not path.lower().endswith(".gguf") or _is_mmproj(path):
            continue
        stem = _SPLIT_GGUF.sub("", path.rsplit("/", 1)[-1])
        stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
        quants.add(re.split(r"[-.]", stem)[-1])
    return sorted(quants, key=str.upper)


def select_files(
    files: Sequence[RepoFile],
    *,
    repo: str,
    include: Sequence[str] = (),
    gguf_quant: str | None = None,
    gguf_file: str | None = None,
    mmproj: bool = False,
) -> Selection:
    """Which of a repo's files to fetch; FetchError (FileNotFound, permanent) when a choice finds none.

    No option: every file. ``include`` patterns (fnmatch, as ``allow_patterns``), the GGUF choice and the
    projector add up."""
    by_path = {f.path: f for f in files}
    ggufs = sorted(p for p in by_path if p.lower().endswith(".gguf"))
    chosen: dict[str, RepoFile] = {}
    notes: list[str] = []
    gguf: str | None = None
    projector: str | None = None

    if include:
        matched = [f for f in files if any(fnmatch.fnmatch(f.path, pat) for pat in include)]
        if not matched:
            raise FetchError(
                "FileNotFound",
                f"no file of {repo} matches --include {' '.join(include)} (it has: {_listing(by_path)})",
                EXIT_NOT_FOUND,
            )
        chosen |= {f.path: f for f in matched}

    if gguf_file is not None:
        if gguf_file not in by_path:
            raise FetchError(
                "FileNotFound",
                f"{repo} has no file {gguf_file} (its GGUF files: {', '.join(ggufs) or 'none'})",
                EXIT_NOT_FOUND,
            )
        gguf = gguf_file
    elif gguf_quant is not None:
        matches = [p for p in ggufs if not _is_mmproj(p) and _has_token(p, gguf_quant)]
        if not matches:
            quants = ", ".join(gguf_quants(ggufs)) or "none (no GGUF file)"
            raise FetchError(
                "FileNotFound",
                f"{repo} has no {gguf_quant} GGUF file; its quants: {quants}",
                EXIT_NOT_FOUND,
            )
        if len(matches) > 1 and any(_SPLIT_GGUF.search(p) for p in matches):
            raise FetchError(
                "FileNotFound",
                f"{repo}'s {gguf_quant} is a split GGUF ({', '.join(matches)}), which the weight cache does "
                "not support: pick a single-file quant",
                EXIT_NOT_FOUND,
            )
        gguf = min(matches, key=lambda p: (len(p), p))
        if len(matches) > 1:
            notes.append(f"{len(matches)} files match {gguf_quant} ({', '.join(matches)}): using {gguf}")
    if gguf is not None:
        chosen[gguf] = by_path[gguf]

    if mmproj:
        candidates = [p for p in ggufs if _is_mmproj(p)]
        if not candidates:
            raise FetchError(
                "FileNotFound", f"{repo} has no mmproj*.gguf projector file (--mmproj)", EXIT_NOT_FOUND
            )
        f16 = [p for p in candidates if _has_token(p, "f16")]
        projector = (f16 or candidates)[0]
        if len(candidates) > 1:
            notes.append(f"projector: using {projector} of {', '.join(candidates)}")
        chosen[projector] = by_path[projector]

    if not (include or gguf is not None or projector is not None):
        chosen = dict(by_path)
    if not chosen:
        raise FetchError("FileNotFound", f"{repo} has no files", EXIT_NOT_FOUND)
    return Selection(tuple(sorted(chosen.values(), key=lambda f: f.path)), gguf, projector, tuple(notes))


def _listing(by_path: dict[str, RepoFile], limit: int = 12) -> str:
    names = sorted(by_path)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "no files"


# -- events -------------------------------------------------------------------------------------------


class Events:
    """JSON lines on ``out``, flushed, one writer at a time (the progress thread writes too)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.outcome: str | None = None
        """The last ``done`` or ``error`` line."""
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, separators=(",", ":"))
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()
            if event in ("done", "error"):
                self.outcome = line

    def write_termination_message(self) -> None:
        path = Path(os.environ.get("KUBEINFER_TERMINATION_LOG", TERMINATION_LOG))
        if self.outcome is None or not path.is_file():
            return  # not in a container (the kubelet creates the file)
        line = self.outcome
        if len(line) > TERMINATION_LIMIT:  # the kubelet would cut the JSON short
            short = json.loads(line)
            short.pop("files", None)
            if isinstance(short.get("message"), str):
                short["message"] = short["message"][: TERMINATION_LIMIT // 2]
            line = json.dumps(short, separators=(",", ":"))
        with contextlib.suppress(OSError):
            path.write_text(line + "\n")


class _HubLogHandler(logging.Handler):
    """huggingface_hub's warnings (e.g. 'Trying to resume download...') as ``log`` events."""

    def __init__(self, events: Events) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.events.emit("log", level=record.levelname.lower(), message=record.getMessage())


# -- the fetch ----------------------------------------------------------------------------------------


def fetch(opts: FetchOptions, out: TextIO | None = None) -> int:
    """Run one fetch, printing its events on ``out`` (stdout); returns the exit code."""
    events = Events(out or sys.stdout)
    if not valid_key(opts.key):
        events.emit(
            "error",
            reason="InvalidKey",
            message=f"invalid cache key {opts.key!r}: one path component of letters, digits, '.', '_', '-'",
            permanent=True,
        )
        return EXIT_USAGE
    try:
        return _Fetch(opts, events).run()
    except FetchError as exc:
        events.emit("error", reason=exc.reason, message=exc.message, permanent=exc.permanent)
        return exc.code
    except Exception as exc:
        events.emit("error", reason="Unexpected", message=f"{type(exc).__name__}: {exc}", permanent=False)
        raise
    finally:
        events.write_termination_message()


@dataclass
class _Fetch:
    opts: FetchOptions
    events: Events
    endpoint: str = ""
    token: str | None = None
    final: Path = field(init=False)
    partial: Path = field(init=False)
    _checksum_failures: int = 0
    _verified: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    """path -> (size, mtime_ns, sha256) of files already hashed, not to hash them again on a retry."""

    def __post_init__(self) -> None:
        o = self.opts
        self.endpoint = (o.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.token = o.token or os.environ.get("HF_TOKEN") or None
        self.final = o.root / o.key
        self.partial = o.root / PARTIAL_DIR / o.key

    def run(self) -> int:
        o = self.opts
        if self._already_done():
            return EXIT_OK
        sha, files, gated = self._with_retries("resolving the revision", self._resolve)
        if gated and not self.token:
            raise self._gated_error()  # fails at the first file anyway: say so before any download
        selection = select_files(
            files,
            repo=o.repo,
            include=o.include,
            gguf_quant=o.gguf_quant,
            gguf_file=o.gguf_file,
            mmproj=o.mmproj,
        )
        self.events.emit(
            "start",
            repo=o.repo,
            revision=o.revision,
            sha=sha,
            files_total=len(selection.files),
            bytes_total=selection.bytes_total,
        )
        for note in selection.notes:
            self.events.emit("log", level="info", message=note)
        with self._exclusive():
            if self._already_done():  # the fetch we waited for completed it
                return EXIT_OK
            self.partial.mkdir(exist_ok=True)
            present_at_start = self._bytes_present(selection)
            with self._hub_logs(), self._progress(selection):
                self._with_retries("downloading", lambda: self._download(sha, selection))
            self._finish(sha, selection, self._hashes(selection))
        self.events.emit(
            "done",
            bytes_downloaded=max(0, selection.bytes_total - present_at_start),
            bytes_total=selection.bytes_total,
            files=[f.path for f in selection.files],
            path=str(self.final),
            sha=sha,
            links=selection.links,
        )
        return EXIT_OK

    # -- steps ----------------------------------------------------------------------------------------

    def _already_done(self) -> bool:
        marker = self.final / COMPLETE_MARKER
        if not marker.is_file():
            return False
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        files = info.get("files") or []
        self.events.emit(
            "done",
            bytes_downloaded=0,
            bytes_total=info.get("bytes", 0),
            files=[f.get("path") for f in files if isinstance(f, dict)],
            path=str(self.final),
            sha=info.get("sha"),
            links=info.get("links") or {},
        )
        return True

    def _resolve(self) -> tuple[str, list[RepoFile], bool]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        info = api.model_info(self.opts.repo, revision=self.opts.revision, files_metadata=True)
        if not info.sha:
            raise FetchError(
                "RevisionNotFound", f"{self.endpoint} returned no commit for {self.opts.repo}", EXIT_NOT_FOUND
            )
        files = [
            RepoFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs is not None else None)
            for s in info.siblings or []
        ]
        return info.sha, files, bool(info.gated)

    def _download(self, sha: str, selection: Selection) -> None:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.utils.tqdm import disable_progress_bars

        # The client writes a body 10 MiB at a time, and progress is read off the file sizes: a small
        # file showed 0 bytes until it was done. 1 MiB writes cost nothing and move progress steadily.
        constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, PROGRESS_CHUNK_BYTES)
        self._check_space(selection)
        disable_progress_bars()  # tqdm on stderr would only clutter the pod log
        snapshot_download(
            self.opts.repo,
            revision=sha,
            allow_patterns=[glob.escape(f.path) for f in selection.files],  # exact names, even with [ ]
            local_dir=self.partial,
            # The main cache is used too (refs, and files copied from it): keep it in the entry's own
            # .cache, removed at the end, instead of $HOME.
            cache_dir=self.partial / ".cache" / "hub",
            endpoint=self.endpoint,
            token=self.token or False,
        )
        self._verify(selection)

    def _check_space(self, selection: Selection) -> None:
        missing = selection.bytes_total - self._bytes_present(selection)
        free = shutil.disk_usage(self.opts.root).free
        if free < missing:
            raise FetchError(
                "DiskFull",
                f"{self.opts.repo} needs {format_bytes(missing)} more ({format_bytes(selection.bytes_total)} "
                f"in all) but {self.opts.root} has {format_bytes(free)} free",
                EXIT_DISK_FULL,
            )

    def _bytes_present(self, selection: Selection) -> int:
        """Bytes of the selected files already complete in the partial folder."""
        total = 0
        for f in selection.files:
            with contextlib.suppress(OSError):
                if (self.partial / f.path).stat().st_size == f.size:
                    total += f.size
        return total

    def _verify(self, selection: Selection) -> None:
        missing, corrupt = [], []
        for f in selection.files:
            path = self.partial / f.path
            try:
                st = path.stat()
            except FileNotFoundError:
                missing.append(f.path)
                continue
            if st.st_size != f.size:
                path.unlink()
                missing.append(f"{f.path} ({st.st_size} of {f.size} bytes)")
                continue
            if f.sha256 is None:
                continue
            digest = self._sha256(path, st)
            if digest != f.sha256:
                path.unlink()  # the next snapshot_download sees it missing and downloads it again
                self._verified.pop(f.path, None)
                corrupt.append(f"{f.path} (sha256 {digest[:12]}..., expected {f.sha256[:12]}...)")
        if corrupt:
            raise _ChecksumMismatch("checksum mismatch: " + ", ".join(corrupt))
        if missing:
            raise _Incomplete("incomplete download, missing: " + ", ".join(missing))

    def _sha256(self, path: Path, st: os.stat_result) -> str:
        rel = path.relative_to(self.partial).as_posix()
        cached = self._verified.get(rel)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        self._verified[rel] = (st.st_size, st.st_mtime_ns, h.hexdigest())
        return h.hexdigest()

    def _hashes(self, selection: Selection) -> dict[str, str]:
        return {
            f.path: self._sha256(self.partial / f.path, (self.partial / f.path).stat())
            for f in selection.files
        }

    def _finish(self, sha: str, selection: Selection, hashes: dict[str, str]) -> None:
        for name, target in selection.links.items():
            link = self.partial / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)  # relative: valid wherever the entry is mounted
        marker = {
            "repo": self.opts.repo,
            "revision": self.opts.revision,
            "sha": sha,
            "endpoint": self.endpoint,
            "files": [{"path": f.path, "size": f.size, "sha256": hashes[f.path]} for f in selection.files],
            "links": selection.links,
            "bytes": selection.bytes_total,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = self.partial / f"{COMPLETE_MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(tmp, self.partial / COMPLETE_MARKER)
        shutil.rmtree(self.partial / ".cache", ignore_errors=True)
        self._publish()

    def _publish(self) -> None:
        """Rename the partial folder to the entry; keep a complete entry another Job published first."""
        try:
            os.rename(self.partial, self.final)
            return
        except FileNotFoundError:
            # Another Job on the same partial folder renamed it first.
            if (self.final / COMPLETE_MARKER).is_file():
                return
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if (self.final / COMPLETE_MARKER).is_file():
            self.events.emit(
                "log", level="info", message=f"{self.final} was completed by another fetch: kept"
            )
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        # Not ours and not complete (never written by a fetch): move it aside, then publish.
        stale = self.opts.root / PARTIAL_DIR / f".stale-{self.opts.key}-{uuid.uuid4().hex[:8]}"
        os.rename(self.final, stale)
        os.rename(self.partial, self.final)
        shutil.rmtree(stale, ignore_errors=True)

    # -- retries and errors ---------------------------------------------------------------------------

    def _with_retries(self, what: str, step: Callable[[], _T]) -> _T:
        o = self.opts
        attempt = 0
        while True:
            attempt += 1
            checksum = False
            try:
                return step()
            except FetchError:
                raise
            except _ChecksumMismatch as exc:
                self._checksum_failures += 1
                if self._checksum_failures > CHECKSUM_RETRIES:
                    raise FetchError(
                        "ChecksumMismatch",
                        f"{o.repo}: {exc} after {self._checksum_failures} downloads: the Hub serves "
                        "other bytes than its metadata says",
                        EXIT_CHECKSUM,
                    ) from None
                error, checksum = str(exc), True
            except Exception as exc:
                known = self._classify(exc)
                if known is not None:
                    raise known from exc
                if not is_network_error(exc):
                    raise
                error = _describe(exc)
            if attempt >= o.retries:
                if checksum:
                    raise FetchError("ChecksumMismatch", f"{o.repo}: {error}", EXIT_CHECKSUM)
                raise FetchError(
                    "NetworkError",
                    f"{what} {o.repo} from {self.endpoint} failed {attempt} times: {error}",
                    EXIT_NETWORK,
                )
            delay = min(o.backoff_max, o.backoff_base * 2 ** (attempt - 1))
            self.events.emit("retry", attempt=attempt, delay=delay, error=error)
            time.sleep(delay)

    def _gated_error(self) -> FetchError:
        repo = self.opts.repo
        if self.token:
            msg = (
                f"{repo} is gated and the token has no access: accept its terms at {self.endpoint}/{repo} "
                "with the token's account"
            )
        else:
            msg = (
                f"{repo} is gated: set model.tokenSecretRef to a Secret with a token that has accepted "
                "its terms"
            )
        return FetchError("GatedRepo", msg, EXIT_UNAUTHORIZED)

    def _classify(self, exc: BaseException) -> FetchError | None:
        """The permanent error an exception means, or None (retryable, or unknown)."""
        from huggingface_hub.errors import (
            DisabledRepoError,
            GatedRepoError,
            HfHubHTTPError,
            HFValidationError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        o, where = self.opts, self.endpoint
        for e in _chain(exc):
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                return FetchError(
                    "DiskFull", f"{o.root} ran out of space while writing {o.repo}: {e}", EXIT_DISK_FULL
                )
        if isinstance(exc, GatedRepoError):  # a RepositoryNotFoundError: test it first
            return self._gated_error()
        if isinstance(exc, DisabledRepoError):
            return FetchError(
                "RepoNotFound", f"repository {o.repo} is disabled on {where}", EXIT_REPO_NOT_FOUND
            )
        if isinstance(exc, RepositoryNotFoundError | HFValidationError):
            hint = "" if self.token else " (or it is private and no token was given)"
            return FetchError(
                "RepoNotFound", f"repository {o.repo} not found on {where}{hint}", EXIT_REPO_NOT_FOUND
            )
        if isinstance(exc, RevisionNotFoundError):
            return FetchError(
                "RevisionNotFound", f"{o.repo} has no revision {o.revision!r} on {where}", EXIT_NOT_FOUND
            )
        if isinstance(exc, RemoteEntryNotFoundError):
            return FetchError(
                "FileNotFound", f"{o.repo}: a listed file is missing on {where}: {exc}", EXIT_NOT_FOUND
            )
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status == 401:
                return FetchError(
                    "Unauthorized",
                    f"{where} rejected the token (HTTP 401): check the Secret in model.tokenSecretRef",
                    EXIT_UNAUTHORIZED,
                )
            if status == 403:
                return FetchError(
                    "Unauthorized",
                    f"the token may not read {o.repo} on {where} (HTTP 403)",
                    EXIT_UNAUTHORIZED,
                )
        return None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One fetch per key at a time (they share the partial folder): a second one waits, then finds
        the entry complete. Where flock is a no-op (some NFS), :meth:`_publish` still keeps one entry."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial.parent / f"{self.opts.key}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.events.emit("log", level="info", message=f"waiting for another fetch of {self.final}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- observers ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hub_logs(self) -> Iterator[None]:
        handler = _HubLogHandler(self.events)
        logger = logging.getLogger("huggingface_hub")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)

    @contextlib.contextmanager
    def _progress(self, selection: Selection) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._report_progress, args=(selection, stop), name="weights-progress", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _report_progress(self, selection: Selection, stop: threading.Event) -> None:
        total, window = selection.bytes_total, deque[tuple[float, int]](maxlen=16)
        while True:
            finished = stop.wait(self.opts.progress_interval)
            with contextlib.suppress(OSError):  # files come and go under us
                done, files_done = self._measure(selection)
                now = time.monotonic()
                window.append((now, done))
                # The rate over the last ~16 samples: smooth, yet it follows a slowdown.
                (t0, b0), (t1, b1) = window[0], window[-1]
                rate = (b1 - b0) / (t1 - t0) if t1 > t0 else None
                eta = (total - done) / rate if rate and rate > 0 else None
                self.events.emit(
                    "progress",
                    bytes_done=done,
                    bytes_total=total,
                    files_done=files_done,
                    files_total=len(selection.files),
                    rate_bps=round(rate, 1) if rate is not None else None,
                    eta_seconds=round(eta, 1) if eta is not None else None,
                )
            if finished:
                return

    def _measure(self, selection: Selection) -> tuple[int, int]:
        """(bytes, files) done: complete files plus huggingface_hub's ``*.incomplete`` temporary files."""
        done = files_done = 0
        for f in selection.files:
            with contextlib.suppress(OSError):
                size = (self.partial / f.path).stat().st_size
                if size == f.size:
                    files_done += 1
                done += min(size, f.size)
        downloads = self.partial / ".cache" / "huggingface" / "download"
        for tmp in downloads.rglob("*.incomplete") if downloads.is_dir() else ():
            with contextlib.suppress(OSError):
                done += tmp.stat().st_size
        return min(done, selection.bytes_total), files_done


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_network_error(exc: BaseException) -> bool:
    """Worth another try: connection errors, timeouts, short bodies, 5xx/408/429 answers.

    httpx's (huggingface_hub uses the httpx2 fork) transport errors are recognised by their class names,
    so the product needs no HTTP client of its own."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    for e in _chain(exc):
        if isinstance(e, _Incomplete | LocalEntryNotFoundError | ConnectionError | TimeoutError):
            return True
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            return status in (408, 429) or status >= 500
        if any(
            c.__name__ in ("TransportError", "TimeoutException")
            and c.__module__.startswith(("httpx", "httpcore"))
            for c in type(e).__mro__
        ):
            return True
        # huggingface_hub's check of the received length against Content-Length.
        if isinstance(e, OSError) and "Consistency check failed" in str(e):
            return True
    return False


def _describe(exc: BaseException) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # its own message is a generic "check your connection"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- evict --------------------------------------------------------------------------------------------


def evict(root: Path, keys: Sequence[str], out: TextIO | None = None) -> int:
    """Remove cache entries (and their partial downloads); one ``evicted`` or ``error`` event per key.

    The entry is first renamed aside, so it disappears at once and an engine never sees half of it."""
    events = Events(out or sys.stdout)
    code = EXIT_OK
    for key in keys:
        if not valid_key(key):
            events.emit("error", reason="InvalidKey", message=f"invalid cache key {key!r}", permanent=True)
            code = EXIT_USAGE
            continue
        freed, existed = 0, False
        for path in (root / key, root / PARTIAL_DIR / key):
            if not path.exists() and not path.is_symlink():
                continue
            existed = True
            doomed = root / PARTIAL_DIR / f".evict-{key}-{uuid.uuid4().hex[:8]}"
            doomed.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, doomed)
            freed += _tree_size(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (root / PARTIAL_DIR / f"{key}.lock").unlink()
        events.emit("evicted", key=key, path=str(root / key), existed=existed, bytes_freed=freed)
    return code


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
