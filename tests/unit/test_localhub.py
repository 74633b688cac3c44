"""The local stack's Hub (kubeinfer_devkit.devcluster.localhub) and the node agent's mapping of the paths
an engine gets: comma-separated lists on the command line, vLLM's LoRA paths at run time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kubeinfer.render.config import load_config
from kubeinfer_devkit.devcluster import localhub
from kubeinfer_devkit.devcluster.podplan import MOUNT_SHIM, Runtime, path_mapper
from kubeinfer_devkit.hub.server import HubServer

MOUNTS = [("/models/weights", "/data/weights"), ("/models/pvc/m", "/data/m")]


def test_comma_separated_paths_are_mapped_each() -> None:
    m = path_mapper(MOUNTS)
    # llama-server's --lora-scaled FILE:SCALE,FILE:SCALE (render/engines.py)
    assert m("/models/weights/a/model.gguf:0,/models/weights/b/model.gguf:0") == (
        "/data/weights/a/model.gguf:0,/data/weights/b/model.gguf:0"
    )
    assert (
        m("--lora=/models/pvc/m/x.gguf,/models/weights/y.gguf")
        == "--lora=/data/m/x.gguf,/data/weights/y.gguf"
    )
    assert m("/elsewhere/a,/models/weights/b") == "/elsewhere/a,/data/weights/b"


def test_vllm_processes_get_the_mount_shim(tmp_path: Path) -> None:
    rt = Runtime(load_config(), None, python="/venv/bin/python")
    rt._vllm = True
    container = {"name": "engine", "image": "vllm/vllm-openai:v0.32.0", "command": ["vllm", "serve"],
                 "args": ["/models/weights/k", "--port", "8000"]}  # fmt: skip
    launch = rt.launch(container, "127.0.0.20", MOUNTS, {"PYTHONPATH": "/x"})
    assert launch.env["PYTHONPATH"] == f"{MOUNT_SHIM}{os.pathsep}/x"
    assert json.loads(launch.env["KUBEINFER_NODE_MOUNTS"]) == [list(m) for m in MOUNTS]
    assert (MOUNT_SHIM / "sitecustomize.py").is_file()


def test_the_shim_maps_vllms_lora_paths(tmp_path: Path) -> None:
    """A stand-in for vllm.lora.worker_manager: its get_adapter_absolute_path sees local paths."""
    pkg = tmp_path / "vllm" / "lora"
    pkg.mkdir(parents=True)
    (tmp_path / "vllm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "worker_manager.py").write_text("def get_adapter_absolute_path(p):\n    return 'resolved:' + p\n")
    probe = (
        "from vllm.lora import worker_manager as w; "
        "print(w.get_adapter_absolute_path('/models/weights/k/a'), w.get_adapter_absolute_path('/other/b'))"
    )
    env = {**os.environ, "PYTHONPATH": f"{MOUNT_SHIM}{os.pathsep}{tmp_path}",
           "KUBEINFER_NODE_MOUNTS": json.dumps(MOUNTS)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["resolved:/data/weights/k/a", "resolved:/other/b"]
    env.pop("KUBEINFER_NODE_MOUNTS")  # without the variable: nothing changes
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["resolved:/models/weights/k/a", "resolved:/other/b"]


def test_f16_copy_of_a_gguf(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(src, arch="llama")
    w.add_block_count(1)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    dst = localhub.gguf_to_f16(src, tmp_path / "m-F16.gguf")
    r = gguf.GGUFReader(dst)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert r.fields["llama.block_count"].contents() == 1
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types == {"token_embd.weight": gguf.GGMLQuantizationType.F16,
                     "output_norm.weight": gguf.GGMLQuantizationType.F32}  # fmt: skip
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert np.array_equal(np.asarray(embd.data, dtype=np.float32).reshape(3, 4), np.arange(12).reshape(3, 4))


def test_repositories_need_their_models(tmp_path: Path) -> None:
    said: list[str] = []
    assert localhub.build(tmp_path / "hub", tmp_path / "models", say=said.append) == []
    assert len(said) == 6 and all("is missing" in s for s in said), said
    assert not (tmp_path / "hub" / localhub.ORG).exists()


def test_a_built_repository_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_peft(seed: int) -> object:
        def build(hf: Path, out: Path) -> None:
            if seed == 2:
                raise ValueError("no adapter today")
            (out / "adapter_config.json").write_text("{}")

        return build

    monkeypatch.setattr(localhub, "_peft_repo", fake_peft)  # no torch in the unit tier
    llama = tmp_path / "models" / localhub.TINY_HF
    llama.mkdir(parents=True)
    (llama / "config.json").write_text("{}")
    (llama / "model.safetensors").write_bytes(b"w")
    said: list[str] = []
    built = localhub.build(tmp_path / "hub", tmp_path / "models", say=said.append)
    assert built == [f"{localhub.ORG}/tiny-llama", f"{localhub.ORG}/tiny-llama-lora-a"]
    assert "hub: not building kubeinfer-local/tiny-llama-lora-b: ValueError: no adapter today" in said
    repo = tmp_path / "hub" / localhub.ORG / "tiny-llama"
    assert sorted(p.name for p in repo.iterdir()) == ["config.json", "model.safetensors"]
    assert os.stat(repo / "model.safetensors").st_ino == os.stat(llama / "model.safetensors").st_ino  # linked
    assert f"{localhub.ORG}/tiny-llama" not in localhub.build(
        tmp_path / "hub", tmp_path / "models", say=said.append
    )
    assert not (tmp_path / "hub" / localhub.STAGING).exists()


async def test_the_hub_reports_every_request(tmp_path: Path) -> None:
    repo = tmp_path / localhub.ORG / "gated"
    repo.mkdir(parents=True)
    (repo / "a.txt").write_text("hello")
    (repo / localhub.GATED_MARKER).write_text("")
    seen: list[tuple[str, str, int, bool]] = []
    async with HubServer(tmp_path, token=localhub.TOKEN) as hub:
        hub.on_request = lambda *a: seen.append(a)
        async with httpx.AsyncClient(base_url=hub.url) as http:
            await http.get(f"/{localhub.ORG}/gated/resolve/main/a.txt")
            auth = {"Authorization": f"Bearer {localhub.TOKEN}"}
            assert (await http.get(f"/{localhub.ORG}/gated/resolve/main/a.txt", headers=auth)).text == "hello"
    path = f"/{localhub.ORG}/gated/resolve/main/a.txt"
    assert seen == [("GET", path, 401, False), ("GET", path, 200, True)]
