"""The operator's adapter sync for vLLM, against an HTTP server that answers as vLLM 0.32 does (its
bodies and error envelopes are the captures in tests/fixtures; tests/engine/test_lora_engines.py
checks them against the real engine, and the e2e tier runs this sync against it)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kubeinfer import contract
from kubeinfer.operator import adapters
from kubeinfer.operator.status import adapters_status
from kubeinfer.validation import parse_model
from tests.cases import FIXTURES, manifest

ALREADY = json.loads((FIXTURES / "vllm-0.32.0" / "load-lora-error.json").read_text())


class FakeVLLM:
    """The adapter endpoints of one vLLM replica: loaded adapters, and ranks it refuses."""

    def __init__(self, loaded: dict[str, str] | None = None, too_big: set[str] | None = None) -> None:
        self.loaded = dict(loaded or {})
        self.too_big = too_big or set()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def models(self, _: web.Request) -> web.Response:
        data = [{"id": "base", "root": "/models/weights/base", "parent": None}]
        data += [{"id": n, "root": p, "parent": "base"} for n, p in self.loaded.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        name = body["lora_name"]
        if name in self.too_big:
            msg = f"Call to add_lora method failed: Worker failed with error 'LoRA rank 64 is greater than max_lora_rank 16.' ({name})"  # noqa: E501
            return web.json_response(
                {"error": {"message": msg, "type": "InternalServerError", "code": 500}}, status=500
            )
        if name in self.loaded and not body.get("load_inplace"):
            return web.json_response(ALREADY, status=400)
        self.loaded[name] = body["lora_path"]
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        self.loaded.pop(body["lora_name"], None)
        return web.Response(text="Success")

    async def serve(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def _pod(port: int, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": f"p{port}", "annotations": {contract.ANNOTATION_PORT: str(port)}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def _model(*names: str) -> Any:
    spec = {
        "model": {"source": "hf://org/base", "servedName": "base", "cache": {}},
        "adapters": [{"name": n, "source": f"hf://org/{n}"} for n in names],
    }
    doc = manifest("m", spec)
    doc["metadata"]["namespace"] = "ml"
    return parse_model(doc)


async def test_sync_loads_missing_unloads_removed_and_reloads_a_new_revision() -> None:
    model = _model("sql", "chat")
    from kubeinfer.render.weights import adapter_path

    sql, chat = adapter_path(model, "sql"), adapter_path(model, "chat")
    # One replica is current on sql, had chat from an older revision (another path), and an adapter the
    # spec dropped; the other replica restarted and has none.
    a = FakeVLLM({"sql": str(sql), "chat": "/models/weights/old-revision", "gone": "/models/weights/gone"})
    b = FakeVLLM()
    runners = []
    try:
        pods = []
        for fake in (a, b):
            runner, port = await fake.serve()
            runners.append(runner)
            pods.append(_pod(port))
        reports = await adapters.sync(model, [*pods, _pod(1, ready=False)])
    finally:
        for r in runners:
            await r.cleanup()
    assert a.loaded == {"sql": sql, "chat": chat} and b.loaded == {"sql": sql, "chat": chat}
    assert ("load", {"lora_name": "chat", "lora_path": chat, "load_inplace": True}) in a.calls
    assert ("unload", {"lora_name": "gone"}) in a.calls
    assert not any(c[1].get("lora_name") == "sql" for c in a.calls)  # current: left alone
    assert {r.name: r.loaded_on for r in reports} == {"sql": 2, "chat": 2}
    status = adapters_status(model, reports, 2, 2)
    assert status == [{"name": "sql", "ready": True}, {"name": "chat", "ready": True}]


async def test_the_engines_refusal_is_reported_per_adapter() -> None:
    model = _model("sql", "huge")
    fake = FakeVLLM(too_big={"huge"})
    runner, port = await fake.serve()
    try:
        reports = await adapters.sync(model, [_pod(port)])
    finally:
        await runner.cleanup()
    status = {s["name"]: s for s in adapters_status(model, reports, 1, 1) or []}
    assert status["sql"]["ready"] is True
    assert status["huge"]["ready"] is False and status["huge"]["reason"] == "LoadFailed"
    assert "greater than max_lora_rank" in status["huge"]["message"]


async def test_no_ready_replica_means_not_loaded_and_an_unreachable_one_is_skipped() -> None:
    model = _model("sql")
    reports = await adapters.sync(model, [_pod(1)])  # nothing listens on port 1
    status = adapters_status(model, reports, 1, 1)
    assert status == [{"name": "sql", "ready": False, "reason": "NotLoaded",
                       "message": "no ready replica has loaded it yet"}]  # fmt: skip


def test_llama_server_adapters_are_ready_with_the_current_specs_replicas() -> None:
    doc = manifest("m", {"engine": "llama-server", "model": {"source": "org/r-GGUF:Q4_K_M"},
                         "adapters": [{"name": "x", "source": "pvc://l/x.gguf"}]})  # fmt: skip
    model = parse_model(doc)
    assert adapters_status(model, None, 1, 1) == [{"name": "x", "ready": True}]
    assert adapters_status(model, None, 1, 0)[0]["ready"] is False  # type: ignore[index]
    assert adapters_status(parse_model(manifest("m", {"model": {"source": "hf://o/r"}})), None, 1, 1) is None
