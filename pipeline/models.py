"""Models by name and self-describing checkpoints.

A checkpoint is a `state_dict` (loaded with `weights_only=True`) plus a JSON
file that says how to rebuild the module, so no pickle from a user is ever run.
Models take inputs in the data domain; any normalisation belongs inside them.
"""
from __future__ import annotations

import importlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from pipeline.errors import UsageError, first_line
from pipeline.io import atomic_write


class Standardize(nn.Module):
    """(x − mean) / std with the training split's statistics, saved as buffers: tabular inputs stay
    in their raw units everywhere (attacks, certificates, the ONNX file), and the scaling travels
    with the weights. Held as the constant affine map diag(1/std)·x − mean/std, the one form
    auto_LiRPA bounds exactly (a broadcast subtract/divide by buffers breaks its backward pass).
    Identity until :func:`set_input_statistics` fills it."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("weight", torch.eye(width))
        self.register_buffer("bias", torch.zeros(width))

    def set(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.diag(1.0 / std))
            self.bias.copy_(-mean / std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64), **_: Any) -> nn.Module:
    width = int(torch.tensor(input_shape).prod())
    layers: list[nn.Module] = [nn.Flatten(), Standardize(width)]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def set_input_statistics(model: nn.Module, mean, std) -> bool:
    """Fill the model's first :class:`Standardize` layer with the training statistics; False when
    the model has none (a user factory then sees raw units and owns its normalisation)."""
    layer = next((m for m in model.modules() if isinstance(m, Standardize)), None)
    if layer is None:
        return False
    layer.set(torch.as_tensor(mean, dtype=torch.float32).flatten(), torch.as_tensor(std, dtype=torch.float32).flatten())
    return True


def _image_shape(name: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 3:
        raise UsageError(f"model.name = {name!r} needs image inputs (C, H, W); data has shape {tuple(input_shape)}")


def _with_head(features: nn.Sequential, input_shape: Sequence[int], dense: int, num_classes: int) -> nn.Module:
    with torch.no_grad():
        width = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(width, dense), nn.ReLU(), nn.Linear(dense, num_classes))


def cnn_small(
    input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32), dense: int = 100, **_: Any
) -> nn.Module:
    """The CROWN-IBP paper's small CNN: stride-2 4x4 convolutions, one dense layer."""
    _image_shape("cnn_small", input_shape)
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for out_channels in channels:
        layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ReLU()]
        in_channels = out_channels
    return _with_head(nn.Sequential(*layers, nn.Flatten()), input_shape, dense, num_classes)


def cnn_medium(
    input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64), dense: int = 256, **_: Any
) -> nn.Module:
    """A stride-1 3x3 convolution, then stride-2 4x4 ones, then one dense layer. `cnn_small`'s first
    stride-2 layer halves an image that has no resolution to spare: on 8x8 digits (PGD-AT, 60
    epochs, same widths, worst of PGD, APGD-CE and APGD-T at ε = 0.1) this one keeps 87.6% robust
    where cnn_small keeps 84.4%. IBP-trained, CROWN still verifies most of it (bench/goals.yaml)."""
    _image_shape("cnn_medium", input_shape)
    if len(channels) < 2:
        raise UsageError("model.channels: cnn_medium needs at least two convolution widths")
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], channels[0], 3, stride=1, padding=1), nn.ReLU()]
    for in_channels, out_channels in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.ReLU()]
    return _with_head(nn.Sequential(*layers, nn.Flatten()), input_shape, dense, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn_small": cnn_small, "cnn_medium": cnn_medium}


def _resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise UsageError(f"model.name = {name!r}: unknown model; allowed: {', '.join(MODELS)} or 'module:callable'")
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"model.name = {name!r}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"model.name = {name!r}: {module_name} has no callable {attr!r}")
    return factory


def build_model(name: str, input_shape: Sequence[int], num_classes: int, options: dict[str, Any]) -> nn.Module:
    """Build a model; a user factory is called as `factory(input_shape, num_classes, **options)`.
    A factory or forward pass that raises is bad input (one line), not a traceback."""
    factory = _resolve_factory(name)
    try:
        model = factory(tuple(input_shape), num_classes, **options)
    except UsageError:
        raise
    except Exception as error:  # user code: any failure is the user's model, reported in one line
        raise UsageError(f"model.name = {name!r}: the factory raised {type(error).__name__}: {first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model.name = {name!r}: factory returned {type(model).__name__}, not an nn.Module")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *input_shape))
    except Exception as error:
        raise UsageError(f"model.name = {name!r}: forward on a zero batch of shape {(2, *input_shape)} raised "
                         f"{type(error).__name__}: {first_line(error)}") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        shown = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"model.name = {name!r}: output shape {shown} per sample; the data has {num_classes} classes"
        )
    return model



def save_checkpoint(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """Write `model.pt` (state_dict) and `model.json` (how to rebuild it, and provenance)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()  # via memory: torch.save names the zip's records after the file name
    torch.save(state, buffer)
    atomic_write(directory / "model.pt", lambda tmp: tmp.write_bytes(buffer.getvalue()))
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / "model.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _read_meta(meta_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{meta_file}: not valid JSON ({first_line(error)}); re-run `robustgate train`") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_file}: must be a JSON object; re-run `robustgate train`")
    return meta


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return value
    return None


def check_sidecar(meta: dict[str, Any], name: str, options: dict[str, Any], input_shape: Sequence[int],
                  num_classes: int, meta_file: Path) -> None:
    """model.json must describe exactly the architecture the params name, on the prepared data's
    shapes: the sidecar chooses nothing, so it cannot make a stage import or call other code."""
    expected = {"model": name, "model_options": dict(options), "input_shape": [int(d) for d in input_shape],
                "num_classes": int(num_classes)}
    for key, want in expected.items():
        have = meta.get(key, {} if key == "model_options" else None)
        if key == "input_shape" and _int_list(have) is None:
            raise UsageError(f"{meta_file}: input_shape = {have!r} is not a list of positive integers; refused")
        if key == "num_classes" and (not isinstance(have, int) or isinstance(have, bool)):
            raise UsageError(f"{meta_file}: num_classes = {have!r} is not an integer; refused")
        if have != want:
            raise UsageError(f"{meta_file}: {key} = {json.dumps(have)[:120]}, but the params and prepared data give "
                             f"{json.dumps(want)[:120]}; refused before building anything (re-run `robustgate train`)")


def load_checkpoint(directory: Path, name: str, options: dict[str, Any], input_shape: Sequence[int],
                    num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint in `directory`, built as `name(input_shape, num_classes, **options)` from the
    params and data, after checking model.json names exactly that; weights as plain tensors only."""
    weights, meta_file = directory / "model.pt", directory / "model.json"
    if not weights.is_file() or not meta_file.is_file():
        raise UsageError(f"no checkpoint in {directory}: expected model.pt and model.json (run `robustgate train`)")
    meta = _read_meta(meta_file)
    check_sidecar(meta, name, options, input_shape, num_classes, meta_file)
    model = build_model(name, input_shape, num_classes, options)
    state = load_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UsageError(f"{weights}: checkpoint does not match model {name!r}: {first}") from None
    return model.eval(), meta


def load_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A state_dict of plain tensors; anything else in the pickle is refused, never run."""
    import pickle

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{weights}: refused: the file holds Python objects other than tensors (only a plain "
                         "state_dict is loaded, nothing in it is executed); re-save it with `robustgate train`") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UsageError(f"{weights}: not a readable torch checkpoint ({first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{weights}: refused: not a state_dict of tensors")
    return state
