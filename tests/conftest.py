"""Shared fixtures: a tiny but complete workspace, and a quickly trained model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main as cli

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "seed": 0,
    "data": {"dataset": "digits", "max_samples": 400},
    "model": {"name": "mlp", "hidden": [32]},
    "threat": {"norm": "linf", "epsilon": 0.05, "features": None, "unlisted": None},
    "clinical": None,
    "runtime": {"device": "auto", "precision": "float32", "threads": None, "processes": 1, "workers": 0},
    "train": {"method": "pgd_at", "epochs": 4, "batch_size": 64, "lr": 0.005,
              "pgd": {"steps": 3, "step_size": 0.02}, "val_pgd": {"steps": 3, "step_size": 0.02}},
    "attack": {"attacks": ["fgsm", "pgd", "apgd_ce", "square"], "pgd": {"steps": 10, "step_size": 0.01, "restarts": 1},
               "apgd": {"steps": 20}, "square": {"queries": 200}, "sweep": {"points": 3}},
    "certify": {"methods": ["ibp", "crown"], "random_points": 4},
    "smoothing": {"n0": 20, "n": 200, "max_samples": 20, "alpha": 0.01},
    "conditions": {"max_samples": 40, "search": {"grid": 3, "random": 4, "steps": 3}, "certify": {"max_boxes": 8},
                   "threats": {"glare": {"kind": "brightness", "range": [-0.05, 0.05], "rationale": "sun glare"},
                               "jitter": {"kind": "translation", "pixels": 1, "rationale": "crop jitter"}}},
    "export": {"opset": 17},
    "properties": {"max_claims": 20},
    "gate": {"policy": "policies/tiny.yaml"},
    "register": {"model_name": "tiny-model"},
}

TINY_POLICY = {
    "name": "tiny",
    "requirements": [
        {"id": "ACC", "title": "Clean accuracy", "metric": "attack.clean_accuracy", "comparator": ">=",
         "threshold": 0.5, "clause": "test clause"},
        {"id": "VER", "title": "Verified", "metric": "certify.verified_accuracy.crown", "comparator": ">=",
         "threshold": 0.0, "bound": "lower", "clause": "test clause"},
        {"id": "ONNX", "title": "Parity", "metric": "export.max_abs_diff", "comparator": "<=",
         "threshold": 1e-4, "clause": "test clause"},
    ],
}


class Spectral(torch.nn.Module):
    """Uses an FFT: neither the TorchScript ONNX exporter nor auto_LiRPA can handle it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = torch.nn.Linear(33, num_classes)

    def forward(self, x):
        return self.fc(torch.fft.rfft(x.flatten(1)).abs())


SPECTRAL_MODULE = (
    "from tests.conftest import Spectral\n\n\n"
    "def build(input_shape, num_classes):\n"
    "    return Spectral(num_classes)\n"
)


def spectral_workspace(root: Path) -> Path:
    """A tiny workspace whose model is `spectral_model:build` (written into the workspace)."""
    import copy

    params = copy.deepcopy(TINY_PARAMS)
    params["model"] = {"name": "spectral_model:build"}
    make_workspace(root, params)
    (root / "spectral_model.py").write_text(SPECTRAL_MODULE)
    return root


def spectral_net() -> torch.nn.Module:
    return Spectral()


def make_workspace(root: Path, params: dict = TINY_PARAMS, policy: dict = TINY_POLICY) -> Path:
    """A workspace with the repo's templates and policies plus tiny params and policy."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "reports" / "templates", root / "reports" / "templates", dirs_exist_ok=True)
    shutil.copytree(REPO / "policies", root / "policies", dirs_exist_ok=True)
    (root / "policies" / "tiny.yaml").write_text(yaml.safe_dump(policy))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_stage(stage: str, root: Path) -> int:
    return cli([stage, "--workspace", str(root)])


@pytest.fixture(scope="session")
def pipeline_workspace(tmp_path_factory) -> Path:
    """Every stage up to the gate, run once in-process on the tiny config."""
    root = make_workspace(tmp_path_factory.mktemp("ws"))
    for stage in ("prepare", "train", "attack", "certify", "smooth", "conditions", "export", "report", "gate"):
        assert run_stage(stage, root) == 0, stage
    return root


@pytest.fixture(scope="session")
def digits_model():
    """A small MLP trained for a few seconds on digits, with its test data and domain."""
    from pipeline.data.datasets import load_dataset
    from pipeline.data.split import prepare
    from pipeline.models import mlp
    from pipeline.threat import Domain

    torch.manual_seed(0)
    data = prepare(load_dataset("digits"), 0.15, 0.25, seed=0)
    x = torch.as_tensor(data.x["train"])
    y = torch.as_tensor(data.y["train"])
    model = mlp((1, 8, 8), 10, hidden=(64,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    x_test = torch.as_tensor(data.x["test"][:200])
    y_test = torch.as_tensor(data.y["test"][:200])
    return model, x_test, y_test, Domain.from_arrays(data.lower, data.upper)
