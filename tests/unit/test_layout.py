"""The product (`kubeinfer`, what the image installs) and the dev kit (`kubeinfer_devkit`) stay apart:
the product never imports the dev kit, its wheel carries none of it, and the image's build context
admits only the product's sources (docs/architecture.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ROOT / "operator" / "kubeinfer"
DEVKIT = ROOT / "devkit" / "kubeinfer_devkit"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_product_sources_never_import_the_dev_kit() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imports(path) if m.startswith("kubeinfer_devkit"))
        for path in PRODUCT.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_product_has_no_test_only_http_client() -> None:
    """One HTTP client on the gateway's hot path (aiohttp); httpx is a test and dev-kit tool."""
    users = [str(p.relative_to(ROOT)) for p in PRODUCT.rglob("*.py") if "httpx" in _imports(p)]
    assert users == []


def test_importing_every_product_module_loads_no_dev_kit_module() -> None:
    # A fresh interpreter: this test process has imported the dev kit for other tests.
    code = (
        "import importlib, json, pkgutil, sys, kubeinfer\n"
        "for m in pkgutil.walk_packages(kubeinfer.__path__, 'kubeinfer.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kubeinfer'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert "kubeinfer.gateway.app" in loaded and "kubeinfer.operator.handlers" in loaded  # it did walk
    assert [m for m in loaded if m.startswith("kubeinfer_devkit")] == []


def test_dev_kit_commands_join_the_cli_through_entry_points() -> None:
    """With the dev kit installed, `kubeinfer` offers its commands; the product lists only its own."""
    from kubeinfer.cli import PRODUCT_GROUPS, build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"operator", "gateway", "render", "validate", "estimate", "crd"} <= commands
    assert {"up", "down", "demo", "sim", "bench"} <= commands
    assert all(not g.startswith("kubeinfer_devkit") for g in PRODUCT_GROUPS)


@pytest.fixture(scope="module")
def product_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` builds from the repository root: what the image installs."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("kubeinfer-*.whl")
    return wheel


def test_product_wheel_carries_no_dev_kit(product_wheel: Path) -> None:
    names = zipfile.ZipFile(product_wheel).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "kubeinfer/gateway/app.py" in modules and "kubeinfer/operator/handlers.py" in modules
    dev_kit = {p.relative_to(DEVKIT.parent).as_posix() for p in DEVKIT.rglob("*.py")}
    assert dev_kit, "the dev kit's sources moved: update this test"
    dist_info = "-".join(product_wheel.name.split("-")[:2]) + ".dist-info"
    assert [n for n in names if n.split("/")[0] not in ("kubeinfer", dist_info)] == []
    # Nothing of the dev kit under any name: no node agent, simulator, load generator or builders.
    stems = {Path(n).stem for n in modules}
    assert not stems & {"nodeagent", "controlplane", "loadgen", "llamacpp", "tinymodels", "fleet"}
    metadata = zipfile.ZipFile(product_wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [
        ln.split(":", 1)[1].strip() for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")
    ]
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if r.startswith(("httpx", "vllm", "torch", "matplotlib", "nvidia-ml-py"))]


def test_image_build_context_admits_only_the_product() -> None:
    text = (ROOT / "images" / "kubeinfer" / "Dockerfile.dockerignore").read_text()
    ignore = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    admitted = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert ignore[0] == "*" and sorted(admitted) == ["README.md", "operator", "pyproject.toml"]
    dockerfile = (ROOT / "images" / "kubeinfer" / "Dockerfile").read_text()
    assert "devkit" not in dockerfile
