"""The local stack's state directory, shared by its supervisor and by `kubeinfer up`/`down`.

::

    stack.json, stack.lock        what runs (pids, URLs), held by the supervisor while it lives
    logs/                         stack.log (supervisor), node-agent, operator, gateway, hub (its requests)
    operator.yaml                 the operator's and node agent's configuration: hfEndpoint, the Hub
    hub/kubeinfer-local/<name>/   the Hub's repositories: the tiny models and LoRA adapters (localhub.py)
    controlplane/                 kubeconfig, pki/, etcd/, logs/ of the control-plane components
    node/pods/<ns>_<pod>_<uid>/   each pod's container logs (<container>/<restart>.log), scratch volumes
    volumes/pvc/kubeinfer-models/ the "PVC" of pvc://kubeinfer-models/...: the tiny models, generated
    volumes/pvc/pvc-<uid>_<ns>_<claim>/  a volume the provisioner made for a claim of the default class

The supervisor holds a lock on ``stack.lock`` while it lives (:func:`running`) and writes its status
and process ids to ``stack.json`` (:meth:`Layout.write`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

NAMESPACE = "default"
MODELS_CLAIM = "kubeinfer-models"
DEFAULT_GATEWAY_PORT = 8000


def default_state_dir() -> Path:
    from kubeinfer_devkit.devcluster.build import cache_root

    return cache_root() / "stack"


def say(msg: str) -> None:
    print(f"[kubeinfer] {msg}", file=sys.stderr, flush=True)


class Layout:
    """Where things are in a state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.state = self.root / "stack.json"
        self.lock = self.root / "stack.lock"
        self.logs = self.root / "logs"
        self.controlplane = self.root / "controlplane"
        self.kubeconfig = self.controlplane / "kubeconfig"
        self.node = self.root / "node"
        self.volumes = self.root / "volumes" / "pvc"
        self.hub = self.root / "hub"
        self.operator_config = self.root / "operator.yaml"

    def claim_dir(self, claim: str) -> Path:
        return self.volumes / claim

    def read(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def write(self, **changes: Any) -> None:
        data = {**self.read(), **changes}
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state)


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[IO[str] | None]:
    """The stack lock if free (yielded, held until the block ends), else None: a supervisor runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 - closed below
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        yield None
        return
    try:
        yield fh
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def running(layout: Layout) -> bool:
    with try_lock(layout.lock) as lock:
        return lock is None
