"""The gateway's configuration file (`kubeinfer gateway --config`, the Helm value `gateway.config`).

Every field has a command-line flag of the same meaning; a flag given on the command line wins over
the file. Unknown keys are refused, so a typo in the Helm values fails the pod at start, loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# The proxied APIs (gateway/proxy.py PROXIED), the keys of `maxBodyBytesByRoute`.
Route = Literal["chat/completions", "completions", "embeddings", "responses", "messages"]


class GatewayConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    scrape_interval: float = Field(default=1.0, gt=0, le=60)
    """Seconds between scrapes of every replica's /metrics."""
    scrape_timeout: float = Field(default=0.5, gt=0, le=60)
    """Per-replica scrape timeout in seconds."""
    hold_timeout: float | None = Field(default=None, gt=0, le=3600)
    """Seconds a request may wait for a replica; unset: each model's routing.queueTimeout."""
    retries: int = Field(default=2, ge=0, le=10)
    """Retries on another replica before the first byte (connection errors, 502/503/504)."""
    max_body_bytes: int = Field(default=32 << 20, ge=1024)
    """Request bodies larger than this get 413 (the routes not in `max_body_bytes_by_route`)."""
    max_body_bytes_by_route: dict[Route, Annotated[int, Field(ge=1024)]] = Field(default={})
    """Per-route body limits, by the path after /v1/ (`embeddings: 1048576`); others: max_body_bytes."""
    max_header_bytes: int = Field(default=64 << 10, ge=1024)
    """Requests whose header names and values add up to more than this get 431."""
    body_timeout: float = Field(default=30.0, gt=0, le=3600)
    """Seconds from the start of reading a request body to its last byte; later gets 408."""
    max_concurrent_per_client: int | None = Field(default=None, ge=1)
    """In-flight requests per API key (per client address when anonymous); more get 429. Unset: no limit."""
    keep_alive_timeout: float = Field(default=5.0, gt=0, le=3600)
    """Seconds an idle client connection is kept open after a response."""
    auth: Literal["auto", "keys", "anonymous"] = "auto"
    """keys: every request needs an API key; anonymous: none; auto: anonymous until a key exists."""
    keys_namespace: str | None = None
    """Namespace of the API-key Secrets (default: $POD_NAMESPACE, else all namespaces)."""
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    """One structured log line per proxied request (never the key or the body)."""


def load_config(path: str | Path | None) -> GatewayConfig:
    if path is None:
        return GatewayConfig()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return GatewayConfig.model_validate(data)
