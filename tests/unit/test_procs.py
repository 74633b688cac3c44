"""procs.stop_process: SIGTERM, a grace period, SIGKILL; with `group`, the whole process group."""

from __future__ import annotations

import subprocess
import sys
import time

from kubeinfer_devkit.devcluster import procs

# Ignores SIGTERM; with an argument, first starts a grandchild (in its group) and prints its pid.
_STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if len(sys.argv) > 1:
    print(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid, flush=True)
else:
    print("ready", flush=True)
time.sleep(60)
"""


def _stubborn(*args: str, group: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _STUBBORN, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        start_new_session=group,
    )  # fmt: skip


def test_stop_process_kills_after_grace_and_closes_pipes():
    proc = _stubborn()
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is set
    t0 = time.monotonic()
    procs.stop_process(proc, 0.3)
    assert proc.returncode is not None and proc.returncode < 0  # killed by a signal
    assert time.monotonic() - t0 < 5
    assert proc.stdin is not None and proc.stdin.closed and proc.stdout.closed


def test_stop_process_group_takes_what_the_process_left_behind():
    proc = _stubborn("grandchild", group=True)
    assert proc.stdout is not None
    grandchild = int(proc.stdout.readline())
    ticks = procs.start_ticks(grandchild)
    assert procs.alive(grandchild, ticks)
    procs.stop_process(proc, 0.3, group=True)
    deadline = time.monotonic() + 5
    while procs.alive(grandchild, ticks) and time.monotonic() < deadline:  # reaped by init
        time.sleep(0.05)
    assert not procs.alive(grandchild, ticks)


def test_stop_process_of_an_exited_process_only_closes_its_pipes():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)
    proc.wait()
    procs.stop_process(proc, 0.3, group=True)  # no group of that id: nothing to signal
    assert proc.returncode == 0 and proc.stdout is not None and proc.stdout.closed
