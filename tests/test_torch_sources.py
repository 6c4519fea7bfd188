"""`model.source: torchscript` and `model.source: state_dict` run the stages by params alone.

New behaviour: before, `model.source` allowed only train | onnx (both sources were exit 2 at
params validation), so every test here fails on the old code at its first `run_stage`.
"""
from __future__ import annotations

import copy
import json
import pickle
import zipfile

import pytest
import torch
import yaml

from pipeline.io import sha256_file
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:DeprecationWarning")

STAGES = ("prepare", "train", "attack", "certify", "smooth", "export", "properties", "report", "gate")

FACTORY = (
    "from pipeline.models import mlp\n\n\n"
    "def build(input_shape, num_classes, width=64):\n"
    "    return mlp(input_shape, num_classes, hidden=(width,))\n"
)


def _workspace(root, model: dict):
    params = copy.deepcopy(TINY_PARAMS)
    params["model"] = model
    make_workspace(root, params)
    return root


def test_torchscript_through_the_stages(tmp_path, digits_model):
    root = tmp_path / "ws"
    (root / "supplied").mkdir(parents=True)
    torch.jit.save(torch.jit.script(digits_model[0].eval()), str(root / "supplied" / "net.pt"))
    _workspace(root, {"source": "torchscript", "path": "supplied/net.pt", "supplier": "ACME Corp"})
    for stage in STAGES:
        assert run_stage(stage, root) == 0, stage
    supplied_sha = sha256_file(root / "supplied" / "net.pt")
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["source"] == "torchscript" and train["supplier"] == "ACME Corp"
    assert train["model_sha256"] == supplied_sha and train["max_abs_diff"] < 1e-4 and "Gemm" in train["ops"]
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["status"] == "ok" and certify["model_sha256"] == supplied_sha  # bounds ran on its torch form
    export = json.loads((root / "metrics" / "export.json").read_text())
    assert export["max_abs_diff"] < 1e-4 and export["adv_max_abs_diff"] < 1e-4
    assert export["onnx_sha256"] == sha256_file(root / "models" / "model.onnx") != supplied_sha
    html = (root / "reports" / "build" / "report.html").read_text()
    assert "Supplied TorchScript file supplied/net.pt" in html
    assert "agrees with the supplied TorchScript module to" in html and "shipped as the ONNX export" in html
    assert json.loads((root / "metrics" / "gate.json").read_text())["passed"] is True


def test_torchscript_with_an_op_without_torch_form_is_attacked_not_bounded(tmp_path, digits_model):
    """Its export holds LeakyRelu, which the ONNX torch form lacks: the TorchScript module itself is
    the model (gradient attacks run on it), bound propagation is not_applicable naming the op, and the
    export ships its ONNX export (which onnxruntime runs). Before: exit 2 at params validation."""
    root = tmp_path / "ws"
    (root / "supplied").mkdir(parents=True)
    leaky = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.LeakyReLU(0.01),
                                torch.nn.Linear(32, 10))
    torch.jit.save(torch.jit.script(leaky.eval()), str(root / "supplied" / "net.pt"))
    _workspace(root, {"source": "torchscript", "path": "supplied/net.pt"})
    for stage in ("prepare", "train", "attack", "certify", "conditions", "export", "report"):
        assert run_stage(stage, root) == 0, stage
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert "LeakyRelu" in train["ops"] and train["max_abs_diff"] is None and train["not_differentiable"] is None
    attack = json.loads((root / "metrics" / "attack.json").read_text())
    assert attack["not_run"] == {} and attack["attacks"]["pgd"]["robust_accuracy"]["status"] == "ok"
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["status"] == "not_applicable" and "ONNX op LeakyRelu" in certify["reason"]
    conditions = json.loads((root / "metrics" / "conditions.json").read_text())
    assert "ONNX op LeakyRelu" in conditions["glare"]["certified_accuracy"]["reason"]
    export = json.loads((root / "metrics" / "export.json").read_text())
    assert export["max_abs_diff"] < 1e-4 and export["adv_max_abs_diff"] < 1e-4


def test_state_dict_through_the_stages(tmp_path, digits_model):
    """Flat layout: the factory reads (N, 64); the weights come from a file loaded with weights_only."""
    root = tmp_path / "ws"
    (root / "vendor").mkdir(parents=True)
    (root / "vendor" / "acme_net.py").write_text(FACTORY)
    torch.save(digits_model[0].state_dict(), str(root / "vendor" / "weights.pt"))
    _workspace(root, {"source": "state_dict", "path": "vendor/weights.pt", "name": "vendor.acme_net:build",
                      "options": {"width": 64}, "layout": "flat", "supplier": "ACME Corp"})
    for stage in STAGES:
        assert run_stage(stage, root) == 0, stage
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["source"] == "state_dict" and train["max_abs_diff"] is None and "Linear" in train["ops"]
    assert train["model_sha256"] == sha256_file(root / "vendor" / "weights.pt")
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["verified_accuracy"]["crown"]["value"] >= 0.0
    attack = json.loads((root / "metrics" / "attack.json").read_text())
    assert attack["clean_accuracy"]["value"] > 0.5
    export = json.loads((root / "metrics" / "export.json").read_text())
    assert export["max_abs_diff"] < 1e-4
    html = (root / "reports" / "build" / "report.html").read_text()
    assert "The evidence is on the supplied module itself" in html


def test_state_dict_inputs_must_hold_weights_and_factory(tmp_path, digits_model, capsys):
    root = tmp_path / "ws"
    (root / "vendor").mkdir(parents=True)
    (root / "vendor" / "acme_net.py").write_text(FACTORY)
    torch.save(digits_model[0].state_dict(), str(root / "vendor" / "weights.pt"))
    _workspace(root, {"source": "state_dict", "path": "vendor/weights.pt", "name": "vendor.acme_net:build",
                      "layout": "flat"})
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["inputs"] = {"data": "pipeline/data/datasets.py", "model": "vendor/weights.pt"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("prepare", root) == 2
    err = capsys.readouterr().err
    assert "must be a folder holding 'vendor/weights.pt' and 'vendor/acme_net.py'" in err
    params["inputs"]["model"] = "vendor"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage("prepare", root) == 0


@pytest.mark.parametrize("model, message", [
    ({"source": "onnx", "path": "x.onnx", "hidden": [8]}, "model.hidden: not a setting of model.source 'onnx'"),
    ({"source": "torchscript", "path": "x.pt", "layout": "nhwc"}, "layout 'nhwc' is for onnx files"),
    ({"source": "state_dict", "path": "x.pt"}, "source 'state_dict' needs model.name"),
])
def test_source_settings_are_discriminated(tmp_path, capsys, model, message):
    root = _workspace(tmp_path / "ws", model)
    assert run_stage("prepare", root) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (root / "data" / "prepared").exists()


def test_torchscript_archive_naming_a_python_global_is_refused(tmp_path, digits_model):
    """torch.jit.load reads data.pkl with TorchScript's unpickler: a reference to os.system (what a
    pickle-based payload needs) is refused, and nothing runs (the marker file is never written)."""
    from pipeline.errors import UsageError
    from pipeline.supplied.torch_sources import load_torchscript

    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(digits_model[0].eval()), str(good))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(), protocol=2)
            dst.writestr(item, data)
    assert load_torchscript(good) is not None
    with pytest.raises(UsageError, match=r"not a loadable TorchScript file \(Unknown type name .*system"):
        load_torchscript(bad)
    assert not marker.exists()


@pytest.mark.parametrize("source, content, message", [
    ("torchscript", b"not a zip archive", "not a loadable TorchScript file"),
    ("state_dict", None, "refused: the file holds Python objects other than tensors"),
])
def test_bad_supplied_file_is_one_line_exit_2(tmp_path, capsys, source, content, message):
    root = tmp_path / "ws"
    (root / "vendor").mkdir(parents=True)
    (root / "vendor" / "acme_net.py").write_text(FACTORY)
    if content is None:  # a pickle of a Python object where a state_dict belongs: never unpickled
        import collections
        torch.save({"weight": collections.OrderedDict(a=1), "note": object.__new__(zipfile.ZipInfo)},
                   str(root / "vendor" / "model.pt"))
    else:
        (root / "vendor" / "model.pt").write_bytes(content)
    model = {"source": source, "path": "vendor/model.pt"}
    if source == "state_dict":
        model.update(name="vendor.acme_net:build", layout="flat")
    _workspace(root, model)
    assert run_stage("prepare", root) == 0
    capsys.readouterr()
    assert run_stage("train", root) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (root / "models" / "model.pt").exists() and not (root / "metrics" / "train.json").exists()
