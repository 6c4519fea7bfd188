"""A supplied ONNX file with an op the torch form lacks (LeakyRelu): the stages still run what forward
passes allow, on onnxruntime on the file (Square, smoothing), and say what was not possible.

Fails on the code before: `train` refused such a file (exit 2, "ONNX op LeakyRelu ... is not supported").
"""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from pipeline.io import sha256_file
from pipeline.supplied.onnx_torch import SUPPORTED_OPS
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

OP = "LeakyRelu"


def _leaky_file(path, net):
    """The digits MLP exported from torch, its Relu nodes rewritten as LeakyRelu (alpha 0.01) node by node."""
    torch.onnx.export(net.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["images"],
                      output_names=["scores"], dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.op_type = OP
            node.attribute.append(onnx.helper.make_attribute("alpha", 0.01))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_unsupported_op_runs_square_on_onnxruntime_and_says_what_did_not(tmp_path, digits_model, capsys):
    assert OP not in SUPPORTED_OPS
    root = tmp_path / "ws"
    (root / "supplied").mkdir(parents=True)
    supplied = _leaky_file(root / "supplied" / "net.onnx", digits_model[0])
    params = copy.deepcopy(TINY_PARAMS)
    params["model"] = {"source": "onnx", "path": "supplied/net.onnx", "supplier": "ACME Corp"}
    make_workspace(root, params)
    for stage in ("prepare", "train", "attack", "certify", "smooth", "conditions", "export", "properties", "report"):
        assert run_stage(stage, root) == 0, stage
    assert run_stage("gate", root) == 1  # VER needs a certificate, which could not be produced

    train = json.loads((root / "metrics" / "train.json").read_text())
    assert f"ONNX op {OP}" in train["not_differentiable"] and train["model_sha256"] == sha256_file(supplied)
    attack = json.loads((root / "metrics" / "attack.json").read_text())
    assert set(attack["not_run"]) == {"fgsm", "pgd", "apgd_ce"} and list(attack["attacks"]) != ["square"]
    assert attack["attacks"]["pgd"]["robust_accuracy"]["status"] == "not_applicable"
    assert OP in attack["attacks"]["pgd"]["robust_accuracy"]["reason"]
    robust = attack["robust_accuracy"]
    assert robust["kind"] == "upper_bound" and robust["method"].startswith("square on onnxruntime only")
    assert attack["clean_accuracy"]["value"] > 0.5 and robust["value"] <= attack["clean_accuracy"]["value"]
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["status"] == "not_applicable" and OP in certify["reason"]
    assert certify["verified_accuracy"]["crown"]["status"] == "not_applicable"
    conditions = json.loads((root / "metrics" / "conditions.json").read_text())
    assert conditions["glare"]["robust_accuracy"]["value"] <= conditions["glare"]["clean_accuracy"]["value"]
    assert conditions["glare"]["certified_accuracy"]["status"] == "not_applicable"
    assert OP in conditions["glare"]["certified_accuracy"]["reason"]
    descended = [r["search"] for r in conditions.values() if isinstance(r, dict) and "gradient" in r.get(
        "search", {}).get("components", [])]  # on onnxruntime, by forward differences
    assert descended and all(s["gradient_estimator"] == "differences" and s["gradient_copies"] == 0
                             for s in descended)
    smooth = json.loads((root / "metrics" / "smooth.json").read_text())
    assert smooth["status"] == "ok"  # forward passes only: smoothing runs on onnxruntime
    assert (root / "models" / "model.onnx").read_bytes() == supplied.read_bytes()

    html = (root / "reports" / "build" / "report.html").read_text()
    assert f"The supplied file has an op no torch form exists for (ONNX op {OP}" in html
    assert f"ran on onnxruntime on the file: Square (robust accuracy at most {robust['value']:.3f}" in html
    not_possible = html.split("What needs gradients or bounds was not possible: ")[1].split(".")[0]
    assert all(name in not_possible for name in ("FGSM", "PGD", "APGD-CE", "bound propagation (IBP and CROWN)",
                                                 "their certification"))
    assert "search" not in not_possible  # the descent needs forwards only: it ran
    assert ("the search of 2 triggering condition(s) by exhaustive enumeration, a grid, random draws and "
            "signed-gradient descent on the parameters (gradient signs by forward differences)") in html
    gate = json.loads((root / "metrics" / "gate.json").read_text())
    rows = {r["id"]: r for r in gate["rows"]}
    assert gate["passed"] is False and rows["VER"]["measured"] == "not_applicable" and OP in rows["VER"]["reason"]
    assert rows["ACC"]["passed"] is True

    # `robustgate prove` has no forward-only answer (unsat needs bounds): still bad input, exit 2
    from pipeline import vnnlib
    from pipeline.cli import main as cli

    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib.robustness_property(np.full((1, 8, 8), 0.5), 0.01, 0.0, 1.0, 0, 10))
    capsys.readouterr()
    assert cli(["prove", str(supplied), str(prop), "--timeout", "5"]) == 2
    assert OP in capsys.readouterr().err

