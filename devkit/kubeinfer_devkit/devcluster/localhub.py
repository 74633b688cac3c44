"""The local stack's Hugging Face Hub: the tiny models and LoRA adapters as Hub repositories.

`kubeinfer up` builds ``<state>/hub/`` from the tiny models it generated into the models claim, and
runs :class:`kubeinfer_devkit.hub.server.HubServer` on it as a supervised child (``logs/hub.log``,
one line per request). The operator gets its URL as ``hfEndpoint`` in the stack's operator
configuration, so the weight cache's download Jobs (``kubeinfer weights fetch``) fetch from it, as
they would from huggingface.co. Nothing is downloaded from the internet.

Repositories (organisation :data:`ORG`), all deterministic:

================================  ====================================================================
``tiny-gguf``                     ``tiny-F32.gguf`` (the tiny GGUF, a hard link), ``tiny-F16.gguf``
                                  (the same weights in F16): ``kubeinfer-local/tiny-gguf:F16``
``tiny-gguf-gated``               the same files, gated: files need ``Authorization: Bearer`` :data:`TOKEN`
``tiny-gguf-lora``                ``pirate.gguf``, ``legal.gguf``: GGUF LoRA adapters of the tiny GGUF
                                  (rank 4, seeds 1 and 2)
``tiny-llama``                    the tiny Hugging Face Llama (config, safetensors, tokenizer) for vLLM
``tiny-llama-lora-a``, ``-b``     PEFT LoRA adapters of it (rank 4, seeds 1 and 2)
================================  ====================================================================

Each repository is built in ``<hub>/.staging/`` and renamed into place when complete (the Hub never
lists half a repository); one that exists is kept, so a restarted stack serves the same bytes.

CLI (what ``up`` runs beside the node agent's start; adapters need torch)::

    python -m kubeinfer_devkit.devcluster.localhub --hub DIR --models DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kubeinfer_devkit.engines.tinymodels import write_gguf

ORG = "kubeinfer-local"
TOKEN = "hf_kubeinfer_local_dev_token"
"""The token the stack's Hub accepts for gated repositories (a fixed dev token, not a secret)."""
GATED_MARKER = ".hub-gated"  # as kubeinfer_devkit.hub.server reads it
LORA_RANK = 4
TINY_GGUF = "tiny-llama.gguf"  # in the models claim (supervisor.py generates them)
TINY_HF = "tiny-llama-hf"
STAGING = ".staging"
LOG = "hub-build.log"


def _link(src: Path, dst: Path) -> None:
    """A hard link (same bytes, no copy; the state directory is one filesystem), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            _link(path, dst / path.relative_to(src))


def gguf_to_f16(src: Path, dst: Path) -> Path:
    """Write `src` (an F32 GGUF) again with its matrices in F16 (vectors stay F32, as llama.cpp's
    converter keeps norms): a second quant of the same model."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for t in reader.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        writer.add_tensor(t.name, data.astype(np.float16) if data.ndim == 2 else data)
    write_gguf(writer)
    return dst


def _gguf_repo(gguf: Path, out: Path) -> None:
    _link(gguf, out / "tiny-F32.gguf")
    gguf_to_f16(gguf, out / "tiny-F16.gguf")
    (out / "README.md").write_text("The kubeinfer local stack's tiny random-weight GGUF (F32, F16).\n")


def _gated_repo(gguf_repo: Path, out: Path) -> None:
    _link_tree(gguf_repo, out)
    (out / GATED_MARKER).write_text("")


def _gguf_lora_repo(gguf: Path, out: Path) -> None:
    from kubeinfer_devkit.engines.tinylora import make_tiny_gguf_lora

    make_tiny_gguf_lora(out / "pirate.gguf", gguf, rank=LORA_RANK, seed=1)
    make_tiny_gguf_lora(out / "legal.gguf", gguf, rank=LORA_RANK, seed=2)


def _peft_repo(seed: int) -> Callable[[Path, Path], None]:
    def build(hf: Path, out: Path) -> None:
        from kubeinfer_devkit.engines.tinylora import make_tiny_peft_lora

        make_tiny_peft_lora(out, hf, rank=LORA_RANK, seed=seed)

    return build


def build(hub: Path, models: Path, say: Callable[[str], None] = print) -> list[str]:
    """Build the missing repositories under `hub` from the tiny models in `models`; their ids."""
    gguf, hf = models / TINY_GGUF, models / TINY_HF
    org = hub / ORG
    # (repository, what it is built from, the file that says that is complete, how)
    steps: list[tuple[str, Path, Path, Callable[[Path, Path], None]]] = [
        ("tiny-gguf", gguf, gguf, _gguf_repo),
        ("tiny-gguf-gated", org / "tiny-gguf", org / "tiny-gguf", _gated_repo),
        ("tiny-gguf-lora", gguf, gguf, _gguf_lora_repo),
        ("tiny-llama", hf, hf / "config.json", _link_tree),
        ("tiny-llama-lora-a", hf, hf / "config.json", _peft_repo(1)),
        ("tiny-llama-lora-b", hf, hf / "config.json", _peft_repo(2)),
    ]
    built = []
    for name, base, needs, step in steps:
        final = org / name
        if final.is_dir():
            continue
        if not needs.exists():
            say(f"hub: not building {ORG}/{name}: {needs} is missing")
            continue
        staging = hub / STAGING / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            step(base, staging)
        except Exception as exc:  # one repository less; the others are still worth building
            hint = " (make install-engines)" if isinstance(exc, ImportError) else ""
            say(f"hub: not building {ORG}/{name}: {type(exc).__name__}: {exc}{hint}")
            shutil.rmtree(staging, ignore_errors=True)
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
        built.append(f"{ORG}/{name}")
        say(f"hub: built {ORG}/{name}")
    shutil.rmtree(hub / STAGING, ignore_errors=True)
    return built


def start_build(hub: Path, models: Path, logs: Path) -> subprocess.Popen[bytes]:
    """Build the repositories in a child process (the adapters import torch: not in the supervisor)."""
    cmd = [sys.executable, "-m", "kubeinfer_devkit.devcluster.localhub", "--hub", str(hub),
           "--models", str(models)]  # fmt: skip
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / LOG, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def server_argv(hub: Path, port: int) -> list[str]:
    """The Hub's command line: every request logged to stdout (the supervisor's logs/hub.log)."""
    return [sys.executable, "-m", "kubeinfer_devkit.hub.server", "--root", str(hub), "--host", "127.0.0.1",
            "--port", str(port), "--token", TOKEN, "--access-log"]  # fmt: skip


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubeinfer_devkit.devcluster.localhub",
        description="Build the local stack's Hub repositories from its tiny models.",
    )
    parser.add_argument("--hub", type=Path, required=True, help="the Hub's root folder")
    parser.add_argument("--models", type=Path, required=True, help="the folder with the tiny models")
    args = parser.parse_args(argv)
    args.hub.mkdir(parents=True, exist_ok=True)
    build(args.hub, args.models, say=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
