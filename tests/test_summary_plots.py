"""`robustgate summary` (headline view) and `robustgate plots` (offline plot page)."""
import json
import re

from pipeline.cli import main as cli
from pipeline.summary import accuracy


def test_accuracy_reads_the_typed_shape_only():
    """Metrics are schema v2: a bare number with a sibling `_ci` is no accuracy any more (before:
    `accuracy(section, key)` also read that pre-schema shape)."""
    typed = {"status": "ok", "value": 0.5, "ci": [0.4, 0.6], "n": 100, "kind": "upper_bound"}
    assert accuracy(typed) == "0.500 [0.400, 0.600] n=100"
    assert accuracy({"status": "not_applicable", "reason": "no certifier"}) is None
    assert accuracy(0.5) is None and accuracy(None) is None


def test_summary_prints_a_dozen_headline_lines(pipeline_workspace, capsys):
    """Before: no such command; `dvc metrics show` printed hundreds of columns."""
    assert cli(["summary", "--workspace", str(pipeline_workspace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert 6 <= len(lines) <= 14, lines
    text = "\n".join(lines)
    attack = json.loads((pipeline_workspace / "metrics/attack.json").read_text())
    assert f"robust       {attack['robust_accuracy']['value']:.3f}" in text
    assert text.startswith("verdict      ") and "data         digits: 10 classes" in text
    # one line for the triggering conditions (before: none), robust / certified accuracy per condition
    conditions = json.loads((pipeline_workspace / "metrics/conditions.json").read_text())
    line = next(l for l in lines if l.startswith("conditions   "))
    for name in ("glare", "jitter"):
        record = conditions[name]
        certified = record["certified_accuracy"]
        shown = f"{certified['value']:.3f}" if certified["status"] == "ok" else "n/a"
        assert f"{name} {record['robust_accuracy']['value']:.3f}/{shown}" in line
    assert not any(l.startswith("clinical") for l in lines)  # not applicable to digits: no line


def test_summary_names_the_smoothed_certificate_of_a_condition():
    """Rotation has no deterministic certificate but may carry the smoothed classifier's; before, the
    summary printed "n/a" alone while the report showed the smoothed figure."""
    from pipeline.summary import _conditions

    smoothed = {"status": "ok", "value": 0.885}
    line = _conditions({"rotation": {"robust_accuracy": {"value": 0.915},
                                     "certified_accuracy": {"status": "not_applicable", "reason": "r"},
                                     "smoothed": {"certified_accuracy": smoothed}},
                        "n": 200})
    assert line == "conditions   robust/certified: rotation 0.915/n/a (smoothed classifier 0.885)"


def test_plots_page_is_self_contained(pipeline_workspace, capsys):
    """Before: only `dvc plots show`, whose page loads vega from a CDN (blank offline)."""
    assert cli(["plots", "--workspace", str(pipeline_workspace)]) == 0
    page = (pipeline_workspace / "reports/build/plots.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # train and attack sweep at least
    assert not re.search(r"(src|href)=\"?https?:", page) and "http://" not in page and "https://" not in page
    assert "plots/train.json" in page and "plots/attack_sweep.json" in page
