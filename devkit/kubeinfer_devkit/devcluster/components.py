"""What the local control plane's components are told: their command lines, and kwok's fake node.

Pure: binaries, paths and ports in, argv (or a Node object) out. :class:`~kubeinfer_devkit.devcluster.
controlplane.ControlPlane` writes the files these name (certificates, kubeconfigs, kwok's config),
starts the components in order and waits for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # first IP of the range: the `kubernetes` Service, in the SANs
DEFAULT_POD_CIDR = "10.244.0.0/16"  # kwok hands out pod IPs from here (fake, never dialled)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"  # nodes carrying `<this>: fake` are kwok's


def etcd(binary: Path, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(binary),
        "--name=kubeinfer",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubeinfer={peer}",
        "--initial-cluster-state=new",
        # Throw-away data: skip fsync (the single biggest cost of etcd on a slow disk).
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def kube_apiserver(binary: Path, etcd_port: int, secure_port: int, pki: Path) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={secure_port}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--token-auth-file={pki / 'tokens.csv'}",
        # Published in kube-system/extension-apiserver-authentication; without it the
        # controller-manager and scheduler log "missing content for CA bundle" forever.
        # No cert with this CN is ever issued: nothing can use the front-proxy path.
        f"--requestheader-client-ca-file={pki / 'ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--authorization-mode=Node,RBAC",
        # `kubectl logs` reaches a node at its InternalIP (127.0.0.1); the default would try
        # the Hostname address first, which does not resolve.
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--allow-privileged=true",
        # The `kubernetes` Service's endpoint would be 127.0.0.1, which Endpoints validation
        # rejects (loopback): don't reconcile it instead of logging errors forever.
        "--endpoint-reconciler-type=none",
        "--profiling=false",
        "--v=1",
    ]


def kube_controller_manager(
    binary: Path, kubeconfig: Path, secure_port: int, cert_dir: Path, pki: Path, disabled: Sequence[str]
) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={secure_port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        # All default controllers: namespace, garbage collector, deployment/replicaset, job,
        # serviceaccount(+token), endpoints, node lifecycle (evicts pods from a dead kwok node) ...
        # The cloud/ipam ones stay off because their flags (--allocate-node-cidrs ...) are unset.
        "--controllers=" + ",".join(["*", *(f"-{c}" for c in disabled)]),
        # Each controller talks to the API as its own ServiceAccount (TokenRequest tokens),
        # the way a real cluster runs; their RBAC roles come from the bootstrap policy.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--profiling=false",
        "--v=1",
    ]


def kube_scheduler(binary: Path, kubeconfig: Path, secure_port: int, cert_dir: Path) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={secure_port}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kwok(binary: Path, kubeconfig: Path, config: Path, pod_cidr: str) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
        # Node heartbeats via Leases (kube-node-lease), so the node lifecycle controller
        # keeps the node Ready.
        "--node-lease-duration-seconds=40",
        f"--cidr={pod_cidr}",
        # No --server-address: kwok's kubelet-like HTTP server (logs/exec) stays off.
    ]


def kwok_node(name: str, cpu: str, memory: str, gpus: int, kubelet_version: str) -> dict[str, Any]:
    """The fake GPU node kwok manages (its annotation), as registered before kwok takes it over."""
    resources = {
        "cpu": cpu,
        "memory": memory,
        "pods": "110",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {},
        # A Node's status is accepted on create (that is how kubelets register); kwok keeps
        # capacity/allocatable as given and fills in conditions, nodeInfo and phase.
        "status": {
            "capacity": resources,
            "allocatable": resources,
            # Loopback, so that whatever the apiserver dials for logs/exec stays on this machine.
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            # Otherwise kwok reports "kwok-<version>", which is not a Kubernetes version.
            "nodeInfo": {"kubeletVersion": kubelet_version},
        },
    }
