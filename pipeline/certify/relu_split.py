"""Branch and bound by ReLU splitting, on auto_LiRPA's CROWN bounds.

Input splitting cannot cover a 784-pixel box; splitting an unstable ReLU can: the box is
cut into the sub-domain where the neuron's pre-activation z is >= 0 (there ReLU(z) = z)
and the one where z <= 0 (there ReLU(z) = 0). Together they cover the box, so the
property holds on the box when it holds on both, and each half is bounded more tightly
because the split neuron is no longer relaxed.

A sub-domain is carried as the pre-activation bounds of every ReLU layer, valid on it:
the split constraint is the clamp (active: lower := max(lower, 0); inactive:
upper := min(upper, 0)); the parent's bounds stay valid on a child. auto_LiRPA 0.3
takes them as `reference_bounds` (it recomputes each layer and keeps the tighter of the
two, so later layers profit from the split) and, for a layer fed by the input directly
(which auto_LiRPA bounds by interval arithmetic and never compares with references), as
fixed `intermediate_layer_bounds`; on a clamped bound its ReLU relaxation is the exact
identity or zero. Every bound is thus valid on its sub-domain: a lower bound of the
property's rows above the tolerance refutes the sub-domain, and a sub-domain whose lower
bound of some neuron exceeds its upper bound (by more than the tolerance) is empty.

That is the general path (no β: weak). Where the network is a ReLU chain with affine segments
(`beta_crown.chain_of`), the root's intermediate bounds come from auto_LiRPA and every
sub-domain is bounded by our β-CROWN (split constraints as Lagrangian terms, α and β
optimised); a sub-domain left with no unstable ReLU is affine and is settled by an LP whose
duals, used as β, give the bound (`beta_crown.linear_piece_bound`), its minimiser a candidate
counterexample.

The neuron to split is the unstable one whose relaxation costs the open rows' lower bound
most (an intercept score in the manner of BaBSR: the negative part of the final bound's
coefficient on the ReLU output times the upper relaxation's intercept -l u / (u - l)).
Knows nothing of files, VNNLIB or onnxruntime: the caller refutes rows and tries points.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.certify.beta_crown import chain_of, lower_bound


@dataclass
class Outcome:
    status: str  # "verified" (every sub-domain refuted or empty), "found", "open" (stuck), "deadline"
    domains: int  # sub-domains bounded
    found: object = None  # what `try_points` returned, for "found"
    note: str = ""


@dataclass
class _Batch:
    lowers: list[torch.Tensor]  # per ReLU layer (N, *shape): pre-activation bounds valid on each sub-domain
    uppers: list[torch.Tensor]
    splits: list[torch.Tensor]  # per ReLU layer (N, *shape) int8: +1 split active, -1 split inactive, 0 not split

    def __len__(self) -> int:
        return len(self.lowers[0]) if self.lowers else 0

    def take(self, index) -> "_Batch":
        return _Batch([t[index] for t in self.lowers], [t[index] for t in self.uppers], [t[index] for t in self.splits])

    @staticmethod
    def cat(batches: list["_Batch"]) -> "_Batch":
        batches = [b for b in batches if len(b)]
        return _Batch(*([torch.cat(ts) for ts in zip(*(getattr(b, f) for b in batches))]
                        for f in ("lowers", "uppers", "splits")))


class ReluSplitter:
    """One auto_LiRPA BoundedModule (float64) of a ReLU network; decides properties over a box by splitting.

    `bounded` is built once for this network; `method` is auto_LiRPA's, for the general path.
    """

    def __init__(self, bounded, lirpa, input_shape: tuple[int, ...], method: str = "CROWN", tolerance: float = 1e-6,
                 iterations: int = 20):
        from auto_LiRPA.bound_ops import BoundConv, BoundInput, BoundLinear

        self.bounded, self.lirpa, self.method, self.tolerance = bounded, lirpa, method, tolerance
        self.relus = list(bounded.relus)
        self.pre = [relu.inputs[0] for relu in self.relus]
        # auto_LiRPA bounds these by interval arithmetic and ignores reference bounds there: fix them instead
        self.fixed = {node.name for node in self.pre
                      if type(node) in (BoundLinear, BoundConv) and type(node.inputs[0]) is BoundInput}
        self.input_name = bounded.input_name[0]
        self.chain = chain_of(bounded, input_shape)  # a ReLU chain is bounded by our β-CROWN (far tighter)
        self.iterations = iterations

    # --- one batch of sub-domains -----------------------------------------------------------------
    def _bound(self, x_lower, x_upper, spec, domains: _Batch | None):
        """Lower bounds (N, rows) of spec . f over each sub-domain, the new pre-activation bounds, the
        final bound's coefficients on each ReLU output (or None), and on the input (N, rows, *in).
        The root is bounded by auto_LiRPA (its intermediate bounds are the ones every sub-domain
        starts from); on a chain, by β-CROWN too, and sub-domains by β-CROWN alone."""
        if domains is None:
            lb, root, relu_a, input_a = self._bound_lirpa(x_lower, x_upper, spec, None)
            if self.chain is None:
                return lb, root, relu_a, input_a
            domains = root
        elif self.chain is None:
            return self._bound_lirpa(x_lower, x_upper, spec, domains)
        flat = [t.flatten(1) for t in (domains.lowers + domains.uppers + domains.splits)]
        k = len(domains.lowers)
        lb, relu_a, input_a = lower_bound(self.chain, spec[0], flat[:k], flat[k:2 * k], flat[2 * k:],
                                          x_lower.flatten(1), x_upper.flatten(1), self.iterations)
        relu_a = [a.transpose(0, 1) for a in relu_a]  # (rows, N, n) as auto_LiRPA's
        return lb, domains, relu_a, input_a.reshape(*input_a.shape[:2], *x_lower.shape[1:])

    def _bound_lirpa(self, x_lower, x_upper, spec, domains: _Batch | None):
        from auto_LiRPA.perturbations import PerturbationLpNorm

        n = len(domains) if domains is not None else 1
        lo = x_lower.expand(n, *x_lower.shape[1:])
        hi = x_upper.expand(n, *x_upper.shape[1:])
        ptb = PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi)
        x = self.lirpa.BoundedTensor((lo + hi) / 2, ptb)
        reference, fixed = {}, {}
        if domains is not None:
            for node, low, high in zip(self.pre, domains.lowers, domains.uppers):
                (fixed if node.name in self.fixed else reference)[node.name] = (low, high)
        final = self.bounded.final_name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            lb, _, a_dict = self.bounded.compute_bounds(
                x=(x,), C=spec.expand(n, *spec.shape[1:]), method=self.method, bound_upper=False,
                reference_bounds=reference or None, intermediate_layer_bounds=fixed or None,
                return_A=True, needed_A_dict={final: [self.input_name]})
        lowers, uppers = [], []
        for node, i in zip(self.pre, range(len(self.pre))):
            low, high = node.lower.detach(), node.upper.detach()
            if domains is not None:  # the tighter of the recomputed and the inherited bound
                low, high = torch.maximum(low, domains.lowers[i]), torch.minimum(high, domains.uppers[i])
            lowers.append(low)
            uppers.append(high)
        splits = domains.splits if domains is not None else [torch.zeros(l.shape, dtype=torch.int8) for l in lowers]
        relu_a = [relu.lA.detach() if isinstance(getattr(relu, "lA", None), torch.Tensor) else None
                  for relu in self.relus]
        input_a = a_dict[final][self.input_name]["lA"]
        input_a = input_a.detach() if isinstance(input_a, torch.Tensor) else None
        return lb.detach(), _Batch(lowers, uppers, splits), relu_a, input_a

    def _empty(self, domains: _Batch) -> torch.Tensor:
        """(N,) sub-domains proven empty: some neuron's lower bound above its upper bound."""
        empty = torch.zeros(len(domains), dtype=torch.bool)
        for low, high in zip(domains.lowers, domains.uppers):
            empty |= (low - high > self.tolerance).flatten(1).any(dim=1)
        return empty

    def _choose(self, domains: _Batch, relu_a, open_rows: torch.Tensor):
        """(layer, flat index) per sub-domain of the unstable neuron to split; layer -1 where none is left."""
        best_score = torch.full((len(domains),), -1.0, dtype=torch.float64)
        best_layer = torch.full((len(domains),), -1, dtype=torch.long)
        best_index = torch.zeros(len(domains), dtype=torch.long)
        weight = open_rows.double()  # (N, rows)
        for layer, (low, high) in enumerate(zip(domains.lowers, domains.uppers)):
            low, high = low.flatten(1), high.flatten(1)
            unstable = (low < 0) & (high > 0)
            gap = torch.where(unstable, -low * high / (high - low).clamp_min(1e-12), torch.zeros_like(low))
            score = 1e-6 * gap  # tie-break (and the whole score when the coefficients are not dense)
            a = relu_a[layer]
            if a is not None and a.shape[:2] == (weight.shape[1], len(domains)):  # (rows, N, *shape)
                cost = (-a.flatten(2)).clamp_min(0)  # where the lower bound uses the upper relaxation
                score = score + torch.einsum("rnk,nr->nk", cost, weight) * gap
            score = torch.where(unstable, score, torch.full_like(score, -1.0))
            top, index = score.max(dim=1)
            better = top > best_score
            best_score = torch.where(better, top, best_score)
            best_layer = torch.where(better & (top >= 0), torch.full_like(best_layer, layer), best_layer)
            best_index = torch.where(better, index, best_index)
        best_layer[best_score < 0] = -1
        return best_layer, best_index

    @staticmethod
    def _split(domains: _Batch, layer: torch.Tensor, index: torch.Tensor) -> _Batch:
        """Two children per sub-domain: the chosen neuron active (lower := 0), then inactive (upper := 0)."""
        active, inactive = domains.take(slice(None)), domains.take(slice(None))
        active.lowers = [t.clone() for t in active.lowers]
        inactive.uppers = [t.clone() for t in inactive.uppers]
        active.splits = [t.clone() for t in active.splits]
        inactive.splits = [t.clone() for t in inactive.splits]
        rows = torch.arange(len(domains))
        for k in range(len(domains.lowers)):
            chosen = layer == k
            if not chosen.any():
                continue
            flat_lo = active.lowers[k].view(len(domains), -1)
            flat_hi = inactive.uppers[k].view(len(domains), -1)
            r, i = rows[chosen], index[chosen]
            flat_lo[r, i] = flat_lo[r, i].clamp_min(0.0)
            flat_hi[r, i] = flat_hi[r, i].clamp_max(0.0)
            active.splits[k].view(len(domains), -1)[r, i] = 1
            inactive.splits[k].view(len(domains), -1)[r, i] = -1
        return _Batch.cat([active, inactive])

    def _settle_affine(self, domain: _Batch, spec, offset, x_lower, x_upper, refuted, try_points):
        """None when the sub-domain (no unstable ReLU left) is refuted by the LP-dual bound, else
        (status, found, note): "found" for an LP minimiser the caller confirms, or "open"."""
        from pipeline.certify.beta_crown import linear_piece_bound

        if self.chain is None:
            return "open", None, "a sub-domain has no unstable ReLU left and its bound is still not a proof"
        flat = [t.flatten(1) for t in (domain.lowers + domain.uppers + domain.splits)]
        k = len(domain.lowers)
        bounds, points = linear_piece_bound(self.chain, spec[0], flat[:k], flat[k:2 * k], flat[2 * k:],
                                            x_lower.flatten(1), x_upper.flatten(1))
        bounds = bounds - offset
        if bool(refuted(bounds[None])[0]):
            return None
        candidates = [p for p, b in zip(points, bounds) if p is not None and b <= self.tolerance]
        if candidates:
            open_rows = (bounds <= self.tolerance)[None].expand(len(candidates), -1)
            found = try_points(torch.stack(candidates).reshape(len(candidates), *x_lower.shape[1:]), open_rows)
            if found is not None:
                return "found", found, ""
        return "open", None, "a sub-domain on which the network is affine is neither refuted nor a counterexample"

    # --- the search -------------------------------------------------------------------------------
    def decide(self, x_lower: torch.Tensor, x_upper: torch.Tensor, spec: torch.Tensor, offset: torch.Tensor,
               refuted: Callable[[torch.Tensor], torch.Tensor],
               try_points: Callable[[torch.Tensor, torch.Tensor], object],
               out_of_time: Callable[[], bool], batch: int = 64) -> Outcome:
        """Split until every sub-domain is refuted or empty ("verified"), `try_points` returns
        something ("found"), a sub-domain has no unstable neuron left ("open") or time runs out.

        x_lower/x_upper (1, *in) float64; spec (1, rows, outputs); the property's rows are
        spec . f - offset; `refuted(bounds (N, rows)) -> (N,) bool`; `try_points(points (N, *in),
        rows_open (N, rows))` gets the points minimising each sub-domain's linear lower bound.
        """
        queue = _Batch([], [], [])
        lb, domains, relu_a, input_a = self._bound(x_lower, x_upper, spec, None)
        count = 1
        while True:
            bounds = lb - offset
            keep = ~(refuted(bounds) | self._empty(domains))
            if keep.any():
                bounds, domains, open_rows = bounds[keep], domains.take(keep), bounds[keep] <= self.tolerance
                if input_a is not None:  # the box corner where each worst open row's linear bound is lowest
                    worst = torch.where(open_rows, bounds, torch.full_like(bounds, float("inf"))).argmin(1)
                    a = input_a[keep][torch.arange(len(domains)), worst]
                    corner = torch.where(a >= 0, x_lower.expand_as(a), x_upper.expand_as(a))
                    found = try_points(corner, open_rows)
                    if found is not None:
                        return Outcome("found", count, found)
                layer, index = self._choose(domains, [a if a is None else a[:, keep] for a in relu_a], open_rows)
                if (layer < 0).any():  # the network is affine there: settle each such sub-domain exactly
                    for i in torch.nonzero(layer < 0).flatten().tolist():
                        settled = self._settle_affine(domains.take(slice(i, i + 1)), spec, offset, x_lower, x_upper,
                                                      refuted, try_points)
                        if settled is not None:
                            return Outcome(settled[0], count, settled[1], note=settled[2])
                    domains, layer, index = domains.take(layer >= 0), layer[layer >= 0], index[layer >= 0]
                if len(domains):
                    queue = _Batch.cat([self._split(domains, layer, index), queue])  # children first: a small queue
            if not len(queue):
                return Outcome("verified", count)
            if out_of_time():
                return Outcome("deadline", count)
            take, queue = queue.take(slice(0, batch)), queue.take(slice(batch, None))
            lb, domains, relu_a, input_a = self._bound(x_lower, x_upper, spec, take)
            count += len(take)
