import json
import shutil

from pipeline.stages.report import build_context
from pipeline.report import render_html
from pipeline.workspace import Workspace
from tests.conftest import run_stage


def test_report_shows_the_metrics_and_verdict(pipeline_workspace):
    html = (pipeline_workspace / "reports/build/report.html").read_text()
    attack = json.loads((pipeline_workspace / "metrics/attack.json").read_text())
    export = json.loads((pipeline_workspace / "metrics/export.json").read_text())
    assert "Policy verdict: PASS" in html
    assert f"{100 * attack['robust_accuracy']:.1f}%" in html
    lo, hi = attack["robust_accuracy_ci"]
    assert f"[{100 * lo:.1f}%, {100 * hi:.1f}%]" in html
    assert export["onnx_sha256"] in html
    for section in ("Summary", "Identification and traceability", "Threat model", "Acceptance criteria",
                    "Formal verification", "ONNX artifact", "Limitations", "Integrity", "Sign-off"):
        assert section in html
    assert "data:image/png;base64," in html  # plots embedded, file is self-contained
    assert "Not stated in params.yaml" in html  # gaps shown, never invented


def test_untrusted_text_is_escaped(pipeline_workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    meta_path = root / "models" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "<script>alert('pwned')</script>"
    meta_path.write_text(json.dumps(meta))
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params + "report:\n  title: <b onmouseover=x>title</b>\n")
    assert run_stage("report", root) == 0
    html = (root / "reports/build/report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    assert "<b onmouseover" not in html


def test_context_verdict_matches_gate(pipeline_workspace):
    context = build_context(Workspace.at(pipeline_workspace))
    gate = json.loads((pipeline_workspace / "metrics/gate.json").read_text())
    assert context["verdict"].passed == gate["passed"]
    assert render_html(pipeline_workspace / "reports/templates", context).startswith("<!DOCTYPE html>")
