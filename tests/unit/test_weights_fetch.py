"""`kubeinfer weights fetch | evict` against a local Hub (kubeinfer_devkit.hub.HubServer) and the real
huggingface_hub client: file selection, events, exit codes, resume and retry, verification, atomic publish.

The fetcher is blocking: it runs in a thread (or a subprocess, for exit codes) while the Hub serves on the
test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import socket
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from kubeinfer.weights import fetch as fetch_mod
from kubeinfer.weights.fetch import (
    COMPLETE_MARKER,
    EXIT_CHECKSUM,
    EXIT_DISK_FULL,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_REPO_NOT_FOUND,
    EXIT_UNAUTHORIZED,
    EXIT_USAGE,
    PERMANENT_EXIT_CODES,
    FetchError,
    FetchOptions,
    RepoFile,
    evict,
    fetch,
    gguf_quants,
    select_files,
)
from kubeinfer_devkit.hub.server import HubServer

TOKEN = "hf_good"
CHUNK = 64 * 1024
SIZES = {
    "tiny-Q4_K_M.gguf": 200_000,
    "tiny-Q8_0.gguf": 300_000,
    "mmproj-tiny-f16.gguf": 100_000,
    "model.safetensors": 150_000,
}


def _write_repo(base: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    base.mkdir(parents=True)
    contents = {name: rng.randbytes(size) for name, size in sizes.items()}
    contents["config.json"] = b'{"architectures": ["LlamaForCausalLM"]}\n'
    for name, data in contents.items():
        (base / name).write_bytes(data)
    return contents


@pytest.fixture
async def hub(tmp_path, monkeypatch):
    repos = tmp_path / "hub"
    _write_repo(repos / "org" / "tiny", SIZES)
    gated = repos / "org" / "gated"
    _write_repo(gated, {"tiny-Q4_K_M.gguf": 50_000}, seed=1)
    (gated / ".hub-gated").touch()
    server = HubServer(repos, token=TOKEN)
    url = await server.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing lands in the real home
    # huggingface_hub writes a body DOWNLOAD_CHUNK_SIZE (10 MiB) at a time: progress is seen and a broken
    # download resumes per chunk. Small chunks for small test files.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield server
    await server.stop()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


async def _fetch(
    root: Path, key: str = "k", repo: str = "org/tiny", out: io.StringIO | None = None, **kw
) -> tuple[int, list[dict]]:
    kw.setdefault("progress_interval", 0.05)
    kw.setdefault("backoff_base", 0.01)
    out = io.StringIO() if out is None else out  # the caller's, to watch the events as they come
    code = await asyncio.to_thread(fetch, FetchOptions(root=root, key=key, repo=repo, **kw), out)
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


async def _cli(*args: str) -> tuple[int, list[dict]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubeinfer.cli", "weights", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(events: list[dict]) -> dict:
    assert events[-1]["event"] == "error", events
    return events[-1]


def _nothing_published(root: Path, key: str = "k") -> bool:
    return not (root / key).exists()


# -- happy paths ------------------------------------------------------------------------------------


async def test_fetch_gguf_quant_and_projector(hub, root):
    hub.rate_limit_bps = 1_000_000  # ~0.2 s: a few progress events on the way
    code, events = await _fetch(root, gguf_quant="q4_k_m", mmproj=True)
    assert code == 0, events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    start, done = events[0], events[-1]
    total = SIZES["tiny-Q4_K_M.gguf"] + SIZES["mmproj-tiny-f16.gguf"]
    assert start["files_total"] == 2 and start["bytes_total"] == total and len(start["sha"]) == 40
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2
    assert progress[-1]["bytes_done"] == total and progress[-1]["files_done"] == 2
    assert any(0 < p["bytes_done"] < total for p in progress)  # seen mid-way, .incomplete files included
    assert all(p["bytes_total"] == total and p["files_total"] == 2 for p in progress)
    assert done["bytes_downloaded"] == total and done["path"] == str(root / "k")
    assert sorted(done["files"]) == ["mmproj-tiny-f16.gguf", "tiny-Q4_K_M.gguf"]

    entry = root / "k"
    assert os.readlink(entry / "model.gguf") == "tiny-Q4_K_M.gguf"  # relative links
    assert os.readlink(entry / "mmproj.gguf") == "mmproj-tiny-f16.gguf"
    src = hub.root / "org" / "tiny"
    assert _sha(entry / "model.gguf") == _sha(src / "tiny-Q4_K_M.gguf")
    marker = json.loads((entry / COMPLETE_MARKER).read_text())
    assert marker["repo"] == "org/tiny" and marker["sha"] == start["sha"] and marker["bytes"] == total
    assert {f["path"]: f["sha256"] for f in marker["files"]} == {
        n: _sha(src / n) for n in ("tiny-Q4_K_M.gguf", "mmproj-tiny-f16.gguf")
    }
    assert not (entry / ".cache").exists() and not (root / ".partial" / "k").exists()
    assert sorted(p.rsplit("/", 1)[-1] for p in hub.file_gets()) == [
        "mmproj-tiny-f16.gguf",
        "tiny-Q4_K_M.gguf",
    ]


async def test_second_fetch_of_an_entry_makes_no_request(hub, root):
    assert (await _fetch(root, include=("*.json",)))[0] == 0
    hub.requests.clear()
    code, events = await _fetch(root, include=("*.json",))
    assert code == 0 and [e["event"] for e in events] == ["done"]
    assert events[0]["bytes_downloaded"] == 0 and events[0]["files"] == ["config.json"]
    assert hub.requests == []


async def test_include_patterns_select_files(hub, root):
    code, events = await _fetch(root, include=("*.json", "*.safetensors"))
    assert code == 0
    assert sorted(os.listdir(root / "k")) == [COMPLETE_MARKER, "config.json", "model.safetensors"]
    assert events[-1]["links"] == {}  # no GGUF asked for: no links


async def test_a_partial_download_is_never_at_the_entry_path(hub, root):
    hub.rate_limit_bps = 1_000_000  # ~0.3 s for the Q8_0 file
    task = asyncio.ensure_future(_fetch(root, gguf_file="tiny-Q8_0.gguf"))
    saw_partial = False
    while not task.done():
        if (root / "k").exists():
            assert (root / "k" / COMPLETE_MARKER).is_file()  # whole or not at all
        with contextlib.suppress(FileNotFoundError):  # until it is renamed
            saw_partial |= any((root / ".partial" / "k").rglob("*.incomplete"))
        await asyncio.sleep(0.01)
    code, _ = task.result()
    assert code == 0 and saw_partial
    assert os.readlink(root / "k" / "model.gguf") == "tiny-Q8_0.gguf"


async def test_gated_repo_needs_an_accepted_token(hub, root, monkeypatch):
    code, events = await _fetch(root, repo="org/gated")
    assert code == EXIT_UNAUTHORIZED and _error(events)["reason"] == "GatedRepo"
    assert "model.tokenSecretRef" in _error(events)["message"] and _error(events)["permanent"] is True
    assert hub.file_gets() == []  # known from the repo info: no download tried

    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    code, events = await _fetch(root, repo="org/gated")
    assert code == EXIT_UNAUTHORIZED and _error(events)["reason"] == "GatedRepo"
    assert ("HEAD", next(p for _, p, _ in hub.requests if "/resolve/" in p), 403) in hub.requests

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, events = await _fetch(root, repo="org/gated")
    assert code == 0 and (root / "k" / "tiny-Q4_K_M.gguf").is_file()


async def test_a_rejected_token_is_unauthorized(hub, root, monkeypatch):
    hub.reject_tokens.add("hf_revoked")
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    code, events = await _fetch(root)
    assert code == EXIT_UNAUTHORIZED and _error(events)["reason"] == "Unauthorized"


# -- permanent errors --------------------------------------------------------------------------------


async def test_missing_quant_lists_the_repos_quants(hub, root):
    code, events = await _cli("fetch", "--root", str(root), "--key", "k", "--repo", "org/tiny",
                              "--gguf-quant", "Q5_K_M")  # fmt: skip
    err = _error(events)
    assert code == EXIT_NOT_FOUND and err["reason"] == "FileNotFound" and err["permanent"] is True
    assert "Q4_K_M, Q8_0" in err["message"]
    assert _nothing_published(root)


async def test_repo_not_found(hub, root, tmp_path, monkeypatch):
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # as the kubelet does
    monkeypatch.setenv("KUBEINFER_TERMINATION_LOG", str(termination_log))
    code, events = await _cli("fetch", "--root", str(root), "--key", "k", "--repo", "org/nope")
    err = _error(events)
    assert json.loads(termination_log.read_text()) == err  # the pod's status carries the error too
    assert code == EXIT_REPO_NOT_FOUND and err["reason"] == "RepoNotFound"
    assert err["message"] == (
        f"repository org/nope not found on {hub.url} (or it is private and no token was given)"
    )


async def test_unknown_revision(hub, root):
    code, events = await _fetch(root, revision="v9")
    assert code == EXIT_NOT_FOUND and _error(events)["reason"] == "RevisionNotFound"


async def test_include_matching_nothing(hub, root):
    code, events = await _fetch(root, include=("*.bin",))
    assert code == EXIT_NOT_FOUND and _error(events)["reason"] == "FileNotFound"
    assert "config.json" in _error(events)["message"]  # says what there is


async def test_disk_full_before_starting(hub, root, monkeypatch):
    real = fetch_mod.shutil.disk_usage
    monkeypatch.setattr(fetch_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, events = await _fetch(root, gguf_quant="Q8_0")
    err = _error(events)
    assert code == EXIT_DISK_FULL and err["reason"] == "DiskFull" and "293.0 KiB more" in err["message"]
    assert _nothing_published(root) and hub.file_gets() == []


async def test_no_space_while_writing_is_disk_full(hub, root, monkeypatch):
    import huggingface_hub

    def enospc(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", enospc)
    code, events = await _fetch(root, include=("*.json",))
    assert code == EXIT_DISK_FULL and _error(events)["reason"] == "DiskFull"


async def test_invalid_key(root):
    code, events = await _fetch(root, key="../etc")
    assert code == EXIT_USAGE and _error(events)["reason"] == "InvalidKey"


# -- network trouble and verification ------------------------------------------------------------------


async def test_a_connection_closed_mid_file_is_resumed_by_range(hub, root):
    hub.fail_next(1, "*.gguf")  # 150 000 of 300 000 bytes, then a clean close
    code, events = await _fetch(root, gguf_quant="Q8_0")
    assert code == 0, events
    # huggingface_hub resumes by itself (after 1 s), from the last whole chunk it wrote: no retry of ours.
    assert any(e["event"] == "log" and "resume" in e["message"] for e in events)
    assert not any(e["event"] == "retry" for e in events)
    assert [s for m, p, s in hub.requests if m == "GET" and "/resolve/" in p] == [200, 206]
    assert [r for _, r in hub.range_requests] == [f"bytes={2 * CHUNK}-"]
    assert _sha(root / "k" / "tiny-Q8_0.gguf") == _sha(hub.root / "org" / "tiny" / "tiny-Q8_0.gguf")


async def test_a_reset_connection_is_retried(hub, root):
    hub.fail_next(1, "tiny-Q8_0.gguf", reset=True)
    code, events = await _fetch(root, gguf_quant="Q8_0", include=("*.json",))
    assert code == 0, events
    (retry,) = [e for e in events if e["event"] == "retry"]
    assert retry["attempt"] == 1 and retry["delay"] == 0.01 and "reset" in retry["error"].lower()
    assert sum("tiny-Q8_0.gguf" in p for p in hub.file_gets()) == 2
    assert sum("config.json" in p for p in hub.file_gets()) == 1  # the finished file is not fetched again
    assert _sha(root / "k" / "tiny-Q8_0.gguf") == _sha(hub.root / "org" / "tiny" / "tiny-Q8_0.gguf")


async def test_an_unreachable_hub_is_a_retryable_network_error(root, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, events = await _fetch(root, retries=3)
    err = _error(events)
    assert code == EXIT_NETWORK and err["reason"] == "NetworkError" and err["permanent"] is False
    assert [e["delay"] for e in events if e["event"] == "retry"] == [0.01, 0.02]
    assert "failed 3 times" in err["message"]


async def test_a_corrupted_transfer_is_downloaded_again(hub, root):
    hub.corrupt_next(1, "*.safetensors")
    code, events = await _fetch(root, include=("*.safetensors",))
    assert code == 0, events
    (retry,) = [e for e in events if e["event"] == "retry"]
    assert "checksum mismatch: model.safetensors" in retry["error"]
    src = hub.root / "org" / "tiny" / "model.safetensors"
    assert _sha(root / "k" / "model.safetensors") == _sha(src)


async def test_a_persistent_checksum_mismatch_is_permanent(hub, root):
    hub.corrupt_next(100, "*.safetensors")
    code, events = await _fetch(root, include=("*.safetensors",))
    err = _error(events)
    assert code == EXIT_CHECKSUM and err["reason"] == "ChecksumMismatch" and err["permanent"] is True
    assert len(hub.file_gets()) == 3
    assert _nothing_published(root)


# -- publish and evict -------------------------------------------------------------------------------


async def test_an_entry_another_job_published_first_is_kept(hub, root, monkeypatch):
    publish = fetch_mod._Fetch._publish

    def racing(self):
        other = root / "k"
        other.mkdir(parents=True)
        (other / "theirs.txt").write_text("first")
        (other / COMPLETE_MARKER).write_text("{}")
        publish(self)

    monkeypatch.setattr(fetch_mod._Fetch, "_publish", racing)
    code, events = await _fetch(root, include=("*.json",))
    assert code == 0 and events[-1]["event"] == "done"
    assert sorted(os.listdir(root / "k")) == [COMPLETE_MARKER, "theirs.txt"]
    assert not (root / ".partial" / "k").exists()


async def test_a_second_fetch_of_the_same_key_waits_for_the_first(hub, root):
    (root / ".partial").mkdir(parents=True)
    out = io.StringIO()
    with open(root / ".partial" / "k.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a first fetch, busy
        task = asyncio.ensure_future(_fetch(root, include=("*.json",), out=out))
        # Until it waits for the lock: it asks the Hub for the revision first, which a busy machine may
        # take longer to do than a fixed sleep allows (then it would never see the lock held).
        async with asyncio.timeout(30):
            while "waiting for another fetch" not in out.getvalue():
                assert not task.done(), out.getvalue()
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not task.done() and hub.file_gets() == []
        (root / "k").mkdir()  # the first fetch publishes, then lets go
        (root / "k" / COMPLETE_MARKER).write_text('{"bytes": 5, "files": [{"path": "config.json"}]}')
    code, events = await task
    assert code == 0 and hub.file_gets() == []
    assert [e["event"] for e in events] == ["start", "log", "done"] and "waiting" in events[1]["message"]
    assert events[-1]["bytes_downloaded"] == 0


async def test_evict(hub, root):
    assert (await _fetch(root, include=("*.json",)))[0] == 0
    (root / ".partial" / "k").mkdir(parents=True)  # a leftover partial download goes too
    out = io.StringIO()
    assert evict(root, ["k", "absent"], out) == 0
    gone, absent = (json.loads(line) for line in out.getvalue().splitlines())
    assert gone["event"] == "evicted" and gone["existed"] is True and gone["bytes_freed"] > 0
    assert absent["existed"] is False
    assert not (root / "k").exists() and not (root / ".partial" / "k").exists()
    assert os.listdir(root / ".partial") == []

    code, events = await _cli("evict", "--root", str(root), "a/b", "..")
    assert code == EXIT_USAGE and [e["reason"] for e in events] == ["InvalidKey", "InvalidKey"]


# -- the local Hub itself ----------------------------------------------------------------------------


async def test_the_local_hub_serves_hf_hub_download_and_listings(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    def client():
        api = HfApi(endpoint=hub.url, token=False)
        sub = hub.root / "org" / "tiny" / "sub"
        sub.mkdir()
        (sub / "notes.txt").write_text("hi")
        (hub.root / "org" / "tiny" / ".hub-secret").write_text("never listed")
        top = sorted(f.path for f in api.list_repo_tree("org/tiny"))
        everything = sorted(f.path for f in api.list_repo_tree("org/tiny", recursive=True))
        path = hf_hub_download(
            "org/tiny", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "c"
        )
        with pytest.raises(RemoteEntryNotFoundError):
            hf_hub_download("org/tiny", "nope.json", endpoint=hub.url, token=False, cache_dir=tmp_path / "c")
        return top, everything, Path(path).read_bytes()

    top, everything, config = await asyncio.to_thread(client)
    assert "sub" in top and "sub/notes.txt" not in top
    assert "sub/notes.txt" in everything and ".hub-secret" not in everything
    assert config == (hub.root / "org" / "tiny" / "config.json").read_bytes()


# -- selection (pure) --------------------------------------------------------------------------------

FILES = [
    RepoFile(n, 1)
    for n in (
        "x-Q4_K.gguf", "x-Q4_K_M.gguf", "sub/x.Q4_K_M.gguf", "x-IQ4_XS.gguf", "x-Q8_0-00001-of-00002.gguf",
        "x-Q8_0-00002-of-00002.gguf", "mmproj-x-bf16.gguf", "mmproj-x-F16.gguf", "config.json",
    )
]  # fmt: skip


def test_quant_is_a_whole_token_and_the_shortest_match_wins():
    sel = select_files(FILES, repo="o/x", gguf_quant="q4_k_m")
    assert sel.gguf == "x-Q4_K_M.gguf" and [f.path for f in sel.files] == ["x-Q4_K_M.gguf"]
    assert sel.notes and "using x-Q4_K_M.gguf" in sel.notes[0]
    assert select_files(FILES, repo="o/x", gguf_quant="Q4_K").gguf == "x-Q4_K.gguf"
    assert select_files(FILES, repo="o/x", gguf_quant="IQ4_XS").gguf == "x-IQ4_XS.gguf"
    with pytest.raises(FetchError) as exc:
        select_files(FILES, repo="o/x", gguf_quant="Q4_XS")  # not inside IQ4_XS
    assert exc.value.reason == "FileNotFound"


def test_split_gguf_is_refused():
    with pytest.raises(FetchError, match="split GGUF"):
        select_files(FILES, repo="o/x", gguf_quant="Q8_0")


def test_projector_prefers_f16_and_links():
    sel = select_files(FILES, repo="o/x", gguf_file="x-IQ4_XS.gguf", mmproj=True)
    assert sel.mmproj == "mmproj-x-F16.gguf"  # not bf16
    assert sel.links == {"model.gguf": "x-IQ4_XS.gguf", "mmproj.gguf": "mmproj-x-F16.gguf"}
    with pytest.raises(FetchError, match="mmproj"):
        select_files([RepoFile("a-Q4_0.gguf", 1)], repo="o/x", mmproj=True)
    with pytest.raises(FetchError, match=r"no file nope\.gguf"):
        select_files(FILES, repo="o/x", gguf_file="nope.gguf")


def test_no_option_selects_everything_and_quants_are_listed():
    assert len(select_files(FILES, repo="o/x").files) == len(FILES)
    assert gguf_quants([f.path for f in FILES]) == ["IQ4_XS", "Q4_K", "Q4_K_M", "Q8_0"]


def test_permanent_exit_codes():
    assert PERMANENT_EXIT_CODES == (10, 11, 12, 13, 14) and EXIT_NETWORK not in PERMANENT_EXIT_CODES
