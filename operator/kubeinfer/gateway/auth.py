"""API keys, per-key model allow-lists and requests/tokens-per-minute limits.

Keys are held only as SHA-256 digests: a presented key is hashed and compared with
`hmac.compare_digest`, and no key is ever logged. With no keys configured the gateway runs in
anonymous mode (local use): every request is the key `anonymous`, without limits, unless the store
was made with `required=True` (Kubernetes: deleting the last key Secret must not open the gateway).

Keys come from the static discovery file (digests only) or from labelled Kubernetes Secrets
(`api_key_from_secret`, the contract's LABEL_API_KEY).

Limits are sliding one-minute windows per key: requests are counted when admitted, tokens when a
response reports its usage; a key over either limit gets 429 with the seconds until the window frees.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any

from kubeinfer import contract

ANONYMOUS = "anonymous"
WINDOW = 60.0


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    """Who the key belongs to (the ledger's and metrics' label; never the key itself)."""
    key_sha256: str
    models: frozenset[str] | None = None
    """Public model names this key may use; None: all."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    allow_remote: bool = False
    """Whether requests with this key may go to `remote` models (which cost money per token)."""
    admin: bool = False
    """Whether this key may read /v1/admin/* (every key's usage, replica addresses)."""


@dataclass
class _Window:
    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def trim(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW:
            self.tokens.popleft()


_ANONYMOUS_KEY = ApiKey(ANONYMOUS, "", allow_remote=True, admin=True)  # frozen: one for all requests


class Denied(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _optional_int(annotations: dict[str, str], name: str) -> int | None:
    text = annotations.get(name)
    if text is None or not text.strip():
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"annotation {name}: {text!r} is not a positive integer")
    return int(text)


def api_key_from_secret(secret: dict[str, Any]) -> ApiKey:
    """The ApiKey a labelled Secret defines; ValueError says what is wrong with it."""
    meta = secret.get("metadata") or {}
    annotations: dict[str, str] = meta.get("annotations") or {}
    data: dict[str, str] = secret.get("data") or {}
    try:
        if contract.API_KEY_DATA in data:
            raw = base64.b64decode(data[contract.API_KEY_DATA], validate=True).decode().strip()
            if not raw:
                raise ValueError(f"data.{contract.API_KEY_DATA} is empty")
            key_sha256 = digest(raw)
        elif contract.API_KEY_SHA256_DATA in data:
            key_sha256 = base64.b64decode(data[contract.API_KEY_SHA256_DATA], validate=True).decode()
            key_sha256 = key_sha256.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", key_sha256):
                raise ValueError(f"data.{contract.API_KEY_SHA256_DATA} is not a hex SHA-256")
        else:
            raise ValueError(f"no data.{contract.API_KEY_DATA} or data.{contract.API_KEY_SHA256_DATA}")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("the key is not valid base64 text") from None
    models_text = annotations.get(contract.ANNOTATION_KEY_MODELS)
    models = None
    if models_text is not None:
        models = frozenset(m.strip() for m in models_text.split(",") if m.strip())
    return ApiKey(
        name=annotations.get(contract.ANNOTATION_KEY_NAME) or str(meta.get("name", "")),
        key_sha256=key_sha256,
        models=models,
        requests_per_minute=_optional_int(annotations, contract.ANNOTATION_KEY_RPM),
        tokens_per_minute=_optional_int(annotations, contract.ANNOTATION_KEY_TPM),
        allow_remote=annotations.get(contract.ANNOTATION_KEY_ALLOW_REMOTE, "").lower() == "true",
        admin=annotations.get(contract.ANNOTATION_KEY_ADMIN, "").lower() == "true",
    )


class KeyStore:
    def __init__(self, keys: list[ApiKey] | None = None, required: bool = False) -> None:
        self.required = required
        self.replace(keys or [])
        self._windows: dict[str, _Window] = {}

    def replace(self, keys: list[ApiKey]) -> None:
        self._by_digest = {k.key_sha256: k for k in keys}

    @property
    def anonymous(self) -> bool:
        return not self._by_digest and not self.required

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key of an `Authorization: Bearer ...` header (or `x-api-key`); raises Denied (401)."""
        if self.anonymous:
            return _ANONYMOUS_KEY
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not token:
            raise Denied(401, "invalid_api_key", "missing API key: send Authorization: Bearer <key>")
        wanted = digest(token)
        found = self._by_digest.get(wanted)
        if found is None or not hmac.compare_digest(found.key_sha256, wanted):
            raise Denied(401, "invalid_api_key", "invalid API key")
        return found

    def admit(self, key: ApiKey, public_model: str, now: float, remote: bool = False) -> None:
        """Check the allow-list and the limits, and count the request; raises Denied (403/429)."""
        if key.models is not None and public_model not in key.models:
            raise Denied(403, "model_not_allowed", f"this API key may not use model `{public_model}`")
        if remote and not key.allow_remote:
            raise Denied(
                403, "remote_not_allowed", f"`{public_model}` is a remote model; this key may not use it"
            )
        w = self._window(key.name)
        w.trim(now)
        if key.requests_per_minute is not None and len(w.requests) >= key.requests_per_minute:
            raise Denied(429, "rate_limit_exceeded", "requests per minute exceeded",
                         retry_after=WINDOW - (now - w.requests[0]))  # fmt: skip
        if key.tokens_per_minute is not None and sum(t for _, t in w.tokens) >= key.tokens_per_minute:
            raise Denied(429, "rate_limit_exceeded", "tokens per minute exceeded",
                         retry_after=WINDOW - (now - w.tokens[0][0]))  # fmt: skip
        w.requests.append(now)

    def spend(self, key: ApiKey, tokens: int, now: float) -> None:
        self._window(key.name).tokens.append((now, tokens))

    def _window(self, name: str) -> _Window:
        w = self._windows.get(name)
        if w is None:  # not setdefault(name, _Window()): that builds two deques on every request
            w = self._windows[name] = _Window()
        return w
