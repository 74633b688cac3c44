"""Shared test data: manifests that set every field, and manifests that must be rejected.

The unit tier checks these with kubeinfer's own validation; the k8s tier sends the same manifests to a
real kube-apiserver, so offline validation and the CRD cannot drift apart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kubeinfer.api import enums

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
FIXTURES = ROOT / "tests" / "fixtures"


def manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": name},
        "spec": spec,
    }


def load_example(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


# A vLLM model with every vLLM-mapped field set.
FULL_VLLM: dict[str, Any] = {
    "engine": "vllm",
    "model": {
        "source": "hf://org/model",
        "revision": "v1.0",
        "servedName": "org/model",
        "aliases": ["m", "model-latest"],
        "parameters": "7B",
        "architecture": {"layers": 32, "kvHeads": 8, "headDim": 128},
        "trustRemoteCode": True,
        "tokenSecretRef": {"name": "hf", "key": "token"},
    },
    "modalities": ["text", "image"],
    "quantization": {"method": "awq", "dtype": "float16", "weightBits": 4.25},
    "kvCache": {"dtype": "fp8", "memoryBytes": 1 << 30, "gpuMemoryUtilization": 0.8, "prefixCaching": True},
    "maxModelLen": 8192,
    "maxNumSeqs": 16,
    "maxNumBatchedTokens": 4096,
    "parallelism": {"tensor": 2, "pipeline": 2},
    "speculative": {
        "method": "draft_model",
        "model": "hf://org/draft",
        "numTokens": 4,
        "config": {"draft_tensor_parallel_size": 1},
    },
    "multimodal": {"limitPerPrompt": {"image": 2}, "processorKwargs": {"max_pixels": 1003520}},
    "reasoning": {"parser": "qwen3", "thinking": "disabled", "chatTemplateKwargs": {"custom": 1}},
    "resources": {
        "gpus": 4,
        "gpuResourceName": "nvidia.com/gpu",
        "gpuType": "A100-80GB",
        "cpu": 8,
        "memory": "64Gi",
        "shmSize": "16Gi",
        "skipFitCheck": True,
    },
    "scheduling": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "high",
        "runtimeClassName": "nvidia",
    },
    "replicas": 2,
    "autoscaling": {
        "mode": "builtin",
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetInflightPerReplica": 8,
        "scaleDownDelay": "5m",
    },
    "routing": {
        "strategy": "prefix-aware",
        "targetInflight": 16,
        "maxQueue": 50,
        "queueTimeout": "20s",
        "sessionHeader": "X-Session-Id",
    },
    "pricing": {"promptPer1M": 0.2, "completionPer1M": 0.6},
    "image": "example/vllm:custom",
    "extraArgs": ["--enforce-eager"],
    "env": [{"name": "FOO", "value": "bar"}],
    "podTemplate": {"metadata": {"labels": {"team": "ml"}}},
}

# A llama-server model with every llama-server-mapped field set.
FULL_LLAMA: dict[str, Any] = {
    "engine": "llama-server",
    "model": {
        "source": "pvc://models/big/model-Q4_K_M.gguf",
        "servedName": "big",
        "aliases": ["big-q4"],
        "parameters": "12B",
        "tokenSecretRef": {"name": "hf"},
    },
    "modalities": ["text", "image"],
    "quantization": {"method": "Q4_K_M"},
    "kvCache": {"dtype": "q8_0", "prefixCaching": False},
    "maxModelLen": 4096,
    "maxNumSeqs": 4,
    "maxNumBatchedTokens": 2048,
    "parallelism": {"tensor": 2},
    "speculative": {
        "method": "draft-simple",
        "model": "pvc://models/draft.gguf",
        "numTokens": 5,
        "draft": {"minTokens": 1, "pMin": 0.1, "gpuLayers": -1},
    },
    "multimodal": {"mmproj": "pvc://models/mmproj-f16.gguf", "imageMaxTokens": 512},
    "reasoning": {
        "parser": "deepseek",
        "thinking": "enabled",
        "chatTemplateKwargs": {"enable_thinking": True},
    },
    "resources": {"gpus": 2, "gpuMemory": "24Gi"},
    "replicas": 1,
    "extraArgs": ["--threads-http", "4"],
}


def vllm_matrix() -> list[dict[str, Any]]:
    """FULL_VLLM plus one variant per enum value vLLM accepts, and the boolean opposites."""
    specs = [copy.deepcopy(FULL_VLLM)]
    for method in enums.VLLM_QUANTIZATION_METHODS:
        s = copy.deepcopy(FULL_VLLM)
        s["quantization"]["method"] = method
        specs.append(s)
    for dtype in enums.VLLM_KV_CACHE_DTYPES:
        s = copy.deepcopy(FULL_VLLM)
        s["kvCache"]["dtype"] = dtype
        s["kvCache"]["prefixCaching"] = False
        specs.append(s)
    for dtype in enums.VLLM_DTYPES:
        s = copy.deepcopy(FULL_VLLM)
        s["quantization"]["dtype"] = dtype
        s["reasoning"]["thinking"] = "enabled"
        specs.append(s)
    for method in enums.VLLM_SPECULATIVE_METHODS:
        s = copy.deepcopy(FULL_VLLM)
        s["speculative"]["method"] = method
        specs.append(s)
    pvc = copy.deepcopy(FULL_VLLM)
    pvc["model"]["source"] = "pvc://models/checkpoints/model-7b"
    del pvc["model"]["revision"]
    specs.append(pvc)
    cached = copy.deepcopy(FULL_VLLM)
    cached["model"]["cache"] = {
        "claimName": "weights", "size": "500Gi", "storageClassName": "nfs", "accessMode": "ReadWriteOnce",
        "include": ["*.safetensors", "*.json"],
    }  # fmt: skip
    cached["adapters"] = [
        {"name": "org/model-sql", "source": "hf://org/sql-lora", "revision": "v2"},
        {"name": "chat-lora", "source": "pvc://loras/chat"},
    ]
    cached["lora"] = {"maxLoras": 2, "maxRank": 64, "maxCpuLoras": 8}
    specs.append(cached)
    return specs


def llama_matrix() -> list[dict[str, Any]]:
    specs = [copy.deepcopy(FULL_LLAMA)]
    for quant in enums.GGUF_TYPES:
        s = copy.deepcopy(FULL_LLAMA)
        s["model"]["source"] = f"org/model-GGUF:{quant}"
        s["quantization"]["method"] = quant
        s["multimodal"]["mmproj"] = "auto"
        specs.append(s)
    for dtype in enums.LLAMA_KV_CACHE_TYPES:
        s = copy.deepcopy(FULL_LLAMA)
        s["kvCache"]["dtype"] = dtype
        s["kvCache"]["prefixCaching"] = True
        s["parallelism"] = {"pipeline": 2}
        specs.append(s)
    for spec_type in enums.LLAMA_SPEC_TYPES:
        s = copy.deepcopy(FULL_LLAMA)
        s["speculative"]["method"] = spec_type
        specs.append(s)
    for fmt in enums.LLAMA_REASONING_FORMATS:
        s = copy.deepcopy(FULL_LLAMA)
        s["reasoning"]["parser"] = fmt
        s["reasoning"]["thinking"] = "disabled"
        specs.append(s)
    hf_file = copy.deepcopy(FULL_LLAMA)
    hf_file["model"]["source"] = "hf://org/model-GGUF/model-Q4_K_M.gguf"
    hf_file["multimodal"]["mmproj"] = "hf://org/model-GGUF/mmproj-f16.gguf"
    hf_file["speculative"]["model"] = "org/draft-GGUF:Q8_0"
    specs.append(hf_file)
    text_only = copy.deepcopy(FULL_LLAMA)
    text_only["model"]["source"] = "org/model-GGUF"
    text_only["modalities"] = ["text"]
    del text_only["multimodal"]
    specs.append(text_only)
    cached = copy.deepcopy(FULL_LLAMA)
    cached["model"].update(source="org/model-GGUF:Q4_K_M", revision="v2", cache={"claimName": "weights"})
    cached["multimodal"]["mmproj"] = "auto"
    cached["adapters"] = [
        {"name": "big-sql", "source": "hf://org/lora-GGUF/sql-f16.gguf", "scale": 0.5},
        {"name": "big-chat", "source": "pvc://loras/chat.gguf"},
    ]
    specs.append(cached)
    return specs


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with the dotted `path` set to `value` (or deleted if value is DELETE)."""
    spec = copy.deepcopy(base)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return spec


DELETE = object()
VLLM_MIN: dict[str, Any] = {"model": {"source": "hf://org/model"}}
LLAMA_MIN: dict[str, Any] = {"engine": "llama-server", "model": {"source": "org/model-GGUF:Q4_K_M"}}

# (id, spec, substring the apiserver's and our own error must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-engine", _with(VLLM_MIN, "engine", "sglang"), "engine"),
    ("no-source-no-remote", {"model": {"servedName": "x"}}, "set exactly one of model.source"),
    (
        "source-and-remote",
        _with(VLLM_MIN, "remote", {"baseURL": "https://api.example.com/v1", "model": "x"}),
        "set exactly one of model.source",
    ),
    (
        "s3-source",
        _with(VLLM_MIN, "model.source", "s3://bucket/model"),
        "s3:// and gs:// sources are not supported",
    ),
    ("bad-source", _with(VLLM_MIN, "model.source", "ftp://host/model"), "source"),
    ("gguf-on-vllm", _with(VLLM_MIN, "model.source", "org/model-GGUF:Q4_K_M"), "GGUF sources"),
    ("pvc-dir-on-llama", _with(LLAMA_MIN, "model.source", "pvc://models/dir"), "must end in .gguf"),
    (
        "gguf-quant-on-vllm",
        _with(VLLM_MIN, "quantization", {"method": "Q4_K_M"}),
        "quantization.method must be",
    ),
    (
        "vllm-quant-on-llama",
        _with(LLAMA_MIN, "quantization", {"method": "awq"}),
        "quantization.method must be",
    ),
    ("unknown-quant", _with(VLLM_MIN, "quantization", {"method": "bitsandbytes4"}), "method"),
    (
        "dtype-on-llama",
        _with(LLAMA_MIN, "quantization", {"dtype": "float16"}),
        "quantization.dtype is a vLLM",
    ),
    (
        "quant-mismatch",
        _with(_with(LLAMA_MIN, "quantization", {"method": "Q8_0"}), "model.source", "org/m:Q4_K_M"),
        "differs from quantization.method",
    ),
    ("llama-kv-on-vllm", _with(VLLM_MIN, "kvCache", {"dtype": "q8_0"}), "kvCache.dtype must be"),
    ("vllm-kv-on-llama", _with(LLAMA_MIN, "kvCache", {"dtype": "fp8"}), "kvCache.dtype must be"),
    ("kv-bytes-on-llama", _with(LLAMA_MIN, "kvCache", {"memoryBytes": 1 << 30}), "kvCache.memoryBytes"),
    ("util-above-one", _with(VLLM_MIN, "kvCache", {"gpuMemoryUtilization": 1.5}), "gpuMemoryUtilization"),
    (
        "revision-on-llama",
        _with(LLAMA_MIN, "model.revision", "main"),
        "model.revision on llama-server needs model.cache",
    ),
    (
        "trust-code-on-llama",
        _with(LLAMA_MIN, "model.trustRemoteCode", True),
        "model.trustRemoteCode is a vLLM",
    ),
    (
        "cache-on-pvc",
        _with(_with(VLLM_MIN, "model.source", "pvc://models/m"), "model.cache", {}),
        "model.cache fetches Hugging Face sources",
    ),
    (
        "cache-include-on-llama",
        _with(LLAMA_MIN, "model.cache", {"include": ["*.gguf"]}),
        "model.cache.include",
    ),
    ("cache-bad-access-mode", _with(VLLM_MIN, "model.cache", {"accessMode": "ReadOnlyMany"}), "accessMode"),
    ("cache-bad-claim-name", _with(VLLM_MIN, "model.cache", {"claimName": "Bad_Name"}), "claimName"),
    (
        "hf-adapter-without-cache",
        _with(VLLM_MIN, "adapters", [{"name": "a", "source": "hf://org/a"}]),
        "adapters from Hugging Face are fetched through the weight cache",
    ),
    (
        "adapter-bare-repo-source",
        _with(_with(VLLM_MIN, "model.cache", {}), "adapters", [{"name": "a", "source": "org/a"}]),
        "source",
    ),
    (
        "gguf-adapter-on-vllm",
        _with(VLLM_MIN, "adapters", [{"name": "a", "source": "pvc://loras/a.gguf"}]),
        "vLLM loads PEFT adapter directories",
    ),
    (
        "dir-adapter-on-llama",
        _with(LLAMA_MIN, "adapters", [{"name": "a", "source": "pvc://loras/a"}]),
        "llama-server loads GGUF LoRA adapters",
    ),
    (
        "adapter-scale-on-vllm",
        _with(VLLM_MIN, "adapters", [{"name": "a", "source": "pvc://loras/a", "scale": 0.5}]),
        "adapters[].scale is a llama-server setting",
    ),
    (
        "lora-on-llama",
        _with(
            _with(LLAMA_MIN, "adapters", [{"name": "a", "source": "pvc://l/a.gguf"}]), "lora", {"maxLoras": 2}
        ),
        "lora (maxLoras, maxRank, maxCpuLoras) holds vLLM settings",
    ),
    ("lora-without-adapters", _with(VLLM_MIN, "lora", {"maxLoras": 2}), "lora settings without adapters"),
    (
        "lora-cpu-below-gpu",
        _with(
            _with(VLLM_MIN, "adapters", [{"name": "a", "source": "pvc://l/a"}]),
            "lora",
            {"maxLoras": 4, "maxCpuLoras": 2},
        ),
        "lora.maxCpuLoras must be at least lora.maxLoras",
    ),
    (
        "lora-rank-not-a-choice",
        _with(_with(VLLM_MIN, "adapters", [{"name": "a", "source": "pvc://l/a"}]), "lora", {"maxRank": 48}),
        "maxRank",
    ),
    (
        "adapter-named-like-model",
        _with(_with(VLLM_MIN, "model.servedName", "m"), "adapters", [{"name": "m", "source": "pvc://l/a"}]),
        "an adapter's name must differ from model.servedName",
    ),
    (
        "adapter-named-like-alias",
        _with(_with(VLLM_MIN, "model.aliases", ["x"]), "adapters", [{"name": "x", "source": "pvc://l/a"}]),
        "an adapter's name must differ",
    ),
    (
        "adapters-on-remote",
        {
            "remote": {"baseURL": "https://api.example.com/v1", "model": "x"},
            "model": {"servedName": "x"},
            "adapters": [{"name": "a", "source": "pvc://l/a"}],
        },
        "adapters are not allowed with remote",
    ),
    (
        "tp-exceeds-gpus",
        _with(_with(VLLM_MIN, "parallelism", {"tensor": 4, "pipeline": 2}), "resources", {"gpus": 4}),
        "must not exceed resources.gpus",
    ),
    (
        "llama-tp-and-pp",
        _with(_with(LLAMA_MIN, "parallelism", {"tensor": 2, "pipeline": 2}), "resources", {"gpus": 4}),
        "not both",
    ),
    (
        "llama-spec-on-vllm",
        _with(VLLM_MIN, "speculative", {"method": "draft-simple", "model": "o/d"}),
        "speculative.method must be",
    ),
    ("vllm-spec-on-llama", _with(LLAMA_MIN, "speculative", {"method": "mtp"}), "speculative.method must be"),
    (
        "draft-without-model",
        _with(VLLM_MIN, "speculative", {"method": "draft_model"}),
        "set speculative.model",
    ),
    (
        "spec-tokens-too-many",
        _with(VLLM_MIN, "speculative", {"method": "ngram", "numTokens": 64}),
        "numTokens",
    ),
    (
        "draft-settings-on-vllm",
        _with(VLLM_MIN, "speculative", {"method": "ngram", "draft": {"pMin": 0.5}}),
        "speculative.draft holds llama-server",
    ),
    (
        "limit-mm-on-llama",
        _with(LLAMA_MIN, "multimodal", {"limitPerPrompt": {"image": 1}}),
        "multimodal.limitPerPrompt and multimodal.processorKwargs are vLLM",
    ),
    (
        "mmproj-on-vllm",
        _with(VLLM_MIN, "multimodal", {"mmproj": "auto"}),
        "multimodal.mmproj and multimodal.imageMaxTokens",
    ),
    (
        "image-llama-without-mmproj",
        _with(LLAMA_MIN, "modalities", ["text", "image"]),
        "needs multimodal.mmproj",
    ),
    ("mmproj-text-only", _with(LLAMA_MIN, "multimodal", {"mmproj": "auto"}), "does not include image"),
    (
        "mmproj-auto-with-pvc",
        _with(
            _with(_with(LLAMA_MIN, "model.source", "pvc://m/a.gguf"), "modalities", ["text", "image"]),
            "multimodal",
            {"mmproj": "auto"},
        ),
        "auto needs a Hugging Face source",
    ),
    ("image-only", _with(VLLM_MIN, "modalities", ["image"]), "modalities must include text"),
    ("unknown-modality", _with(VLLM_MIN, "modalities", ["text", "audio"]), "modalities"),
    ("llama-reasoning-format", _with(LLAMA_MIN, "reasoning", {"parser": "qwen3"}), "--reasoning-format"),
    ("bad-thinking", _with(VLLM_MIN, "reasoning", {"thinking": "maybe"}), "thinking"),
    (
        "min-above-max",
        _with(VLLM_MIN, "autoscaling", {"minReplicas": 3, "maxReplicas": 2}),
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "replicas-outside-autoscaling",
        _with(_with(VLLM_MIN, "autoscaling", {"minReplicas": 1, "maxReplicas": 2}), "replicas", 5),
        "replicas must lie within",
    ),
    ("negative-replicas", _with(VLLM_MIN, "replicas", -1), "replicas"),
    ("bad-strategy", _with(VLLM_MIN, "routing", {"strategy": "random"}), "strategy"),
    ("bad-duration", _with(VLLM_MIN, "routing", {"queueTimeout": "soon"}), "queueTimeout"),
    ("bad-quantity", _with(VLLM_MIN, "resources", {"memory": "lots"}), "quantity"),
    (
        "gpu-type-and-memory",
        _with(VLLM_MIN, "resources", {"gpuType": "L4", "gpuMemory": "24Gi"}),
        "not both",
    ),
    (
        "remote-with-engine-settings",
        {
            "model": {"servedName": "r"},
            "remote": {"baseURL": "https://api.example.com/v1", "model": "x"},
            "maxModelLen": 4096,
        },
        "remote models run no pods",
    ),
    ("remote-bad-url", {"model": {}, "remote": {"baseURL": "api.example.com", "model": "x"}}, "baseURL"),
    (
        "remote-bad-native-api",
        {
            "model": {},
            "remote": {"baseURL": "https://api.example.com/v1", "model": "x", "nativeAPIs": ["chat"]},
        },
        "nativeAPIs",
    ),
    ("negative-price", _with(VLLM_MIN, "pricing", {"promptPer1M": -1}), "promptPer1M"),
    ("bad-parameters", _with(VLLM_MIN, "model.parameters", "seven billion"), "parameters"),
    (
        "served-name-in-aliases",
        _with(_with(VLLM_MIN, "model.servedName", "a"), "model.aliases", ["a"]),
        "must not repeat",
    ),
    ("max-model-len-too-small", _with(VLLM_MIN, "maxModelLen", 1), "maxModelLen"),
    ("too-many-gpus", _with(VLLM_MIN, "resources", {"gpus": 1000}), "gpus"),
]
