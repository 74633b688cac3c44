"""The API's validation: every example is valid; every invalid case is refused with its message."""

from __future__ import annotations

import pytest

from kubeinfer.validation import InvalidModel, parse_model
from tests.cases import (
    EXAMPLES,
    FULL_LLAMA,
    FULL_VLLM,
    INVALID,
    llama_matrix,
    load_example,
    manifest,
    vllm_matrix,
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    model = parse_model(load_example(path))
    assert model.name == load_example(path)["metadata"]["name"]


def test_examples_cover_the_seed_configurations():
    names = {p.stem for p in EXAMPLES}
    assert {
        "molmo-7b-vllm-4bit",
        "gemma3-12b-llama-server",
        "qwen2.5-vl-3b-vllm",
        "gemma4-26b-mtp-vllm",
        "llama-3.1-8b-awq",
        "remote-openai",
        "tiny-gguf-cpu",
    } <= names


@pytest.mark.parametrize("spec", vllm_matrix() + llama_matrix())
def test_matrix_specs_are_valid(spec):
    parse_model(manifest("matrix", spec))


@pytest.mark.parametrize(("case", "spec", "expected"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_are_refused_with_a_clear_message(case, spec, expected):
    with pytest.raises(InvalidModel) as info:
        parse_model(manifest("bad", spec))
    text = str(info.value)
    assert expected.lower() in text.lower(), text


def test_at_least_25_invalid_cases():
    assert len(INVALID) >= 25


def test_unknown_field_is_refused():
    spec = dict(FULL_VLLM, maxModelLength=4096)
    with pytest.raises(InvalidModel, match=r"spec\.maxModelLength: unknown field"):
        parse_model(manifest("bad", spec))


def test_enum_error_names_allowed_values():
    spec = dict(FULL_LLAMA, kvCache={"dtype": "q9_9"})
    with pytest.raises(InvalidModel) as info:
        parse_model(manifest("bad", spec))
    assert "spec.kvCache.dtype" in str(info.value)
    assert "'q8_0'" in str(info.value)


def test_defaults_match_the_documented_ones():
    m = parse_model(manifest("d", {"model": {"source": "hf://org/m"}}))
    assert m.spec.engine == "vllm"
    assert m.spec.modalities == ["text"]
    assert m.spec.replicas == 1
    assert m.spec.resources.gpus == 1
    assert m.spec.resources.gpu_resource_name == "nvidia.com/gpu"
    assert m.served_name == "d"


def test_long_names_are_refused():
    with pytest.raises(InvalidModel, match=r"metadata\.name"):
        parse_model(manifest("x" * 60, {"model": {"source": "hf://org/m"}}))


def test_quantities_accept_numbers_and_strings():
    m = parse_model(
        manifest("q", {"model": {"source": "hf://o/m"}, "resources": {"cpu": 4, "memory": "8Gi"}})
    )
    assert m.spec.resources.cpu == "4"
    assert m.spec.resources.memory == "8Gi"
