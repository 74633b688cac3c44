"""kubeinfer: a Kubernetes operator and gateway for shared LLM inference."""

__version__ = "0.1.0"
