"""Small pieces every stage needs: seeding, the evaluated model and data, tensors."""
from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.data.split import PreparedData, fingerprint
from pipeline.data.store import load_prepared
from pipeline.errors import UsageError
from pipeline.models import load_checkpoint
from pipeline.threat import Domain, check_epsilon
from pipeline.workspace import Workspace


def seed_everything(seed: int) -> torch.Generator:
    """Seed once, in the stage; return the generator the algorithms draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def load_data(ws: Workspace, params) -> tuple[PreparedData, Domain, str]:
    data = load_prepared(ws.prepared)
    domain = Domain.from_arrays(data.lower, data.upper)
    check_epsilon(params.threat.norm, params.threat.epsilon, domain)
    return data, domain, fingerprint(data)


def load_model_for(ws: Workspace, data_fingerprint: str):
    """The trained model, refusing one trained on other data than the prepared split."""
    model, meta = load_checkpoint(ws.model_dir)
    if meta.get("dataset_fingerprint") != data_fingerprint:
        raise UsageError(
            f"{ws.model_dir / 'model.pt'} was trained on data {meta.get('dataset_fingerprint', '?')[:12]}, "
            f"the prepared data is {data_fingerprint[:12]}: re-run `robustgate train`"
        )
    return model, meta


def tensors(data: PreparedData, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.x[split], data.y[split]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
