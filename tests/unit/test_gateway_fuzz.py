"""The gateway fuzzed from its own OpenAPI document (schemathesis), in front of a simulated vLLM.

The schema is loaded from the app's `GET /openapi.json`; every operation gets generated bodies that
fit the document (positive) and that break it (negative, POST operations). The replica is the real
simulator (`kubeinfer_devkit.sim`) on a local port, reached through the gateway's real aiohttp client;
the sim serves chat and completions, and canned vLLM 0.32 answers stand in for embeddings, responses
and messages (the sim has none). Every body naming a model is also sent naming the served one, so
the cases get past the model lookup to the replica.

Checks: no 5xx of the gateway's own (a 502/503/504 is tolerated only in the error envelope, and the
sim never goes away here), every 4xx/5xx body is OpenAI's error envelope (or, relayed for
/v1/messages, Anthropic's error shape), a 405 says `Allow`, the answers fit the document; and after
the run a normal chat completion still works. The examples per operation are bounded (`EXAMPLES`);
the number of requests sent is printed at the end (`-s`) and checked.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.openapi import DOCUMENT
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer_devkit.sim.server import create_app as create_sim
from kubeinfer_devkit.sim.server import make_server
from tests.cases import FIXTURES

EXAMPLES = 40  # per operation and generation mode: 5 POST operations x 2 modes x 40, plus the GETs
MODEL = "sim"
VLLM = FIXTURES / "vllm-0.32.0"
CANNED = {
    "/v1/embeddings": b'{"object":"list","data":[{"object":"embedding","embedding":[0.1,0.2],"index":0}],'
    b'"model":"sim","usage":{"prompt_tokens":1,"total_tokens":1}}',
    "/v1/responses": (VLLM / "responses.json").read_bytes().split(b"\nHTTP ")[0],
    "/v1/messages": (VLLM / "messages.json").read_bytes().split(b"\nHTTP ")[0],
}
SENT: Counter[str] = Counter()  # requests sent, per operation
STATUSES: Counter[int] = Counter()


class _Replica:
    """The simulator, plus canned answers for the APIs it does not serve."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in CANNED:
            message = await receive()
            while message.get("more_body"):
                message = await receive()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": CANNED[scope["path"]]})
            return
        await self.sim(scope, receive, send)


@pytest.fixture(scope="module")
def replica() -> Iterator[str]:
    """A simulator on a free local port, in a thread with its own event loop: its address."""
    fast = {
        "decode_ms": 0.0,
        "decode_ms_per_seq": 0.0,
        "prefill_overhead_ms": 0.0,
        "prefill_ms_per_token": 0.0,
    }
    sim = create_sim(model=MODEL, max_model_len=512, num_blocks=64, **fast)
    server = make_server(_Replica(sim), "127.0.0.1", 0, handle_signals=False)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the simulator did not start"
        time.sleep(0.01)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def schema(replica: str) -> Iterator[Any]:
    reg = Registry()
    entry = ModelEntry(name=MODEL, served_name=MODEL, modalities=("text", "image"))
    reg.set_model(entry, [Endpoint(id="sim-0", address=replica, model=MODEL)])
    # The real aiohttp client; short waits, since a bad case must not hold the run.
    app = create_app(reg, GatewaySettings(hold_timeout=2.0, scrape_interval=3600, read_timeout=30))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield loaded
    from schemathesis.python import asgi  # the app's lifespan was started once for the whole run

    asgi.shutdown_lifespans()


def _is_openai_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
    )


def _is_anthropic_error(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return body.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("message"), str)


def _check(case: Any, response: Any) -> None:
    path, status = case.operation.path, response.status_code
    SENT[f"{case.method} {path}"] += 1
    STATUSES[status] += 1
    where = f"{case.method} {path} -> {status}: {response.text[:300]!r}\nbody sent: {str(case.body)[:300]}"
    if status >= 400:
        body = response.json()
        assert _is_openai_error(body) or (path == "/v1/messages" and _is_anthropic_error(body)), where
    if status >= 500:
        # Only an upstream that is unavailable excuses a 5xx, and then in the envelope (checked above).
        assert status in (502, 503, 504), where
    if status == 405:
        assert response.headers.get("allow"), where
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


def _run(case: Any) -> None:
    _check(case, case.call())
    if (
        isinstance(case.body, dict)
        and isinstance(case.body.get("model"), str)
        and case.body["model"] != MODEL
    ):
        case.body = {**case.body, "model": MODEL}  # past the model lookup, to the replica
        _check(case, case.call())


OPERATIONS = [(path, method.upper()) for path, ops in DOCUMENT["paths"].items() for method in ops]
MODES = [
    (path, method, mode)
    for path, method in OPERATIONS
    for mode in (
        [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "POST" else [GenerationMode.POSITIVE]
    )
]


@pytest.mark.parametrize(("path", "method", "mode"), MODES, ids=[f"{m} {p} {g.value}" for p, m, g in MODES])
def test_fuzz(schema: Any, path: str, method: str, mode: GenerationMode) -> None:
    operation = schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        _run(case)

    fuzz()


def test_gateway_still_serves_after_the_fuzz(schema: Any) -> None:
    total = sum(SENT.values())
    statuses = dict(sorted(STATUSES.items()))
    print(f"\nschemathesis: {total} requests over {len(SENT)} operations; statuses {statuses}")
    assert total >= 200, SENT
    case = schema["/v1/chat/completions"]["POST"].Case(
        body={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}
    )
    response = case.call()
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
