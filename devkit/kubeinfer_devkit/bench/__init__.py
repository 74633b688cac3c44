"""Benchmarks of serving: `kubeinfer bench serve` (a load generator for OpenAI-compatible endpoints).

`run_load` and `run_repeats` (in `loadgen`, documented there) are the API the other benchmarks build on;
`client` sends and measures each request.
"""

from kubeinfer_devkit.bench.client import RequestRecord
from kubeinfer_devkit.bench.loadgen import BenchResult, LoadConfig, RunResult, run_load, run_repeats

__all__ = ["BenchResult", "LoadConfig", "RequestRecord", "RunResult", "run_load", "run_repeats"]
