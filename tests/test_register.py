"""Registration against a real MLflow sqlite store: approve, refuse tampering, keep approved on failure."""
import json
import shutil

import pytest

from tests.conftest import run_stage


@pytest.fixture
def registry_workspace(pipeline_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    return root


def aliases(root, name="tiny-model"):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return {a: str(client.get_model_version_by_alias(name, a).version) for a in ("candidate", "approved")}


def test_register_approve_tamper_and_failed_gate(registry_workspace, capsys):
    root = registry_workspace
    assert run_stage("register", root) == 0
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering leaves no process-wide tracking state
    first = json.loads((root / "metrics/register.json").read_text())
    assert first["approved"] is True and first["version"] == "1"
    assert aliases(root) == {"candidate": "1", "approved": "1"}

    from mlflow import MlflowClient

    version = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_model_version("tiny-model", "1")
    export = json.loads((root / "metrics/export.json").read_text())
    assert version.tags["onnx_sha256"] == export["onnx_sha256"]
    assert version.tags["verdict"] == "passed"

    # a file changed after the gate is refused and nothing moves
    onnx_path = root / "models" / "model.onnx"
    original = onnx_path.read_bytes()
    onnx_path.write_bytes(original + b"\0")
    assert run_stage("register", root) == 1
    assert "changed since the gate ran: models/model.onnx" in capsys.readouterr().err
    onnx_path.write_bytes(original)

    # a failed gate: the new version is recorded, but no alias points at it; approved stays on version 1
    policy = root / "policies" / "tiny.yaml"
    policy.write_text(policy.read_text().replace("threshold: 0.5", "threshold: 0.999"))
    assert run_stage("report", root) == 0  # the policy is evidence too: dvc repro re-renders the report
    assert run_stage("gate", root) == 1
    assert run_stage("register", root) == 0
    second = json.loads((root / "metrics/register.json").read_text())
    assert second["approved"] is False and second["version"] == "2"
    assert aliases(root) == {"candidate": "1", "approved": "1"}
