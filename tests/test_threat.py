"""The threat object: an L∞ ball with per-feature radii (measurement uncertainty in each feature's own
units, zero for a feature that cannot change) is respected by every attack and by the certificates."""
import pytest
import torch

from pipeline.attacks import FGSM, PGD
from pipeline.attacks.apgd import APGD
from pipeline.attacks.square import Square
from pipeline.certify.bounds import BoundComputer, margins_of
from pipeline.errors import UsageError
from pipeline.threat import Domain, LpBall


@pytest.fixture(scope="module")
def tabular():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(40, 6) * 4 - 2
    y = model(x).argmax(1)
    domain = Domain(torch.full((6,), -3.0), torch.full((6,), 3.0))
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.0, 1.0])  # features 2 and 4 are immutable
    return model, x, y, domain, LpBall("linf", 0.2, scale=scale)


@pytest.mark.parametrize("attack", [FGSM(), PGD(10, 0.05, 2), APGD(20, 1, "ce"), Square(100)], ids=lambda a: a.name)
def test_every_attack_stays_in_the_per_feature_box(tabular, attack):
    model, x, y, domain, threat = tabular
    raw = attack.run(model, x, y, threat, domain, torch.Generator().manual_seed(0))  # before the base projects
    radius = threat.radius(x)
    assert ((raw - x).abs() <= radius + 1e-6).all()
    assert torch.equal(raw[:, [2, 4]], x[:, [2, 4]])  # immutable features never move
    assert domain.contains(raw, tol=1e-6)


def test_attacks_use_the_whole_budget_of_each_feature(tabular):
    model, x, y, domain, threat = tabular
    start = threat.random_start(x, domain, torch.Generator().manual_seed(0))
    moved = (start - x).abs().amax(dim=0)
    assert moved[3] > 0.25 and moved[0] > 0.1 and moved[1] <= 0.1 + 1e-6  # feature 3 may move 2·ε


def test_certificate_over_the_per_feature_box_contains_random_points(tabular):
    model, x, y, domain, threat = tabular
    lower, upper = BoundComputer(model, (6,), domain).margin_bounds(x, y, threat, "crown", 3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        margin = margins_of(model(threat.random_start(x, domain, gen)), y)
        assert (margin >= lower - 1e-4).all() and (margin <= upper + 1e-4).all()
    wider = BoundComputer(model, (6,), domain).margin_bounds(x, y, LpBall("linf", 0.2 * 2), "crown", 3)[0]
    assert (lower >= wider - 1e-5).all()  # the per-feature box lies inside the plain 2ε box


def test_a_scale_needs_linf_and_non_negative_radii():
    with pytest.raises(UsageError):
        LpBall("l2", 0.1, scale=torch.ones(3))
    with pytest.raises(UsageError):
        LpBall("linf", 0.1, scale=torch.tensor([1.0, -1.0]))
