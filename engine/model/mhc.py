"""Manifold-constrained hyper-connections: the 4-stream residual of every block (spec §2.3).

All mixing math is float32; the collapsed block input and the new streams are cast back to the
activation dtype, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdesk.engine import _kernels, gpu_kernels
from flashdesk.engine.model.common import few_cpu_tokens, into, rms_norm


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x `[S, hc, D]` → `ρ · (flatten(x) · fnᵀ)` `[S, n_mix]` with the un-weighted RMS ρ (a
    few tokens on a GPU with Triton: one launch, `gpu_kernels.hc_mixes`)."""
    if _mixes_on_gpu(x, fn):
        return gpu_kernels.hc_mixes(x, fn, norm_eps)
    flat = x.flatten(1).float()
    rho = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn) * rho


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax (+eps), then alternate column / row normalisation; `iters` column passes.

    As torch ops this is ~6·iters tiny operations per call, ~40% of all a decode step dispatches
    and, on a GPU, as many kernels. On the CPU one C call does it (same order of operations); on
    a GPU one Triton launch (`gpu_kernels.sinkhorn`), or without Triton a decode step (one token)
    replays a captured CUDA graph of the ops (unless the whole step is being captured: then the
    ops join that graph). Elsewhere, or if capture fails, the torch ops."""
    if comb.dtype == torch.float32 and comb.dim() >= 2:
        hc = comb.shape[-1]
        if comb.device.type == "cpu":
            out = comb.contiguous().clone()
            _kernels.sinkhorn(out.data_ptr(), out.numel() // (hc * hc), hc, iters, float(eps))
            return out
        if gpu_kernels.applies(comb) and not hc & (hc - 1):
            return gpu_kernels.sinkhorn(comb, iters, eps)
        if comb.is_cuda and comb.shape[0] == 1 and not torch.cuda.is_current_stream_capturing():
            graphed = _graphed_sinkhorn(comb, iters, eps)
            if graphed is not None:
                return graphed
    return sinkhorn_ops(comb, iters, eps)


def sinkhorn_ops(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn` as torch operations (the definition; any device, any dtype)."""
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


# (device, shape, iters, eps) → (graph, static input, static output); None: capture failed there
_GRAPHS: dict[tuple, tuple | None] = {}


def _graphed_sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor | None:
    """`sinkhorn_ops` replayed from a CUDA graph captured once per shape: one replay instead of
    ~120 kernel launches. None when capture is not possible (then the caller runs the ops)."""
    key = (comb.device, tuple(comb.shape), iters, float(eps))
    entry = _GRAPHS.get(key, ())
    if entry == ():
        entry = None
        try:
            static_in = comb.detach().clone()
            side = torch.cuda.Stream(comb.device)
            side.wait_stream(torch.cuda.current_stream(comb.device))
            with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs need
                sinkhorn_ops(static_in, iters, eps)
            torch.cuda.current_stream(comb.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = sinkhorn_ops(static_in, iters, eps)
            entry = (graph, static_in, static_out)
        except Exception:  # any capture failure: the plain ops still work
            entry = None
        _GRAPHS[key] = entry
    if entry is None:
        return None
    graph, static_in, static_out = entry
    static_in.copy_(comb)
    graph.replay()
    return static_out.clone()


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    hc_eps: float,
    norm_eps: float,
    norm: torch.Tensor | None = None,
    mixes: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[S, hc, D]` → block input u `[S, D]` (x's dtype), post `[S, hc]`, comb `[S, hc, hc]`.
    `norm` `[D]`: u comes back as `rms_norm(u, norm, norm_eps)` (the block's input norm).
    On a GPU with Triton everything after the mixes is one launch, the norm included
    (`gpu_kernels.hc_pre_tail`); a decode step's few tokens on the CPU one C call. `mixes`:
    x's mixes as `hc_post_then` gave them (partial sums, on a GPU), or None. `out`: tensors
    to hold the results (a captured step's fixed buffers), written by the kernel where it can."""
    if mixes is not None:
        got = gpu_kernels.hc_pre_tail(mixes, x, scale, base, iters, hc_eps, norm, norm_eps, out)
    else:
        got = _hc_pre_any(x, fn, scale, base, iters, hc_eps, norm_eps, norm, out)
    return into(out, got)


def _hc_pre_any(x, fn, scale, base, iters, hc_eps, norm_eps, norm, out):
    """`hc_pre` by the C kernel (a decode step's few tokens on the CPU) or torch's ops (into
    `out` where the GPU's tail kernel takes it)."""
    if not gpu_kernels.applies(x) and _cpu_call(x, fn, scale, base):
        S, hc, D = x.shape
        u = torch.empty((S, D), dtype=x.dtype)
        post, comb = torch.empty((S, hc)), torch.empty((S, hc, hc))
        _kernels.hc_pre(
            x.data_ptr(), x.dtype is torch.bfloat16, S, hc, D, fn.data_ptr(), scale.data_ptr(),
            base.data_ptr(), iters, float(hc_eps), float(norm_eps), u.data_ptr(),
            post.data_ptr(), comb.data_ptr(),
        )  # fmt: skip
        return _normed(u, norm, norm_eps), post, comb
    return hc_pre_ops(x, fn, scale, base, iters, hc_eps, norm_eps, norm, out)


def _normed(u: torch.Tensor, norm: torch.Tensor | None, eps: float) -> torch.Tensor:
    return u if norm is None else rms_norm(u, norm, eps)


def _cpu_call(x: torch.Tensor, *float32: torch.Tensor) -> bool:
    """Whether a hyper-connection call can take the C path (up to 16 streams)."""
    return x.dim() == 3 and x.shape[1] <= 16 and few_cpu_tokens(x, *float32)


def hc_pre_ops(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    hc_eps: float,
    norm_eps: float,
    norm: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hc_pre` as torch operations (and the GPU's fused tail, into `out` where it can)."""
    hc = x.shape[1]
    mixes = _mixes(x, fn, norm_eps)
    if gpu_kernels.applies(x) and not hc & (hc - 1):
        return gpu_kernels.hc_pre_tail(mixes, x, scale, base, iters, hc_eps, norm, norm_eps, out)
    pre_raw, post_raw, comb_raw = mixes.split([hc, hc, hc * hc], dim=-1)
    pre = torch.sigmoid(pre_raw * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(post_raw * scale[1] + base[hc : 2 * hc])
    comb = comb_raw.unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc :].view(hc, hc)
    comb = sinkhorn(comb, iters, hc_eps)
    u = (pre.unsqueeze(-1) * x.float()).sum(1)
    return _normed(u.to(x.dtype), norm, norm_eps), post, comb


def hc_post(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    add: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """New streams `X_new[k] = post_k · f + Σ_j comb[j, k] · X[j]` → `[S, hc, D]` in x's dtype,
    f (block output `[S, D]`) taken as rounded to x's dtype. `add`: float32 partial sums
    `[S, D]` or `[S, n, D]`, or two such, added to f before that rounding (a decode step's routed
    experts, so that their sum and the rounding need no launches of their own). On a GPU with
    Triton in one launch: `gpu_kernels.hc_post`; a decode step's few tokens on the CPU one C
    call."""
    return hc_post_then(f, x, post, comb, add)[0]


def hc_post_then(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    add: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    then: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`hc_post` → (the new streams, their mixes for the next site or None). `then`: that
    site's mixes weights `[n_mix, hc·D]`; where the GPU's kernel takes them (a decode step's
    few tokens, the mixes' own kernel checked) it also sums the new streams against them in
    the same launch, for `hc_pre(mixes=)`: two launches fewer a layer. `out`: a tensor to
    hold the streams (a captured step's fixed buffer)."""
    hc = x.shape[1]
    if gpu_kernels.applies(x) and not hc & (hc - 1):
        if then is not None and gpu_kernels.FUSED_SEAMS and _mixes_on_gpu(x, then):
            return gpu_kernels.hc_post(f, x, post, comb, add, then, out)
        return gpu_kernels.hc_post(f, x, post, comb, add, out=out), None
    streams = _hc_post_any(f, x, post, comb, add)
    return (streams if out is None else out.copy_(streams)), None


def _hc_post_any(f, x, post, comb, add):
    """`hc_post` by the C kernel (a decode step's few tokens on the CPU) or torch's ops."""
    hc = x.shape[1]
    if isinstance(add, tuple):  # the other paths take one tensor of partial sums
        add = torch.cat([a.reshape(x.shape[0], -1, x.shape[2]) for a in add], dim=1)
    plain = (torch.float32, torch.bfloat16)
    if (
        _cpu_call(x, post, comb, *(() if add is None else (add,)))
        and f.device.type == "cpu"
        and f.dtype in plain
        and f.is_contiguous()
        and tuple(f.shape) == (x.shape[0], x.shape[2])
        and (add is None or add.dim() in (2, 3))
    ):
        S, _, D = x.shape
        out = torch.empty_like(x)
        add_n = 0 if add is None else (1 if add.dim() == 2 else add.shape[1])
        _kernels.hc_post(
            f.data_ptr(), f.dtype is torch.bfloat16, 0 if add is None else add.data_ptr(), add_n,
            x.data_ptr(), x.dtype is torch.bfloat16, S, hc, D, post.data_ptr(), comb.data_ptr(),
            out.data_ptr(),
        )  # fmt: skip
        return out
    return hc_post_ops(f, x, post, comb, add)


def _mixes_on_gpu(x: torch.Tensor, fn: torch.Tensor) -> bool:
    """Whether the GPU's mixes kernels take x and fn (`hc_mixes`, and `hc_post(then=)`): a few
    tokens, float32 weights, the kernels checked on this device."""
    few = x.shape[0] <= gpu_kernels.MAX_TOKENS and fn.dtype == torch.float32
    return (
        few and gpu_kernels.applies(x) and gpu_kernels.checked("hyper-connection mixes", x.device)
    )


def hc_post_ops(
    f: torch.Tensor,
    x: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hc_post` as torch operations."""
    if add is not None:
        f = f.float() + (add.sum(1) if add.dim() == 3 else add)
    mixed = torch.einsum("sjk,sjd->skd", comb, x.float())
    return (post.unsqueeze(-1) * f.to(x.dtype).float().unsqueeze(1) + mixed).to(x.dtype)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
    norm: torch.Tensor | None = None,
    mixes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final collapse of the streams, `[S, hc, D]` → `[S, D]`; no Sinkhorn, no post. `norm`
    `[D]`: the collapse RMS-normed (the model's final norm, eps norm_eps). `mixes`: x's mixes
    as `hc_post_then` gave them, or None. On a GPU with the fused norms, one launch after the
    mixes (`gpu_kernels.hc_head_tail`; as torch ops six and the norm's)."""
    dim = x.shape[2]
    one_launch = norm is not None and gpu_kernels.applies(x) and not dim & (dim - 1)
    if one_launch and gpu_kernels.fusing_norms(x.device):
        on = mixes if mixes is not None else _mixes(x, fn, norm_eps)
        return gpu_kernels.hc_head_tail(on, x, scale, base, hc_eps, norm, norm_eps)
    if mixes is None or mixes.dim() == 3:  # partial sums are only for the kernel above
        mixes = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + hc_eps
    h = (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
    return h if norm is None else rms_norm(h, norm, norm_eps)
