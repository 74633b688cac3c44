"""Fixtures for the `e2e` tier: the whole local stack (`kubeinfer up`), once for the package.

Real components only: etcd, kube-apiserver, controller-manager and scheduler built from source, the
node agent running the real llama-server and vLLM (CPU) as pod processes, the operator and the
gateway. The stack is started with the real CLI (`kubeinfer up`, detached) into a temp state dir and
stopped with `kubeinfer down`; a watchdog stops it if pytest dies first. Binaries are built on first
use and cached (tens of minutes cold); if they cannot be built, the fixture errors: this tier never
silently skips. Timings the tests record are printed at the end of the run (and written to
`e2e-timings.json` in the stack's temp dir).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.devcluster.stackstate import Layout
from tests.e2e.support import TIMINGS, LocalStack

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only ours: mark just tests/e2e.
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings (seconds)")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key:48} {value:8.1f}")


def _kubeinfer(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubeinfer.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def start_stack(root: Path) -> tuple[subprocess.CompletedProcess[str], subprocess.Popen[bytes] | None]:
    """`kubeinfer up` (detached) plus a watchdog that stops the supervisor if pytest dies."""
    out = _kubeinfer("up", "--state-dir", str(root), "--gateway-port", "0")
    info = Layout(root).read()
    watchdog = procs.start_watchdog(info["pid"]) if info.get("pid") else None
    return out, watchdog


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    try:
        import openai  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the e2e tier needs the openai SDK ({exc}); run `make install-engines`", pytrace=False)
    root = tmp_path_factory.mktemp("stack")
    t0 = time.monotonic()
    out, watchdog = start_stack(root)
    if out.returncode != 0:
        pytest.fail(f"kubeinfer up failed ({out.returncode}):\n{out.stderr[-6000:]}", pytrace=False)
    TIMINGS["kubeinfer up (cold state dir, binaries cached)"] = time.monotonic() - t0
    s = LocalStack(root, watchdog)
    try:
        yield s
    finally:
        down = _kubeinfer("down", "--state-dir", str(root), timeout=300)
        if s.watchdog is not None:
            s.watchdog.kill()
            s.watchdog.wait()
        (root / "e2e-timings.json").write_text(json.dumps(TIMINGS, indent=2))
        print(f"\nkubeinfer down: {down.returncode}\n{down.stderr[-2000:]}", file=sys.stderr)
