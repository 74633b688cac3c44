"""What the node agent runs for a pod: a Pod object in, local command lines, env and mounts out.

The images it runs are the engines (vLLM, llama-server) and kubeinfer's own image, whose ``kubeinfer``
command (the weight cache's download Jobs: ``kubeinfer weights fetch``) runs as ``python -m
kubeinfer.cli`` in the agent's own interpreter, which has the product installed by construction.

Pure: no apiserver, no processes, no files written. The only looks at this machine are
:class:`Runtime`'s two questions (is llama-server built, is vLLM installed), so the whole mapping is
unit-testable with a Pod dict and a :class:`~kubeinfer.render.config.RenderConfig`. What needs the
apiserver (claims, Secrets, ConfigMaps) is resolved by :mod:`kubeinfer_devkit.devcluster.node` and
passed in; what runs the plan is :mod:`kubeinfer_devkit.devcluster.containers`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from kubeinfer.render.config import RenderConfig

NODE_NAME = "kubeinfer-local"
GPU_RESOURCE = "nvidia.com/gpu"

# vLLM quantization methods whose kernels exist for NVIDIA GPUs only: on CPU vLLM would load for a
# minute and then fail with a kernel error; the agent says so before starting it.
VLLM_GPU_ONLY_QUANTIZATION = frozenset(
    {"awq_marlin", "gptq_marlin", "fbgemm_fp8", "modelopt_fp4", "nvfp4_per_token", "mxfp4", "gpt_oss_mxfp4"}
)
# The kubeinfer image's repository when the configuration names none (RenderConfig.images.kubeinfer).
KUBEINFER_IMAGE = "kubeinfer/kubeinfer"
# Well-known images, besides the configured ones: repository -> what runs.
_UPSTREAM_IMAGES = {
    "vllm/vllm-openai": "vllm",
    "ggml-org/llama.cpp": "llama-server",
    KUBEINFER_IMAGE: "kubeinfer",
}
# The kubeinfer image's ENV (images/kubeinfer/Dockerfile) that changes how it runs: unbuffered output,
# so the log (and the progress lines the operator reads from it) is written as it happens.
_KUBEINFER_IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
_PYTHON = re.compile(r"python(3(\.\d+)?)?")
# Put first on vLLM's PYTHONPATH: its sitecustomize maps the paths vLLM gets at run time (LoRA).
MOUNT_SHIM = Path(__file__).resolve().parent / "mountshim"
# Environment of the agent that must not reach an engine: the agent's own credentials, and the
# vLLM CPU variable that silently overrides the rendered --kv-cache-memory-bytes.
_ENV_DROP = ("KUBECONFIG", "VLLM_CPU_KVCACHE_SPACE")


class Unrunnable(Exception):
    """A container that cannot run here: a kubelet-style waiting reason and a message for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclasses.dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    note: str  # what the image stands for here (the "Pulled" event)


def image_repository(image: str) -> str:
    """'reg:5000/org/name:tag@sha256:..' -> 'reg:5000/org/name'."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def path_mapper(mounts: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """A function that rewrites in-container paths under any mount path to the local directory.

    Handles a whole argument (`/models/x`), `--flag=/models/x`, comma-separated lists of paths
    (`/models/a:0,/models/b:0`), and quoted paths inside JSON arguments (`{"model": "/models/x"}`).
    The longest mount path wins.
    """
    table = sorted(((m.rstrip("/") or "/", local) for m, local in mounts), key=lambda t: -len(t[0]))

    def one(path: str) -> str | None:
        for mount, local in table:
            if path == mount:
                return local
            if path.startswith(mount + "/"):
                return local + path[len(mount) :]
        return None

    def many(text: str) -> str:
        # A comma-separated list of paths (llama-server's `--lora-scaled A:0,B:0`): each one.
        return ",".join((one(p) or p) if p.startswith("/") else p for p in text.split(","))

    def mapped(value: str) -> str:
        if value.startswith("/"):
            return many(value)
        if value.startswith("-") and "=" in value:
            flag, _, rest = value.partition("=")
            if rest.startswith("/"):
                return f"{flag}={many(rest)}"
            return value
        if value.startswith(("{", "[")):
            for mount, local in table:
                value = value.replace(f'"{mount}/', f'"{local}/').replace(f'"{mount}"', f'"{local}"')
        return value

    return mapped


def resource_quantity(resources: dict[str, Any] | None, name: str) -> int:
    """Whole units of an extended resource requested or limited by a container (GPUs)."""
    res = resources or {}
    value = (res.get("limits") or {}).get(name) or (res.get("requests") or {}).get(name) or 0
    try:
        return int(str(value))
    except ValueError:
        return 1


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    """Named ports and, under their number as a string, unnamed ones (TCP)."""
    out: dict[str, int] = {}
    for p in container.get("ports") or []:
        if p.get("protocol", "TCP") == "TCP":
            out[p.get("name") or str(p["containerPort"])] = int(p["containerPort"])
    return out


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references to earlier variables, as the kubelet expands them ($$ escapes)."""
    if "$(" not in value:
        return value
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and ")" in value[i:]:
            end = value.index(")", i)
            name = value[i + 2 : end]
            out.append(env.get(name, value[i : end + 1]))
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def kubeinfer_image(config: RenderConfig) -> str:
    """The kubeinfer image the operator renders into its Jobs (`images.kubeinfer`, or the default)."""
    name = getattr(config.images, "kubeinfer", None) or KUBEINFER_IMAGE
    return f"{config.image_registry.rstrip('/')}/{name}" if config.image_registry else str(name)


def base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment (`environ`) as an engine inherits it."""
    return {k: v for k, v in environ.items() if k not in _ENV_DROP}


# --- A pod's containers ----------------------------------------------------------------------------


def admission_rejection(pod: dict[str, Any]) -> dict[str, str] | None:
    """The kubelet's admission: more GPUs than the node has is a rejected pod (reason and message).

    The scheduler would not have placed it here; this catches pods bound by name.
    """
    for c in pod["spec"].get("containers") or []:
        want = resource_quantity(c.get("resources"), GPU_RESOURCE)
        if want > 0:
            return {
                "reason": f"OutOf{GPU_RESOURCE}",
                "message": f"Pod was rejected: Node didn't have enough resource: {GPU_RESOURCE}, "
                f"requested: {want}, used: 0, capacity: 0 ({NODE_NAME} has no GPU)",
            }
    return None


def pod_ports(pod: dict[str, Any]) -> list[int]:
    """Every TCP port of the pod's containers: what its pod IP must have free."""
    return [p for c in pod["spec"].get("containers") or [] for p in container_ports(c).values()]


def check_supported(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """Raise Unrunnable for what the agent does not run: init containers, exec probes."""
    if pod_spec.get("initContainers"):
        raise Unrunnable("CreateContainerConfigError", "init containers do not run on the node agent")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe and not ({"httpGet", "tcpSocket"} & set(probe)):
            raise Unrunnable("CreateContainerConfigError", f"{kind}: only httpGet and tcpSocket run here")


def volume_mounts(container: dict[str, Any], volumes: dict[str, str]) -> list[tuple[str, str]]:
    """(mount path, local directory) of each volumeMount; `volumes`: pod volume name -> directory."""
    mounts = []
    for m in container.get("volumeMounts") or []:
        local = volumes.get(m["name"])
        if local is None:
            raise Unrunnable("CreateContainerConfigError", f"volume {m['name']!r} not found in the pod")
        if m.get("subPath"):
            local = str(Path(local) / m["subPath"])
        mounts.append((m["mountPath"], local))
    return mounts


def with_expanded_args(container: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """$(VAR) in command and args refers to the container's variables, as in a kubelet."""
    return {
        **container,
        "command": [expand(a, env) for a in container.get("command") or []],
        "args": [expand(a, env) for a in container.get("args") or []],
    }


def container_env(
    inherited: dict[str, str], own: dict[str, str], mounts: list[tuple[str, str]]
) -> dict[str, str]:
    """The process environment: the agent's (`base_env`), then the container's, paths mapped."""
    mapped = path_mapper(mounts)
    return {**inherited, **{k: mapped(v) for k, v in own.items()}}


class Runtime:
    """Which local program a container image stands for, and its command line here.

    `python` runs vLLM; `kubeinfer_python` runs the kubeinfer image's commands (default: this
    interpreter, the node agent's, which imports kubeinfer itself).
    """

    def __init__(
        self,
        config: RenderConfig,
        llama_server: Path | None,
        python: str = sys.executable,
        kubeinfer_python: str = sys.executable,
    ) -> None:
        self.config, self.llama_server, self.python = config, llama_server, python
        self.kubeinfer_python = kubeinfer_python
        self.images = {
            image_repository(config.image_for("llama-server")): "llama-server",
            image_repository(config.image_for("vllm")): "vllm",
            image_repository(kubeinfer_image(config)): "kubeinfer",
            **_UPSTREAM_IMAGES,
        }
        self._vllm: bool | None = None

    def engine_for(self, image: str) -> str | None:
        repo = image_repository(image)
        for known, engine in self.images.items():
            if repo == known or repo.endswith("/" + known):
                return engine
        return None

    def vllm_available(self) -> bool:
        if self._vllm is None:
            if self.python == sys.executable:
                self._vllm = importlib.util.find_spec("vllm") is not None
            else:
                probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
                self._vllm = subprocess.run([self.python, "-c", probe], timeout=60).returncode == 0
        return self._vllm

    def launch(
        self, container: dict[str, Any], pod_ip: str, mounts: list[tuple[str, str]], env: dict[str, str]
    ) -> Launch:
        image = container.get("image") or ""
        engine = self.engine_for(image)
        known = ", ".join(sorted(f"{repo} ({e})" for repo, e in self.images.items()))
        if engine is None:
            raise Unrunnable(
                "CreateContainerError",
                f"image {image!r} cannot run on {NODE_NAME}: the node agent has no container runtime and "
                f"runs only the engine images and kubeinfer's as local programs ({known})",
            )
        mapped = path_mapper(mounts)
        if engine == "kubeinfer":
            return self._kubeinfer(container, image, mapped, env)
        command = [mapped(a) for a in container.get("command") or []]
        args = [mapped(a) for a in container.get("args") or []]
        # Listen on the pod's own address, not on every interface of the machine.
        args = [
            pod_ip if a == "0.0.0.0" else "--host=" + pod_ip if a == "--host=0.0.0.0" else a for a in args
        ]
        if "--host" not in args and not any(a.startswith("--host=") for a in args):
            args += ["--host", pod_ip]
        env = {**env}
        if engine == "llama-server":
            if command and Path(command[0]).name != "llama-server":
                raise Unrunnable("CreateContainerError", f"command {command[0]!r} is not llama-server")
            if self.llama_server is None or not self.llama_server.is_file():
                raise Unrunnable(
                    "CreateContainerError", "llama-server is not built here: run `make llama-server`"
                )
            argv = [str(self.llama_server), *command[1:], *args]
            note = f"{image} runs as the local llama-server {self.llama_server}"
        else:
            if command[:2] == ["vllm", "serve"] or not command:
                rest = command[2:] + args
                if rest and not rest[0].startswith("-"):  # `vllm serve MODEL`: the module wants --model
                    rest = ["--model", *rest]
            elif len(command) >= 3 and command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]:
                rest = command[3:] + args
            else:
                raise Unrunnable("CreateContainerError", f"command {' '.join(command)!r} is not `vllm serve`")
            quant = _flag_value(rest, "--quantization")
            if quant in VLLM_GPU_ONLY_QUANTIZATION:
                raise Unrunnable(
                    "CreateContainerError",
                    f"--quantization {quant} has GPU kernels only; vLLM on this CPU cannot load it "
                    "(run it on a GPU node, or pick a method vLLM supports on CPU)",
                )
            if not self.vllm_available():
                raise Unrunnable(
                    "CreateContainerError",
                    f"vLLM is not installed for {self.python}: run `make install-engines`",
                )
            # vllm-cpu's `vllm` console script cannot find its own distribution: run the server module.
            argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", *rest]
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # never download: models are local
            # LoRA adapters arrive at run time with in-container paths (/v1/load_lora_adapter): the
            # shim's sitecustomize maps them with the pod's mounts (see mountshim/sitecustomize.py).
            shim = os.pathsep.join(p for p in (str(MOUNT_SHIM), env.get("PYTHONPATH", "")) if p)
            env.update(PYTHONPATH=shim, KUBEINFER_NODE_MOUNTS=json.dumps([list(m) for m in mounts]))
            note = f"{image} runs as vLLM from {self.python}"
        cwd = mapped(container["workingDir"]) if container.get("workingDir") else ""
        return Launch(argv=argv, env=env, cwd=cwd, note=note)

    def _kubeinfer(
        self, container: dict[str, Any], image: str, mapped: Callable[[str], str], env: dict[str, str]
    ) -> Launch:
        """The kubeinfer image: `kubeinfer ...` as `python -m kubeinfer.cli ...`, `python ...` as is.

        No `--host`, no port: these are commands that run to their end (Jobs), not servers.
        """
        command = [mapped(a) for a in container.get("command") or []]
        args = [mapped(a) for a in container.get("args") or []]
        # The image has no ENTRYPOINT and CMD ["kubeinfer"]: `command` replaces CMD (and is followed by
        # `args`); `args` alone replace it, as in any container runtime.
        line = command + args if command else args or ["kubeinfer"]
        program = Path(line[0]).name
        if program == "kubeinfer":
            argv = [self.kubeinfer_python, "-m", "kubeinfer.cli", *line[1:]]
        elif _PYTHON.fullmatch(program):
            argv = [self.kubeinfer_python, *line[1:]]
        else:
            raise Unrunnable(
                "CreateContainerError",
                f"command {line[0]!r}: the kubeinfer image runs `kubeinfer` or `python` on {NODE_NAME}",
            )
        env = {**_KUBEINFER_IMAGE_ENV, **env}  # the image's ENV under the container's own
        cwd = mapped(container["workingDir"]) if container.get("workingDir") else ""
        note = f"{image} runs as `python -m kubeinfer.cli` from {self.kubeinfer_python}"
        return Launch(argv=argv, env=env, cwd=cwd, note=note)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
