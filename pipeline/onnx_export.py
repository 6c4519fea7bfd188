"""ONNX export and onnxruntime parity: the shipped file must behave like the evaluated model.

The TorchScript exporter is chosen explicitly (`dynamo=False`): torch >= 2.9
defaults to the dynamo exporter, and the exporter used is recorded in the
file's metadata and in the metrics.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

EXPORTER = "torchscript"


class ExportError(Exception):
    """The model could not be exported; the message names the operator where known."""


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path, opset: int, metadata: dict[str, str]) -> None:
    """Export with a dynamic batch axis, embed `metadata` and run the full ONNX checker."""
    import onnx

    model = model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.zeros(1, *input_shape),), str(path), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as error:  # torch raises several types; the first line names the operator
        raise ExportError(str(error).strip().splitlines()[0]) from error
    proto = onnx.load(str(path))
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    session = onnx_session(path)
    outputs = [session.run(["logits"], {"input": x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outputs)


def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(torch.as_tensor(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).numpy()


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "label_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "n": int(len(reference)),
    }


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def latency(model: nn.Module, path: Path, sample: np.ndarray, batch_sizes=(1, 256), budget_s: float = 2.0) -> dict:
    """Median latency of onnxruntime and torch eager, interleaved in one process, per batch size."""
    session = onnx_session(path)
    results = {}
    for batch in batch_sizes:
        x = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])).astype(np.float32))
        tensor = torch.as_tensor(x)

        def run_onnx():
            session.run(["logits"], {"input": x})

        def run_torch():
            with torch.no_grad():
                model(tensor)

        probe = _median_seconds(run_onnx, 3) + _median_seconds(run_torch, 3)
        repeats = int(max(5, min(200, budget_s / max(probe, 1e-6) / len(batch_sizes))))
        onnx_s, torch_s = _median_seconds(run_onnx, repeats), _median_seconds(run_torch, repeats)
        results[f"batch_{batch}"] = {
            "batch_size": batch,
            "repeats": repeats,
            "onnx_ms": onnx_s * 1e3,
            "torch_ms": torch_s * 1e3,
            "onnx_images_per_s": batch / onnx_s,
            "torch_images_per_s": batch / torch_s,
        }
    return results
