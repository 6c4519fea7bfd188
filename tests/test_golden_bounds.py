"""Golden values of IBP, CROWN-IBP and CROWN margin bounds on a fixed small network.

A bound that silently turns looser (or wrong) after an auto_LiRPA, torch or bridge change still
passes the soundness tests, which only ask that bounds contain the attacked margins; it fails
here. The weights and inputs come from a seeded generator (deterministic on CPU); the reference
values live in tests/golden/bounds.json. After a change you have reviewed, regenerate them with

    ROBUSTGATE_REGENERATE_GOLDEN=1 pytest tests/test_golden_bounds.py

and commit the new file with the reason. IBP is also recomputed here by plain interval
arithmetic, so the golden IBP values are not merely whatever auto_LiRPA once returned.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.certify.bounds import BoundComputer, specification
from pipeline.threat import Domain, LpBall

GOLDEN = Path(__file__).parent / "golden" / "bounds.json"
REGENERATE = os.environ.get("ROBUSTGATE_REGENERATE_GOLDEN") == "1"
CASES = [(norm, eps, method) for norm, eps in (("linf", 0.04), ("l2", 0.25)) for method in ("ibp", "crown_ibp", "crown")]
RTOL, ATOL = 1e-5, 1e-6


def fixed_network() -> nn.Module:
    """Conv, ReLU, dense, ReLU, dense: every layer type of the built-in CNNs, 4 classes."""
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 4))
    gen = torch.Generator().manual_seed(20261125)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.5)
    return net.eval()


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.rand(5, 1, 6, 6, generator=gen), torch.tensor([0, 1, 2, 3, 1])


DOMAIN = Domain(torch.zeros(1, 6, 6), torch.ones(1, 6, 6))


@pytest.fixture(scope="module")
def computed() -> dict:
    x, y = fixed_inputs()
    computer = BoundComputer(fixed_network(), (1, 6, 6), DOMAIN)
    out = {}
    for norm, eps, method in CASES:
        lower, upper = computer.margin_bounds(x, y, LpBall(norm, eps), method, 4)
        out[f"{norm}/{method}"] = {"epsilon": eps, "lower": lower.tolist(), "upper": upper.tolist()}
    return out


@pytest.fixture(scope="module")
def golden(computed) -> dict:
    if REGENERATE:
        import auto_LiRPA

        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"generated_with": {"torch": torch.__version__,
                                                         "auto_LiRPA": getattr(auto_LiRPA, "__version__", "?")},
                                      "cases": computed}, indent=1) + "\n")
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("norm,eps,method", CASES, ids=[f"{n}-{m}" for n, _, m in CASES])
def test_bounds_match_the_golden_values(computed, golden, norm, eps, method):
    key = f"{norm}/{method}"
    assert golden[key]["epsilon"] == eps
    for side in ("lower", "upper"):
        torch.testing.assert_close(torch.tensor(computed[key][side]), torch.tensor(golden[key][side]),
                                   rtol=RTOL, atol=ATOL, msg=lambda m: f"{key} {side} bound moved: {m}")


def interval_bounds(net: nn.Sequential, x, y, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IBP by hand: the first layer's box from the input ball (L∞ clipped to the domain; L2 by the
    dual norm of each weight row), then interval arithmetic, with the specification folded into
    the last layer as auto_LiRPA does."""
    conv, _, _, dense, _, last = net
    c = specification(y, 4)  # (N, 3, 4)
    if norm == "linf":
        low, high = DOMAIN.clamp(x - eps), DOMAIN.clamp(x + eps)
        mid, rad = (high + low) / 2, (high - low) / 2
        centre = conv(mid)
        radius = nn.functional.conv2d(rad, conv.weight.abs())
    else:
        centre = conv(x)
        row_norms = conv.weight.flatten(1).norm(dim=1)  # each output is one weight row against a patch
        radius = eps * row_norms.view(1, -1, 1, 1).expand_as(centre)
    low, high = (centre - radius).relu().flatten(1), (centre + radius).relu().flatten(1)
    mid, rad = (high + low) / 2, (high - low) / 2
    mid, rad = dense(mid), rad @ dense.weight.abs().T
    low, high = (mid - rad).relu(), (mid + rad).relu()
    mid, rad = (high + low) / 2, (high - low) / 2
    weight = c @ last.weight  # (N, 3, 12)
    bias = c @ last.bias
    centre = torch.einsum("nkh,nh->nk", weight, mid) + bias
    radius = torch.einsum("nkh,nh->nk", weight.abs(), rad)
    return centre - radius, centre + radius


@pytest.mark.parametrize("norm,eps", [("linf", 0.04), ("l2", 0.25)])
def test_golden_ibp_is_plain_interval_arithmetic(golden, norm, eps):
    x, y = fixed_inputs()
    with torch.no_grad():
        lower, upper = interval_bounds(fixed_network(), x, y, eps, norm)
    torch.testing.assert_close(lower, torch.tensor(golden[f"{norm}/ibp"]["lower"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(upper, torch.tensor(golden[f"{norm}/ibp"]["upper"]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_golden_bounds_are_neither_trivial_nor_vacuous(golden, norm):
    """The fixed case is informative: CROWN is tighter than IBP somewhere, and the clean margins lie
    strictly inside every bound (a regenerated file of zeros or infinities would fail here)."""
    x, y = fixed_inputs()
    with torch.no_grad():
        clean = torch.einsum("nck,nk->nc", specification(y, 4), fixed_network()(x))
    for method in ("ibp", "crown_ibp", "crown"):
        lower, upper = (torch.tensor(golden[f"{norm}/{method}"][side]) for side in ("lower", "upper"))
        assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
        assert (lower < clean).all() and (clean < upper).all()
    ibp, crown = torch.tensor(golden[f"{norm}/ibp"]["lower"]), torch.tensor(golden[f"{norm}/crown"]["lower"])
    assert (crown > ibp + 1e-3).any()
