"""Issue 13: no path promotes a model whose evidence falls short, and no bad input ends in a traceback.

Each test names the behaviour of the code before the fix that it catches.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.io import sha256_file
from tests.conftest import run_stage
from pipeline.cli import main as cli


@pytest.fixture
def ws(pipeline_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ROBUSTGATE_SIGNING_KEY", raising=False)
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    return root


def keypair(directory: Path, name: str = "release") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def registered_versions(root: Path) -> list:
    if not (root / "mlflow.db").exists():
        return []
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_model_versions("name = 'tiny-model'")


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fail_the_gate(root: Path) -> None:
    policy = root / "policies" / "tiny.yaml"
    policy.write_text(policy.read_text().replace("threshold: 0.5", "threshold: 0.999"))
    assert run_stage("report", root) == 0  # as dvc repro does: the policy is in the report's manifest
    assert run_stage("gate", root) == 1


# --- 1. the verdict cannot be forged -------------------------------------------------------------

def test_edited_verdict_after_a_failed_gate_is_refused(ws, capsys):
    """Before: register read "passed": true from gate.json, created a version and moved `approved`."""
    fail_the_gate(ws)
    edit_json(ws / "metrics/gate.json", lambda g: g.update(passed=True, blocking_failures=[]))
    capsys.readouterr()
    assert run_stage("register", ws) == 1
    err = capsys.readouterr().err
    assert "INTEGRITY MISMATCH" in err and "passed=False" in err
    assert registered_versions(ws) == []


def test_swapped_onnx_with_its_hash_in_gate_json_is_refused(ws, capsys):
    """Before: flipping a byte of model.onnx and pinning its new hash in gate.json got it approved."""
    onnx_path = ws / "models/model.onnx"
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 1
    onnx_path.write_bytes(bytes(data))
    edit_json(ws / "metrics/gate.json", lambda g: g["artifacts"].update({"models/model.onnx": sha256_file(onnx_path)}))
    capsys.readouterr()
    assert run_stage("register", ws) == 1
    assert "models/model.onnx: SHA-256" in capsys.readouterr().err
    assert registered_versions(ws) == []


def test_policy_weakened_after_the_gate_is_refused(ws, capsys):
    """Before: a policy edited after the gate was never compared with the one the gate judged."""
    policy = ws / "policies" / "tiny.yaml"
    policy.write_text(policy.read_text().replace("threshold: 0.5", "threshold: 0.999"))
    capsys.readouterr()
    assert run_stage("register", ws) == 1
    assert "INTEGRITY MISMATCH" in capsys.readouterr().err
    assert registered_versions(ws) == []


def test_signed_verdict_is_checked_by_verify_and_register(ws, tmp_path, monkeypatch, capsys):
    """Before: gate.json had no signature and verify never looked at it."""
    private, public = keypair(tmp_path)
    monkeypatch.setenv("ROBUSTGATE_SIGNING_KEY", str(private))
    assert run_stage("report", ws) == 0 and run_stage("gate", ws) == 0
    gate, signature = ws / "metrics/gate.json", ws / "metrics/gate.json.sig"
    assert signature.is_file() and json.loads(gate.read_text())["signed"] is True
    capsys.readouterr()
    assert cli(["verify", str(ws), "--public-key", str(public)]) == 0
    assert "gate verdict PASSED (signed)" in capsys.readouterr().out

    original = gate.read_text()
    gate.write_text(original.replace('"policy_name": "tiny"', '"policy_name": "tiny "'))
    assert cli(["verify", str(ws), "--public-key", str(public)]) == 1
    assert "gate.json signature does not verify" in capsys.readouterr().out
    gate.write_text(original)

    signature.unlink()  # a stripped signature on a run configured to sign
    assert cli(["verify", str(ws)]) == 1
    assert "gate.json.sig is missing" in capsys.readouterr().out
    assert run_stage("register", ws) == 1
    assert "gate.json.sig is missing" in capsys.readouterr().err
    assert registered_versions(ws) == []


def test_verify_checks_the_hashes_the_verdict_pinned(ws, capsys):
    """Before: gate.json was outside verify's view; a verdict pinning another model passed verify."""
    assert cli(["verify", str(ws)]) == 0
    edit_json(ws / "metrics/gate.json", lambda g: g["artifacts"].update({"models/model.onnx": "0" * 64}))
    capsys.readouterr()
    assert cli(["verify", str(ws)]) == 1
    assert "models/model.onnx: SHA-256 differs from the hash metrics/gate.json pinned" in capsys.readouterr().out


# --- verify: an empty or partial manifest vouches for nothing ---------------------------------------

@pytest.mark.parametrize("drop", ["all", "models/model.onnx", "reports/build/report.html"])
def test_verify_refuses_a_manifest_without_the_reported_artifacts(ws, capsys, drop):
    """Before: `verify` said OK for a manifest listing no artifacts (or not the ONNX file)."""
    manifest = ws / "reports/build/manifest.json"
    edit_json(manifest, lambda m: m.update(artifacts={}) if drop == "all" else m["artifacts"].pop(drop))
    capsys.readouterr()
    assert cli(["verify", str(ws)]) == 1
    out = capsys.readouterr().out
    assert ("lists no artifacts" in out) if drop == "all" else (f"{drop}: not listed in the manifest" in out)


def test_verify_refuses_a_deleted_manifest_signature(ws, tmp_path, monkeypatch, capsys):
    """Before: deleting manifest.json.sig turned a signed manifest into an unsigned one that verified."""
    private, _ = keypair(tmp_path)
    monkeypatch.setenv("ROBUSTGATE_SIGNING_KEY", str(private))
    assert run_stage("report", ws) == 0
    monkeypatch.delenv("ROBUSTGATE_SIGNING_KEY")
    (ws / "reports/build/manifest.json.sig").unlink()
    capsys.readouterr()
    assert cli(["verify", str(ws)]) == 1
    assert "manifest.json.sig is missing" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["reports/build/manifest.json", "metrics/gate.json"])
def test_truncated_evidence_json_is_one_line_exit_1(ws, capsys, name):
    """Before: a truncated manifest or gate.json ended `verify` and `register` in a JSONDecodeError traceback."""
    path = ws / name
    path.write_text(path.read_text()[:40])
    capsys.readouterr()
    assert cli(["verify", str(ws)]) == 1
    assert "not valid JSON" in capsys.readouterr().out
    assert run_stage("register", ws) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "INTEGRITY MISMATCH" in err


def test_truncated_metrics_is_one_line_exit_2(ws, capsys):
    """Before: a truncated metrics/export.json ended the gate in a JSONDecodeError traceback."""
    path = ws / "metrics/export.json"
    path.write_text(path.read_text()[:30])
    capsys.readouterr()
    assert run_stage("gate", ws) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- 3. a model sidecar never runs code ----------------------------------------------------------

def test_sidecar_naming_other_code_is_refused_before_anything_runs(ws, tmp_path, capsys):
    """Before: model.json naming `subprocess:run` with input_shape ["sh", "-c", ...] ran the command."""
    marker = tmp_path / "pwned"
    edit_json(ws / "models/model.json", lambda m: m.update(model="subprocess:run",
                                                           input_shape=["sh", "-c", f"touch {marker}"]))
    capsys.readouterr()
    assert run_stage("attack", ws) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "refused" in err and len(err.strip().splitlines()) == 1


def test_sidecar_with_other_options_is_refused(ws, capsys):
    """Before: load_checkpoint built whatever architecture model.json named, ignoring the params."""
    edit_json(ws / "models/model.json", lambda m: m.update(model_options={"hidden": [64]}))
    assert run_stage("certify", ws) == 2
    assert "model_options" in capsys.readouterr().err


def test_pickled_objects_in_model_pt_are_refused_in_one_line(ws, capsys):
    """Before: torch's UnpicklingError (with its advice to set weights_only=False) ended in a traceback."""
    torch.save({"weight": Path("/etc/passwd")}, ws / "models/model.pt")
    capsys.readouterr()
    assert run_stage("export", ws) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1


# --- model outputs are checked in every stage that runs the model -----------------------------------

@pytest.mark.parametrize("stage", ["smooth", "certify", "export"])
def test_nan_model_is_refused_by_every_stage(ws, capsys, stage):
    """Before: `smooth` certified 12% of an all-NaN model (only `attack` checked the outputs)."""
    weights = ws / "models/model.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({k: torch.full_like(v, float("nan")) for k, v in state.items()}, weights)
    capsys.readouterr()
    assert run_stage(stage, ws) == 2
    assert "NaN or inf logits" in capsys.readouterr().err


@pytest.mark.parametrize("module,body", [("broken_factory", "    raise RuntimeError('factory broke')\n"),
                                         ("broken_forward", "    return Broken()\n")])
def test_model_factory_or_forward_that_raises_is_one_line(ws, capsys, module, body):
    """Before: an exception in a user factory or its forward pass ended `train` in a traceback."""
    (ws / f"{module}.py").write_text(
        "import torch\n\nclass Broken(torch.nn.Module):\n    def forward(self, x):\n"
        "        raise ValueError('forward broke')\n\n\ndef build(input_shape, num_classes):\n" + body)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["model"] = {"name": f"{module}:build"}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    capsys.readouterr()
    assert run_stage("train", ws) == 2
    err = capsys.readouterr().err
    assert "broke" in err and len(err.strip().splitlines()) == 1


# --- params and policies ---------------------------------------------------------------------------

def test_duplicate_keys_name_the_key_and_both_lines(ws, capsys):
    """Before: YAML kept the last of two equal keys silently (a weakened threshold could hide in a policy)."""
    params = ws / "params.yaml"
    params.write_text(params.read_text() + "seed: 3\n")
    first = 1 + params.read_text().splitlines().index("seed: 0")
    last = len(params.read_text().splitlines())
    capsys.readouterr()
    assert run_stage("gate", ws) == 2
    assert f"duplicate key 'seed' on lines {first} and {last}" in capsys.readouterr().err

    params.write_text(params.read_text().replace("seed: 3\n", ""))
    policy = ws / "policies/tiny.yaml"
    policy.write_text(policy.read_text().replace("  threshold: 0.5\n", "  threshold: 0.5\n  threshold: 0.1\n"))
    assert run_stage("gate", ws) == 2
    assert "tiny.yaml: duplicate key 'threshold'" in capsys.readouterr().err


def test_invalid_utf8_params_is_one_line(ws, capsys):
    """Before: a params file with invalid UTF-8 ended in a UnicodeDecodeError traceback."""
    (ws / "params.yaml").write_bytes((ws / "params.yaml").read_bytes() + b"# \xff\xfe\n")
    capsys.readouterr()
    assert run_stage("gate", ws) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


def test_params_outside_the_workspace_are_refused(ws, tmp_path, capsys):
    """Before: `--params /elsewhere/params.yaml` was read although every path must stay in the workspace."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ws / "params.yaml", outside / "params.yaml")
    capsys.readouterr()
    assert cli(["gate", "--workspace", str(ws), "--params", str(outside / "params.yaml")]) == 2
    assert "--params" in capsys.readouterr().err


def test_bad_signing_key_stops_the_report_before_it_writes(ws, tmp_path, monkeypatch, capsys):
    """Before: a non-key file in ROBUSTGATE_SIGNING_KEY crashed after report.html had been replaced."""
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    monkeypatch.setenv("ROBUSTGATE_SIGNING_KEY", str(bad))
    build = ws / "reports/build"
    before = {p.name: p.stat().st_mtime_ns for p in build.iterdir()}
    capsys.readouterr()
    assert run_stage("report", ws) == 2
    assert "ROBUSTGATE_SIGNING_KEY" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in build.iterdir()} == before
    assert run_stage("gate", ws) == 2  # the gate signs its verdict with the same key: same refusal


# --- 5. a registry that cannot be read is never "no approved model" --------------------------------

def test_report_refuses_to_say_no_approved_model_when_the_registry_fails(ws, monkeypatch, capsys):
    """Before: a registry that failed to answer became "registry not readable" text in the report (exit 0);
    a failure is RegistryUnreachable (exit 1) and no report file is replaced. (The unreachable-server
    cases run against a closed port in tests/test_registry_concurrency.py.)"""
    broken = ws / "broken.db"
    broken.write_text("not an sqlite database\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{broken}")
    html = (ws / "reports/build/report.html").read_bytes()
    capsys.readouterr()
    assert run_stage("report", ws) == 1
    err = capsys.readouterr().err
    assert "REGISTRY UNREACHABLE" in err and "file is not a database" in err and len(err.strip().splitlines()) == 1
    assert (ws / "reports/build/report.html").read_bytes() == html
    assert run_stage("rollback", ws) == 1
    assert "REGISTRY UNREACHABLE" in capsys.readouterr().err


# --- issue 19: the registry holds the evaluated bytes -------------------------------------------------

def test_registry_serves_the_evaluated_onnx_bytes(ws, capsys):
    """Before: mlflow.onnx.log_model re-serialised the model, so the registry held other bytes."""
    import mlflow.artifacts

    from pipeline.registry import tracking

    assert run_stage("register", ws) == 0
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    with tracking(uri):
        served = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-model/1",
                                                          dst_path=str(ws.parent / "download")))
    manifest = json.loads((ws / "reports/build/manifest.json").read_text())
    digest = sha256_file(served / "model.onnx")
    assert digest == sha256_file(ws / "models/model.onnx") == manifest["artifacts"]["models/model.onnx"]
    capsys.readouterr()
    assert run_stage("status", ws) == 0
    assert "same" in capsys.readouterr().out.splitlines()[-1]
    assert cli(["verify", str(ws), "--registry", uri]) == 0
    assert "version(s) 1 of 'tiny-model' serve this model.onnx byte for byte" in capsys.readouterr().out

    stored = next((ws / "mlruns").rglob("artifacts/model/model.onnx"))  # the registry's own copy, altered
    stored.write_bytes(stored.read_bytes() + b"\0")
    assert run_stage("status", ws) == 1
    assert "DIFFERENT" in capsys.readouterr().out
    assert cli(["verify", str(ws), "--registry", uri]) == 1
    assert "registry version 1 of 'tiny-model' serves an ONNX file" in capsys.readouterr().out
