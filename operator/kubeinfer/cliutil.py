"""What every `kubeinfer` command group shares: the user-facing error and manifest loading."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml


class CLIError(Exception):
    """An error for the user: printed as one message, exit status 1, never a traceback."""


def load_documents(path: str) -> list[dict[str, Any]]:
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise CLIError(f"{path}: no such file")
        text = p.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CLIError(f"{path}: not valid YAML: {exc}") from None
    if not docs:
        raise CLIError(f"{path}: no documents")
    return docs


def parse_all(path: str) -> list[Any]:
    """Every LLMModel in a file, or one CLIError naming each invalid document and field."""
    from kubeinfer.validation import InvalidModel, parse_model

    models, errors = [], []
    for i, doc in enumerate(load_documents(path)):
        name = doc.get("metadata", {}).get("name", f"document {i + 1}") if isinstance(doc, dict) else i + 1
        try:
            models.append(parse_model(doc))
        except InvalidModel as exc:
            errors += [f"{path}: {name}: {p}" for p in exc.problems]
    if errors:
        raise CLIError("\n".join(errors))
    return models


def add_file_arg(p: Any) -> None:
    p.add_argument("-f", "--file", action="append", required=True, help="manifest file ('-' for stdin)")
