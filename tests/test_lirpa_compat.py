"""The auto-LiRPA 0.3 bridge: bounds from IBP and CROWN must contain every reachable output."""
import sys

import pytest
import torch
from torch import nn

from pipeline import lirpa_compat


@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    ).eval()


def test_bridges_are_installed():
    lirpa = lirpa_compat.load()
    assert "numpy.lib.arraysetops" in sys.modules
    assert hasattr(torch._C.Node, "__getitem__")
    assert sys.modules["torch._six"].string_classes == (str, bytes)
    assert lirpa_compat.load() is lirpa  # idempotent


@pytest.mark.parametrize("method", ["IBP", "CROWN"])
def test_bounds_contain_random_points_in_the_ball(conv_net, method):
    from auto_LiRPA.perturbations import PerturbationLpNorm

    lirpa = lirpa_compat.load()
    torch.manual_seed(1)
    x = torch.rand(4, 1, 8, 8)
    eps = 0.05
    bounded = lirpa.BoundedModule(conv_net, torch.zeros(1, 1, 8, 8), device="cpu")
    ptb = PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    lower, upper = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method=method)
    assert (upper - lower).min() >= 0
    points = 1000
    noise = (torch.rand(points, *x.shape) * 2 - 1) * eps
    probes = (x.unsqueeze(0) + noise).clamp(0, 1)  # inside the ball and the domain
    with torch.no_grad():
        outputs = conv_net(probes.reshape(-1, 1, 8, 8)).reshape(points, 4, 10)
    assert (outputs >= lower - 1e-5).all()
    assert (outputs <= upper + 1e-5).all()
    # the bound is not vacuous: it is finite and narrower than the whole output range
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()


def test_named_parameters_through_bounded_module(conv_net):
    lirpa = lirpa_compat.load()
    bounded = lirpa.BoundedModule(conv_net, torch.zeros(1, 1, 8, 8), device="cpu")
    assert len(list(bounded.named_parameters())) == len(list(conv_net.parameters()))


def test_import_leaves_the_process_warning_filters_alone():
    import importlib
    import warnings

    before = list(warnings.filters)
    for name in [m for m in sys.modules if m == "auto_LiRPA" or m.startswith("auto_LiRPA.")]:
        del sys.modules[name]
    lirpa_compat._BRIDGED = False
    lirpa = lirpa_compat.load()
    assert warnings.filters == before
    assert importlib.import_module("auto_LiRPA") is lirpa
