"""The building blocks of the API's models: the shared model config, Kubernetes field types
(quantities, durations) and string formats, and `cel()` for rules the apiserver evaluates."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DURATION_RE = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# hf://org/repo[/file.gguf], pvc://claim/path, org/repo[:QUANT]; s3:// and gs:// parse but are refused
# with their own message (CEL) so the user learns they are planned rather than misspelt.
SOURCE_RE = (
    r"^(hf://[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[\w./-]*)?"
    r"|[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?"
    r"|(s3|gs)://.+)$"
)
PARAMETERS_RE = r"^[0-9]+(\.[0-9]+)?[MBT](-A[0-9]+(\.[0-9]+)?[MB])?$"
LABEL_VALUE_RE = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(text: str) -> float:
    """'30s', '5m', '1h30m', '500ms' -> seconds (the API's Duration format)."""
    return float(sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)))


def _quantity_to_str(value: Any) -> Any:
    # Users write `cpu: 4` as often as `cpu: "4"`; keep one canonical string form.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


def _matching(pattern: str, what: str) -> Any:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    _matching(QUANTITY_RE, "a Kubernetes quantity such as 4, 500m, 16Gi"),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
Duration = Annotated[
    str,
    _matching(DURATION_RE, "a duration such as 30s, 5m, 1h"),
    Field(max_length=32, json_schema_extra={"pattern": DURATION_RE}),
]
Name = Annotated[str, Field(min_length=1, max_length=253)]


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class Base(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


FreeForm = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"}),
]
