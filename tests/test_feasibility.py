"""Params that cannot run on the task are refused before the first stage does work; task-dependent
defaults adapt. Before this change a binary task with the default attack list trained, then
stopped at the attack stage with "apgd_t needs at least 4 classes"."""
import json

import pytest

from pipeline.config import parse_params
from pipeline.errors import UsageError
from pipeline.feasibility import resolve_attacks
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

BINARY = {**TINY_PARAMS, "data": {"dataset": "breast_cancer"}, "model": {"name": "mlp", "hidden": [16]},
          "threat": {"norm": "linf", "epsilon": 0.05},
          "train": {**TINY_PARAMS["train"], "epochs": 2},
          "attack": {k: v for k, v in TINY_PARAMS["attack"].items() if k != "attacks"}}


def test_default_attacks_adapt_to_the_class_count_and_say_how():
    cfg = parse_params({}).attack
    names, notes = resolve_attacks(cfg, 2)
    assert names == ["fgsm", "pgd", "apgd_ce", "square"]
    assert len(notes) == 1 and "apgd_t" in notes[0] and "4 classes" in notes[0]
    assert resolve_attacks(cfg, 10) == (["fgsm", "pgd", "apgd_ce", "apgd_t", "square"], [])


def test_explicit_attack_or_target_count_the_task_cannot_run_is_refused():
    explicit = parse_params({"attack": {"attacks": ["pgd", "apgd_t"]}}).attack
    with pytest.raises(UsageError, match="apgd_t needs at least 4 classes; the data has 2"):
        resolve_attacks(explicit, 2)
    targets = parse_params({"attack": {"attacks": ["apgd_t"], "apgd": {"targets": 5}}}).attack
    with pytest.raises(UsageError, match="at most 3 wrong classes"):
        resolve_attacks(targets, 4)


def test_binary_task_with_default_attacks_runs_prepare_train_attack(tmp_path):
    root = make_workspace(tmp_path / "ws", BINARY)
    for stage in ("prepare", "train", "attack"):
        assert run_stage(stage, root) == 0, stage
    attack = json.loads((root / "metrics/attack.json").read_text())
    assert sorted(attack["attacks"]) == ["apgd_ce", "fgsm", "pgd", "square"]


def test_binary_task_with_explicit_apgd_t_is_refused_at_prepare_with_nothing_written(tmp_path, capsys):
    params = {**BINARY, "attack": {**BINARY["attack"], "attacks": ["fgsm", "apgd_t"]}}
    root = make_workspace(tmp_path / "ws", params)
    assert run_stage("prepare", root) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apgd_t needs at least 4 classes" in err
    assert not (root / "data").exists() and not (root / "metrics").exists()


def test_model_that_cannot_take_the_data_is_refused_at_prepare(tmp_path, capsys):
    """cnn_small on 30 tabular features used to fail in train, after prepare had written."""
    root = make_workspace(tmp_path / "ws", {**BINARY, "model": {"name": "cnn_small"}})
    assert run_stage("prepare", root) == 2
    assert "needs image inputs" in capsys.readouterr().err
    assert not (root / "data").exists()


def test_inputs_section_is_checked_against_the_params(tmp_path):
    """inputs.* must name the files data.path and model.name use (else DVC misses their changes),
    and may not contain prepare's own output folder (DVC would refuse the overlap)."""
    from pipeline.config import load_params

    root = make_workspace(tmp_path / "ws", {**TINY_PARAMS, "data": {"dataset": "npz", "path": "data/d.npz"}})
    (root / "data").mkdir()
    (root / "data/d.npz").write_bytes(b"")
    (root / "my_models.py").write_text("")
    import yaml

    def params_with(inputs, model="mlp"):
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["inputs"], raw["model"] = inputs, {"name": model}
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        return load_params(root / "params.yaml", root)

    assert params_with({"data": "data/d.npz", "model": "pipeline/models.py"}).inputs.data == "data/d.npz"
    assert params_with({"data": "data/d.npz", "model": "my_models.py"}, "my_models:build")
    with pytest.raises(UsageError, match="inputs.data = 'pipeline/data/datasets.py' must be 'data/d.npz'"):
        params_with({"data": "pipeline/data/datasets.py", "model": "pipeline/models.py"})
    with pytest.raises(UsageError, match="inputs.model = 'pipeline/models.py' must be 'my_models.py'"):
        params_with({"data": "data/d.npz", "model": "pipeline/models.py"}, "my_models:build")
    with pytest.raises(UsageError, match="contains 'data/prepared'"):
        params_with({"data": "data", "model": "pipeline/models.py"})
