"""`kubeinfer bench operator` works end to end (a smoke run; the numbers live in docs/operator.md)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_operator_smoke(control_plane, tmp_path):
    # control_plane: ensures the binaries are built; the benchmark starts its own etcd + apiserver.
    out = subprocess.run(
        [sys.executable, "-m", "kubeinfer.cli", "bench", "operator", "--models", "5", "--no-controllers",
         "--json", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["models"] == 5 and result["deployments"] == 5
    assert result["p50_apply_to_deployment_ms"] > 0
    assert result["operator_peak_rss_mib"] > 10
