"""Validate LLMModel manifests offline, with the same rules the apiserver applies.

Two passes: pydantic checks types, enums, bounds and unknown fields; then the CEL rules of the
generated CRD (`x-kubernetes-validations`) are evaluated with cel-python against the defaulted
object, so `kubeinfer validate` reports what `kubectl apply` would, without a cluster. Transition
rules (those reading `oldSelf`) only apply to updates and are skipped here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import celpy
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError
from pydantic import ValidationError

from kubeinfer import crdgen
from kubeinfer.api.v1alpha1 import LLMModel


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidModel(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"]
        if e["type"] == "literal_error" or e["type"] == "enum":
            msg = f"{msg} (got {e.get('input')!r})"
        elif e["type"] == "extra_forbidden":
            msg = "unknown field"
        problems.append(Problem(_loc(loc), msg))
    return problems


@cache
def _compiled_rules() -> list[tuple[tuple[str, ...], str, str, Any]]:
    """(schema path, rule, message, program) for every CEL rule of the CRD, compiled once."""
    env = celpy.Environment()
    root = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    out = []
    for path, rule, message in _walk_rules(root, ()):
        if "oldSelf" in rule:
            continue
        out.append((path, rule, message, env.program(env.compile(rule))))
    return out


def _walk_rules(schema: dict[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str, str]]:
    for v in schema.get("x-kubernetes-validations", []):
        yield path, v["rule"], v["message"]
    for name, sub in schema.get("properties", {}).items():
        yield from _walk_rules(sub, (*path, name))
    if "items" in schema:
        yield from _walk_rules(schema["items"], (*path, "[]"))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk_rules(schema["additionalProperties"], (*path, "{}"))


def _values_at(obj: Any, path: tuple[str, ...], where: str = "") -> Iterator[tuple[str, Any]]:
    if not path:
        yield where, obj
        return
    head, rest = path[0], path[1:]
    if head == "[]":
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                yield from _values_at(item, rest, f"{where}[{i}]")
    elif head == "{}":
        if isinstance(obj, dict):
            for k, item in obj.items():
                yield from _values_at(item, rest, f"{where}[{k}]")
    elif isinstance(obj, dict) and head in obj:
        yield from _values_at(obj[head], rest, f"{where}.{head}" if where else head)


def cel_problems(defaulted: dict[str, Any]) -> list[Problem]:
    """Evaluate the CRD's CEL rules against an already-defaulted manifest (camelCase dict)."""
    problems = []
    for path, _rule, message, program in _compiled_rules():
        for where, value in _values_at(defaulted, path):
            try:
                ok = program.evaluate({"self": json_to_cel(value)})
            except Exception as exc:  # a rule that cannot evaluate is a failed rule, as on the apiserver
                problems.append(Problem(where, f"{message} (rule error: {exc})"))
                continue
            if isinstance(ok, CELEvalError) or not bool(ok):
                problems.append(Problem(where, message))
    return problems


def parse_model(manifest: dict[str, Any]) -> LLMModel:
    """Parse and fully validate one manifest; raises InvalidModel listing every problem."""
    if not isinstance(manifest, dict):
        raise InvalidModel([Problem("", "a manifest must be a YAML mapping")])
    if manifest.get("kind") not in (None, "LLMModel"):
        raise InvalidModel([Problem("kind", f"expected LLMModel, got {manifest.get('kind')!r}")])
    try:
        model = LLMModel.model_validate(manifest)
    except ValidationError as err:
        raise InvalidModel(_pydantic_problems(err)) from None
    defaulted = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    problems = cel_problems(defaulted)
    if problems:
        raise InvalidModel(problems)
    return model
