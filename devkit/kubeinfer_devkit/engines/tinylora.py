"""Tiny random LoRA adapters for the tiny models of :mod:`kubeinfer_devkit.engines.tinymodels`.

- :func:`make_tiny_gguf_lora` writes a GGUF LoRA adapter that llama-server loads (``--lora FILE``,
  ``--lora-scaled FILE:SCALE``) on top of a tiny GGUF: ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha``, the architecture of the base, and a
  ``<tensor>.lora_a`` / ``<tensor>.lora_b`` pair for every attention and FFN matrix of every block
  (the names of the base tensors, as ``convert_lora_to_gguf.py`` writes them). llama.cpp's loader
  (src/llama-adapter.cpp) wants, in GGUF order (ne0, ne1): base (n_in, n_out), lora_a (n_in, rank),
  lora_b (rank, n_out); numpy shapes are the reverse: A (rank, n_in), B (n_out, rank). It applies
  ``W x + scale * alpha / rank * B (A x)``.
- :func:`make_tiny_peft_lora` writes a PEFT adapter folder that vLLM loads (``--lora-modules`` or
  ``POST /v1/load_lora_adapter``) on top of a tiny Hugging Face Llama: ``adapter_config.json`` and
  ``adapter_model.safetensors`` with
  ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (rank, n_in) and
  ``...lora_B.weight`` (n_out, rank); PEFT scales by ``lora_alpha / r``.

Unlike a freshly initialised PEFT adapter (B = 0, a no-op), both A and B are random and large
enough that greedy decoding clearly differs from the base model and between seeds. Both generators
are deterministic for a given seed (and library versions). ``gguf``, ``numpy``, ``torch`` and
``safetensors`` are imported lazily, as in :mod:`~kubeinfer_devkit.engines.tinymodels`.

CLI::

    python -m kubeinfer_devkit.engines.tinylora gguf OUT.gguf --base BASE.gguf [--rank R] [--seed N]
    python -m kubeinfer_devkit.engines.tinylora peft OUT_DIR --base BASE_DIR [--rank R] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kubeinfer_devkit.engines.tinymodels import write_gguf

# GGUF tensors the adapter targets (per block), as named in the base model.
GGUF_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Hugging Face Llama modules the PEFT adapter targets, and where they live in a decoder layer.
PEFT_TARGETS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Standard deviation of the random A and B entries. With alpha = rank the update B @ A has entries of
# about sqrt(rank) * STD**2 (0.08 at rank 4): several times the base weights of the tiny models
# (0.02), so the adapter changes the greedy output, while the activations stay finite.
LORA_STD = 0.2


def make_tiny_gguf_lora(
    path: Path, base_gguf: Path, rank: int = 4, alpha: float | None = None, seed: int = 0
) -> Path:
    """Write a random GGUF LoRA adapter for `base_gguf` to `path`; return `path`.

    Every block's attention and FFN matrices get a rank-`rank` pair; `alpha` defaults to `rank`
    (effective scale 1 at ``--lora FILE``). The architecture and shapes are read from the base.
    """
    import gguf
    import numpy as np

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    path = Path(path)
    reader = gguf.GGUFReader(base_gguf)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ValueError(f"{base_gguf} has no general.architecture: not a model GGUF")
    arch = str(arch_field.contents())
    # GGUF shape is (ne0, ne1) = (n_in, n_out) for a matrix.
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    targets = sorted(
        (name for name in shapes if name.startswith("blk.") and name.split(".")[2] in GGUF_TARGETS),
        key=lambda n: (int(n.split(".")[1]), GGUF_TARGETS.index(n.split(".")[2])),
    )
    if not targets:
        raise ValueError(f"{base_gguf} has none of the tensors {GGUF_TARGETS}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    writer.add_name(f"kubeinfer-tiny-lora-r{rank}-s{seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    rng = np.random.default_rng(seed)
    for name in targets:
        n_in, n_out = shapes[name]
        stem = name.removesuffix(".weight")
        a = (rng.standard_normal((rank, n_in), dtype=np.float32) * LORA_STD).astype(np.float32)
        b = (rng.standard_normal((n_out, rank), dtype=np.float32) * LORA_STD).astype(np.float32)
        writer.add_tensor(f"{stem}.weight.lora_a", a)
        writer.add_tensor(f"{stem}.weight.lora_b", b)
    write_gguf(writer)
    tmp.replace(path)
    return path


def make_tiny_peft_lora(
    dir: Path,
    base_hf_dir: Path,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    target_modules: tuple[str, ...] = tuple(PEFT_TARGETS),
) -> Path:
    """Write a random PEFT LoRA adapter for the HF Llama in `base_hf_dir` into `dir`; return it.

    `alpha` defaults to `rank` (PEFT scaling 1). ``base_model_name_or_path`` is the base folder's
    absolute path; shapes come from its config.json.
    """
    import torch
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    unknown = set(target_modules) - set(PEFT_TARGETS)
    if unknown:
        raise ValueError(f"unknown target modules {sorted(unknown)}; known: {list(PEFT_TARGETS)}")
    base = Path(base_hf_dir).resolve()
    config = json.loads((base / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    shapes = {  # module -> (n_in, n_out)
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    for layer in range(layers):
        for module in target_modules:
            n_in, n_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{PEFT_TARGETS[module]}.{module}"
            a = torch.randn((rank, n_in), generator=gen, dtype=torch.float32) * LORA_STD
            b = torch.randn((n_out, rank), generator=gen, dtype=torch.float32) * LORA_STD
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()

    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank if alpha is None else alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": list(target_modules),
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "adapter_model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; an engine in a pod may run as another user
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.engines.tinylora",
        description="Write a tiny random LoRA adapter: GGUF for llama-server or PEFT for vLLM.",
    )
    parser.add_argument("kind", choices=["gguf", "peft"])
    parser.add_argument("out", type=Path, help="output file (gguf) or folder (peft)")
    parser.add_argument(
        "--base", type=Path, required=True, help="the tiny base model: GGUF file or HF folder"
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=None, help="default: the rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.kind == "gguf":
        path = make_tiny_gguf_lora(args.out, args.base, rank=args.rank, alpha=args.alpha, seed=args.seed)
    else:
        path = make_tiny_peft_lora(args.out, args.base, rank=args.rank, alpha=args.alpha, seed=args.seed)
    print(json.dumps({"kind": args.kind, "path": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
