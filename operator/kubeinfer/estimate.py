"""GPU-memory fit estimate: will this LLMModel's replica fit on its GPUs?

A pure function of the spec. The model of memory, per replica:

* weights = parameters x bits per weight / 8 (the quantization's real bits, GGUF types at their
  bits per weight, plus ~0.9 GiB for a llama-server vision projector);
* KV cache = kvCache.memoryBytes if set, else layers x KV heads x head dim x 2 (K and V) x dtype
  bytes x tokens. Tokens: llama-server allocates its whole context (maxModelLen x slots) up front;
  vLLM needs room for at least one maxModelLen sequence and then grows its cache into whatever
  gpuMemoryUtilization leaves;
* overhead = CUDA context, activations and graphs (vLLM ~1.5 GiB, llama-server ~0.75 GiB per GPU).

Weights and KV split evenly over tensor x pipeline GPUs; overhead is per GPU. vLLM reserves
gpuMemoryUtilization x GPU memory (unless memoryBytes fixes the cache), so that is what it occupies
and what the model must fit in. Numbers are GiB (2^30 bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kubeinfer.api import enums
from kubeinfer.api.v1alpha1 import Estimate, LLMModelSpec

GIB = float(1 << 30)
VLLM_DEFAULT_UTILIZATION = 0.92  # vLLM's --gpu-memory-utilization default
DEFAULT_CONTEXT = 4096  # tokens assumed when maxModelLen is unset (the model's own may be larger)
MMPROJ_GIB = 0.9  # a typical f16 SigLIP/CLIP projector (400M parameters)
OVERHEAD_GIB = {"vllm": 1.5, "llama-server": 0.75}

# Memory of one GPU in GiB, as the driver reports it (nvidia-smi's "Total", not the marketing GB).
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 15.0, "L4": 22.5, "A10": 22.5, "A10G": 22.5, "L40": 45.0, "L40S": 45.0,
    "A100-40GB": 40.0, "A100-80GB": 80.0, "A100": 80.0, "H100": 79.6, "H100-80GB": 79.6,
    "H100-NVL": 93.6, "H200": 140.4, "GH200": 94.5, "B200": 179.1, "A30": 24.0, "A40": 45.0,
    "V100-16GB": 16.0, "V100-32GB": 32.0, "RTX-3090": 24.0, "RTX-4090": 24.0, "RTX-5090": 31.8,
    "RTX-4080": 16.0, "RTX-5080": 15.9, "RTX-A6000": 48.0, "RTX-6000-ADA": 48.0,
    "RTX-PRO-6000": 95.6, "MI300X": 192.0, "MI325X": 256.0,
}  # fmt: skip

# Typical attention shapes by parameter count (layers, KV heads, head dim), from common open models
# (Qwen2.5, Llama 3, Gemma 3, Mistral); used only when model.architecture is not given.
_TYPICAL_SHAPES: list[tuple[float, tuple[int, int, int]]] = [
    (1.0, (24, 2, 64)),
    (2.0, (28, 2, 128)),
    (4.5, (36, 4, 128)),
    (9.0, (32, 8, 128)),
    (16.0, (48, 8, 128)),
    (40.0, (64, 8, 128)),
    (80.0, (80, 8, 128)),
    (math.inf, (126, 8, 128)),
]

_PARAMS_RE = re.compile(r"^([0-9.]+)([MBT])(?:-A([0-9.]+)([MB]))?$")
_SCALE = {"M": 1e6, "B": 1e9, "T": 1e12}


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    assumed: bool


def parse_parameters(text: str) -> tuple[float, float | None]:
    """'35B-A3B' -> (35e9, 3e9); '7B' -> (7e9, None)."""
    m = _PARAMS_RE.match(text)
    if not m:
        raise ValueError(f"bad parameter hint {text!r}")
    total = float(m.group(1)) * _SCALE[m.group(2)]
    active = float(m.group(3)) * _SCALE[m.group(4)] if m.group(3) else None
    return total, active


def parse_quantity_gib(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?", text)
    if not m:
        raise ValueError(f"bad quantity {text!r}")
    factor = {
        None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    }[m.group(2)]  # fmt: skip
    return float(m.group(1)) * factor / GIB


def bits_per_weight(spec: LLMModelSpec) -> float:
    q = spec.quantization
    if q and q.weight_bits:
        return q.weight_bits
    if q and q.method:
        if q.method in enums.GGUF_BITS_PER_WEIGHT:
            return enums.GGUF_BITS_PER_WEIGHT[q.method]
        return enums.VLLM_QUANT_BITS[q.method]
    if spec.engine == "llama-server":
        source = spec.model.source or ""
        tag = source.rsplit(":", 1)[1] if ":" in source.removeprefix("hf:").removeprefix("pvc:") else ""
        if tag.upper() in enums.GGUF_BITS_PER_WEIGHT:
            return enums.GGUF_BITS_PER_WEIGHT[tag.upper()]
        for name, bits in sorted(enums.GGUF_BITS_PER_WEIGHT.items(), key=lambda kv: -len(kv[0])):
            if name.lower() in source.lower():
                return bits
        return enums.GGUF_BITS_PER_WEIGHT["Q4_K_M"]  # what `-hf` picks by default
    dtype = q.dtype if q and q.dtype else "auto"
    return enums.VLLM_DTYPE_BITS[dtype]


def attention_shape(spec: LLMModelSpec, total_params: float, active_params: float | None) -> Shape:
    arch = spec.model.architecture
    # Mixture-of-experts models keep dense attention: their shape follows the total size.
    size_b = total_params / 1e9
    typical = next(shape for limit, shape in _TYPICAL_SHAPES if size_b <= limit)
    if arch is None:
        return Shape(*typical, assumed=True)
    return Shape(
        arch.layers or typical[0],
        arch.kv_heads or typical[1],
        arch.head_dim or typical[2],
        assumed=not (arch.layers and arch.kv_heads and arch.head_dim),
    )


def kv_bytes_per_token(spec: LLMModelSpec, shape: Shape) -> float:
    dtype = spec.kv_cache.dtype if spec.kv_cache and spec.kv_cache.dtype else None
    if dtype is None:
        dtype = "f16" if spec.engine == "llama-server" else "auto"
    return shape.layers * shape.kv_heads * shape.head_dim * 2 * enums.KV_DTYPE_BYTES[dtype]


def gpu_memory_gib(spec: LLMModelSpec) -> float | None:
    r = spec.resources
    if r.gpu_memory:
        return parse_quantity_gib(r.gpu_memory)
    if r.gpu_type:
        return GPU_MEMORY_GIB.get(r.gpu_type.upper()) or GPU_MEMORY_GIB.get(r.gpu_type)
    return None


def _r(x: float) -> float:
    return round(x, 2)


def estimate(spec: LLMModelSpec) -> Estimate:
    """The estimate for one replica; `fits` is None when it cannot be judged."""
    gpus = spec.resources.gpus
    if spec.remote is not None:
        return Estimate(gpus=0, fits=True, message="remote model: no GPUs needed")
    if not spec.model.parameters:
        return Estimate(gpus=gpus, message="set model.parameters (e.g. 7B) to estimate GPU memory")
    total_params, active_params = parse_parameters(spec.model.parameters)
    bpw = bits_per_weight(spec)
    weights = total_params * bpw / 8 / GIB
    if spec.engine == "llama-server" and "image" in spec.modalities:
        weights += MMPROJ_GIB

    shape = attention_shape(spec, total_params, active_params)
    per_token = kv_bytes_per_token(spec, shape)
    context = spec.max_model_len or DEFAULT_CONTEXT
    kv_fixed = spec.kv_cache.memory_bytes if spec.kv_cache and spec.kv_cache.memory_bytes else None
    if kv_fixed is not None:
        kv = kv_fixed / GIB
    elif spec.engine == "llama-server":
        kv = per_token * context * (spec.max_num_seqs or 1) / GIB
    else:
        kv = per_token * context / GIB  # vLLM's minimum: one full-length sequence

    split = 1
    if spec.parallelism:
        split = spec.parallelism.tensor * spec.parallelism.pipeline
    overhead = OVERHEAD_GIB[spec.engine]
    need_per_gpu = (weights + kv) / split + overhead

    notes = []
    if shape.assumed and kv_fixed is None:
        notes.append(
            f"KV cache assumes {shape.layers} layers x {shape.kv_heads} KV heads x head dim "
            f"{shape.head_dim} (set model.architecture for precision)"
        )
    if not spec.max_model_len:
        notes.append(f"assumes a {DEFAULT_CONTEXT}-token context (maxModelLen unset)")
    note = ("; " + "; ".join(notes)) if notes else ""

    gpu_mem = gpu_memory_gib(spec)
    summary = (
        f"weights {weights:.1f} GiB ({total_params / 1e9:g}B params at {bpw:g} bits), KV cache {kv:.1f} GiB, "
        f"overhead {overhead:.1f} GiB per GPU"
    )
    if gpus == 0:
        return Estimate(
            weights_gi_b=_r(weights), kv_cache_gi_b=_r(kv), overhead_gi_b=_r(overhead),
            total_gi_b=_r(weights + kv + overhead), per_gpu_gi_b=None, gpus=0, fits=True,
            message=f"runs on CPU: {summary}{note}",
        )  # fmt: skip
    if gpu_mem is None:
        return Estimate(
            weights_gi_b=_r(weights), kv_cache_gi_b=_r(kv), overhead_gi_b=_r(overhead),
            total_gi_b=_r(need_per_gpu * split), per_gpu_gi_b=_r(need_per_gpu), gpus=gpus,
            message=f"needs {need_per_gpu:.1f} GiB per GPU: {summary}; set resources.gpuType or "
            f"gpuMemory to check the fit{note}",
        )  # fmt: skip

    if spec.engine == "vllm" and kv_fixed is None:
        util = (spec.kv_cache.gpu_memory_utilization if spec.kv_cache else None) or VLLM_DEFAULT_UTILIZATION
        budget = util * gpu_mem
        fits = need_per_gpu <= budget
        occupied = budget if fits else need_per_gpu
        kv_total = (budget - overhead) * split - weights if fits else kv
        limit_text = f"{util:g} x {gpu_mem:.1f} GiB = {budget:.1f} GiB (gpuMemoryUtilization)"
        extra = (
            f"; vLLM grows its KV cache to {kv_total:.1f} GiB, about "
            f"{int(kv_total * GIB / per_token):,} tokens"
            if fits
            else ""
        )
    else:
        budget = gpu_mem
        fits = need_per_gpu <= budget
        occupied = need_per_gpu
        kv_total = kv
        limit_text = f"{gpu_mem:.1f} GiB"
        extra = ""
    verdict = "fits" if fits else "does not fit"
    message = (
        f"{verdict}: needs {need_per_gpu:.1f} GiB per GPU of {limit_text} on {split} GPU(s): "
        f"{summary}{extra}{note}"
    )
    return Estimate(
        weights_gi_b=_r(weights), kv_cache_gi_b=_r(kv_total), overhead_gi_b=_r(overhead),
        total_gi_b=_r(occupied * split), per_gpu_gi_b=_r(occupied), gpu_memory_gi_b=_r(gpu_mem),
        gpus=gpus, fits=fits, message=message,
    )  # fmt: skip
