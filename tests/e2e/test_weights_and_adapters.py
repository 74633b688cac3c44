"""The weight cache and LoRA adapters through the whole local stack, from the stack's own Hub.

`kubeinfer up` serves the tiny models and their adapters as Hugging Face repositories
(kubeinfer_devkit.devcluster.localhub, `logs/hub.log` a line per request) and configures the operator
with it as `hfEndpoint`. Here: the cached llama-server example downloads once through a Job and then
serves; a second model of the same files downloads nothing; a missing repository, a gated one without
a token and a missing quant fail with their reasons (and the gated one serves once the token is
given); llama-server's adapters are picked per request by the gateway; vLLM's are loaded and unloaded
at run time without a pod restart.

Runs after test_stack_autoscaling.py (file order) on the same stack (the package fixture). Every
test deletes its models; the module removes the download Jobs, the Secret and the cache claim last.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from kubeinfer import contract
from kubeinfer_devkit.devcluster import localhub
from tests.e2e.support import EXAMPLES, TIMINGS, LocalStack, is_ready, wait_for

GGUF = "tiny-gguf-cached"  # examples/tiny-gguf-cached.yaml
PIRATE, LEGAL = "tiny-gguf-pirate", "tiny-gguf-legal"
VLLM = "tiny-vllm-cached"  # examples/tiny-vllm-cached.yaml
LORA_A, LORA_B = "tiny-vllm-lora-a", "tiny-vllm-lora-b"
TOKEN_SECRET = "kubeinfer-local-hub-token"
HELLO = [{"role": "user", "content": "Say hello."}]
WEIGHTS_SELECTOR = f"{contract.LABEL_COMPONENT}%3D{contract.COMPONENT_WEIGHTS}"
_HUB_LINE = re.compile(r"^\S+ (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d+)")


# --- helpers -----------------------------------------------------------------------------------------


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return doc


def apply_doc(stack: LocalStack, doc: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        fh.write(yaml.safe_dump(doc))
        fh.flush()
        stack.kubectl("apply", "-f", fh.name)


def gguf_variant(name: str, source: str) -> dict[str, Any]:
    """The cached llama-server example under another name and source, without adapters."""
    doc = example("tiny-gguf-cached.yaml")
    doc["metadata"]["name"] = name
    doc["spec"]["model"].update(source=source, servedName=name)
    doc["spec"].pop("adapters")
    return doc


def hub_file_gets(stack: LocalStack) -> list[str]:
    """The files downloaded from the stack's Hub so far (GET .../resolve/..., any status)."""
    out = []
    for line in (stack.layout.logs / "hub.log").read_text().splitlines():
        m = _HUB_LINE.match(line)
        if m and m["method"] == "GET" and "/resolve/" in m["path"]:
            out.append(m["path"])
    return out


def download_jobs(stack: LocalStack) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = stack.api(
        f"/apis/batch/v1/namespaces/default/jobs?labelSelector={WEIGHTS_SELECTOR}"
    )["items"]
    return items


def weights(stack: LocalStack, name: str) -> dict[str, Any]:
    return dict(((stack.model(name) or {}).get("status") or {}).get("weights") or {})


def model_events(stack: LocalStack, name: str) -> list[dict[str, Any]]:
    return [
        e
        for e in stack.events()
        if e["involvedObject"].get("kind") == contract.KIND and e["involvedObject"]["name"] == name
    ]


def deployment(stack: LocalStack, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = stack.api(
        f"/apis/apps/v1/namespaces/default/deployments/{contract.child_name(name)}"
    )
    return found


def weights_failed(stack: LocalStack, name: str, reason: str, timeout: float = 90) -> dict[str, Any]:
    """WeightsReady=False with `reason`, Ready=False WeightsFailed, a Warning Event, no Deployment."""
    cond: dict[str, Any] = wait_for(
        lambda: (c := stack.condition(name, "WeightsReady")).get("reason") == reason and c,
        timeout,
        f"{name}: WeightsReady=False {reason}",
    )
    assert cond["status"] == "False", cond
    wait_for(
        lambda: stack.condition(name, "Ready").get("reason") == "WeightsFailed", 30, f"{name}: Ready=False"
    )
    assert stack.condition(name, "Ready")["status"] == "False"
    assert weights(stack, name)["phase"] == "Failed"
    wait_for(
        lambda: any(e["type"] == "Warning" and e["reason"] == reason for e in model_events(stack, name)),
        30,
        f"a Warning Event {reason} on {name}",
    )
    assert deployment(stack, name) is None, "no Deployment while the weights are not there"
    assert stack.pods(name) == []
    return cond


def delete_model(stack: LocalStack, name: str, timeout: float = 120) -> None:
    stack.kubectl("delete", "llm", name, "--ignore-not-found", "--wait=false")
    wait_for(lambda: stack.model(name) is None and not stack.pods(name), timeout, f"{name} and its pods gone")


def chat(stack: LocalStack, model: str, max_tokens: int = 12) -> Any:
    """A greedy chat completion through the gateway (openai SDK, no retries)."""
    return stack.openai().chat.completions.create(
        model=model, messages=HELLO, max_tokens=max_tokens, temperature=0, seed=7
    )


def text_of(stack: LocalStack, model: str) -> str:
    return str(chat(stack, model).choices[0].message.content)


def listed(stack: LocalStack) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{stack.gateway}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m for m in data}


def first_token(stack: LocalStack, model: str, t0: float, timeout: float) -> float:
    """Seconds from t0 until a streamed chat completion through the gateway yields content."""
    import openai

    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            for chunk in stack.openai().chat.completions.create(
                model=model, messages=HELLO, max_tokens=8, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    return time.monotonic() - t0
        except openai.APIError as exc:  # 404 until the gateway knows the model; 503 while it starts
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"no token from {model} within {timeout:.0f}s (last: {last!r})")


def ensure_cached_gguf(stack: LocalStack) -> None:
    """The cached llama-server example applied and serving (if an earlier test did not leave it)."""
    if stack.model(GGUF) is None:
        stack.kubectl("apply", "-f", str(EXAMPLES / "tiny-gguf-cached.yaml"))
    stack.wait_serving(GGUF, 1, timeout=180)
    wait_for(lambda: sum(r["ready"] for r in stack.gateway_replicas(GGUF)) == 1, 30, "the gateway's replica")


@pytest.fixture(scope="module", autouse=True)
def _cleanup(stack: LocalStack) -> Iterator[None]:
    yield
    for name in ("tiny-gguf-cached-2", "tiny-missing", "tiny-gated", "tiny-no-quant", GGUF, VLLM):
        stack.kubectl("delete", "llm", name, "--ignore-not-found", "--wait=false", check=False)
    wait_for(
        lambda: not any(stack.pods(n) for n in (GGUF, VLLM, "tiny-gguf-cached-2", "tiny-gated")),
        180,
        "every pod of this module gone",
    )
    stack.kubectl("delete", "secret", TOKEN_SECRET, "--ignore-not-found", check=False)
    stack.kubectl(
        "delete", "jobs", "-l", f"{contract.LABEL_COMPONENT}={contract.COMPONENT_WEIGHTS}", check=False
    )
    stack.kubectl("delete", "pvc", "kubeinfer-weights", "--ignore-not-found", "--wait=false", check=False)


# --- the cache ---------------------------------------------------------------------------------------


def test_cached_llama_server_downloads_through_a_job_then_serves(stack: LocalStack) -> None:
    gets_before = len(hub_file_gets(stack))
    t0 = time.monotonic()
    stack.kubectl("apply", "-f", str(EXAMPLES / "tiny-gguf-cached.yaml"))
    jobs = wait_for(lambda: download_jobs(stack), 30, "a download Job")
    TIMINGS["cache: apply -> download Job created"] = time.monotonic() - t0
    assert all(
        j["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["weights", "fetch"] for j in jobs
    )

    def ready() -> dict[str, Any] | None:
        w = weights(stack, GGUF)
        return w if w.get("phase") == "Ready" else None

    w = wait_for(ready, 120, "status.weights Ready", every=0.5)
    TIMINGS["cache: apply -> weights Ready (3 entries)"] = time.monotonic() - t0
    assert w["summary"] == "Ready" and len(w["entries"]) == 3, w  # the base and two adapters
    assert {e["source"] for e in w["entries"]} == {
        "kubeinfer-local/tiny-gguf:F16",
        "hf://kubeinfer-local/tiny-gguf-lora/pirate.gguf",
        "hf://kubeinfer-local/tiny-gguf-lora/legal.gguf",
    }
    assert w["bytesTotal"] > 4_000_000, w  # the F16 file, about 5 MB
    cond = stack.condition(GGUF, "WeightsReady")
    assert (cond["status"], cond["reason"]) == ("True", "Cached"), cond

    took = first_token(stack, GGUF, t0, timeout=120)
    TIMINGS["cache: apply -> first token, llama-server"] = took
    wait_for(lambda: stack.condition(GGUF, "Ready")["status"] == "True", 30, "Ready=True")
    assert stack.serving(GGUF)

    # Exactly the selected files came from the Hub: the F16 quant (not F32) and the two adapters.
    gets = hub_file_gets(stack)[gets_before:]
    assert sorted(p.rsplit("/", 1)[1] for p in gets) == ["legal.gguf", "pirate.gguf", "tiny-F16.gguf"], gets
    table = stack.kubectl("get", "llm", GGUF).stdout
    header, row = table.splitlines()[:2]
    assert "WEIGHTS" in header.split() and "Ready" in row.split(), table

    def events() -> list[dict[str, Any]] | None:
        evs = model_events(stack, GGUF)
        started = [e for e in evs if e["reason"] == "DownloadStarted"]
        done = [e for e in evs if e["message"].startswith("WeightsReady=True")]
        return evs if len(started) >= 3 and done else None

    evs = wait_for(events, 30, "DownloadStarted (x3) and WeightsReady=True Events")
    started = [e["message"] for e in evs if e["reason"] == "DownloadStarted"]
    assert any("kubeinfer-local/tiny-gguf:F16" in m and "kubeinfer-fetch-" in m for m in started), started


def test_a_second_model_of_the_same_files_downloads_nothing(stack: LocalStack) -> None:
    ensure_cached_gguf(stack)
    first = {e["key"]: e["job"] for e in weights(stack, GGUF)["entries"]}
    gets_before = len(hub_file_gets(stack))
    doc = example("tiny-gguf-cached.yaml")
    doc["metadata"]["name"] = name = "tiny-gguf-cached-2"
    doc["spec"]["model"]["servedName"] = name
    for a in doc["spec"]["adapters"]:
        a["name"] += "-2"  # adapter names are public model ids: one model each
    t0 = time.monotonic()
    try:
        apply_doc(stack, doc)
        wait_for(
            lambda: stack.condition(name, "WeightsReady").get("status") == "True", 60, "WeightsReady=True"
        )
        TIMINGS["cache: second model, apply -> WeightsReady (cache hit)"] = time.monotonic() - t0
        second = {e["key"]: e["job"] for e in weights(stack, name)["entries"]}
        assert second == first, (first, second)  # the same entries, filled by the same Jobs
        stack.wait_serving(name, 1, timeout=120)
        wait_for(lambda: stack.condition(name, "Ready")["status"] == "True", 30, "Ready=True")
        assert hub_file_gets(stack)[gets_before:] == [], "nothing downloaded again"
        assert text_of(stack, name) == text_of(stack, GGUF)  # the same weights
    finally:
        delete_model(stack, name)


def test_a_missing_repository_fails_with_repo_not_found(stack: LocalStack) -> None:
    name = "tiny-missing"
    apply_doc(stack, gguf_variant(name, f"{localhub.ORG}/no-such-repo:F16"))
    try:
        cond = weights_failed(stack, name, "RepoNotFound")
        assert f"{localhub.ORG}/no-such-repo" in cond["message"], cond
        assert weights(stack, name)["summary"].startswith("Failed"), weights(stack, name)
    finally:
        delete_model(stack, name)


def test_a_gated_repository_needs_the_token_then_serves(stack: LocalStack) -> None:
    name = "tiny-gated"
    apply_doc(stack, gguf_variant(name, f"{localhub.ORG}/tiny-gguf-gated:F16"))
    try:
        cond = weights_failed(stack, name, "GatedRepo")
        assert "tokenSecretRef" in cond["message"], cond
        stack.kubectl("create", "secret", "generic", TOKEN_SECRET, f"--from-literal=token={localhub.TOKEN}")
        t0 = time.monotonic()
        ref = {"spec": {"model": {"tokenSecretRef": {"name": TOKEN_SECRET, "key": "token"}}}}
        stack.kubectl("patch", "llm", name, "--type", "merge", "-p", json.dumps(ref))
        # The operator deletes the failed Job (the spec changed) and runs it again, with HF_TOKEN.
        wait_for(
            lambda: stack.condition(name, "WeightsReady").get("status") == "True", 90, "WeightsReady=True"
        )
        stack.wait_serving(name, 1, timeout=120)
        wait_for(lambda: stack.condition(name, "Ready")["status"] == "True", 30, "Ready=True")
        TIMINGS["cache: gated repo, token given -> Ready"] = time.monotonic() - t0
        assert first_token(stack, name, time.monotonic(), timeout=60) < 60
    finally:
        delete_model(stack, name)


def test_a_missing_quant_names_the_quants_the_repository_has(stack: LocalStack) -> None:
    name = "tiny-no-quant"
    apply_doc(stack, gguf_variant(name, f"{localhub.ORG}/tiny-gguf:Q4_K_M"))
    try:
        cond = weights_failed(stack, name, "FileNotFound")
        assert "Q4_K_M" in cond["message"] and "F16, F32" in cond["message"], cond
    finally:
        delete_model(stack, name)


# --- adapters ----------------------------------------------------------------------------------------


def test_llama_server_adapters_are_listed_and_booked_per_adapter(stack: LocalStack) -> None:
    ensure_cached_gguf(stack)
    models = listed(stack)
    for adapter in (PIRATE, LEGAL):
        assert models[adapter]["parent"] == GGUF and models[adapter]["root"] == GGUF, models[adapter]
    assert "parent" not in models[GGUF]

    base, a, b = text_of(stack, GGUF), text_of(stack, PIRATE), text_of(stack, LEGAL)
    assert len({base, a, b}) == 3, (base, a, b)  # greedy: each adapter changes the output

    def ledger() -> dict[str, dict[str, Any]]:
        data = httpx.get(f"{stack.gateway}/v1/admin/usage", timeout=10).json()["data"]
        return {row["model"]: row for row in data}

    before = ledger().get(PIRATE, {"requests": 0, "promptTokens": 0, "completionTokens": 0})
    out = chat(stack, PIRATE)

    def booked() -> dict[str, Any] | None:
        row = ledger().get(PIRATE)
        return row if row and row["requests"] > before["requests"] else None

    after = wait_for(booked, 10, "the adapter's usage booked")
    assert after["completionTokens"] - before["completionTokens"] == out.usage.completion_tokens
    assert after["promptTokens"] - before["promptTokens"] == out.usage.prompt_tokens


def test_llama_server_base_output_is_unchanged_after_adapter_requests(stack: LocalStack) -> None:
    """Greedy: the base, adapter A, adapter B, then the base again on the same replica (one pod)."""
    ensure_cached_gguf(stack)
    base = text_of(stack, GGUF)
    a, b = text_of(stack, PIRATE), text_of(stack, LEGAL)
    again = text_of(stack, GGUF)
    assert len({base, a, b}) == 3, (base, a, b)
    assert again == base, (
        f"the base model's output changed after adapter requests: {base!r} then {again!r} "
        "(the gateway sends a base request to a llama-server replica with adapters without a `lora` "
        "field, and llama-server reuses the slot's state of the last adapter)"
    )
    assert text_of(stack, PIRATE) == a


def _vllm_adapters(stack: LocalStack) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in ((stack.model(VLLM) or {}).get("status") or {}).get("adapters") or []}


def _engine_adapters(pod: dict[str, Any]) -> set[str]:
    """What the vLLM replica itself has loaded (its /v1/models, entries with a parent)."""
    data = httpx.get(f"http://{pod['status']['podIP']}:{contract.ENGINE_PORT}/v1/models", timeout=10).json()
    return {m["id"] for m in data["data"] if m.get("parent")}


def _replicasets(stack: LocalStack) -> set[str]:
    sel = f"{contract.LABEL_MODEL}%3D{VLLM}"
    items = stack.api(f"/apis/apps/v1/namespaces/default/replicasets?labelSelector={sel}")["items"]
    return {rs["metadata"]["name"] for rs in items}


def _served_by_gateway(stack: LocalStack, model: str, timeout: float = 30) -> str:
    """A greedy answer of `model`, waiting out the gateway's 503 adapter_not_loaded (its scrape of the
    replica's /v1/models runs every second)."""
    import openai

    def once() -> str | None:
        try:
            return text_of(stack, model)
        except openai.APIStatusError as exc:
            if exc.status_code == 503 and "adapter_not_loaded" in str(exc.body):
                return None
            raise

    result: str = wait_for(once, timeout, f"the gateway serving {model}", every=0.5)
    return result


def test_vllm_adapters_load_and_unload_at_run_time(stack: LocalStack) -> None:
    import openai

    doc = example("tiny-vllm-cached.yaml")
    adapters = doc["spec"]["adapters"]
    assert [a["name"] for a in adapters] == [LORA_A, LORA_B]
    doc["spec"]["adapters"] = adapters[:1]
    t0 = time.monotonic()
    apply_doc(stack, doc)
    try:
        took = first_token(stack, VLLM, t0, timeout=420)
        TIMINGS["cache: apply -> first token, vLLM (2 entries)"] = took
        wait_for(lambda: _vllm_adapters(stack).get(LORA_A, {}).get("ready"), 60, f"{LORA_A} ready")
        TIMINGS["vLLM: apply -> adapter loaded"] = time.monotonic() - t0
        assert set(_vllm_adapters(stack)) == {LORA_A}
        pods = stack.serving(VLLM)
        assert len(pods) == 1
        pod_uid, replicasets = pods[0]["metadata"]["uid"], _replicasets(stack)
        assert _engine_adapters(pods[0]) == {LORA_A}  # the operator loaded it at run time
        assert listed(stack)[LORA_A]["parent"] == VLLM
        base = text_of(stack, VLLM)
        a = _served_by_gateway(stack, LORA_A)
        assert a != base, (base, a)

        # Add B: loaded into the running replica, no restart.
        t1 = time.monotonic()
        stack.kubectl(
            "patch", "llm", VLLM, "--type", "merge", "-p", json.dumps({"spec": {"adapters": adapters}})
        )
        wait_for(lambda: _vllm_adapters(stack).get(LORA_B, {}).get("ready"), 60, f"{LORA_B} ready")
        b = _served_by_gateway(stack, LORA_B)
        TIMINGS["vLLM: adapter added -> served"] = time.monotonic() - t1
        assert len({base, a, b}) == 3, (base, a, b)
        assert LORA_B in listed(stack)
        pods = stack.serving(VLLM)
        assert [p["metadata"]["uid"] for p in pods] == [pod_uid], "adding an adapter restarted no pod"
        assert _replicasets(stack) == replicasets, "and made no new ReplicaSet"
        assert _engine_adapters(pods[0]) == {LORA_A, LORA_B}

        # Remove B: unloaded, no longer listed, and a request for it is 404 model_not_found.
        t2 = time.monotonic()
        stack.kubectl(
            "patch", "llm", VLLM, "--type", "merge", "-p", json.dumps({"spec": {"adapters": adapters[:1]}})
        )
        wait_for(lambda: LORA_B not in listed(stack), 30, f"{LORA_B} no longer listed")
        with pytest.raises(openai.NotFoundError) as exc:
            chat(stack, LORA_B)
        assert exc.value.code == "model_not_found", exc.value.body
        wait_for(lambda: _engine_adapters(stack.serving(VLLM)[0]) == {LORA_A}, 30, f"{LORA_B} unloaded")
        TIMINGS["vLLM: adapter removed -> unloaded"] = time.monotonic() - t2
        # The operator unloads first and writes status at the end of the same pass.
        wait_for(lambda: set(_vllm_adapters(stack)) == {LORA_A}, 30, f"{LORA_B} gone from status")
        assert text_of(stack, LORA_A) == a and text_of(stack, VLLM) == base
        pods = stack.serving(VLLM)
        assert [p["metadata"]["uid"] for p in pods] == [pod_uid] and is_ready(pods[0])
        assert _replicasets(stack) == replicasets
    finally:
        delete_model(stack, VLLM, timeout=180)
