"""Training for a condition (issue 16 §4): `train.threat` names a condition of `conditions.threats`
and PGD-AT, TRADES, consistency, worst-of-k and augmentation train over its parameters.

Before this change `BatchContext` had no `condition`, `train.threat` was an unknown key and the
train metrics had no `trained_for`: every test here fails on the old code.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.config import parse_params
from pipeline.conditions.threats import from_config
from pipeline.training.methods import METHODS, BatchContext
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

GLARE = {"kind": "brightness", "range": [-0.1, 0.1], "rationale": "sun glare"}


def _inputs_trained_on(method: str, model, x, y, ctx) -> list[torch.Tensor]:
    """Every input the model saw in training mode while the method computed its loss (a forward pre-hook)."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone())
                                             if module.training else None)
    try:
        model.train()
        METHODS[method](model, x, y, ctx)
    finally:
        handle.remove()
        model.eval()
    return seen


@pytest.mark.parametrize("method", ["pgd_at", "trades", "worst_of_k", "augmentation"])
def test_the_inner_maximisation_stays_in_the_conditions_parameter_set(method, digits_model):
    """Under a brightness condition every trained-on input is clip(x + b) with one b per sample and
    |b| ≤ 0.1: on the pixels clipping leaves alone, x' − x is constant within a sample and inside the
    range. An L∞ PGD point (the old behaviour) varies per pixel and fails this."""
    model, x, y, domain = digits_model
    model = copy.deepcopy(model)
    params = parse_params({"conditions": {"threats": {"glare": GLARE}}})
    glare = from_config("glare", params.conditions.threats["glare"], (1, 8, 8))
    from pipeline.attacks.pgd import PGD
    from pipeline.threat import LpBall

    ctx = BatchContext(LpBall("linf", 0.3), domain, PGD(3, 0.25, 1), torch.Generator().manual_seed(0), 10,
                       condition=glare, worst_of_k=4)
    seen = _inputs_trained_on(method, model, x, y, ctx)
    perturbed = seen[-1]  # TRADES: the clean forward comes first, the perturbed one last
    delta = perturbed - x
    interior = (x > 0.01) & (x < 0.99) & (perturbed > 0.01) & (perturbed < 0.99)
    offsets = []
    for i in range(len(x)):
        values = delta[i][interior[i]]
        if len(values):
            assert float(values.max() - values.min()) < 1e-5, f"sample {i}: not one brightness offset"
            offsets.append(float(values[0]))
    offsets = torch.tensor(offsets)
    assert offsets.abs().max() <= 0.1 + 1e-5
    assert offsets.abs().mean() > 0.01  # it did move (the search has the whole range)


def test_pgd_at_for_a_condition_is_harder_than_augmentation(digits_model):
    """The inner maximisation maximises: PGD-AT's inputs under rotation have at least the loss of one
    random angle (augmentation) on average, inside ±20 degrees."""
    import torch.nn.functional as F

    from pipeline.attacks.pgd import PGD
    from pipeline.threat import LpBall

    model, x, y, domain = digits_model
    params = parse_params({"conditions": {"threats": {"turn": {"kind": "rotation", "range": [-20, 20],
                                                               "rationale": "roll"}}}})
    turn = from_config("turn", params.conditions.threats["turn"], (1, 8, 8))
    losses = {}
    for method in ("augmentation", "pgd_at"):
        ctx = BatchContext(LpBall("linf", 0.0), domain, PGD(3, 0.1, 1), torch.Generator().manual_seed(1), 10,
                           condition=turn, worst_of_k=4)
        inputs = _inputs_trained_on(method, copy.deepcopy(model), x, y, ctx)[-1]
        with torch.no_grad():
            losses[method] = float(F.cross_entropy(model(inputs), y))
    assert losses["pgd_at"] > losses["augmentation"]  # and pgd_at did not fall back to clean training at ε = 0


def _params(train: dict, **changes) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["conditions"]["threats"]["turn"] = {"kind": "rotation", "range": [-15, 15], "rationale": "camera roll"}
    params["train"] = {"epochs": 2, "batch_size": 64, "lr": 0.005, **train}
    params.update(changes)
    return params


def test_a_model_trained_for_a_condition_says_so_in_metrics_and_report(tmp_path):
    """metrics/train.json records the threat trained for, and the report's sentences are derived from it:
    the training paragraph and that condition's section, not another condition's."""
    root = make_workspace(tmp_path / "ws", _params({"method": "worst_of_k", "threat": "turn", "worst_of_k": 3}))
    assert run_stage("prepare", root) == 0 and run_stage("train", root) == 0
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["trained_for"] == {"name": "turn", "kind": "rotation",
                                    "description": "rotation: angle in [-15, 15] degrees"}
    assert train["val_robust_attack"]["name"] == "condition_search"
    from pipeline import claims

    assert "condition 'turn'" in claims.training_selection(train)
    assert claims.condition_training_note("turn", train) and not claims.condition_training_note("glare", train)
    lp = {**train, "trained_for": {"name": "lp", "kind": "lp_ball", "description": "L∞ ball of radius ε = 0.05"}}
    assert "Lp ball" in claims.trained_against(lp) and "condition" not in claims.trained_against(lp)
    assert claims.trained_against({k: v for k, v in train.items() if k != "trained_for"}) == ""
    plain = make_workspace(tmp_path / "plain", _params({"method": "standard"}))
    assert run_stage("prepare", plain) == 0 and run_stage("train", plain) == 0
    standard = json.loads((plain / "metrics/train.json").read_text())
    assert standard["trained_for"] is None and claims.trained_against(standard) == ""  # it resists no threat


@pytest.mark.parametrize("train,changes,message", [
    ({"method": "pgd_at", "threat": "fog"}, {}, "train.threat = 'fog': not a condition of conditions.threats"),
    ({"method": "mart", "threat": "turn"}, {}, "train.threat: not a setting of train.method 'mart'"),
    ({"method": "worst_of_k"}, {}, "train.threat: required by train.method 'worst_of_k'"),
    ({"method": "pgd_at", "threat": "turn", "epsilon": 0.1}, {}, "train.epsilon: an Lp-ball setting"),
    ({"method": "augmentation", "threat": "turn"},
     {"data": {"dataset": "breast_cancer"}, "model": {"name": "mlp", "hidden": [8]}},
     "conditions.threats.turn: a rotation condition needs image data"),
])
def test_a_bad_training_threat_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, train, changes, message):
    params = _params(train, **changes)
    if "data" in changes:  # the tabular task: the condition is valid params, it does not apply to the data
        params["conditions"]["threats"] = {"turn": params["conditions"]["threats"]["turn"]}
    root = make_workspace(tmp_path / "ws", params)
    if "data" in changes:
        assert run_stage("prepare", root) == 0
    capsys.readouterr()
    assert run_stage("train", root) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (root / "models" / "model.pt").exists() and not (root / "metrics" / "train.json").exists()


def test_train_depends_on_the_named_condition_only():
    """`train` depends on artifacts/train_threat.json, not on conditions.*: the file must change with
    what training uses (the named condition's range, the search) and with nothing else (another
    condition, a rationale, the smoothing settings), so DVC re-trains exactly when it must.
    Before: train listed conditions.threats, and any condition edit re-ran training."""
    from pipeline.stages.train_threat import training_threat

    base = copy.deepcopy(TINY_PARAMS)
    base["conditions"]["threats"]["glare"] = dict(GLARE)
    base["train"] = {**{k: v for k, v in base["train"].items() if k not in ("pgd", "val_pgd")}, "method": "worst_of_k",
                     "threat": "glare", "worst_of_k": 4}

    def record(edit=lambda p: None):
        params = copy.deepcopy(base)
        edit(params)
        return training_threat(parse_params(params))

    first = record()
    assert first["threat"] == "glare" and first["condition"]["range"] == [-0.1, 0.1] and "search" in first
    assert "rationale" not in first["condition"]
    assert record(lambda p: p["conditions"]["threats"]["jitter"].update(pixels=2)) == first
    assert record(lambda p: p["conditions"]["threats"]["glare"].update(rationale="low sun")) == first
    assert record(lambda p: p["conditions"]["threats"]["glare"].update(range=[-0.2, 0.2])) != first
    assert record(lambda p: p["conditions"]["search"].update(steps=7)) != first
    lp = copy.deepcopy(TINY_PARAMS)
    assert training_threat(parse_params(lp)) == {"threat": "lp"}
