"""Operator configuration that the renderer needs (images, timeouts): data, not code."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Base(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Images(_Base):
    vllm: str
    llama_server: str
    # The kubeinfer image itself (full reference; imageRegistry does not apply): the weight cache's
    # download Jobs run `kubeinfer weights fetch` in it.
    kubeinfer: str = "kubeinfer/kubeinfer:0.1.0"


class RenderConfig(_Base):
    image_registry: str = ""
    images: Images
    image_pull_policy: str = "IfNotPresent"
    model_cache_size_limit: str = "200Gi"
    startup_timeout_seconds: int = Field(default=3600, ge=60)
    pre_stop_sleep_seconds: int = Field(default=10, ge=0)
    termination_grace_period_seconds: int = Field(default=180, ge=1)
    # Where KEDA's Prometheus scaler queries the gateways' load (autoscaling.mode keda).
    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090", pattern=r"^https?://\S+$"
    )

    # Hugging Face endpoint of the download Jobs (HF_ENDPOINT): empty for huggingface.co, or a mirror.
    hf_endpoint: str = Field(default="", pattern=r"^(https?://\S+)?$")

    def image_for(self, what: str) -> str:
        """Image of an engine ("vllm", "llama-server") or of kubeinfer itself ("kubeinfer")."""
        if what == "kubeinfer":  # the operator's own image: the chart writes its full reference
            return self.images.kubeinfer
        name = self.images.vllm if what == "vllm" else self.images.llama_server
        return f"{self.image_registry.rstrip('/')}/{name}" if self.image_registry else name


def load_config(path: str | Path | None = None) -> RenderConfig:
    """Defaults shipped with the package, overlaid by the file at `path` if given."""
    text = resources.files("kubeinfer").joinpath("config/defaults.yaml").read_text()
    data = yaml.safe_load(text)
    if path is not None:
        overlay = yaml.safe_load(Path(path).read_text()) or {}
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    return RenderConfig.model_validate(data)
