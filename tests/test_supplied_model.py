"""A supplied ONNX file runs through prepare -> train (import) -> attack -> certify -> export by params
alone, and ships byte for byte. New behaviour: before, `model.source` was an unknown key (exit 2)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from pipeline.io import sha256_file
from tests.conftest import TINY_PARAMS, make_workspace, run_stage


class NHWC(torch.nn.Module):
    """The same network reading (N, H, W, C) inputs, as a TensorFlow export would."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def _supplied_workspace(root, digits_model, layout: str):
    model = digits_model[0]
    shape = (1, 8, 8) if layout == "nchw" else (8, 8, 1)
    net = model if layout == "nchw" else NHWC(model)
    root.mkdir(parents=True, exist_ok=True)
    (root / "supplied").mkdir()
    torch.onnx.export(net.eval(), (torch.zeros(1, *shape),), str(root / "supplied" / "net.onnx"), dynamo=False,
                      input_names=["images"], output_names=["scores"],
                      dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
    params = copy.deepcopy(TINY_PARAMS)
    params["model"] = {"source": "onnx", "path": "supplied/net.onnx", "layout": layout, "supplier": "ACME Corp"}
    make_workspace(root, params)
    return root


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_supplied_onnx_through_the_stages(tmp_path, digits_model, layout):
    root = _supplied_workspace(tmp_path / "ws", digits_model, layout)
    supplied_sha = sha256_file(root / "supplied" / "net.onnx")
    for stage in ("prepare", "train", "attack", "certify", "smooth", "export", "properties", "report", "gate"):
        assert run_stage(stage, root) == 0, stage
    html = (root / "reports" / "build" / "report.html").read_text()
    assert "supplied ONNX file <code>supplied/net.onnx</code>" in html and "not trained here" in html
    gate = json.loads((root / "metrics" / "gate.json").read_text())
    assert gate["passed"] is True
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["source"] == "onnx" and train["supplier"] == "ACME Corp"
    assert train["model_sha256"] == supplied_sha and train["max_abs_diff"] < 1e-4
    assert (root / "models" / "model.onnx").read_bytes() == (root / "supplied" / "net.onnx").read_bytes()
    export = json.loads((root / "metrics" / "export.json").read_text())
    assert export["onnx_sha256"] == supplied_sha and export["adv_max_abs_diff"] < 1e-4
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["model_sha256"] == supplied_sha
    assert certify["verified_accuracy"]["crown"]["value"] >= 0.0  # bounds ran on the file's torch form
    attack = json.loads((root / "metrics" / "attack.json").read_text())
    assert attack["clean_accuracy"]["value"] > 0.5


def test_wrong_layout_is_one_line_exit_2(tmp_path, digits_model, capsys):
    root = _supplied_workspace(tmp_path / "ws", digits_model, "nhwc")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["layout"] = "nchw"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("prepare", root) == 0
    assert run_stage("train", root) == 2
    err = capsys.readouterr().err
    assert "input shape [8, 8, 1] per sample; the data in layout 'nchw' gives [1, 8, 8]" in err
    assert not (root / "models" / "model.pt").exists()


def _instances_run(tmp_path, digits_model, radii: dict[str, float], max_claims: int):
    """A supplied-ONNX workspace whose bench/instances.csv lists one robustness property per name in
    `radii` (L∞ radius around a grey image, on the supplied file), run through the report."""
    import numpy as np

    from pipeline import vnnlib

    root = _supplied_workspace(tmp_path / "ws", digits_model, "nchw")
    bench = root / "bench"
    bench.mkdir()
    x0 = np.full((1, 8, 8), 0.5)
    with torch.no_grad():
        label = int(digits_model[0](torch.as_tensor(x0, dtype=torch.float32)[None]).argmax())
    for name, radius in radii.items():
        (bench / f"{name}.vnnlib").write_text(vnnlib.robustness_property(x0, radius, 0.0, 1.0, label, 10))
    (bench / "instances.csv").write_text("".join(f"../supplied/net.onnx,{name}.vnnlib,30\n" for name in radii))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["properties"] = {"instances": "bench/instances.csv", "max_claims": max_claims}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "train", "attack", "certify", "smooth", "export", "properties", "report"):
        assert run_stage(stage, root) == 0, stage
    return root


def test_properties_stage_claims_and_instances(tmp_path, digits_model):
    """Claims are written for exactly the certified samples and re-prove unsat on the shipped file;
    a listed instances.csv is decided with per-instance results and totals. New stage: before,
    `robustgate properties` did not exist."""
    from pipeline.prove_cli import prove_files

    root = _instances_run(tmp_path, digits_model, {"tiny": 1e-4, "huge": 1.0}, max_claims=3)
    metrics = json.loads((root / "metrics" / "properties.json").read_text())
    html = (root / "reports" / "build" / "report.html").read_text()
    assert "<code>bench/tiny.vnnlib</code></td><td><strong>unsat</strong>" in html
    assert "<code>bench/huge.vnnlib</code></td><td><strong>sat</strong>" in html
    assert [i["status"] for i in metrics["instances"]] == ["unsat", "sat"]
    assert metrics["totals"] == {"unsat": 1, "sat": 1, "unknown": 0, "timeout": 0}
    assert metrics["unsat_fraction"] == 0.5
    sat_file = (root / metrics["instances"][1]["result_file"]).read_text().splitlines()
    assert sat_file[0] == "sat" and sat_file[1].startswith("((X_0 ")
    samples = [json.loads(line) for line in (root / "artifacts/certify/samples.jsonl").read_text().splitlines()]
    certified = [s for s in samples if s.get("crown_verified") or s.get("ibp_verified")]
    assert metrics["claims_written"] == min(3, len(certified)) and metrics["claims_written"] > 0
    claims = root / "artifacts" / "properties" / "claims"
    rows = (claims / "instances.csv").read_text().splitlines()
    assert len(rows) == metrics["claims_written"]
    onnx_rel, prop_rel, _ = rows[0].split(",")
    answer = prove_files(claims / onnx_rel, claims / prop_rel, 30)
    assert answer.status == "unsat"  # the certified claim holds on the shipped file


def test_properties_instances_are_hashed_and_counterexamples_drawn(tmp_path, digits_model):
    """The CSV and every file it lists are hashed into metrics/properties.json and the manifest (DVC
    cannot template deps from a CSV), and the sat counterexample is drawn in the report. Fails on the
    code before: no hashes in the metrics or manifest, no counterexample image."""
    import numpy as np

    from pipeline.io import sha256_file

    root = _instances_run(tmp_path, digits_model, {"huge": 1.0}, max_claims=1)
    bench = root / "bench"
    metrics = json.loads((root / "metrics" / "properties.json").read_text())
    assert metrics["instances_sha256"] == sha256_file(bench / "instances.csv")
    (record,) = metrics["instances"]
    assert record["status"] == "sat" and record["vnnlib_sha256"] == sha256_file(bench / "huge.vnnlib")
    assert record["onnx_sha256"] == sha256_file(root / "supplied" / "net.onnx")
    found = np.load(root / "artifacts" / "properties" / "counterexamples.npz")
    assert found["x"].shape == (1, 1, 8, 8) and found["prediction"][0] != found["centre_prediction"][0]
    html = (root / "reports" / "build" / "report.html").read_text()
    assert 'alt="counterexamples of the sat instances" src="data:image/png;base64,' in html
    manifest = json.loads((root / "reports" / "build" / "manifest.json").read_text())
    assert {"bench/instances.csv", "bench/huge.vnnlib"} <= set(json.dumps(manifest).replace('"', " ").split())


@pytest.mark.parametrize("row,message", [
    ("supplied/net.onnx,../outside.vnnlib,10", "outside.vnnlib lies outside"),
    ("supplied/net.onnx,missing.vnnlib,10", "missing.vnnlib does not exist"),
], ids=["outside-the-workspace", "missing-file"])
def test_properties_instances_bad_row_exit_2(tmp_path, digits_model, capsys, row, message):
    root = _supplied_workspace(tmp_path / "ws", digits_model, "nchw")
    (tmp_path / "outside.vnnlib").write_text("(declare-const X_0 Real)\n")
    (root / "instances.csv").write_text(row + "\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["properties"] = {"instances": "instances.csv"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "train", "attack", "certify", "export"):
        assert run_stage(stage, root) == 0, stage
    assert run_stage("properties", root) == 2
    err = capsys.readouterr().err
    assert "instances.csv:1:" in err and message in err
    assert not (root / "metrics" / "properties.json").exists()
