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
# The inputs section names the files DVC tracks for data.path and model.name (built-ins here).
DVC_INPUTS = {"inputs": {"data": "pipeline/data/datasets.py", "model": "pipeline/models.py",
                         "properties": "pipeline/stages/properties.py"}}


def sh(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def copy_repository(root: Path, params: dict, prepare=lambda root: None) -> Path:
    """The tracked files of the repository in `root` with `params`, a git repo with DVC; without the
    committed figures of the default run (metrics/, plots/), which speak of other params."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if name.startswith(("metrics/", "plots/")):
            continue
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "policies" / "tiny.yaml").write_text(yaml.safe_dump(TINY_POLICY))
    prepare(root)
    sh(["git", "init", "-q"], root)
    sh(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", "copy", "--allow-empty"], root)
    if not (root / ".dvc").is_dir():
        sh(["dvc", "init", "-q"], root)
    return root


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    return copy_repository(tmp_path_factory.mktemp("repo"), {**TINY_PARAMS, **DVC_INPUTS})


def approved_version(root: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("tiny-model", "approved").version)


def test_repro_noop_partial_rerun_and_failing_gate(repo_copy):
    root = repo_copy
    first = sh(["dvc", "repro"], root)
    order = ran(first.stdout)
    assert sorted(order) == sorted(["prepare", "train_threat", "train", "attack", "certify", "smooth", "clinical",
                                    "conditions", "export", "properties", "report", "gate", "register"])
    assert order.index("train") > max(order.index("prepare"), order.index("train_threat"))
    assert order[-3:] == ["report", "gate", "register"]
    assert (root / "reports/build/report.html").is_file()
    register = json.loads((root / "metrics/register.json").read_text())
    assert register["approved"] and approved_version(root) == register["version"]

    assert ran(sh(["dvc", "repro"], root).stdout) == []  # nothing changed, nothing runs

    # one triggering condition edited: train_threat re-runs (train.threat may name a condition) and
    # writes the same file (the model is trained for the Lp ball), so train and every evaluation of
    # the model are skipped; the conditions stage re-evaluates that one condition only (the others
    # are carried over from the persisted metrics), then the report, gate and registration
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["conditions"]["threats"]["glare"]["range"] = [-0.08, 0.08]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    edited = sh(["dvc", "repro"], root)
    assert ran(edited.stdout) == ["train_threat", "conditions", "report", "gate", "register"]
    assert "jitter: unchanged since the last run, carried over" in edited.stdout
    assert "glare: unchanged" not in edited.stdout
    assert json.loads((root / "metrics/conditions.json").read_text())["glare"]["axes"]["brightness"] == [-0.08, 0.08]

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


def git_commit_all(root: Path, message: str) -> None:
    sh(["git", "add", "-A"], root)
    sh(["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-qm", message], root)


def changed_stages(root: Path, *targets: str) -> set[str]:
    return set(json.loads(sh(["dvc", "status", "--json", *targets], root).stdout or "{}"))


def test_report_prose_reruns_report_and_register_only(repo_copy):
    """Before: params were listed by section (`threat`), so editing threat.rationale re-ran
    prepare, train, attack, certify and smooth."""
    root = repo_copy
    (root / "policies/tiny.yaml").write_text(yaml.safe_dump(TINY_POLICY))
    sh(["dvc", "repro"], root)
    assert changed_stages(root) == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["threat"]["rationale"] = "sensor noise measured on the bench"
    params.setdefault("report", {})["intended_purpose"] = "a test"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert changed_stages(root) == {"report", "register"}
    assert set(ran(sh(["dvc", "repro"], root).stdout)) <= {"report", "gate", "register"}


def test_the_runtime_keys_that_shape_figures_rerun_the_stages_they_shape(repo_copy):
    """Before: no stage listed `runtime`, so `threads: 1` (another model bit for bit) left the 2-thread
    model and its evidence "up to date". Shards do not change an evaluation's figures: `processes` re-runs
    training (data-parallel) only."""
    root = repo_copy
    sh(["dvc", "repro"], root)
    original = (root / "params.yaml").read_text()
    evaluations = {"attack", "certify", "smooth", "conditions"}
    params = yaml.safe_load(original)
    params["runtime"]["threads"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert {"train", *evaluations} <= changed_stages(root)
    params = yaml.safe_load(original)
    params["runtime"]["processes"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    changed = changed_stages(root)
    assert "train" in changed and not changed & evaluations
    (root / "params.yaml").write_text(original)
    assert changed_stages(root) == set()


def test_metrics_are_committed_and_diffed_across_commits(repo_copy):
    """Before: metrics/ was git-ignored, so `dvc metrics diff` had nothing to compare."""
    root = repo_copy
    assert sh(["git", "check-ignore", "-q", "metrics/attack.json"], root, check=False).returncode == 1
    git_commit_all(root, "evidence at 12 PGD steps")
    before = json.loads((root / "metrics/attack.json").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["attack"]["pgd"]["steps"] = 2
    params["attack"]["pgd"]["step_size"] = 0.002
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["dvc", "repro", "attack"], root)
    after = json.loads((root / "metrics/attack.json").read_text())
    diff = json.loads(sh(["dvc", "metrics", "diff", "HEAD", "--json"], root).stdout)
    assert "metrics/attack.json" in diff
    changed = diff["metrics/attack.json"]
    assert changed and all(entry["old"] != entry["new"] for entry in changed.values())
    flat_before, flat_after = _flatten(before), _flatten(after)
    for key, entry in changed.items():
        assert flat_before.get(key) == entry["old"] and flat_after.get(key) == entry["new"], key


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


MY_MODEL = (
    "from torch import nn\n\n\n"
    "def build(input_shape, num_classes, width=16):\n"
    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))\n"
)


def test_user_data_and_model_module_are_deps_and_in_the_manifest(tmp_path_factory):
    """Before: dvc.yaml did not list data.path or the user's model module, and the manifest did not
    hash them: after a byte of either changed, `dvc status` was clean and `robustgate verify` OK."""
    import numpy as np
    from sklearn.datasets import load_digits

    def user_files(root):
        digits = load_digits()
        (root / "data/raw").mkdir(parents=True)
        np.savez(root / "data/raw/digits.npz", x=(digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8),
                 y=digits.target.astype(np.int64))
        (root / "my_models.py").write_text(MY_MODEL)

    params = {**TINY_PARAMS, "data": {"dataset": "npz", "path": "data/raw/digits.npz", "max_samples": 400},
              "model": {"name": "my_models:build", "options": {"width": 16}},
              "train": {**{k: v for k, v in TINY_PARAMS["train"].items() if k != "pgd"}, "method": "standard",
                        "epochs": 15, "lr": 0.01},
              "inputs": {"data": "data/raw/digits.npz", "model": "my_models.py",
                         "properties": "pipeline/stages/properties.py"}}
    root = copy_repository(tmp_path_factory.mktemp("userfiles"), params, user_files)
    sh(["dvc", "repro"], root)
    manifest = json.loads((root / "reports/build/manifest.json").read_text())["artifacts"]
    assert {"data/raw/digits.npz", "my_models.py", "policies/tiny.yaml"} <= set(manifest)
    assert changed_stages(root, "dvc.yaml") == set()
    sh(["robustgate", "verify"], root)

    module = root / "my_models.py"
    module.write_text(module.read_text().replace("nn.ReLU()", "nn.LeakyReLU()"))
    assert changed_stages(root, "dvc.yaml") >= {"train", "attack", "certify", "smooth", "export", "report", "gate"}
    assert "prepare" not in changed_stages(root, "dvc.yaml")
    assert sh(["robustgate", "verify"], root, check=False).returncode == 1
    module.write_text(MY_MODEL)
    assert changed_stages(root, "dvc.yaml") == set()

    data = root / "data/raw/digits.npz"
    raw = bytearray(data.read_bytes())
    raw[-200] ^= 1  # one byte of the arrays
    data.write_bytes(bytes(raw))
    assert {"prepare", "report", "gate"} <= changed_stages(root, "dvc.yaml")
    failed = sh(["robustgate", "verify"], root, check=False)
    assert failed.returncode == 1 and "data/raw/digits.npz" in failed.stdout


def test_inputs_section_must_name_the_files_the_params_use(tmp_path, capsys):
    """A stale inputs section would hide a changed model module from DVC: refused with one line."""
    from tests.conftest import make_workspace, run_stage

    params = {**TINY_PARAMS, "model": {"name": "my_models:build"},
              "inputs": {"data": "pipeline/data/datasets.py", "model": "pipeline/models.py",
                         "properties": "pipeline/stages/properties.py"}}
    root = make_workspace(tmp_path / "ws", params)
    (root / "my_models.py").write_text(MY_MODEL)
    assert run_stage("prepare", root) == 2
    assert "inputs.model = 'pipeline/models.py' must be 'my_models.py'" in capsys.readouterr().err
    assert not (root / "data").exists()


def test_instances_and_the_files_they_list_are_dvc_deps(repo_copy, capsys):
    """Before: properties.instances and the ONNX/VNNLIB files it lists were no DVC deps, so after
    one of them changed `dvc status` was clean and the stage's answers were stale."""
    import numpy as np

    from pipeline import vnnlib
    from tests.conftest import run_stage

    root = repo_copy
    sh(["dvc", "repro"], root)
    props = root / "props"
    props.mkdir()
    shutil.copy2(root / "models" / "model.onnx", props / "net.onnx")
    x0 = np.full((1, 8, 8), 0.5)
    (props / "tiny.vnnlib").write_text(vnnlib.robustness_property(x0, 1e-4, 0.0, 1.0, 0, 10))
    (props / "instances.csv").write_text("net.onnx,tiny.vnnlib,30\n")
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["properties"] = {"instances": "props/instances.csv", "max_claims": 2}
    params["inputs"]["properties"] = "pipeline/stages/properties.py"  # not the folder: refused
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("properties", root) == 2
    assert "inputs.properties = 'pipeline/stages/properties.py' must be the folder holding" in capsys.readouterr().err
    params["inputs"]["properties"] = "props"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert "properties" in changed_stages(root, "dvc.yaml")
    sh(["dvc", "repro", "properties"], root)
    assert "properties" not in changed_stages(root, "dvc.yaml")
    (props / "tiny.vnnlib").write_text(vnnlib.robustness_property(x0, 2e-4, 0.0, 1.0, 0, 10))
    assert "properties" in changed_stages(root, "dvc.yaml")  # a listed file changed: the answers are stale
    (root / "params.yaml").write_text(original)
    shutil.rmtree(props)
