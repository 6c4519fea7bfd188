"""Issue 17: integer features handled as such. An adversarial example is an input, so a feature
declared integer takes integer values in it (the threat's `to_lattice`, applied to every attack's
final candidate); the complete MILP verification makes such features integer variables, so
"verified" is over the integer points of the box.

Before: `LpBall` had no `integer` mask and `to_lattice` did not exist (the attacks searched and
returned points of the continuous box), and `decide`/`min_margin` took no `integer` argument (the
MILP decided the continuous box only)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import parse_params
from pipeline.data.datasets import load_dataset
from pipeline.data.split import prepare
from pipeline.stages.attack import build_attacks
from pipeline.attacks.suite import robust_mask, run_suite
from pipeline.threat import Domain, LpBall, from_params
from tests.conftest import TINY_PARAMS

ATTACKS = ["fgsm", "pgd", "apgd_ce", "square"]


def tabular_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    with torch.no_grad():
        model[0].weight[:, 0] *= 3  # the integer feature matters: the attacks move it
    x = torch.cat([torch.randint(0, 10, (64, 1)).float(), torch.randn(64, 3)], dim=1)
    with torch.no_grad():
        y = model(x).argmax(1)  # every case correct on clean inputs: every case is attacked
    domain = Domain(torch.tensor([0.0, -5, -5, -5]), torch.tensor([9.0, 5, 5, 5]))
    scale = torch.tensor([2.7, 0.4, 0.4, 0.4])
    return model, x, y, domain, scale


def test_an_integer_feature_never_takes_a_non_integer_value_in_an_adversarial_example():
    model, x, y, domain, scale = tabular_case()
    threat = LpBall("linf", 1.0, scale=scale, integer=torch.tensor([True, False, False, False]))
    attack_cfg = parse_params({"attack": {"attacks": ATTACKS, "square": {"queries": 100}}}).attack
    attacks = build_attacks(attack_cfg, ATTACKS, 2)
    result = run_suite(model, attacks, x, y, threat, domain, 32, torch.Generator().manual_seed(0))
    moved = result.x_adv[:, 0] - x[:, 0]
    assert torch.equal(result.x_adv[:, 0], torch.round(result.x_adv[:, 0]))
    assert moved.abs().max() <= 2 and (moved != 0).any()  # within floor(2.7) and actually moved
    assert ((result.x_adv[:, 0] >= 0) & (result.x_adv[:, 0] <= 9)).all()  # inside the data range
    assert (result.x_adv[:, 1:] != torch.round(result.x_adv[:, 1:])).any()  # continuous ones are not rounded
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1), result.adv_pred)  # judged at the rounded point
    # robust_mask (sweeps, masking checks) judges rounded candidates too: never more broken than the suite
    kept = robust_mask(model, attacks[1], x, y, threat, domain, 32, torch.Generator().manual_seed(0))
    assert kept.dtype == torch.bool and len(kept) == len(x)


def test_without_integer_features_the_projection_is_the_identity():
    model, x, y, domain, scale = tabular_case()
    plain = LpBall("linf", 1.0, scale=scale)
    candidate = x + 0.3
    assert plain.to_lattice(candidate, x, domain) is candidate
    breast_cancer = prepare(load_dataset("breast_cancer"), 0.15, 0.25, seed=0)
    params = parse_params({**TINY_PARAMS, "data": {"dataset": "breast_cancer"}})
    assert from_params(params, breast_cancer).integer is None  # all continuous: nothing is rounded


def test_a_csv_integer_column_is_marked_integer_in_the_threat(tmp_path):
    rows = ["age,marker,dx"] + [f"{40 + i % 30},{i / 7:.3f},{i % 2}" for i in range(60)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    settings = {"dataset": "csv", "path": "t.csv", "csv": {"label_column": "dx", "feature_types": {"age": "integer"}}}
    params = parse_params({"data": settings, "threat": {"epsilon": 1.0}})
    data = prepare(load_dataset("csv", tmp_path / "t.csv", tmp_path, params.data.csv), 0.15, 0.25, seed=0)
    threat = from_params(params, data)
    assert threat.integer.tolist() == [True, False] and "integer features at integer values" in threat.describe()


def notch():
    """A 1-input network whose margin 4|x - 0.5| - 1 is negative only strictly between 0 and 1:
    over the box [-1, 1] a real input (0.5) flips it, no integer input does."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([-0.5, 0.5]))
        net[2].weight.copy_(torch.tensor([[4.0, 4.0], [0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([-1.0, 0.0]))
    return net


def test_milp_with_integer_variables_decides_a_case_the_continuous_box_does_not():
    from pipeline.certify.milp import COUNTEREXAMPLE, VERIFIED, affine_layers, decide, min_margin

    net = notch()
    x, y = torch.tensor([[0.0]]), torch.tensor([0])
    assert int(net(x).argmax(1)) == 0
    low, high = x - 1, x + 1
    continuous = decide(net, x, y, low, high, 2, time_limit=10)
    integer = decide(net, x, y, low, high, 2, time_limit=10, integer=torch.tensor([True]))
    assert continuous[0].status == COUNTEREXAMPLE  # x = 0.5 is inside the continuous box
    assert integer[0].status == VERIFIED  # -1, 0 and 1 all keep class 0
    _, value, _ = min_margin(affine_layers(net), np.array([-1.0]), np.array([1.0]), 0, 1, 10,
                             integer=np.array([True]))
    assert abs(value - 1.0) < 1e-6  # the exact minimum over {-1, 0, 1}: margin 1 at 0 and at 1
