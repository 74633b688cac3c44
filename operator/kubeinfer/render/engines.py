"""Engine command lines: one flag per set field, for vLLM and for llama-server.

Pure functions of the LLMModel. Every flag here is checked by tests against vLLM 0.32's own argument
parser and against the `--help` of the llama-server build, so a renamed or removed flag fails CI
rather than a pod.
"""

from __future__ import annotations

import json
from typing import Any

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.render.source import Source, hf_file_url, parse_source
from kubeinfer.render.weights import adapter_path, model_entry

VLLM_COMMAND = ["vllm", "serve"]
LLAMA_COMMAND = ["llama-server"]


def _json(value: Any) -> str:
    # Compact and key-sorted so the same spec always renders the same bytes (stable spec hash).
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def served_names(model: LLMModel) -> list[str]:
    names = [model.served_name]
    for alias in model.spec.model.aliases or []:
        if alias not in names:
            names.append(alias)
    return names


def engine_command(model: LLMModel) -> list[str]:
    return list(VLLM_COMMAND if model.spec.engine == "vllm" else LLAMA_COMMAND)


def engine_args(model: LLMModel) -> list[str]:
    if model.spec.engine == "vllm":
        return vllm_args(model)
    return llama_server_args(model)


def _model_ref(source: Source) -> str:
    return source.local_path if source.kind == "pvc" else source.repo


def chat_template_kwargs(model: LLMModel) -> dict[str, Any] | None:
    """Default chat-template kwargs: the user's, with `thinking` folded in as enable_thinking."""
    r = model.spec.reasoning
    if r is None:
        return None
    kwargs = dict(r.chat_template_kwargs or {})
    if r.thinking != "default":
        kwargs["enable_thinking"] = r.thinking == "enabled"
    return kwargs or None


def vllm_args(model: LLMModel) -> list[str]:
    spec = model.spec
    assert spec.model.source is not None, "remote models have no engine"
    source = parse_source(spec.model.source)
    cached = model_entry(model)
    # From the weight cache, vLLM loads a local directory that already is the requested revision.
    args = [cached.path if cached else _model_ref(source), "--served-model-name", *served_names(model)]
    args += ["--host", "0.0.0.0", "--port", str(contract.ENGINE_PORT)]

    m = spec.model
    if m.revision and not cached:
        args += ["--revision", m.revision]
    if m.trust_remote_code:
        args.append("--trust-remote-code")

    q = spec.quantization
    if q and q.method:
        args += ["--quantization", q.method]
    if q and q.dtype:
        args += ["--dtype", q.dtype]

    kv = spec.kv_cache
    if kv:
        if kv.dtype:
            args += ["--kv-cache-dtype", kv.dtype]
        if kv.memory_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(kv.memory_bytes)]
        if kv.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", _num(kv.gpu_memory_utilization)]
        if kv.prefix_caching is not None:
            args.append("--enable-prefix-caching" if kv.prefix_caching else "--no-enable-prefix-caching")

    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    if spec.max_num_seqs is not None:
        args += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]

    p = spec.parallelism
    if p and p.tensor > 1:
        args += ["--tensor-parallel-size", str(p.tensor)]
    if p and p.pipeline > 1:
        args += ["--pipeline-parallel-size", str(p.pipeline)]

    s = spec.speculative
    if s:
        conf: dict[str, Any] = dict(s.config or {})
        conf["method"] = s.method
        if s.model:
            conf["model"] = _model_ref(parse_source(s.model))
        if s.num_tokens is not None:
            conf["num_speculative_tokens"] = s.num_tokens
        args += ["--speculative-config", _json(conf)]

    mm = spec.multimodal
    if mm and mm.limit_per_prompt is not None:
        args += ["--limit-mm-per-prompt", _json(mm.limit_per_prompt)]
    if mm and mm.processor_kwargs is not None:
        args += ["--mm-processor-kwargs", _json(mm.processor_kwargs)]

    r = spec.reasoning
    if r and r.parser:
        args += ["--reasoning-parser", r.parser]
    kwargs = chat_template_kwargs(model)
    if kwargs:
        args += ["--default-chat-template-kwargs", _json(kwargs)]

    if spec.adapters:
        # The adapters themselves are loaded at run time (operator/adapters.py), so changing the list
        # restarts nothing; only these limits are fixed at start.
        lora = spec.lora
        args += ["--enable-lora", "--max-loras", str(vllm_max_loras(model))]
        if lora and lora.max_rank is not None:
            args += ["--max-lora-rank", str(lora.max_rank)]
        if lora and lora.max_cpu_loras is not None:
            args += ["--max-cpu-loras", str(lora.max_cpu_loras)]

    return args + list(spec.extra_args or [])


# Adapters in one batch when lora.maxLoras is unset (vLLM's own default, 1, serializes every mix of
# adapters). Fixed rather than derived from the adapter count, so adding an adapter restarts nothing.
DEFAULT_MAX_LORAS = 4


def vllm_max_loras(model: LLMModel) -> int:
    lora = model.spec.lora
    return lora.max_loras if lora and lora.max_loras is not None else DEFAULT_MAX_LORAS


def llama_adapter_paths(model: LLMModel) -> list[str]:
    """The `--lora` files of llama-server in spec order: the engine numbers adapters 0, 1, ... in
    this order, which is how the gateway names one in a request (render/manifests.py writes the
    order into the pod's annotations)."""
    paths = []
    for a in model.spec.adapters or []:
        path = adapter_path(model, a.name)
        assert path is not None
        paths.append(path)
    return paths


def _llama_model_args(
    source: Source, quant: str | None, flag_m: str, flag_hf: str, flag_hff: str
) -> list[str]:
    if source.kind == "pvc":
        return [flag_m, source.local_path]
    if source.file:
        return [flag_hf, source.repo, flag_hff, source.file]
    tag = source.quant or quant
    return [flag_hf, f"{source.repo}:{tag}" if tag else source.repo]


def llama_server_args(model: LLMModel) -> list[str]:
    spec = model.spec
    assert spec.model.source is not None, "remote models have no engine"
    source = parse_source(spec.model.source)
    quant = spec.quantization.method if spec.quantization else None
    cached = model_entry(model)
    args = ["-m", cached.file_path] if cached else _llama_model_args(source, quant, "-m", "-hf", "-hff")
    args += ["--host", "0.0.0.0", "--port", str(contract.ENGINE_PORT)]
    args += ["--alias", ",".join(served_names(model)), "--metrics"]

    # maxModelLen is per sequence, as in vLLM; llama-server's -c is the context shared by all slots,
    # so each of the -np slots gets -c / -np tokens.
    slots = spec.max_num_seqs
    if spec.max_model_len is not None:
        args += ["-c", str(spec.max_model_len * (slots or 1))]
    if slots is not None:
        args += ["-np", str(slots)]
    if spec.max_num_batched_tokens is not None:
        args += ["-b", str(spec.max_num_batched_tokens)]
    # One HTTP thread per connection the gateways may hold (see contract.llama_http_threads).
    target = contract.target_inflight(spec.routing.target_inflight if spec.routing else None, slots)
    args += ["--threads-http", str(contract.llama_http_threads(target))]

    if spec.resources.gpus > 0:
        args += ["-ngl", "all"]
    p = spec.parallelism
    if p and p.tensor > 1:
        args += ["--split-mode", "row"]
    elif p and p.pipeline > 1:
        args += ["--split-mode", "layer"]

    kv = spec.kv_cache
    if kv and kv.dtype:
        args += ["-ctk", kv.dtype, "-ctv", kv.dtype]
    if kv and kv.prefix_caching is not None:
        args.append("--cache-prompt" if kv.prefix_caching else "--no-cache-prompt")

    s = spec.speculative
    if s:
        args += ["--spec-type", s.method]
        if s.model:
            args += _llama_model_args(parse_source(s.model), None, "-md", "-hfd", "")
        if s.num_tokens is not None:
            args += [_llama_spec_length_flag(s.method), str(s.num_tokens)]
        d = s.draft
        if d and d.min_tokens is not None:
            args += ["--spec-draft-n-min", str(d.min_tokens)]
        if d and d.p_min is not None:
            args += ["--spec-draft-p-min", _num(d.p_min)]
        if d and d.gpu_layers is not None:
            args += ["-ngld", "all" if d.gpu_layers == -1 else str(d.gpu_layers)]

    mm = spec.multimodal
    if "image" in spec.modalities and mm and mm.mmproj == "auto" and cached:
        args += ["--mmproj", cached.mmproj_path]
    elif "image" in spec.modalities and mm and mm.mmproj and mm.mmproj != "auto":
        proj = parse_source(mm.mmproj)
        args += ["--mmproj", proj.local_path] if proj.kind == "pvc" else ["-mmu", hf_file_url(proj)]
    elif "image" not in spec.modalities and source.kind == "hf" and not cached:
        # -hf downloads a repository's projector by default; a text-only model must not pay for it.
        args.append("--no-mmproj")
    if mm and mm.image_max_tokens is not None:
        args += ["--image-max-tokens", str(mm.image_max_tokens)]

    r = spec.reasoning
    if r and r.parser:
        args += ["--reasoning-format", r.parser]
    if r and r.thinking != "default":
        args += ["--reasoning", "on" if r.thinking == "enabled" else "off"]
    if r and r.chat_template_kwargs:
        args += ["--chat-template-kwargs", _json(r.chat_template_kwargs)]

    if spec.adapters:
        # Loaded at start with a global scale of 0, so a request that names no adapter gets the base
        # model; the gateway applies the one a request names through its `lora` field. (Not
        # --lora-init-without-apply: build b11434 ignores it and starts every adapter at scale 1.)
        args += ["--lora-scaled", ",".join(f"{path}:0" for path in llama_adapter_paths(model))]

    return args + list(spec.extra_args or [])


def _llama_spec_length_flag(spec_type: str) -> str:
    """The flag that bounds the tokens proposed per step, which differs per --spec-type."""
    if spec_type == "ngram-mod":
        return "--spec-ngram-mod-n-max"
    if spec_type in ("ngram-simple", "ngram-map-k", "ngram-map-k4v"):
        return f"--spec-{spec_type}-size-m"
    return "--spec-draft-n-max"


def _num(x: float) -> str:
    return f"{x:g}"
