"""Certificates and credentials of the local cluster: the control plane's CA, serving certificate and
service-account keys, its kubeconfigs, and the node agent's kubelet serving certificate.

cryptography is imported inside the functions: it is a dev dependency, not one of the operator's, and
the node agent runs on without ``kubectl logs`` when it is missing.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import secrets
import ssl
from collections.abc import Mapping
from pathlib import Path

import yaml


def write_cluster_pki(pki: Path, service_ip: str) -> None:
    """CA, apiserver serving cert (signed by the CA) and the service-account signing key pair.

    `service_ip`: the `kubernetes` Service's ClusterIP, one of the serving cert's SANs.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=365)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeinfer-devcluster-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    dns = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    ips = ["127.0.0.1", service_ip]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    # Service-account tokens are signed by the apiserver (TokenRequest) and, for legacy token
    # Secrets, by the controller-manager; both get this key, the apiserver also its public half.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "apiserver.crt": srv_cert.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": pem_key(srv_key),
        "sa.key": pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        path = pki / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)


def write_tokens(pki: Path, users: Mapping[str, str], reuse: bool) -> dict[str, str]:
    """The apiserver's static token file (``tokens.csv``): a bearer token per user of `users` (user ->
    its groups, quoted as the file wants them, or ""). With `reuse`, users keep their tokens from
    ``tokens.json``; returns user -> token."""
    tokens_json = pki / "tokens.json"
    tokens: dict[str, str] = json.loads(tokens_json.read_text()) if reuse else {}
    for user in users:
        tokens.setdefault(user, secrets.token_hex(24))
    tokens_json.write_text(json.dumps(tokens))
    tokens_json.chmod(0o600)
    # Static tokens. Format: token,user,uid[,"group1,group2"]
    csv = pki / "tokens.csv"
    csv.write_text(
        "".join(
            f"{tokens[u]},{u},{u}" + (f",{groups}" if groups else "") + "\n" for u, groups in users.items()
        )
    )
    csv.chmod(0o600)
    return tokens


def write_kubeconfig(path: Path, server: str, ca_file: Path, user: str, token: str) -> None:
    """A kubeconfig (mode 0600) for `user` with a bearer token; the CA is embedded."""
    ca_data = base64.b64encode(ca_file.read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubeinfer-dev",
                "cluster": {"server": server, "certificate-authority-data": ca_data},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "kubeinfer-dev", "context": {"cluster": "kubeinfer-dev", "user": user}}],
        "current-context": "kubeinfer-dev",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def kubelet_serving_context(pki: Path, node_name: str, address: str) -> ssl.SSLContext:
    """A serving certificate for the kubelet port, made once (the apiserver does not verify it: no
    --kubelet-certificate-authority is set on the local control plane)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    crt, key_path = pki / "kubelet.crt", pki / "kubelet.key"
    if not crt.is_file() or not key_path.is_file():
        pki.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)])
        t = dt.datetime.now(dt.UTC)
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(t - dt.timedelta(hours=1))
            .not_valid_after(t + dt.timedelta(days=3650)).add_extension(san, False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key_path)
    return ctx
