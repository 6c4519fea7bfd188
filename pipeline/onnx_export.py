"""ONNX export and onnxruntime parity: the shipped file must behave like the evaluated model.

The TorchScript exporter is chosen explicitly (`dynamo=False`): torch >= 2.9
defaults to the dynamo exporter, and the exporter used is recorded in the
file's metadata and in the metrics.
"""
from __future__ import annotations

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


def onnx_logits(path: Path, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
