"""No certificate on a layer auto_LiRPA 0.3 bounds unsoundly: a Linear/MatMul whose weight is
computed inside forward (`F.linear(x, self.w * 2)`, `x @ (a + b)`).

The first test shows why (auto_LiRPA's IBP lower bound lies above outputs that sampling reaches)
and then that BoundComputer refuses; both tests fail on the code before the guard: BoundComputer
built the module and certify bounded it as if sound.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.certify.bounds import BoundComputer, NotBoundable
from pipeline.threat import Domain
from tests.conftest import TINY_PARAMS, make_workspace, run_stage

FACTORY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Computed(nn.Module):
    def __init__(self, d, k, kind):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.kind = kind
        self.w = nn.Parameter(torch.randn(k, d, generator=generator) * 0.1)
        self.a = nn.Parameter(torch.randn(d, k, generator=generator) * 0.1)
        self.b = nn.Parameter(torch.randn(d, k, generator=generator) * 0.1)

    def forward(self, x):
        x = torch.flatten(x, 1)
        if self.kind == "scaled":
            return F.linear(x, self.w * 2)
        return x @ (self.a + self.b)


def build(input_shape, num_classes, kind="scaled"):
    d = 1
    for n in input_shape:
        d *= n
    return Computed(d, num_classes, kind)
'''


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x):
        return F.linear(torch.flatten(x, 1), self.w * 1.0)


def _domain():
    return Domain.from_arrays(np.zeros((1, 8, 8), np.float32), np.ones((1, 8, 8), np.float32))


def test_bound_computer_refuses_a_computed_weight():
    """Why (first): auto_LiRPA's IBP lower bound on Scaled lies above an output sampling reaches."""
    from pipeline import lirpa_compat

    lirpa = lirpa_compat.load()  # bridges numpy 2 before auto_LiRPA's own imports
    from auto_LiRPA.perturbations import PerturbationLpNorm

    model = Scaled().eval()
    x = torch.full((1, 1, 8, 8), 0.5)
    bounded = lirpa.BoundedModule(model, torch.zeros(1, 1, 8, 8))
    lower, _ = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=0.2)),),
                                      method="IBP")
    with torch.no_grad():
        sampled = model(x + (torch.rand(4000, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.2)
    assert bool((lower[0] > sampled.min(0).values + 1e-3).any())  # a "lower bound" above a reached output
    with pytest.raises(NotBoundable, match=r"MatMul node .* reads a weight computed in forward"):
        BoundComputer(Scaled(), (1, 8, 8), _domain())
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert BoundComputer(linear, (1, 8, 8), _domain()).bounded is not None  # a parameter weight is fine


@pytest.mark.parametrize("kind", ["scaled", "sum"])
def test_certify_is_not_applicable_for_a_computed_weight(tmp_path, kind):
    root = tmp_path / "ws"
    (root / "guarded").mkdir(parents=True)
    (root / "guarded" / f"computed_{kind}.py").write_text(FACTORY)
    namespace: dict = {}
    exec(FACTORY, namespace)  # the same factory, to write the weights file the workspace supplies
    torch.save(namespace["build"]((1, 8, 8), 10, kind).state_dict(), str(root / "guarded" / "weights.pt"))
    params = copy.deepcopy(TINY_PARAMS)
    params["model"] = {"source": "state_dict", "path": "guarded/weights.pt", "name": f"guarded.computed_{kind}:build",
                       "options": {"kind": kind}}
    make_workspace(root, params)
    for stage in ("prepare", "train", "attack", "certify"):
        assert run_stage(stage, root) == 0, stage
    certify = json.loads((root / "metrics" / "certify.json").read_text())
    assert certify["status"] == "not_applicable"
    assert "computed in forward" in certify["reason"] and "unsoundly" in certify["reason"]
    assert certify["verified_accuracy"]["crown"]["status"] == "not_applicable"
