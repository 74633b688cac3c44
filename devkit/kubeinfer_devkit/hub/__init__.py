"""A local Hugging Face Hub for tests and the local stack: :class:`kubeinfer_devkit.hub.server.HubServer`
serves repositories from a folder to the real ``huggingface_hub`` client (the weight fetcher's tests).

Import it from :mod:`kubeinfer_devkit.hub.server`: this package imports nothing, so
``python -m kubeinfer_devkit.hub.server`` runs the module once."""
