"""The README's model pattern certifies: a `module:callable` CNN with its normalisation inside
(`(x - mean) / std`, mean and std as (1, C, 1, 1) buffers) and BatchNorm. Before the fix CROWN
died in auto_LiRPA (an AssertionError in BoundMul._multiply_by_const on conv patches: the
constant's first dimension had to equal the batch size); now its bounds hold against sampling,
and a failure inside a bound rule is NotBoundable, never a traceback."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.certify.bounds import BoundComputer, margins_of
from pipeline.threat import Domain


class NormalisedBNCNN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.linspace(0.4, 0.6, channels).reshape(1, channels, 1, 1))
        self.register_buffer("std", torch.linspace(0.2, 0.3, channels).reshape(1, channels, 1, 1))
        self.body = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


@pytest.mark.parametrize("channels", [1, 3])
def test_normalised_batchnorm_cnn_certifies_soundly(channels):
    torch.manual_seed(channels)
    net = NormalisedBNCNN(channels)
    with torch.no_grad():
        net.body[1].running_mean.uniform_(-0.2, 0.2)
        net.body[1].running_var.uniform_(0.5, 2.0)
    net.eval()
    shape = (channels, 8, 8)
    domain = Domain.from_arrays(np.zeros(shape, np.float32), np.ones(shape, np.float32))
    computer = BoundComputer(net, shape, domain)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
        noise = torch.rand(3000, *x.shape, generator=torch.Generator().manual_seed(2)) * 0.02 - 0.01
        out = net((x[None] + noise).clamp(0, 1).reshape(-1, *shape)).reshape(3000, 5, 3)
    sampled = torch.stack([margins_of(o, y) for o in out]).min(dim=0).values
    for method in ("ibp", "crown", "alpha_crown"):
        lower, _ = computer.margin_bounds(x, y, 0.01, "linf", method, 3)
        assert torch.all(lower <= sampled + 1e-5), method
        assert torch.isfinite(lower).all()
