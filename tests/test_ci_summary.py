"""The CI job summary (`python -m pipeline.ci_summary`) and `robustgate audit`'s refusals of bad input.
Neither module existed before this change."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pipeline.cli import main as cli
from pipeline.ci_summary import main as ci_summary
from tests.conftest import run_stage

DEAD = "http://127.0.0.1:9"


@pytest.fixture()
def ws(pipeline_workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    return root


def test_summary_shows_the_gate_and_the_change_since_the_approved_model(ws, tmp_path, monkeypatch, capsys):
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ci_summary(["--workspace", str(ws)]) == 0
    first = target.read_text()
    assert "**Gate PASSED** under policy `policies/tiny.yaml`" in first
    assert re.search(r"\| ACC \| Clean accuracy \| ([0-9.]+) \| \1 \(point\) \| >= 0.5 \| blocking \| PASS \|", first)
    assert "no version of `tiny-model` holds `approved` yet" in first
    assert run_stage("register", ws) == 0
    target.unlink()
    assert ci_summary(["--workspace", str(ws)]) == 0
    text = target.read_text()
    assert "Change since the approved model (`tiny-model` version 1" in text
    assert re.search(r"\| attack.clean_accuracy \| ([0-9.]+) \| \1 \| \+0 \|", text)  # same model: no change
    assert "| export.max_abs_diff |" in text
    assert text in capsys.readouterr().out  # the job log shows it too


def test_summary_says_when_the_registry_cannot_be_asked(ws, monkeypatch, capsys):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    assert ci_summary(["--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "the registry could not be asked" in out and "no version" not in out


def test_summary_without_a_verdict_is_exit_2(tmp_path, capsys):
    assert ci_summary(["--workspace", str(tmp_path)]) == 2
    assert "the gate did not run" in capsys.readouterr().err


def test_audit_refuses_a_bad_repository_or_revision(tmp_path, capsys):
    assert cli(["audit", "HEAD", "--repo", str(tmp_path / "nowhere")]) == 2
    assert "robustgate audit: error: cannot clone" in capsys.readouterr().err
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=a@b.c", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "README").write_text("no pipeline here\n")
    subprocess.run(["git", "add", "README"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    assert cli(["audit", "no-such-rev", "--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "'no-such-rev' is not a commit of" in err and len(err.strip().splitlines()) == 1
    assert cli(["audit", "HEAD", "--repo", str(repo)]) == 1  # a commit that holds no evidence
    out, err = capsys.readouterr()
    assert "audit: MISMATCH dvc.lock: absent at this commit" in out and "no manifest.json" in out
    assert "robustgate audit: INTEGRITY MISMATCH:" in err
