"""Lightning indexer of CSA layers: picks which compressed entries each query attends (§2.6.2).

score_t = Σ_h w_h · ReLU(q_h · K_t) over the index keys visible to the query (t < ⌊(p+1)/4⌋);
the top `index_topk` survive. When quantisation is simulated, q and K are Hadamard-rotated and
snapped to FP4 as in the reference; without it the rotation is skipped (it is orthonormal and
applied to both sides, so it does not change exact scores).
"""

from __future__ import annotations

import torch

from flashdesk.engine.model import qsim
from flashdesk.engine.model.common import Linear
from flashdesk.engine.model.compressor import Compressor
from flashdesk.engine.model.rope import apply_rope


class Indexer:
    def __init__(
        self,
        *,
        wq_b: Linear,  # [Hi·di, q_lora]
        weights_proj: Linear,  # [Hi, D]
        compressor: Compressor,
        n_heads: int,
        head_dim: int,
        topk: int,
    ):
        self.wq_b = wq_b
        self.weights_proj = weights_proj
        self.compressor = compressor
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.topk = topk
        self.weight_scale = head_dim**-0.5 * n_heads**-0.5

    def queries(
        self,
        qr: torch.Tensor,
        a: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        simulate: bool = False,
        widen: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qr `[S, q_lora]`, a `[S, D]` → index queries `[S, Hi, di]`, head weights `[S, Hi]` (fp32).
        `widen` off: both in the activations' dtype and w before `weight_scale`, for
        `gpu_kernels.index_scores`, which widens and scales them itself."""
        s = qr.shape[0]
        q = self.wq_b(qr, simulate).view(s, self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        if simulate:
            q = qsim.fp4_snap(qsim.hadamard(q), 32)
        if not widen:
            return q, self.weights_proj(a)
        w = self.weights_proj(a).float() * self.weight_scale
        return q.float(), w

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q `[s, Hi, di]`, w `[s, Hi]`, keys `[T, di]` → `[s, T]` float32."""
        logits = torch.einsum("shd,td->sht", q, keys.float()).relu_()  # no copy if float32
        return torch.einsum("sht,sh->st", logits, w)
