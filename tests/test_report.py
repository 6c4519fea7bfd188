"""The audit report: figures match the metrics, untrusted text is escaped, the PDF is real and
reproducible, and the manifest catches any changed byte."""
import json
import shutil
import subprocess

import pytest

from pipeline.cli import main as cli
from pipeline.report import render_html
from pipeline.stages.report import build_context
from pipeline.workspace import Workspace
from tests.conftest import run_stage

SECTIONS = ("1. Summary", "2. Identification and traceability", "3. Intended use and operating domain",
            "4. Threat model and perturbation budget", "5. Pre-registered acceptance criteria", "6. Empirical results",
            "7. Formal results", "8. Randomized smoothing", "9. Triggering conditions", "10. ONNX artifact",
            "11. Training", "12. Limitations and residual risk", "13. Change since the previously approved model",
            "14. Integrity", "15. Sign-off", "Appendix: adversarial examples")


@pytest.fixture
def workspace_copy(pipeline_workspace, tmp_path):
    root = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, root)
    return root


def test_report_shows_the_metrics_and_verdict(pipeline_workspace):
    html = (pipeline_workspace / "reports/build/report.html").read_text()
    attack = json.loads((pipeline_workspace / "metrics/attack.json").read_text())
    export = json.loads((pipeline_workspace / "metrics/export.json").read_text())
    certify = json.loads((pipeline_workspace / "metrics/certify.json").read_text())
    assert "Policy verdict: PASS" in html
    assert f"{100 * attack['robust_accuracy']['value']:.1f}%" in html
    lo, hi = attack["robust_accuracy"]["ci"]
    assert f"[{100 * lo:.1f}%, {100 * hi:.1f}%]" in html
    crown = certify["methods"]["crown"]["accuracy"]
    assert f"<td class=\"num\">{crown['successes']}</td><td class=\"num\">{crown['n'] - crown['successes']}</td>" in html
    assert export["onnx_sha256"] in html
    for section in SECTIONS:
        assert section in html
    assert "data:image/png;base64," in html and "src=\"http" not in html  # self-contained
    assert "Not stated in params.yaml" in html  # gaps shown, never invented
    assert "Randomized-smoothing certificates hold for the smoothed classifier" in html
    assert "not Gaussian noise at this σ" in html


def test_evidence_lists_every_figure_with_its_source(pipeline_workspace):
    evidence = json.loads((pipeline_workspace / "reports/build/evidence.json").read_text())
    figures = {f["figure"]: f for f in evidence["figures"]}
    attack = json.loads((pipeline_workspace / "metrics/attack.json").read_text())
    assert figures["attack.robust_accuracy.value"]["value"] == attack["robust_accuracy"]["value"]
    assert figures["attack.robust_accuracy.kind"]["value"] == "upper_bound"
    assert figures["attack.robust_accuracy.value"]["source"] == "metrics/attack.json"
    assert figures["certify.methods.crown.soundness.containment_violations"]["value"] == 0
    assert evidence["verdict"]["passed"] is True


def test_untrusted_text_is_escaped(workspace_copy):
    root = workspace_copy
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


def test_pdf_text_pages_and_reproducibility(workspace_copy, tmp_path):
    root = workspace_copy
    pdf = root / "reports/build/report.pdf"
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = text.count("\f")
    assert pages >= 4
    assert f"Page 1 of {pages}" in text and f"Page {pages} of {pages}" in text
    for section in ("Summary", "Formal results", "Sign-off", "Integrity"):
        assert section in text
    attack = json.loads((root / "metrics/attack.json").read_text())
    assert f"{100 * attack['robust_accuracy']['value']:.1f}%" in text
    subprocess.run(["pdftoppm", "-r", "30", "-png", "-f", "1", "-l", "2", str(pdf), str(tmp_path / "page")], check=True)
    images = sorted(tmp_path.glob("page-*.png"))
    assert len(images) == 2 and all(p.stat().st_size > 2000 for p in images)
    first = pdf.read_bytes()
    assert run_stage("report", root) == 0
    assert pdf.read_bytes() == first  # same evidence, byte-identical PDF


@pytest.mark.parametrize("profile,phrase", [("sotif", "ISO/SAE 21434"), ("medical", "IEC 62304 §5.8")])
def test_profiles(workspace_copy, profile, phrase):
    root = workspace_copy
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + f"report:\n  profile: {profile}\n")
    assert run_stage("report", root) == 0
    html = (root / "reports/build/report.html").read_text()
    assert phrase in html and "1. Summary" in html


def test_verify_detects_a_one_byte_change_in_any_artifact(workspace_copy, capsys):
    root = workspace_copy
    assert cli(["verify", str(root)]) == 0
    manifest = json.loads((root / "reports/build/manifest.json").read_text())
    assert {"models/model.onnx", "models/model.pt", "data/prepared/data.npz", "reports/build/report.pdf",
            "reports/build/evidence.json", "metrics/attack.json"} <= set(manifest["artifacts"])
    for name in manifest["artifacts"]:
        path = root / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        capsys.readouterr()
        assert cli(["verify", str(root)]) == 1, name
        assert f"MISMATCH {name}" in capsys.readouterr().out
        path.write_bytes(original)
    assert cli(["verify", str(root)]) == 0


def test_signed_manifest(workspace_copy, tmp_path, monkeypatch, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def keypair(name):
        key = Ed25519PrivateKey.generate()
        private = tmp_path / f"{name}.pem"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public = tmp_path / f"{name}.pub"
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        return private, public

    root = workspace_copy
    private, public = keypair("release")
    _, other_public = keypair("other")
    monkeypatch.setenv("ROBUSTGATE_SIGNING_KEY", str(private))
    assert run_stage("report", root) == 0
    assert (root / "reports/build/manifest.json.sig").is_file()
    capsys.readouterr()
    assert cli(["verify", str(root), "--public-key", str(public)]) == 0
    assert "pinned to the trusted key" in capsys.readouterr().out
    assert cli(["verify", str(root), "--public-key", str(other_public)]) == 1
    manifest = root / "reports/build/manifest.json"
    manifest.write_text(manifest.read_text().replace('"schema_version": 1', '"schema_version": 2'))
    capsys.readouterr()
    assert cli(["verify", str(root), "--public-key", str(public)]) == 1
    assert "signature does not verify" in capsys.readouterr().out
