"""The node agent runs the kubeinfer image (the weight cache's download Jobs) as `python -m kubeinfer.cli`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubeinfer.render.config import load_config
from kubeinfer_devkit.devcluster.podplan import (
    KUBEINFER_IMAGE,
    Runtime,
    Unrunnable,
    container_env,
    kubeinfer_image,
)

MOUNTS = [("/weights", "/data/pvc-1_ns_kubeinfer-weights")]


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(load_config(), None, python="/venv/bin/python", kubeinfer_python="/agent/bin/python")


def _fetch_container(**changes: Any) -> dict[str, Any]:
    """The container of a weight-cache download Job, as the operator renders it."""
    container = {
        "name": "fetch",
        "image": kubeinfer_image(load_config()),
        "command": ["kubeinfer"],
        "args": ["weights", "fetch", "--root", "/weights", "--key", "org--m--main--abc", "--repo", "org/m"],
        "env": [{"name": "HF_ENDPOINT", "value": "http://127.0.0.1:9/hf"}],
        "volumeMounts": [{"name": "weights", "mountPath": "/weights"}],
    }
    return {**container, **changes}


def test_the_kubeinfer_image_is_the_configured_one_or_the_default() -> None:
    config = load_config()
    assert kubeinfer_image(config).split(":")[0] == KUBEINFER_IMAGE
    mirrored = config.model_copy(update={"image_registry": "reg.example:5000/mirror/"})
    assert kubeinfer_image(mirrored).startswith(f"reg.example:5000/mirror/{KUBEINFER_IMAGE}")
    rt = Runtime(mirrored, None)
    assert rt.engine_for(kubeinfer_image(mirrored)) == "kubeinfer"
    assert rt.engine_for("kubeinfer/kubeinfer:dev") == "kubeinfer"  # the well-known repository too
    assert rt.engine_for("reg.example:5000/mirror/kubeinfer/llama-server:b1") == "llama-server"


def test_kubeinfer_runs_as_the_cli_module_with_paths_mapped_and_no_host(runtime: Runtime) -> None:
    env = container_env(
        {"PATH": "/usr/bin"}, {"HF_ENDPOINT": "http://127.0.0.1:9/hf", "HF_TOKEN": "t"}, MOUNTS
    )
    launch = runtime.launch(_fetch_container(), "127.0.0.20", MOUNTS, env)
    assert launch.argv == [
        "/agent/bin/python", "-m", "kubeinfer.cli", "weights", "fetch",
        "--root", "/data/pvc-1_ns_kubeinfer-weights", "--key", "org--m--main--abc", "--repo", "org/m",
    ]  # fmt: skip
    assert "--host" not in launch.argv and "127.0.0.20" not in launch.argv  # not a server
    assert launch.env["HF_ENDPOINT"] == "http://127.0.0.1:9/hf" and launch.env["HF_TOKEN"] == "t"
    assert launch.env["PYTHONUNBUFFERED"] == "1"  # the image's ENV: progress lines reach the log at once
    assert "HF_HUB_OFFLINE" not in launch.env  # unlike the engines: it is the one that downloads


def test_command_forms_of_the_kubeinfer_image(runtime: Runtime) -> None:
    def argv(**changes: Any) -> list[str]:
        return runtime.launch(_fetch_container(**changes), "127.0.0.20", MOUNTS, {}).argv

    assert argv(command=["/opt/kubeinfer/bin/kubeinfer"], args=["--help"])[1:] == [
        "-m",
        "kubeinfer.cli",
        "--help",
    ]
    assert argv(command=[], args=["kubeinfer", "crd"])[1:] == [
        "-m",
        "kubeinfer.cli",
        "crd",
    ]  # args replace CMD
    assert argv(command=[], args=[])[1:] == ["-m", "kubeinfer.cli"]  # CMD ["kubeinfer"]
    assert argv(command=["python3", "-c", "print(1)"], args=["/weights/x"]) == [
        "/agent/bin/python", "-c", "print(1)", "/data/pvc-1_ns_kubeinfer-weights/x"
    ]  # fmt: skip
    with pytest.raises(Unrunnable, match="runs `kubeinfer` or `python`") as exc:
        argv(command=["sh", "-c", "true"])
    assert exc.value.reason == "CreateContainerError"


def test_python_m_kubeinfer_cli_runs() -> None:
    """What the node agent starts for the kubeinfer image works in this interpreter."""
    out = subprocess.run(
        [sys.executable, "-m", "kubeinfer.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "usage: kubeinfer" in out.stdout


def test_working_dir_is_mapped(runtime: Runtime, tmp_path: Path) -> None:
    launch = runtime.launch(_fetch_container(workingDir="/weights/tmp"), "127.0.0.20", MOUNTS, {})
    assert launch.cwd == "/data/pvc-1_ns_kubeinfer-weights/tmp"
