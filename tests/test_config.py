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


@pytest.mark.parametrize(
    "path,value,expected",
    [
        ("train.awp_gamma", 0.01, "train.awp_gamma: not a setting of train.method 'pgd_at' (a setting of awp;"),
        ("train.noise_sigma", 0.5, "train.noise_sigma: not a setting of train.method 'pgd_at' (a setting of gaussian;"),
        ("train.kappa_end", 0.5, "train.kappa_end: not a setting of train.method 'pgd_at' (a setting of ibp, crown_ibp;"),
        ("train.momentum", 0.5, "train.momentum: only used by train.optimizer 'sgd', not 'adam'"),
        ("train.finetune", "head", "train.finetune: only used with train.init_checkpoint"),
        ("train.pgd.restarts", 2, "train.pgd.restarts = 2: Value error, training runs one PGD restart per batch"),
        ("model.channels", [4, 8], "model.channels: not an option of model 'mlp' (its options: hidden)"),
        ("model.options", {"width": 3}, "model.options: not an option of model 'mlp' (its options: hidden)"),
    ],
)
def test_a_key_without_effect_exits_2_naming_it(tmp_path, capsys, path, value, expected):
    """A setting of another training method, an option of another model, or a value training
    would ignore: `robustgate train` refuses it in one line, exit 2, before writing anything
    (before, every one of these was accepted and silently ignored)."""
    root = make_workspace(tmp_path, with_change(path, value))
    assert run_stage("train", root) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1
    assert not (root / "models").exists() and not (root / "metrics").exists()


@pytest.mark.parametrize(
    "method,train,expected",
    [
        ("standard", {"epsilon": 0.1}, "train.epsilon: not a setting of train.method 'standard'"),
        ("standard", {"pgd": {"steps": 3}}, "train.pgd: not a setting of train.method 'standard'"),
        ("gaussian", {"epsilon_warmup_epochs": 2}, "train.epsilon_warmup_epochs: not a setting of train.method"),
        ("ibp", {"beta_end": 0.5}, "train.beta_end: not a setting of train.method 'ibp' (a setting of crown_ibp;"),
        ("fast_at", {"pgd": {"steps": 3}}, "train.pgd: not a setting of train.method 'fast_at'"),
        ("awp", {"beta": 3.0}, "train.beta: only used by train.awp_base 'trades', not 'pgd_at'"),
        ("trades", {"awp_base": "trades"}, "train.awp_base: not a setting of train.method 'trades' (a setting of awp;"),
    ],
)
def test_each_training_method_owns_its_settings(method, train, expected):
    with pytest.raises(UsageError) as info:
        parse_params({"train": {"method": method, **train}})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_own_settings_are_accepted_and_shared_ones_everywhere():
    from pipeline.config import TRAIN_SETTINGS

    assert parse_params({"train": {"method": "awp", "awp_base": "trades", "beta": 3.0}}).train.beta == 3.0
    assert parse_params({"train": {"method": "crown_ibp", "beta_end": 0.5}}).train.beta_end == 0.5
    assert parse_params({"train": {"optimizer": "sgd", "momentum": 0.5}}).train.momentum == 0.5
    for method in TRAIN_SETTINGS:
        for_condition = {"threat": "c"} if method in ("worst_of_k", "augmentation") else {}
        condition = {"conditions": {"threats": {"c": {"kind": "rotation", "range": [-5, 5], "rationale": "r"}}}}
        train = parse_params({"train": {"method": method, "epochs": 3, "lr_schedule": "cosine", **for_condition},
                              **condition}).train
        assert (train.method, train.epochs) == (method, 3)
    assert parse_params({}).train.method == "pgd_at"  # the default method, when none is named


def test_with_method_switches_the_method_and_keeps_what_still_applies():
    """`robustgate compare` and the study vary only the method: shared settings stay, settings the
    new method has too stay, the others go (they would have no effect), its own take defaults."""
    from pipeline.config import TRAIN_SETTINGS, with_method
    from pipeline.stages.train import fit_config

    params = parse_params({**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "method": "trades", "beta": 2.0}})
    mart = with_method(params, "mart")
    assert (mart.train.method, mart.train.beta, mart.train.epochs) == ("mart", 2.0, 4)
    assert mart.train.pgd.steps == 3
    standard = with_method(params, "standard")
    assert not hasattr(standard.train, "pgd") and standard.train.lr == 0.005
    awp = with_method(params, "awp")  # beta only counts for awp over trades, so it is dropped
    assert awp.train.beta == TRAIN_SETTINGS["awp"]().beta and awp.train.awp_gamma == 0.005
    assert with_method(awp, "trades").train.pgd.steps == 3
    assert with_method(params, "trades") == params
    for method in set(TRAIN_SETTINGS) - {"worst_of_k", "augmentation"}:  # those need train.threat
        cfg = fit_config(with_method(params, method))
        assert cfg.method == method
        assert (cfg.train_pgd is None) == (method in ("standard", "fast_at", "ibp", "crown_ibp", "gaussian"))
    with pytest.raises(UsageError, match="freeat"):
        with_method(params, "freeat")


def test_shipped_params_are_valid():
    """params.yaml and the bench goal configurations (over params.yaml, as bench/goals.py merges them)."""
    import importlib.util

    from pipeline.config import read_yaml
    from tests.conftest import REPO

    shipped = read_yaml(REPO / "params.yaml")
    parse_params(shipped)
    spec = importlib.util.spec_from_file_location("goals", REPO / "bench" / "goals.py")
    goals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(goals)
    entries = read_yaml(REPO / "bench" / "goals.yaml")
    for name, entry in entries["goals"].items():
        chosen = parse_params(goals.goal_params(shipped, entries["common"], entry["params"]))
        assert chosen.train.method == entry["params"]["train"]["method"], name


def test_num_classes_is_never_a_default():
    """A default of 10 classes trains a 3-class model against a 10-class specification without a
    word: every function and dataclass of the package that takes `num_classes` must be told it."""
    import importlib
    import inspect
    import pkgutil

    import pipeline

    defaulted = []
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != info.name or not callable(obj):
                continue
            targets = [obj] + [m for m in vars(obj).values() if inspect.isfunction(m)] if inspect.isclass(obj) else [obj]
            for target in targets:
                try:
                    parameter = inspect.signature(target).parameters.get("num_classes")
                except (TypeError, ValueError):
                    continue
                if parameter is not None and parameter.default is not inspect.Parameter.empty:
                    defaulted.append(f"{info.name}.{getattr(target, '__qualname__', name)}")
    assert not defaulted, defaulted
