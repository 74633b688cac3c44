"""`kubeinfer bench coldstart`: its pure parts (marks from watched objects, phases, statistics, the goal,
the table) and its CLI's refusal without a stack. No servers."""

from __future__ import annotations

import pytest

from kubeinfer.cli import main
from kubeinfer_devkit.bench.coldstart import (
    MARKS,
    TARGET_S,
    StackError,
    format_coldstart,
    goal,
    model_manifest,
    offsets,
    phases,
    pod_marks,
    replicas_mark,
    summarize_phases,
    zero_step,
)


def _pod(scheduled=False, running=False, ready=False, deleting=False):
    conds = [{"type": "PodScheduled", "status": "True" if scheduled else "False"},
             {"type": "Ready", "status": "True" if ready else "False"}]  # fmt: skip
    meta = {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {"name": "p"}
    state = {"running": {"startedAt": "x"}} if running else {"waiting": {"reason": "ContainerCreating"}}
    return {"metadata": meta, "status": {"conditions": conds, "containerStatuses": [{"state": state}]}}


def test_pod_marks_record_each_stage_the_first_time_it_is_seen():
    marks: dict[str, float] = {}
    pod_marks({"metadata": {"name": "p"}}, 1.0, marks)  # just created: no status yet
    assert marks == {"pod_created": 1.0}
    pod_marks(_pod(scheduled=True), 1.2, marks)
    pod_marks(_pod(scheduled=True, running=True), 1.5, marks)
    pod_marks(_pod(scheduled=True, running=True), 1.7, marks)  # no change: nothing moves
    pod_marks(_pod(scheduled=True, running=True, ready=True), 4.0, marks)
    pod_marks(_pod(scheduled=True, running=True, ready=True), 9.0, marks)
    assert marks == {"pod_created": 1.0, "pod_scheduled": 1.2, "container_running": 1.5, "pod_ready": 4.0}


def test_pod_marks_ignore_a_terminating_pod():
    marks: dict[str, float] = {}
    pod_marks(_pod(scheduled=True, running=True, ready=True, deleting=True), 1.0, marks)
    assert marks == {}


def test_replicas_mark_when_one_replica_is_asked_for():
    marks: dict[str, float] = {}
    replicas_mark({"spec": {"replicas": 0}}, 1.0, marks, "replicas_1")
    replicas_mark({"spec": {}}, 1.1, marks, "replicas_1")
    assert marks == {}
    replicas_mark({"spec": {"replicas": 1}}, 1.3, marks, "replicas_1")
    replicas_mark({"spec": {"replicas": 1}}, 2.0, marks, "replicas_1")
    assert marks == {"replicas_1": 1.3}


MARKED = {"request": 100.0, "first_comment": 100.5, "replicas_1": 100.02, "deployment_scaled": 100.1,
          "pod_created": 100.2, "pod_scheduled": 100.3, "container_running": 100.6, "pod_ready": 102.3,
          "first_token": 102.8, "end": 102.9}  # fmt: skip


def test_phases_from_marks():
    got = phases(MARKED)
    assert got == pytest.approx(
        {"scale_requested": 0.02, "schedule": 0.3, "engine_start": 2.0, "first_token": 0.5, "total": 2.8}
    )
    assert got["total"] == pytest.approx(got["schedule"] + got["engine_start"] + got["first_token"])


def test_phases_missing_marks_are_none():
    got = phases({"request": 5.0, "replicas_1": 5.1})
    assert got["scale_requested"] == pytest.approx(0.1)
    assert got["schedule"] is got["engine_start"] is got["first_token"] is got["total"] is None


def test_offsets_are_every_mark_after_the_request():
    got = offsets({"request": 10.0, "first_comment": 10.5, "end": 40.0})
    assert list(got) == list(MARKS)
    assert got["first_comment"] == pytest.approx(0.5) and got["end"] == pytest.approx(30.0)
    assert got["pod_ready"] is None


def test_summary_min_median_max_over_runs_skipping_missing():
    runs = [
        {"total": 3.0, "schedule": 0.2},
        {"total": 1.0, "schedule": None},
        {"total": 2.0, "schedule": 0.4},
    ]
    s = summarize_phases(runs)
    assert (s["total"]["min"], s["total"]["median"], s["total"]["max"]) == (1.0, 2.0, 3.0)
    assert s["total"]["runs"] == 3 and s["total"]["mean"] == pytest.approx(2.0)
    assert s["schedule"]["median"] == pytest.approx(0.3) and s["schedule"]["runs"] == 2
    assert s["engine_start"] == {
        "min": None,
        "median": None,
        "max": None,
        "mean": None,
        "stddev": None,
        "runs": 0,
    }


def test_goal_needs_every_run_within_ten_seconds():
    assert TARGET_S == 10.0
    assert goal([2.0, 9.9, 10.0]) == {
        "target_s": 10.0,
        "met": True,
        "runs_within": 3,
        "runs": 3,
        "worst_s": 10.0,
    }
    missed = goal([2.0, 10.5])
    assert not missed["met"] and missed["runs_within"] == 1 and missed["worst_s"] == 10.5
    assert not goal([2.0, None])["met"]  # a run without a first token misses
    assert not goal([])["met"]
    assert goal([4.0], target=3.0)["met"] is False


def _result(totals):
    runs = []
    for t in totals:
        marks = dict(MARKED, first_token=100.0 + t) if t is not None else {"request": 0.0}
        runs.append({"phases": phases(marks), "offsets": offsets(marks), "comments": [], "status": 200,
                     "error": "" if t is not None else "the stream ended without a token"})  # fmt: skip
    per_run = [r["phases"] for r in runs]
    return {"model": "coldstart-tiny", "gateway": "http://127.0.0.1:1", "runs": runs,
            "summary": summarize_phases(per_run), "goal": goal([p["total"] for p in per_run])}  # fmt: skip


def test_table_has_every_phase_per_run_and_the_verdict():
    text = format_coldstart(_result([2.8, 3.5]))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("phase"))
    assert header.split() == ["phase", "run", "1", "run", "2", "min", "median", "max"]
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "2.80", "3.50", "2.80", "3.15", "3.50"]
    assert any(line.startswith("pod_ready") for line in lines)  # the timeline
    assert "goal met: 2/2 runs had a first token within 10 s" in text


def test_table_says_goal_missed_and_shows_errors():
    text = format_coldstart(_result([12.0, None]))
    assert "goal missed: 0/2 runs" in text and "worst 12.00 s" in text
    assert "run 2: the stream ended without a token" in text
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.split()[1:3] == ["12.00", "-"]


def test_model_manifest_is_the_example_renamed_at_zero_and_autoscaled():
    doc = model_manifest("cs")
    assert doc["kind"] == "LLMModel" and doc["metadata"] == {"name": "cs", "namespace": "default"}
    assert doc["spec"]["engine"] == "llama-server"
    assert doc["spec"]["model"]["servedName"] == "cs"
    assert doc["spec"]["model"]["source"] == "pvc://kubeinfer-models/tiny-llama.gguf"
    assert doc["spec"]["replicas"] == 0
    assert doc["spec"]["autoscaling"] == {"minReplicas": 0, "maxReplicas": 1, "scaleDownDelay": "10m"}


def test_cli_without_a_stack_says_to_start_one(tmp_path, capsys):
    assert main(["bench", "coldstart", "--state-dir", str(tmp_path / "none"), "--runs", "1"]) != 0
    err = capsys.readouterr().err
    assert "start it with `kubeinfer up`" in err and "Traceback" not in err


def test_cli_rejects_zero_runs(tmp_path, capsys):
    assert main(["bench", "coldstart", "--state-dir", str(tmp_path), "--runs", "0"]) != 0
    assert "--runs must be at least 1" in capsys.readouterr().err


def test_zero_step_waits_out_the_autoscaler_before_scaling_to_zero():
    def model(replicas, desired=None):
        status = {} if desired is None else {"autoscaling": {"desiredReplicas": desired, "load": 0.4}}
        return {"spec": {"replicas": replicas}, "status": status}

    # Its window still holds the last request: a scale to 0 now would be undone at once.
    assert zero_step(model(1, desired=1), 1, "ready") == "autoscaler"
    assert zero_step(model(1, desired=0), 1, "ready") == "scale"
    assert zero_step(model(1), 1, "ready") == "scale"  # the autoscaler has not reported yet
    assert zero_step(model(0, desired=0), 1, "ready") == "wait"  # the pod is stopping
    assert zero_step(model(0, desired=0), 0, "starting") == "wait"  # the gateway has not caught up
    assert zero_step(model(0, desired=0), 0, "scaled-to-zero") == "done"
    with pytest.raises(StackError, match="gone"):
        zero_step(None, 0, None)
