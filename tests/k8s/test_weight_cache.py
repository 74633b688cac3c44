"""The weight cache on a real control plane: the operator (with only the chart's RBAC) creates the
cache claim and a download Job per entry, the node agent runs the Job (`kubeinfer weights fetch`, the
real huggingface_hub client) against a local Hub, and the model's status follows the download.

Models here run 0 replicas: what is under test is everything up to the Deployment (the e2e tier
takes a cached model on to tokens). The Hub serves random bytes under GGUF names.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import contract, kube
from kubeinfer_devkit.devcluster.build import ensure_binaries
from kubeinfer_devkit.hub.server import HubServer
from tests.k8s_support import (
    LocalNode,
    OperatorProcess,
    chart_operator_rules,
    install_crd,
    service_account_kubeconfig,
)

WaitFor = Callable[..., Awaitable[Any]]
G, V, P = contract.GROUP, contract.VERSION, contract.PLURAL
TOKEN = "hf_local_test_token"
MIB = 1 << 20


class ThreadedHub:
    """A HubServer on its own event loop in a thread: it outlives each test's loop, so the operator
    (started once) can keep one endpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hub: HubServer | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> str:
        self.thread.start()
        self.hub = HubServer(self.root, token=TOKEN)
        return asyncio.run_coroutine_threadsafe(self.hub.start(), self.loop).result(30)

    def stop(self) -> None:
        if self.hub is not None:
            asyncio.run_coroutine_threadsafe(self.hub.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def file_gets(self) -> list[str]:
        assert self.hub is not None
        return list(self.hub.file_gets())


def _repo(root: Path, name: str, files: dict[str, int], gated: bool = False) -> None:
    repo = root / name
    repo.mkdir(parents=True)
    for i, (file, size) in enumerate(files.items()):
        (repo / file).write_bytes(bytes([i + 1]) * size)
    if gated:
        (repo / ".hub-gated").touch()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedHub]:
    root = tmp_path_factory.mktemp("hub")
    _repo(root, "org/tiny-GGUF", {"tiny-Q8_0.gguf": 2 * MIB, "tiny-Q4_K_M.gguf": MIB, "README.md": 100})
    _repo(root, "org/gated-GGUF", {"gated-Q8_0.gguf": MIB // 2}, gated=True)
    hub = ThreadedHub(root)
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def operator(
    local_node: LocalNode, hub: ThreadedHub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The operator as a ServiceAccount bound to the chart's operator ClusterRole, configured with the
    local Hub as its Hugging Face endpoint."""
    state = tmp_path_factory.mktemp("operator")
    helm = ensure_binaries(["helm"])["helm"]

    async def setup() -> Path:
        async with kube.api_client(await kube.load_client_config(str(local_node.cp.kubeconfig))) as admin:
            await install_crd(admin)
            return await service_account_kubeconfig(
                admin, local_node.cp.kubeconfig, chart_operator_rules(helm), "kubeinfer-cache-test",
                state / "kubeconfig",
            )  # fmt: skip

    kubeconfig = asyncio.run(setup())
    assert hub.hub is not None
    config = state / "config.yaml"
    config.write_text(yaml.safe_dump({"hfEndpoint": hub.hub.url}))
    os.environ["KUBEINFER_WEIGHTS_POLL_SECONDS"] = "1"  # progress in status every second
    proc = OperatorProcess(kubeconfig, state / "operator.log", _free_port(), args=("--config", str(config)))
    try:
        proc.start()
    finally:
        os.environ.pop("KUBEINFER_WEIGHTS_POLL_SECONDS", None)
    yield proc
    proc.stop()
    # The chart's role is enough for everything here: no RBAC refusal (a namespace being deleted at the
    # end of a test refuses writes as Forbidden too, but names no user).
    denied = [line for line in proc.tail(100000).splitlines() if 'is forbidden: User "' in line]
    assert not denied, denied[:5]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def api(operator: Any, node_api: client.ApiClient) -> AsyncIterator[client.ApiClient]:
    yield node_api


def _model(name: str, source: str, **model: Any) -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": name},
        "spec": {"engine": "llama-server", "replicas": 0, "resources": {"gpus": 0},
                 "model": {"source": source, "cache": {"size": "1Gi"}, **model}},
    }  # fmt: skip


async def _get(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(G, V, ns, P, name)
    return obj


def _cond(obj: dict[str, Any], kind: str) -> tuple[str, str, str] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return c["status"], c.get("reason", ""), c.get("message", "")
    return None


async def _events(api: client.ApiClient, ns: str, name: str) -> list[tuple[str, str, str]]:
    listed = await client.CoreV1Api(api).list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}"
    )
    return [(e.type, e.reason, e.message) for e in listed.items]


async def _deployment(api: client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    return await kube.get_deployment(api, ns, contract.child_name(name))


async def _weights_ready(api: client.ApiClient, ns: str, name: str) -> dict[str, Any] | None:
    obj = await _get(api, ns, name)
    return obj if (_cond(obj, "WeightsReady") or ("",))[0] == "True" else None


async def test_pods_wait_for_the_download_then_mount_the_cached_file(
    api: client.ApiClient, node_ns: str, hub: ThreadedHub, local_node: LocalNode, wait_for: WaitFor
) -> None:
    ns = node_ns
    assert hub.hub is not None
    hub.hub.rate_limit_bps = 400_000  # 2 MiB in about 5 s: long enough to watch
    custom = client.CustomObjectsApi(api)
    t0 = time.monotonic()
    try:
        await custom.create_namespaced_custom_object(G, V, ns, P, _model("tiny", "org/tiny-GGUF:Q8_0"))

        async def downloading() -> dict[str, Any] | None:
            obj = await _get(api, ns, "tiny")
            w = (obj.get("status") or {}).get("weights") or {}
            return obj if w.get("phase") == "Downloading" and (w.get("bytesDone") or 0) > 0 else None

        obj = await wait_for(downloading, timeout=90, what="status.weights Downloading with bytes done")
        w = obj["status"]["weights"]
        assert w["bytesTotal"] == 2 * MIB  # the Q8_0 file only: not the other quant, not the README
        assert "%" in w["summary"] and "MiB" in w["summary"], w["summary"]
        assert _cond(obj, "Ready")[:2] == ("False", "WeightsDownloading")  # type: ignore[index]
        assert await _deployment(api, ns, "tiny") is None  # no pods before the weights are there
        (entry,) = w["entries"]
        job = await kube.get_job(api, ns, entry["job"])
        assert job is not None and "ownerReferences" not in job["metadata"]  # shared, not owned

        obj = await wait_for(lambda: _weights_ready(api, ns, "tiny"), timeout=120, what="WeightsReady")
        print(f"apply -> WeightsReady {time.monotonic() - t0:.1f}s")
        assert obj["status"]["weights"]["summary"] == "Ready"
        dep = await wait_for(lambda: _deployment(api, ns, "tiny"), timeout=30, what="the Deployment")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["-m", f"{contract.WEIGHTS_MOUNT}/{entry['key']}/{contract.WEIGHTS_GGUF_LINK}"]

        # The files are in the claim's volume, under the key, with the link the engine loads.
        pvc = await client.CoreV1Api(api).read_namespaced_persistent_volume_claim("kubeinfer-weights", ns)
        pv = await client.CoreV1Api(api).read_persistent_volume(pvc.spec.volume_name)
        folder = Path(pv.spec.host_path.path) / entry["key"]
        assert (folder / "model.gguf").resolve() == (folder / "tiny-Q8_0.gguf").resolve()
        assert (folder / "tiny-Q8_0.gguf").stat().st_size == 2 * MIB
        assert not (folder / "tiny-Q4_K_M.gguf").exists()

        async def announced() -> list[str] | None:
            reasons = [r for _, r, _ in await _events(api, ns, "tiny")]
            return reasons if {"DownloadStarted", "Cached"} <= set(reasons) else None

        await wait_for(announced, timeout=30, what="Events for the download's start and end")

        # `kubectl get llm` shows the download's state in its Weights column.
        kubectl = ensure_binaries(["kubectl"])["kubectl"]
        out = subprocess.run(
            [str(kubectl), "--kubeconfig", str(local_node.cp.kubeconfig), "get", "llm", "-n", ns],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert "WEIGHTS" in out.splitlines()[0] and "Ready" in out.splitlines()[1], out

        # A second model of the same file and revision shares the entry: nothing is downloaded again.
        before = len(hub.file_gets())
        await custom.create_namespaced_custom_object(
            G, V, ns, P, _model("tiny-again", "org/tiny-GGUF:Q8_0", servedName="again")
        )
        again = await wait_for(lambda: _weights_ready(api, ns, "tiny-again"), timeout=60, what="WeightsReady")
        assert again["status"]["weights"]["entries"][0]["key"] == entry["key"]
        assert len(hub.file_gets()) == before

        # Deleting both models leaves the cache: the claim and its files stay for the next model.
        for name in ("tiny", "tiny-again"):
            await custom.delete_namespaced_custom_object(G, V, ns, P, name)
        await asyncio.sleep(2)
        assert await client.CoreV1Api(api).read_namespaced_persistent_volume_claim("kubeinfer-weights", ns)
        assert (folder / "tiny-Q8_0.gguf").is_file()
    finally:
        hub.hub.rate_limit_bps = None


@pytest.mark.parametrize(
    ("source", "reason", "says"),
    [
        ("org/nothing-here-GGUF:Q8_0", "RepoNotFound", "org/nothing-here-GGUF"),
        ("org/tiny-GGUF:Q5_K_M", "FileNotFound", "Q4_K_M"),  # names the quants the repository has
        ("org/gated-GGUF:Q8_0", "GatedRepo", "tokenSecretRef"),
    ],
)
async def test_a_failed_download_says_why_and_starts_no_pods(
    api: client.ApiClient, node_ns: str, wait_for: WaitFor, source: str, reason: str, says: str
) -> None:
    ns = node_ns
    await client.CustomObjectsApi(api).create_namespaced_custom_object(G, V, ns, P, _model("bad", source))

    async def failed() -> dict[str, Any] | None:
        obj = await _get(api, ns, "bad")
        c = _cond(obj, "WeightsReady")
        return obj if c and c[0] == "False" and c[1] == reason else None

    obj = await wait_for(failed, timeout=120, what=f"WeightsReady=False {reason}")
    assert says in _cond(obj, "WeightsReady")[2]  # type: ignore[index]
    assert _cond(obj, "Ready")[:2] == ("False", "WeightsFailed")  # type: ignore[index]
    assert _cond(obj, "Degraded")[:2] == ("True", "WeightsFailed")  # type: ignore[index]
    assert obj["status"]["weights"]["summary"] == f"Failed: {reason}"
    assert await _deployment(api, ns, "bad") is None
    (entry,) = obj["status"]["weights"]["entries"]

    # The operator acts on the Job's interim FailureTarget condition; the Job controller counts the
    # failed pod a moment later (after removing its finalizer).
    async def counted() -> dict[str, Any] | None:
        job = await kube.get_job(api, ns, entry["job"])
        return job if job is not None and (job.get("status") or {}).get("failed") else None

    job = await wait_for(counted, timeout=30, what="the Job's failed pod counted")
    assert job["status"]["failed"] == 1  # failed at once: no retries

    async def warned() -> list[tuple[str, str, str]] | None:
        events = [e for e in await _events(api, ns, "bad") if e[0] == "Warning" and e[1] == reason]
        return events or None

    await wait_for(warned, timeout=30, what=f"a Warning Event {reason}")


async def test_a_gated_repository_downloads_once_the_token_is_given(
    api: client.ApiClient, node_ns: str, wait_for: WaitFor
) -> None:
    ns = node_ns
    custom = client.CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(G, V, ns, P, _model("gated", "org/gated-GGUF:Q8_0"))

    async def gated() -> dict[str, Any] | None:
        obj = await _get(api, ns, "gated")
        return obj if (_cond(obj, "WeightsReady") or ("", ""))[1] == "GatedRepo" else None

    failed = await wait_for(gated, timeout=120, what="WeightsReady=False GatedRepo")
    job = failed["status"]["weights"]["entries"][0]["job"]
    first = await kube.get_job(api, ns, job)
    assert first is not None
    secret: Any = {"metadata": {"name": "hf"}, "stringData": {"token": TOKEN}}
    await client.CoreV1Api(api).create_namespaced_secret(ns, secret)
    patch = {"spec": {"model": {"tokenSecretRef": {"name": "hf"}}}}
    await custom.patch_namespaced_custom_object(
        G, V, ns, P, "gated", patch, _content_type="application/merge-patch+json"
    )
    # The spec changed since the failure: the operator deletes the failed Job and runs a new one.
    obj = await wait_for(
        lambda: _weights_ready(api, ns, "gated"), timeout=180, what="WeightsReady after the token"
    )
    assert obj["status"]["weights"]["entries"][0]["job"] == job  # same entry, same Job name ...
    again = await kube.get_job(api, ns, job)
    assert again is not None and again["metadata"]["uid"] != first["metadata"]["uid"]  # ... a new Job
    assert await wait_for(lambda: _deployment(api, ns, "gated"), timeout=30, what="the Deployment")


async def test_an_invalid_cache_spec_is_refused_by_the_apiserver(api: client.ApiClient, node_ns: str) -> None:
    body = _model("pvc-cached", "pvc://models/tiny.gguf")
    with pytest.raises(ApiException) as refused:
        await client.CustomObjectsApi(api).create_namespaced_custom_object(G, V, node_ns, P, body)
    assert refused.value.status == 422
    assert "model.cache fetches Hugging Face sources" in (refused.value.body or "")
