"""Every flag the renderer can emit exists in the real engines, with a value they accept.

The captures in tests/fixtures come from vLLM 0.32 (its `vllm serve` parser, dumped) and from the
llama-server build the product ships (`--help`). The matrix sets every field of the API.
"""

from __future__ import annotations

import json
import re

import pytest

from kubeinfer.api.v1alpha1 import LLMModelSpec
from kubeinfer.render.engines import llama_server_args, vllm_args
from kubeinfer.validation import parse_model
from tests.cases import FIXTURES, llama_matrix, manifest, vllm_matrix

VLLM_ARGS = json.loads((FIXTURES / "vllm-0.32.0" / "serve_args.json").read_text())
VLLM_OPTIONS = {flag: opt for opt in VLLM_ARGS["options"] if "flags" in opt for flag in opt["flags"]}
VLLM_ENUMS = json.loads((FIXTURES / "vllm-0.32.0" / "vllm_enums.json").read_text())
LLAMA_HELP = (FIXTURES / "llama-server" / "help.txt").read_text()


def _llama_flags() -> tuple[set[str], set[str]]:
    """(accepted flags, removed flags) from the --help text."""
    accepted, removed = set(), set()
    entries = re.split(r"\n(?=-)", LLAMA_HELP)
    for entry in entries:
        first = entry.split("\n")[0]
        # Flags fill the first 40 columns and the description starts at column 40, unless the flags
        # are longer, in which case the description starts on the next line.
        head = first[:40] if len(first) > 40 and first[38:40] == "  " else first
        names = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", head))
        (removed if "has been removed" in entry else accepted).update(names)
    return accepted - removed, removed


LLAMA_ACCEPTED, LLAMA_REMOVED = _llama_flags()


def _flags(args: list[str]) -> list[tuple[str, str | None]]:
    """(flag, value) pairs; boolean flags get None."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and not re.fullmatch(r"-\d+", a):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            out.append((a, value))
        i += 1
    return out


def _vllm_models():
    return [parse_model(manifest("m", s)) for s in vllm_matrix()]


def _llama_models():
    return [parse_model(manifest("m", s)) for s in llama_matrix()]


def test_matrix_sets_every_field_of_the_api():
    """Guard for the tests below: a new API field must be added to the matrix."""

    def paths(obj, prefix=""):
        for k, v in obj.items():
            yield prefix + k
            if isinstance(v, dict) and k not in (
                "config",
                "processorKwargs",
                "chatTemplateKwargs",
                "limitPerPrompt",
                "podTemplate",
                "affinity",
                "nodeSelector",
            ):
                yield from paths(v, prefix + k + ".")

    covered = set()
    for spec in vllm_matrix() + llama_matrix():
        covered |= set(paths(spec))
    schema_paths = set()

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            alias = field.alias or name
            schema_paths.add(prefix + alias)
            ann = field.annotation
            for sub in getattr(ann, "__args__", (ann,)):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub, prefix + alias + ".")

    walk(LLMModelSpec)
    # remote is exclusive with pods; it renders no engine flags (tested in test_render).
    missing = {p for p in schema_paths - covered if not p.startswith("remote")}
    assert not missing, f"fields not exercised by the flag matrix: {sorted(missing)}"


def test_vllm_flags_exist_with_valid_choices():
    seen = set()
    for model in _vllm_models():
        for flag, value in _flags(vllm_args(model)):
            if flag in ("--enforce-eager",):  # from extraArgs, still must exist
                assert flag in VLLM_OPTIONS
                continue
            assert flag in VLLM_OPTIONS, f"vLLM 0.32 has no {flag}"
            opt = VLLM_OPTIONS[flag]
            seen.add(flag)
            if opt["nargs"] == 0:
                continue
            assert value is not None, f"{flag} needs a value"
            if opt["choices"]:
                # argparse converts with `type` before checking choices (ints for --max-lora-rank).
                typed = int(value) if opt["type"] == "int" else value
                assert typed in opt["choices"], f"{flag} {value} not in {opt['choices']}"
            if opt["type"] == "int":
                int(value)
            if opt["type"] == "float":
                float(value)
            if flag == "--quantization":
                assert value in VLLM_ENUMS["quantization_methods"]
            if flag == "--speculative-config":
                assert json.loads(value)["method"] in VLLM_ENUMS["speculative_methods"]
            if flag in (
                "--limit-mm-per-prompt",
                "--mm-processor-kwargs",
                "--default-chat-template-kwargs",
                "--speculative-config",
            ):
                assert isinstance(json.loads(value), dict)
    # Each typed field reached its flag at least once.
    assert {
        "--served-model-name",
        "--host",
        "--port",
        "--revision",
        "--trust-remote-code",
        "--quantization",
        "--dtype",
        "--kv-cache-dtype",
        "--kv-cache-memory-bytes",
        "--gpu-memory-utilization",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--speculative-config",
        "--limit-mm-per-prompt",
        "--mm-processor-kwargs",
        "--reasoning-parser",
        "--default-chat-template-kwargs",
    } <= seen


def test_llama_help_parser_sees_removed_flags():
    assert "--draft-max" in LLAMA_REMOVED
    assert "--spec-draft-n-max" in LLAMA_ACCEPTED
    assert "-ctk" in LLAMA_ACCEPTED


def test_llama_flags_exist_and_are_not_removed():
    seen = set()
    for model in _llama_models():
        args = llama_server_args(model)
        for flag, value in _flags(args):
            assert flag not in LLAMA_REMOVED, f"{flag} was removed from llama-server"
            assert flag in LLAMA_ACCEPTED, f"llama-server has no {flag}"
            seen.add(flag)
            if flag in ("-ctk", "-ctv"):
                allowed = re.search(r"-ctk,.*?allowed values: ([^\n]+)", LLAMA_HELP, re.S).group(1)
                assert value in [v.strip() for v in allowed.split(",")]
            if flag == "--spec-type":
                allowed = re.search(r"--spec-type ([\w,-]+)", LLAMA_HELP).group(1).split(",")
                assert value in allowed
            if flag == "--reasoning":
                assert value in ("on", "off", "auto")
            if flag == "--split-mode":
                assert value in ("none", "layer", "row", "tensor")
    assert {
        "-m",
        "-hf",
        "-hff",
        "--host",
        "--port",
        "--alias",
        "--metrics",
        "-c",
        "-np",
        "-b",
        "-ngl",
        "--split-mode",
        "-ctk",
        "-ctv",
        "--cache-prompt",
        "--no-cache-prompt",
        "--spec-type",
        "-md",
        "-hfd",
        "--spec-draft-n-max",
        "--spec-draft-n-min",
        "--spec-draft-p-min",
        "-ngld",
        "--mmproj",
        "-mmu",
        "--no-mmproj",
        "--image-max-tokens",
        "--reasoning-format",
        "--reasoning",
        "--chat-template-kwargs",
        "--threads-http",
    } <= seen


def test_llama_context_is_per_slot():
    model = parse_model(
        manifest(
            "m",
            {"engine": "llama-server", "model": {"source": "o/m:Q8_0"}, "maxModelLen": 2048, "maxNumSeqs": 4},
        )
    )
    args = llama_server_args(model)
    assert args[args.index("-c") + 1] == "8192"
    assert args[args.index("-np") + 1] == "4"


@pytest.mark.parametrize(
    "extra,threads",
    [
        ({}, 4 * 33),  # no maxNumSeqs: the gateway keeps 32 in flight
        ({"maxNumSeqs": 4}, 64),  # the floor
        ({"maxNumSeqs": 4, "routing": {"targetInflight": 40}}, 4 * 41),  # the gateway's target wins
    ],
)
def test_llama_http_threads_cover_the_gateways_connections(extra, threads):
    model = parse_model(manifest("m", {"engine": "llama-server", "model": {"source": "o/m:Q8_0"}, **extra}))
    args = llama_server_args(model)
    assert args[args.index("--threads-http") + 1] == str(threads)


@pytest.mark.parametrize(
    "spec_type,flag",
    [
        ("ngram-mod", "--spec-ngram-mod-n-max"),
        ("ngram-simple", "--spec-ngram-simple-size-m"),
        ("draft-mtp", "--spec-draft-n-max"),
    ],
)
def test_llama_speculative_length_flag_per_type(spec_type, flag):
    model = parse_model(
        manifest(
            "m",
            {
                "engine": "llama-server",
                "model": {"source": "o/m:Q8_0"},
                "speculative": {"method": spec_type, "numTokens": 3},
            },
        )
    )
    args = llama_server_args(model)
    assert args[args.index(flag) + 1] == "3"
