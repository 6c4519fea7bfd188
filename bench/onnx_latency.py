"""ONNX (onnxruntime CPU) against torch eager latency at batch 1 and 256, measured in one run."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.models import cnn_small
from pipeline.onnx_export import export_onnx, latency


def main() -> None:
    torch.manual_seed(0)
    for shape in ((1, 8, 8), (1, 28, 28)):
        model = cnn_small(shape, 10).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, shape, path, 17, {})
            timing = latency(model, path, np.random.rand(256, *shape).astype(np.float32), budget_s=4.0)
        for row in timing.values():
            print(f"cnn_small {shape} batch {row['batch_size']:>3}: onnxruntime {row['onnx_ms']:.3f} ms "
                  f"({row['onnx_images_per_s']:.0f} img/s), torch {row['torch_ms']:.3f} ms "
                  f"({row['torch_images_per_s']:.0f} img/s), torch/onnx {row['torch_ms'] / row['onnx_ms']:.2f}x")


if __name__ == "__main__":
    main()
