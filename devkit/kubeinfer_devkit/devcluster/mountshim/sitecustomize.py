"""The node agent's volume mounts for paths an engine gets at run time (loaded by ``site`` at start).

The node agent runs a pod's containers as local processes and rewrites the in-container paths of
their command lines and environment to local directories (podplan.path_mapper). vLLM also takes
paths at run time: ``POST /v1/load_lora_adapter`` with ``lora_path: /models/weights/<key>`` (the
operator's adapter sync), which no command line shows. For vLLM processes the node agent puts this
folder first on ``PYTHONPATH`` and the pod's mounts in ``KUBEINFER_NODE_MOUNTS`` (JSON
``[[mount path, local dir], ...]``, longest first); this module then wraps vLLM's
``get_adapter_absolute_path`` (in ``vllm.lora.worker_manager``, the one place a LoRA path is opened) to
map them when that module is imported, in every vLLM process (spawned workers run ``site`` too). The
path vLLM reports (``/v1/models`` ``root``) stays the one the operator sent, as in a container.

Nothing happens without ``KUBEINFER_NODE_MOUNTS``; a failure here never stops the interpreter.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_TARGET = "vllm.lora.worker_manager"


def _mapper(mounts: Sequence[Sequence[str]]) -> Any:
    table = sorted(((m.rstrip("/") or "/", local) for m, local in mounts), key=lambda t: -len(t[0]))

    def mapped(path: str) -> str:
        for mount, local in table:
            if path == mount:
                return local
            if path.startswith(mount + "/"):
                return local + path[len(mount) :]
        return path

    return mapped


class _Patching(importlib.abc.Loader):
    def __init__(self, inner: Any, mapped: Any) -> None:
        self.inner, self.mapped = inner, mapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        created: ModuleType | None = self.inner.create_module(spec)
        return created

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        original = module.get_adapter_absolute_path
        mapped = self.mapped

        def get_adapter_absolute_path(lora_path: str) -> str:
            return str(original(mapped(lora_path)))

        module.get_adapter_absolute_path = get_adapter_absolute_path  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, mapped: Any) -> None:
        self.mapped = mapped

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Patching(spec.loader, self.mapped)
        return spec


def _install() -> None:
    raw = os.environ.get("KUBEINFER_NODE_MOUNTS")
    if not raw:
        return
    try:
        mounts = json.loads(raw)
        sys.meta_path.insert(0, _Finder(_mapper(mounts)))
    except Exception as exc:  # never break the engine's start over this
        print(f"kubeinfer node mounts: not installed: {exc!r}", file=sys.stderr)


_install()
