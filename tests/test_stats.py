import pytest
from scipy.stats import binomtest

from pipeline.stats import clopper_pearson, proportion


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (348, 450), (1, 1000)])
def test_matches_scipy_exact_interval(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    lower, upper = clopper_pearson(k, n)
    assert lower == pytest.approx(expected.low, abs=1e-9)
    assert upper == pytest.approx(expected.high, abs=1e-9)
    assert 0.0 <= lower <= k / n <= upper <= 1.0


def test_known_value():
    lower, upper = clopper_pearson(0, 10)
    assert lower == 0.0
    assert upper == pytest.approx(0.30850, abs=1e-4)


def test_proportion_record():
    record = proportion(9, 10)
    assert record["value"] == 0.9 and record["n"] == 10 and record["successes"] == 9
    assert record["ci"][0] < 0.9 < record["ci"][1]


@pytest.mark.parametrize("k,n", [(-1, 10), (11, 10), (0, 0)])
def test_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError):
        clopper_pearson(k, n)
