"""Issue 17, the medical path from a CSV file with a subgroup column and an integer feature, run
stage by stage (real stages, no mocks): every diagnostic figure per subgroup with its n, the
smallest subgroup named; integer features kept integer by the attacks and decided over the
integers by the MILP; the reliability diagram and the coverage-risk curve drawn in the report.

Before: a subgroup carried the positive-class figures only (no calibration, no selective
prediction, the smallest subgroup unnamed); adversarial examples left integer features at
non-integer values and the MILP decided the continuous box; the report drew no plot for the
clinical figures (a bar of HTML per reliability bin) and no coverage-risk curve."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_PARAMS, make_workspace, run_stage

THRESHOLDS = [0.5, 0.8, 0.95]


def csv_with_an_integer_column(path: Path) -> None:
    """examples/medical/wdbc.csv plus `tertile_count`, an integer copy of the categorical `size_tertile`."""
    lines = (REPO / "examples/medical/wdbc.csv").read_text().splitlines()
    header = lines[0].split(",")
    at = header.index("size_tertile")
    out = [lines[0] + ",tertile_count"] + [row + "," + row.split(",")[at] for row in lines[1:]]
    path.write_text("\n".join(out) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    params = copy.deepcopy(TINY_PARAMS)
    params["data"] = {"dataset": "csv", "path": "wdbc_int.csv",
                      "csv": {"label_column": "diagnosis",
                              "feature_types": {"size_tertile": "categorical", "tertile_count": "integer"}}}
    params["model"] = {"name": "mlp", "hidden": [16]}
    params["threat"] = {"norm": "linf", "epsilon": 1.0, "features": {"tertile_count": {"absolute": 1.5}},
                        "unlisted": {"std": 0.05}}
    params["train"]["pgd"] = {"steps": 3, "step_size": 0.5}
    params["train"]["val_pgd"] = {"steps": 3, "step_size": 0.5}
    params["attack"]["pgd"] = {"steps": 10, "step_size": 0.2, "restarts": 1}
    params["smoothing"]["enabled"] = False
    params["conditions"]["threats"] = {}
    params["clinical"] = {"positive_class": "malignant", "subgroups": ["size_tertile"], "bootstrap": 100,
                          "thresholds": THRESHOLDS, "exact_time_budget_s": 5.0, "exact_case_limit_s": 1.0}
    params["report"] = {"profile": "medical"}
    params["gate"] = {"policy": "policies/medical.yaml"}
    root = make_workspace(tmp_path_factory.mktemp("medical_csv"), params)
    csv_with_an_integer_column(root / "wdbc_int.csv")
    for stage in ("prepare", "train", "attack", "certify", "smooth", "clinical", "conditions", "export", "report"):
        assert run_stage(stage, root) == 0, stage
    return root


def clinical(root: Path) -> dict:
    return json.loads((root / "metrics/clinical.json").read_text())


def test_every_figure_is_repeated_per_subgroup_with_its_n(workspace):
    c = clinical(workspace)
    groups = c["subgroups"]
    assert [g["value"] for g in groups] == [1.0, 2.0, 3.0] and sum(g["n"] for g in groups) == c["n"]
    for g in groups:
        p = g["positive"]
        assert p["n_positive"] + p["n_negative"] == g["n"]
        for figure in ("sensitivity", "specificity", "ppv", "npv", "robust_sensitivity", "robust_specificity",
                       "verified_sensitivity", "verified_specificity", "adversarial_ppv", "adversarial_npv"):
            assert figure in p
        assert g["calibration"]["n"] == g["n"] and 0 <= g["calibration"]["ece"] <= 1
        assert [s["threshold"] for s in g["selective"]] == THRESHOLDS
        assert all(s["answered"] <= g["n"] for s in g["selective"])
    # answered cases add up over the subgroups to the whole split's, threshold by threshold
    for k, point in enumerate(c["selective"]):
        assert sum(g["selective"][k]["answered"] for g in groups) == point["answered"]
    # the MILP's answers too, counted again per subgroup: they add up to the whole split's
    for key in ("verified", "counterexample", "unknown", "positive_counterexamples"):
        assert sum(g["exact"][key] for g in groups) == c["exact"][key]
    assert sum(g["exact"]["n"] for g in groups) == c["exact"]["n"] == c["n"]
    smallest = min(groups, key=lambda g: g["n"])
    assert c["smallest_subgroup_n"] == smallest["n"]
    assert c["smallest_subgroup"] == f"size_tertile = {smallest['value']:g}"


def test_the_report_tables_every_subgroup_figure_and_draws_the_two_plots(workspace):
    html = (workspace / "reports/build/report.html").read_text()
    c = clinical(workspace)
    assert f"the smallest, {c['smallest_subgroup']}, has n = {c['smallest_subgroup_n']}" in html
    assert "ECE [95%]" in html and "Abstain &lt; 0.95: coverage / risk" in html
    assert html.count("size_tertile = ") >= 6  # each subgroup in both subgroup tables
    assert "Exactly verified sensitivity (MILP)" in html and "the complete MILP verification) is repeated" in html
    assert 'alt="Reliability diagram" src="data:image/png;base64,' in html
    assert 'alt="Coverage against risk of selective prediction" src="data:image/png;base64,' in html
    assert "Every diagnostic figure" in html and f"({c['smallest_subgroup']}) has n = " in html


def test_integer_features_stay_integer_and_the_milp_decides_over_the_integers(workspace):
    c = clinical(workspace)
    names = [b["name"] for b in c["feature_budgets"]]
    column = names.index("tertile_count")
    with np.load(workspace / "artifacts/attack/adversarial.npz") as adv:
        moved = adv["x_adv"][:, column]
        assert np.array_equal(moved, np.round(moved))
        assert np.abs(moved - adv["x"][:, column]).max() <= 1
    assert "integer features as integer variables" in c["exact"]["method"]
    assert any(h.startswith("integer features (tertile_count): their domain is the integers") for h in
               c["feature_handling"])
    assert c["exact"]["verified"] + c["exact"]["counterexample"] + c["exact"]["unknown"] == c["n"]
