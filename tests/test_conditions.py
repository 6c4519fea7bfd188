"""Triggering conditions: the transforms, the worst-case search, the certificates and their
cross-checks, the params that are refused, and the stage's per-condition reuse.

None of this existed before issue 16 (no `pipeline.conditions`, no `conditions` stage, no
`conditions.<name>.<metric>` policy path), so every test here fails on the old code; the rules
each test adds are stated in its docstring.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from pipeline.config import parse_params
from pipeline.conditions.certify import branch_and_bound, cross_check
from pipeline.conditions.search import margin_and_prediction, search
from pipeline.conditions.threats import KINDS, from_config
from pipeline.errors import SoundnessViolation
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

SHAPE = (1, 8, 8)


def condition(spec: dict, name: str = "c"):
    params = parse_params({"conditions": {"threats": {name: {"rationale": "test", **spec}}}})
    return from_config(name, params.conditions.threats[name], SHAPE), params.conditions


@pytest.mark.parametrize("spec", [
    {"kind": "brightness", "range": [-0.2, 0.2]}, {"kind": "contrast", "range": [0.7, 1.3]},
    {"kind": "brightness_contrast", "brightness": [-0.2, 0.2], "contrast": [0.7, 1.3]},
    {"kind": "fog", "range": [0.0, 0.3]}, {"kind": "blur", "range": [0.0, 1.0]},
    {"kind": "rotation", "range": [-10, 10]}, {"kind": "scaling", "range": [0.9, 1.1]},
    {"kind": "translation", "pixels": 2}, {"kind": "noise", "sigma": 0.1}])
def test_identity_parameters_leave_the_input_unchanged(spec, digits_model):
    """Every kind is a transform of its parameters whose identity is the clean input (else the
    'clean' point of the heat map and the robust figure speak of another input)."""
    _, x, _, domain = digits_model
    cond, _ = condition(spec)
    theta = torch.tensor(cond.identity()).expand(len(x), -1).float()
    assert torch.allclose(cond.transform(x, theta, domain), x, atol=1e-5)


def test_translation_shifts_by_whole_pixels_and_fills_with_the_domain_floor(digits_model):
    _, x, _, domain = digits_model
    cond, _ = condition({"kind": "translation", "pixels": 1})
    moved = cond.transform(x[:2], torch.tensor([[1.0, 0.0], [0.0, -1.0]]), domain)
    assert torch.equal(moved[0, :, :, 1:], x[0, :, :, :-1]) and (moved[0, :, :, 0] == 0).all()
    assert torch.equal(moved[1, :, :-1, :], x[1, :, 1:, :]) and (moved[1, :, -1, :] == 0).all()
    assert len(cond.finite_set()) == 9


def test_occlusion_enumerates_positions_on_the_stride_and_the_last_one():
    cond, _ = condition({"kind": "occlusion", "size": 3, "stride": 2})
    rows = sorted({int(r) for r, _ in cond.finite_set()})
    assert rows == [0, 2, 4, 5]  # 5 = 8 - 3: the bottom edge is covered


def test_search_finds_failures_and_widening_the_range_never_helps(digits_model):
    """A wide brightness range breaks more samples than a narrow one, and the broken samples'
    recorded parameters really break them."""
    model, x, y, domain = digits_model
    narrow, settings = condition({"kind": "brightness", "range": [-0.05, 0.05]})
    wide, _ = condition({"kind": "brightness", "range": [-0.5, 0.5]})
    g = torch.Generator().manual_seed(0)
    small = search(model, x, y, narrow, domain, settings.search, g, 512)
    large = search(model, x, y, wide, domain, settings.search, g, 512)
    assert int(large.robust.sum()) < int(small.robust.sum()) <= int(small.clean_correct.sum())
    broken = large.clean_correct & ~large.robust
    with torch.no_grad():
        _, prediction = margin_and_prediction(model(wide.transform(x[broken], large.worst.theta[broken], domain)),
                                              y[broken])
    assert (prediction != y[broken]).all()


@pytest.mark.parametrize("estimator", ["autograd", "differences"])
def test_gradient_search_is_at_least_as_strong_as_random_search_at_equal_budget(digits_model, estimator):
    model, x, y, domain = digits_model
    cond, settings = condition({"kind": "brightness_contrast", "brightness": [-0.3, 0.3], "contrast": [0.5, 1.5]})
    cfg = settings.search.model_copy(update={"gradient": estimator})
    # equal budget in points, each a gradient query of the descent (by a backward pass, or by the point and one
    # forward-difference probe per axis: the copies, not the points, differ)
    budget = cfg.steps + 1
    by_gradient = search(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(1), 512,
                         use=("gradient",), random_draws=0)
    by_random = search(model, x, y, cond, domain, cfg, torch.Generator().manual_seed(1), 512,
                       use=(), random_draws=budget)
    assert by_random.copies_per_sample == budget
    assert by_gradient.copies_per_sample == cfg.steps * (1 if estimator == "autograd" else 1 + cond.dims) + 1
    assert int(by_gradient.robust.sum()) <= int(by_random.robust.sum())


@pytest.mark.parametrize("spec", [
    {"kind": "brightness", "range": [-0.1, 0.1]}, {"kind": "contrast", "range": [0.8, 1.25]},
    {"kind": "brightness_contrast", "brightness": [-0.1, 0.1], "contrast": [0.8, 1.2]},
    {"kind": "gamma", "range": [0.8, 1.25]}, {"kind": "fog", "range": [0.0, 0.2]}])
def test_branch_and_bound_certificates_hold_on_a_dense_grid(spec, digits_model):
    """Soundness: no sample certified over the parameter box is misclassified at any of 400 points
    of a dense grid over the box (corners included), and something is certified at all."""
    model, x, y, domain = digits_model
    cond, settings = condition(spec)
    outcome = branch_and_bound(model, x, y, cond, domain, 10, settings.certify)
    assert outcome.verified.any()
    assert_certified_on_a_dense_grid(model, x, y, cond, domain, outcome.verified)


def assert_certified_on_a_dense_grid(model, x, y, cond, domain, verified: torch.Tensor) -> None:
    """Every certified sample is classified correctly at each point of a dense grid over the parameter
    box (400 points on one axis, 20 × 20 on two; corners included)."""
    low, high = cond.box()
    axes = [torch.linspace(float(lo), float(hi), 400 if cond.dims == 1 else 20) for lo, hi in zip(low, high)]
    points = torch.cartesian_prod(*axes).reshape(-1, cond.dims)
    certified = torch.nonzero(verified).flatten()
    with torch.no_grad():
        for point in points:
            prediction = model(cond.transform(x[certified], point.expand(len(certified), -1), domain)).argmax(1)
            assert (prediction == y[certified]).all(), (cond, point)


def test_a_certificate_contradicted_by_the_search_is_a_soundness_violation():
    cond, _ = condition({"kind": "brightness", "range": [-0.1, 0.1]})
    certified = torch.tensor([True, True, False])
    cross_check(certified, torch.tensor([False, False, True]), cond, "CROWN")  # consistent: no error
    with pytest.raises(SoundnessViolation, match="1 sample"):
        cross_check(certified, torch.tensor([False, True, True]), cond, "CROWN")


def test_policy_names_a_condition_metric_and_refuses_a_wrong_field():
    from pipeline.results import metric_kind

    assert metric_kind("conditions.glare.robust_accuracy") == "accuracy"
    assert metric_kind("conditions.glare.certified_accuracy") == "accuracy"
    assert metric_kind("conditions.glare.sanity_all_passed") == "number"
    with pytest.raises(ValueError, match="no 'robustness'"):
        metric_kind("conditions.glare.robustness")


def _params_with(threats: dict, **changes) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["conditions"] = {**params["conditions"], "threats": threats}
    params.update(changes)
    return params


@pytest.mark.parametrize("threats,changes,message", [
    ({"x": {"kind": "glare", "range": [0, 1], "rationale": "r"}}, {}, "Input tag 'glare'"),
    ({"x": {"kind": "brightness", "range": [-2.0, 2.0], "rationale": "r"}}, {},
     "conditions.threats.x.range = [-2, 2]: beyond the data range"),
    ({"x": {"kind": "rotation", "range": [-10, 10], "rationale": "r"}},
     {"data": {"dataset": "breast_cancer"}, "model": {"name": "mlp", "hidden": [8]}},
     "conditions.threats.x: a rotation condition needs image data"),
    ({"x": {"kind": "translation", "pixels": 8, "rationale": "r"}}, {}, "must be smaller than the image"),
    ({"x": {"kind": "rotation", "range": [-10, 10]}}, {}, "conditions.threats.x.rationale"),
])
def test_bad_conditions_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, threats, changes, message):
    root = make_workspace(tmp_path / "ws", _params_with(threats, **changes))
    if "glare" not in str(threats) and "rationale" in str(threats):  # valid params: reach the stage's checks
        assert run_stage("prepare", root) == 0 and run_stage("train", root) == 0
    capsys.readouterr()
    assert run_stage("conditions", root) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (root / "metrics" / "conditions.json").exists()
    assert not (root / "artifacts" / "conditions").exists()


def untimed(record: dict) -> dict:
    """A record without its wall-clock seconds (the only figures that may differ between runs)."""
    return {k: untimed(v) if isinstance(v, dict) else v for k, v in record.items() if k != "seconds"}


def test_stage_reevaluates_only_the_changed_condition_and_is_deterministic(tmp_path, capsys):
    root = make_workspace(tmp_path / "ws")
    for stage in ("prepare", "train", "conditions"):
        assert run_stage(stage, root) == 0
    first = json.loads((root / "metrics/conditions.json").read_text())
    assert set(first) >= {"glare", "jitter"} and first["jitter"]["certified_accuracy"]["kind"] == "lower_bound"
    assert first["glare"]["robust_accuracy"]["kind"] == "upper_bound"
    assert first["glare"]["certified_accuracy"]["value"] <= first["glare"]["robust_accuracy"]["value"]
    params = _params_with({**TINY_PARAMS["conditions"]["threats"],
                           "glare": {"kind": "brightness", "range": [-0.1, 0.1], "rationale": "sun glare"}})
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    capsys.readouterr()
    assert run_stage("conditions", root) == 0
    out = capsys.readouterr().out
    assert "jitter: unchanged since the last run, carried over" in out and "glare: unchanged" not in out
    second = json.loads((root / "metrics/conditions.json").read_text())
    assert second["jitter"]["reused"] and not second["glare"]["reused"]
    assert {k: v for k, v in second["jitter"].items() if k != "reused"} == \
        {k: v for k, v in first["jitter"].items() if k != "reused"}
    (root / "metrics/conditions.json").unlink()  # a cold run gives the same figures
    assert run_stage("conditions", root) == 0
    cold = json.loads((root / "metrics/conditions.json").read_text())
    assert untimed(cold["glare"]) == untimed({**second["glare"], "reused": False})
    assert np.load(root / "artifacts/conditions/glare.npz")["x"].ndim in (0, 4)


def test_a_code_or_runtime_change_reevaluates_every_condition(tmp_path, capsys):
    """The cache key holds the package's code and the runtime, so a carried-over record never mixes
    figures computed by other code or on other threads with the runtime the file records."""
    import shutil

    from pipeline.stages.conditions import PACKAGE, package_sha256

    package_copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, package_copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = package_sha256(package_copy)
    assert before == package_sha256(PACKAGE)
    search_module = package_copy / "conditions" / "search.py"
    search_module.write_text(search_module.read_text() + "\n# an edit\n")
    package_sha256.cache_clear()
    assert package_sha256(package_copy) != before

    root = make_workspace(tmp_path / "ws")
    for stage in ("prepare", "train", "conditions"):
        assert run_stage(stage, root) == 0
    assert json.loads((root / "metrics/conditions.json").read_text())["runtime"]["threads"] == torch.get_num_threads()
    params = _params_with(TINY_PARAMS["conditions"]["threats"])
    params["runtime"] = {"threads": 1}
    (root / "params.yaml").write_text(__import__("yaml").safe_dump(params))
    previous = torch.get_num_threads()
    capsys.readouterr()
    try:
        assert run_stage("conditions", root) == 0
    finally:
        torch.set_num_threads(previous)
    assert "carried over" not in capsys.readouterr().out
    again = json.loads((root / "metrics/conditions.json").read_text())
    assert again["runtime"]["threads"] == 1 and not any(v.get("reused") for v in again.values() if isinstance(v, dict))


def test_the_cache_key_holds_the_versions_of_the_libraries_that_compute_the_figures(monkeypatch):
    """Another auto_LiRPA, numpy or scipy may give other bounds or intervals for the same model and data."""
    import pipeline.stages.conditions as stage

    params = parse_params(_params_with(TINY_PARAMS["conditions"]["threats"]))
    name = next(iter(params.conditions.threats))
    installed = stage.library_versions()
    assert set(installed) == {"auto-LiRPA", "numpy", "scipy"} and all(installed.values())
    before = stage.config_sha256(params, name, "0" * 64, "data", {"threads": 1})
    monkeypatch.setattr(stage, "library_versions", lambda: {**installed, "numpy": "0.0"})
    assert stage.config_sha256(params, name, "0" * 64, "data", {"threads": 1}) != before


def test_every_kind_is_configurable():
    """The params union and the threat classes name the same kinds."""
    from pipeline.config import CONDITION_KINDS

    assert set(CONDITION_KINDS) == set(KINDS)


def test_a_policy_pinning_a_condition_fails_a_narrower_or_missing_evaluation():
    """Under "brightness ±0.2, robust accuracy ≥ 0.9", evidence over ±0.1 must not pass: the
    pinned range is a gate row of its own (COND-<name>), blocking."""
    from pipeline.policy import Policy, evaluate

    policy = Policy.model_validate({
        "name": "p", "conditions": {"glare": {"kind": "brightness", "range": {"brightness": [-0.2, 0.2]}}},
        "requirements": [{"id": "R", "title": "t", "metric": "conditions.glare.robust_accuracy", "comparator": ">=",
                          "threshold": 0.5, "clause": "c"}]})
    accuracy = {"status": "ok", "value": 0.9, "ci": [0.8, 0.95], "n": 100, "successes": 90,
                "ci_method": "clopper-pearson 95%", "kind": "upper_bound", "method": "search"}

    def rows(axes, kind="brightness"):
        metrics = {"attack": {"threat": {"norm": "linf", "epsilon": 0.1}},
                   "conditions": {"glare": {"kind": kind, "axes": axes, "robust_accuracy": accuracy}}}
        return {r.id: r for r in evaluate(policy, metrics).rows}

    assert rows({"brightness": [-0.25, 0.2]})["COND-glare"].passed
    narrow = rows({"brightness": [-0.1, 0.1]})["COND-glare"]
    assert not narrow.passed and "narrower than pinned on brightness" in narrow.reason
    assert not rows({"contrast": [0.5, 1.5]}, kind="contrast")["COND-glare"].passed
    missing = {r.id: r for r in evaluate(policy, {"attack": {"threat": {"norm": "linf", "epsilon": 0.1}}}).rows}
    assert not missing["COND-glare"].passed and not missing["R"].passed


def test_worst_of_k_training_inputs_are_at_least_as_hard_as_plain_augmentation(digits_model):
    """The first of the k draws is the augmentation's draw (same generator state), so per sample the
    worst of k has at least its loss; the ascent refinement only raises it further, inside the box."""
    import torch.nn.functional as F

    from pipeline.conditions.training import augmented, worst_of_k

    model, x, y, domain = digits_model
    cond, _ = condition({"kind": "rotation", "range": [-20, 20]})
    plain = augmented(model, x, y, cond, domain, torch.Generator().manual_seed(3))
    hardest = worst_of_k(model, x, y, cond, domain, torch.Generator().manual_seed(3), k=6)
    refined = worst_of_k(model, x, y, cond, domain, torch.Generator().manual_seed(3), k=6, steps=3)
    with torch.no_grad():
        losses = [F.cross_entropy(model(v), y, reduction="none") for v in (plain, hardest, refined)]
    assert (losses[1] >= losses[0] - 1e-6).all() and (losses[2] >= losses[1] - 1e-6).all()
    assert losses[1].mean() > losses[0].mean()
