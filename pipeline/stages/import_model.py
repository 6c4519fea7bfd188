"""Stage `train` with `model.source: onnx`: import the supplied file instead of training.

Hash the file, record who supplied it and its SHA-256, check that it loads, that its
input and output shapes fit the prepared data (in `model.layout`), and that its torch
form agrees with onnxruntime on the test split (exit 1 otherwise: the evidence would
be about another model). `models/model.pt` receives the file's bytes unchanged, so the
SHA-256 every later stage binds its evidence to is the supplied file's own.
"""
from __future__ import annotations

from collections import Counter

from pipeline import results
from pipeline.errors import ParityFailure
from pipeline.io import atomic_write, confine, sha256_file, write_json, write_text
from pipeline.results import ImportResult, dump
from pipeline.stages.common import load_data, seed_everything
from pipeline.supplied.model import load_supplied, parity_gap
from pipeline.workspace import Workspace

TORCH_FORM = ("pipeline.supplied.onnx_torch: the ONNX graph interpreted with torch functions "
              "(constants folded, BatchNormalization folded into Conv), checked against onnxruntime")


def main(ws: Workspace) -> int:
    params = ws.params()
    cfg = params.model
    path = confine(cfg.path, ws.root, "model.path")
    data, _, data_fingerprint = load_data(ws, params)
    seed_everything(params.seed)
    input_shape = list(data.x["test"].shape[1:])
    model, runner, proto = load_supplied(path, cfg.layout, input_shape, data.num_classes)
    digest = sha256_file(path)
    x_test = data.x["test"]
    gap = parity_gap(model, runner, x_test)
    if gap > params.export.atol:
        raise ParityFailure(f"{cfg.path}: the torch form differs from onnxruntime by {gap:.3g} on the test split "
                            f"(allowed export.atol = {params.export.atol}); nothing imported")
    content = path.read_bytes()
    ws.model_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(ws.checkpoint, lambda tmp: tmp.write_bytes(content))
    meta = {
        "schema_version": results.SCHEMA_VERSION, "source": cfg.source, "supplied_path": cfg.path,
        "supplier": cfg.supplier, "sha256": digest, "layout": cfg.layout, "input_shape": input_shape,
        "num_classes": data.num_classes, "method": "supplied", "seed": params.seed,
        "dataset_fingerprint": data_fingerprint,
    }
    import json

    write_text(ws.model_dir / "model.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_json(ws.train_plot, [])
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    ops = sorted(Counter(node.op_type for node in proto.graph.node))
    write_json(ws.metrics("train"), dump(ImportResult(
        seed=params.seed, dataset_fingerprint=data_fingerprint, model_sha256=digest, source=cfg.source,
        path=cfg.path, supplier=cfg.supplier, layout=cfg.layout, input_shape=input_shape,
        num_classes=data.num_classes, opset=opset, ops=ops, torch_form=TORCH_FORM, max_abs_diff=gap,
        n=len(x_test),
    )))
    print(f"train: imported {cfg.path} (supplied by {cfg.supplier or 'unknown'}) sha256 {digest[:12]}, "
          f"ops {', '.join(ops)}; torch form vs onnxruntime max|Δ| {gap:.2e} on {len(x_test)} test inputs")
    return 0
