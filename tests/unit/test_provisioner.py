"""The local stack's volume provisioner, pure parts: which claims it serves, the volume it makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubeinfer_devkit.devcluster.podplan import NODE_NAME
from kubeinfer_devkit.devcluster.provisioner import (
    ANN_DEFAULT_CLASS,
    ANN_PROVISIONED_BY,
    PROVISIONER,
    STORAGE_CLASS,
    inside,
    reclaimable,
    refusal,
    storage_class,
    volume_dir,
    volume_for,
    wants_volume,
)


def _claim(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "kubeinfer-weights", "namespace": "team-a", "uid": "1234-abcd", "resourceVersion": "42",
            "annotations": {"volume.kubernetes.io/storage-provisioner": PROVISIONER},
        },
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}},
                 "storageClassName": STORAGE_CLASS, **spec},
        "status": {"phase": "Pending"},
    }  # fmt: skip


def test_the_class_is_the_default_immediate_and_deletes() -> None:
    sc = storage_class()
    assert sc["metadata"]["annotations"][ANN_DEFAULT_CLASS] == "true"
    assert (sc["provisioner"], sc["volumeBindingMode"], sc["reclaimPolicy"]) == (
        PROVISIONER,
        "Immediate",
        "Delete",
    )


def test_only_unbound_claims_handed_to_us_by_the_pv_controller() -> None:
    assert wants_volume(_claim())
    beta = _claim()
    beta["metadata"]["annotations"] = {"volume.beta.kubernetes.io/storage-provisioner": PROVISIONER}
    assert wants_volume(beta)
    assert not wants_volume(_claim(volumeName="pv-1"))  # bound (or pre-bound by hand)
    unmarked = _claim(storageClassName="")
    unmarked["metadata"]["annotations"] = {}
    assert not wants_volume(unmarked)  # ensure_claim's hand-bound claims
    other = _claim()
    other["metadata"]["annotations"] = {"volume.kubernetes.io/storage-provisioner": "ebs.csi.aws.com"}
    assert not wants_volume(other)
    gone = _claim()
    gone["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert not wants_volume(gone)


def test_the_volume_is_pre_bound_to_the_claim_with_its_size_and_modes(tmp_path: Path) -> None:
    claim = _claim()
    path = volume_dir(tmp_path, claim)
    assert path.name == "pvc-1234-abcd_team-a_kubeinfer-weights"
    pv = volume_for(claim, storage_class(), path)
    assert pv["metadata"]["name"] == "pvc-1234-abcd"
    assert pv["metadata"]["annotations"][ANN_PROVISIONED_BY] == PROVISIONER
    spec = pv["spec"]
    assert spec["capacity"] == {"storage": "20Gi"} and spec["accessModes"] == ["ReadWriteMany"]
    assert spec["storageClassName"] == STORAGE_CLASS and spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["hostPath"]["path"] == str(path)
    ref = spec["claimRef"]
    assert (ref["namespace"], ref["name"], ref["uid"], ref["kind"]) == (
        "team-a", "kubeinfer-weights", "1234-abcd", "PersistentVolumeClaim"
    )  # fmt: skip
    term = spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert term == {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}


def test_what_is_refused() -> None:
    assert refusal(_claim()) is None
    assert "selector" in str(refusal(_claim(selector={"matchLabels": {"a": "b"}})))
    assert "Block" in str(refusal(_claim(volumeMode="Block")))
    assert "dataSource" in str(refusal(_claim(dataSource={"kind": "PersistentVolumeClaim", "name": "x"})))


def test_only_our_released_volumes_under_delete_are_reclaimed(tmp_path: Path) -> None:
    pv = volume_for(_claim(), storage_class(), tmp_path / "x")
    assert not reclaimable(pv)
    pv["status"] = {"phase": "Released"}
    assert reclaimable(pv)
    assert not reclaimable({**pv, "spec": {**pv["spec"], "persistentVolumeReclaimPolicy": "Retain"}})
    assert not reclaimable({**pv, "metadata": {"name": "by-hand"}})
    assert inside(tmp_path, str(tmp_path / "x")) and not inside(tmp_path, str(tmp_path))
    assert not inside(tmp_path, str(tmp_path / ".." / "elsewhere"))
