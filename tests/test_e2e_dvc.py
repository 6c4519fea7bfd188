"""`dvc repro` on a tiny config in a temporary copy of the repository, as a user runs it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_PARAMS, TINY_POLICY

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    (root / "policies" / "tiny.yaml").write_text(yaml.safe_dump(TINY_POLICY))
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "copy", "--allow-empty"], root)
    if not (root / ".dvc").is_dir():
        sh(["dvc", "init", "-q"], root)
    return root


def approved_version(root: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("tiny-model", "approved").version)


def test_repro_noop_partial_rerun_and_failing_gate(repo_copy):
    root = repo_copy
    first = sh(["dvc", "repro"], root)
    order = ran(first.stdout)
    assert sorted(order) == sorted(["prepare", "train", "attack", "certify", "smooth", "export", "report", "gate",
                                    "register"])
    assert order[:2] == ["prepare", "train"] and order[-3:] == ["report", "gate", "register"]
    assert (root / "reports/build/report.html").is_file()
    register = json.loads((root / "metrics/register.json").read_text())
    assert register["approved"] and approved_version(root) == register["version"]

    assert ran(sh(["dvc", "repro"], root).stdout) == []  # nothing changed, nothing runs

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["attack"]["pgd"]["steps"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = ran(sh(["dvc", "repro"], root).stdout)
    assert rerun[:2] == ["attack", "certify"] and not {"prepare", "train", "smooth"} & set(rerun)
    approved_before = approved_version(root)

    policy = yaml.safe_load((root / "policies/tiny.yaml").read_text())
    policy["requirements"][0]["threshold"] = 0.999
    (root / "policies/tiny.yaml").write_text(yaml.safe_dump(policy))
    failing = sh(["dvc", "repro"], root, check=False)
    assert failing.returncode != 0
    assert "gate" in ran(failing.stdout) and "register" not in ran(failing.stdout)
    assert "FAIL" in failing.stdout and "ACC" in failing.stdout
    assert approved_version(root) == approved_before


def test_method_study_is_a_foreach_pipeline_outside_the_default_repro(repo_copy):
    root = repo_copy
    study = (root / "studies/dvc.yaml").read_text()
    study = study.replace("methods: [standard, pgd_at, trades, mart, fast_at, awp, consistency, ibp, crown_ibp, gaussian]",
                          "methods: [standard, fast_at]").replace("samples: 450", "samples: 40")
    (root / "studies/dvc.yaml").write_text(study)
    first = ran(sh(["dvc", "repro", "studies/dvc.yaml"], root).stdout)
    assert {"studies/dvc.yaml:method@standard", "studies/dvc.yaml:method@fast_at"} <= set(first)
    assert first[-1] == "studies/dvc.yaml:table"
    rows = json.loads((root / "reports/study/comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["standard", "fast_at"] and all(r["clean"]["n"] == 40 for r in rows)
    assert "| fast_at |" in (root / "reports/study/comparison.md").read_text()
    assert ran(sh(["dvc", "repro", "studies/dvc.yaml"], root).stdout) == []
    default = sh(["dvc", "stage", "list", "--name-only"], root).stdout.split()  # what a plain `dvc repro` runs
    assert "register" in default and not any("method" in name or "table" in name for name in default)
