"""Small pieces every stage needs: seeding, the evaluated model and data, tensors."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.loader import DeviceRows
from pipeline.data.split import PreparedData, fingerprint
from pipeline.data.store import load_prepared, stored_fingerprint
from pipeline.errors import UsageError
from pipeline.models import load_checkpoint
from pipeline.runtime import Runtime, start
from pipeline.threat import Domain, from_params
from pipeline.workspace import Workspace


def seed_everything(seed: int) -> torch.Generator:
    """Seed once, in the stage; return the generator the algorithms draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def start_runtime(params, processes: int | None = None) -> Runtime:
    """The resolved `runtime` section (device refused here, before any work or output)."""
    return start(params.runtime, processes)


def load_data(ws: Workspace, params, known_fingerprint: str | None = None) -> tuple[PreparedData, Domain, str]:
    """The prepared split (memory-mapped), its domain (checked against the threat) and its fingerprint:
    the one `prepare` stored (or `known_fingerprint`, a shard's parent's), hashed only for an old file."""
    data = load_prepared(ws.prepared)
    domain = Domain.from_arrays(data.lower, data.upper)
    from_params(params, data).check(domain)
    return data, domain, known_fingerprint or stored_fingerprint(ws.prepared) or fingerprint(data)


def load_model_for(ws: Workspace, params, data: PreparedData, data_fingerprint: str, device="cpu"):
    """The trained model on `device`, built from the params on the prepared data's shapes, refusing one trained on
    other data than the prepared split or whose logits are NaN or wrongly shaped."""
    if params.model.supplied:
        model, meta = load_supplied_for(ws, params, data, data_fingerprint)
        return model.to(device), meta
    model, meta = load_checkpoint(ws.model_dir, params.model.name, params.model.factory_options(),
                                  data.x["test"].shape[1:], data.num_classes)
    if meta.get("dataset_fingerprint") != data_fingerprint:
        raise UsageError(
            f"{ws.model_dir / 'model.pt'} was trained on data {str(meta.get('dataset_fingerprint', '?'))[:12]}, "
            f"the prepared data is {data_fingerprint[:12]}: re-run `robustgate train`"
        )
    model = model.to(device)
    check_model_outputs(model, tensors(data, "test", 256, device)[0], data.num_classes)
    return model, meta


def check_model_outputs(model, x: torch.Tensor, num_classes: int) -> None:
    """A model that returns NaN or the wrong number of logits makes every figure meaningless."""
    with torch.no_grad():
        out = model(x[:256])
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"model returns shape {shape} for {len(x[:256])} inputs; "
                         f"expected ({len(x[:256])}, {num_classes}) logits")
    if not torch.isfinite(out).all():
        raise UsageError("model returns NaN or inf logits on the test split; fix the model before evaluating it")


def streamed_rows(data: PreparedData, split: str, limit: int | None = None,
                  device="cpu", start: int = 0) -> tuple[DeviceRows, torch.Tensor]:
    """Samples [start, limit) of `split`: the inputs read batch by batch as they are indexed, the labels
    (one integer a sample) as a tensor."""
    x, y = data.x[split], data.y[split]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return DeviceRows(x[start:], device), torch.as_tensor(y[start:], dtype=torch.int64, device=device)


def tensors(data: PreparedData, split: str, limit: int | None = None,
            device="cpu", start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [start, limit) of `split` as tensors: only those pages of the memory map are read."""
    x, y = data.x[split], data.y[split]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x, y = x[start:], y[start:]
    return (torch.as_tensor(x, dtype=torch.float32, device=device),
            torch.as_tensor(y, dtype=torch.int64, device=device))


def load_supplied_for(ws: Workspace, params, data: PreparedData, data_fingerprint: str):
    """The supplied file as train imported it (models/model.pt holds its bytes): its torch form,
    refused when the import was for other data or the file changed since."""
    import json

    from pipeline.io import sha256_file
    from pipeline.supplied.model import load_source

    meta_file = ws.model_dir / "model.json"
    if not ws.checkpoint.is_file() or not meta_file.is_file():
        raise UsageError(f"no imported model in {ws.model_dir}: run `robustgate train` (it imports model.path)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("dataset_fingerprint") != data_fingerprint or meta.get("sha256") != sha256_file(ws.checkpoint):
        raise UsageError(f"{ws.checkpoint} was imported for other data or has changed since: re-run `robustgate train`")
    model = load_source(ws.checkpoint, params.model, data.x["test"].shape[1:], data.num_classes).model
    check_model_outputs(model, tensors(data, "test", 256)[0], data.num_classes)
    return model, meta


@dataclass(frozen=True)
class Shard:
    """What a shard process rebuilds from the workspace: params, runtime, data, model and its own test
    samples [start, stop) (no other sample is read)."""

    params: object
    runtime: Runtime
    data: PreparedData
    domain: Domain
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor


def shard_setup(ws: Workspace, data_fingerprint: str, start: int, stop: int, streamed: bool = False) -> Shard:
    """The set-up every sharded stage repeats in its worker process, in the parent's order (runtime,
    data, model, then the seed), so a shard draws exactly what one process would. `streamed`: the
    shard's inputs as :class:`DeviceRows` (read batch by batch), else one tensor."""
    params = ws.params()
    runtime = start_runtime(params)
    data, domain = load_data(ws, params, data_fingerprint)[:2]
    model, _ = load_model_for(ws, params, data, data_fingerprint, runtime.device)
    seed_everything(params.seed)
    x, y = (streamed_rows if streamed else tensors)(data, "test", stop, runtime.device, start)
    return Shard(params, runtime, data, domain, model, x, y)
