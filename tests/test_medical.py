"""Issue 17: the medical path. Budgets in clinical units, raw units kept inside the model, the
CSV loader, the clinical figures and their bad inputs.

Each test fails on the code before the issue: there was no `threat.features`, no CSV loader, no
Standardize layer (tabular x was standardised in prepare and the scaling was lost to the ONNX
file), no `clinical` stage and no clinical metrics."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.clinical import Outcomes, calibration, class_figures, selective
from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.errors import UsageError
from pipeline.models import Standardize, build_model, set_input_statistics
from pipeline.threat import from_params
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

BUDGETS = {"mean radius": {"absolute": 0.3}, "mean area": {"relative": 0.02},
           "mean texture": {"uncertainty": 0.5, "k": 3}, "worst area": "immutable"}


def medical_params(**threat) -> dict:
    params = copy.deepcopy(TINY_PARAMS)
    params["data"] = {"dataset": "breast_cancer"}
    params["model"] = {"name": "mlp", "hidden": [16]}
    params["threat"] = {"norm": "linf", "epsilon": 1.0, "features": BUDGETS, "unlisted": {"std": 0.05}, **threat}
    params["smoothing"]["enabled"] = False
    params["clinical"] = {"positive_class": "malignant", "bootstrap": 200, "exact_time_budget_s": 3.0,
                          "exact_case_limit_s": 1.0}
    params["report"] = {"profile": "medical"}
    return params


@pytest.fixture(scope="module")
def breast_cancer():
    raw = load_dataset("breast_cancer")
    return prepare(raw, 0.15, 0.25, seed=0)


def test_budgets_become_per_feature_radii_in_raw_units(breast_cancer):
    data = breast_cancer
    threat = from_params(parse_params(medical_params(epsilon=2.0)), data)
    scale = threat.scale.numpy()
    at = {name: j for j, name in enumerate(data.feature_names)}
    assert scale[at["mean radius"]] == pytest.approx(0.3)
    assert scale[at["mean area"]] == pytest.approx(0.02 * data.absmax[at["mean area"]])
    assert scale[at["mean texture"]] == pytest.approx(1.5)
    assert scale[at["worst area"]] == 0.0
    assert scale[at["mean smoothness"]] == pytest.approx(0.05 * data.std[at["mean smoothness"]])
    assert threat.epsilon == 2.0  # the global multiplier of the declared budgets


def test_without_budgets_epsilon_is_in_training_standard_deviations(breast_cancer):
    params = copy.deepcopy(TINY_PARAMS)
    threat = from_params(parse_params({**params, "data": {"dataset": "breast_cancer"}}), breast_cancer)
    assert np.allclose(threat.scale.numpy(), breast_cancer.std)


@pytest.mark.parametrize("features,unlisted,needle", [
    ({"tumour colour": {"absolute": 1.0}}, {"std": 0.1}, "'tumour colour' is not a feature"),
    ({"mean radius": {"absolute": 1.0}}, None, "have no budget"),
])
def test_bad_budgets_against_the_data_are_one_line(breast_cancer, features, unlisted, needle):
    params = parse_params({**medical_params(), "threat": {"norm": "linf", "epsilon": 1.0, "features": features,
                                                          "unlisted": unlisted}})
    with pytest.raises(UsageError, match=needle):
        from_params(params, breast_cancer)


@pytest.mark.parametrize("budget,needle", [
    (0.5, "unit-less budget"), ({"absolute": -0.1}, "greater than or equal to 0"),
    ({"absolute": 0.1, "std": 1.0}, "exactly one of"), ("fixed", "a budget is a mapping"),
])
def test_unitless_or_negative_budgets_are_refused(budget, needle):
    with pytest.raises(UsageError, match=needle) as error:
        parse_params({"threat": {"features": {"mean radius": budget}}})
    assert "threat.features.mean radius" in str(error.value) and "\n" not in str(error.value)


def test_the_mlp_standardises_inside_and_matches_the_old_pipeline(breast_cancer):
    data = breast_cancer
    model = build_model("mlp", [30], 2, {"hidden": [8]})
    assert set_input_statistics(model, data.mean, data.std)
    first = next(m for m in model.modules() if isinstance(m, Standardize))
    x = torch.as_tensor(data.x["test"])
    expected = (x - torch.as_tensor(data.mean)) / torch.as_tensor(data.std)
    assert torch.allclose(first(x), expected, atol=1e-4)
    assert {"0.weight", "0.bias"} & set(model.state_dict()) == set() and any(
        k.endswith("weight") and v.dim() == 2 and v.shape == (30, 30) for k, v in model.state_dict().items())


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def csv_settings(**kw):
    return parse_params({"data": {"dataset": "csv", "path": "t.csv", "csv": {"label_column": "dx", **kw}}}).data.csv


def test_csv_loader_reads_types_labels_and_categories(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["age,marker,site,dx", "61,1.5,left,M", "47,0.25,right,B",
                                          "55,2.0,left,B"])
    raw = load_dataset("csv", path, tmp_path, csv_settings(feature_types={"age": "integer", "site": "categorical"}))
    assert raw.feature_names == ("age", "marker", "site")
    assert raw.feature_types == ("integer", "continuous", "categorical")
    assert raw.class_names == ("B", "M") and raw.y.tolist() == [1, 0, 0]
    assert raw.x[:, 2].tolist() == [0.0, 1.0, 0.0] and raw.x[1, 1] == 0.25


@pytest.mark.parametrize("rows,needle", [
    (["a,dx", "1.0,0", ",1", "2.0,0"], "row 3, column 'a': missing value"),
    (["a,dx", "1.0,0", "NA,1"], "row 3, column 'a': missing value"),
    (["a,dx", "1.0,0", "high,1"], "row 3, column 'a': 'high' is not a number"),
    (["a,b,dx", "1.0,2,0", "2.0,3"], "row 3 has 2 cells"),
    (["a,label", "1.0,0", "2.0,1"], "label_column = 'dx' is not a column"),
])
def test_csv_bad_cells_name_the_row(tmp_path, rows, needle):
    path = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(UsageError, match=needle):
        load_dataset("csv", path, tmp_path, csv_settings())


def test_a_categorical_feature_is_immutable_and_cannot_take_a_budget(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["marker,site,dx"] + [f"{i / 10},{'ab'[i % 2]},{i % 2}" for i in range(40)])
    data = prepare(load_dataset("csv", path, tmp_path, csv_settings(feature_types={"site": "categorical"})),
                   0.15, 0.25, seed=0)
    params = {"data": {"dataset": "csv", "path": "t.csv", "csv": {"label_column": "dx",
                                                                  "feature_types": {"site": "categorical"}}}}
    assert from_params(parse_params({**params, "threat": {"epsilon": 1.0}}), data).scale[1] == 0.0
    with pytest.raises(UsageError, match="categorical feature is immutable"):
        from_params(parse_params({**params, "threat": {"features": {"site": {"absolute": 1.0}, "marker": "immutable"}}}),
                    data)


def test_clinical_figures_count_what_they_say():
    # 4 positives (label 1): clean detects 3; under attack 2 robust; 1 verified. 4 negatives: 3 robust.
    o = Outcomes(y=np.array([1, 1, 1, 1, 0, 0, 0, 0]), clean_pred=np.array([1, 1, 1, 0, 0, 0, 0, 1]),
                 adv_pred=np.array([1, 1, 0, 0, 0, 0, 1, 1]),
                 robust=np.array([1, 1, 0, 0, 1, 1, 0, 0], bool), verified=np.array([1, 0, 0, 0, 1, 0, 0, 0], bool))
    f = class_figures(o, 1, "malignant", "pgd", "crown")
    assert (f.sensitivity.successes, f.sensitivity.n) == (3, 4) and f.sensitivity.kind == "point"
    assert (f.robust_sensitivity.successes, f.robust_sensitivity.kind) == (2, "upper_bound")
    assert (f.verified_sensitivity.successes, f.verified_sensitivity.kind) == (1, "lower_bound")
    assert (f.specificity.successes, f.specificity.n) == (3, 4)
    assert (f.ppv.successes, f.ppv.n) == (3, 4) and (f.npv.successes, f.npv.n) == (3, 4)
    assert (f.adversarial_ppv.successes, f.adversarial_ppv.n) == (2, 4)
    none = class_figures(o.subset(o.y == 0), 1, "malignant", "pgd", "crown")
    assert none.sensitivity.status == "not_applicable" and "no malignant case" in none.sensitivity.reason


def test_calibration_and_selective_prediction():
    probabilities = np.array([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    y = np.array([0] * 9 + [1] + [0] * 6 + [1] * 4)  # 90% right at 0.9, 60% right at 0.6: calibrated
    record = calibration(probabilities, y, bins=10, resamples=200, seed=0)
    # ECE is biased upward under resampling, so the bootstrap interval need not contain 0 here
    assert record.ece == pytest.approx(0.0, abs=1e-9) and 0.0 <= record.ece_ci[0] <= record.ece_ci[1] <= 1.0
    shifted = calibration(np.array([[0.99, 0.01]] * 10), np.array([0] * 5 + [1] * 5), 10, 200, 0)
    assert shifted.ece == pytest.approx(0.49)
    points = selective(probabilities, y, positive=1, thresholds=[0.5, 0.8])
    assert [p.answered for p in points] == [20, 10]
    assert points[1].risk == pytest.approx(0.1) and points[1].sensitivity.successes == 0


@pytest.fixture(scope="module")
def clinical_workspace(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("medical"), medical_params())
    for stage in ("prepare", "train", "attack", "certify", "smooth", "clinical", "export"):
        assert run_stage(stage, root) == 0, stage
    return root


def test_the_pipeline_writes_clinical_metrics_in_raw_units(clinical_workspace):
    root = clinical_workspace
    clinical = json.loads((root / "metrics/clinical.json").read_text())
    attack = json.loads((root / "metrics/attack.json").read_text())
    assert clinical["status"] == "ok" and clinical["positive_class"] == "malignant"
    positive = clinical["positive"]
    n_pos = positive["n_positive"]
    assert n_pos == sum(1 for line in (root / "artifacts/attack/samples.jsonl").read_text().splitlines()
                        if json.loads(line)["label"] == 0)  # malignant is label 0 in WDBC
    assert positive["robust_sensitivity"]["kind"] == "upper_bound" and positive["robust_sensitivity"]["n"] == n_pos
    assert positive["verified_sensitivity"]["value"] <= positive["robust_sensitivity"]["value"]
    assert clinical["n"] == attack["n"] and 0 <= clinical["calibration"]["ece"] <= 1
    exact = clinical["exact"]  # complete MILP verification within its 3 s budget, cross-checked in the stage
    assert exact["verified"] + exact["counterexample"] + exact["unknown"] == clinical["n"] and exact["verified"] > 0
    budgets = {b["name"]: b for b in clinical["feature_budgets"]}
    assert budgets["worst area"]["radius"] == 0 and budgets["mean radius"]["radius"] == pytest.approx(0.3)
    # the adversary moved features by at most their radius, and never the immutable one
    with np.load(root / "artifacts/attack/adversarial.npz") as adv:
        delta = np.abs(adv["x_adv"] - adv["x"])
    radii = np.array([b["radius"] for b in clinical["feature_budgets"]], np.float32)
    assert (delta <= radii * (1 + 1e-5) + 1e-5).all() and delta[:, 23].max() == 0.0  # 23 = worst area
    assert delta.max() > 0


def test_summary_states_robust_sensitivity_and_ece(clinical_workspace, capsys):
    """`robustgate summary` of a clinical run (before: no clinical line)."""
    assert cli(["summary", "--workspace", str(clinical_workspace)]) == 0
    text = capsys.readouterr().out
    clinical = json.loads((clinical_workspace / "metrics/clinical.json").read_text())
    robust, calibration = clinical["positive"]["robust_sensitivity"], clinical["calibration"]
    assert (f"“malignant”: robust sensitivity {robust['value']:.3f} [{robust['ci'][0]:.3f}, {robust['ci'][1]:.3f}] "
            f"n={robust['n']} (upper bound)") in text
    assert f"ECE {calibration['ece']:.3f} [{calibration['ece_ci'][0]:.3f}, {calibration['ece_ci'][1]:.3f}]" in text


def test_the_onnx_file_takes_raw_units(clinical_workspace):
    import onnxruntime as ort

    root = clinical_workspace
    with np.load(root / "data/prepared/data.npz") as data:
        x = data["x_test"][:16]
    session = ort.InferenceSession(str(root / "models/model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    samples = [json.loads(line) for line in (root / "artifacts/attack/samples.jsonl").read_text().splitlines()[:16]]
    assert x.max() > 100  # raw units (mean area is in the hundreds), not z-scores
    assert (logits.argmax(1) == np.array([s["label"] for s in samples])).mean() >= (
        np.mean([s["clean_correct"] for s in samples]) - 1e-9)


def test_medical_gate_reads_robust_sensitivity(clinical_workspace):
    from pipeline.evidence import collect_metrics
    from pipeline.policy import evaluate, load_policy
    from pipeline.workspace import Workspace

    policy = load_policy(Path(clinical_workspace / "policies/medical.yaml"))
    verdict = evaluate(policy, collect_metrics(Workspace.at(clinical_workspace)))
    row = next(r for r in verdict.rows if r.id == "MED-HAZ-1")
    clinical = json.loads((clinical_workspace / "metrics/clinical.json").read_text())
    assert row.compared == pytest.approx(clinical["positive"]["robust_sensitivity"]["ci"][0])


@pytest.mark.parametrize("change,needle", [
    ({"clinical": {"positive_class": "cancer"}}, "clinical.positive_class = 'cancer': not a class"),
    ({"threat": {"norm": "linf", "epsilon": 1.0, "features": {"age": {"absolute": 1.0}}, "unlisted": {"std": 0.1}}},
     "threat.features: 'age' is not a feature"),
    ({"clinical": {"positive_class": "malignant", "subgroups": ["site"]}}, "clinical.subgroups: 'site'"),
])
def test_bad_clinical_input_exits_2_and_writes_nothing(tmp_path, capsys, change, needle):
    root = make_workspace(tmp_path, {**medical_params(), **change})
    assert cli(["prepare", "--workspace", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (root / "metrics").exists() and not (root / "data").exists()


def test_milp_finds_the_exact_minimum_margin_of_a_small_relu_network():
    """Complete verification (pipeline/certify/milp.py): the MILP's minimum margin over a box is the
    true one, checked against a dense grid of a 2-input network (never above the grid minimum, and
    within the grid's resolution of it)."""
    from pipeline.certify.milp import VERIFIED, affine_layers, decide, min_margin

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                              torch.nn.Linear(5, 2)).eval()
    low, high = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    _, value, _ = min_margin(affine_layers(net), low, high, 0, 1, time_limit=10)
    grid = np.stack(np.meshgrid(np.linspace(low[0], high[0], 301), np.linspace(low[1], high[1], 301)), -1).reshape(-1, 2)
    with torch.no_grad():
        logits = net(torch.as_tensor(grid, dtype=torch.float32)).double().numpy()
    grid_min = (logits[:, 0] - logits[:, 1]).min()
    assert value <= grid_min + 1e-5 and value >= grid_min - 0.05
    x = torch.tensor([[-0.25, 0.25]])
    label = int(net(x).argmax(1))
    tiny = decide(net, x, torch.tensor([label]), x - 1e-4, x + 1e-4, 2, time_limit=5)
    assert tiny[0].status == VERIFIED  # a box too small to change the decision is proved
