"""LoRA adapters on running vLLM replicas: load what the spec lists, unload what it no longer does.

vLLM takes adapters at run time (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`, enabled by
VLLM_ALLOW_RUNTIME_LORA_UPDATING, which the renderer sets), so a change of `spec.adapters` restarts
no pod: each reconcile pass of a vLLM model with adapters reads every ready replica's `/v1/models`
and closes the difference. A replica that restarts or is added comes up with no adapters and gets
them on the next pass (its readiness changes the Deployment, which triggers one). The gateway routes
an adapter's requests only to replicas whose `/v1/models` lists it, so a replica that has not caught
up yet is simply not asked.

llama-server loads its adapters from the command line (render/engines.py): nothing to do here.

The engine's refusals are kept per adapter and put in status.adapters (operator/status.py): a rank
above lora.maxRank, a path that holds no adapter, an adapter named like the base model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.gateway.scrape import listed_adapters
from kubeinfer.operator.status import AdapterReport
from kubeinfer.render.weights import adapter_path

_log = logging.getLogger("kubeinfer.adapters")

READ_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Loading reads the adapter's files and moves them to the device: give large adapters time.
LOAD_TIMEOUT = aiohttp.ClientTimeout(total=300)


def _message(status: int, text: str) -> str:
    try:
        err = json.loads(text).get("error") or {}
        return f"{status}: {err.get('message') or text}"[:500]
    except (ValueError, AttributeError):
        return f"{status}: {text}"[:500]


async def _sync_one(
    session: aiohttp.ClientSession, address: str, wanted: dict[str, str], reports: dict[str, AdapterReport]
) -> None:
    url = f"http://{address}"
    async with session.get(f"{url}/v1/models", timeout=READ_TIMEOUT) as resp:
        if resp.status != 200:
            return
        listed = listed_adapters(await resp.json(content_type=None))
    names = set(listed)
    for name, path in wanted.items():
        if name in names and listed.get(name) == path:
            reports[name].loaded_on += 1
            continue
        # Not loaded, or loaded from another path (a new revision: a new cache entry): load in place.
        body = {"lora_name": name, "lora_path": path, "load_inplace": name in names}
        async with session.post(f"{url}/v1/load_lora_adapter", json=body, timeout=LOAD_TIMEOUT) as resp:
            text = await resp.text()
            if resp.status == 200 or "already been loaded" in text:
                reports[name].loaded_on += 1
            else:
                reports[name].errors.append(_message(resp.status, text))
    for name in names - wanted.keys():
        body = {"lora_name": name}
        async with session.post(f"{url}/v1/unload_lora_adapter", json=body, timeout=READ_TIMEOUT) as resp:
            if resp.status not in (200, 404):
                text = await resp.text()
                _log.warning("unloading adapter %s from %s: %s", name, address, _message(resp.status, text))


def ready_pod_addresses(pods: list[dict[str, Any]]) -> list[str]:
    """host:port of each ready, running pod's engine (the port as the gateway reads it)."""
    out = []
    for pod in pods:
        st, meta = pod.get("status") or {}, pod.get("metadata") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
        )
        if ready and st.get("podIP") and not meta.get("deletionTimestamp"):
            port = (meta.get("annotations") or {}).get(contract.ANNOTATION_PORT, str(contract.ENGINE_PORT))
            ip = str(st["podIP"])
            out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return out


async def sync(model: LLMModel, pods: list[dict[str, Any]]) -> list[AdapterReport]:
    """Bring every ready replica of a vLLM model to its spec's adapters; a report per adapter."""
    wanted = {a.name: adapter_path(model, a.name) or "" for a in model.spec.adapters or []}
    reports = {name: AdapterReport(name) for name in wanted}
    addresses = ready_pod_addresses(pods)
    if not addresses:
        return list(reports.values())
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(_sync_one(session, a, wanted, reports) for a in addresses), return_exceptions=True
        )
    for address, result in zip(addresses, results, strict=True):
        if isinstance(result, BaseException):  # a replica going away, a timeout: the next pass retries
            _log.info("adapters of %s/%s on %s: %s", model.namespace, model.name, address, result)
    return list(reports.values())
