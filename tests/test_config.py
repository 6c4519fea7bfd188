"""Bad params: one line naming key path, value and what is allowed; exit 2; nothing written."""

import pytest
import yaml

from pipeline.config import parse_params
from pipeline.errors import UsageError
from tests.conftest import TINY_PARAMS, make_workspace, run_stage


def with_change(path: str, value):
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    node = params
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return params


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("threat.epsilon", -0.1, "threat.epsilon = -0.1: Input should be greater than or equal to 0"),
        ("train.pgd.steps", 0, "train.pgd.steps = 0"),
        ("train.epochs", "3", "train.epochs = '3': Input should be a valid integer"),
        ("train.method", "magic", "train.method = 'magic': Input should be 'standard', 'pgd_at'"),
        ("data.dataset", "imagenet", "data.dataset = 'imagenet'"),
        ("model.name", "resnet", "model.name = 'resnet': Value error, unknown model"),
        ("train.learning_rate", 0.1, "train.learning_rate = 0.1: unknown key"),
        ("attack.attacks", ["fgsm", "cw"], "attack.attacks.1 = 'cw'"),
        ("export.atol", 0.0, "export.atol = 0.0: Input should be greater than 0"),
        ("export.opset", 99, "export.opset = 99"),
    ],
)
def test_bad_values_name_the_key(path, value, expected):
    with pytest.raises(UsageError) as info:
        parse_params(with_change(path, value))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_scientific_notation_is_a_float(tmp_path):
    from pipeline.config import load_params

    root = make_workspace(tmp_path)
    text = yaml.safe_dump(TINY_PARAMS).replace("opset: 17", "opset: 17\n  atol: 1e-5")
    (root / "params.yaml").write_text(text)
    assert load_params(root / "params.yaml", root).export.atol == 1e-5


@pytest.mark.parametrize(
    "path,value,fragment",
    [
        ("threat.epsilon", 2.0, "beyond the data range"),
        ("threat.epsilon", -1.0, "threat.epsilon = -1.0"),
        ("data.path", "../outside.npz", "must stay inside the workspace"),
        ("gate.policy", "policies/nope.yaml", "gate.policy = 'policies/nope.yaml': no such file"),
        ("data.path", "missing.npz", "no such file or directory"),
    ],
)
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, path, value, fragment):
    params = with_change(path, value)
    if path == "data.path":
        params["data"]["dataset"] = "npz"
    root = make_workspace(tmp_path, params)
    assert run_stage("prepare", root) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err
    assert len(err.splitlines()) == 1
    assert not (root / "metrics").exists() and not (root / "data").exists()


def test_downstream_stage_without_inputs_is_a_clear_error(tmp_path, capsys):
    root = make_workspace(tmp_path)
    assert run_stage("attack", root) == 2
    assert "run `robustgate prepare` first" in capsys.readouterr().err
