"""The CLI: clear messages and exit codes, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from kubeinfer.cli import main
from kubeinfer.crdgen import crd_yaml
from tests.cases import ROOT

EX = ROOT / "examples"


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "kubeinfer.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def test_render_prints_manifests_and_estimate():
    r = run("render", "-f", str(EX / "llama-3.1-8b-awq.yaml"), "--estimate")
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = [d.get("kind") for d in docs]
    assert kinds[:3] == ["Deployment", "Service", "PodDisruptionBudget"]
    assert docs[-1]["fits"] is True


def test_validate_ok_and_errors(tmp_path, capsys):
    assert main(["validate", "-f", str(EX / "tiny-gguf-cpu.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubeinfer.io/v1alpha1\nkind: LLMModel\nmetadata: {name: x}\n"
        "spec: {engine: llama-server, model: {source: org/m:Q4_K_M}, kvCache: {dtype: fp8}, bogus: 1}\n"
    )
    assert main(["validate", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "spec.bogus: unknown field" in err
    assert "Traceback" not in err


def test_validate_reports_cel_rule_with_allowed_values(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kubeinfer.io/v1alpha1\nkind: LLMModel\nmetadata: {name: x}\n"
        "spec: {engine: llama-server, model: {source: org/m:Q4_K_M}, kvCache: {dtype: fp8}}\n"
    )
    assert main(["validate", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "x: spec: kvCache.dtype must be" in err and "q8_0" in err


def test_missing_file_bad_yaml_wrong_type():
    r = run("validate", "-f", "/nonexistent/model.yaml")
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("validate", "-f", "-", stdin="spec: [unclosed")
    assert r.returncode == 1 and "not valid YAML" in r.stderr
    r = run(
        "validate",
        "-f",
        "-",
        stdin="kind: LLMModel\nmetadata: {name: x}\nspec: {replicas: many, model: {}}\n",
    )
    assert r.returncode == 1 and "spec.replicas" in r.stderr and "Traceback" not in r.stderr
    r = run("validate", "-f", "-", stdin="kind: Deployment\nmetadata: {name: x}\n")
    assert r.returncode == 1 and "expected LLMModel" in r.stderr


def test_multi_document_files(tmp_path):
    f = tmp_path / "two.yaml"
    f.write_text(
        (EX / "tiny-gguf-cpu.yaml").read_text() + "\n---\n" + (EX / "remote-openai.yaml").read_text()
    )
    r = run("validate", "-f", str(f))
    assert r.returncode == 0 and r.stdout.count("valid") == 2


def test_crd_command_matches_the_committed_crd():
    r = run("crd")
    assert r.returncode == 0
    assert r.stdout == crd_yaml()
    assert (ROOT / "crds" / "kubeinfer.io_llmmodels.yaml").read_text() == r.stdout, "run `make gen`"


def test_gateway_config_file_and_flags(tmp_path):
    from kubeinfer.cli import build_parser
    from kubeinfer.cliutil import CLIError
    from kubeinfer.gateway.cli import gateway_config

    f = tmp_path / "gateway.yaml"
    f.write_text("scrapeInterval: 2\nauth: keys\nretries: 1\naccessLog: true\n")
    args = build_parser().parse_args(["gateway", "--config", str(f), "--retries", "4", "--no-access-log"])
    config = gateway_config(args)
    assert (config.scrape_interval, config.auth, config.retries, config.access_log) == (2.0, "keys", 4, False)
    assert gateway_config(build_parser().parse_args(["gateway"])).auth == "auto"
    f.write_text("scrapeIntervall: 2\n")
    with pytest.raises(CLIError, match="scrapeIntervall"):
        gateway_config(build_parser().parse_args(["gateway", "--config", str(f)]))
    with pytest.raises(CLIError, match="no such file"):
        gateway_config(build_parser().parse_args(["gateway", "--config", str(tmp_path / "nope.yaml")]))
