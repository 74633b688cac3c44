"""The `LLMModel` API (group kubeinfer.io, version v1alpha1), as pydantic models.

These classes are the single source of the API: the CRD in `crds/` is generated from them (field
docstrings become its descriptions; `CEL` rules become `x-kubernetes-validations`), the renderer
reads them, and `kubeinfer validate` checks manifests with them and with the same CEL rules the
apiserver evaluates. Every model of the API is here; `fields.py` holds their shared config and field
types, `rules.py` the spec's cross-field CEL rules.

Fields use Kubernetes camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer import contract
from kubeinfer.api import enums
from kubeinfer.api.fields import PARAMETERS_RE, SOURCE_RE, Base, Duration, FreeForm, Name, Quantity, cel
from kubeinfer.api.rules import SPEC_RULES

Engine = Literal["vllm", "llama-server"]
Modality = Literal["text", "image"]
Thinking = Literal["default", "enabled", "disabled"]
RoutingStrategy = Literal["least-load", "prefix-aware", "round-robin"]
AutoscalingMode = Literal["builtin", "hpa", "keda", "off"]
CacheAccessMode = Literal["ReadWriteMany", "ReadWriteOnce"]
# vLLM's --max-lora-rank choices (0.32).
LoRARank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
PUBLIC_NAME_RE = r"^[\w./:@-]+$"
ADAPTER_SOURCE_RE = (
    r"^(hf://[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[\w./-]*)?)$"
)


class SecretKeyRef(Base):
    name: Name
    """Name of a Secret in the model's namespace."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """Key within the Secret."""


class Architecture(Base):
    """Architecture hints for the KV-cache estimate; typical values for the size are assumed if unset."""

    layers: int | None = Field(default=None, ge=1, le=1024)
    """Number of transformer layers (num_hidden_layers)."""
    kv_heads: int | None = Field(default=None, ge=1, le=1024)
    """Number of key/value heads (num_key_value_heads; fewer than attention heads with GQA)."""
    head_dim: int | None = Field(default=None, ge=1, le=4096)
    """Dimension of one attention head."""


class WeightCache(Base):
    """A shared weight cache: a PersistentVolumeClaim that a download Job fills once per source and
    revision, which every replica (and every model naming the same files) mounts read-only."""

    claim_name: str = Field(
        default="kubeinfer-weights", max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    """The cache's PersistentVolumeClaim in the model's namespace. The operator creates it if it does
    not exist and never deletes it: deleting a model leaves the cache to the models that share it."""
    size: Quantity = "100Gi"
    """Requested size when the operator creates the claim."""
    storage_class_name: str | None = Field(default=None, max_length=253)
    """Storage class of a claim the operator creates; unset: the cluster's default class."""
    access_mode: CacheAccessMode = "ReadWriteMany"
    """`ReadWriteMany` lets replicas on every node share one copy (NFS, CephFS, Filestore, ...);
    `ReadWriteOnce` works with any block storage, but then every replica runs on the node that
    holds the volume."""
    include: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, max_length=32
    )
    """Files of an `hf://org/repo` source to fetch (glob patterns). Default for vLLM: the
    safetensors weights, configs and tokenizer files; llama-server takes one GGUF file or quant."""


class ModelSpec(Base):
    """What to serve and the names clients use for it."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.source) || !(self.source.startsWith('s3://') || self.source.startsWith('gs://'))",
                "s3:// and gs:// sources are not supported yet: use hf://org/repo, org/repo:QUANT or "
                "pvc://claim/path",
            ),
            (
                "!has(self.servedName) || !has(self.aliases) || !(self.servedName in self.aliases)",
                "model.aliases must not repeat model.servedName",
            ),
            (
                "!has(self.revision) || !has(self.source) || !self.source.startsWith('pvc://')",
                "model.revision applies to Hugging Face sources only, not pvc://",
            ),
            (
                "!has(self.cache) || (has(self.source) && !self.source.startsWith('pvc://'))",
                "model.cache fetches Hugging Face sources; a pvc:// source is read in place",
            ),
        )
    )

    source: str | None = Field(default=None, max_length=512, pattern=SOURCE_RE)
    """Where the weights come from: `hf://org/repo` (a Hugging Face repository), `hf://org/repo/file.gguf`
    or `org/repo:Q4_K_M` (a GGUF file or quant of a repository, llama-server), or `pvc://claim/path`
    (a path in a PersistentVolumeClaim, mounted read-only). Unset for `remote` models."""
    revision: str | None = Field(default=None, max_length=128)
    """Hugging Face revision (branch, tag or commit) to load: vLLM, or llama-server with `cache` (the
    download Job fetches that revision)."""
    served_name: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[\w./:@-]+$")
    """The public model id clients send in `model`; defaults to metadata.name."""
    aliases: list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\w./:@-]+$")]] | None = (
        Field(default=None, max_length=16, json_schema_extra={"x-kubernetes-list-type": "set"})
    )
    """Other ids that route to this model."""
    parameters: str | None = Field(default=None, pattern=PARAMETERS_RE, max_length=32)
    """Parameter count hint for the GPU-memory estimate: `7B`, `12B`, `500M`, or total-active for
    mixture-of-experts such as `35B-A3B`."""
    architecture: Architecture | None = None
    trust_remote_code: bool | None = None
    """Allow the checkpoint's own Python code to run (vLLM `--trust-remote-code`)."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face token, exported to the engine (or the download Job) as HF_TOKEN."""
    cache: WeightCache | None = None
    """Fetch Hugging Face weights once into a shared cache claim with a download Job, instead of in
    every pod at start; pods start when the weights are there (condition WeightsReady)."""


class Quantization(Base):
    """Weight quantization and dtype."""

    method: Literal[enums.VLLM_QUANTIZATION_METHODS + enums.GGUF_TYPES] | None = None  # type: ignore[valid-type]
    """Weight quantization. vLLM: one of its `--quantization` methods (awq, gptq, fp8, ...);
    llama-server: the GGUF type (Q4_K_M, Q5_K_S, Q8_0, ...), which picks the file of a Hugging Face
    repository and sizes the estimate."""
    dtype: Literal[enums.VLLM_DTYPES] | None = None  # type: ignore[valid-type]
    """Activation/weight dtype (vLLM `--dtype`); a GGUF file fixes its own types."""
    weight_bits: float | None = Field(default=None, gt=0, le=32)
    """Override of the bits per weight the estimate assumes for this quantization."""


class KVCache(Base):
    """KV-cache type and size."""

    dtype: Literal[enums.VLLM_KV_CACHE_DTYPES + enums.LLAMA_KV_CACHE_TYPES] | None = None  # type: ignore[valid-type]
    """KV-cache data type: vLLM `--kv-cache-dtype` (auto, fp8, ...) or llama-server `-ctk/-ctv`
    (f16, q8_0, ...)."""
    memory_bytes: int | None = Field(default=None, ge=1 << 20)
    """Fixed KV-cache size in bytes (vLLM `--kv-cache-memory-bytes`); vLLM then ignores
    gpuMemoryUtilization for the cache."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """Fraction of GPU memory vLLM may reserve (`--gpu-memory-utilization`, vLLM default 0.92)."""
    prefix_caching: bool | None = None
    """Reuse the KV cache of shared prompt prefixes (vLLM `--enable-prefix-caching`, llama-server
    `--cache-prompt`)."""


class Parallelism(Base):
    """How one replica is split over its GPUs."""

    tensor: int = Field(default=1, ge=1, le=64)
    """Tensor-parallel degree (vLLM `-tp`; llama-server splits rows across GPUs)."""
    pipeline: int = Field(default=1, ge=1, le=64)
    """Pipeline-parallel degree (vLLM `-pp`; llama-server splits layers across GPUs)."""


class DraftSettings(Base):
    """llama-server draft-model settings."""

    min_tokens: int | None = Field(default=None, ge=0, le=64)
    """Minimum draft tokens (`--spec-draft-n-min`)."""
    p_min: float | None = Field(default=None, ge=0, le=1)
    """Minimum draft probability to continue drafting (`--spec-draft-p-min`)."""
    gpu_layers: int | None = Field(default=None, ge=-1, le=1024)
    """Draft-model layers offloaded to the GPU (`-ngld`); -1 for all."""


class Speculative(Base):
    """Speculative decoding (draft models, MTP heads, n-grams)."""

    method: Literal[enums.VLLM_SPECULATIVE_METHODS + enums.LLAMA_SPEC_TYPES]  # type: ignore[valid-type]
    """vLLM: a speculative method (mtp, draft_model, ngram, eagle3, ...); llama-server: a `--spec-type`
    (draft-simple, draft-mtp, ngram-mod, ...)."""
    model: str | None = Field(default=None, max_length=512, pattern=SOURCE_RE)
    """Draft or assistant checkpoint, in the same forms as model.source."""
    num_tokens: int | None = Field(default=None, ge=1, le=16)
    """Tokens proposed per step (vLLM num_speculative_tokens, llama-server `--spec-draft-n-max`)."""
    draft: DraftSettings | None = None
    config: FreeForm | None = None
    """Extra vLLM speculative_config keys (for example moe_backend, attention_backend)."""


class Multimodal(Base):
    """Limits and processors for image input."""

    limit_per_prompt: dict[str, Annotated[int, Field(ge=0, le=256)]] | None = Field(
        default=None, max_length=8
    )
    """Items per prompt by modality, e.g. {image: 1} (vLLM `--limit-mm-per-prompt`)."""
    processor_kwargs: FreeForm | None = None
    """Multimodal processor arguments, e.g. {max_pixels: 4014080} (vLLM `--mm-processor-kwargs`)."""
    mmproj: str | None = Field(default=None, max_length=512, pattern=r"^(auto|hf://.+\.gguf|pvc://.+\.gguf)$")
    """The vision projector of a GGUF model (llama-server): `pvc://claim/mmproj.gguf`,
    `hf://org/repo/mmproj.gguf`, or `auto` to take the one that sits beside an hf source."""
    image_max_tokens: int | None = Field(default=None, ge=1, le=65536)
    """Maximum tokens one image may take (llama-server `--image-max-tokens`)."""


class Reasoning(Base):
    """Reasoning (thinking) output and chat-template defaults."""

    parser: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[\w.-]+$")
    """vLLM `--reasoning-parser` (qwen3, deepseek_r1, ...); llama-server `--reasoning-format`
    (none, deepseek, deepseek-legacy, auto)."""
    thinking: Thinking = "default"
    """Whether the chat template thinks by default: vLLM sets enable_thinking in the default chat
    template kwargs; llama-server `--reasoning on|off`."""
    chat_template_kwargs: FreeForm | None = None
    """Default chat-template arguments (vLLM `--default-chat-template-kwargs`, llama-server
    `--chat-template-kwargs`)."""


class Resources(Base):
    """Compute resources of one replica, and the GPU the fit estimate checks against."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "!has(self.gpuType) || !has(self.gpuMemory)",
                "set resources.gpuType or resources.gpuMemory, not both",
            ),
        )
    )

    gpus: int = Field(default=1, ge=0, le=64)
    """GPUs per replica (0 runs on CPU)."""
    gpu_resource_name: str = Field(default="nvidia.com/gpu", max_length=253, pattern=r"^[\w.-]+/[\w.-]+$")
    """Extended resource name of the GPUs."""
    gpu_type: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9][\w.-]*$")
    """GPU model for the fit estimate, e.g. L4, A100-80GB, H100, RTX-4090 (see docs for the table)."""
    gpu_memory: Quantity | None = None
    """Memory of one GPU, e.g. 16Gi, if the type is not in the table."""
    cpu: Quantity | None = None
    """CPU request and limit."""
    memory: Quantity | None = None
    """Memory request and limit."""
    shm_size: Quantity | None = None
    """Size of /dev/shm (used by NCCL between tensor-parallel workers); default 2Gi, or 8Gi with
    tensor or pipeline parallelism."""
    skip_fit_check: bool = False
    """Create pods even when the estimate says the model does not fit its GPUs."""


class Scheduling(Base):
    """Where replicas may run (copied into the pod spec)."""

    node_selector: dict[str, str] | None = None
    tolerations: list[FreeForm] | None = Field(default=None, max_length=64)
    affinity: FreeForm | None = None
    priority_class_name: str | None = Field(default=None, max_length=253)
    runtime_class_name: str | None = Field(default=None, max_length=253)


class Autoscaling(Base):
    """Replica bounds and target load for the autoscaler (docs/operator.md, "Autoscaling")."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must not exceed maxReplicas"),
            (
                "self.mode != 'hpa' || self.minReplicas >= 1",
                "autoscaling.minReplicas 0 needs mode builtin or keda: a HorizontalPodAutoscaler cannot "
                "scale to zero",
            ),
        )
    )

    mode: AutoscalingMode = "builtin"
    """Who scales: `builtin` (the operator, from the gateways' load), `hpa` (a HorizontalPodAutoscaler on
    the gateway's Prometheus metric, through a metrics adapter), `keda` (a KEDA ScaledObject on the
    same metric), or `off` (bounds only; replicas stay as set)."""
    min_replicas: int = Field(default=1, ge=0, le=1000)
    """Lowest replica count; 0 scales to zero when idle (builtin, keda)."""
    max_replicas: int = Field(default=1, ge=1, le=1000)
    target_inflight_per_replica: int = Field(default=8, ge=1, le=10000)
    """In-flight plus queued requests per replica the autoscaler aims for."""
    scale_down_delay: Duration = "5m"
    """How long load must stay low before replicas are removed."""


class Routing(Base):
    """How the gateway spreads and queues this model's requests."""

    strategy: RoutingStrategy = "least-load"
    """How the gateway picks a replica."""
    target_inflight: int | None = Field(default=None, ge=1, le=10000)
    """Requests a replica takes at once before the gateway queues (defaults to maxNumSeqs, else 32)."""
    max_queue: int = Field(default=100, ge=0, le=100000)
    """Requests waiting per model beyond which the gateway answers 429."""
    queue_timeout: Duration = "30s"
    """How long a request may wait for a replica."""
    session_header: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9-]+$")
    """Request header whose value pins a session to one replica."""


class Pricing(Base):
    """What the gateway's usage ledger charges per million tokens (an estimate, in your currency)."""

    prompt_per1_m: float = Field(default=0, ge=0, le=1_000_000, alias="promptPer1M")
    """Cost of one million prompt (input) tokens."""
    completion_per1_m: float = Field(default=0, ge=0, le=1_000_000, alias="completionPer1M")
    """Cost of one million completion (output) tokens."""


RemoteAPI = Literal["chat/completions", "completions", "embeddings", "responses", "messages"]


class Remote(Base):
    """An existing OpenAI-compatible endpoint served through the gateway (no pods)."""

    base_url: str = Field(alias="baseURL", max_length=2048, pattern=r"^https?://[^\s]+$")
    """Base URL of an OpenAI-compatible API, e.g. https://api.example.com/v1."""
    model: str = Field(min_length=1, max_length=256)
    """Model id to send upstream."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret holding the upstream API key."""
    native_apis: list[RemoteAPI] = Field(
        default=["chat/completions", "completions", "embeddings"], alias="nativeAPIs", max_length=5,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )  # fmt: skip
    """Endpoints the remote serves itself; `responses` and `messages` requests are translated to
    `chat/completions` when they are not listed."""


class EnvVar(Base):
    """A Kubernetes EnvVar (value or valueFrom)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = None


class Adapter(Base):
    """A LoRA adapter served beside the base model: clients send its name as `model`."""

    name: str = Field(min_length=1, max_length=256, pattern=PUBLIC_NAME_RE)
    """The public model id of the adapter (what clients send in `model`)."""
    source: str = Field(max_length=512, pattern=ADAPTER_SOURCE_RE)
    """Where the adapter comes from: `hf://org/repo` (a PEFT adapter directory, vLLM),
    `hf://org/repo/file.gguf` (a GGUF LoRA, llama-server), or `pvc://claim/path`. Hugging Face
    adapters go through model.cache."""
    revision: str | None = Field(default=None, max_length=128)
    """Hugging Face revision of the adapter."""
    scale: float | None = Field(default=None, ge=-100, le=100)
    """llama-server: the adapter's scale when a request names it (default 1)."""


class LoRA(Base):
    """Engine limits for LoRA adapters (vLLM; llama-server loads every adapter at start)."""

    max_loras: int | None = Field(default=None, ge=1, le=256)
    """Adapters in one batch on the GPU (vLLM `--max-loras`); default 4."""
    max_rank: LoRARank | None = None
    """Largest adapter rank (vLLM `--max-lora-rank`, default 16); an adapter of a higher rank is
    reported in status and not loaded."""
    max_cpu_loras: int | None = Field(default=None, ge=1, le=4096)
    """Adapters kept in CPU memory (vLLM `--max-cpu-loras`); must be at least maxLoras."""


class LLMModelSpec(Base):
    model_config = ConfigDict(json_schema_extra=cel(*SPEC_RULES))

    engine: Engine = Field(
        default="vllm",
        json_schema_extra=cel(("self == oldSelf", "engine is immutable: create a new LLMModel instead")),
    )
    """Inference engine: `vllm` or `llama-server`."""
    model: ModelSpec
    modalities: list[Modality] = Field(
        default=["text"], min_length=1, max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Input modalities the model accepts; the gateway refuses image content to text-only models."""
    quantization: Quantization | None = None
    kv_cache: KVCache | None = None
    max_model_len: int | None = Field(default=None, ge=16, le=16 * 1024 * 1024)
    """Longest sequence, prompt plus output (vLLM `--max-model-len`; llama-server context per slot)."""
    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    """Sequences processed at once (vLLM `--max-num-seqs`; llama-server slots, `-np`)."""
    max_num_batched_tokens: int | None = Field(default=None, ge=16, le=16 * 1024 * 1024)
    """Tokens per scheduler step (vLLM `--max-num-batched-tokens`; llama-server batch `-b`)."""
    parallelism: Parallelism | None = None
    speculative: Speculative | None = None
    multimodal: Multimodal | None = None
    reasoning: Reasoning | None = None
    resources: Resources = Field(default_factory=Resources, json_schema_extra={"default": {}})
    scheduling: Scheduling | None = None
    replicas: int = Field(default=1, ge=0, le=1000)
    """Desired replicas (the scale subresource)."""
    autoscaling: Autoscaling | None = None
    routing: Routing | None = None
    pricing: Pricing | None = None
    remote: Remote | None = None
    image: str | None = Field(default=None, max_length=512, pattern=r"^[^\s]+$")
    """Engine image override (default from the operator's configuration)."""
    extra_args: list[Annotated[str, Field(max_length=4096)]] | None = Field(default=None, max_length=128)
    """Arguments appended verbatim to the engine command line."""
    env: list[EnvVar] | None = Field(default=None, max_length=128)
    """Extra environment variables of the engine container (Kubernetes EnvVar objects)."""
    pod_template: FreeForm | None = None
    """A partial PodTemplateSpec merged over the rendered one (maps merge, containers by name)."""
    adapters: list[Adapter] | None = Field(
        default=None, max_length=64, json_schema_extra={"x-kubernetes-list-type": "map",
                                                         "x-kubernetes-list-map-keys": ["name"]}
    )  # fmt: skip
    """LoRA adapters of the base model, each listed by the gateway as a model of its own. vLLM
    loads and unloads them at run time when the list changes; llama-server restarts with the
    new list."""
    lora: LoRA | None = None

    # Convenience accessors used by the renderer and the estimate.
    def served_name(self, metadata_name: str) -> str:
        return self.model.served_name or metadata_name


class Condition(Base):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Estimate(Base):
    """GPU-memory fit estimate (GiB)."""

    weights_gi_b: float | None = Field(default=None, alias="weightsGiB")
    kv_cache_gi_b: float | None = Field(default=None, alias="kvCacheGiB")
    overhead_gi_b: float | None = Field(default=None, alias="overheadGiB")
    total_gi_b: float | None = Field(default=None, alias="totalGiB")
    """Sum over all GPUs of one replica."""
    per_gpu_gi_b: float | None = Field(default=None, alias="perGpuGiB")
    gpu_memory_gi_b: float | None = Field(default=None, alias="gpuMemoryGiB")
    """Memory of one GPU."""
    gpus: int | None = None
    fits: bool | None = None
    message: str | None = None


class AutoscalingStatus(Base):
    """What the builtin autoscaler saw and decided last."""

    desired_replicas: int | None = None
    """Replicas the autoscaler wants now (before scaleDownDelay holds a scale-down back)."""
    load: float | None = None
    """In-flight plus queued requests over every gateway, averaged over the autoscaler's window."""
    last_scale_time: str | None = None
    """When the autoscaler last changed spec.replicas (RFC 3339)."""
    last_scale_reason: str | None = None
    """Why: for example `load 17.5 over target 8 per replica: 1 -> 3`."""


WeightsPhase = Literal["Pending", "Downloading", "Ready", "Failed"]


class WeightEntryStatus(Base):
    """One cache entry (the base model's files, or one adapter's) and its download."""

    key: str
    """Directory of the entry in the cache claim; models with the same key share the files."""
    source: str
    phase: WeightsPhase
    job: str | None = None
    """The download Job that fills the entry."""
    bytes_done: int | None = None
    bytes_total: int | None = None
    files_done: int | None = None
    files_total: int | None = None
    reason: str | None = None
    message: str | None = None


class WeightsStatus(Base):
    """The weight cache's state for this model (model.cache)."""

    phase: WeightsPhase
    summary: str
    """One line for `kubectl get llm`: `Ready`, `41% 1.2/2.9 GiB 20 MiB/s ETA 1m25s`, `Failed: GatedRepo`."""
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate_bytes_per_second: float | None = None
    eta_seconds: int | None = None
    entries: list[WeightEntryStatus] | None = None


class AdapterStatus(Base):
    """Whether a LoRA adapter can be served, and why not."""

    name: str
    ready: bool
    reason: str | None = None
    message: str | None = None


class LLMModelStatus(Base):
    conditions: list[Condition] | None = None
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    selector: str | None = None
    """Label selector of the pods (for the scale subresource)."""
    served_name: str | None = None
    endpoint: str | None = None
    """In-cluster URL of the model's Service."""
    spec_hash: str | None = None
    estimate: Estimate | None = None
    autoscaling: AutoscalingStatus | None = None
    weights: WeightsStatus | None = None
    adapters: list[AdapterStatus] | None = None


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=contract.MAX_MODEL_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    generation: int | None = None


class LLMModel(BaseModel):
    """An LLM served on the cluster through the kubeinfer gateway."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubeinfer.io/v1alpha1"] = Field(default="kubeinfer.io/v1alpha1", alias="apiVersion")
    kind: Literal["LLMModel"] = "LLMModel"
    metadata: ObjectMeta
    spec: LLMModelSpec
    status: LLMModelStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def served_name(self) -> str:
        return self.spec.served_name(self.metadata.name)
