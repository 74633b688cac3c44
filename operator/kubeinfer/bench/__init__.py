"""Benchmarks of serving: `kubeinfer bench serve` (a load generator for OpenAI-compatible endpoints).

`run_load` and `run_repeats` (in `loadgen`, documented there) are the API the other benchmarks build on.
"""

from kubeinfer.bench.loadgen import BenchResult, LoadConfig, RequestRecord, RunResult, run_load, run_repeats

__all__ = ["BenchResult", "LoadConfig", "RequestRecord", "RunResult", "run_load", "run_repeats"]
