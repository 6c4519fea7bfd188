"""β-CROWN lower bounds of a fully-connected ReLU chain over a box, under ReLU split constraints.

Why self-written: auto_LiRPA 0.3 can impose a split only by clamping intermediate bounds, which
changes the split neuron's relaxation and nothing else; the Lagrangian of the split constraint
(β-CROWN, Wang et al. 2021) is what makes ReLU splitting converge, and 0.3's β interface is
tied to α,β-CROWN's own branch-and-bound structures. For a chain x -> W1 -> ReLU -> ... -> WL
this is one back-substitution:

  for the rows c of the property and any slopes α in [0, 1] and multipliers β >= 0,
  c.f(x) >= c.f(x) - Σ β_j s_j z_j(x)  on the sub-domain, where s_j = +1 for a neuron split
  active (z_j >= 0 there) and -1 for one split inactive (z_j <= 0 there),
  and each ReLU is replaced by its CROWN relaxation from pre-activation bounds [l, u] that hold
  on the sub-domain (lower α z; upper u (z - l) / (u - l); exact where l >= 0 or u <= 0).

So every (α, β) gives a valid lower bound: α and β are optimised by projected Adam, the best
bound per row is kept. Intermediate bounds are given (auto_LiRPA's, clamped by the splits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


MAX_DENSE_ENTRIES = 25_000_000  # 200 MB of float64 per segment matrix


@dataclass(frozen=True)
class Chain:
    """Affine layers [(W (out, in), b (out,))] with a ReLU between consecutive ones, float64; the
    first reads the flattened network input."""
    layers: list[tuple[torch.Tensor, torch.Tensor]]


def chain_of(bounded, input_shape: tuple[int, ...]) -> Chain | None:
    """The network of an auto_LiRPA BoundedModule as a Chain, or None when it is not one.

    The graph must be ReLUs separated by segments that read only the previous ReLU's output (the
    first: only the input) and are affine (Linear, Conv, Flatten, Reshape, BatchNorm, a
    normalisation by constants...). Each segment is read off by probing it with the unit vectors
    (evaluating auto_LiRPA's own nodes), and accepted only if it reproduces random points too."""
    try:
        with torch.no_grad():
            example = torch.zeros(1, *input_shape, dtype=torch.float64)
            bounded(example)  # every node's value at one input: constants are read from here
            sources = [bounded[bounded.input_name[0]]] + list(bounded.relus)
            targets = [relu.inputs[0] for relu in bounded.relus] + [bounded[bounded.final_name]]
            layers = [_segment(source, target, sources) for source, target in zip(sources, targets)]
    except Exception:  # a node that cannot be evaluated on a probe batch: not a chain we read
        return None
    return None if any(layer is None for layer in layers) else Chain(layers)


def _segment(source, target, sources):
    """(W, b) of the map from `source`'s value to `target`'s, or None when it is not affine or
    reads another source (a skip connection)."""
    shape = source.forward_value.shape[1:]
    n = int(torch.tensor(shape).prod()) if len(shape) else 1
    if n * target.forward_value[0].numel() > MAX_DENSE_ENTRIES:
        return None  # a dense matrix this size would not fit: auto_LiRPA bounds it instead
    generator = torch.Generator().manual_seed(0)
    checks = torch.rand(3, n, generator=generator, dtype=torch.float64) * 2 - 1
    probe = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64), checks])
    values = {source.name: probe.reshape(-1, *shape)}
    memo: dict[tuple[str, str], bool] = {}

    def depends(node, on) -> bool:
        key = (node.name, on.name)
        if key not in memo:
            memo[key] = node is on or any(depends(i, on) for i in node.inputs)
        return memo[key]

    def value(node):
        if node.name in values:
            return values[node.name]
        if not depends(node, source):
            if depends(node, sources[0]):  # varies with the input, yet not through `source`: a skip
                raise _NotAChain
            return node.forward_value  # a constant of the network
        if node in sources:
            raise _NotAChain
        values[node.name] = node.forward(*[value(i) for i in node.inputs])
        return values[node.name]

    out = value(target).reshape(len(probe), -1)
    weight, bias = (out[1:n + 1] - out[:1]).t().contiguous(), out[0].clone()
    predicted = checks @ weight.t() + bias
    if not torch.allclose(predicted, out[n + 1:], rtol=1e-9, atol=1e-9):
        return None
    return weight, bias


class _NotAChain(Exception):
    pass


def _backward(chain: Chain, spec, lowers, uppers, splits, alphas, betas, x_lower, x_upper):
    """Lower bound (N, R) of spec . f and the coefficients on each ReLU output and on the input."""
    weight, bias = chain.layers[-1]
    lam = spec @ weight  # (N, R, n) on the last ReLU's output
    const = (spec @ bias).expand(lam.shape[0], -1)
    relu_coeffs = [None] * len(lowers)
    for k in range(len(lowers) - 1, -1, -1):
        relu_coeffs[k] = lam
        low, up = lowers[k][:, None], uppers[k][:, None]
        active, inactive = low >= 0, up <= 0
        unstable = ~(active | inactive)
        slope = torch.where(unstable, up / (up - low).clamp_min(1e-12), torch.zeros_like(up))
        upper_slope = torch.where(active, torch.ones_like(up), slope)
        lower_slope = torch.where(active, torch.ones_like(up), torch.where(unstable, alphas[k], torch.zeros_like(up)))
        positive = lam >= 0
        coeff = torch.where(positive, lam * lower_slope, lam * upper_slope)
        const = const + torch.where(positive | ~unstable, torch.zeros_like(lam), -lam * slope * low).sum(-1)
        coeff = coeff - betas[k] * splits[k][:, None]  # the Lagrangian of the split constraints
        w, b = chain.layers[k]
        const = const + coeff @ b
        lam = coeff @ w
    centre, radius = (x_lower + x_upper) / 2, (x_upper - x_lower) / 2
    bound = const + (lam * centre[:, None]).sum(-1) - (lam.abs() * radius[:, None]).sum(-1)
    return bound, relu_coeffs, lam


def lower_bound(chain: Chain, spec, lowers, uppers, splits, x_lower, x_upper, iterations: int = 20,
                lr_alpha: float = 0.1, lr_beta: float = 0.05):
    """Best β-CROWN lower bound (N, R) over `iterations` of projected Adam, with the coefficients on
    each ReLU output (N, R, n_k) and on the input (N, R, n_in) of the final iterate.

    spec (R, outputs); lowers/uppers/splits per ReLU layer (N, n_k): bounds valid on each
    sub-domain and the split sign (+1 active, -1 inactive, 0 none); x_lower/x_upper (1, n_in).
    """
    n, r = len(lowers[0]), spec.shape[0]
    spec = spec.expand(n, -1, -1)
    alphas = [(u > -l).to(l.dtype)[:, None].expand(n, r, -1).clone().requires_grad_(True)
              for l, u in zip(lowers, uppers)]  # CROWN's adaptive slope to start from
    signs = [s.to(lowers[0].dtype) for s in splits]
    with_split = [s != 0 for s in splits]
    betas = [torch.zeros(n, r, s.shape[1], dtype=lowers[0].dtype, requires_grad=True) for s in splits]
    optimiser = torch.optim.Adam([{"params": alphas, "lr": lr_alpha}, {"params": betas, "lr": lr_beta}])
    best = torch.full((n, r), -torch.inf, dtype=lowers[0].dtype)
    for iteration in range(max(iterations, 1)):
        last = iteration == max(iterations, 1) - 1
        with torch.set_grad_enabled(not last):
            masked = [b * m[:, None] for b, m in zip(betas, with_split)]
            bound, relu_coeffs, input_coeffs = _backward(chain, spec, lowers, uppers, signs, alphas, masked,
                                                         x_lower, x_upper)
        best = torch.maximum(best, bound.detach())
        if last:
            break
        optimiser.zero_grad()
        (-bound.sum()).backward()
        optimiser.step()
        with torch.no_grad():
            for a in alphas:
                a.clamp_(0, 1)
            for b in betas:
                b.clamp_(min=0)
    return best, [c.detach() for c in relu_coeffs], input_coeffs.detach()


def linear_piece_bound(chain: Chain, spec, lowers, uppers, splits, x_lower, x_upper):
    """For one sub-domain where no ReLU is unstable (the network is affine on it): per row of spec,
    a lower bound and the LP's minimiser (or None). The LP (HiGHS) minimises the row over the box
    under the split constraints; its duals are used as β in `_backward`, so the bound returned is
    the β-CROWN bound evaluated in float64 (valid for any β >= 0), not the solver's number.

    lowers/uppers/splits per ReLU layer (1, n_k); spec (R, outputs); x_lower/x_upper (1, n_in)."""
    from scipy.optimize import linprog

    n_in = x_lower.shape[1]
    g, h = torch.eye(n_in, dtype=torch.float64), torch.zeros(n_in, dtype=torch.float64)  # layer input = g^T x + h
    rows, rhs, where = [], [], []
    for k, (w, b) in enumerate(chain.layers[:-1]):
        zg, zh = w @ g.t(), w @ h + b  # z = zg x + zh on the sub-domain
        sign = splits[k][0].to(torch.float64)
        for j in torch.nonzero(sign).flatten().tolist():  # s z_j >= 0  <=>  -s zg_j x <= s zh_j
            rows.append((-sign[j] * zg[j]).numpy())
            rhs.append(float(sign[j] * zh[j]))
            where.append((k, j))
        on = (lowers[k][0] >= 0).to(torch.float64)  # no neuron is unstable here: on or off
        g, h = (zg * on[:, None]).t(), zh * on
    w, b = chain.layers[-1]
    out_g = w @ g.t()  # the constant part (w @ h + b) does not move the LP minimiser
    bounds = torch.full((spec.shape[0],), -torch.inf, dtype=torch.float64)
    points = [None] * spec.shape[0]
    box = list(zip(x_lower[0].tolist(), x_upper[0].tolist()))
    import numpy as np

    a_ub = np.array(rows) if rows else None
    for r in range(spec.shape[0]):
        objective = (spec[r] @ out_g).numpy()
        result = linprog(objective, A_ub=a_ub, b_ub=np.array(rhs) if rows else None, bounds=box, method="highs")
        if result.status != 0:
            continue  # infeasible or failed: no bound from here (the caller keeps the domain open)
        points[r] = torch.as_tensor(result.x, dtype=torch.float64)
        betas = [torch.zeros(1, 1, s.shape[1], dtype=torch.float64) for s in splits]
        duals = -result.ineqlin.marginals if rows else []
        for (k, j), dual in zip(where, duals):
            betas[k][0, 0, j] = max(float(dual), 0.0)
        alphas = [torch.zeros(1, 1, s.shape[1], dtype=torch.float64) for s in splits]
        signs = [s.to(torch.float64) for s in splits]
        bound, _, _ = _backward(chain, spec[r:r + 1][None], lowers, uppers, signs, alphas, betas, x_lower, x_upper)
        bounds[r] = bound[0, 0]
    return bounds, points
