"""The weight cache (model.cache), rendered: cache entries, the claim, the download Job.

Pure. A *cache entry* is one set of files fetched from one Hugging Face repository at one revision
(the base model's weights, or one LoRA adapter), kept in the directory `<key>` of the cache claim.
The key is a function of what is fetched (repository, revision, file selection), so two models that
name the same files share one entry, and one Job fills it; a different revision or quant is a new
entry beside it. The Job runs `kubeinfer weights fetch` (kubeinfer/weights/fetch.py) in the
kubeinfer image, which downloads into a temporary directory and moves it into place when complete,
so an engine never sees half-written files.

Why a field and not a `ModelCache` kind: the cache has no lifecycle of its own that users manage
(it is a claim plus directories named by content), and sharing follows from the key, so a second
object to create, reference and keep in sync would add a step without adding a decision.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import LLMModel, WeightCache
from kubeinfer.render.config import RenderConfig
from kubeinfer.render.source import parse_source

# What vLLM needs of a checkpoint repository: weights, configs, tokenizer, chat template. Leaves out
# the duplicate .bin/.pt/.gguf/.onnx copies many repositories carry beside the safetensors.
VLLM_INCLUDE = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*")
# A PEFT adapter directory.
PEFT_INCLUDE = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json")
# llama.cpp's -hf picks Q4_K_M when a repository is named without a quant; the cache does the same.
DEFAULT_GGUF_QUANT = "Q4_K_M"
# Exit codes of `kubeinfer weights fetch` that retrying cannot fix (kubeinfer/weights/fetch.py): the
# Job's podFailurePolicy fails the Job at once on them instead of trying backoffLimit more pods.
PERMANENT_EXIT_CODES = (10, 11, 12, 13, 14)
FETCH_BACKOFF_LIMIT = 4
# A finished download Job is removed after an hour. Models that saw it complete keep that in their
# status; a model that comes later runs a new Job, which finds the entry complete and downloads
# nothing (or fetches it again if it was evicted), and a failed download is thus retried hourly.
FETCH_JOB_TTL_SECONDS = 3600

Role = Literal["model", "adapter"]


@dataclass(frozen=True)
class CacheEntry:
    """One directory of the cache claim and how the download Job fills it."""

    role: Role
    name: str  # "model", or the adapter's name
    source: str  # as written in the spec
    repo: str
    revision: str
    include: tuple[str, ...] = ()
    gguf_quant: str = ""
    gguf_file: str = ""
    mmproj: bool = False

    @property
    def key(self) -> str:
        """Directory name: readable repository and revision, plus a hash of the file selection."""
        ident = json.dumps(
            [
                self.repo,
                self.revision,
                sorted(self.include),
                self.gguf_quant.upper(),
                self.gguf_file,
                self.mmproj,
            ]
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
        readable = f"{self.repo.replace('/', '--')}--{self.revision}".lower()
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in readable)[:120]
        return f"{safe}--{digest}"

    @property
    def path(self) -> str:
        """The entry's directory inside an engine container."""
        return f"{contract.WEIGHTS_MOUNT}/{self.key}"

    @property
    def is_gguf(self) -> bool:
        return bool(self.gguf_quant or self.gguf_file)

    @property
    def file_path(self) -> str:
        """What the engine loads: the GGUF file (the fetcher links model.gguf to it) or the directory."""
        return f"{self.path}/{contract.WEIGHTS_GGUF_LINK}" if self.is_gguf else self.path

    @property
    def mmproj_path(self) -> str:
        return f"{self.path}/{contract.WEIGHTS_MMPROJ_LINK}"


def cache_of(model: LLMModel) -> WeightCache | None:
    return model.spec.model.cache if model.spec.remote is None else None


def model_entry(model: LLMModel) -> CacheEntry | None:
    """The base model's entry, when its weights come through the cache."""
    spec = model.spec
    cache = cache_of(model)
    if cache is None or not spec.model.source:
        return None
    source = parse_source(spec.model.source)
    if source.kind != "hf":
        return None
    revision = spec.model.revision or "main"
    if spec.engine == "vllm":
        include = tuple(cache.include or VLLM_INCLUDE)
        if spec.model.trust_remote_code and not cache.include:
            include += ("*.py",)
        return CacheEntry("model", "model", spec.model.source, source.repo, revision, include=include)
    quant = "" if source.file else (source.quant or _quant(model) or DEFAULT_GGUF_QUANT)
    mm = spec.multimodal
    auto_mmproj = "image" in spec.modalities and mm is not None and mm.mmproj == "auto"
    return CacheEntry(
        "model", "model", spec.model.source, source.repo, revision,
        gguf_quant=quant, gguf_file=source.file, mmproj=auto_mmproj,
    )  # fmt: skip


def _quant(model: LLMModel) -> str:
    q = model.spec.quantization
    return q.method if q and q.method else ""


def adapter_entries(model: LLMModel) -> list[CacheEntry]:
    """One entry per Hugging Face adapter (pvc:// adapters are read in place)."""
    if cache_of(model) is None:
        return []
    out = []
    for a in model.spec.adapters or []:
        source = parse_source(a.source)
        if source.kind != "hf":
            continue
        revision = a.revision or "main"
        if model.spec.engine == "llama-server":
            out.append(CacheEntry("adapter", a.name, a.source, source.repo, revision, gguf_file=source.file))
        else:
            include = (source.file + "/*",) if source.file else PEFT_INCLUDE
            out.append(CacheEntry("adapter", a.name, a.source, source.repo, revision, include=include))
    return out


def entries(model: LLMModel) -> list[CacheEntry]:
    """Every cache entry the model needs before its pods can start (base first, then adapters)."""
    base = model_entry(model)
    return ([base] if base else []) + adapter_entries(model)


def adapter_path(model: LLMModel, name: str) -> str | None:
    """Where an adapter's files are inside the engine container (cached or pvc://)."""
    for a in model.spec.adapters or []:
        if a.name != name:
            continue
        source = parse_source(a.source)
        if source.kind == "pvc":
            return source.local_path
        entry = next((e for e in adapter_entries(model) if e.name == name), None)
        if entry is None:
            return None
        if entry.is_gguf:
            return entry.file_path
        return f"{entry.path}/{source.file}" if source.file else entry.path
    return None


def job_name(claim: str, entry: CacheEntry) -> str:
    """One Job per (claim, entry): a DNS label, stable, within 63 characters."""
    digest = hashlib.sha256(f"{claim}\0{entry.key}".encode()).hexdigest()[:12]
    return f"kubeinfer-fetch-{digest}"


def _cache_labels(claim: str) -> dict[str, str]:
    return {
        contract.LABEL_NAME: "kubeinfer",
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_COMPONENT: contract.COMPONENT_WEIGHTS,
        contract.LABEL_CACHE_CLAIM: claim,
    }


def cache_claim(model: LLMModel) -> dict[str, Any] | None:
    """The cache's PersistentVolumeClaim, created if missing and never owned by a model (shared)."""
    cache = cache_of(model)
    if cache is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [cache.access_mode],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": cache.claim_name,
            "namespace": model.namespace,
            "labels": _cache_labels(cache.claim_name),
        },
        "spec": spec,
    }


def fetch_args(entry: CacheEntry) -> list[str]:
    args = ["weights", "fetch", "--root", contract.WEIGHTS_MOUNT, "--key", entry.key, "--repo", entry.repo]
    args += ["--revision", entry.revision]
    for pattern in entry.include:
        args += ["--include", pattern]
    if entry.gguf_file:
        args += ["--gguf-file", entry.gguf_file]
    elif entry.gguf_quant:
        args += ["--gguf-quant", entry.gguf_quant]
    if entry.mmproj:
        args.append("--mmproj")
    return args


def fetch_job(model: LLMModel, entry: CacheEntry, config: RenderConfig) -> dict[str, Any]:
    """The download Job of one entry. Not owned by the model: other models may wait on it, and a
    finished Job is the record that the entry is complete (the directory's marker file is the truth;
    a Job run again over a complete entry downloads nothing)."""
    cache = cache_of(model)
    assert cache is not None
    claim = cache.claim_name
    env: list[dict[str, Any]] = [
        # The fetcher's own progress is JSON lines on stdout; huggingface_hub's bars would garble them.
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": config.hf_endpoint})
    ref = model.spec.model.token_secret_ref
    if ref:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key, "optional": False}},
            }
        )
    labels = {**_cache_labels(claim), contract.LABEL_CACHE_KEY_HASH: job_name(claim, entry).rsplit("-", 1)[1]}
    container: dict[str, Any] = {
        "name": "fetch",
        "image": config.image_for("kubeinfer"),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeinfer"],
        "args": fetch_args(entry),
        "env": env,
        "volumeMounts": [{"name": "weights", "mountPath": contract.WEIGHTS_MOUNT}],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        # The operator reads the reason of a failure here when the pod's log is gone.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(claim, entry),
            "namespace": model.namespace,
            "labels": labels,
            "annotations": {
                contract.ANNOTATION_CACHE_KEY: entry.key,
                contract.ANNOTATION_CACHE_SOURCE: entry.source,
            },
        },
        "spec": {
            "backoffLimit": FETCH_BACKOFF_LIMIT,
            "ttlSecondsAfterFinished": FETCH_JOB_TTL_SECONDS,
            # A missing repository, a gated one without a token, a quant the repository lacks, a full
            # disk: another pod would fail the same way, so the Job fails at once and says why.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "fetch",
                            "operator": "In",
                            "values": list(PERMANENT_EXIT_CODES),
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": claim}}],
                    "enableServiceLinks": False,
                },
            },
        },
    }


def cache_objects(model: LLMModel, config: RenderConfig) -> list[dict[str, Any]]:
    """The cache claim and every download Job the model needs (created before its Deployment)."""
    claim = cache_claim(model)
    cache = cache_of(model)
    if claim is None or cache is None:
        return []
    return [claim, *(fetch_job(model, e, config) for e in entries(model))]


def evict_job(namespace: str, claim: str, keys: list[str], config: RenderConfig) -> dict[str, Any]:
    """A Job that removes cache entries from the claim (`kubeinfer weights evict`): the documented
    way to free the space of entries no model uses any more (docs/operator.md, "Weight cache")."""
    digest = hashlib.sha256("\0".join([claim, *sorted(keys)]).encode()).hexdigest()[:12]
    container: dict[str, Any] = {
        "name": "evict",
        "image": config.image_for("kubeinfer"),
        "imagePullPolicy": config.image_pull_policy,
        "command": ["kubeinfer"],
        "args": ["weights", "evict", "--root", contract.WEIGHTS_MOUNT, *keys],
        "volumeMounts": [{"name": "weights", "mountPath": contract.WEIGHTS_MOUNT}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"kubeinfer-evict-{digest}",
            "namespace": namespace,
            "labels": _cache_labels(claim),
        },
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": FETCH_JOB_TTL_SECONDS,
            "template": {
                "metadata": {"labels": _cache_labels(claim)},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": claim}}],
                    "enableServiceLinks": False,
                },
            },
        },
    }
