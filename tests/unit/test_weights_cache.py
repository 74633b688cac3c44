"""The weight cache as the operator renders and reads it: entries and keys, the claim, the download
Job (checked against the fetcher's own command line and exit codes), the engine paths, and what a
Job and its log mean for the model's status."""

from __future__ import annotations

import copy
import json

import pytest

from kubeinfer import contract
from kubeinfer.cli import build_parser
from kubeinfer.estimate import estimate
from kubeinfer.operator.status import Observed, compute_status, transitions
from kubeinfer.operator.weightstate import (
    EntryState,
    entry_state,
    progress_milestone,
    ready_in_status,
    weights_condition,
    weights_status,
)
from kubeinfer.render.config import RenderConfig, load_config
from kubeinfer.render.engines import engine_args
from kubeinfer.render.manifests import render, spec_hash
from kubeinfer.render.weights import (
    PERMANENT_EXIT_CODES,
    cache_claim,
    cache_objects,
    entries,
    fetch_job,
    job_name,
    model_entry,
)
from kubeinfer.validation import parse_model
from kubeinfer.weights import fetch, progress
from tests.cases import manifest

CONFIG = load_config()
VLLM = {"model": {"source": "hf://org/model", "cache": {}}, "resources": {"gpus": 0}}
LLAMA = {
    "engine": "llama-server",
    "model": {"source": "org/model-GGUF:Q8_0", "cache": {"claimName": "shared"}},
    "resources": {"gpus": 0},
}


def _model(spec, name="m", gen=1):
    doc = manifest(name, copy.deepcopy(spec))
    doc["metadata"].update(namespace="ml", generation=gen, uid="u-1")
    return parse_model(doc)


def _with(spec, **model):
    out = copy.deepcopy(spec)
    out["model"].update(model)
    return out


# --- entries and keys ------------------------------------------------------------------------------


def test_same_files_share_one_entry_and_one_job_across_models():
    a, b = _model(VLLM, "a"), _model(_with(VLLM, servedName="other"), "b")
    ea, eb = model_entry(a), model_entry(b)
    assert ea is not None and eb is not None
    assert ea.key == eb.key
    assert job_name("kubeinfer-weights", ea) == job_name("kubeinfer-weights", eb)
    # The Job is the same object for both models: it has no owner.
    assert fetch_job(a, ea, CONFIG) == fetch_job(b, eb, CONFIG)
    assert "ownerReferences" not in fetch_job(a, ea, CONFIG)["metadata"]


@pytest.mark.parametrize(
    "change",
    [
        {"revision": "v2"},
        {"source": "hf://org/other"},
        {"cache": {"include": ["*.safetensors"]}},
        {"trustRemoteCode": True},  # adds *.py
    ],
)
def test_different_files_are_a_different_entry(change):
    base = model_entry(_model(VLLM))
    other = model_entry(_model(_with(VLLM, **change)))
    assert base is not None and other is not None
    assert base.key != other.key


def test_the_key_is_a_safe_directory_name_and_the_job_name_a_dns_label():
    m = _model(_with(VLLM, source="hf://Org.Name/Model_v1.5-Instruct", revision="refs/pr/12"))
    e = model_entry(m)
    assert e is not None and fetch.valid_key(e.key)
    assert "/" not in e.key and ".." not in e.key
    name = job_name("kubeinfer-weights", e)
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name == name.lower()


def test_another_claim_is_another_job_for_the_same_key():
    e = model_entry(_model(VLLM))
    assert e is not None
    assert job_name("a", e) != job_name("b", e)


def test_llama_entries_pick_the_quant_file_and_the_projector():
    e = model_entry(_model(LLAMA))
    assert e is not None and e.gguf_quant == "Q8_0" and not e.mmproj
    # A repository without a quant takes llama.cpp's default, as -hf does.
    bare = model_entry(_model(_with(LLAMA, source="org/model-GGUF")))
    assert bare is not None and bare.gguf_quant == "Q4_K_M"
    # quantization.method names the quant when the source does not.
    q = _with(LLAMA, source="org/model-GGUF")
    q["quantization"] = {"method": "Q5_K_M"}
    assert model_entry(_model(q)).gguf_quant == "Q5_K_M"  # type: ignore[union-attr]
    f = model_entry(_model(_with(LLAMA, source="hf://org/model-GGUF/model-f16.gguf")))
    assert f is not None and f.gguf_file == "model-f16.gguf" and not f.gguf_quant
    vision = copy.deepcopy(LLAMA)
    vision.update(modalities=["text", "image"], multimodal={"mmproj": "auto"})
    v = model_entry(_model(vision))
    assert v is not None and v.mmproj
    args = engine_args(_model(vision))
    assert args[args.index("--mmproj") + 1] == f"{v.path}/{contract.WEIGHTS_MMPROJ_LINK}"


def test_no_cache_no_entries():
    assert entries(_model({"model": {"source": "hf://org/m"}})) == []
    assert cache_objects(_model({"model": {"source": "hf://org/m"}}), CONFIG) == []


# --- the download Job ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [VLLM, LLAMA, _with(LLAMA, source="hf://org/m-GGUF/m-Q2_K.gguf")])
def test_the_job_command_line_is_one_the_fetcher_accepts(spec):
    m = _model(spec)
    for e in entries(m):
        job = fetch_job(m, e, CONFIG)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["kubeinfer"]
        args = build_parser().parse_args(container["args"])
        assert args.key == e.key and args.repo == e.repo and str(args.root) == contract.WEIGHTS_MOUNT


def test_the_job_fails_at_once_on_exactly_the_fetchers_permanent_codes():
    assert PERMANENT_EXIT_CODES == fetch.PERMANENT_EXIT_CODES
    m = _model(VLLM)
    e = model_entry(m)
    assert e is not None
    job = fetch_job(m, e, CONFIG)
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["values"] == list(fetch.PERMANENT_EXIT_CODES)
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


def test_the_job_gets_the_token_the_endpoint_and_the_claim_read_write():
    spec = _with(VLLM, tokenSecretRef={"name": "hf", "key": "tok"})
    config = RenderConfig.model_validate(
        {**CONFIG.model_dump(by_alias=True), "hfEndpoint": "http://hub.local"}
    )
    m = _model(spec)
    job = fetch_job(m, model_entry(m), config)  # type: ignore[arg-type]
    pod = job["spec"]["template"]["spec"]
    env = {v["name"]: v for v in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "tok", "optional": False}
    assert env["HF_ENDPOINT"]["value"] == "http://hub.local"
    assert pod["volumes"] == [
        {"name": "weights", "persistentVolumeClaim": {"claimName": "kubeinfer-weights"}}
    ]
    assert "readOnly" not in pod["containers"][0]["volumeMounts"][0]
    assert pod["containers"][0]["image"] == CONFIG.images.kubeinfer


def test_the_claim_is_shared_not_owned():
    claim = cache_claim(_model(_with(VLLM, cache={"size": "1Ti", "storageClassName": "nfs"})))
    assert claim is not None
    assert "ownerReferences" not in claim["metadata"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "1Ti"}},
        "storageClassName": "nfs",
    }


# --- the engine reads the cache --------------------------------------------------------------------


def test_vllm_loads_the_cached_directory_without_downloading():
    m = _model(_with(VLLM, revision="abc123"))
    e = model_entry(m)
    assert e is not None
    args = engine_args(m)
    assert args[0] == e.path and "--revision" not in args
    dep = render(m, CONFIG)[0]
    pod = dep["spec"]["template"]["spec"]
    mount = next(v for v in pod["containers"][0]["volumeMounts"] if v["name"] == "weights")
    assert mount == {"name": "weights", "mountPath": contract.WEIGHTS_MOUNT, "readOnly": True}
    vol = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert vol["persistentVolumeClaim"] == {"claimName": "kubeinfer-weights", "readOnly": True}


def test_llama_server_loads_the_linked_gguf_instead_of_hf():
    m = _model(LLAMA)
    e = model_entry(m)
    assert e is not None
    args = engine_args(m)
    assert args[:2] == ["-m", f"{e.path}/{contract.WEIGHTS_GGUF_LINK}"]
    assert "-hf" not in args and "--no-mmproj" not in args


# --- what a Job and its log mean -------------------------------------------------------------------


def _entry():
    e = model_entry(_model(VLLM))
    assert e is not None
    return e


def _line(**event):
    return json.dumps(event)


def _job(condition=None):
    return (
        {"status": {"conditions": [{"type": condition, "status": "True", "reason": "R", "message": "M"}]}}
        if condition
        else {"status": {}}
    )


def test_a_running_job_reports_its_progress():
    log = [
        "some library warning",
        _line(event="start", repo="org/model", revision="main", sha="x", files_total=3, bytes_total=4096),
        _line(event="progress", bytes_done=1024, bytes_total=4096, files_done=1, files_total=3,
              rate_bps=512.0, eta_seconds=6),
    ]  # fmt: skip
    s = entry_state(_entry(), "j", _job(), log, None)
    assert s.phase == "Downloading" and s.p.bytes_done == 1024
    st = weights_status([s])
    assert st is not None and st["phase"] == "Downloading"
    assert st["summary"].startswith("25% ") and "ETA" in st["summary"]
    assert st["etaSeconds"] == 6
    cond = weights_condition([s])
    assert cond is not None and cond[:2] == ("False", "Downloading")


def test_a_job_not_started_yet_is_pending():
    s = entry_state(_entry(), "j", _job(), [], None)
    assert s.phase == "Pending"
    assert weights_condition([s])[1] == "DownloadPending"  # type: ignore[index]


def test_a_failed_job_reports_the_fetchers_reason():
    log = [_line(event="error", reason="GatedRepo", message="org/model is gated: set model.tokenSecretRef",
                 permanent=True)]  # fmt: skip
    s = entry_state(_entry(), "j", _job("Failed"), log, None)
    assert s.phase == "Failed" and s.p.reason == "GatedRepo"
    assert weights_status([s])["summary"] == "Failed: GatedRepo"  # type: ignore[index]
    status, reason, message = weights_condition([s])  # type: ignore[misc]
    assert (status, reason) == ("False", "GatedRepo") and "tokenSecretRef" in message


def test_a_failed_job_without_a_log_falls_back_to_the_termination_message():
    term = _line(event="error", reason="DiskFull", message="needs 3 GiB, 1 GiB free", permanent=True)
    s = entry_state(_entry(), "j", _job("Failed"), [], term)
    assert s.p.reason == "DiskFull"
    s = entry_state(_entry(), "j", _job("Failed"), [], None)
    assert s.p.reason == "JobFailed" and "R: M" in (s.p.message or "")


def test_a_complete_job_is_ready_and_ready_entries_are_remembered():
    log = [_line(event="done", bytes_downloaded=0, bytes_total=2048, files=["a", "b"], path="/x")]
    s = entry_state(_entry(), "j", _job("Complete"), log, None)
    assert s.phase == "Ready" and s.p.bytes_total == 2048
    st = weights_status([s])
    assert st is not None and st["summary"] == "Ready"
    m = _model(VLLM)
    assert ready_in_status(m, {"weights": st})
    assert not ready_in_status(_model(_with(VLLM, revision="v2")), {"weights": st})


def test_several_entries_sum_up_and_one_failure_fails_all():
    e = _entry()
    ok = EntryState(e, "Ready", "j1", progress.Progress(progress.READY, 100, 100))
    going = EntryState(
        e, "Downloading", "j2", progress.Progress(progress.DOWNLOADING, 50, 300, rate_bps=10.0)
    )
    st = weights_status([ok, going])
    assert st is not None and (st["bytesDone"], st["bytesTotal"]) == (150, 400)
    assert st["phase"] == "Downloading"
    bad = EntryState(
        e, "Failed", "j3", progress.Progress(progress.FAILED, reason="FileNotFound", message="no Q9")
    )
    assert weights_status([ok, going, bad])["phase"] == "Failed"  # type: ignore[index]


# --- the model's status while the weights download --------------------------------------------------


def test_no_pods_while_downloading_then_failed_is_degraded():
    m = _model(VLLM)
    e = _entry()
    going = EntryState(e, "Downloading", "j", progress.Progress(progress.DOWNLOADING, 5, 10), created=True)
    s1 = compute_status(m, estimate(m.spec), Observed(None, [], weights=[going]), None, "t1")
    c = {x["type"]: (x["status"], x["reason"]) for x in s1["conditions"]}
    assert c["WeightsReady"] == ("False", "Downloading")
    assert c["Ready"] == ("False", "WeightsDownloading")
    assert c["Progressing"] == ("True", "WeightsDownloading")
    assert c["Degraded"] == ("False", "AsExpected")
    assert s1["weights"]["phase"] == "Downloading"
    assert ("WeightsReady", "Downloading") in [(t, r) for t, r, _ in transitions(None, s1)]

    bad = EntryState(
        e, "Failed", "j", progress.Progress(progress.FAILED, reason="RepoNotFound", message="gone")
    )
    s2 = compute_status(m, estimate(m.spec), Observed(None, [], weights=[bad]), s1, "t2")
    c = {x["type"]: (x["status"], x["reason"]) for x in s2["conditions"]}
    assert c["Ready"] == ("False", "WeightsFailed")
    assert c["Degraded"] == ("True", "WeightsFailed")
    assert ("WeightsReady", "RepoNotFound") in [(t, r) for t, r, _ in transitions(s1, s2)]

    ok = EntryState(e, "Ready", "j", progress.Progress(progress.READY, 10, 10))
    s3 = compute_status(m, estimate(m.spec), Observed(None, [], weights=[ok]), s2, "t3")
    c = {x["type"]: (x["status"], x["reason"]) for x in s3["conditions"]}
    assert c["WeightsReady"] == ("True", "Cached") and c["Ready"] == ("False", "NoReadyReplicas")
    assert ("WeightsReady", "Cached") in [(t, r) for t, r, _ in transitions(s2, s3)]


# --- adapters in the pod template ------------------------------------------------------------------


def test_vllm_adapter_changes_restart_nothing_but_llama_adapter_changes_do():
    one = {**VLLM, "adapters": [{"name": "a", "source": "pvc://l/a"}]}
    two = {**VLLM, "adapters": [{"name": "a", "source": "pvc://l/a"}, {"name": "b", "source": "pvc://l/b"}]}
    assert spec_hash(_model(one)) == spec_hash(_model(two))
    assert spec_hash(_model(VLLM)) != spec_hash(_model(one))  # --enable-lora
    args = engine_args(_model(two))
    assert "--enable-lora" in args and "--lora-modules" not in args
    l1 = {**LLAMA, "adapters": [{"name": "a", "source": "pvc://l/a.gguf"}]}
    l2 = {
        **LLAMA,
        "adapters": [{"name": "a", "source": "pvc://l/a.gguf"}, {"name": "b", "source": "pvc://l/b.gguf"}],
    }
    assert spec_hash(_model(l1)) != spec_hash(_model(l2))
    args = engine_args(_model(l2))
    root = contract.PVC_MOUNT_ROOT
    # Loaded at scale 0: a request that names no adapter gets the base model.
    assert args[args.index("--lora-scaled") + 1] == f"{root}/l/a.gguf:0,{root}/l/b.gguf:0"
    assert "--lora" not in args
    dep = render(_model(l2), CONFIG)[0]
    ann = json.loads(dep["spec"]["template"]["metadata"]["annotations"][contract.ANNOTATION_ADAPTERS])
    assert ann == [{"name": "a", "id": 0, "scale": 1.0}, {"name": "b", "id": 1, "scale": 1.0}]


def test_the_evict_job_runs_the_evict_command_on_the_claim(capsys):
    from kubeinfer.cli import main

    assert main(["weights", "evict-job", "-n", "ml", "--claim", "shared", "a--main--123", "b--v2--456"]) == 0
    job = __import__("yaml").safe_load(capsys.readouterr().out)
    pod = job["spec"]["template"]["spec"]
    args = build_parser().parse_args(pod["containers"][0]["args"])
    assert args.keys == ["a--main--123", "b--v2--456"] and str(args.root) == contract.WEIGHTS_MOUNT
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared"}
    assert job["metadata"]["namespace"] == "ml"
    assert main(["weights", "evict-job", "-n", "ml", "../etc"]) == 1  # never a path out of the claim


def test_events_mark_each_quarter_of_a_download_once():
    def w(done, total=100, phase="Downloading"):
        return {"phase": phase, "bytesDone": done, "bytesTotal": total, "summary": f"{done}%"}

    assert progress_milestone(None, w(10)) is None
    assert progress_milestone(w(10), w(30)) == "25% of the weights downloaded: 30%"
    assert progress_milestone(w(30), w(40)) is None  # the same quarter: no second Event
    assert progress_milestone(w(40), w(80)).startswith("75%")  # type: ignore[union-attr]
    assert progress_milestone(w(80), w(100, phase="Ready")) is None  # done: the Cached Event says it
    assert progress_milestone(w(80), None) is None
