"""Every piece of evidence is bound to one checkpoint, and the threat cannot be weakened unnoticed.

Both were holes found by a hostile user: a retrained, never-attacked `model.pt` passed the gate
when stages were run by hand, and `threat.epsilon: 0` passed the default policy (robust and
verified 99.3%) and moved `approved`.
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import run_stage


@pytest.fixture
def ws(pipeline_workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    return root


def edit_params(root, change) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_a_retrained_never_attacked_checkpoint_fails_the_gate(ws, capsys):
    edit_params(ws, lambda p: p["train"].update({"epochs": 2}))
    assert run_stage("train", ws) == 0  # a new model.pt; attack, certify, smooth and export not re-run
    assert run_stage("gate", ws) == 1
    gate = json.loads((ws / "metrics/gate.json").read_text())
    assert gate["passed"] is False and "INT-MODEL" in gate["blocking_failures"]
    assert gate["trace"]["model_hash_consistent"] == 0.0
    assert "INT-MODEL" in capsys.readouterr().err
    # the later stages refuse to build on evidence about another checkpoint, too
    assert run_stage("certify", ws) == 1
    err = capsys.readouterr().err
    assert "INTEGRITY MISMATCH" in err and "re-run attack" in err


def test_export_refuses_adversarial_examples_made_against_another_checkpoint(ws, capsys):
    edit_params(ws, lambda p: p["train"].update({"epochs": 2}))
    assert run_stage("train", ws) == 0
    before = (ws / "models/model.onnx").read_bytes()
    assert run_stage("export", ws) == 1
    err = capsys.readouterr().err
    assert "INTEGRITY MISMATCH" in err and "re-run attack" in err
    assert (ws / "models/model.onnx").read_bytes() == before  # nothing replaced


def test_clean_only_evaluation_is_refused_unless_the_policy_accepts_it(ws, capsys):
    edit_params(ws, lambda p: p["threat"].update({"epsilon": 0.0}))
    before = (ws / "metrics/attack.json").read_text()
    assert run_stage("attack", ws) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clean-only" in err[0] and "allow_clean_only" in err[0]
    assert (ws / "metrics/attack.json").read_text() == before
    policy = ws / "policies" / "tiny.yaml"
    policy.write_text(policy.read_text() + "allow_clean_only: true\n")
    assert run_stage("attack", ws) == 0


def test_evidence_under_a_weaker_threat_than_the_policy_pins_fails_the_gate(ws, capsys):
    policy = ws / "policies" / "tiny.yaml"
    pinned = yaml.safe_load(policy.read_text())
    pinned["threat"] = {"norm": "linf", "min_epsilon": 0.05}
    policy.write_text(yaml.safe_dump(pinned))
    assert run_stage("gate", ws) == 0  # the tiny run is at ε = 0.05
    edit_params(ws, lambda p: p["threat"].update({"epsilon": 0.02}))
    for stage in ("attack", "certify", "smooth", "export"):
        assert run_stage(stage, ws) == 0, stage
    assert run_stage("gate", ws) == 1
    gate = json.loads((ws / "metrics/gate.json").read_text())
    assert gate["blocking_failures"] == ["THREAT-EPS"]
