"""The node agent's pure parts: which local program an image stands for, and its command line."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from kubeinfer.render.config import load_config
from kubeinfer.render.manifests import render
from kubeinfer.validation import parse_model
from kubeinfer_devkit.devcluster.node import node_object
from kubeinfer_devkit.devcluster.podplan import (
    Runtime,
    Unrunnable,
    admission_rejection,
    base_env,
    check_supported,
    container_env,
    expand,
    image_repository,
    path_mapper,
    pod_ports,
    resource_quantity,
    volume_mounts,
    with_expanded_args,
)
from kubeinfer_devkit.devcluster.pods import LoopbackPool
from tests.cases import ROOT, load_example

MOUNTS = [
    ("/models/pvc/kubeinfer-models", "/data/models"),
    ("/models/cache", "/tmp/pod/cache"),
    ("/", "/nope"),
]


def _container(example: str) -> dict:
    model = parse_model(load_example(ROOT / "examples" / example))
    deployment = render(model, load_config())[0]
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    llama = tmp_path / "llama-server"
    llama.write_text("")
    rt = Runtime(load_config(), llama, python="/venv/bin/python")
    rt._vllm = True  # not probed: these tests run without vLLM
    return rt


def test_image_repository() -> None:
    assert image_repository("kubeinfer/llama-server:b11434-cuda") == "kubeinfer/llama-server"
    assert (
        image_repository("reg.example:5000/vllm/vllm-openai:v0.32.0") == "reg.example:5000/vllm/vllm-openai"
    )
    assert image_repository("vllm/vllm-openai@sha256:abc") == "vllm/vllm-openai"
    assert image_repository("busybox") == "busybox"


def test_paths_under_mounts_are_mapped() -> None:
    m = path_mapper(MOUNTS)
    assert m("/models/pvc/kubeinfer-models/tiny.gguf") == "/data/models/tiny.gguf"
    assert m("/models/pvc/kubeinfer-models") == "/data/models"
    assert m("--model=/models/cache/x") == "--model=/tmp/pod/cache/x"
    assert m('{"model":"/models/pvc/kubeinfer-models/draft"}') == '{"model":"/data/models/draft"}'
    other = "/models/pvc/kubeinfer-models-other"
    assert m(other) == other  # a mount path is a prefix of whole path components only
    assert m("0.0.0.0") == "0.0.0.0" and m("-c") == "-c"


def test_llama_server_image_runs_the_cached_binary(runtime: Runtime) -> None:
    c = _container("tiny-gguf-cpu.yaml")
    launch = runtime.launch(c, "127.0.0.12", MOUNTS, {"A": "1"})
    assert launch.argv[0] == str(runtime.llama_server)
    assert launch.argv[1:3] == ["-m", "/data/models/tiny-llama.gguf"]
    assert launch.argv[launch.argv.index("--host") + 1] == "127.0.0.12"  # not every interface
    assert launch.argv[launch.argv.index("--port") + 1] == "8000"
    assert launch.env == {"A": "1"}


def test_vllm_image_runs_the_server_module_offline(runtime: Runtime) -> None:
    c = _container("tiny-vllm-cpu.yaml")
    launch = runtime.launch(c, "127.0.0.13", MOUNTS, {})
    assert launch.argv[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                               "/data/models/tiny-llama-hf"]  # fmt: skip
    assert launch.argv[launch.argv.index("--host") + 1] == "127.0.0.13"
    assert launch.env["HF_HUB_OFFLINE"] == "1"


def test_what_cannot_run_here_says_why(runtime: Runtime, tmp_path: Path) -> None:
    c = _container("tiny-gguf-cpu.yaml")
    with pytest.raises(Unrunnable, match="no container runtime") as exc:
        runtime.launch({**c, "image": "example.invalid/other:1"}, "127.0.0.10", MOUNTS, {})
    assert exc.value.reason == "CreateContainerError"
    v = _container("tiny-vllm-cpu.yaml")
    with pytest.raises(Unrunnable, match="GPU kernels only"):
        runtime.launch({**v, "args": [*v["args"], "--quantization", "awq_marlin"]}, "127.0.0.10", MOUNTS, {})
    runtime.llama_server = tmp_path / "missing"
    with pytest.raises(Unrunnable, match="make llama-server"):
        runtime.launch(c, "127.0.0.10", MOUNTS, {})


def test_mirrored_and_upstream_images_are_recognised(runtime: Runtime) -> None:
    assert runtime.engine_for("mirror.example/kubeinfer/llama-server:b1") == "llama-server"
    assert runtime.engine_for("ghcr.io/ggml-org/llama.cpp:server") == "llama-server"
    assert runtime.engine_for("vllm/vllm-openai:v0.31.0") == "vllm"
    assert runtime.engine_for("nginx:1") is None


def test_pod_ips_are_loopback_addresses_from_10_up() -> None:
    pool = LoopbackPool()
    a, b = pool.take("a", [18001]), pool.take("b", [18001])
    assert (a, b) == ("127.0.0.10", "127.0.0.11")
    assert pool.take("c", [18001], preferred="127.0.0.10") != "127.0.0.10"  # a's
    pool.release("a")
    assert pool.take("d", [18001], preferred="127.0.0.10") == "127.0.0.10"
    assert pool.take("e", [], preferred="127.0.0.2") != "127.0.0.2"  # below the range: tests' own


def test_an_address_whose_port_is_taken_is_skipped() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.10", 0))
        s.listen()
        port = s.getsockname()[1]
        assert LoopbackPool().take("a", [port]) == "127.0.0.11"


def test_env_references_and_gpu_requests() -> None:
    assert expand("$(A)/x $$(A) $(B)", {"A": "a"}) == "a/x $(A) $(B)"
    assert resource_quantity({"limits": {"nvidia.com/gpu": "2"}}, "nvidia.com/gpu") == 2
    assert resource_quantity({"requests": {"cpu": "1"}}, "nvidia.com/gpu") == 0


def test_a_pod_spec_becomes_mounts_env_and_ports_without_io() -> None:
    ports = [{"containerPort": 8000}, {"containerPort": 53, "protocol": "UDP"}]
    gpu = {"limits": {"nvidia.com/gpu": "1"}}
    pod = {"spec": {"containers": [{"name": "a", "resources": gpu, "ports": ports}]}}
    rejected = admission_rejection(pod)
    assert rejected is not None and rejected["reason"] == "OutOfnvidia.com/gpu"
    assert admission_rejection({"spec": {"containers": [{"name": "a"}]}}) is None
    assert pod_ports(pod) == [8000]
    c = {"name": "a", "volumeMounts": [{"name": "m", "mountPath": "/models"},
                                       {"name": "s", "mountPath": "/cache", "subPath": "x"}]}  # fmt: skip
    with pytest.raises(Unrunnable, match="readinessProbe"):
        check_supported({}, {**c, "readinessProbe": {"exec": {"command": ["true"]}}})
    with pytest.raises(Unrunnable, match="init containers"):
        check_supported({"initContainers": [{"name": "i"}]}, c)
    mounts = volume_mounts(c, {"m": "/data", "s": "/scratch"})
    assert mounts == [("/models", "/data"), ("/cache", "/scratch/x")]
    with pytest.raises(Unrunnable, match="'m' not found"):
        volume_mounts(c, {})
    env = container_env(base_env({"KUBECONFIG": "k", "PATH": "/bin"}), {"MODEL": "/models/t.gguf"}, mounts)
    assert env == {"PATH": "/bin", "MODEL": "/data/t.gguf"}  # the agent's own credentials stay behind
    expanded = with_expanded_args({"name": "a", "command": ["$(A)"], "args": ["--x=$(A)"]}, {"A": "1"})
    assert expanded == {"name": "a", "command": ["1"], "args": ["--x=1"]}


def test_the_node_has_no_gpu_and_a_kubelet_port() -> None:
    node = node_object("n", {"cpu": "2", "nvidia.com/gpu": "0"}, 12345, "v1.34.10")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "0"
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 12345
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.0.0.1"}
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert not any(k.startswith("kwok") for k in node["metadata"].get("annotations") or {})  # kwok leaves it
