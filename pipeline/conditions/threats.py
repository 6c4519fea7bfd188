"""Parametric input variations as :class:`~pipeline.threat.Threat` objects.

Each condition is a transform x' = T(x, θ) over a box of parameters θ (brightness offset,
contrast factor, rotation angle, ...) followed by clipping to the data domain. The same
`transform` serves the empirical search (batched, differentiable where the transform is) and,
for the photometric kinds, bound propagation: it uses only operations auto_LiRPA can bound
(affine maps, ReLU-written clipping, exp), so what is certified is exactly what is attacked.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UsageError
from pipeline.threat import Domain, Threat

GAMMA_FLOOR = 1e-3  # gamma: pixels below this share of the range are treated as this share (log(0) is -inf)


def column(theta: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    """θ_k per sample, shaped to broadcast over one input of `like`."""
    return theta[:, k:k + 1].reshape((-1,) + (1,) * (like.dim() - 1))


def clip(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Clipping written with ReLUs, which auto_LiRPA bounds (it has no rule for clamp)."""
    x = lower + F.relu(x - lower)
    return upper - F.relu(upper - x)


@dataclass(frozen=True)
class Condition(Threat):
    """A box of transform parameters; subclasses define the transform."""

    name: str
    rationale: str
    low: tuple[float, ...]
    high: tuple[float, ...]

    kind: ClassVar[str] = ""
    axes: ClassVar[tuple[str, ...]] = ()
    units: ClassVar[tuple[str, ...]] = ()
    differentiable: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False
    certification: ClassVar[Optional[str]] = None  # "bounds" | "enumeration" | None
    image_only: ClassVar[bool] = True

    @property
    def dims(self) -> int:
        return len(self.axes)

    def identity(self) -> tuple[float, ...]:
        """The parameters that leave the input unchanged."""
        raise NotImplementedError

    def transform(self, x: torch.Tensor, theta: torch.Tensor, domain: Domain,
                  noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    def finite_set(self) -> Optional[np.ndarray]:
        """Every parameter vector, when the set is finite (enumeration is then complete)."""
        return None

    def affine_design(self, x: torch.Tensor, domain: Domain) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """For transforms affine in θ before the clipping, (W, c) per sample with shapes (N, numel, d) and
        (N, numel) such that transform(x, θ) = clip(W θ + c) flattened: the parameter-to-image map is then one
        linear layer, which bound propagation handles cheaply (pipeline/conditions/certify.py). None otherwise."""
        return None

    def box(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.low, dtype=torch.float32, device=device),
                torch.tensor(self.high, dtype=torch.float32, device=device))

    def scaled(self, factor: float) -> "Condition":
        """The range shrunk towards the identity by `factor` (the monotonicity sanity check)."""
        centre = np.array(self.identity())
        low = centre + factor * (np.array(self.low) - centre)
        high = centre + factor * (np.array(self.high) - centre)
        return replace(self, low=tuple(float(v) for v in low), high=tuple(float(v) for v in high))

    def record(self) -> dict:
        return {"kind": self.kind, "axes": {a: [lo, hi] for a, lo, hi in zip(self.axes, self.low, self.high)}}

    def describe(self) -> str:
        parts = [f"{a} in [{lo:g}, {hi:g}]{(' ' + u) if u else ''}"
                 for a, u, lo, hi in zip(self.axes, self.units, self.low, self.high)]
        return f"{self.kind}: " + ", ".join(parts)

    def check(self, domain: Domain, input_shape: tuple[int, ...], key: str) -> None:
        """Refuse a condition that does not apply to the data, or a range outside what it allows."""
        if self.image_only and len(input_shape) != 3:
            raise UsageError(f"{key}: a {self.kind} condition needs image data (channels, height, width); "
                             f"the inputs have shape {tuple(input_shape)}")


def _check_offset(condition: Condition, domain: Domain, key: str) -> None:
    """A brightness offset beyond the data range says nothing about the operating domain: refuse it."""
    width = float((domain.upper - domain.lower).max())
    if max(abs(condition.low[0]), abs(condition.high[0])) > width:
        raise UsageError(f"{key} = [{condition.low[0]:g}, {condition.high[0]:g}]: beyond the data range "
                         f"(width {width:g})")


@dataclass(frozen=True)
class Brightness(Condition):
    kind: ClassVar[str] = "brightness"
    axes: ClassVar[tuple[str, ...]] = ("brightness",)
    units: ClassVar[tuple[str, ...]] = ("(added, input units)",)
    certification: ClassVar[Optional[str]] = "bounds"

    def identity(self):
        return (0.0,)

    def transform(self, x, theta, domain, noise=None):
        return clip(x + column(theta, 0, x), domain.lower.to(x), domain.upper.to(x))

    def affine_design(self, x, domain):
        flat = x.flatten(1)
        return torch.ones_like(flat).unsqueeze(2), flat

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        _check_offset(self, domain, f"{key}.range")


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return mean, x - mean


@dataclass(frozen=True)
class Contrast(Condition):
    kind: ClassVar[str] = "contrast"
    axes: ClassVar[tuple[str, ...]] = ("contrast",)
    units: ClassVar[tuple[str, ...]] = ("(factor about the image mean)",)
    certification: ClassVar[Optional[str]] = "bounds"

    def identity(self):
        return (1.0,)

    def transform(self, x, theta, domain, noise=None):
        mean, centred = _centred(x)
        return clip(mean + column(theta, 0, x) * centred, domain.lower.to(x), domain.upper.to(x))

    def affine_design(self, x, domain):
        mean, centred = _centred(x)
        return centred.flatten(1).unsqueeze(2), mean.expand_as(x).flatten(1)


@dataclass(frozen=True)
class BrightnessContrast(Condition):
    kind: ClassVar[str] = "brightness_contrast"
    axes: ClassVar[tuple[str, ...]] = ("brightness", "contrast")
    units: ClassVar[tuple[str, ...]] = ("(added)", "(factor)")
    certification: ClassVar[Optional[str]] = "bounds"

    def identity(self):
        return (0.0, 1.0)

    def transform(self, x, theta, domain, noise=None):
        mean, centred = _centred(x)
        out = mean + column(theta, 1, x) * centred + column(theta, 0, x)
        return clip(out, domain.lower.to(x), domain.upper.to(x))

    def affine_design(self, x, domain):
        mean, centred = _centred(x)
        flat = centred.flatten(1)
        return torch.stack([torch.ones_like(flat), flat], 2), mean.expand_as(x).flatten(1)

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        _check_offset(self, domain, f"{key}.brightness")


@dataclass(frozen=True)
class Gamma(Condition):
    kind: ClassVar[str] = "gamma"
    axes: ClassVar[tuple[str, ...]] = ("gamma",)
    units: ClassVar[tuple[str, ...]] = ("(exponent on the normalised intensity)",)
    certification: ClassVar[Optional[str]] = "bounds"

    def identity(self):
        return (1.0,)

    def transform(self, x, theta, domain, noise=None):
        lower, upper = domain.lower.to(x), domain.upper.to(x)
        width = (upper - lower).clamp_min(1e-12)
        level = clip((x - lower) / width, torch.full_like(x, GAMMA_FLOOR), torch.ones_like(x))
        log_level = torch.log(level)  # constant in θ
        return clip(lower + width * torch.exp(column(theta, 0, x) * log_level), lower, upper)


@dataclass(frozen=True)
class Fog(Condition):
    """Haze as a blend towards a constant level, with a depth-free coefficient t: x + t (level - x)."""

    level: Optional[float] = None
    kind: ClassVar[str] = "fog"
    axes: ClassVar[tuple[str, ...]] = ("fog",)
    units: ClassVar[tuple[str, ...]] = ("(blend coefficient towards the fog level)",)
    certification: ClassVar[Optional[str]] = "bounds"

    def identity(self):
        return (0.0,)

    def _level(self, x, domain):
        return torch.full_like(x, self.level) if self.level is not None else domain.upper.to(x).expand_as(x)

    def transform(self, x, theta, domain, noise=None):
        lower, upper = domain.lower.to(x), domain.upper.to(x)
        return clip(x + column(theta, 0, x) * (self._level(x, domain) - x), lower, upper)

    def affine_design(self, x, domain):
        return (self._level(x, domain) - x).flatten(1).unsqueeze(2), x.flatten(1)

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        if self.level is not None and not (float(domain.lower.min()) <= self.level <= float(domain.upper.max())):
            raise UsageError(f"{key}.level = {self.level:g}: outside the data domain "
                             f"[{float(domain.lower.min()):g}, {float(domain.upper.max()):g}]")


@dataclass(frozen=True)
class Noise(Condition):
    """Additive Gaussian sensor noise of standard deviation σ up to the bound; the direction is random."""

    kind: ClassVar[str] = "noise"
    axes: ClassVar[tuple[str, ...]] = ("sigma",)
    units: ClassVar[tuple[str, ...]] = ("(noise standard deviation, input units)",)
    differentiable: ClassVar[bool] = False
    stochastic: ClassVar[bool] = True
    image_only: ClassVar[bool] = False

    def identity(self):
        return (0.0,)

    def transform(self, x, theta, domain, noise=None):
        noise = torch.zeros_like(x) if noise is None else noise
        return domain.clamp(x + column(theta, 0, x) * noise)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2r+1) normalised 1-D kernels; σ near 0 is the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    s = sigma.clamp_min(1e-3).unsqueeze(1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    return kernel / kernel.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class Blur(Condition):
    kind: ClassVar[str] = "blur"
    axes: ClassVar[tuple[str, ...]] = ("sigma_blur",)
    units: ClassVar[tuple[str, ...]] = ("(Gaussian blur, pixels)",)

    def identity(self):
        return (0.0,)

    def transform(self, x, theta, domain, noise=None):
        n, c, h, w = x.shape
        radius = max(1, math.ceil(3 * max(self.high[0], 1e-3)))
        kernel = _gaussian_kernels(theta[:, 0], radius).repeat_interleave(c, dim=0)  # (N*C, k)
        flat = x.reshape(1, n * c, h, w)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1),
                        groups=n * c)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1),
                        groups=n * c)
        return domain.clamp(flat.reshape(n, c, h, w))


def _warp(x: torch.Tensor, matrices: torch.Tensor, domain: Domain) -> torch.Tensor:
    """Bilinear resampling under 2x3 affine matrices; what falls outside the image is the domain's lower bound."""
    lower = domain.lower.to(x)
    grid = F.affine_grid(matrices, list(x.shape), align_corners=False)
    return domain.clamp(F.grid_sample(x - lower, grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False) + lower)


@dataclass(frozen=True)
class Rotation(Condition):
    kind: ClassVar[str] = "rotation"
    axes: ClassVar[tuple[str, ...]] = ("angle",)
    units: ClassVar[tuple[str, ...]] = ("degrees",)

    def identity(self):
        return (0.0,)

    def transform(self, x, theta, domain, noise=None):
        angle = theta[:, 0] * (math.pi / 180.0)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
        matrices = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return _warp(x, matrices, domain)

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        if max(abs(self.low[0]), abs(self.high[0])) > 180:
            raise UsageError(f"{key}.range = [{self.low[0]:g}, {self.high[0]:g}]: angles lie within ±180 degrees")


@dataclass(frozen=True)
class Scaling(Condition):
    kind: ClassVar[str] = "scaling"
    axes: ClassVar[tuple[str, ...]] = ("scale",)
    units: ClassVar[tuple[str, ...]] = ("(zoom factor about the centre)",)

    def identity(self):
        return (1.0,)

    def transform(self, x, theta, domain, noise=None):
        inverse, zero = 1.0 / theta[:, 0], torch.zeros_like(theta[:, 0])
        matrices = torch.stack([torch.stack([inverse, zero, zero], 1), torch.stack([zero, inverse, zero], 1)], 1)
        return _warp(x, matrices, domain)


@dataclass(frozen=True)
class Translation(Condition):
    """Integer shifts of up to `pixels` in each direction; the vacated border takes the domain's lower bound."""

    kind: ClassVar[str] = "translation"
    axes: ClassVar[tuple[str, ...]] = ("dx", "dy")
    units: ClassVar[tuple[str, ...]] = ("pixels", "pixels")
    differentiable: ClassVar[bool] = False
    certification: ClassVar[Optional[str]] = "enumeration"

    def identity(self):
        return (0.0, 0.0)

    def finite_set(self):
        k = int(self.high[0])
        return np.array([(dx, dy) for dy in range(-k, k + 1) for dx in range(-k, k + 1)], dtype=np.float32)

    def transform(self, x, theta, domain, noise=None):
        k = int(self.high[0])
        lower = domain.lower.to(x)
        padded = F.pad(x - lower, (k, k, k, k))
        out = torch.empty_like(x)
        h, w = x.shape[-2:]
        shifts = theta.round().long().tolist()
        for (dx, dy) in {tuple(s) for s in shifts}:
            rows = [i for i, s in enumerate(shifts) if tuple(s) == (dx, dy)]
            out[rows] = padded[rows, :, k - dy:k - dy + h, k - dx:k - dx + w]
        return out + lower

    def scaled(self, factor):
        k = float(math.floor(self.high[0] * factor))
        return replace(self, low=(-k, -k), high=(k, k))

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        if self.high[0] >= min(input_shape[-2:]):
            raise UsageError(f"{key}.pixels = {int(self.high[0])}: must be smaller than the image "
                             f"({input_shape[-2]}x{input_shape[-1]})")


@dataclass(frozen=True)
class Occlusion(Condition):
    """A square patch of `size` pixels anywhere on a grid of positions `stride` apart (plus the last row and
    column, so every pixel can be covered), filled with `fill` (default: the domain's lower bound)."""

    size: int = 2
    stride: int = 1
    fill: Optional[float] = None
    kind: ClassVar[str] = "occlusion"
    axes: ClassVar[tuple[str, ...]] = ("row", "column")
    units: ClassVar[tuple[str, ...]] = ("(top-left, pixels)", "(top-left, pixels)")
    differentiable: ClassVar[bool] = False
    certification: ClassVar[Optional[str]] = "enumeration"

    def identity(self):
        return (-1.0, -1.0)  # no patch: outside the image

    def positions(self, limit: int) -> list[int]:
        found = list(range(0, limit - self.size + 1, self.stride))
        return found if found[-1] == limit - self.size else found + [limit - self.size]

    def finite_set(self):
        rows, cols = self.positions(int(self.high[0]) + self.size), self.positions(int(self.high[1]) + self.size)
        return np.array([(r, c) for r in rows for c in cols], dtype=np.float32)

    def transform(self, x, theta, domain, noise=None):
        h, w = x.shape[-2:]
        r, c = theta[:, 0].view(-1, 1, 1, 1), theta[:, 1].view(-1, 1, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        inside = (rows >= r) & (rows < r + self.size) & (cols >= c) & (cols < c + self.size) & (r >= 0)
        fill = torch.full_like(x, self.fill) if self.fill is not None else domain.lower.to(x).expand_as(x)
        return torch.where(inside, fill, x)

    def scaled(self, factor):
        return replace(self, size=max(1, int(self.size * factor)),
                       high=(self.high[0] + self.size - max(1, int(self.size * factor)),) * 2)

    def check(self, domain, input_shape, key):
        super().check(domain, input_shape, key)
        if self.size > min(input_shape[-2:]):
            raise UsageError(f"{key}.size = {self.size}: larger than the image ({input_shape[-2]}x{input_shape[-1]})")
        if self.fill is not None and not (float(domain.lower.min()) <= self.fill <= float(domain.upper.max())):
            raise UsageError(f"{key}.fill = {self.fill:g}: outside the data domain")


KINDS: dict[str, type[Condition]] = {cls.kind: cls for cls in (
    Brightness, Contrast, BrightnessContrast, Gamma, Fog, Noise, Blur, Rotation, Scaling, Translation, Occlusion)}


def from_config(name: str, cfg, input_shape: tuple[int, ...]) -> Condition:
    """The condition a `conditions.threats.<name>` entry describes, on inputs of `input_shape`."""
    cls = KINDS[cfg.kind]
    if cfg.kind == "brightness_contrast":
        return cls(name, cfg.rationale, (cfg.brightness[0], cfg.contrast[0]), (cfg.brightness[1], cfg.contrast[1]))
    if cfg.kind == "noise":
        return cls(name, cfg.rationale, (0.0,), (cfg.sigma,))
    if cfg.kind == "translation":
        return cls(name, cfg.rationale, (-float(cfg.pixels),) * 2, (float(cfg.pixels),) * 2)
    if cfg.kind == "occlusion":
        h, w = (input_shape[-2], input_shape[-1]) if len(input_shape) == 3 else (cfg.size, cfg.size)
        return cls(name, cfg.rationale, (0.0, 0.0), (float(max(h - cfg.size, 0)), float(max(w - cfg.size, 0))),
                   size=cfg.size, stride=cfg.stride, fill=cfg.fill)
    extra = {"level": cfg.level} if cfg.kind == "fog" else {}
    return cls(name, cfg.rationale, (cfg.range[0],), (cfg.range[1],), **extra)


def grid_points(condition: Condition, per_axis: int) -> np.ndarray:
    """An even grid over the parameter box (the finite set itself when there is one)."""
    finite = condition.finite_set()
    if finite is not None:
        return finite
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(condition.low, condition.high)]
    return np.array(list(itertools.product(*axes)), dtype=np.float32)
