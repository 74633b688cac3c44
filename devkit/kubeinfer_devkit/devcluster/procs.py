"""Child processes of the local stack and the test tiers: each in its own process group, and none
outliving the process that started it.

Two mechanisms, because neither is enough alone:

- :func:`die_with_parent` (a ``preexec_fn``) asks Linux to signal the child when its parent dies
  (``PR_SET_PDEATHSIG``). It fires when the *thread* that forked exits, so it is only armed from the
  main thread, and a child may catch the signal: vLLM's API server ignores SIGTERM while it starts,
  and its engine-core process would then run on, orphaned.
- :func:`start_watchdog` starts a tiny Python process beside the child that SIGKILLs the child's
  whole process group once the owner is gone (it notices being re-parented) - what catches the case
  above, and an owner that was SIGKILLed or ran out of memory.

:class:`Child` puts both together for long-running helpers (the operator, the gateway, the node
agent); :func:`stop_process` is how it stops, for any Popen. :func:`start_ticks` and :func:`alive`
identify a recorded pid across restarts, so a pid that the kernel reused for something else is never
signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1

# argv: owner pid, process group id. Polls once a second; exits quietly when the group is gone.
_WATCHDOG = """
import os, signal, sys, time
owner, pgid = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == owner:  # re-parented once the owner is gone
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(0)
    time.sleep(1)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that has the child get `sig` when this process dies (Linux, main thread only).

    None elsewhere: a control plane started from a worker thread would otherwise die with that thread.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def start_watchdog(pgid: int) -> subprocess.Popen[bytes]:
    """A process that SIGKILLs process group `pgid` once this process is gone (see the module doc).

    It has a session of its own: not in the child's group, and no Ctrl-C from the terminal.
    """
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pgid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(proc: subprocess.Popen[Any], grace: float, *, group: bool = False) -> None:
    """SIGTERM `proc`, wait up to `grace` seconds, then SIGKILL it; close the pipes we hold to it.

    `group`: `proc` leads a process group of its own (``start_new_session``). The SIGKILL goes to the
    whole group, and so does one more once the process has exited: whatever it left behind (vLLM's
    engine-core process) goes with it.
    """
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                if group:
                    kill_group(proc.pid)
                else:
                    proc.kill()
                proc.wait(timeout=10)
        if group:
            kill_group(proc.pid)
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = stat.rsplit(")", 1)[-1].split()
    state = fields[0]
    if state in ("Z", "X"):  # a zombie has exited; only its exit status is left
        return None
    return int(fields[19])


def alive(pid: int, ticks: int | None) -> bool:
    """Whether `pid` is still the process that started at `ticks` (not a reused pid)."""
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class Child:
    """A long-running helper process: own session, output appended to `log`, dies with us.

    `stop()` sends SIGTERM to the process, waits up to `grace` seconds, then SIGKILLs its group.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        watchdog: bool = False,
    ) -> None:
        self.name, self.argv, self.log = name, list(argv), log
        self.env = dict(env) if env is not None else None
        self.cwd, self.watchdog = cwd, watchdog
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # own process group: stop() can kill all of it
            preexec_fn=die_with_parent(),
        )
        if self.watchdog:
            self._watchdog = start_watchdog(self.popen.pid)
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace: float = 15.0) -> None:
        p = self.popen
        if p is None:
            return
        try:
            stop_process(p, grace, group=True)
        finally:
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()
                self._watchdog = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


def wait_until(
    what: str, ready: Callable[[], bool], timeout: float, *, child: Child | None = None, every: float = 0.25
) -> float:
    """Poll `ready()` until true; return the seconds it took. Raises TimeoutError, or RuntimeError
    with the log tail if `child` exits meanwhile. Exceptions from `ready()` count as not ready."""
    t0 = time.monotonic()
    while True:
        if child is not None and not child.running():
            raise RuntimeError(
                f"{child.name} exited with code {child.returncode} while waiting for {what}; "
                f"last lines of {child.log}:\n{child.tail()}"
            )
        try:
            if ready():
                return time.monotonic() - t0
        except Exception:  # not up yet: refused, 503, half-written file ...
            pass
        if time.monotonic() - t0 > timeout:
            extra = f"; last lines of {child.log}:\n{child.tail()}" if child is not None else ""
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s{extra}")
        time.sleep(every)
