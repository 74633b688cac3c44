"""The contract between the operator and the gateway.

Everything the gateway reads off a model pod (labels, annotations, the port) is named here, once.
The operator writes these keys in the renderer; the gateway's discovery selects and reads by them.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "kubeinfer.io"
VERSION: Final = "v1alpha1"
KIND: Final = "LLMModel"
PLURAL: Final = "llmmodels"
SINGULAR: Final = "llmmodel"
SHORT_NAMES: Final = ("llm",)
API_VERSION: Final = f"{GROUP}/{VERSION}"

# Labels (selectable): on the Deployment, its pod template, the Service and the PDB.
LABEL_MODEL: Final = f"{GROUP}/model"  # metadata.name of the LLMModel
LABEL_ENGINE: Final = f"{GROUP}/engine"  # "vllm" | "llama-server"
LABEL_SPEC_HASH: Final = f"{GROUP}/spec-hash"  # hash of the rendered pod template inputs
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_NAME: Final = "app.kubernetes.io/name"
COMPONENT_MODEL_SERVER: Final = "model-server"
MANAGED_BY: Final = "kubeinfer"

# Annotations (not selectable; values may hold '/' and ':' that labels forbid).
ANNOTATION_SERVED_NAME: Final = f"{GROUP}/served-name"
ANNOTATION_ALIASES: Final = f"{GROUP}/aliases"  # JSON list of strings
ANNOTATION_MODALITIES: Final = f"{GROUP}/modalities"  # JSON list, e.g. ["text","image"]
ANNOTATION_PORT: Final = f"{GROUP}/port"
ANNOTATION_METRICS_PATH: Final = f"{GROUP}/metrics-path"
# llama-server pods: JSON list of {"name", "id", "scale"}, the LoRA adapters loaded at start, where
# id is the engine's adapter index (a request's `lora: [{"id", "scale"}]`).
ANNOTATION_ADAPTERS: Final = f"{GROUP}/adapters"

# API keys of the gateway are Secrets with this label (value "true"). The key itself is the Secret's
# data item API_KEY_DATA (or its SHA-256 in API_KEY_SHA256_DATA); the policy is in annotations, so
# `kubectl get secret -o yaml` shows who may do what without revealing the key.
LABEL_API_KEY: Final = f"{GROUP}/api-key"
API_KEY_DATA: Final = "key"
API_KEY_SHA256_DATA: Final = "keySha256"
ANNOTATION_KEY_NAME: Final = f"{GROUP}/key-name"  # ledger/metrics name; default: the Secret's name
ANNOTATION_KEY_MODELS: Final = f"{GROUP}/models"  # comma-separated public model names; absent: all
ANNOTATION_KEY_RPM: Final = f"{GROUP}/requests-per-minute"
ANNOTATION_KEY_TPM: Final = f"{GROUP}/tokens-per-minute"
ANNOTATION_KEY_ALLOW_REMOTE: Final = f"{GROUP}/allow-remote"  # "true" lets the key use remote models
ANNOTATION_KEY_ADMIN: Final = f"{GROUP}/admin"  # "true" lets the key read /v1/admin/*

# Every engine container listens here; the gateway connects to podIP:ENGINE_PORT.
ENGINE_PORT: Final = 8000
ENGINE_PORT_NAME: Final = "http"
METRICS_PATH: Final = "/metrics"
HEALTH_PATH: Final = "/health"

# Requests the gateway keeps in flight per replica when neither routing.targetInflight nor
# maxNumSeqs says.
DEFAULT_TARGET_INFLIGHT: Final = 32


def target_inflight(routing_target: int | None, max_num_seqs: int | None) -> int:
    """Requests the gateway keeps in flight per replica (the operator sizes llama-server by it)."""
    return routing_target or max_num_seqs or DEFAULT_TARGET_INFLIGHT


# Engines close idle keep-alive connections after 5 s (cpp-httplib's and uvicorn's default); the
# gateway drops its idle upstream connections first, so it never reuses one the engine is closing.
UPSTREAM_KEEPALIVE_SECONDS: Final = 4.0


def llama_http_threads(target_inflight: int) -> int:
    """`--threads-http` for llama-server: fixed HTTP threads for every connection the gateways hold.

    llama-server serves each connection on its own thread. Past its fixed threads it should add
    dynamic ones, but a burst of new connections can stay queued behind threads that keep-alive
    connections hold, for a minute or more. Measured with hack/llama-http-burst.py (24 requests at
    once at fresh -np 4 servers, idle connections kept 60 s): with the default 8 fixed threads 6
    of 31 servers stalled, with 64 none of 30. Room for four gateway pods, each with
    targetInflight requests and a scrape.
    """
    return max(64, 4 * (target_inflight + 1))


# Where model files live inside the engine container.
MODELS_ROOT: Final = "/models"
PVC_MOUNT_ROOT: Final = f"{MODELS_ROOT}/pvc"
CACHE_MOUNT: Final = f"{MODELS_ROOT}/cache"  # per-pod emptyDir: what an engine downloads itself
# The shared weight cache claim (model.cache): read-only in engines, read-write in download Jobs.
WEIGHTS_MOUNT: Final = f"{MODELS_ROOT}/weights"
# The fetcher links these names to the GGUF file and projector it chose, so the engine's command line
# is known before the download (render/weights.py).
WEIGHTS_GGUF_LINK: Final = "model.gguf"
WEIGHTS_MMPROJ_LINK: Final = "mmproj.gguf"
COMPONENT_WEIGHTS: Final = "weights"
LABEL_CACHE_CLAIM: Final = f"{GROUP}/cache-claim"
LABEL_CACHE_KEY_HASH: Final = f"{GROUP}/cache-entry"
ANNOTATION_CACHE_KEY: Final = f"{GROUP}/cache-key"  # the entry's directory in the claim
ANNOTATION_CACHE_SOURCE: Final = f"{GROUP}/cache-source"

ENGINE_CONTAINER: Final = "engine"

# Children are named "<model>-<suffix>"-free: the Deployment, Service and PDB share the model's
# name with this prefix, so a model name plus prefix stays within the 63-character DNS label limit.
CHILD_PREFIX: Final = "llm-"
MAX_MODEL_NAME_LENGTH: Final = 63 - len(CHILD_PREFIX) - 10  # room for ReplicaSet/pod suffixes


def child_name(model_name: str) -> str:
    """Name of the Deployment, Service and PodDisruptionBudget of a model."""
    return f"{CHILD_PREFIX}{model_name}"


def selector_labels(model_name: str) -> dict[str, str]:
    """Labels that select every pod of one model (stable across rollouts)."""
    return {LABEL_MODEL: model_name, LABEL_COMPONENT: COMPONENT_MODEL_SERVER}
