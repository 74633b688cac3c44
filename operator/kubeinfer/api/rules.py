"""The LLMModel spec's cross-field rules, in CEL: the apiserver evaluates them (the CRD's
`x-kubernetes-validations` on spec), and so does `kubeinfer validate`, with the same expressions.

Each is (rule, message); the messages are listed in docs/api-reference.md.
"""

from __future__ import annotations

from kubeinfer.api import enums


def _quoted(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


_VLLM_QUANT = _quoted(enums.VLLM_QUANTIZATION_METHODS)
_VLLM_KV = _quoted(enums.VLLM_KV_CACHE_DTYPES)
_VLLM_SPEC = _quoted(enums.VLLM_SPECULATIVE_METHODS)
_LLAMA_REASONING = _quoted(enums.LLAMA_REASONING_FORMATS)
_GGUF_SOURCE = "(self.model.source.endsWith('.gguf') || self.model.source.matches('^[^:]+/[^:/]+:[^/]+$'))"

SPEC_RULES: tuple[tuple[str, str], ...] = (
    (
        "has(self.remote) != has(self.model.source)",
        "set exactly one of model.source (kubeinfer runs the model) and remote (an existing "
        "OpenAI-compatible endpoint)",
    ),
    (
        "!has(self.remote) || !(has(self.quantization) || has(self.kvCache) || has(self.speculative) || "
        "has(self.parallelism) || has(self.multimodal) || has(self.image) || has(self.extraArgs) || "
        "has(self.podTemplate) || has(self.maxModelLen) || has(self.maxNumSeqs))",
        "remote models run no pods: engine settings (quantization, kvCache, speculative, parallelism, "
        "multimodal, maxModelLen, maxNumSeqs, image, extraArgs, podTemplate) are not allowed with remote",
    ),
    (
        f"self.engine == 'llama-server' || !has(self.model.source) || !{_GGUF_SOURCE}",
        "GGUF sources (a .gguf file or org/repo:QUANT) need engine llama-server",
    ),
    (
        "self.engine != 'llama-server' || !has(self.model.source) || !self.model.source.startsWith('pvc://') "
        "|| self.model.source.endsWith('.gguf')",
        "llama-server loads one .gguf file: a pvc:// source must end in .gguf",
    ),
    (
        "!has(self.quantization) || !has(self.quantization.method) || "
        f"((self.engine == 'vllm') == (self.quantization.method in {_VLLM_QUANT}))",
        "quantization.method must be a vLLM method (awq, gptq, fp8, ...) with engine vllm, and a GGUF "
        "type (Q4_K_M, Q5_K_S, Q8_0, ...) with engine llama-server",
    ),
    (
        "self.engine == 'vllm' || !has(self.quantization) || !has(self.quantization.dtype)",
        "quantization.dtype is a vLLM setting (--dtype): a GGUF file fixes its own types",
    ),
    (
        "!has(self.quantization) || !has(self.quantization.method) || !has(self.model.source) || "
        "!self.model.source.matches(':[A-Za-z0-9_]+$') || "
        "self.model.source.endsWith(':' + self.quantization.method)",
        "model.source names a GGUF quant (org/repo:QUANT) that differs from quantization.method",
    ),
    (
        "!has(self.kvCache) || !has(self.kvCache.dtype) || "
        f"((self.engine == 'vllm') == (self.kvCache.dtype in {_VLLM_KV}))",
        "kvCache.dtype must be a vLLM --kv-cache-dtype (auto, fp8, ...) with engine vllm, and a "
        "llama-server cache type (f16, q8_0, q4_0, ...) with engine llama-server",
    ),
    (
        "self.engine == 'vllm' || !has(self.kvCache) || "
        "!(has(self.kvCache.memoryBytes) || has(self.kvCache.gpuMemoryUtilization))",
        "kvCache.memoryBytes and kvCache.gpuMemoryUtilization are vLLM settings; llama-server sizes its "
        "cache from maxModelLen x maxNumSeqs",
    ),
    (
        "self.engine == 'vllm' || !has(self.model.trustRemoteCode)",
        "model.trustRemoteCode is a vLLM setting",
    ),
    (
        "self.engine == 'vllm' || !has(self.model.revision) || has(self.model.cache)",
        "model.revision on llama-server needs model.cache (the download Job fetches that revision); "
        "llama-server's own download takes the default branch",
    ),
    (
        "self.engine == 'vllm' || !has(self.model.cache) || !has(self.model.cache.include)",
        "model.cache.include selects the files of a vLLM checkpoint; llama-server fetches the one GGUF "
        "file or quant that model.source names",
    ),
    (
        "!has(self.parallelism) || self.resources.gpus == 0 || "
        "self.parallelism.tensor * self.parallelism.pipeline <= self.resources.gpus",
        "parallelism.tensor x parallelism.pipeline must not exceed resources.gpus",
    ),
    (
        "self.engine == 'vllm' || !has(self.parallelism) || "
        "self.parallelism.tensor == 1 || self.parallelism.pipeline == 1",
        "llama-server splits a model either by rows (tensor) or by layers (pipeline), not both",
    ),
    (
        f"!has(self.speculative) || ((self.engine == 'vllm') == (self.speculative.method in {_VLLM_SPEC}))",
        "speculative.method must be a vLLM method (mtp, draft_model, ngram, eagle3, ...) with engine "
        "vllm, and a llama-server --spec-type (draft-simple, draft-mtp, ngram-mod, ...) with llama-server",
    ),
    (
        "!has(self.speculative) || has(self.speculative.model) || !(self.speculative.method in "
        f"{_quoted(enums.VLLM_SPECULATIVE_NEEDS_MODEL + enums.LLAMA_SPEC_NEEDS_MODEL)})",
        "this speculative.method loads a draft model: set speculative.model",
    ),
    (
        "self.engine == 'vllm' || !has(self.speculative) || !has(self.speculative.model) || "
        "!self.speculative.model.startsWith('hf://') || !self.speculative.model.endsWith('.gguf')",
        "llama-server takes a draft model as pvc://claim/file.gguf or org/repo[:QUANT], not hf://.../file.gguf",
    ),
    (
        "self.engine == 'llama-server' || !has(self.speculative) || !has(self.speculative.draft)",
        "speculative.draft holds llama-server settings; for vLLM use speculative.config",
    ),
    (
        "self.engine == 'vllm' || !has(self.speculative) || !has(self.speculative.config)",
        "speculative.config holds vLLM speculative_config keys; for llama-server use speculative.draft",
    ),
    (
        "self.engine == 'vllm' || !has(self.multimodal) || "
        "!(has(self.multimodal.limitPerPrompt) || has(self.multimodal.processorKwargs))",
        "multimodal.limitPerPrompt and multimodal.processorKwargs are vLLM settings",
    ),
    (
        "self.engine == 'llama-server' || !has(self.multimodal) || "
        "!(has(self.multimodal.mmproj) || has(self.multimodal.imageMaxTokens))",
        "multimodal.mmproj and multimodal.imageMaxTokens are llama-server settings",
    ),
    (
        "self.engine != 'llama-server' || has(self.remote) || !('image' in self.modalities) || "
        "(has(self.multimodal) && has(self.multimodal.mmproj))",
        "image input on llama-server needs multimodal.mmproj (a projector .gguf, or auto for an hf source)",
    ),
    (
        "!has(self.multimodal) || !has(self.multimodal.mmproj) || 'image' in self.modalities",
        "multimodal.mmproj is set but modalities does not include image",
    ),
    (
        "!has(self.multimodal) || !has(self.multimodal.mmproj) || self.multimodal.mmproj != 'auto' || "
        "(has(self.model.source) && !self.model.source.startsWith('pvc://'))",
        "multimodal.mmproj: auto needs a Hugging Face source; for pvc:// name the projector file",
    ),
    (
        "self.engine == 'vllm' || !has(self.reasoning) || !has(self.reasoning.parser) || "
        f"self.reasoning.parser in {_LLAMA_REASONING}",
        "reasoning.parser on llama-server is its --reasoning-format: none, deepseek, deepseek-legacy or auto",
    ),
    (
        "!has(self.adapters) || !has(self.remote)",
        "remote models run no engine: adapters are not allowed with remote",
    ),
    (
        "!has(self.adapters) || has(self.model.cache) || self.adapters.all(a, a.source.startsWith('pvc://'))",
        "adapters from Hugging Face are fetched through the weight cache: set model.cache, or use "
        "pvc:// adapter sources",
    ),
    (
        "self.engine == 'vllm' || !has(self.adapters) || self.adapters.all(a, a.source.endsWith('.gguf'))",
        "llama-server loads GGUF LoRA adapters: each adapter source must name a .gguf file",
    ),
    (
        "self.engine == 'llama-server' || !has(self.adapters) || "
        "self.adapters.all(a, !a.source.endsWith('.gguf'))",
        "vLLM loads PEFT adapter directories (adapter_config.json and weights), not .gguf files",
    ),
    (
        "self.engine == 'llama-server' || !has(self.adapters) || self.adapters.all(a, !has(a.scale))",
        "adapters[].scale is a llama-server setting",
    ),
    (
        "self.engine == 'vllm' || !has(self.lora)",
        "lora (maxLoras, maxRank, maxCpuLoras) holds vLLM settings; llama-server loads every adapter at "
        "start",
    ),
    (
        "!has(self.lora) || has(self.adapters)",
        "lora settings without adapters: list the adapters in spec.adapters",
    ),
    (
        "!has(self.lora) || !has(self.lora.maxLoras) || !has(self.lora.maxCpuLoras) || "
        "self.lora.maxCpuLoras >= self.lora.maxLoras",
        "lora.maxCpuLoras must be at least lora.maxLoras",
    ),
    (
        "!has(self.adapters) || ((!has(self.model.servedName) || "
        "self.adapters.all(a, a.name != self.model.servedName)) && (!has(self.model.aliases) || "
        "self.adapters.all(a, !(a.name in self.model.aliases))))",
        "an adapter's name must differ from model.servedName and model.aliases",
    ),
    (
        "'text' in self.modalities",
        "modalities must include text",
    ),
    (
        "!has(self.autoscaling) || (self.replicas >= self.autoscaling.minReplicas && "
        "self.replicas <= self.autoscaling.maxReplicas)",
        "replicas must lie within autoscaling.minReplicas..maxReplicas",
    ),
)
