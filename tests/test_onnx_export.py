"""ONNX export: the file behaves like the model, carries its metadata, and failures name the operator."""
import numpy as np
import onnx
import pytest
import torch

from pipeline.onnx_export import ExportError, export_onnx, latency, onnx_logits, parity, torch_logits
from tests.conftest import spectral_net


def test_parity_dynamic_batch_and_metadata(tmp_path, digits_model):
    model, x, _, _ = digits_model
    path = tmp_path / "m.onnx"
    export_onnx(model, (1, 8, 8), path, 17, {"robustgate.norm": "linf"})
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props} == {"robustgate.norm": "linf"}
    assert proto.opset_import[0].version == 17
    for batch in (1, 7, 200):  # dynamic batch axis
        result = parity(torch_logits(model, x[:batch].numpy()), onnx_logits(path, x[:batch].numpy()))
        assert result["max_abs_diff"] < 1e-4 and result["label_agreement"] == 1.0 and result["n"] == batch


def test_unexportable_operator_is_named(tmp_path):
    with pytest.raises(ExportError, match="aten::fft_rfft"):
        export_onnx(spectral_net().eval(), (1, 8, 8), tmp_path / "m.onnx", 17, {})


def test_latency_reports_both_runtimes(tmp_path, digits_model):
    model, x, _, _ = digits_model
    path = tmp_path / "m.onnx"
    export_onnx(model, (1, 8, 8), path, 17, {})
    timing = latency(model, path, x.numpy(), batch_sizes=(1, 4), budget_s=0.05)
    assert set(timing) == {"batch_1", "batch_4"}
    for row in timing.values():
        assert row["onnx_ms"] > 0 and row["torch_ms"] > 0
        assert row["onnx_images_per_s"] == pytest.approx(row["batch_size"] / row["onnx_ms"] * 1e3)


def test_parity_detects_a_different_model(tmp_path, digits_model):
    model, x, _, _ = digits_model
    path = tmp_path / "m.onnx"
    export_onnx(model, (1, 8, 8), path, 17, {})
    with torch.no_grad():
        model[1].bias += 0.5  # the "evaluated" model drifts from the exported file
    try:
        result = parity(torch_logits(model, x.numpy()), onnx_logits(path, x.numpy()))
        assert result["max_abs_diff"] > 0.4
    finally:
        with torch.no_grad():
            model[1].bias -= 0.5
    assert np.isfinite(result["max_abs_diff"])
