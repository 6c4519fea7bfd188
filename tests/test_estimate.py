"""The rough stage times `prepare` prints (issue 19: a user could not tell ten minutes from four hours)."""
from pipeline.config import parse_params
from pipeline.estimate import describe, estimate

SAMPLES = {"train": 1000, "val": 250, "test": 450}


def test_estimate_scales_with_the_work_and_skips_custom_models():
    base = parse_params({"model": {"name": "cnn_small"}, "train": {"epochs": 10}})
    longer = parse_params({"model": {"name": "cnn_small"}, "train": {"epochs": 40}})
    small = estimate(base, SAMPLES, (1, 8, 8))
    assert abs(estimate(longer, SAMPLES, (1, 8, 8))["train"] / small["train"] - 4) < 1e-9
    assert estimate(base, SAMPLES, (1, 28, 28))["attack"] > small["attack"]
    assert estimate(parse_params({"model": {"name": "my_models:build"}}), SAMPLES, (1, 8, 8)) is None
    assert describe({"train": 0.2, "attack": 30, "certify": 600, "smooth": 4 * 3600}) == \
        "train ~<1 s, attack ~30 s, certify ~10 min, smooth ~4.0 h"
