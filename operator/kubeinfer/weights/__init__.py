"""The shared weight cache: `kubeinfer weights fetch|evict` (:mod:`kubeinfer.weights.fetch`, run by the
cache Job) and reading a fetch's log (:mod:`kubeinfer.weights.progress`, for the operator).

Importing the package loads no Hub client: ``huggingface_hub`` (the ``weights`` extra) is imported only
when a fetch runs."""
