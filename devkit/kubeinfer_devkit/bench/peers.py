"""The gateways a user would pick instead of kubeinfer's, run side by side with it (`--peers`).

- `vllm-router`: the Rust router of vLLM's production stack (PyPI `vllm-router`, a binary wheel),
  `vllm-router --worker-urls URL... --policy round_robin|cache_aware|power_of_two|random`.
- `litellm`: the LiteLLM proxy (PyPI `litellm[proxy]`), `litellm --config cfg.yaml --port N`, with one
  `model_list` entry per replica under the same `model_name`, so that its router load-balances them.

Each peer is installed at a pinned version into a virtual environment of its own under the cache
directory (`$XDG_CACHE_HOME/kubeinfer/peers/<name>-<version>/`, default `~/.cache/...`), never into
kubeinfer's environment, and reused once installed (a `.kubeinfer-installed` marker is written last, so a
half-finished install is redone). A peer that fails to install or to start becomes
`{"error": "..."}` in the result (`peer_error`): reported, never dropped, and the benchmark goes on
with kubeinfer and the other peers.

The peers run as processes of their own, pinned like kubeinfer's gateway; their CPU is that of the
whole process tree (`tree_cpu_seconds`), since a proxy may run workers in child processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubeinfer_devkit.bench import fleet
from kubeinfer_devkit.devcluster import procs

MARKER = ".kubeinfer-installed"
INSTALL_TIMEOUT = 1200.0
START_TIMEOUT = 120.0


@dataclass(frozen=True)
class PeerSpec:
    name: str
    package: str
    """pip requirement without the version (extras allowed)."""
    version: str
    health_path: str
    """GET path that answers 200 once the peer serves."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PEERS: dict[str, PeerSpec] = {
    "vllm-router": PeerSpec("vllm-router", "vllm-router", "0.1.17", "/health"),
    "litellm": PeerSpec("litellm", "litellm[proxy]", "1.100.0", "/health/liveliness"),
}

VLLM_ROUTER_POLICIES = (
    "round_robin", "cache_aware", "power_of_two", "random", "consistent_hash", "sticky_least_loaded",
)  # fmt: skip


class PeerError(RuntimeError):
    """A peer could not be installed or started; the message says what happened."""


def parse_peers(text: str | None) -> tuple[str, ...]:
    """`--peers a,b` as a tuple of known peer names (no duplicates, order kept)."""
    if not text:
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}: known are {', '.join(PEERS)}")
    return names


def peer_error(name: str, exc: BaseException, *, stage: str) -> dict[str, Any]:
    """The result entry of a peer that failed: what failed (`install` or `start`) and why (the last
    lines of a subprocess's output are in the message)."""
    spec = PEERS.get(name)
    message = str(exc).strip() or type(exc).__name__
    return {
        "error": f"{stage} failed: {message}",
        "stage": stage,
        "version": spec.version if spec else None,
    }


# --- installing ----------------------------------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kubeinfer" / "peers"


def peer_dir(spec: PeerSpec, root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{spec.name}-{spec.version}"


def _tail(text: str, lines: int = 6, width: int = 300) -> str:
    """The last lines of a subprocess's output, each cut to `width` characters (pip lists versions)."""
    last = text.strip().splitlines()[-lines:]
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in last)


def ensure_installed(
    spec: PeerSpec, root: Path | None = None, *, python: str | None = None,
    on_step: Callable[[str], None] | None = None, timeout: float = INSTALL_TIMEOUT,
) -> Path:  # fmt: skip
    """The peer's venv (installed now unless it already is); PeerError when that fails."""
    venv = peer_dir(spec, root)
    if (venv / MARKER).is_file():
        return venv
    if venv.exists():
        shutil.rmtree(venv)  # an install that did not finish
    venv.parent.mkdir(parents=True, exist_ok=True)
    if on_step:
        on_step(f"installing {spec.requirement} into {venv} (once)")
    # The base interpreter of this venv makes the new one: nothing of kubeinfer's environment leaks in.
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         spec.requirement],
    ]  # fmt: skip
    deadline = time.monotonic() + timeout
    for argv in steps:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            raise PeerError(f"{' '.join(argv[:4])}: {exc}") from exc
        if done.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise PeerError(
                f"{' '.join(argv[-3:])} exited {done.returncode}: {_tail(done.stderr or done.stdout)}"
            )
    (venv / MARKER).write_text(spec.requirement + "\n")
    return venv


def installed_version(venv: Path, spec: PeerSpec) -> str | None:
    """The version pip installed (the marker's requirement, else None)."""
    try:
        return (venv / MARKER).read_text().strip().split("==", 1)[1]
    except (OSError, IndexError):
        return None


# --- command lines and configs (pure) ------------------------------------------------------------


def vllm_router_argv(
    exe: str, worker_urls: Sequence[str], port: int, *, policy: str = "round_robin", host: str = "127.0.0.1",
    metrics_port: int | None = None,
) -> list[str]:  # fmt: skip
    """vllm-router's command line: one router over `worker_urls`, logs at warnings, its Prometheus
    exporter on `metrics_port` (it always runs one, by default on 29000, which may be taken)."""
    if policy not in VLLM_ROUTER_POLICIES:
        raise ValueError(f"vllm-router policy must be one of {', '.join(VLLM_ROUTER_POLICIES)}")
    return [
        exe, "--host", host, "--port", str(port), "--worker-urls", *worker_urls, "--policy", policy,
        "--log-level", "warning", "--prometheus-host", "127.0.0.1",
        "--prometheus-port", str(metrics_port if metrics_port is not None else port + 1),
    ]  # fmt: skip


def litellm_config(model: str, replica_urls: Sequence[str]) -> dict[str, Any]:
    """LiteLLM proxy's config: every replica as one `openai/<model>` deployment of the same
    `model_name` (its router balances them), and nothing that costs CPU per request beyond routing:
    no callbacks, no spend or error logs (no database anyway), no retries, no cost map download."""
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"{url.rstrip('/')}/v1",
                    "api_key": "none",
                    "timeout": 120,
                },
            }
            for url in replica_urls
        ],
        "litellm_settings": {
            "drop_params": True,
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "num_retries": 0,
            "request_timeout": 120,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
        },
        "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0},
        "general_settings": {
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "disable_adding_master_key_hash_to_db": True,
        },
    }


def litellm_argv(exe: str, config_path: str, port: int, *, host: str = "127.0.0.1") -> list[str]:
    return [exe, "--config", config_path, "--host", host, "--port", str(port), "--num_workers", "1"]


LITELLM_ENV = {
    # No network at start (the model cost map), no telemetry, logs at errors only.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "DISABLE_SCHEMA_UPDATE": "True",
}


# --- running -------------------------------------------------------------------------------------


@dataclass
class PeerProcess:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    version: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        procs.stop_process(self.proc, fleet.STOP_GRACE)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc; [] where that is not readable."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants alive now (all their threads)."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += fleet.process_cpu_seconds(p)
        except Exception:  # a child that exited between listing and reading (psutil's NoSuchProcess)
            continue
        todo += children(p)
    return total


def _wait_healthy(name: str, url: str, proc: subprocess.Popen[bytes], log_path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.stop_process(proc, fleet.STOP_GRACE)
            try:
                log = _tail(Path(log_path).read_text(errors="replace"))
            except OSError:
                log = ""
            code = proc.returncode
            why = f"exited {code}" if code is not None else f"no answer in {timeout:.0f} s"
            raise PeerError(f"{name} did not start ({why}){': ' + log if log else ''}")
        time.sleep(0.1)


def start_peer(
    name: str, venv: Path, replica_urls: Sequence[str], model: str, workdir: str, *,
    cores: set[int] | None = None, policy: str = "round_robin", timeout: float = START_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> PeerProcess:  # fmt: skip
    """Start a peer over `replica_urls` on a free port of 127.0.0.1 and wait until it answers its health
    path; its output goes to a log in `workdir`, whose tail a PeerError carries."""
    import yaml

    spec = PEERS[name]
    port = fleet.free_port()
    bin_dir = venv / "bin"
    child_env = {**os.environ, **(env or {})}
    child_env.pop("VIRTUAL_ENV", None)
    child_env["PATH"] = f"{bin_dir}{os.pathsep}{child_env.get('PATH', '')}"
    if name == "vllm-router":
        argv = vllm_router_argv(
            str(bin_dir / "vllm-router"), replica_urls, port, policy=policy, metrics_port=fleet.free_port()
        )
    else:
        path = os.path.join(workdir, f"litellm-{time.monotonic_ns()}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(litellm_config(model, replica_urls), f)
        argv = litellm_argv(str(bin_dir / "litellm"), path, port)
        child_env.update(LITELLM_ENV)
    log_path = os.path.join(workdir, f"{name}-{time.monotonic_ns()}.log")
    log: IO[bytes]
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                preexec_fn=fleet.pin_to(cores), start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise PeerError(f"{argv[0]}: {exc}") from exc
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(name, url + spec.health_path, proc, log_path, timeout)
    return PeerProcess(name, url, proc, installed_version(venv, spec) or spec.version)


def prepare(
    names: Sequence[str], *, on_step: Callable[[str], None] | None = None, root: Path | None = None
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Install every peer asked for: ({name: venv} of those ready, {name: error entry} of the rest)."""
    ready: dict[str, Path] = {}
    failed: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            ready[name] = ensure_installed(PEERS[name], root, on_step=on_step)
        except PeerError as exc:
            failed[name] = peer_error(name, exc, stage="install")
            if on_step:
                on_step(f"{name}: {failed[name]['error']}")
    return ready, failed


# --- comparing -----------------------------------------------------------------------------------


def ratio(base: float | None, other: float | None, floor: float = 0.0) -> float | None:
    """other / base (2.0: twice kubeinfer's figure); None when undefined: either missing, or `base` at
    or below `floor`, or `other` negative (an added latency within the noise: a ratio of two such
    differences means nothing; the values are given beside it)."""
    if base is None or other is None or base <= floor or other < 0:
        return None
    return other / base


# (key, label, floor of kubeinfer's value for a ratio): added latencies below 0.1 ms are noise here.
OVERHEAD_FIGURES = (
    ("added_p50_ms", "added p50 ms", 0.1),
    ("added_p99_ms", "added p99 ms", 0.1),
    ("gateway_cpu_us_per_request", "CPU us/request", 0.0),
    ("added_itl_p99_ms", "added ITL p99 ms", 0.1),
    ("gateway_cpu_us_per_chunk", "CPU us/chunk", 0.0),
)


def overhead_comparison(phase: Mapping[str, Any], peers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per peer, each figure of one overhead phase as a value and as a ratio to kubeinfer's (the
    phase's own figures). `peers` maps a peer to its figures for the phase, or to an error entry."""
    out: dict[str, Any] = {}
    for name, figures in peers.items():
        if "error" in figures:
            out[name] = {"error": figures["error"]}
            continue
        out[name] = {
            key: {
                "value": figures.get(key), "kubeinfer": phase.get(key),
                "ratio_vs_kubeinfer": ratio(phase.get(key), figures.get(key), floor),
            }
            for key, _, floor in OVERHEAD_FIGURES
            if phase.get(key) is not None or figures.get(key) is not None
        }  # fmt: skip
    return out


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left-aligned text table (also valid Markdown)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_overhead_peers(result: Mapping[str, Any]) -> str:
    """Tables of kubeinfer and each peer per phase (value, and x kubeinfer's), then the errors."""
    peers = result.get("peers") or {}
    if not peers:
        return ""
    names = ", ".join(f"{n} {p.get('version') or '?'}" for n, p in peers.items())
    lines = [f"\npeers: {names}"]
    for phase in ("small", "large", "stream"):
        p = result.get(phase)
        if not p:
            continue
        keys = [(k, label, floor) for k, label, floor in OVERHEAD_FIGURES if p.get(k) is not None]
        rows = [["kubeinfer", *(_num(p.get(k), ".1f") for k, _, _ in keys)]]
        for name, figures in (p.get("peers") or {}).items():
            if "error" in figures:
                continue
            rows.append([
                name,
                *(f"{_num(figures.get(k), '.1f')} ({_num(ratio(p.get(k), figures.get(k), floor), '.2f')}x)"
                  for k, _, floor in keys),
            ])  # fmt: skip
        lines.append(f"\n[{phase}] kubeinfer and peers (peer: value (x kubeinfer))")
        lines.append(format_table(["gateway", *(label for _, label, _ in keys)], rows))
    for name, entry in peers.items():
        if "error" in entry:
            lines.append(f"{name}: {entry['error']}")
    return "\n".join(lines) + "\n"


def format_routing_peers(result: Mapping[str, Any]) -> str:
    """The peers' errors (their policies are rows of the routing table already)."""
    lines = []
    for name, entry in (result.get("peers") or {}).items():
        if "error" in entry:
            lines.append(f"{name}: {entry['error']}")
        else:
            lines.append(f"{name} {entry.get('version')}: policies {', '.join(entry.get('policies', []))}")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""
