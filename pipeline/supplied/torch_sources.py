"""Supplied torch models: a TorchScript file, or a state_dict for a `module:callable` factory.

TorchScript (`torch.jit.load`) is not pickle: the archive's `data.pkl`/`constants.pkl` are read
by TorchScript's own unpickler, whose type resolver only knows tensors, containers and classes
compiled into the archive (`__torch__.*`); a reference to any other Python global (`os.system`,
`builtins.eval`) is refused with an error, and the archive's code is TorchScript, which runs
TorchScript ops, not Python (tests/test_torch_sources.py loads an archive whose data.pkl names
`os.system` and sees it refused). auto_LiRPA cannot trace a loaded ScriptModule ("not part of
the active trace"), so a TorchScript model is exported to ONNX here and evaluated as the torch form
of that export (pipeline/supplied/onnx_torch.py), checked against the TorchScript module itself.

A state_dict is loaded with `torch.load(weights_only=True)` (pipeline.models.load_weights: plain
tensors only, nothing executed) into the factory `model.name`, whose code is the user's own
module, like a trained `module:callable` model; gradients and bounds run on it directly.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from pipeline.errors import UsageError, first_line



class FlatInput(nn.Module):
    """Data (N, C, H, W) -> (N, C·H·W) -> the supplied module: a model that reads flattened inputs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.flatten(x, 1))


class ScriptForm(nn.Module):
    """A TorchScript module whose ONNX export holds an op the torch form lacks: attacks take its
    gradients, and what needs bounds reads `not_boundable` (auto_LiRPA cannot trace a loaded
    TorchScript module, and its export has no torch form) and reports not_applicable."""

    def __init__(self, script: nn.Module, layout: str, reason: str):
        super().__init__()
        self.script, self.layout = script, layout
        self.not_boundable = ("auto_LiRPA cannot trace a TorchScript module, and its ONNX export has no torch "
                              f"form: {reason}")

    def forward(self, x):
        if self.layout == "flat":
            x = torch.flatten(x, 1)
        return self.script(x)


def script_form(script: nn.Module, layout: str, reason: str) -> nn.Module:
    """`ScriptForm` compiled to TorchScript itself, so torch.onnx can export it (tracing cannot enter
    the loaded module from a Python wrapper); `not_boundable` stays readable as an attribute."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        return torch.jit.script(ScriptForm(script, layout, reason)).eval()


def adapt_layout(net: nn.Module, layout: str) -> nn.Module:
    """The module as the data feeds it: nchw reads the data as is, flat flattens it first."""
    return FlatInput(net) if layout == "flat" else net


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript module in `path` on the CPU (see the module docstring on what loading runs)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such model file")
    try:
        with warnings.catch_warnings():  # torch 2.9 deprecates TorchScript for torch.export; the files still exist
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # the loader raises RuntimeError/ValueError/zip errors: all "not a TorchScript file"
        raise UsageError(f"{path}: not a loadable TorchScript file ({first_line(error)})") from None
    return module.eval()


def check_outputs(net: nn.Module, file_shape: Sequence[int], num_classes: int, label: str) -> None:
    """A forward pass on zeros of the file's input shape gives (2, K) logits, else one line."""
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, *file_shape))
    except Exception as error:
        raise UsageError(f"{label}: forward on a zero batch of shape {(2, *file_shape)} raised "
                         f"{type(error).__name__}: {first_line(error)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shown = list(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{label}: output shape {shown} per sample; the data has {num_classes} classes")


def torchscript_to_onnx(module: nn.Module, file_shape: Sequence[int], opset: int = 17) -> bytes:
    """The ONNX export of a TorchScript module (batch dimension free, checked), as bytes."""
    import tempfile

    from pipeline.onnx_export import ExportError, export_onnx

    with tempfile.TemporaryDirectory(prefix="robustgate-ts-") as folder:
        target = Path(folder) / "model.onnx"
        try:
            export_onnx(module, tuple(file_shape), target, opset, {})
        except (ExportError, Exception) as error:  # the checker raises its own types too
            raise UsageError(f"the TorchScript module does not export to ONNX ({first_line(error)})") from None
        return target.read_bytes()


def load_state_dict_model(path: Path, name: str, options: dict, file_shape: Sequence[int],
                          num_classes: int) -> nn.Module:
    """`name(file_shape, num_classes, **options)` with the weights in `path` (strict: every key must fit)."""
    from pipeline.models import build_model, load_weights

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such weights file")
    state = load_weights(path)
    net = build_model(name, tuple(file_shape), num_classes, options)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UsageError(f"{path}: the weights do not fit model.name {name!r}: {first_line(error)}") from None
    return net.eval()
