"""Tiny random-weight models for the engine tests: nothing is downloaded, the output is gibberish.

- :func:`make_tiny_gguf` writes a llama-architecture GGUF for llama-server (embedding 64, FFN 128,
  2 blocks, 4 heads, 2 KV heads, tied output; about 9 MB with a 32000-token vocab). The tokenizer is
  copied from a vocab-only GGUF of the llama.cpp sources (see
  :func:`kubeinfer_devkit.engines.llamacpp.vocab_gguf`).
- :func:`make_tiny_hf_llama` writes a Hugging Face Llama that vLLM on CPU accepts (hidden 256,
  4 heads -> head_dim 64, 4 KV heads, 2 layers, intermediate 512; about 5 MB) with a byte-level BPE
  tokenizer (the 256 byte symbols, no merges) and a simple chat template. vLLM's CPU attention
  refuses head_dim 16, hence the wider model.

Both are deterministic for a given seed (and library versions). ``gguf``, ``numpy``,
``transformers``, ``tokenizers`` and ``torch`` are imported lazily: they come with the ``engines``
extra, and this module imports without them.

CLI::

    python -m kubeinfer_devkit.engines.tinymodels gguf OUT.gguf [--vocab VOCAB.gguf] [--seed N]
    python -m kubeinfer_devkit.engines.tinymodels hf OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

# The one chat template of both models: role headers, one message per block.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# GGUF model shape (llama architecture).
GGUF_EMBEDDING = 64
GGUF_FFN = 128
GGUF_BLOCKS = 2
GGUF_HEADS = 4
GGUF_KV_HEADS = 2
GGUF_CONTEXT = 4096  # n_ctx_train: tests run llama-server with -c 2048

# Hugging Face model shape (LlamaForCausalLM).
HF_HIDDEN = 256
HF_HEADS = 4
HF_KV_HEADS = 4
HF_LAYERS = 2
HF_INTERMEDIATE = 512
HF_MAX_POSITIONS = 2048

HF_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def make_tiny_gguf(path: Path, vocab_gguf: Path, seed: int = 0) -> Path:
    """Write a tiny random llama GGUF to `path`, with the tokenizer of `vocab_gguf`; return `path`."""
    import gguf
    import numpy as np

    path = Path(path)
    reader = gguf.GGUFReader(vocab_gguf)
    tokenizer_fields = [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{vocab_gguf} has no tokenizer.ggml.tokens: not a vocab GGUF")
    n_vocab = len(tokens.data)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    writer.add_name("kubeinfer-tiny-llama")
    writer.add_context_length(GGUF_CONTEXT)
    writer.add_embedding_length(GGUF_EMBEDDING)
    writer.add_feed_forward_length(GGUF_FFN)
    writer.add_block_count(GGUF_BLOCKS)
    writer.add_head_count(GGUF_HEADS)
    writer.add_head_count_kv(GGUF_KV_HEADS)
    writer.add_rope_dimension_count(GGUF_EMBEDDING // GGUF_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for field in tokenizer_fields:
        if field.name == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> Any:
        # numpy shape is (out, in); GGUF stores it reversed, as llama.cpp expects.
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    def ones(n: int) -> Any:
        return np.ones(n, dtype=np.float32)

    kv_dim = GGUF_KV_HEADS * (GGUF_EMBEDDING // GGUF_HEADS)
    # No output.weight: llama.cpp ties the output projection to token_embd.
    writer.add_tensor("token_embd.weight", weight(n_vocab, GGUF_EMBEDDING))
    writer.add_tensor("output_norm.weight", ones(GGUF_EMBEDDING))
    for i in range(GGUF_BLOCKS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(GGUF_EMBEDDING, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(GGUF_EMBEDDING, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(GGUF_FFN, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(GGUF_FFN, GGUF_EMBEDDING))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(GGUF_EMBEDDING, GGUF_FFN))
    write_gguf(writer)
    tmp.replace(path)
    return path


def write_gguf(writer: Any) -> None:
    """Write out a filled `gguf.GGUFWriter` (header, metadata, tensors) and close it."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (what ByteLevel pre-tokenizes to)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + extra
            extra += 1
    return [chr(table[b]) for b in range(256)]


def make_tiny_hf_llama(dir: Path, seed: int = 0) -> Path:
    """Write a tiny random Hugging Face Llama (config, safetensors, tokenizer) into `dir`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # transformers' partial annotations only confuse mypy here: use it untyped.
    transformers: Any = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars help nobody here

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)

    # Byte-level BPE without merges: every byte is one token, so any text encodes and decodes.
    vocab = {sym: i for i, sym in enumerate(_bytes_to_unicode())}
    for tok in HF_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(HF_SPECIAL_TOKENS))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=HF_MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=HF_HIDDEN,
        intermediate_size=HF_INTERMEDIATE,
        num_hidden_layers=HF_LAYERS,
        num_attention_heads=HF_HEADS,
        num_key_value_heads=HF_KV_HEADS,
        max_position_embeddings=HF_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.engines.tinymodels",
        description="Write a tiny random-weight model: a GGUF for llama-server or a HF Llama for vLLM.",
    )
    parser.add_argument("kind", choices=["gguf", "hf"])
    parser.add_argument("out", type=Path, help="output file (gguf) or folder (hf)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab",
        type=Path,
        help="vocab-only GGUF to take the tokenizer from (default: the one cached with llama-server, "
        "which builds llama-server if needed)",
    )
    args = parser.parse_args(argv)

    if args.kind == "gguf":
        vocab = args.vocab
        if vocab is None:
            from kubeinfer_devkit.engines.llamacpp import vocab_gguf

            vocab = vocab_gguf()
        path = make_tiny_gguf(args.out, vocab, seed=args.seed)
    else:
        path = make_tiny_hf_llama(args.out, seed=args.seed)
    print(json.dumps({"kind": args.kind, "path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
