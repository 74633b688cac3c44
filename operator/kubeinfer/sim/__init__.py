"""`kubeinfer sim`: a vLLM-compatible engine simulator for benchmarking routing without GPUs.

`model` is the pure part (tokenizer, prefix cache, continuous-batching scheduler and latency model, on a
virtual clock); `server` drives it in real time behind vLLM's OpenAI-compatible HTTP API and /metrics.
See docs/simulator.md.
"""
