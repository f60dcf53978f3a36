"""Manifold-constrained hyper-connections: the 4-stream residual of every block (spec §2.3).

All mixing math is float32; the collapsed block input and the new streams are cast back to the
activation dtype, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mixes(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x `[S, hc, D]` → `ρ · (flatten(x) · fnᵀ)` `[S, n_mix]` with the un-weighted RMS ρ."""
    flat = x.flatten(1).float()
    rho = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    return F.linear(flat, fn) * rho


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax (+eps), then alternate column / row normalisation; `iters` column passes."""
    comb = comb.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def hc_pre(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    iters: int,
    hc_eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[S, hc, D]` → block input u `[S, D]` (x's dtype), post `[S, hc]`, comb `[S, hc, hc]`."""
    hc = x.shape[1]
    mixes = _mixes(x, fn, norm_eps)
    pre_raw, post_raw, comb_raw = mixes.split([hc, hc, hc * hc], dim=-1)
    pre = torch.sigmoid(pre_raw * scale[0] + base[:hc]) + hc_eps
    post = 2 * torch.sigmoid(post_raw * scale[1] + base[hc : 2 * hc])
    comb = comb_raw.unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc :].view(hc, hc)
    comb = sinkhorn(comb, iters, hc_eps)
    u = (pre.unsqueeze(-1) * x.float()).sum(1)
    return u.to(x.dtype), post, comb


def hc_post(
    f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor
) -> torch.Tensor:
    """New streams `X_new[k] = post_k · f + Σ_j comb[j, k] · X[j]` → `[S, hc, D]` in f's dtype."""
    mixed = torch.einsum("sjk,sjd->skd", comb, x.float())
    return (post.unsqueeze(-1) * f.float().unsqueeze(1) + mixed).to(f.dtype)


def hc_head(
    x: torch.Tensor,
    fn: torch.Tensor,
    scale: torch.Tensor,
    base: torch.Tensor,
    hc_eps: float,
    norm_eps: float,
) -> torch.Tensor:
    """Final collapse of the streams, `[S, hc, D]` → `[S, D]`; no Sinkhorn, no post."""
    mixes = _mixes(x, fn, norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
