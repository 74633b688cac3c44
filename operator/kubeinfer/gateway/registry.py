"""What the gateway serves: models (by served name and alias) and their replicas.

Discovery (static YAML now; the Kubernetes watch fills the same structure) writes it; the request
path only reads it. Pure data, no I/O except `load_static`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import Pricing, RemoteAPI, Routing
from kubeinfer.gateway.auth import ApiKey
from kubeinfer.gateway.routing import Endpoint


class _Base(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class StaticRemote(_Base):
    base_url: str = Field(alias="baseURL")
    model: str
    api_key_env: str | None = None
    """Environment variable holding the upstream key (the file never holds it)."""
    native_apis: list[RemoteAPI] = Field(
        default=["chat/completions", "completions", "embeddings"], alias="nativeAPIs"
    )


class StaticModel(_Base):
    name: str
    remote: StaticRemote | None = None
    served_name: str | None = None
    aliases: list[str] = Field(default_factory=list)
    engine: Literal["vllm", "llama-server"] = "vllm"
    modalities: list[Literal["text", "image"]] = Field(default=["text"])
    routing: Routing = Field(default_factory=Routing)
    pricing: Pricing | None = None
    max_num_seqs: int | None = None
    endpoints: list[str] = Field(default_factory=list)
    """host:port of each replica."""


class StaticKey(_Base):
    name: str
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the key, hex (`printf %s "$KEY" | sha256sum`): the file never holds a key."""
    models: list[str] | None = None
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    allow_remote: bool = False
    admin: bool = False


class StaticDiscovery(_Base):
    models: list[StaticModel]
    api_keys: list[StaticKey] = Field(default_factory=list)


@dataclass(frozen=True)
class RemoteTarget:
    """An OpenAI-compatible API elsewhere: requests go to `base_url` with `model` and `api_key`."""

    base_url: str
    model: str
    api_key: str | None = None
    native_apis: frozenset[str] = frozenset({"chat/completions", "completions", "embeddings"})
    """Endpoints the remote serves; the gateway translates `responses`/`messages` to chat otherwise."""


def remote_endpoint(model: str, base_url: str) -> Endpoint:
    """The always-ready pseudo-replica of a remote model (':' cannot occur in a pod name)."""
    return Endpoint(id=f"remote:{model}", address=base_url, model=model)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    served_name: str
    aliases: tuple[str, ...] = ()
    engine: str = "vllm"
    modalities: tuple[str, ...] = ("text",)
    routing: Routing = field(default_factory=Routing)
    max_num_seqs: int | None = None
    remote: RemoteTarget | None = None
    pricing: Pricing | None = None
    estimate: dict[str, object] | None = None
    """The operator's GPU-memory fit estimate (status.estimate), shown by /v1/admin/models."""
    namespace: str | None = None
    object_name: str = ""
    """The LLMModel's metadata.name (`name` above may carry the namespace: `ns/name`)."""
    replicas: int | None = None
    """spec.replicas as last seen (Kubernetes discovery)."""
    scale_from_zero: bool = False
    """The builtin autoscaler may take it to zero: a request for it at zero replicas asks for one."""
    adapters: tuple[str, ...] = ()
    """Names of its LoRA adapters (spec.adapters): each is a model id of its own for clients."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Estimated cost of a request's tokens at the model's price per million."""
        if self.pricing is None:
            return 0.0
        return (
            prompt_tokens * self.pricing.prompt_per1_m + completion_tokens * self.pricing.completion_per1_m
        ) / 1e6

    @property
    def target_inflight(self) -> int:
        return contract.target_inflight(self.routing.target_inflight, self.max_num_seqs)

    @property
    def accepts_images(self) -> bool:
        return "image" in self.modalities


class Registry:
    """Models and replicas. Replaced wholesale per model by discovery; read by requests."""

    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.endpoints: dict[str, list[Endpoint]] = {}
        self._names: dict[str, str] = {}
        self._adapters: dict[str, str] = {}  # adapter name -> model name
        # Set by Kubernetes discovery: asks for one replica of a model at zero (scale from zero).
        self.waker: Callable[[ModelEntry], None] | None = None

    def wake(self, entry: ModelEntry) -> None:
        """A request arrived for `entry` and no replica is ready: if it is scaled to zero, scale it up
        now (not on the autoscaler's next round)."""
        if self.waker is not None and entry.scale_from_zero and entry.replicas == 0:
            self.waker(entry)

    def state(self, name: str) -> str:
        """ready | starting (replicas exist, none ready yet) | scaled-to-zero | unavailable."""
        entry = self.models.get(name)
        if self.has_ready(name):
            return "ready"
        if self.endpoints.get(name):
            return "starting"
        if entry is not None and entry.replicas == 0:
            return "scaled-to-zero"
        return "unavailable"

    def progress(self, name: str) -> str:
        """Where a cold start stands, in words for a person waiting on it."""
        if self.has_ready(name):
            return "a replica is ready"
        phases = [f"{e.id}: {e.phase}" for e in self.endpoints.get(name, []) if e.phase]
        if phases:
            return "; ".join(phases)
        entry = self.models.get(name)
        if entry is not None and entry.replicas == 0:
            return "scale-up requested" if entry.scale_from_zero else "scaled to zero"
        return "waiting for a pod"

    def set_model(self, entry: ModelEntry, endpoints: list[Endpoint]) -> None:
        self.models[entry.name] = entry
        self.endpoints[entry.name] = endpoints
        self._reindex()

    def remove_model(self, name: str) -> None:
        self.models.pop(name, None)
        self.endpoints.pop(name, None)
        self._reindex()

    def _reindex(self) -> None:
        names: dict[str, str] = {}
        adapters: dict[str, str] = {}
        for entry in self.models.values():
            for public in (entry.served_name, *entry.aliases):
                names.setdefault(public, entry.name)
        for entry in self.models.values():
            for adapter in entry.adapters:
                if adapter not in names:  # a model's own name wins over another's adapter
                    names[adapter] = entry.name
                    adapters[adapter] = entry.name
        self._names, self._adapters = names, adapters

    def resolve(self, public_name: str) -> ModelEntry | None:
        """The model a public id names: a served name, an alias, or one of its adapters."""
        name = self._names.get(public_name)
        return self.models.get(name) if name else None

    def adapter_for(self, public_name: str) -> str | None:
        """The adapter a public id names, or None for a model's own name."""
        return public_name if public_name in self._adapters else None

    def listed_adapters(self) -> list[tuple[ModelEntry, str]]:
        """(base model, adapter) for the adapters of the models `listed` shows."""
        return [
            (entry, adapter)
            for entry in self.models.values()
            if entry.adapters and (self.has_ready(entry.name) or entry.scale_from_zero)
            for adapter in entry.adapters
            if self._adapters.get(adapter) == entry.name
        ]

    def ready_endpoints(self, name: str) -> list[Endpoint]:
        return [e for e in self.endpoints.get(name, []) if e.ready]

    def has_ready(self, name: str) -> bool:
        """Whether any replica is ready (per request: no list built)."""
        return any(e.ready for e in self.endpoints.get(name, ()))

    def listed(self) -> list[tuple[ModelEntry, str]]:
        """(model, public id) for every served name and alias of the models a request can reach: with a
        ready replica, or scaled to zero and woken by the first request."""
        out = []
        for entry in self.models.values():
            if self.has_ready(entry.name) or entry.scale_from_zero:
                out += [(entry, public) for public in (entry.served_name, *entry.aliases)]
        return out


def load_static(path: str | Path) -> Registry:
    data: Any = yaml.safe_load(Path(path).read_text())
    spec = StaticDiscovery.model_validate(data)
    reg = Registry()
    for m in spec.models:
        remote = None
        if m.remote is not None:
            key = os.environ.get(m.remote.api_key_env) if m.remote.api_key_env else None
            remote = RemoteTarget(m.remote.base_url, m.remote.model, key, frozenset(m.remote.native_apis))
        entry = ModelEntry(
            name=m.name, served_name=m.served_name or m.name, aliases=tuple(m.aliases), engine=m.engine,
            modalities=tuple(m.modalities), routing=m.routing, max_num_seqs=m.max_num_seqs, remote=remote,
            pricing=m.pricing,
        )  # fmt: skip
        eps = [Endpoint(id=f"{m.name}-{i}", address=a, model=m.name) for i, a in enumerate(m.endpoints)]
        if remote is not None:  # one always-ready pseudo-replica: the remote API
            eps = [remote_endpoint(m.name, remote.base_url)]
        reg.set_model(entry, eps)
    return reg


def load_static_keys(path: str | Path) -> list[ApiKey]:
    spec = StaticDiscovery.model_validate(yaml.safe_load(Path(path).read_text()))
    return [
        ApiKey(k.name, k.key_sha256, frozenset(k.models) if k.models is not None else None,
               k.requests_per_minute, k.tokens_per_minute, k.allow_remote, k.admin)
        for k in spec.api_keys
    ]  # fmt: skip
