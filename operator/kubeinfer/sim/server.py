"""The simulator's HTTP side: vLLM 0.32's OpenAI-compatible API and /metrics over `model.Engine`.

A plain ASGI app (no framework): the hot path is one JSON parse per request and one pre-rendered SSE
chunk per request per engine step. An asyncio task runs the engine in real time: it schedules a step,
sleeps for the step's simulated duration, completes it and wakes the requests that got tokens.

Response bodies, errors and metric names follow real vLLM 0.32 captures (tests/fixtures/vllm-0.32.0).

Start one in-process (`running_sim`, e.g. several on port 0 for a benchmark), as a coroutine
(`serve_sim`), or from the command line (`kubeinfer sim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring  # the C string quoter
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from starlette.types import Receive, Scope, Send

from kubeinfer.sim.model import (
    Engine,
    EngineConfig,
    Request,
    Step,
    chat_pieces,
    encode,
    output_words,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
"""Output length when a request sets no max_tokens (vLLM would fill the context: too slow to be useful)."""

KV_BYTES_PER_TOKEN = 131072
"""Llama-3-8B in fp16: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes; for cache_config_info."""

SYSTEM_FINGERPRINT = "kubeinfer-sim"

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = "data: [DONE]\n\n"
# What follows a stream chunk's text (chat, completion), as vLLM renders it: (more to come, last chunk).
_CHOICE_TAILS = {
    True: (
        '},"logprobs":null,"finish_reason":null,"token_ids":null}]',
        '},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]',
    ),
    False: (
        ',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]',
        ',"logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]',
    ),
}
# A chat stream's first chunk: the role, sent with the first token.
_ROLE_CHOICES = (
    '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    '"prompt_token_ids":null,"prompt_text":null}'
)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _HTTPError(Exception):
    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status, self.body = status, body


def _error(
    status: int, message: str, kind: str = "BadRequestError", param: str | None = None, value: Any = None
) -> _HTTPError:
    """vLLM's error envelope; `value`: a parameter check's, which vLLM appends to the message."""
    if value is not None:
        message += f" (parameter={param}, value={value})"
    return _HTTPError(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})


class _Disconnected(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Parsed:
    chat: bool
    pieces: list[str]
    max_tokens: int
    """As requested (the engine may get fewer, to fit the context)."""
    stream: bool
    include_usage: bool


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
        self._metrics = _Metrics(self.registry, self.engine, model)
        self._model_json = _dumps(model)
        self._id_prefix = os.urandom(4).hex()  # ids unique across sims, then a counter: no per-request RNG
        self._waiters: dict[int, tuple[int, asyncio.Future[None]]] = {}
        """Per request id, what its handler waits for: more than this many tokens (or the end)."""
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                await _send_json(send, 405, {"detail": "Method Not Allowed"})
                return
            with contextlib.suppress(_Disconnected):  # gone before its body arrived: nothing to answer
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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        """Stop the engine loop (requests still open never finish)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- inference -----------------------------------------------------------------------------------

    async def _generate(self, receive: Receive, send: Send, *, chat: bool) -> None:
        raw = await _read_body(receive)
        try:
            req = self._parse(raw, chat)
            prompt = encode(req.pieces, self.config.block_size)
            max_tokens = self._max_tokens(req, prompt.num_tokens)
        except _HTTPError as e:
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

    def _parse(self, raw: bytes, chat: bool) -> _Parsed:
        try:
            body = json.loads(raw)
        except ValueError as e:
            pos = getattr(e, "pos", 0)
            msg = getattr(e, "msg", str(e))
            detail = (
                f"{{'type': 'json_invalid', 'loc': 'body.{pos}', 'msg': 'JSON decode error', "
                f"'input': '<dict of 0 items>', 'ctx': {{'error': '{msg}'}}}}"
            )
            raise _error(400, f"1 validation error:\n  {detail}", "Bad Request", f"body.{pos}") from None
        if not isinstance(body, dict):
            raise _error(400, "the request body must be a JSON object", param="body")
        model = body.get("model")
        if model is not None and model != self.model:
            raise _error(
                404,
                f"The model `{model}` does not exist. Valid aliases: {self.model}.",
                "NotFoundError",
                "model",
            )
        if body.get("n") not in (None, 1):
            raise _error(400, "the simulator supports n=1 only", param="n")
        pieces = chat_pieces(_messages(body.get("messages"))) if chat else [_prompt(body.get("prompt"))]
        name = "max_tokens"
        if chat and body.get("max_completion_tokens") is not None:
            name = "max_completion_tokens"
        value = body.get(name)
        if value is None:
            value = DEFAULT_MAX_TOKENS
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _error(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
        elif value > self.config.max_model_len:
            raise _error(
                400,
                f"{name}={value} cannot be greater than max_model_len={self.config.max_model_len}. "
                f"Please request fewer output tokens.",
                param=name,
                value=value,
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return _Parsed(chat, pieces, value, body.get("stream") is True, include_usage)

    def _max_tokens(self, req: _Parsed, prompt_tokens: int) -> int:
        limit = self.config.max_model_len
        if prompt_tokens >= limit:
            raise _error(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt.",
                param="input_tokens",
                value=prompt_tokens,
            )
        return min(req.max_tokens, limit - prompt_tokens)  # vLLM shortens the output to fit

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
        return f"{'chatcmpl' if chat else 'cmpl'}-{self._id_prefix}{seq.id:08x}"

    def _usage(self, seq: Request, *, null_details: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": seq.num_prompt,
            "total_tokens": seq.num_prompt + seq.output,
            "completion_tokens": seq.output,
        }
        if self.prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": seq.cached_tokens or 0}
        elif null_details:
            usage["prompt_tokens_details"] = None
        if null_details:
            usage["completion_tokens_details"] = None
        return usage

    def _whole(self, req: _Parsed, seq: Request, words: list[str]) -> dict[str, Any]:
        text = " ".join(words[: seq.output])
        rid, created = self._request_id(seq, req.chat), int(time.time())
        usage = self._usage(seq, null_details=True)
        if req.chat:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                       "audio": None, "function_call": None, "reasoning": None}  # fmt: skip
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "token_ids": None, "routed_experts": None}],
                "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
                "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
            }  # fmt: skip
        return {
            "id": rid, "object": "text_completion", "created": created, "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                         "prompt_token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }  # fmt: skip

    async def _stream(self, send: Send, req: _Parsed, seq: Request, words: list[str]) -> None:
        # Every chunk of this stream is `head + text + tail`: render the JSON around the text once.
        rid, created = self._request_id(seq, req.chat), int(time.time())
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        top = f'{{"id":"{rid}","object":"{obj}","created":{created},"model":{self._model_json},"choices":'
        fingerprint = "" if req.include_usage else f',"system_fingerprint":"{SYSTEM_FINGERPRINT}"'
        mid, end = _CHOICE_TAILS[req.chat]
        head = f'data: {top}[{{"index":0,' + ('"delta":{"content":' if req.chat else '"text":')
        tail, last = mid + "}\n\n", end + fingerprint + "}\n\n"
        role = f"data: {top}{_ROLE_CHOICES}\n\n" if req.chat else ""

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        sent = 0
        while True:
            await self._wait(seq, sent)
            if seq.finish_reason == "abort":
                return
            n = seq.output
            done = seq.finished
            # Tokens that arrived while this task waited to run go out together, as vLLM's deltas do.
            text = " ".join(words[sent:n])
            chunk = head + encode_basestring(" " + text if sent else text) + (last if done else tail)
            if sent == 0:
                chunk = role + chunk
            if done:
                if req.include_usage:
                    usage = _dumps(self._usage(seq, null_details=False))
                    chunk += (
                        f'data: {top}[],"usage":{usage},"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n'
                    )
                chunk += _DONE
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not done})
            sent = n
            if done:
                return

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        permission = {
            "id": f"modelperm-{self._id_prefix}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }  # fmt: skip
        card = {
            "id": self.model, "object": "model", "created": created, "owned_by": "vllm", "root": self.model,
            "parent": None, "max_model_len": self.config.max_model_len, "permission": [permission],
        }  # fmt: skip
        return {"object": "list", "data": [card]}


def _log_crash(task: asyncio.Task[None]) -> None:
    # A bug in the engine loop would otherwise leave every request hanging without a word.
    if not task.cancelled() and task.exception() is not None:
        log.error("simulator engine loop crashed", exc_info=task.exception())


def _messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _error(400, "messages must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _error(400, "each message must be an object with a role", param="messages")
        out.append((m["role"], _text(m.get("content"))))
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text as text, anything else as its JSON
        return "\n".join(
            p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else _dumps(p)
            for p in content
        )
    raise _error(400, "message content must be a string or a list of parts", param="messages")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt))  # token ids: one token each
    raise _error(
        400, "prompt must be a string, a list of token ids, or a list of one of them", param="prompt"
    )


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    body = _dumps(obj).encode()
    await _send(send, status, [*_JSON, (b"content-length", str(len(body)).encode())], body)


# --- metrics --------------------------------------------------------------------------------------------

_LABELS = ["engine", "model_name"]  # sorted, as vLLM's exposition prints them

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)


def _one_two_five(limit: int) -> list[float]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


_HELP = {  # vLLM 0.32's HELP texts
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_waiting_by_reason": "Number of waiting requests by reason. Reason labels: "
    "'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA "
    "budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:prompt_tokens_by_source": "Number of prompt tokens by source.",
    "vllm:prompt_tokens_cached": "Number of cached prompt tokens (local + external).",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "vllm:cache_config_info": "Information of the LLMEngine CacheConfig",
}


class _EngineCollector(Collector):
    """Gauges and counters read off the engine at scrape time: nothing to update on the hot path."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model
        self.created = time.time()

    def collect(self) -> Iterable[Metric]:
        e, lv, created = self.engine, ["0", self.model], self.created
        cfg = e.config
        gauges = (
            ("vllm:num_requests_running", e.num_running),
            ("vllm:num_requests_waiting", e.num_waiting),
            ("vllm:kv_cache_usage_perc", e.kv_usage()),
        )
        for name, value in gauges:
            family = GaugeMetricFamily(name, _HELP[name], labels=_LABELS)
            family.add_metric(lv, value)
            yield family
        name = "vllm:num_requests_waiting_by_reason"
        family = GaugeMetricFamily(name, _HELP[name], labels=[*_LABELS, "reason"])
        family.add_metric([*lv, "capacity"], e.num_waiting)
        family.add_metric([*lv, "deferred"], 0)
        yield family
        counters = (
            ("vllm:prefix_cache_queries", e.prefix_queries),
            ("vllm:prefix_cache_hits", e.prefix_hits),
            ("vllm:num_preemptions", e.preemptions),
            ("vllm:prompt_tokens", e.prompt_tokens),
            ("vllm:prompt_tokens_cached", e.prompt_tokens_cached),
            ("vllm:generation_tokens", e.generation_tokens),
        )
        for name, value in counters:
            counter = CounterMetricFamily(name, _HELP[name], labels=_LABELS)
            counter.add_metric(lv, value, created=created)
            yield counter
        name = "vllm:prompt_tokens_by_source"
        counter = CounterMetricFamily(name, _HELP[name], labels=[*_LABELS, "source"])
        computed = e.prompt_tokens - e.prompt_tokens_cached
        for source, value in (("local_compute", computed), ("local_cache_hit", e.prompt_tokens_cached),
                              ("external_kv_transfer", 0)):  # fmt: skip
            counter.add_metric([*lv, source], value, created=created)
        yield counter
        name = "vllm:request_success"
        counter = CounterMetricFamily(name, _HELP[name], labels=["engine", "finished_reason", "model_name"])
        for reason, value in e.finished.items():
            counter.add_metric(["0", reason, self.model], value, created=created)
        yield counter
        # vLLM's info gauge carries no model_name, only engine.
        info = {
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "is_attention_free": "False",
            "kv_cache_memory_bytes": str(cfg.num_blocks * cfg.block_size * KV_BYTES_PER_TOKEN),
            "kv_cache_size_tokens": str(cfg.num_blocks * cfg.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_blocks),
            "sliding_window": "None",
        }
        family = GaugeMetricFamily(
            "vllm:cache_config_info", _HELP["vllm:cache_config_info"], labels=list(info)
        )
        family.add_metric(list(info.values()), 1.0)
        yield family


# Histograms: key, name, HELP (vLLM's), buckets ("tokens": 1-2-5 steps up to max_model_len, as vLLM's).
_HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...] | str], ...] = (
    ("prompt", "vllm:request_prompt_tokens", "Number of prefill tokens processed.", "tokens"),
    ("generation", "vllm:request_generation_tokens", "Number of generation tokens processed.", "tokens"),
    ("iteration", "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
     _ITERATION_BUCKETS),
    ("max_generation", "vllm:request_max_num_generation_tokens",
     "Histogram of maximum number of requested generation tokens.", "tokens"),
    ("max_tokens", "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
     "tokens"),
    ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
     _TTFT_BUCKETS),
    ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS),
    ("tpot", "vllm:request_time_per_output_token_seconds",
     "Histogram of time_per_output_token_seconds per request.", _ITL_BUCKETS),
    ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
     _LATENCY_BUCKETS),
    ("queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
     _LATENCY_BUCKETS),
    ("inference", "vllm:request_inference_time_seconds",
     "Histogram of time spent in RUNNING phase for request.", _LATENCY_BUCKETS),
    ("prefill", "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
     _LATENCY_BUCKETS),
    ("decode", "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
     _LATENCY_BUCKETS),
    ("preemptions", "vllm:request_num_preemptions",
     "Histogram of the number of times a request was preempted.", _PREEMPTION_BUCKETS),
    ("kv_computed", "vllm:request_prefill_kv_computed_tokens",
     "Histogram of new KV tokens computed during prefill (excluding cached tokens).", "tokens"),
)  # fmt: skip


class _Histogram:
    """A histogram without labels or locks: the engine loop is its only writer, and observing one is a
    bisect and two additions (prometheus_client's Histogram costs several times that, once per token)."""

    __slots__ = ("bounds", "counts", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le` is inclusive: bisect_left
        self.sum += value

    def family(self, labels: list[str], values: list[str], created: float) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=labels)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        family.add_metric(values, buckets, self.sum)
        # The `_created` sample, which prometheus_client renders as a gauge of its own, as vLLM's has.
        family.samples.append(Sample(f"{self.name}_created", dict(zip(labels, values, strict=True)), created))
        return family


class _Metrics(Collector):
    """vLLM's metric families, read at scrape time from the engine's counters and these histograms."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, model: str) -> None:
        registry.register(_EngineCollector(engine, model))
        self.model, self.created = model, time.time()
        tokens = tuple(_one_two_five(engine.config.max_model_len))
        self.h = {
            key: _Histogram(name, doc, tokens if bounds == "tokens" else tuple(map(float, bounds)))
            for key, name, doc, bounds in _HISTOGRAMS
        }
        self.ttft, self.itl, self.iteration = self.h["ttft"], self.h["itl"], self.h["iteration"]
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        for hist in self.h.values():
            yield hist.family(_LABELS, ["0", self.model], self.created)

    def on_add(self, requested_max_tokens: int) -> None:
        self.h["max_tokens"].observe(requested_max_tokens)
        self.h["max_generation"].observe(requested_max_tokens)

    def on_step(self, step: Step, now: float) -> None:
        self.iteration.observe(step.num_tokens)
        ttft, itl = self.ttft, self.itl
        for seq in step.emitted:
            if seq.output == 1:
                ttft.observe(now - seq.arrival)
            elif seq.prev_token_at is not None:
                itl.observe(now - seq.prev_token_at)
        h = self.h
        for seq in step.finished:
            first = seq.first_token_at if seq.first_token_at is not None else now
            scheduled = seq.scheduled_at if seq.scheduled_at is not None else seq.arrival
            h["prompt"].observe(seq.num_prompt)
            h["generation"].observe(seq.output)
            h["e2e"].observe(now - seq.arrival)
            h["queue"].observe(scheduled - seq.arrival)
            h["inference"].observe(now - scheduled)
            h["prefill"].observe(first - scheduled)
            h["decode"].observe(now - first)
            if seq.output > 1:
                h["tpot"].observe((now - first) / (seq.output - 1))
            h["preemptions"].observe(seq.preemptions)
            h["kv_computed"].observe(seq.prefill_computed)


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
