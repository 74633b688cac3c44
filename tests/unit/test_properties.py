"""Bad input as a tested property: the gateway's pure functions on generated input (hypothesis).

Each property says what a function does with *any* input of its type (arbitrary text, bytes, JSON),
not only with the captures and hand-picked cases of the other unit tests: it answers, or it raises
the one error its caller handles (`ScrapeError`, `TranslationError`, `ValueError`), never a stray
KeyError/TypeError/AttributeError/OverflowError. Where the input is well formed, the properties
check what the answer must keep (numbers summed, text and settings carried over, usage read).

Example counts are kept small enough for the whole file to run in seconds on a 2-core CI machine;
no example database is written (`database=None`), and no deadline is set (shared machines are noisy).
"""

from __future__ import annotations

import copy
import json
import math
import re
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from kubeinfer.gateway import usage as usage_module
from kubeinfer.gateway import validate
from kubeinfer.gateway.request import parse_duration
from kubeinfer.gateway.scrape import ReplicaStats, ScrapeError, parse_metrics, prefix_hit_rate
from kubeinfer.gateway.translate.common import TranslationError
from kubeinfer.gateway.translate.messages import ChatToMessagesStream, chat_to_messages, messages_to_chat
from kubeinfer.gateway.translate.responses import ChatToResponsesStream, chat_to_responses, responses_to_chat
from kubeinfer.gateway.usage import (
    USAGE_PATHS,
    SSEUsage,
    Usage,
    prepare_stream_request,
    stream_request_bytes,
    usage_from_dict,
    usage_from_json,
)
from tests.cases import FIXTURES


def fast(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------------
# Strategies: JSON values that go near the fields the code looks at
# ---------------------------------------------------------------------------------------------------

KEYS = st.sampled_from([
    "model", "messages", "input", "role", "content", "type", "text", "source", "media_type", "data",
    "url", "image_url", "file_id", "detail", "system", "instructions", "usage", "prompt_tokens",
    "completion_tokens", "input_tokens", "output_tokens", "prompt_tokens_details", "cached_tokens",
    "choices", "message", "delta", "finish_reason", "stop_reason", "id", "created", "response",
    "stream", "stream_options", "include_usage", "max_tokens", "format", "effort", "error", "object",
]) | st.text(max_size=8)  # fmt: skip
WORDS = st.sampled_from([
    "user", "assistant", "system", "developer", "tool", "text", "image", "image_url", "input_text",
    "output_text", "input_image", "message", "base64", "url", "auto", "none", "json_object",
    "json_schema", "low", "response.completed", "message_start", "message_delta", "length", "stop",
    "error", "[DONE]",
])  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities included: json.loads reads them
    | st.text(max_size=12)
    | WORDS
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12,
)
JSON_OBJECTS = st.dictionaries(KEYS, JSON_VALUES, max_size=6)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` five times in six, else any JSON value in its place."""
    return st.one_of(valid, valid, valid, valid, valid, JSON_VALUES)


# ---------------------------------------------------------------------------------------------------
# 1. Scrape: /metrics text -> ReplicaStats, or ScrapeError
# ---------------------------------------------------------------------------------------------------

CAPTURES = [
    (FIXTURES / name).read_text()
    for name in (
        "vllm-0.32.0/metrics_idle.txt",
        "vllm-0.32.0/metrics_under_load.txt",
        "vllm-0.32.0/metrics_after_prefix_hits.txt",
        "llama-server/metrics_idle.txt",
        "llama-server/metrics_under_load.txt",
    )
]
METRIC_NAMES = st.sampled_from([
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:cache_config_info", "llamacpp:requests_processing",
    "llamacpp:requests_deferred", "llamacpp:kv_cache_usage_ratio", "llamacpp:prompt_tokens_total",
    "llamacpp:prompt_tokens_cached_total", "llamacpp:tokens_predicted_total", "process_cpu_seconds_total",
]) | st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,12}", fullmatch=True)  # fmt: skip
SAMPLE_VALUES = (
    st.sampled_from(["+Inf", "-Inf", "NaN", "1e308", "-0", "0x10", "1_000", ""])
    | st.floats().map(repr)
    | st.integers(-(10**20), 10**20).map(str)
)
LABEL_VALUES = st.sampled_from(["128", "None", "-5", "1073741824", "x", ""]) | st.text(
    st.characters(exclude_characters='"\\\n'), max_size=6
)
LABELS = st.dictionaries(
    st.sampled_from(["engine", "block_size", "kv_cache_memory_bytes", "le", "model_name"]),
    LABEL_VALUES,
    max_size=3,
).map(lambda d: "{" + ",".join(f'{k}="{v}"' for k, v in d.items()) + "}" if d else "")
PROM_LINES = st.one_of(
    st.tuples(METRIC_NAMES, LABELS, SAMPLE_VALUES).map(lambda t: f"{t[0]}{t[1]} {t[2]}"),
    st.tuples(
        METRIC_NAMES, st.sampled_from(["counter", "gauge", "histogram", "untyped", "info", "bogus"])
    ).map(lambda t: f"# TYPE {t[0].removesuffix('_total')} {t[1]}"),
    st.text(max_size=30).map(lambda s: f"# HELP x {s}"),
    st.text(max_size=30),
)


def assert_sane(stats: ReplicaStats) -> None:
    assert stats.engine in ("vllm", "llama-server")
    assert type(stats.running) is int and stats.running >= 0
    assert type(stats.waiting) is int and stats.waiting >= 0
    assert stats.kv_cache_usage is None or 0.0 <= stats.kv_cache_usage <= 1.0  # so also finite, not NaN
    for count in (
        stats.prefix_cache_queries,
        stats.prefix_cache_hits,
        stats.prompt_tokens_total,
        stats.generation_tokens_total,
    ):
        assert count is None or (type(count) is int and count >= 0)
    assert stats.block_size is None or type(stats.block_size) is int
    assert stats.kv_cache_bytes is None or type(stats.kv_cache_bytes) is int


def parse_or_refuse(text: str, engine: Any = None) -> ReplicaStats | None:
    """parse_metrics' whole contract: sane stats, or ScrapeError (anything else fails the test)."""
    try:
        stats = parse_metrics(text, engine)
    except ScrapeError:
        event("refused")
        return None
    event("parsed")
    assert_sane(stats)
    return stats


@fast(200)
@given(st.text(), st.sampled_from([None, "vllm", "llama-server"]))
def test_parse_metrics_on_arbitrary_text(text: str, engine: Any) -> None:
    parse_or_refuse(text, engine)


@fast(200)
@example(["vllm:num_requests_running +Inf", "vllm:num_requests_waiting 0"])
@example(["vllm:num_requests_running 1e308", 'vllm:num_requests_running{engine="1"} 1e308',
          "vllm:num_requests_waiting 0"])  # fmt: skip
@example(["llamacpp:requests_processing -1", "llamacpp:requests_deferred 0"])
@example(["vllm:num_requests_running 1", "vllm:num_requests_waiting 0", "vllm:prompt_tokens_total -5"])
@given(st.lists(PROM_LINES, max_size=12))
def test_parse_metrics_on_prometheus_like_lines(lines: list[str]) -> None:
    parse_or_refuse("\n".join(lines) + "\n")


LOAD_GAUGES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "llama-server": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}


GAUGE_VALUES = st.integers(0, 10**6).map(str) | SAMPLE_VALUES
SAMPLES = st.tuples(METRIC_NAMES, LABELS, GAUGE_VALUES).map(lambda t: f"{t[0]}{t[1]} {t[2]}")


@fast(150)
@given(st.sampled_from(list(LOAD_GAUGES)), GAUGE_VALUES, GAUGE_VALUES, st.lists(SAMPLES, max_size=10),
       st.randoms(use_true_random=False))  # fmt: skip
def test_parse_metrics_with_load_gauges_and_noise(
    engine: str, running: str, waiting: str, noise: list[str], rnd: Any
) -> None:
    """The gauges a scrape needs, with any values, among other lines: parsed sanely or refused."""
    lines = [f"{LOAD_GAUGES[engine][0]} {running}", f"{LOAD_GAUGES[engine][1]} {waiting}", *noise]
    rnd.shuffle(lines)
    parse_or_refuse("\n".join(lines) + "\n", rnd.choice([None, engine]))


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["delete", "duplicate", "swap", "char", "insert", "truncate"]),
        st.integers(min_value=0, max_value=10**6),
        PROM_LINES,
    ),
    min_size=1,
    max_size=4,
)


def mutate(text: str, mutations: list[tuple[str, int, str]]) -> str:
    lines = text.split("\n")
    for op, at, new in mutations:
        i = at % len(lines)
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            lines[i], lines[-1 - i] = lines[-1 - i], lines[i]
        elif op == "char" and lines[i]:
            j = at % len(lines[i])
            lines[i] = lines[i][:j] + (new[:1] or " ") + lines[i][j + 1 :]
        elif op == "insert":
            lines.insert(i, new)
        elif op == "truncate":
            lines = lines[: i + 1]
            lines[-1] = lines[-1][: at % (len(lines[-1]) + 1)]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@fast(80)
@given(st.sampled_from(range(len(CAPTURES))), MUTATIONS)
def test_parse_metrics_on_mutated_captures(capture: int, mutations: list[tuple[str, int, str]]) -> None:
    parse_or_refuse(mutate(CAPTURES[capture], mutations))


@st.composite
def exposition(draw: st.DrawFn) -> tuple[str, dict[str, int], list[float]]:
    """Well-formed vLLM /metrics with known totals, the series spread over `engine` labels."""
    engines = draw(st.integers(min_value=1, max_value=3))
    counts = {
        name: [draw(st.integers(min_value=0, max_value=10**9)) for _ in range(engines)]
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:prefix_cache_queries_total",
            "vllm:prompt_tokens_total",
        )
    }
    counts["vllm:prefix_cache_hits_total"] = [
        draw(st.integers(min_value=0, max_value=q)) for q in counts["vllm:prefix_cache_queries_total"]
    ]
    usage = [draw(st.floats(min_value=0, max_value=1)) for _ in range(engines)]
    typed = draw(st.booleans())
    lines = []
    for name, values in [*counts.items(), ("vllm:kv_cache_usage_perc", usage)]:
        if typed:
            kind = "counter" if name.endswith("_total") else "gauge"
            lines.append(f"# TYPE {name.removesuffix('_total')} {kind}")
        for engine, value in enumerate(values):
            text = (
                draw(st.sampled_from([str(value), f"{float(value)!r}"]))
                if isinstance(value, int)
                else repr(value)
            )
            lines.append(f'{name}{{engine="{engine}",model_name="m"}} {text}')
    if not typed:  # untyped series may come in any order
        draw(st.randoms()).shuffle(lines)
    return "\n".join(lines) + "\n", {k: sum(v) for k, v in counts.items()}, usage


@fast(100)
@given(exposition())
def test_parse_metrics_sums_what_it_is_given(case: tuple[str, dict[str, int], list[float]]) -> None:
    text, totals, usage = case
    stats = parse_or_refuse(text)
    assert stats is not None and stats == parse_metrics(text, "vllm")
    assert stats.engine == "vllm"
    assert stats.running == totals["vllm:num_requests_running"]
    assert stats.waiting == totals["vllm:num_requests_waiting"]
    assert stats.prefix_cache_queries == totals["vllm:prefix_cache_queries_total"]
    assert stats.prefix_cache_hits == totals["vllm:prefix_cache_hits_total"]
    assert stats.prompt_tokens_total == totals["vllm:prompt_tokens_total"]
    assert stats.kv_cache_usage == pytest.approx(sum(usage) / len(usage))
    rate = prefix_hit_rate(ReplicaStats("vllm", 0, 0, prefix_cache_queries=0, prefix_cache_hits=0), stats)
    if stats.prefix_cache_queries:
        assert rate == pytest.approx(stats.prefix_cache_hits / stats.prefix_cache_queries)
    else:
        assert rate is None


COUNTS = st.none() | st.integers(min_value=-(10**12), max_value=10**12)


@fast(200)
@given(COUNTS, COUNTS, COUNTS, COUNTS)
def test_prefix_hit_rate_is_a_fraction_or_none(q0: Any, h0: Any, q1: Any, h1: Any) -> None:
    prev = ReplicaStats("vllm", 0, 0, prefix_cache_queries=q0, prefix_cache_hits=h0)
    cur = ReplicaStats("vllm", 0, 0, prefix_cache_queries=q1, prefix_cache_hits=h1)
    rate = prefix_hit_rate(prev, cur)
    if None in (q0, h0, q1, h1):
        assert rate is None
    else:
        assert rate is None or 0.0 <= rate <= 1.0
    if None not in (q0, h0, q1, h1) and 0 <= h0 <= q0 and q1 > q0 and 0 <= h1 - h0 <= q1 - q0:
        assert rate == pytest.approx((h1 - h0) / (q1 - q0))  # counters that only grew: the plain ratio


# ---------------------------------------------------------------------------------------------------
# 2. Usage: JSON bodies and SSE streams -> Usage
# ---------------------------------------------------------------------------------------------------


def assert_usage(usage: Usage | None) -> None:
    assert usage is None or (type(usage.prompt_tokens) is int and type(usage.completion_tokens) is int)


@fast(200)
@example({"prompt_tokens": "many"})
@example({"prompt_tokens": [1], "completion_tokens": 2})
@example({"input_tokens": float("inf")})
@given(JSON_VALUES)
def test_usage_from_dict_never_raises(value: Any) -> None:
    usage = usage_from_dict(value)
    assert_usage(usage)
    if not isinstance(value, dict):
        assert usage is None


TOKEN_NAMES = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


@fast(60)
@given(st.integers(0, 10**7), st.integers(0, 10**7), st.booleans(), JSON_OBJECTS)
def test_usage_from_json_reads_the_usage_object(
    prompt: int, completion: int, anthropic: bool, rest: Any
) -> None:
    names = ("input_tokens", "output_tokens") if anthropic else ("prompt_tokens", "completion_tokens")
    others = {k: v for k, v in rest.items() if k not in TOKEN_NAMES}
    body = {**rest, "usage": {**others, names[0]: prompt, names[1]: completion}}
    assert usage_from_json(json.dumps(body).encode()) == Usage(prompt, completion)


@fast(200)
@example(b'{"usage": {"prompt_tokens": "x"}}')
@example(b'{"usage": {"completion_tokens": Infinity}}')
@given(st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps({"usage": v}).encode()))
def test_usage_from_json_never_raises(raw: bytes) -> None:
    assert_usage(usage_from_json(raw))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run_sse(parser: SSEUsage, chunks: list[bytes]) -> bytes:
    return b"".join(parser.feed(c) for c in chunks) + parser.flush()


class InspectEveryEvent(SSEUsage):
    """The reference: no skipping events by their raw bytes."""

    def _keep(self, buf: bytes, start: int, end: int) -> bool:
        return self._inspect(buf[start:end])


def chat_chunk(choices: bool, usage: Any) -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": []}
    if choices:
        chunk["choices"] = [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]
    if usage is not ...:
        chunk["usage"] = usage
    return chunk


USAGE_OBJECTS = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)}
) | st.fixed_dictionaries({"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6)})
EVENT_OBJECTS = st.one_of(
    st.builds(chat_chunk, st.booleans(), st.just(...) | st.none() | USAGE_OBJECTS | JSON_VALUES),
    st.builds(
        lambda u: {"type": "response.completed", "response": {"usage": u}}, USAGE_OBJECTS | JSON_VALUES
    ),
    st.builds(lambda u: {"type": "message_start", "message": {"usage": u}}, USAGE_OBJECTS | JSON_VALUES),
    st.builds(lambda u: {"type": "message_delta", "usage": u}, USAGE_OBJECTS | JSON_VALUES),
    JSON_VALUES,
)


@st.composite
def sse_event(draw: st.DrawFn) -> bytes:
    """One SSE event: JSON spaced any way, its data sometimes over two lines, with other fields."""
    obj = draw(EVENT_OBJECTS)
    data = json.dumps(obj, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    if draw(st.booleans()):
        data = draw(st.sampled_from(["[DONE]", "", "not json", '"usage"']))
    lines = [f"data: {data}"]
    if len(data) > 1 and draw(st.booleans()):
        cut = draw(st.integers(1, len(data) - 1))
        lines = [f"data: {data[:cut]}", f"data:{data[cut:]}"]
    if draw(st.booleans()):
        lines.insert(0, f"event: {draw(WORDS)}")
    if draw(st.booleans()):
        lines.append(": a comment with usage")
    return ("\n".join(lines) + "\n\n").encode()


@fast(150)
@given(st.lists(sse_event(), max_size=6), st.binary(max_size=20), st.lists(st.integers(0, 10**4), max_size=8),
       st.booleans())  # fmt: skip
def test_sse_usage_is_the_same_whatever_the_chunking(
    events: list[bytes], tail: bytes, cuts: list[int], strip: bool
) -> None:
    data = b"".join(events) + tail
    whole, pieces, reference = SSEUsage(strip), SSEUsage(strip), InspectEveryEvent(strip)
    out = run_sse(whole, [data])
    assert run_sse(pieces, split(data, cuts)) == out
    assert run_sse(reference, [data]) == out  # skipping events by their bytes changes nothing
    assert pieces.usage == whole.usage == reference.usage
    assert_usage(whole.usage)
    if not strip:
        assert out == data  # nothing held back unless asked


@fast(200)
@example(b'data: {"usage": {"prompt_tokens": "x"}}\n\n', [], False)
@example(b'data: {"type": "message_start", "message": "usage"}\n\n', [], False)
@example(b'data: {"type": "response.completed", "response": ["usage"]}\n\n', [], False)
@example(b'data: {"type": "message_delta", "usage": {"output_tokens": [1]}}\n\n', [], True)
@given(st.binary(max_size=200), st.lists(st.integers(0, 400), max_size=6), st.booleans())
def test_sse_usage_never_raises_on_arbitrary_bytes(data: bytes, cuts: list[int], strip: bool) -> None:
    parser = SSEUsage(strip)
    out = run_sse(parser, split(data, cuts))
    assert_usage(parser.usage)
    assert len(out) <= len(data)
    if not strip:
        assert out == data


@fast(150)
@given(st.lists(st.text(max_size=10), max_size=5), st.integers(0, 10**7), st.integers(0, 10**7),
       st.lists(st.integers(0, 10**4), max_size=8), st.booleans())  # fmt: skip
def test_sse_usage_reports_the_final_usage_chunk(
    texts: list[str], prompt: int, completion: int, cuts: list[int], strip: bool
) -> None:
    def sse_line(obj: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": t}}], "usage": None} for t in texts]
    body = b"".join(sse_line(chunk) for chunk in chunks)
    last = sse_line(
        {"id": "c", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )
    data = body + last + b"data: [DONE]\n\n"
    parser = SSEUsage(strip)
    out = run_sse(parser, split(data, cuts))
    assert parser.usage == Usage(prompt, completion)
    assert out == (body + b"data: [DONE]\n\n" if strip else data)


@fast(100)
@given(
    st.integers(0, 10**7), st.integers(0, 10**7), st.booleans(), st.lists(st.integers(0, 10**4), max_size=8)
)
def test_sse_usage_reads_responses_and_messages_streams(
    prompt: int, completion: int, anthropic: bool, cuts: list[int]
) -> None:
    if anthropic:
        objs = [
            {"type": "message_start", "message": {"usage": {"input_tokens": prompt, "output_tokens": 1}}},
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "usage"}},
            {"type": "message_delta", "usage": {"output_tokens": completion}},
        ]
    else:
        usage = {"input_tokens": prompt, "output_tokens": completion}
        objs = [
            {"type": "response.output_text.delta", "delta": '"usage": null'},
            {"type": "response.completed", "response": {"usage": usage}},
        ]
    data = b"".join(f"event: {o['type']}\ndata: {json.dumps(o)}\n\n".encode() for o in objs)
    parser = SSEUsage(strip=True)
    assert run_sse(parser, split(data, cuts)) == data  # typed events are never held back
    assert parser.usage == Usage(prompt, completion)


STREAM_BODIES = st.builds(
    lambda rest, stream, options, model: {**rest, "model": model, "stream": stream, **options},
    JSON_OBJECTS,
    st.sampled_from([True, 1, "yes"]) | JSON_VALUES,
    st.just({})
    | st.fixed_dictionaries({"stream_options": JSON_VALUES})
    | st.fixed_dictionaries({"stream_options": st.fixed_dictionaries({"include_usage": JSON_VALUES})}),
    st.text(max_size=10),
)


@fast(100)
@given(st.sampled_from([*USAGE_PATHS, "responses", "messages", "embeddings"]), STREAM_BODIES)
def test_prepare_stream_request_asks_for_usage_on_streams_only(path: str, body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    sent, strip = prepare_stream_request(path, body)
    assert json.dumps(body) == json.dumps(before)  # the client's body is not changed
    options = body.get("stream_options")
    asked = isinstance(options, dict) and bool(options.get("include_usage"))
    if path not in USAGE_PATHS or not body.get("stream") or asked:
        assert sent is body and not strip
        return
    assert strip
    assert sent["stream_options"]["include_usage"] is True
    others = [json.dumps({k: v for k, v in d.items() if k != "stream_options"}) for d in (sent, body)]
    assert others[0] == others[1]  # all else as the client sent it, in its order
    if isinstance(options, dict):  # the client's other stream options are kept
        assert json.dumps({**options, "include_usage": True}) == json.dumps(sent["stream_options"])


@st.composite
def raw_stream_request(draw: st.DrawFn) -> bytes:
    """A streaming chat request as some client may have written it."""
    body = draw(STREAM_BODIES)
    text = json.dumps(
        body,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 2, "\t"])),
        separators=draw(st.sampled_from([None, (",", ":"), (" ,", " : ")])),
    )
    if draw(st.booleans()):
        text = (
            '{"stream": false, ' + text[1:] if text[1:].lstrip().startswith('"') else text
        )  # a duplicate key
    text = draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.text(" \t\r\n", max_size=3))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32-le"])))


@fast(100)
@given(raw_stream_request())
def test_stream_request_bytes_send_the_prepared_body(raw: bytes) -> None:
    body = json.loads(raw)
    sent, _ = prepare_stream_request("chat/completions", body)
    if sent is body:
        return
    out = stream_request_bytes(raw, body, sent)
    assert json.dumps(json.loads(out)) == json.dumps(sent)  # same values, same key order
    utf8_object = raw[:1] == b"{" and raw[1:2] != b"\0"
    if utf8_object and "stream_options" not in body:  # spliced onto the client's own bytes
        assert out.startswith(raw.rstrip(b" \t\r\n")[:-1])


# ---------------------------------------------------------------------------------------------------
# 3. Translation: Responses / Messages requests -> chat, chat answers -> Responses / Messages
# ---------------------------------------------------------------------------------------------------

TEXT = st.text(max_size=30)
MODEL = st.text(min_size=1, max_size=20)

# Anthropic Messages
A_TEXT = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
A_IMAGE = st.fixed_dictionaries({
    "type": st.just("image"),
    "source": st.fixed_dictionaries({
        "type": st.just("base64"), "media_type": st.sampled_from(["image/png", "image/jpeg"]),
        "data": st.from_regex(r"[A-Za-z0-9+/]{0,16}={0,2}", fullmatch=True),
    }) | st.fixed_dictionaries({"type": st.just("url"), "url": st.text(max_size=20)}),
})  # fmt: skip
A_USER = st.fixed_dictionaries(
    {"role": st.just("user"), "content": TEXT | st.lists(A_TEXT | A_IMAGE, max_size=4)}
)
A_ASSISTANT = st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": TEXT | st.lists(A_TEXT, max_size=3)}
)
MESSAGES_OPTIONAL = {
    "max_tokens": st.integers(1, 10**6),
    "system": TEXT | st.lists(A_TEXT, max_size=3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(1, 100),
    "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "stream": st.booleans(),
    "metadata": st.fixed_dictionaries({"user_id": st.text(max_size=10)}),
    "tools": st.just([]),
    "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "none"}]),
    "thinking": st.just({"type": "disabled"}),
    "service_tier": st.sampled_from(["auto", "standard_only"]),
}
MESSAGES_REQUESTS = st.fixed_dictionaries(
    {"model": MODEL, "messages": st.lists(A_USER | A_ASSISTANT, min_size=1, max_size=4)},
    optional=MESSAGES_OPTIONAL,
)
MESSAGES_BODIES_ISH = st.fixed_dictionaries(
    {
        "model": mostly(MODEL),
        "messages": mostly(st.lists(mostly(st.fixed_dictionaries({
            "role": mostly(st.sampled_from(["user", "assistant"])),
            "content": mostly(TEXT | st.lists(mostly(A_TEXT | A_IMAGE), max_size=4)),
        })), max_size=4)),
    },
    optional={**{k: mostly(v) for k, v in MESSAGES_OPTIONAL.items()}, "container": JSON_VALUES},
)  # fmt: skip

# OpenAI Responses
R_TEXT = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": TEXT})
R_IMAGE = st.fixed_dictionaries(
    {"type": st.just("input_image"), "image_url": st.text(min_size=1, max_size=20)},
    optional={"detail": st.sampled_from(["low", "high", "auto"])},
)
R_ITEM = st.fixed_dictionaries(
    {"role": st.just("user"), "content": TEXT | st.lists(R_TEXT | R_IMAGE, max_size=3)},
    optional={"type": st.just("message")},
) | st.fixed_dictionaries({
    "role": st.sampled_from(["assistant", "developer", "system"]),
    "content": TEXT | st.lists(R_TEXT, max_size=3),
})  # fmt: skip
RESPONSES_OPTIONAL = {
    "instructions": TEXT,
    "max_output_tokens": st.integers(1, 10**6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "stream": st.booleans(),
    "user": st.text(max_size=10),
    "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={"name": TEXT, "schema": JSON_OBJECTS},
    )}),
    "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["low", "medium", "high"])}),
    "store": st.booleans(),
    "tools": st.just([]),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "truncation": st.just("disabled"),
    "previous_response_id": st.none(),
}  # fmt: skip
RESPONSES_REQUESTS = st.fixed_dictionaries(
    {"model": MODEL, "input": TEXT | st.lists(R_ITEM, min_size=1, max_size=4)}, optional=RESPONSES_OPTIONAL
)
RESPONSES_BODIES_ISH = st.fixed_dictionaries(
    {"model": mostly(MODEL), "input": mostly(TEXT | st.lists(mostly(R_ITEM), max_size=4))},
    optional={**{k: mostly(v) for k, v in RESPONSES_OPTIONAL.items()}, "background": JSON_VALUES},
)


def assert_chat_request(chat: Any, body: dict[str, Any]) -> None:
    """What any translated request must look like, whatever it came from."""
    assert isinstance(chat, dict) and isinstance(chat["messages"], list)
    for message in chat["messages"]:
        assert message["role"] in ("system", "user", "assistant")
        content = message["content"]
        if isinstance(content, list):
            assert message["role"] == "user"  # images only in user turns
            assert all(part["type"] in ("text", "image_url") for part in content)
        else:
            assert isinstance(content, str)
    if body.get("model") is not None:
        assert chat["model"] == body["model"]
    assert chat.get("stream", False) is bool(body.get("stream"))
    if body.get("stream"):
        assert chat["stream_options"] == {"include_usage": True}


def translate_or_refuse(translate: Any, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        chat = translate(body)
    except TranslationError as exc:
        assert isinstance(exc.param, str) and exc.message  # the 400 says which field, and why
        event("refused")
        return None
    event("translated")
    assert_chat_request(chat, body)
    return chat  # type: ignore[no-any-return]


@fast(120)
@example({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]})
@example({"messages": [], "system": [{"type": "text", "text": None}]})
@given(MESSAGES_BODIES_ISH | JSON_OBJECTS)
def test_messages_to_chat_answers_or_refuses(body: dict[str, Any]) -> None:
    translate_or_refuse(messages_to_chat, body)


@fast(120)
@example({"input": [{"role": "user", "content": [{"type": "input_text", "text": ["a"]}]}]})
@given(RESPONSES_BODIES_ISH | JSON_OBJECTS)
def test_responses_to_chat_answers_or_refuses(body: dict[str, Any]) -> None:
    translate_or_refuse(responses_to_chat, body)


def chat_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content if part["type"] == "text")


def images(content: Any) -> list[str]:
    return (
        [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        if isinstance(content, list)
        else []
    )


@fast(150)
@given(MESSAGES_REQUESTS)
def test_messages_to_chat_keeps_the_conversation(body: dict[str, Any]) -> None:
    chat = translate_or_refuse(messages_to_chat, body)
    assert chat is not None  # a well-formed request is never refused
    messages = chat["messages"]
    if body.get("system") is not None:
        system = body["system"]
        assert messages[0] == {"role": "system", "content": chat_text(system)}
        messages = messages[1:]
    assert [m["role"] for m in messages] == [t["role"] for t in body["messages"]]
    for turn, message in zip(body["messages"], messages, strict=True):
        content = turn["content"]
        if isinstance(content, str):
            assert message["content"] == content
            continue
        assert chat_text(message["content"]) == "\n".join(b["text"] for b in content if b["type"] == "text")
        sources = [b["source"] for b in content if b["type"] == "image"]
        assert images(message["content"]) == [
            s["url"] if s["type"] == "url" else f"data:{s['media_type']};base64,{s['data']}" for s in sources
        ]
    for key in ("model", "max_tokens", "temperature", "top_p", "top_k"):
        assert chat.get(key) == body.get(key)
    assert chat.get("stop") == (body.get("stop_sequences") or None)
    assert chat.get("user") == body.get("metadata", {}).get("user_id")


@fast(150)
@given(RESPONSES_REQUESTS)
def test_responses_to_chat_keeps_the_conversation(body: dict[str, Any]) -> None:
    chat = translate_or_refuse(responses_to_chat, body)
    assert chat is not None  # a well-formed request is never refused
    messages = chat["messages"]
    if "instructions" in body:
        assert messages[0] == {"role": "system", "content": body["instructions"]}
        messages = messages[1:]
    items = [{"role": "user", "content": body["input"]}] if isinstance(body["input"], str) else body["input"]
    assert [m["role"] for m in messages] == [{"developer": "system"}.get(i["role"], i["role"]) for i in items]
    for item, message in zip(items, messages, strict=True):
        content = item["content"]
        if isinstance(content, str):
            assert message["content"] == content
            continue
        assert chat_text(message["content"]) == "\n".join(p["text"] for p in content if "text" in p)
        assert images(message["content"]) == [p["image_url"] for p in content if p["type"] == "input_image"]
    assert chat.get("max_tokens") == body.get("max_output_tokens")
    for key in ("model", "temperature", "top_p", "user"):
        assert chat.get(key) == body.get(key)
    kind = body.get("text", {}).get("format", {}).get("type", "text")
    assert chat.get("response_format", {}).get("type", "text") == kind
    assert chat.get("reasoning_effort") == body.get("reasoning", {}).get("effort")


CHAT_ANSWERS = st.fixed_dictionaries(
    {
        "choices": mostly(st.lists(mostly(st.fixed_dictionaries(
            {"index": st.just(0), "message": mostly(st.fixed_dictionaries({"role": st.just("assistant"),
                                                                         "content": mostly(TEXT)})),
             "finish_reason": mostly(st.sampled_from(["stop", "length", "content_filter"]))},
            optional={"stop_reason": JSON_VALUES},
        )), min_size=1, max_size=2)),
    },
    optional={"id": mostly(st.text(max_size=12)), "created": mostly(st.integers(0, 2**31)),
              "model": JSON_VALUES, "usage": mostly(USAGE_OBJECTS)},
)  # fmt: skip


@fast(120)
@example({"choices": [{"message": "hello"}]}, {"model": "m", "input": "hi"})
@example({"choices": [{"message": {}, "finish_reason": ["length"]}]}, {"model": "m", "input": "hi"})
@example({"choices": [{"message": {}}], "created": [1]}, {"model": "m", "input": "hi"})
@example({"choices": [{"message": {}}], "usage": {"prompt_tokens": [1]}}, {"model": "m", "input": "hi"})
@given(CHAT_ANSWERS | JSON_OBJECTS, RESPONSES_REQUESTS | MESSAGES_REQUESTS)
def test_chat_answers_translate_or_raise_value_error(chat: dict[str, Any], request: dict[str, Any]) -> None:
    convert = chat_to_responses if "input" in request else chat_to_messages
    try:
        out = convert(chat, request)
    except ValueError:  # documented: not a chat completion (the gateway answers 502)
        event("refused")
        return
    event("translated")
    json.dumps(out)  # an answer the gateway can send
    assert out["model"] == request["model"]
    usage = out["usage"]
    assert usage is None or all(type(usage[k]) is int for k in ("input_tokens", "output_tokens"))
    choice = chat["choices"][0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if isinstance(text, str) and not (isinstance(message, dict) and message.get("refusal")):
        got = out["content"][0]["text"] if "content" in out else out["output"][0]["content"][0]["text"]
        assert got == text


CHAT_STREAM_CHUNKS = st.lists(
    st.builds(
        lambda text, finish: {"id": "chatcmpl-7", "created": 1700000000, "model": "up",
                              "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]},
        st.text(max_size=8),
        st.none() | st.sampled_from(["stop", "length"]),
    ),
    max_size=5,
)  # fmt: skip


def sse_events(raw: bytes) -> list[tuple[str, Any]]:
    out = []
    assert raw == b"" or raw.endswith(b"\n\n")
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.decode().split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def normalized(raw: bytes) -> bytes:
    """Clock readings aside (two streams made a moment apart may straddle a second)."""
    return re.sub(rb'"(completed_at|created_at|created)":\s*\d+', rb'"\1":0', raw)


@fast(150)
@given(CHAT_STREAM_CHUNKS, st.none() | USAGE_OBJECTS, st.booleans(), st.booleans(),
       st.lists(st.integers(0, 10**4), max_size=8), RESPONSES_REQUESTS | MESSAGES_REQUESTS)  # fmt: skip
def test_chat_stream_translation_keeps_text_and_usage(
    chunks: list[dict[str, Any]], usage: Any, done: bool, crlf: bool, cuts: list[int], request: dict[str, Any]
) -> None:
    if usage is not None and "prompt_tokens" not in usage:
        usage = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]}
    objs: list[Any] = [*chunks, {"id": "chatcmpl-7", "choices": [], "usage": usage}] if usage else chunks
    nl = "\r\n" if crlf else "\n"
    data = "".join(f"data: {json.dumps(o)}{nl}{nl}" for o in objs) + (f"data: [DONE]{nl}{nl}" if done else "")
    make = ChatToResponsesStream if "input" in request else ChatToMessagesStream
    whole, pieces = make(request), make(request)
    out = whole.feed(data.encode()) + whole.close()
    assert normalized(
        b"".join(pieces.feed(c) for c in split(data.encode(), cuts)) + pieces.close()
    ) == normalized(out)
    events = sse_events(out)
    kinds = [kind for kind, _ in events]
    finished = any(c["choices"][0]["finish_reason"] for c in chunks)
    if not objs:  # nothing came: one error, nothing else
        assert kinds == ["error"]
        return
    if not done and not finished:  # cut short: the client is told
        assert "error" in kinds
        return
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    if make is ChatToResponsesStream:
        assert kinds[-1] == "response.completed"
        assert "".join(e["delta"] for k, e in events if k == "response.output_text.delta") == text
        final = events[-1][1]["response"]
        assert final["model"] == request["model"]
        assert final["output"][0]["content"][0]["text"] == text
        if usage:
            assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (
                usage["prompt_tokens"], usage["completion_tokens"])  # fmt: skip
    else:
        assert kinds[-1] == "message_stop"
        assert "".join(e["delta"]["text"] for k, e in events if k == "content_block_delta") == text
        assert events[0][1]["message"]["model"] == request["model"]
        if usage:
            assert events[-2][1]["usage"]["output_tokens"] == usage["completion_tokens"]
    assert whole.usage == ((usage["prompt_tokens"], usage["completion_tokens"]) if usage else None)


@fast(200)
@example(b'data: {"choices": [{"delta": "x"}]}\n\n', [], False)
@example(b'data: {"created": [1], "choices": []}\n\n', [], False)
@example(b'data: {"created": "soon", "choices": []}\n\n', [], False)
@example(b'data: {"choices": [{"finish_reason": ["stop"]}]}\n\ndata: [DONE]\n\n', [], False)
@example(b'data: {"choices": [], "usage": {"prompt_tokens": {}}}\n\n', [], False)
@given(st.binary(max_size=120) | st.lists(sse_event(), max_size=4).map(b"".join),
       st.lists(st.integers(0, 10**3), max_size=6), st.booleans())  # fmt: skip
def test_chat_stream_translation_never_raises(data: bytes, cuts: list[int], anthropic: bool) -> None:
    stream = (ChatToMessagesStream if anthropic else ChatToResponsesStream)({"model": "m"})
    out = b"".join(stream.feed(c) for c in split(data, cuts)) + stream.close()
    events = sse_events(out)  # whole events of valid JSON
    assert events and events[-1][0] in ("error", "message_stop", "response.completed", "response.failed")
    assert stream.usage is None or all(type(n) is int for n in stream.usage)


# ---------------------------------------------------------------------------------------------------
# 4. Durations
# ---------------------------------------------------------------------------------------------------

DURATION_ISH = st.lists(
    st.sampled_from(["1", "0", ".", "5", "ms", "s", "m", "h", " ", "-", "e"]), max_size=12
).map("".join)
UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
DURATION_PIECES = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.none() | st.from_regex(r"[0-9]{1,3}", fullmatch=True),
        st.sampled_from(list(UNITS)),
    ),
    min_size=1,
    max_size=4,
)


def duration(pieces: list[tuple[int, str | None, str]]) -> tuple[str, Fraction]:
    text = "".join(f"{n}{'.' + frac if frac else ''}{unit}" for n, frac, unit in pieces)
    seconds = sum((Fraction(f"{n}.{frac or 0}") * UNITS[unit] for n, frac, unit in pieces), Fraction(0))
    return text, seconds


@fast(200)
@example([(250, None, "ms")])
@example([(2, None, "s")])
@example([(1, None, "m"), (30, None, "s")])
@example([(1, "5", "h")])
@given(DURATION_PIECES)
def test_parse_duration_reads_valid_durations(pieces: list[tuple[int, str | None, str]]) -> None:
    text, exact = duration(pieces)
    seconds = parse_duration(text)
    assert seconds == pytest.approx(float(exact), rel=1e-12, abs=1e-12)
    if all(frac is None and unit != "ms" for _, frac, unit in pieces):
        assert seconds == exact  # whole seconds: exact


@fast(300)
@example("")
@example("30")
@example("30 s")
@example("1s2x")
@example("-5s")
@example("1.5h" * 8)
@given(st.text(max_size=32) | DURATION_ISH)
def test_parse_duration_on_arbitrary_text(text: str) -> None:
    """Any string the API's Duration allows in length (32): seconds, finite and >= 0, or ValueError."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        assert not DURATION.fullmatch(text)  # a valid duration is never refused
        return
    assert isinstance(seconds, float) and math.isfinite(seconds) and seconds >= 0
    if DURATION.fullmatch(text):
        assert seconds == pytest.approx(float(seconds_of(text)), rel=1e-12, abs=1e-12)


DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m|h))+")  # the API's Duration pattern (api/fields.py)


def seconds_of(text: str) -> Fraction:
    pieces = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text)
    return sum((Fraction(n) * UNITS[u] for n, u in pieces), Fraction(0))


# --- the nesting pre-check of request bodies -----------------------------------------------------------


@given(st.binary(max_size=2048) | st.text(alphabet='[]{}a"', max_size=512).map(str.encode))
def test_opener_count_is_the_count_of_brackets(raw: bytes) -> None:
    """validate._openers (replace-based, for speed) counts exactly what bytes.count would."""
    assert validate._openers(raw) == raw.count(b"[") + raw.count(b"{")


USAGES = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 10**7), "completion_tokens": st.integers(0, 10**7)},
    optional={"prompt_tokens_details": JSON_VALUES, "usage": JSON_VALUES},
)


@fast(500)
@example({"a": 1}, {"prompt_tokens": 3, "completion_tokens": 4}, 0, None)
@example({'a"usage': {"prompt_tokens": 9}}, {"prompt_tokens": 3, "completion_tokens": 4}, 0, None)
@example({"x": {"usage": {"prompt_tokens": 9}}}, {"prompt_tokens": 3, "completion_tokens": 4}, 0, 2)
@given(JSON_OBJECTS, st.none() | USAGES | JSON_VALUES, st.integers(0, 6), st.sampled_from([None, 0, 2, "\t"]))
def test_usage_read_near_the_end_is_what_a_whole_parse_reads(
    body: dict[str, Any], usage: Any, position: int, indent: Any
) -> None:
    """usage_from_json decodes only the last `usage` member when it can prove it is a top-level one;
    on any valid JSON object it answers exactly what parsing the whole answer would. The objects hold
    `usage` keys nested at any depth, before and after the top-level one, and values of any kind."""
    items = [(k, v) for k, v in body.items() if k != "usage"]
    if usage is not None:
        items.insert(min(position, len(items)), ("usage", usage))
    raw = json.dumps(dict(items), indent=indent).encode()
    event(
        "read near the end" if usage_module._usage_member(raw) is not usage_module._MISSED else "parsed whole"
    )
    assert usage_from_json(raw) == usage_from_dict(dict(items).get("usage"))
