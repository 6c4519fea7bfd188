"""A supplied model as the model every stage evaluates (`load_source`, by `model.source`).

The pipeline's data is (C, H, W) (or (D,)) per sample; a supplied file may read
NCHW, NHWC or flattened inputs (`model.layout`). `SuppliedModel` adapts the data
to an ONNX file's layout and runs the file's torch form, so attacks and bounds work
on it; onnxruntime on the file stays the judge (`runner_logits`). A file with an op the
torch form lacks runs as `OnnxRuntimeForward` (forward passes only); TorchScript and
state_dict sources are read by pipeline/supplied/torch_sources.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.supplied.onnx_torch import OnnxModule, OnnxRunner, Unsupported, load_onnx, to_torch


def file_shape(data_shape: Sequence[int], layout: str) -> tuple[int, ...]:
    """The per-sample input shape the file must declare for data of `data_shape` in `layout`."""
    data_shape = tuple(int(d) for d in data_shape)
    if layout == "flat":
        return (int(np.prod(data_shape)),)
    if layout == "nhwc":
        if len(data_shape) != 3:
            raise UsageError(f"model.layout = 'nhwc' needs image data (C, H, W); the data has shape {data_shape}")
        return (data_shape[1], data_shape[2], data_shape[0])
    return data_shape


class SuppliedModel(nn.Module):
    """Data-layout input -> the file's layout -> the file's torch form -> (N, K) outputs."""

    def __init__(self, graph: OnnxModule, layout: str):
        super().__init__()
        self.graph, self.layout = graph, layout

    def to_file_layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "flat":
            return torch.flatten(x, 1)
        if self.layout == "nhwc":
            return x.permute(0, 2, 3, 1)
        return x

    def forward(self, x):
        if self.layout == "nhwc" and self.graph.input_perm == (0, 3, 1, 2):  # the file's own Transpose undoes
            return torch.flatten(self.graph.core()(x), 1)  # ours: bound the graph after it, on the data as is
        return torch.flatten(self.graph(self.to_file_layout(x)), 1)


class OnnxRuntimeForward(nn.Module):
    """A supplied file whose graph has an op the torch form lacks, run by onnxruntime: forward passes
    only (logits as a torch tensor, no gradient). What needs nothing but forward passes still runs on
    the file itself (Square, randomized smoothing, clean accuracy); what needs gradients reads
    `not_differentiable`, what needs bound propagation `not_boundable` (the op, named), and reports
    not_applicable."""

    def __init__(self, runner: OnnxRunner, layout: str, reason: str):
        super().__init__()
        self.runner, self.layout, self.not_differentiable = runner, layout, reason
        self.not_boundable = f"no torch form to bound: {reason}"

    to_file_layout = SuppliedModel.to_file_layout

    def forward(self, x):
        file_x = self.to_file_layout(x.detach().float().cpu()).contiguous().numpy()
        return torch.as_tensor(self.runner(file_x).reshape(len(x), -1), device=x.device)


def not_differentiable(model: nn.Module) -> Optional[str]:
    """Why gradients and bounds cannot run on `model` (an op the torch form lacks), or None."""
    return getattr(model, "not_differentiable", None)


def _forward_only(path, runner_source, proto, layout: str, want, num_classes: int, reason: str):
    """onnxruntime on the file as the model, after the same shape checks as the torch form's."""
    from pipeline.supplied.onnx_torch import io_shapes

    try:
        input_shape, output_shape = io_shapes(proto)
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    if tuple(input_shape) != tuple(want):
        raise UsageError(f"{path}: input shape {list(input_shape)} per sample; the data in layout {layout!r} "
                         f"gives {list(want)} (set model.layout to the file's layout)")
    outputs = int(np.prod(output_shape)) if output_shape else 1
    if outputs != num_classes:
        raise UsageError(f"{path}: {outputs} outputs per sample; the data has {num_classes} classes")
    runner = OnnxRunner(runner_source)
    return OnnxRuntimeForward(runner, layout, reason).eval(), runner, proto


def load_supplied(path: Path, layout: str, data_shape: Sequence[int], num_classes: int,
                  proto=None, forward_only: bool = False) -> tuple[nn.Module, OnnxRunner, object]:
    """The supplied file's torch form adapted to the data, with onnxruntime on the file; bad input
    (not loadable, several inputs, an op the torch form lacks, shapes that do not fit) is one line.
    `forward_only`: an op the torch form lacks gives `OnnxRuntimeForward` instead (the stages then
    evaluate what forward passes allow; `robustgate prove` keeps refusing such a file).
    `proto`: an ONNX model already in memory (a TorchScript module's export), named `path` in messages."""
    runner_source = proto.SerializeToString() if proto is not None else path
    proto = proto if proto is not None else load_onnx(path)
    want = file_shape(data_shape, layout)
    try:
        graph = to_torch(proto)
    except Unsupported as error:
        if not forward_only:
            raise UsageError(f"{path}: {error}") from None
        reason = str(error).split("; supported:")[0]  # the op and node, not the converter's whole list
        return _forward_only(path, runner_source, proto, layout, want, num_classes, reason)
    if tuple(graph.input_shape) != want:
        raise UsageError(f"{path}: input shape {list(graph.input_shape)} per sample; the data in layout {layout!r} "
                         f"gives {list(want)} (set model.layout to the file's layout)")
    outputs = int(np.prod(graph.output_shape)) if graph.output_shape else 1
    if outputs != num_classes:
        raise UsageError(f"{path}: {outputs} outputs per sample; the data has {num_classes} classes")
    return SuppliedModel(graph, layout).eval(), OnnxRunner(runner_source), proto


def runner_logits(model: SuppliedModel, runner: OnnxRunner, x: np.ndarray) -> np.ndarray:
    """onnxruntime's outputs on data-layout inputs, as (N, K)."""
    with torch.no_grad():
        file_x = model.to_file_layout(torch.as_tensor(x, dtype=torch.float32)).contiguous().numpy()
    return runner(file_x).reshape(len(x), -1)


TORCH_FORMS = {
    "onnx": "pipeline.supplied.onnx_torch: the ONNX graph interpreted with torch functions (constants folded, "
            "BatchNormalization folded into Conv), checked against onnxruntime on the file",
    "torchscript": "the TorchScript module exported to ONNX (torch.onnx) and interpreted with torch functions "
                   "(pipeline.supplied.onnx_torch), checked against the TorchScript module and onnxruntime",
    "state_dict": "the factory's nn.Module with the supplied weights (loaded with weights_only=True): the "
                  "evidence is on this torch form; export checks the shipped ONNX file against it",
}


@dataclass(frozen=True)
class LoadedSource:
    """A supplied model as every stage evaluates it (`model`: data-layout inputs -> (N, K) logits),
    with what the import records: the ONNX ops and opset of the form bounds see (None for a plain
    torch module) and `reference`, the supplied artifact itself run on data-layout inputs, which the
    torch form must match (None when the torch form is the supplied module itself)."""

    model: nn.Module
    reference: Optional[Callable[[np.ndarray], np.ndarray]]
    ops: list[str]
    opset: Optional[int]
    torch_form: str


def _opset(proto) -> Optional[int]:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def load_source(path: Path, cfg, data_shape: Sequence[int], num_classes: int) -> LoadedSource:
    """The file `path` as model.source `cfg.source` reads it (see pipeline/supplied/torch_sources.py)."""
    from pipeline.supplied import torch_sources

    want = file_shape(data_shape, cfg.layout)
    if cfg.source == "onnx":
        model, runner, proto = load_supplied(path, cfg.layout, data_shape, num_classes, forward_only=True)
        ops, opset = sorted({n.op_type for n in proto.graph.node}), _opset(proto)
        if not_differentiable(model):  # the file itself is the model: nothing to compare it with
            return LoadedSource(model, None, ops, opset, f"none: {not_differentiable(model)}; onnxruntime on the "
                                "file answers forward passes only (no gradients, no bounds)")
        return LoadedSource(model, lambda x: runner_logits(model, runner, x), ops, opset, TORCH_FORMS["onnx"])
    if cfg.source == "torchscript":
        import onnx

        script = torch_sources.load_torchscript(path)
        torch_sources.check_outputs(script, want, num_classes, str(path))
        proto = onnx.load_from_string(torch_sources.torchscript_to_onnx(script, want))
        model, _, _ = load_supplied(path, cfg.layout, data_shape, num_classes, proto=proto, forward_only=True)
        ops, opset = sorted({n.op_type for n in proto.graph.node}), _opset(proto)
        if not_differentiable(model):  # its export has an op without a torch form: the module itself, unbounded
            form = torch_sources.script_form(script, cfg.layout, not_differentiable(model))
            return LoadedSource(form, None, ops, opset, f"the TorchScript module itself (gradients, no bounds: "
                                f"{form.not_boundable})")
        scripted = torch_sources.adapt_layout(script, cfg.layout)

        def reference(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return scripted(torch.as_tensor(x, dtype=torch.float32)).numpy().reshape(len(x), -1)
        return LoadedSource(model, reference, ops, opset, TORCH_FORMS["torchscript"])
    net = torch_sources.load_state_dict_model(path, cfg.name, cfg.factory_options(), want, num_classes)
    model = torch_sources.adapt_layout(net, cfg.layout).eval()
    kinds = sorted({type(m).__name__ for m in net.modules() if not list(m.children())})
    return LoadedSource(model, None, kinds, None, TORCH_FORMS["state_dict"])
