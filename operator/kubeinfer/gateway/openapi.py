"""The gateway's own API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Static: the request schemas say what gateway/validate.py checks (its constants are used here, so the
two cannot drift), and nothing more, since the engines take many parameters of their own
(`additionalProperties` stays open). Answers are described loosely: they are the engine's, relayed.
tests/unit/test_gateway_validate.py checks that the paths and methods are the ones the app serves, and
tests/unit/test_gateway_fuzz.py fuzzes the gateway from this document.
"""

from __future__ import annotations

from typing import Any

from kubeinfer.gateway.validate import ANTHROPIC_ROLES, CHAT_ROLES, MAX_N, PART_TYPES, TOOL_TYPES

JSON = dict[str, Any]


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


_ERRORS: JSON = {
    "400": _error("The body is not valid JSON, not an object, nested too deep, or breaks a rule below "
                  "(`invalid_request_error`, `param` names the field)"),
    "401": _error("Missing or unknown API key"),
    "403": _error("The key may not use this model (or remote models)"),
    "404": _error("Unknown model (`model_not_found`)"),
    "413": _error("Body over `maxBodyBytes` (`request_too_large`)"),
    "429": _error("The key's rate limit, or the model's queue is full (`Retry-After`)"),
    "502": _error("Every replica tried failed"),
    "503": _error("No ready or free replica within the model's queue timeout"),
    "504": _error("The replica timed out (relayed)"),
}  # fmt: skip
_ADMIN_ERRORS: JSON = {k: _ERRORS[k] for k in ("401", "403")}

_COUNT: JSON = {"type": ["integer", "null"], "minimum": 1}
_TEMPERATURE: JSON = {"type": ["number", "null"], "minimum": 0, "maximum": 2}
_TOP_P: JSON = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_STREAM: JSON = {"type": ["boolean", "null"]}
_MODEL: JSON = {"type": "string", "minLength": 1, "description": "A served name or alias (`GET /v1/models`)"}
_TOKENS: JSON = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT: JSON = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKENS,
        {"type": "array", "minItems": 1, "items": _TOKENS},
    ],
}

_TEXT_PART: JSON = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_OTHER_PART: JSON = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": sorted(PART_TYPES - {"text"})}},
}
_CONTENT: JSON = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [_TEXT_PART, _OTHER_PART]}}]
}
_CHAT_MESSAGE: JSON = {
    "description": "`content` may be null (or absent) in an assistant message with `tool_calls` or "
    "`function_call`, and in a `function` message",
    "anyOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"enum": sorted(CHAT_ROLES)}, "content": _CONTENT},
        },
        {
            "type": "object",
            "required": ["role", "tool_calls"],
            "properties": {
                "role": {"const": "assistant"},
                "content": {"type": "null"},
                "tool_calls": {"type": "array", "minItems": 1, "items": {"type": "object"}},
            },
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"const": "function"}, "content": {"type": "null"}},
        },
    ],
}
_TOOL: JSON = {
    "oneOf": [
        {
            "type": "object",
            "required": ["type", kind],
            "properties": {
                "type": {"const": kind},
                kind: {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}},
                },
            },
        }
        for kind in TOOL_TYPES
    ]
}
_BLOCKS: JSON = {
    "type": "array",
    "items": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}},
}

_SCHEMAS: JSON = {
    "Error": {
        "type": "object",
        "description": "OpenAI's error envelope (every error the gateway answers, /v1/messages included)",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": {"type": "array", "minItems": 1, "items": _CHAT_MESSAGE},
            "n": {**_COUNT, "maximum": MAX_N},
            "max_tokens": _COUNT,
            "max_completion_tokens": _COUNT,
            "temperature": _TEMPERATURE,
            "top_p": _TOP_P,
            "stream": _STREAM,
            "tools": {"type": ["array", "null"], "items": _TOOL},
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": _MODEL,
            "prompt": _PROMPT,
            "n": {**_COUNT, "maximum": MAX_N},
            "max_tokens": _COUNT,
            "temperature": _TEMPERATURE,
            "top_p": _TOP_P,
            "stream": _STREAM,
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": _MODEL, "input": _PROMPT},
    },
    "ResponseRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": _MODEL,
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "instructions": {"type": ["string", "null"]},
            "max_output_tokens": _COUNT,
            "temperature": _TEMPERATURE,
            "top_p": _TOP_P,
            "stream": _STREAM,
            "tools": {"type": ["array", "null"]},
        },
    },
    "MessagesRequest": {
        "type": "object",
        "description": "Anthropic's Messages API",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"enum": list(ANTHROPIC_ROLES)},
                        "content": {"oneOf": [{"type": "string"}, _BLOCKS]},
                    },
                },
            },
            "system": {"oneOf": [{"type": "string"}, _BLOCKS, {"type": "null"}]},
            "max_tokens": _COUNT,
            "temperature": {**_TEMPERATURE, "maximum": 1},
            "top_p": _TOP_P,
            "stream": _STREAM,
            "stop_sequences": {"type": ["array", "null"], "items": {"type": "string"}},
            "tools": {"type": ["array", "null"]},
        },
    },
    "List": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}},
    },
}


def _proxied(summary: str, schema: str) -> JSON:
    return {
        "post": {
            "summary": summary,
            "description": "Checked by the gateway (the schema below), then relayed to a replica of the "
            "model; streamed as server-sent events with `stream: true`.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(schema)}}},
            "responses": {
                "200": {
                    "description": "The engine's answer, relayed",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/event-stream": {},  # events as the engine sends them
                    },
                },
                **_ERRORS,
            },
        }
    }


def _get(summary: str, content: JSON, errors: JSON | None = None, public: bool = False) -> JSON:
    op: JSON = {"summary": summary, "responses": {"200": {"description": "OK", "content": content},
                                                  **(errors or {})}}  # fmt: skip
    if public:
        op["security"] = []
    return {"get": op}


_TEXT: JSON = {"text/plain": {"schema": {"type": "string"}}}
_LIST: JSON = {"application/json": {"schema": _ref("List")}}
_OBJECT: JSON = {"application/json": {"schema": {"type": "object"}}}

DOCUMENT: JSON = {
    "openapi": "3.1.0",
    "info": {
        "title": "kubeinfer gateway",
        "version": "v1",
        "description": "OpenAI-compatible (and Anthropic Messages) API in front of the cluster's models. "
        "Every error is OpenAI's envelope; a route asked with the wrong method is 405 with `Allow`.",
    },
    "paths": {
        "/v1/chat/completions": _proxied("Chat completions", "ChatCompletionRequest"),
        "/v1/completions": _proxied("Completions", "CompletionRequest"),
        "/v1/embeddings": _proxied("Embeddings", "EmbeddingRequest"),
        "/v1/responses": _proxied("Responses API", "ResponseRequest"),
        "/v1/messages": _proxied("Anthropic Messages API", "MessagesRequest"),
        "/v1/models": _get("The models this key may use", _LIST, _ADMIN_ERRORS),
        "/v1/admin/models": _get("Per model: replicas, queue, load (admin keys)", _LIST, _ADMIN_ERRORS),
        "/v1/admin/usage": _get("The usage ledger per key and model (admin keys)", _LIST, _ADMIN_ERRORS),
        "/healthz": _get("Liveness", _TEXT, public=True),
        "/readyz": {
            "get": {
                "summary": "Readiness: 503 until discovery has listed models, pods and keys",
                "security": [],
                "responses": {
                    "200": {"description": "Ready", "content": _TEXT},
                    "503": {"description": "Not synced yet", "content": _TEXT},
                },
            }
        },
        "/metrics": _get("Prometheus metrics", _TEXT, public=True),
        "/openapi.json": _get("This document", _OBJECT, public=True),
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key"},
            "apiKeyHeader": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "The same API key, as Anthropic's SDK sends it",
            },
        },
    },
    # Either header; none at all where the gateway runs with `auth: anonymous` (or `auto`, no key yet).
    "security": [{"bearer": []}, {"apiKeyHeader": []}, {}],
}
