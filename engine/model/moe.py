"""Mixture of experts (spec §2.7): sqrt-softplus router, bias used only to rank, hash routing by
token id in the first layers, renormalised weights × routed_scaling_factor, clamped SwiGLU experts
with the routing weight applied before `w2`, plus one always-on shared expert.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from flashdesk.engine import gpu_kernels
from flashdesk.engine.model import qsim
from flashdesk.engine.model.common import Linear, float_linear


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, limit: float, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """silu(min(gate, limit)) · clamp(up, ±limit) computed in float32 (no clamp when limit is
    0) → out_dtype; on a GPU with Triton one launch (`gpu_kernels.swiglu`) instead of seven."""
    if gpu_kernels.applies(gate):
        return gpu_kernels.swiglu(gate, up, limit, out_dtype)
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return (F.silu(gate) * up).to(out_dtype)


class Router:
    def __init__(
        self,
        *,
        weight: torch.Tensor,  # [E, D] float32
        bias: torch.Tensor | None,  # [E] float32 (score-routed layers)
        tid2eid: torch.Tensor | None,  # [V, k] int64 (hash-routed layers)
        top_k: int,
        scale: float,
    ):
        if (bias is None) == (tid2eid is None):
            raise ValueError("a router has either a bias (learned top-k) or tid2eid (hash)")
        self.weight, self.bias, self.tid2eid = weight, bias, tid2eid
        self.top_k = top_k
        self.scale = scale

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[T, D]`, token ids `[T]` → expert ids `[T, k]` (int64), weights `[T, k]` float32."""
        logits = float_linear(x, self.weight)
        if gpu_kernels.applies(logits) and gpu_kernels.checked("routing", logits.device):
            picked = self.tid2eid[ids] if self.tid2eid is not None else None
            return gpu_kernels.route(logits, self.bias, picked, self.top_k, self.scale)
        return self._route_ops(logits, ids)

    def route_and_record(self, x: torch.Tensor, ids: torch.Tensor, record, out=None) -> tuple:
        """`self(x, ids)` with the routing log's record of the picks in the same launch
        (`gpu_kernels.route(record=)`, a `RoutingRecord`) → experts, weights and the host ids
        `[T, k]` (written into `out`'s three tensors where given). For a GPU where the
        "routing" and "routing log" kernels passed their checks."""
        logits = float_linear(x, self.weight)
        picked = self.tid2eid[ids] if self.tid2eid is not None else None
        return gpu_kernels.route(logits, self.bias, picked, self.top_k, self.scale, record, out)

    def _route_ops(self, logits: torch.Tensor, ids: torch.Tensor):
        """The routing after the gate as torch operations."""
        scores = F.softplus(logits).sqrt()
        if self.tid2eid is not None:
            experts = self.tid2eid[ids]
        else:
            experts = (scores + self.bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        weights = weights / weights.sum(-1, keepdim=True) * self.scale
        return experts, weights


class DenseExperts:
    """Routed experts held dequantized as stacked tensors (the plain torch path).

    w1, w3 `[E, I, D]`, w2 `[E, D, I]`. The runtime may replace this object with any callable of
    the same signature (e.g. the FP4 CPU kernels).
    """

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, limit: float):
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.limit = limit

    @property
    def count(self) -> int:
        return self.w1.shape[0]

    def __call__(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        simulate: bool = False,
    ) -> torch.Tensor:
        """x `[T, D]`, experts/weights `[T, k]` → Σ_k weight·expert(x) `[T, D]` float32."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        xin = qsim.act_snap(x) if simulate else x
        xin = xin.to(self.w1.dtype)
        for e in torch.unique(experts).tolist():
            rows, slot = torch.where(experts == e)
            xs = xin[rows]
            h = swiglu(F.linear(xs, self.w1[e]), F.linear(xs, self.w3[e]), self.limit)
            h = (h * weights[rows, slot, None]).to(x.dtype)
            if simulate:
                h = qsim.act_snap(h)
            # a token picks an expert at most once, so `rows` has no repeats
            out[rows] += F.linear(h.to(self.w2.dtype), self.w2[e]).float()
        return out


class SharedExpert:
    def __init__(self, w1: Linear, w2: Linear, w3: Linear, limit: float):
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.limit = limit
        # the GPU runtime's w1 and w3 in one launch (`gpu_linears.JoinedRows`: called → the
        # two outputs, `.whole` → them side by side), or None
        self.w13: Any = None

    def __call__(self, x: torch.Tensor, simulate: bool = False, widen: bool = True) -> torch.Tensor:
        """x `[T, D]` → `[T, D]` float32 (`widen` off: in x's dtype, for a consumer that widens
        it in its own kernel)."""
        if self.w13 is not None and not simulate:
            joined = self.w13.whole(x)
            after = getattr(self.w2, "after_swiglu", None)  # the GPU runtime's FP8 w2
            if after is not None and joined.dtype == x.dtype:  # SwiGLU rounds to x's dtype
                y = after(joined, self.limit)
                return y.float() if widen else y
            gate, up = joined.split(self.w13.sizes, dim=-1)
        else:
            gate, up = self.w1(x, simulate), self.w3(x, simulate)
        h = swiglu(gate, up, self.limit, x.dtype)
        y = self.w2(h, simulate)
        return y.float() if widen else y


class MoE:
    def __init__(self, router: Router, experts: DenseExperts, shared: SharedExpert):
        self.router = router
        self.experts = experts
        self.shared = shared

    def forward(self, x: torch.Tensor, ids: torch.Tensor, simulate: bool = False) -> torch.Tensor:
        """x `[T, D]` (normed), token ids `[T]` → `[T, D]` in x's dtype."""
        experts, weights = self.router(x, ids)
        y = self.experts(x, experts, weights, simulate)
        y += self.shared(x, simulate)
        return y.to(x.dtype)
