import json

import pytest
import torch

from pipeline.errors import UsageError
from pipeline.models import build_model, load_checkpoint, save_checkpoint


def meta_for(name, options, shape=(1, 8, 8)):
    return {"model": name, "model_options": options, "input_shape": list(shape), "num_classes": 10}


@pytest.mark.parametrize("name,options", [("mlp", {"hidden": [16]}), ("cnn_small", {"channels": [4, 8], "dense": 16}),
                                          ("cnn_medium", {"channels": [4, 8], "dense": 16})])
def test_checkpoint_roundtrip(tmp_path, name, options):
    model = build_model(name, (1, 8, 8), 10, options)
    save_checkpoint(model, tmp_path, meta_for(name, options))
    loaded, meta = load_checkpoint(tmp_path, name, options, (1, 8, 8), 10)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert meta["model"] == name


def test_architecture_mismatch_is_a_clear_error(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, {"hidden": [16]})
    save_checkpoint(model, tmp_path, meta_for("mlp", {"hidden": [32]}))
    with pytest.raises(UsageError, match="does not match model 'mlp'"):
        load_checkpoint(tmp_path, "mlp", {"hidden": [32]}, (1, 8, 8), 10)


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(input_shape, num_classes, width=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, num_classes))\n"
        "def wrong(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:tiny", (1, 8, 8), 10, {"width": 4})
    assert model[1].out_features == 4
    with pytest.raises(UsageError, match="output shape"):
        build_model("my_models:wrong", (1, 8, 8), 10, {})
    with pytest.raises(UsageError, match="no callable"):
        build_model("my_models:absent", (1, 8, 8), 10, {})


def test_cnn_needs_images():
    with pytest.raises(UsageError, match="needs image inputs"):
        build_model("cnn_small", (30,), 2, {})


def test_checkpoint_is_plain_tensors(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, {"hidden": [8]})
    save_checkpoint(model, tmp_path, meta_for("mlp", {"hidden": [8]}))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert json.loads((tmp_path / "model.json").read_text())["num_classes"] == 10
