"""The simulator's HTTP side: vLLM 0.32's OpenAI-compatible API and /metrics over `model.Engine`.

A plain ASGI app (no framework): the hot path is one JSON parse per request and one pre-rendered SSE
chunk per request per engine step. An asyncio task runs the engine in real time: it schedules a step,
sleeps for the step's simulated duration, completes it and wakes the requests that got tokens.

What the bodies, errors and chunks say is :mod:`kubeinfer_devkit.sim.protocol` (after real vLLM 0.32
captures, tests/fixtures/vllm-0.32.0); the metric families are :mod:`kubeinfer_devkit.sim.metrics`.

Start one in-process (`running_sim`, e.g. several on port 0 for a benchmark), as a coroutine
(`serve_sim`), or from the command line (`kubeinfer sim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Receive, Scope, Send

from kubeinfer_devkit.asgi import Disconnected, lifespan, read_body
from kubeinfer_devkit.sim import protocol
from kubeinfer_devkit.sim.metrics import Metrics
from kubeinfer_devkit.sim.model import Engine, EngineConfig, Request
from kubeinfer_devkit.sim.protocol import DONE, HTTPError, Parsed, StreamFrame, dumps
from kubeinfer_devkit.sim.tokens import encode, output_words

log = logging.getLogger(__name__)

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class SimApp:
    """The ASGI application of one simulated vLLM server serving one model."""

    def __init__(
        self, config: EngineConfig | None = None, *, model: str = "sim", prompt_tokens_details: bool = False
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.prompt_tokens_details = prompt_tokens_details
        """Report usage.prompt_tokens_details.cached_tokens (vLLM's --enable-prompt-tokens-details)."""
        self.engine = Engine(self.config)
        self.registry = CollectorRegistry()
        self._metrics = Metrics(self.registry, self.engine, model)
        self._model_json = dumps(model)
        self._id_prefix = os.urandom(4).hex()  # ids unique across sims, then a counter: no per-request RNG
        self._waiters: dict[int, tuple[int, asyncio.Future[None]]] = {}
        """Per request id, what its handler waits for: more than this many tokens (or the end)."""
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, on_shutdown=self.aclose)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                await _send_json(send, 405, {"detail": "Method Not Allowed"})
                return
            with contextlib.suppress(Disconnected):  # gone before its body arrived: nothing to answer
                await self._generate(receive, send, chat=path == "/v1/chat/completions")
            return
        if method not in ("GET", "HEAD"):
            status = 405 if path in ("/health", "/v1/models", "/metrics") else 404
            await _send_json(send, status, {"detail": "Method Not Allowed" if status == 405 else "Not Found"})
        elif path == "/health":
            await _send(send, 200, [(b"content-length", b"0")], b"")
        elif path == "/v1/models":
            await _send_json(send, 200, self._models())
        elif path == "/metrics":
            await _send(
                send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(self.registry)
            )
        else:
            await _send_json(send, 404, {"detail": "Not Found"})

    async def aclose(self) -> None:
        """Stop the engine loop (requests still open never finish)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- inference -----------------------------------------------------------------------------------

    async def _generate(self, receive: Receive, send: Send, *, chat: bool) -> None:
        raw = await read_body(receive)
        try:
            req = protocol.parse_request(raw, chat, self.model, self.config.max_model_len)
            prompt = encode(req.pieces, self.config.block_size)
            max_tokens = protocol.fit_max_tokens(req.max_tokens, prompt.num_tokens, self.config.max_model_len)
        except HTTPError as e:
            await _send_json(send, e.status, e.body)
            return
        loop = asyncio.get_running_loop()
        wake = self._ensure_running()
        engine = self.engine
        seq = engine.add(prompt, max_tokens, loop.time())
        self._metrics.on_add(req.max_tokens)
        words = output_words(self.config.seed, prompt.digest, max_tokens)
        wake.set()
        watcher = loop.create_task(self._watch(receive, seq))
        try:
            if req.stream:
                await self._stream(send, req, seq, words)
            else:
                await self._wait(seq, max_tokens - 1)  # woken once, at the end
                if seq.finish_reason != "abort":
                    await _send_json(send, 200, self._whole(req, seq, words))
        finally:
            watcher.cancel()
            self._waiters.pop(seq.id, None)
            if not seq.finished:  # cancelled (server shutting down)
                engine.abort(seq, loop.time())
                wake.set()

    async def _wait(self, seq: Request, tokens: int) -> None:
        """Until `seq` has more than `tokens` tokens, or is finished."""
        if seq.output <= tokens and not seq.finished:
            future = asyncio.get_running_loop().create_future()
            self._waiters[seq.id] = (tokens, future)
            await future

    def _notify(self, seq: Request) -> None:
        waiter = self._waiters.pop(seq.id, None)
        if waiter is not None and not waiter[1].done():
            waiter[1].set_result(None)

    async def _watch(self, receive: Receive, seq: Request) -> None:
        """Abort the request when its client disconnects, as vLLM does."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not seq.finished:
            self.engine.abort(seq, asyncio.get_running_loop().time())
            if self._wake is not None:
                self._wake.set()
        self._notify(seq)

    def _ensure_running(self) -> asyncio.Event:
        # Started on the first request, not at lifespan startup: httpx's ASGITransport sends no lifespan.
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(self._wake))
            self._task.add_done_callback(_log_crash)
        return self._wake

    async def _run(self, wake: asyncio.Event) -> None:
        """The engine loop: schedule a step, let its simulated time pass, hand out its tokens."""
        loop = asyncio.get_running_loop()
        engine, waiters, metrics = self.engine, self._waiters, self._metrics
        while True:
            step = engine.schedule(loop.time()) if engine.has_work() else None
            if step is None:
                wake.clear()
                await wake.wait()
                continue
            # Sleep to the step's end on the clock, so time spent here does not stretch every step.
            await asyncio.sleep(max(0.0, step.start + step.duration - loop.time()))
            now = loop.time()
            engine.complete(step, now)
            for seq in step.emitted:
                waiter = waiters.get(seq.id)
                if waiter is not None and (seq.output > waiter[0] or seq.finished):
                    del waiters[seq.id]
                    if not waiter[1].done():
                        waiter[1].set_result(None)
            metrics.on_step(step, now)

    # -- bodies --------------------------------------------------------------------------------------

    def _request_id(self, seq: Request, chat: bool) -> str:
        return protocol.request_id(chat, self._id_prefix, seq.id)

    def _usage(self, seq: Request, *, null_details: bool) -> dict[str, Any]:
        return protocol.usage(seq, cached_details=self.prompt_tokens_details, null_details=null_details)

    def _whole(self, req: Parsed, seq: Request, words: list[str]) -> dict[str, Any]:
        text = " ".join(words[: seq.output])
        rid, created = self._request_id(seq, req.chat), int(time.time())
        return protocol.whole_body(
            req.chat, rid, created, self.model, text, self._usage(seq, null_details=True)
        )

    async def _stream(self, send: Send, req: Parsed, seq: Request, words: list[str]) -> None:
        # Every chunk of this stream is `head + text + tail`: render the JSON around the text once.
        rid, created = self._request_id(seq, req.chat), int(time.time())
        frame = StreamFrame.of(req.chat, rid, created, self._model_json, req.include_usage)

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        sent = 0
        while True:
            await self._wait(seq, sent)
            if seq.finish_reason == "abort":
                return
            n = seq.output
            done = seq.finished
            # Tokens that arrived while this task waited to run go out together, as vLLM's deltas do.
            chunk = frame.chunk(" ".join(words[sent:n]), sent == 0, done)
            if done:
                if req.include_usage:
                    chunk += frame.usage_chunk(self._usage(seq, null_details=False))
                chunk += DONE
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not done})
            sent = n
            if done:
                return

    def _models(self) -> dict[str, Any]:
        return protocol.models_body(self.model, self._id_prefix, int(time.time()), self.config.max_model_len)


def _log_crash(task: asyncio.Task[None]) -> None:
    # A bug in the engine loop would otherwise leave every request hanging without a word.
    if not task.cancelled() and task.exception() is not None:
        log.error("simulator engine loop crashed", exc_info=task.exception())


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    body = dumps(obj).encode()
    await _send(send, status, [*_JSON, (b"content-length", str(len(body)).encode())], body)


# --- running it -----------------------------------------------------------------------------------------


def create_app(
    config: EngineConfig | None = None,
    *,
    model: str = "sim",
    prompt_tokens_details: bool = False,
    **options: Any,
) -> SimApp:
    """A simulator app; `options` override fields of `config` (the `kubeinfer sim` flag names, e.g.
    `max_num_seqs=8, decode_ms=1`)."""
    config = dataclasses.replace(config or EngineConfig(), **options)
    return SimApp(config, model=model, prompt_tokens_details=prompt_tokens_details)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host program (several may run in one)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: SimApp, host: str = "127.0.0.1", port: int = 8000, *, handle_signals: bool = True
) -> uvicorn.Server:
    """A uvicorn server for `app`: `.run()` blocks (with uvloop when installed), `await .serve()` runs in
    the current event loop. `handle_signals=False` for servers embedded in another program."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
        proxy_headers=False, timeout_graceful_shutdown=2,
    )  # fmt: skip
    return uvicorn.Server(config) if handle_signals else _QuietServer(config)


async def serve_sim(host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Serve a simulator until the process is interrupted; `options` as for `create_app`."""
    await make_server(create_app(**options), host, port).serve()


@dataclass(frozen=True)
class RunningSim:
    app: SimApp
    server: uvicorn.Server
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234 (the OpenAI API is under /v1)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def running_sim(host: str = "127.0.0.1", port: int = 0, **options: Any) -> AsyncIterator[RunningSim]:
    """Run a simulator in the current event loop for the duration of the block. Port 0 picks a free port
    (read it from `.port` / `.url`). `options` as for `create_app`.

        async with running_sim(model="sim", max_num_seqs=64) as sim:
            ...  # talk to f"{sim.url}/v1"
    """
    app = create_app(**options)
    server = make_server(app, host, port, handle_signals=False)
    # Bind here: a busy port raises OSError to the caller instead of uvicorn's sys.exit in a task.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the simulator's server stopped while starting")
            await asyncio.sleep(0.001)
        yield RunningSim(app, server, host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()
