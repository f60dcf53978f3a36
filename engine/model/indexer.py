"""Lightning indexer of CSA layers: picks which compressed entries each query attends (§2.6.2).

score_t = Σ_h w_h · ReLU(q_h · K_t) over the index keys visible to the query (t < ⌊(p+1)/4⌋);
the top `index_topk` survive. When quantisation is simulated, q and K are Hadamard-rotated and
snapped to FP4 as in the reference; without it the rotation is skipped (it is orthonormal and
applied to both sides, so it does not change exact scores).
"""

from __future__ import annotations

import torch

from flashdesk.engine import kernels
from flashdesk.engine.cache import Fp8KeyRows, NativeRows, RowStore
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
        w = self.weights_proj(a)
        return self.widen(q, w) if widen else (q, w)

    def widen(self, q: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and head weights as computed → float32, the weights scaled (what `scores`
        takes)."""
        return q.float(), w.float() * self.weight_scale

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q `[s, Hi, di]`, w `[s, Hi]`, keys `[T, di]` → `[s, T]` float32."""
        logits = torch.einsum("shd,td->sht", q, keys.float()).relu_()  # no copy if float32
        return torch.einsum("sht,sh->st", logits, w)


def host_scores(q: torch.Tensor, w: torch.Tensor, store: RowStore, t: int) -> torch.Tensor | None:
    """`Indexer.scores` of the store's first `t` keys (rows past its count are scratch) by the
    CPU kernel, read as stored (float32, bfloat16 or FP8 rows; `kernels.index_scores`): no float32
    copy of every key per call, which at 1M tokens of context was most of a CPU decode token.
    Each key's score is computed alone in a fixed order, so a call over more rows gives the same
    values for the rows both cover. None where it does not apply (keys on a GPU, FP4 keys, q or w
    not float32 or not in host memory): the caller runs `Indexer.scores`."""
    parts, codec = store.buffers(), store.codec
    if store.device.type != "cpu" or q.device.type != "cpu" or w.device.type != "cpu":
        return None
    if q.dtype != torch.float32 or w.dtype != torch.float32 or t > store.capacity:
        return None
    if isinstance(codec, NativeRows) and codec.dtype in (torch.float32, torch.bfloat16):
        keys, scale = parts[0][:t], None
    elif isinstance(codec, Fp8KeyRows):
        keys, scale = parts[0][:t], parts[1][:t]
    else:
        return None
    return kernels.index_scores(q.contiguous(), w.contiguous(), keys, scale)
