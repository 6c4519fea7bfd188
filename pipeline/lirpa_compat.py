"""Bridge auto-LiRPA 0.3 (written for torch 1.12 / numpy 1.x) to torch 2.x and numpy 2.

auto-LiRPA's only PyPI release pins torch<1.13, yet its bound propagation runs
unchanged on torch 2.4-2.13 once six small API gaps are filled. Every gap is
filled here, at import time, without editing the installed package, so an
upgrade of either side shows up as a failing test of this module rather than as
a silent wrong bound. Import ``auto_LiRPA`` only through :func:`load`.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings

import numpy as np
import torch

_BRIDGED = False


def _bridge_numpy_arraysetops() -> None:
    # numpy 2 made numpy.lib.arraysetops private; auto_LiRPA imports `isin` from it.
    if "numpy.lib.arraysetops" not in sys.modules:
        shim = types.ModuleType("numpy.lib.arraysetops")
        shim.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = shim


def _bridge_torch_six() -> None:
    # torch._six was removed in torch 2.0; auto_LiRPA only uses string_classes.
    if "torch._six" not in sys.modules:
        shim = types.ModuleType("torch._six")
        shim.string_classes = (str, bytes)
        sys.modules["torch._six"] = shim
        torch._six = shim  # type: ignore[attr-defined]


def _bridge_opset_setter() -> None:
    # torch 2.x dropped symbolic_helper._set_opset_version; the TorchScript
    # exporter keeps the opset in its GLOBALS object instead.
    helper = importlib.import_module("torch.onnx.symbolic_helper")
    if hasattr(helper, "_set_opset_version"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # torch 2.4 - 2.8
        from torch.onnx._globals import GLOBALS  # type: ignore[no-redef]

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set_opset_version


def _node_getitem(node: "torch._C.Node", name: str):
    """Read a TorchScript node attribute by name, whatever its kind."""
    kind = node.kindOf(name)  # 'f', 'i', 's', 't', 'fs', 'is', 'ss', 'ts', 'ival', ...
    return getattr(node, kind)(name)  # getattr: `is` is a Python keyword


def _bridge_node_getitem() -> None:
    # torch._C.Node lost __getitem__ (attribute access by name) in torch 2.x.
    if not hasattr(torch._C.Node, "__getitem__"):
        torch._C.Node.__getitem__ = _node_getitem


def _bridge_named_members(bound_module_cls: type) -> None:
    # nn.Module._named_members gained `remove_duplicate`, which named_parameters
    # now passes; BoundedModule overrides it with the old signature.
    original = bound_module_cls._named_members
    if getattr(original, "_robustgate_bridged", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    _named_members._robustgate_bridged = True
    bound_module_cls._named_members = _named_members


def _bridge_patches_channel_constant() -> None:
    # Multiplying conv patches by a per-channel constant of shape (1, C, 1, 1) (a model's own
    # normalisation, `(x - mean) / std` with buffers) only works in 0.3 when the constant's first
    # dimension equals the batch size, else an assertion fails in CROWN. A leading 1 broadcasts the
    # same over every patch layout (in_c, patch_h, patch_w are the last three dimensions).
    from auto_LiRPA.operators.bivariate import BoundMul
    from auto_LiRPA.patches import Patches

    original = BoundMul._multiply_by_const
    if getattr(original, "_robustgate_bridged", False):
        return

    def _multiply_by_const(x, const):
        if (isinstance(x, Patches) and isinstance(const, torch.Tensor) and const.ndim == 4 and const.size(0) == 1
                and const.size(1) == x.patches.size(-3) and const.size(2) == const.size(3) == 1):
            return x.create_similar(x.patches * const)
        return original(x, const)

    _multiply_by_const._robustgate_bridged = True
    BoundMul._multiply_by_const = staticmethod(_multiply_by_const)


_LEAVES = ("BoundParams", "BoundBuffers", "BoundConstant")
_WEIGHTED = ("BoundLinear", "BoundMatMul", "BoundConv")


def computed_weights(bounded) -> list[str]:
    """The Linear/MatMul/Conv nodes of a BoundedModule whose weight or bias is computed in the traced
    graph from parameters (`F.linear(x, self.w * 2)`, `x @ (a + b)`, `x @ w.t()`) rather than read
    from a parameter, buffer or constant leaf. auto_LiRPA 0.3 bounds such a node unsoundly (an IBP
    lower bound above what sampling reaches, tests/test_onnx_torch.py), so a certificate on it must
    not be issued. An operand that depends on the input (x @ x) is auto_LiRPA's own case, not this one."""
    nodes = {node.name: node for node in bounded._modules.values()}

    def from_input(node, seen=None) -> bool:
        seen = set() if seen is None else seen
        if type(node).__name__ == "BoundInput":
            return True
        seen.add(node.name)
        return any(from_input(parent, seen) for parent in node.inputs if parent.name not in seen)

    found = []
    for node in nodes.values():
        kind = type(node).__name__
        if kind not in _WEIGHTED:
            continue
        for operand in node.inputs[1:]:
            if type(operand).__name__ not in _LEAVES and not from_input(operand):
                op = kind.removeprefix("Bound")
                found.append(f"{op} node {node.name} reads a weight computed in forward by "
                             f"{type(operand).__name__.removeprefix('Bound')} node {operand.name}")
                break
    return found


def load() -> types.ModuleType:
    """Return the ``auto_LiRPA`` module with every torch-2/numpy-2 gap bridged."""
    global _BRIDGED
    if not _BRIDGED:
        _bridge_numpy_arraysetops()
        _bridge_torch_six()
        _bridge_opset_setter()
        _bridge_node_getitem()
    try:
        # At import auto_LiRPA calls warnings.simplefilter("once") for the whole process and
        # decorates with torch.jit.script (deprecated in torch 2.x, still working). Import it
        # with warnings recorded, so the filters come back unchanged, and re-emit the rest.
        with warnings.catch_warnings(record=True) as caught:
            auto_lirpa = importlib.import_module("auto_LiRPA")  # tqdm is declared in pyproject
        for warning in caught:
            if "torch.jit.script" not in str(warning.message):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    except ImportError as exc:
        raise ImportError(
            "auto_LiRPA is not installed: run `pip install --no-deps auto-LiRPA==0.3` "
            "(the Makefile does this)"
        ) from exc
    if not _BRIDGED:
        _bridge_named_members(auto_lirpa.BoundedModule)
        _bridge_patches_channel_constant()
        _BRIDGED = True
    return auto_lirpa
