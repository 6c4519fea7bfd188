"""The team's release path end to end, on a clean clone with tiny params: `ci/gate.sh` (what the CI
templates under ci/ run) gates a feature branch without pushing, releases on the release branch
(register + `dvc push` to a local-directory DVC remote), and blocks a failing gate; then
`robustgate audit` clones the released commit, pulls it from the remote and verifies it without
re-running a stage, and names the file the remote lost.

Before this change ci/gate.sh, pipeline.ci_summary and `robustgate audit` did not exist, and the
report's manifest.json was not a cached DVC output (so no clone could have it): every step fails."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS
from tests.test_e2e_dvc import BIN, DVC_INPUTS, copy_repository, sh

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]


def gate_sh(root: Path, branch: str, summary: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CI_BRANCH": branch,
           "GITHUB_STEP_SUMMARY": str(summary), "ROBUSTGATE_BIN": str(BIN),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("MLFLOW_TRACKING_URI", "DVC_REMOTE_URL", "GITHUB_REF_NAME", "CI_COMMIT_REF_NAME"):
        env.pop(name, None)
    return subprocess.run(["bash", "ci/gate.sh"], cwd=root, env=env, capture_output=True, text=True)


def audit(rev: str, repo: Path, remote: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipeline", "audit", rev, "--repo", str(repo), "--remote",
                           str(remote), *extra], capture_output=True, text=True, env=env, cwd=repo.parent)


def remote_object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def test_ci_gate_release_push_and_audit(tmp_path):
    origin = copy_repository(tmp_path / "origin", {**TINY_PARAMS, **DVC_INPUTS})
    remote = tmp_path / "dvc-remote"
    sh(["dvc", "remote", "add", "-d", "store", str(remote)], origin)  # the team's remote, in .dvc/config
    sh(["git", "add", "-A"], origin)
    sh([*GIT, "commit", "-qm", "tiny pipeline"], origin)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)  # what a CI runner starts from

    # a feature branch: gated, summarised, nothing registered or pushed
    sh(["git", "checkout", "-qb", "feature"], clone)
    summary = tmp_path / "summary.md"
    feature = gate_sh(clone, "feature", summary)
    assert feature.returncode == 0, feature.stdout + feature.stderr
    assert "not the release branch, so nothing registered or pushed" in feature.stdout
    text = summary.read_text()
    assert "**Gate PASSED** under policy `policies/tiny.yaml`" in text and "| ACC | Clean accuracy |" in text
    assert "no version of `tiny-model` holds `approved` yet" in text
    assert not remote.exists() and not (clone / "metrics" / "register.json").exists()

    # the team commits the run; the release branch registers it and pushes the evidence
    sh([*GIT, "commit", "-qam", "run"], clone)
    sh(["git", "add", "-A", "dvc.lock", "metrics", "plots"], clone)
    sh([*GIT, "commit", "-qm", "evidence", "--allow-empty"], clone)
    released = sh(["git", "rev-parse", "HEAD"], clone).stdout.strip()
    sh(["git", "checkout", "-qb", "release"], clone)
    release = gate_sh(clone, "release", tmp_path / "release.md")
    assert release.returncode == 0, release.stdout + release.stderr
    assert "released and pushed the evidence" in release.stdout
    assert json.loads((clone / "metrics/register.json").read_text())["approved"] is True
    assert remote.is_dir() and any(remote.rglob("*"))

    # the assessor: clone + pull + verify, with the registry's bytes checked too
    registry = f"sqlite:///{clone / 'mlflow.db'}"
    ok = audit(released, clone, remote, "--registry", registry)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict      PASSED" in ok.stdout and "audit: OK" in ok.stdout
    onnx_sha = __import__("pipeline.io", fromlist=["sha256_file"]).sha256_file(clone / "models/model.onnx")
    assert f"models/model.onnx            {onnx_sha}" in ok.stdout
    assert "serve this model.onnx byte for byte" in ok.stdout

    # a remote that lost the ONNX file: the audit names it and fails
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    onnx_md5 = next(o["md5"] for o in lock["stages"]["export"]["outs"] if o["path"] == "models/model.onnx")
    remote_object(remote, onnx_md5).unlink()
    lost = audit(released, clone, remote)
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert "audit: MISMATCH models/model.onnx: named by dvc.lock but not pulled" in lost.stdout
    assert "robustgate audit: INTEGRITY MISMATCH:" in lost.stderr

    # a failing gate on a branch: the job fails, the summary shows the failure and the change since
    # the approved model; approved stays, nothing is pushed
    sh(["git", "checkout", "-qb", "worse", released], clone)
    policy = clone / "policies" / "tiny.yaml"
    policy.write_text(policy.read_text().replace("threshold: 0.5", "threshold: 0.999"))
    before = sorted(p.name for p in remote.rglob("*"))
    failing = gate_sh(clone, "worse", tmp_path / "failing.md")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "ci-gate: FAILED" in failing.stdout
    text = (tmp_path / "failing.md").read_text()
    assert "**Gate FAILED**" in text and "| ACC | Clean accuracy |" in text and "**FAIL**" in text
    assert "Change since the approved model (`tiny-model` version 1" in text
    assert "| attack.clean_accuracy |" in text
    assert sorted(p.name for p in remote.rglob("*")) == before
