"""`robustgate summary` (headline view) and `robustgate plots` (offline plot page)."""
import json
import re

from pipeline.cli import main as cli
from pipeline.summary import accuracy


def test_accuracy_reads_both_metric_shapes():
    assert accuracy({"robust_accuracy": 0.5, "robust_accuracy_ci": [0.4, 0.6], "n": 100}, "robust_accuracy") == \
        "0.500 [0.400, 0.600] n=100"
    typed = {"robust_accuracy": {"value": 0.5, "ci": [0.4, 0.6], "n": 100, "kind": "upper_bound"}}
    assert accuracy(typed, "robust_accuracy") == "0.500 [0.400, 0.600] n=100"
    assert accuracy({"verified_accuracy": {"crown": "not_applicable"}}, "verified_accuracy", "crown") is None


def test_summary_prints_a_dozen_headline_lines(pipeline_workspace, capsys):
    """Before: no such command; `dvc metrics show` printed hundreds of columns."""
    assert cli(["summary", "--workspace", str(pipeline_workspace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert 6 <= len(lines) <= 14, lines
    text = "\n".join(lines)
    attack = json.loads((pipeline_workspace / "metrics/attack.json").read_text())
    robust = attack["robust_accuracy"]
    robust = robust["value"] if isinstance(robust, dict) else robust
    assert f"robust       {robust:.3f}" in text
    assert text.startswith("verdict      ") and "data         digits: 10 classes" in text


def test_plots_page_is_self_contained(pipeline_workspace, capsys):
    """Before: only `dvc plots show`, whose page loads vega from a CDN (blank offline)."""
    assert cli(["plots", "--workspace", str(pipeline_workspace)]) == 0
    page = (pipeline_workspace / "reports/build/plots.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # train and attack sweep at least
    assert not re.search(r"(src|href)=\"?https?:", page) and "http://" not in page and "https://" not in page
    assert "plots/train.json" in page and "plots/attack_sweep.json" in page
