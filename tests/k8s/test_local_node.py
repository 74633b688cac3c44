"""The local stack's node, for the weight cache: dynamic volumes and Jobs in the kubeinfer image.

A control plane of its own (no kwok: the scheduler must place pods on the node agent's node), set up
as `kubeinfer up` sets it up: the node agent as ``system:node:kubeinfer-local``, its volume provisioner
as a user of its own bound to ``system:persistent-volume-provisioner``, the default StorageClass.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import kube
from kubeinfer_devkit.devcluster import procs, provisioner
from kubeinfer_devkit.devcluster.podplan import KUBEINFER_IMAGE
from tests.k8s_support import LocalNode

WaitFor = Callable[..., Awaitable[Any]]
IMAGE = f"{KUBEINFER_IMAGE}:0.1.0"
PERMANENT_EXIT_CODES = [10, 11, 12, 13, 14]  # as the operator's download Jobs name them


@pytest.fixture
def api(node_api: client.ApiClient) -> client.ApiClient:
    return node_api


@pytest.fixture
def ns(node_ns: str) -> str:
    return node_ns


async def _get(call: Any, *args: Any) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = await kube._json(await call(*args, **kube.RAW))
        return obj
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _kubeinfer_container(name: str, command: list[str], args: list[str], **more: Any) -> dict[str, Any]:
    return {"name": name, "image": IMAGE, "command": command, "args": args, **more}


def _job(name: str, container: dict[str, Any], **spec: Any) -> Any:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [container], "enableServiceLinks": False}
            },
            **spec,
        },
    }


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


async def _job_pods(core: client.CoreV1Api, ns: str, job: str) -> list[dict[str, Any]]:
    data = await kube._json(await core.list_namespaced_pod(ns, label_selector=f"job-name={job}", **kube.RAW))
    return list(data["items"])


async def test_a_claim_without_a_class_gets_a_volume_a_pod_writes_to(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor
) -> None:
    core = client.CoreV1Api(api)
    t0 = time.monotonic()
    secret: Any = {"metadata": {"name": "hf"}, "data": {"token": base64.b64encode(b"hf_x").decode()}}
    await core.create_namespaced_secret(ns, secret)
    claim: Any = {
        "metadata": {"name": "kubeinfer-weights"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "5Gi"}}},
    }
    await core.create_namespaced_persistent_volume_claim(ns, claim)

    async def bound() -> dict[str, Any] | None:
        pvc = await _get(core.read_namespaced_persistent_volume_claim, "kubeinfer-weights", ns)
        return pvc if pvc and (pvc.get("status") or {}).get("phase") == "Bound" else None

    pvc = await wait_for(bound, timeout=60, what="the claim Bound")
    bound_s = time.monotonic() - t0
    assert pvc["spec"]["storageClassName"] == provisioner.STORAGE_CLASS  # the default class's admission
    pv = await _get(core.read_persistent_volume, pvc["spec"]["volumeName"])
    assert pv is not None
    assert pv["metadata"]["annotations"][provisioner.ANN_PROVISIONED_BY] == provisioner.PROVISIONER
    assert pv["spec"]["capacity"]["storage"] == "5Gi" and pv["spec"]["accessModes"] == ["ReadWriteMany"]
    path = Path(pv["spec"]["hostPath"]["path"])
    assert path.parent == local_node.volumes.resolve() and path.is_dir()
    assert path.name == f"{pv['metadata']['name']}_{ns}_kubeinfer-weights"

    # A pod of the kubeinfer image writes through the claim's mount; env from a Secret reaches it.
    write = (
        "import os, pathlib, sys; pathlib.Path(sys.argv[1]).write_text(os.environ['HF_TOKEN'] + os.getcwd())"
    )
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    pod: Any = {
        "metadata": {"name": "writer"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                _kubeinfer_container(
                    "w", ["python", "-c", write], ["/weights/hello.txt"], env=env, workingDir="/weights",
                    volumeMounts=[{"name": "weights", "mountPath": "/weights"}],
                )
            ],
            "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "kubeinfer-weights"}}],
        },
    }  # fmt: skip
    await core.create_namespaced_pod(ns, pod)

    async def finished() -> dict[str, Any] | None:
        p = await _get(core.read_namespaced_pod, "writer", ns)
        return p if p and p["status"].get("phase") in ("Succeeded", "Failed") else None

    done = await wait_for(finished, timeout=90, what="the writer pod to finish")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert (path / "hello.txt").read_text() == f"hf_x{path}"  # workingDir /weights is the directory too

    # Deleting the claim (after its pod) releases the volume: the PV and the directory go.
    await core.delete_namespaced_pod("writer", ns, grace_period_seconds=0)
    await core.delete_namespaced_persistent_volume_claim("kubeinfer-weights", ns)

    async def reclaimed() -> bool:
        return await _get(core.read_persistent_volume, pv["metadata"]["name"]) is None and not path.exists()

    await wait_for(reclaimed, timeout=90, what="the released volume deleted with its directory")
    print(f"claim Bound after {bound_s:.1f}s; volume reclaimed {time.monotonic() - t0:.1f}s after the create")


async def test_hand_bound_claims_are_left_alone(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor
) -> None:
    """storageClassName "" (ensure_claim, kube.ensure_local_claim): bound by name, never provisioned."""
    core = client.CoreV1Api(api)
    await kube.ensure_local_claim(api, ns, "models")

    async def bound() -> dict[str, Any] | None:
        pvc = await _get(core.read_namespaced_persistent_volume_claim, "models", ns)
        return pvc if pvc and (pvc.get("status") or {}).get("phase") == "Bound" else None

    # The PV controller may first see the claim without its volume; then its 15 s resync binds them.
    pvc = await wait_for(bound, timeout=90, what="the hand-bound claim Bound")
    assert pvc["spec"]["volumeName"] == f"kubeinfer-{ns}-models" and pvc["spec"]["storageClassName"] == ""
    assert not any(p.name.endswith(f"_{ns}_models") for p in local_node.volumes.iterdir())
    await core.delete_namespaced_persistent_volume_claim("models", ns)
    await core.delete_persistent_volume(f"kubeinfer-{ns}-models")


async def test_a_kubeinfer_job_completes_and_its_log_is_readable(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor
) -> None:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    t0 = time.monotonic()
    job = _job("help", _kubeinfer_container("fetch", ["kubeinfer"], ["--help"]), backoffLimit=0)
    await batch.create_namespaced_job(ns, job)

    async def complete() -> dict[str, Any] | None:
        j = await _get(batch.read_namespaced_job, "help", ns)
        return j if j and (_condition(j, "Complete") or _condition(j, "Failed")) else None

    done = await wait_for(complete, timeout=120, what="the Job to finish")
    assert _condition(done, "Complete"), done["status"]
    assert done["status"]["succeeded"] == 1
    print(f"kubeinfer --help Job Complete after {time.monotonic() - t0:.1f}s")
    (pod,) = await _job_pods(core, ns, "help")
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (0, "Completed")
    log = await core.read_namespaced_pod_log(pod["metadata"]["name"], ns, container="fetch")
    assert log.startswith("usage: kubeinfer")
    tail = await core.read_namespaced_pod_log(pod["metadata"]["name"], ns, tail_lines=2)
    assert tail == "".join(log.splitlines(keepends=True)[-2:])


async def test_a_permanent_exit_code_fails_the_job_at_once(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor
) -> None:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    t0 = time.monotonic()
    fail = 'import sys; print(\'{"event": "error", "reason": "RepositoryNotFound"}\'); sys.exit(12)'
    policy = {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": "fetch", "operator": "In", "values": PERMANENT_EXIT_CODES}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }  # fmt: skip
    job = _job(
        "fetch",
        _kubeinfer_container("fetch", ["python", "-c", fail], []),
        backoffLimit=4,
        podFailurePolicy=policy,
    )
    await batch.create_namespaced_job(ns, job)

    async def failed() -> dict[str, Any] | None:
        j = await _get(batch.read_namespaced_job, "fetch", ns)
        return j if j and (_condition(j, "Failed") or _condition(j, "Complete")) else None

    done = await wait_for(failed, timeout=120, what="the Job to fail")
    cond = _condition(done, "Failed")
    assert cond is not None and cond["reason"] == "PodFailurePolicy", done["status"]
    assert "exit code 12" in cond["message"]
    print(f"exit 12 Job Failed (PodFailurePolicy) after {time.monotonic() - t0:.1f}s")
    await asyncio.sleep(2)  # no replacement pod comes later either
    pods = await _job_pods(core, ns, "fetch")
    assert len(pods) == 1 and done["status"].get("failed") == 1, [p["metadata"]["name"] for p in pods]
    status = pods[0]["status"]
    assert status["phase"] == "Failed"
    term = status["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (12, "Error")
    assert term["message"] == '{"event": "error", "reason": "RepositoryNotFound"}'  # the log's last line
    # Read raw: kubernetes_asyncio json-decodes a log that is one JSON document and returns its repr.
    resp: Any = await core.read_namespaced_pod_log(pods[0]["metadata"]["name"], ns, tail_lines=1, **kube.RAW)
    async with resp:
        assert resp.status == 200
        assert (await resp.read()).decode().strip() == term["message"]
    tail = getattr(kube, "job_log_tail", None)  # the operator's reader, where it exists
    if tail is not None:
        lines, message = await tail(api, ns, "fetch", "fetch", 5)
        assert lines == [term["message"]] and message == term["message"]

    # Deleting the Job as the operator does (Foreground: its pods first) is not held up by the node.
    await batch.delete_namespaced_job("fetch", ns, propagation_policy="Foreground")

    async def gone() -> bool:
        job = await _get(batch.read_namespaced_job, "fetch", ns)
        return job is None and not await _job_pods(core, ns, "fetch")

    await wait_for(gone, timeout=60, what="the Job and its pod deleted")


async def test_a_job_pod_whose_process_died_with_the_agent_fails_and_is_replaced(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor
) -> None:
    """restartPolicy Never: a restarted agent does not run the container again in the same pod (a
    kubelet never would); it reports it lost (137), the pod Failed, and the Job makes a new pod."""
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    sleep = _kubeinfer_container("fetch", ["python", "-c", "import time; time.sleep(300)"], [])
    await batch.create_namespaced_job(ns, _job("slow", sleep, backoffLimit=1))

    async def running() -> dict[str, Any] | None:
        pods = await _job_pods(core, ns, "slow")
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    first = await wait_for(running, timeout=60, what="the Job's pod Running")
    local_node.agent.stop(grace=0)  # SIGKILL (its watchdogs take the container's process along)
    local_node.agent = procs.Child(
        "node-agent", local_node.agent.argv, local_node.agent.log, watchdog=True
    ).start()

    async def replaced() -> list[dict[str, Any]] | None:
        pods = {p["metadata"]["uid"]: p for p in await _job_pods(core, ns, "slow")}
        old = pods.get(first["metadata"]["uid"])
        lost = old is not None and old["status"].get("phase") == "Failed"
        return list(pods.values()) if lost and len(pods) == 2 else None

    pods = await wait_for(replaced, timeout=90, what="the lost pod Failed and a new one made")
    old = next(p for p in pods if p["metadata"]["uid"] == first["metadata"]["uid"])
    cs = old["status"]["containerStatuses"][0]
    assert (cs["state"]["terminated"]["exitCode"], cs["state"]["terminated"]["reason"]) == (
        137, "ContainerStatusUnknown"
    )  # fmt: skip
    assert cs["restartCount"] == 0
    await batch.delete_namespaced_job("slow", ns, propagation_policy="Foreground")


async def test_the_operators_fetch_job_fills_the_operators_claim(
    local_node: LocalNode, api: client.ApiClient, ns: str, wait_for: WaitFor, tmp_path: Path
) -> None:
    """The claim and download Job as kubeinfer.render.weights renders them, against a local Hub: the
    claim gets a volume, the Job downloads a gated repository into it (HF_TOKEN from the Secret,
    HF_ENDPOINT from the config), and a repository that does not exist fails the Job at once."""
    from kubeinfer.render import weights
    from kubeinfer.render.config import load_config
    from kubeinfer.validation import parse_model
    from kubeinfer_devkit.hub.server import HubServer

    repo = tmp_path / "hub" / "org" / "tiny"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    (repo / "model.safetensors").write_bytes(b"\x01" * 300_000)
    (repo / ".hub-gated").touch()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    secret: Any = {"metadata": {"name": "hf"}, "stringData": {"token": "hf_good"}}
    await core.create_namespaced_secret(ns, secret)

    def model(name: str, source: str) -> Any:
        spec = {"source": source, "tokenSecretRef": {"name": "hf"}, "cache": {"size": "1Gi"}}
        meta = {"name": name, "namespace": ns}
        return parse_model({"kind": "LLMModel", "metadata": meta, "spec": {"engine": "vllm", "model": spec}})

    async with HubServer(tmp_path / "hub", token="hf_good") as hub:
        config = load_config().model_copy(update={"hf_endpoint": hub.url})
        good, missing = model("tiny", "org/tiny"), model("missing", "org/missing")
        claim: Any = weights.cache_claim(good)
        await core.create_namespaced_persistent_volume_claim(ns, claim)
        jobs = {}
        for m in (good, missing):
            (entry,) = weights.entries(m)
            job: Any = weights.fetch_job(m, entry, config)
            await batch.create_namespaced_job(ns, job)
            jobs[m.metadata.name] = (job["metadata"]["name"], entry.key)

        async def finished(name: str) -> dict[str, Any] | None:
            j = await _get(batch.read_namespaced_job, name, ns)
            return j if j and (_condition(j, "Complete") or _condition(j, "Failed")) else None

        t0 = time.monotonic()
        done = await wait_for(lambda: finished(jobs["tiny"][0]), timeout=180, what="the fetch Job to finish")
        assert _condition(done, "Complete"), done["status"]
        print(f"fetch Job Complete after {time.monotonic() - t0:.1f}s")
        pvc = await _get(core.read_namespaced_persistent_volume_claim, claim["metadata"]["name"], ns)
        assert pvc is not None
        pv = await _get(core.read_persistent_volume, pvc["spec"]["volumeName"])
        assert pv is not None
        entry_dir = Path(pv["spec"]["hostPath"]["path"]) / jobs["tiny"][1]
        assert (entry_dir / "config.json").read_text() == (repo / "config.json").read_text()
        assert (entry_dir / "model.safetensors").stat().st_size == 300_000

        gone = await wait_for(
            lambda: finished(jobs["missing"][0]), timeout=120, what="the missing repo's Job"
        )
        cond = _condition(gone, "Failed")
        assert cond is not None and cond["reason"] == "PodFailurePolicy", gone["status"]
        assert gone["status"].get("failed") == 1
    tail = getattr(kube, "job_log_tail", None)
    if tail is not None:
        lines, message = await tail(api, ns, jobs["missing"][0], "fetch", 20)
        assert lines and message, (lines, message)
