"""The simulator's text: its tokenizer, the prompt's chained block hashes, and the answer's words.

Pure and deterministic, like :mod:`kubeinfer_devkit.sim.model`, whose engine schedules the
:class:`Prompt` made here.

* Tokens: a token is a whitespace-separated word, words longer than `MAX_TOKEN_CHARS` count one token per
  that many characters. Real tokenizers give ~1.3 tokens per English word; one per word keeps prompts'
  token counts easy to reason about (a 2000-word system prompt is 2000 tokens).
* Block hashes: the prompt's full blocks of `block_size` tokens are hashed in a chain (each hash covers
  its block and every block before it, as vLLM's do), so a block hits the prefix cache only when the
  whole prefix up to it matches.
* Output: every request generates exactly `max_tokens` pseudo-words (finish reason "length"), drawn
  from a RNG seeded by `seed` and the prompt, so the same request always gets the same text.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

MAX_TOKEN_CHARS = 16
"""A longer word counts as one token per this many characters (a URL or a base64 blob is not one token)."""

_LONG_WORD = re.compile(rf"\S{{{MAX_TOKEN_CHARS + 1}}}")

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
VOCAB: tuple[str, ...] = tuple(random.Random(0).sample([a + b for a in _SYLLABLES for b in _SYLLABLES], 1024))
"""The words the simulator answers with: two syllables each, so each re-tokenizes as exactly one token.
A power of two, so that 16 random bits pick one uniformly."""


def tokenize(text: str) -> list[str]:
    """Whitespace-separated words; a word over MAX_TOKEN_CHARS counts one token per MAX_TOKEN_CHARS."""
    words = text.split()
    if _LONG_WORD.search(text) is None:  # the usual case: skip the per-word loop
        return words
    n = MAX_TOKEN_CHARS
    return [w[i : i + n] for w in words for i in range(0, len(w), n)]


@dataclass(frozen=True, slots=True)
class Prompt:
    num_tokens: int
    block_hashes: tuple[int, ...]
    """Chained hashes of the prompt's full blocks: block i's hash covers tokens [0, (i + 1) * block_size)."""
    digest: bytes
    """Digest of the prompt text, stable across processes: seeds the output text."""


def _chain(parent: int, tokens: Sequence[str], start: int, block_size: int) -> list[int]:
    """Hashes of the full blocks of `tokens` from index `start` (a block boundary), chained on `parent`.

    Python's hash() of a tuple: fast, and only ever compared within one process (vLLM's "builtin" hash).
    """
    out = []
    for i in range(start, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, *tokens[i : i + block_size]))
        out.append(parent)
    return out


_ROOT = 0x5EED


@lru_cache(maxsize=256)
def _head(piece: str, block_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Tokens and block hashes of a prompt's first piece. Cached: requests that share a long system
    prompt (the case prefix caching is for) tokenize and hash it once."""
    tokens = tokenize(piece)
    return tuple(tokens), tuple(_chain(_ROOT, tokens, 0, block_size))


def encode(pieces: Sequence[str], block_size: int) -> Prompt:
    """The prompt made of `pieces` (tokenized separately, so a piece boundary is a token boundary)."""
    if not pieces:
        return Prompt(0, (), hashlib.blake2b(b"", digest_size=8).digest())
    head_tokens, head_hashes = _head(pieces[0], block_size)
    digest = hashlib.blake2b("\x00".join(pieces).encode(), digest_size=8).digest()
    if len(pieces) == 1:
        return Prompt(len(head_tokens), head_hashes, digest)
    tokens = list(head_tokens)
    for piece in pieces[1:]:
        tokens += tokenize(piece)
    parent = head_hashes[-1] if head_hashes else _ROOT
    hashes = head_hashes + tuple(_chain(parent, tokens, len(head_hashes) * block_size, block_size))
    return Prompt(len(tokens), hashes, digest)


def chat_pieces(messages: Sequence[tuple[str, str]]) -> list[str]:
    """The chat template: each message as `<|role|>` and its text, then the generation prompt."""
    return [f"<|{role}|>\n{text}" for role, text in messages] + ["<|assistant|>"]


def output_words(seed: int, digest: bytes, n: int) -> list[str]:
    """The `n` words answered to a prompt with this digest. A longer answer extends a shorter one.

    The RNG is BLAKE2b in counter mode keyed by seed and prompt: 32 words per hash, no RNG object to seed
    per request.
    """
    key = seed.to_bytes(16, "big", signed=True) + digest
    out: list[str] = []
    mask = len(VOCAB) - 1
    for block in range(-(-n // 32)):
        raw = hashlib.blake2b(key + block.to_bytes(4, "big")).digest()
        out += [VOCAB[i & mask] for i in _WORD_INDICES.unpack(raw)]
    del out[n:]
    return out


_WORD_INDICES = struct.Struct(">32H")
