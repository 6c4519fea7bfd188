"""Stage `train` with a supplied model (`model.source`: onnx | torchscript | state_dict): import it
instead of training.

Hash the file, record who supplied it and its SHA-256, check that it loads, that its
input and output shapes fit the prepared data (in `model.layout`), and that the torch
form every stage evaluates agrees with the supplied artifact on the test split (onnxruntime
on an ONNX file; the TorchScript module for its ONNX export's torch form; exit 1 otherwise:
the evidence would be about another model). A state_dict's torch form is the factory's
module with the weights, the supplied model itself. `models/model.pt` receives the file's
bytes unchanged, so the SHA-256 every later stage binds its evidence to is the supplied file's.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline import results
from pipeline.errors import ParityFailure
from pipeline.io import atomic_write, confine, sha256_file, write_json, write_text
from pipeline.results import ImportResult, dump
from pipeline.stages.common import load_data, seed_everything
from pipeline.supplied.model import load_source, not_differentiable
from pipeline.workspace import Workspace


def torch_gap(model, reference, x: np.ndarray) -> float:
    """Max |torch form - supplied artifact| on data-layout inputs `x`."""
    import torch

    with torch.no_grad():
        mine = model(torch.as_tensor(x, dtype=torch.float32)).numpy().reshape(len(x), -1)
    return float(np.abs(mine - reference(x)).max()) if len(x) else 0.0


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.model
    path = confine(cfg.path, ws.root, "model.path")
    data, _, data_fingerprint = load_data(ws, params)
    seed_everything(params.seed)
    input_shape = list(data.x["test"].shape[1:])
    loaded = load_source(path, cfg, input_shape, data.num_classes)
    digest = sha256_file(path)
    x_test = data.x["test"]
    gap = torch_gap(loaded.model, loaded.reference, x_test) if loaded.reference is not None else None
    if gap is not None and gap > params.export.atol:
        raise ParityFailure(f"{cfg.path}: the torch form differs from the supplied {cfg.source} model by {gap:.3g} on "
                            f"the test split (allowed export.atol = {params.export.atol}); nothing imported")
    content = path.read_bytes()
    ws.model_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(ws.checkpoint, lambda tmp: tmp.write_bytes(content))
    meta = {
        "schema_version": results.SCHEMA_VERSION, "source": cfg.source, "supplied_path": cfg.path,
        "supplier": cfg.supplier, "sha256": digest, "layout": cfg.layout, "input_shape": input_shape,
        "num_classes": data.num_classes, "method": "supplied", "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
    }
    write_text(ws.model_dir / "model.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_json(ws.train_plot, [])
    write_json(ws.metrics("train"), dump(ImportResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=digest, source=cfg.source,
        path=cfg.path, supplier=cfg.supplier, layout=cfg.layout, input_shape=input_shape,
        num_classes=data.num_classes, opset=loaded.opset, ops=loaded.ops, torch_form=loaded.torch_form,
        max_abs_diff=gap, n=len(x_test), not_differentiable=not_differentiable(loaded.model),
    )))
    parity = (f"torch form vs supplied model max|Δ| {gap:.2e} on {len(x_test)} test inputs" if gap is not None
              else f"no torch form ({not_differentiable(loaded.model)}): onnxruntime only"
              if not_differentiable(loaded.model) else "the torch form is the supplied module itself")
    print(f"train: imported {cfg.source} {cfg.path} (supplied by {cfg.supplier or 'unknown'}) sha256 {digest[:12]}, "
          f"{'ops' if loaded.opset is not None else 'modules'} {', '.join(loaded.ops)}; {parity}")
    return 0
