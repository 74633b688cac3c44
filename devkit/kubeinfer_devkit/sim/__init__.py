"""`kubeinfer sim`: a vLLM-compatible engine simulator for benchmarking routing without GPUs.

`model` is the pure engine (prefix cache, continuous-batching scheduler and latency model, on a virtual
clock) and `tokens` its text (tokenizer, block hashes, output words); `server` drives it in real time
behind vLLM's OpenAI-compatible HTTP API (`protocol`: the bodies) and /metrics (`metrics`).
See docs/simulator.md.
"""
