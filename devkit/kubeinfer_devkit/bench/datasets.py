"""Prompts for `kubeinfer bench serve`. Pure and deterministic: the same arguments and seed give the
same prompts, byte for byte.

- `synthetic`: prompts of about `input_len` tokens made of seeded random common English words. Each of
  these words is one token (with its leading space) in the usual tokenizers, so a prompt of N words is
  about N tokens, plus the chat template's few.
- `shared_prefix`: `groups` distinct system prompts of `system_prompt_len` words; each request is one
  group's system prompt followed by a random question of `question_len` words. Every block of `groups`
  consecutive requests holds each group once, in a seeded random order, so groups interleave without a
  fixed period: a round-robin router over R replicas does not keep a group on one replica by accident
  (it would with the period `groups` whenever R divides it), and a prefix-aware router has to earn it.
- `load_jsonl`: one JSON object per line with `prompt` (a string) or `messages` (chat messages), and
  optionally `max_tokens`; blank lines are skipped. `cycle` repeats a file's prompts to the count asked.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Common words, one token each with their leading space: checked against Llama 2's 32k SentencePiece
# vocabulary (a 500-word prompt is 500 tokens); the larger vocabularies (Llama 3, Qwen, GPT) keep common
# words whole too.
_WORD_TEXT = """
    the of and to in is that for it as was with be by on not he this are or his from at which but have
    an had they you were their one all we can her has there been if more when will would who so no she
    other its may these about than into them only could time new some first out also two any like our
    then what such very over most made after see many where through back years much before good well
    should just because each those people how too little state world between both under last never day
    same another know while year great make us take man old year long work three high every own still
    part small found place around however home house end during without again right might left number
    away life here show form water large light city often until always group set hand game family case
    point week company system program question government night early room market story study order
    book plan house power money service line table river music paper level class field price park
    model health report change result black white green blue red short open close start stop round
    """
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))  # in order, without repeats


@dataclass(frozen=True)
class Prompt:
    """One request's input: chat `messages` or a completion `prompt` (either converts to the other)."""

    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs
    prompt: str | None = None
    max_tokens: int | None = None  # None: the run's --max-tokens
    group: int | None = None  # shared-prefix group, for analysis

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def completion_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(content for _, content in self.messages)


class DatasetError(ValueError):
    """A dataset argument or file the user has to fix; the message says which and where."""


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=max(1, n)))


def synthetic(n: int, input_len: int, output_len: int | None = None, seed: int = 0) -> list[Prompt]:
    if input_len < 1:
        raise DatasetError(f"--input-len must be at least 1, not {input_len}")
    rng = random.Random(f"synthetic:{seed}")
    return [Prompt(prompt=_words(rng, input_len), max_tokens=output_len) for _ in range(n)]


def shared_prefix(
    n: int,
    groups: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int | None = None,
    seed: int = 0,
) -> list[Prompt]:
    if groups < 1:
        raise DatasetError(f"--groups must be at least 1, not {groups}")
    if system_prompt_len < 1 or question_len < 1:
        raise DatasetError("--system-prompt-len and --question-len must be at least 1")
    rng = random.Random(f"shared-prefix:{seed}")
    # A distinct first word per group: prompts of different groups share no prefix at all.
    heads = rng.sample(WORDS, k=groups) if groups <= len(WORDS) else [f"group{g}" for g in range(groups)]
    systems = [
        heads[g] + (f" {_words(rng, system_prompt_len - 1)}" if system_prompt_len > 1 else "")
        for g in range(groups)
    ]
    order: list[int] = []
    while len(order) < n:
        block = list(range(groups))
        rng.shuffle(block)
        order += block
    return [
        Prompt(
            messages=(("system", systems[g]), ("user", _words(rng, question_len))),
            max_tokens=output_len,
            group=g,
        )
        for g in order[:n]
    ]


def load_jsonl(path: str | Path) -> list[Prompt]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: {exc.strerror or exc}") from None
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(_parse_line(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except DatasetError as exc:
            raise DatasetError(f"{path}:{lineno}: {exc}") from None
    if not prompts:
        raise DatasetError(f"{path}: no prompts")
    return prompts


def _parse_line(obj: Any) -> Prompt:
    if not isinstance(obj, dict):
        raise DatasetError("expected a JSON object with 'prompt' or 'messages'")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise DatasetError("'max_tokens' must be an integer")
    if isinstance(obj.get("prompt"), str):
        return Prompt(prompt=obj["prompt"], max_tokens=max_tokens)
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        pairs = []
        for m in messages:
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise DatasetError("each message needs a string 'role' and a string 'content'")
            pairs.append((m["role"], m["content"]))
        return Prompt(messages=tuple(pairs), max_tokens=max_tokens)
    raise DatasetError("expected 'prompt' (a string) or 'messages' (a non-empty list)")


def cycle(prompts: Sequence[Prompt], n: int, offset: int = 0) -> list[Prompt]:
    """`n` prompts taken in order from `offset`, wrapping around."""
    return [prompts[(offset + i) % len(prompts)] for i in range(n)]
