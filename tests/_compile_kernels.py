"""Compile every Triton kernel of engine/gpu_kernels.py for a Hopper GPU without one: Triton's
compiler and the `ptxas` its wheel carries run anywhere. Run by tests/test_gpu_kernels_compile.py
in a process without Triton's interpreter (which replaces the compiler).

Usage: python tests/_compile_kernels.py → one JSON object: kernel label (suffixed " @ sm_86" /
" @ sm_89" for the desktop GPUs) → {"registers", "spill_bytes"} or {"error"}. The shapes are
V4-Flash's with the module's default tiles: what a GPU compiles first, so a kernel that cannot
compile, or spills registers, shows here before a lent GPU's minutes are spent on it (or a
user's: Triton cannot build the fp8e4nv type for an RTX 30 card, which this found). Pointers
are compiled as aligned to 16 bytes, as Triton specializes them for torch's allocations at run
time (its loads vectorize only then).

The decode expert kernels also report "loop_instructions_per_weight": the SASS instructions of
their hottest loop (the wheel's `nvdisasm`) per FP4 weight it reads. On a GPU they are bound by
instructions, not bytes (run 5: 0.29 × the copy bandwidth), so this count is their cost model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashdesk.engine import gpu_kernels as gk

D, INTER, TOPK, HEADS, HEAD_DIM, ROPE_HALF = 4096, 2048, 6, 64, 512, 32
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _sig(text: str, constexprs: dict) -> dict:
    """ "name:type, ..." (types as Triton spells them) plus the constexpr names."""
    sig = dict(item.strip().split(":") for item in text.split(",") if item.strip())
    return sig | dict.fromkeys(constexprs, "constexpr")


# `_ropes_kernel`'s third part: the index queries (roped only), or left out (kv's arguments
# again, no programs)
ROPES_THIRD_PART = (
    (
        "ropes, q kv and index queries",
        "bf16",
        {"H2": HEADS, "D2": 128, "NB2": 64, "B2": 128, "N2": False, "W2": False},
    ),
    (
        "ropes, q and kv",
        "fp32",
        {"H2": 1, "D2": HEAD_DIM, "NB2": 512, "B2": HEAD_DIM, "N2": True, "W2": True},
    ),
)


def _moe_specs(tag: str, tiles: tuple, warps: int, mode: tuple, stages: int = 1) -> list:
    """The decode expert kernels (`gpu_kernels.moe`) at one kernel shape (`stages`: steps in
    flight, FP4_STAGES). MODE 4 (the integer dots): int8 activations and h, 32 gate/up rows at
    least, mode[1] gate and up in one loop; and the int8 quantization of x before them."""
    fp4 = "w1_ptr:*u8, s1_ptr:*u8, w3_ptr:*u8, s3_ptr:*u8"
    q8 = mode[0] == 4
    x, h, steps = ("i8", "i8", "fp32") if q8 else ("bf16", "fp32", "bf16")
    bn_up, bkb_up = (
        gk._block(INTER, max(32, tiles[0]) if q8 else tiles[0]),
        gk._block(D // 2, tiles[1]),
    )
    bn_dn, bkb_dn = gk._block(D, tiles[2]), gk._block(INTER // 2, tiles[3])
    shared = {"TOPK": TOPK, "D": D, "INTER": INTER, "MODE": mode[0]}
    shared |= {"STAGES": stages} if stages > 1 else {}
    kind = " int8" if q8 else ""
    specs = [
        (
            f"moe{kind} gate/up{tag}",
            gk._gate_up_kernel,
            f"x_ptr:*{x}, xd_ptr:*{steps}, experts_ptr:*i64, weights_ptr:*fp32, "
            f"slot_ptr:*i32, {fp4}, h_ptr:*{h}, hd_ptr:*fp32, limit:fp32",
            shared | {"BN": bn_up, "BKB": bkb_up, "F16": mode[1]},
            {"num_warps": warps},
        ),
        (
            f"moe{kind} down{tag}",
            gk._down_kernel,
            f"h_ptr:*{h}, hd_ptr:*fp32, experts_ptr:*i64, slot_ptr:*i32, w2_ptr:*u8, "
            "s2_ptr:*u8, out_ptr:*fp32",
            shared
            | {"BN": bn_dn, "BKB": bkb_dn, "F16": 0 if q8 else mode[1]}
            | {"SPLIT": (*mode, 0)[2]},
            {"num_warps": warps},
        ),
    ]
    if q8:
        specs.append(
            (
                f"int8 activations{tag}",
                gk._q8_kernel,
                "x_ptr:*bf16, q_ptr:*i8, d_ptr:*fp32",
                {"K": D, "BK": 1024},
                {"num_warps": 4},
            )
        )
    return specs


def _specs() -> list[tuple[str, object, str, dict, dict]]:
    """(label, kernel, signature, constexprs, options) at the module's current defaults."""
    route_log = (
        "resident_ptr:*i1, in_place_ptr:*i1, counts_ptr:*i64, device_picks_ptr:*i64, "
        "total_picks_ptr:*i64, host_ptr:*i64"
    )
    fp4 = "w1_ptr:*u8, s1_ptr:*u8, w3_ptr:*u8, s3_ptr:*u8"
    shared = {"TOPK": TOPK, "D": D, "INTER": INTER}
    # the default decode expert kernels, and the word-wise (MODE 2) decode the sweep times
    specs = _moe_specs("", gk.TILES, gk.WARPS, gk.FP4_MODE)
    specs += _moe_specs(" words", *gk.FP4_WORDS)
    specs += _moe_specs(" staged", gk.TILES, gk.WARPS, gk.FP4_MODE, 3)  # the sweep's pipelined
    specs += _moe_specs("", *gk.FP4_INT8)  # the integer dots (MODE 4)
    tiles, warps, mode = gk.FP4_INT8  # and with gate and up in one loop, as the sweep times it
    specs += _moe_specs(" joint", tiles, warps, (4, 1, *mode[2:]))[:1]
    for label, (bm, bn, bkb), warps in (
        ("grouped", gk.GROUPED_TILES, gk.GROUPED_WARPS),
        ("by pick", gk.BY_PICK_TILES, gk.BY_PICK_WARPS),
    ):
        tiles = {"BM": bm, "BN": bn, "BKB": bkb, "IEEE": False}
        specs += [
            (
                f"{label} gate/up",
                gk._grouped_gate_up_kernel,
                f"x_ptr:*bf16, picks_ptr:*i64, blocks_ptr:*i32, block0:i32, weights_ptr:*fp32, "
                f"{fp4}, h_ptr:*bf16, limit:fp32",
                shared | tiles,
                {"num_warps": warps},
            ),
            (
                f"{label} down",
                gk._grouped_down_kernel,
                "h_ptr:*bf16, picks_ptr:*i64, blocks_ptr:*i32, block0:i32, w2_ptr:*u8, "
                "s2_ptr:*u8, out_ptr:*fp32",
                {"D": D, "INTER": INTER} | tiles,
                {"num_warps": warps},
            ),
        ]
    bm, bn, bk = gk.LINEAR_TILES
    for name, n, k, groups, x, w, out in (
        ("wq_b", 32768, 1024, 1, "bf16", "fp8e4nv", "bf16"),
        ("wo_a", 8192, 4096, 8, "bf16", "fp8e4nv", "bf16"),
        ("head", 129280, 4096, 1, "fp32", "bf16", "fp32"),
        ("compressor wkv", 1024, 4096, 1, "bf16", "bf16", "fp32"),  # FP32-math, stored BF16
    ):
        fixed = {"N": n, "K": k, "X_STRIDE": groups * k, "GROUP_ROWS": n // groups}
        fixed["HAS_SCALE"] = w == "fp8e4nv"
        for bk, split in ((gk.LINEAR_ROWS_K, 1), (512, 4)):  # the default, a wide split one
            specs.append(
                (
                    f"linear rows {name} K step {bk} split {split}",
                    gk._linear_kernel,
                    f"x_ptr:*{x}, w_ptr:*{w}, s_ptr:*u8, out_ptr:*{out}, T:i32",
                    fixed
                    | {"BN": gk.LINEAR_ROWS[0], "BK": bk, "SPLIT": split}
                    | {"UNROLL": gk._block(k // (split * bk), gk.LINEAR_ROWS_UNROLL)},
                    {"num_warps": gk.LINEAR_ROWS[1]},
                )
            )
        specs.append(  # the sweep's A/B: 3 steps in flight, not unrolled (LINEAR_ROWS_STAGES)
            (
                f"linear rows {name} staged",
                gk._linear_kernel,
                f"x_ptr:*{x}, w_ptr:*{w}, s_ptr:*u8, out_ptr:*{out}, T:i32",
                fixed | {"BN": gk.LINEAR_ROWS[0], "BK": 512, "SPLIT": 1, "STAGES": 3},
                {"num_warps": gk.LINEAR_ROWS[1]},
            )
        )
        if w == "fp8e4nv":
            specs.append(
                (
                    f"linear dot {name}",
                    gk._linear_dot_kernel,
                    f"x_ptr:*{x}, w_ptr:*{w}, s_ptr:*u8, out_ptr:*fp32, T:i32",
                    fixed | {"BM": bm, "BN": bn, "BK": bk, "SPLIT": 2, "IEEE": False},
                    {"num_warps": 4}
                    | ({"num_stages": gk.LINEAR_STAGES} if gk.LINEAR_STAGES else {}),
                )
            )
    # the shared expert's w2 reading SwiGLU of its joined w1/w3 output (`linear(glu=)`)
    specs.append(
        (
            "linear rows shared w2 after SwiGLU",
            gk._linear_kernel,
            "x_ptr:*bf16, w_ptr:*fp8e4nv, s_ptr:*u8, out_ptr:*bf16, T:i32",
            {"N": D, "K": INTER, "X_STRIDE": 2 * INTER, "GROUP_ROWS": D, "HAS_SCALE": True}
            | {"BN": gk.LINEAR_ROWS[0], "BK": gk.LINEAR_ROWS_K, "SPLIT": 1}
            | {"UNROLL": gk.LINEAR_ROWS_UNROLL, "GLU": True, "GLU_LIMIT": 10.0},
            {"num_warps": gk.LINEAR_ROWS[1]},
        )
    )
    # wq_b (joined with the indexer's) reading the q_a norm (`linear(norm=)`)
    specs.append(
        (
            "linear rows wq_b + indexer wq_b, q_a normed",
            gk._linear_kernel,
            "x_ptr:*bf16, w_ptr:*fp8e4nv, s_ptr:*u8, out_ptr:*bf16, T:i32, nw_ptr:*fp32, eps:fp32",
            {"N": 40960, "K": 1024, "X_STRIDE": 1024, "GROUP_ROWS": 40960, "HAS_SCALE": True}
            | {"BN": 16, "BK": 512, "SPLIT": 1, "UNROLL": 2, "NORM": True, "NORM_BLOCK": 1024},
            {"num_warps": 4},
        )
    )
    # a compressed layer's wq_a + wkv (FP8) and its compressors' projections (BF16) at once
    for label, n1 in (("CSA", 2624), ("HCA", 1024)):
        consts = {"N0": 1536, "K0": D, "X_STRIDE0": D, "HAS_SCALE0": True, "BN0": 8}
        consts |= {"BK0": 1024, "UNROLL0": 4, "STAGES0": 1, "N1": n1, "K1": D, "X_STRIDE1": D}
        consts |= {"HAS_SCALE1": False, "BN1": 4, "BK1": 2048, "UNROLL1": 2, "STAGES1": 1}
        specs.append(
            (
                f"linear pair {label} attention inputs",
                gk._linear_pair_kernel,
                "T:i32, x0:*bf16, w0:*fp8e4nv, s0:*u8, out0:*bf16, x1:*bf16, w1:*bf16, s1:*bf16, "
                "out1:*fp32",
                consts,
                {"num_warps": 4},
            )
        )
    # the sweep's shapes for the small linears (bench gpu-kernels, LINEAR_ROWS_BY_SHAPE)
    for bn_, warps_, bk_ in ((8, 4, 1024), (8, 8, 2048), (4, 4, 2048), (16, 8, 1024)):
        for name, n, w, out in (("wq_a", 1024, "fp8e4nv", "bf16"), ("gate", 256, "bf16", "fp32")):
            fixed = {"N": n, "K": 4096, "X_STRIDE": 4096, "GROUP_ROWS": n}
            specs.append(
                (
                    f"linear rows {name} {bn_}x{bk_}/{warps_}w",
                    gk._linear_kernel,
                    f"x_ptr:*bf16, w_ptr:*{w}, s_ptr:*u8, out_ptr:*{out}, T:i32",
                    fixed
                    | {"HAS_SCALE": w == "fp8e4nv", "BN": bn_, "BK": bk_, "SPLIT": 1}
                    | {"UNROLL": gk._block(4096 // bk_, gk.LINEAR_ROWS_UNROLL)},
                    {"num_warps": warps_},
                )
            )
    specs += [
        (
            "dequant fp4",
            gk._dequant_fp4_kernel,
            "w_ptr:*u8, s_ptr:*u8, out_ptr:*bf16",
            {"K": D, "BN": 16, "BKB": 64},
            {},
        ),
        (
            "sinkhorn",
            gk._sinkhorn_kernel,
            "x_ptr:*fp32, out_ptr:*fp32, eps:fp32",
            {"ITERS": 20, "HC": 4},
            {},
        ),
        (
            "rms norm",
            gk._rms_norm_kernel,
            "x_ptr:*bf16, w_ptr:*fp32, out_ptr:*bf16, eps:fp32",
            {"N": D, "BLOCK": D, "HAS_W": True},
            {"num_warps": 8},
        ),
        (
            "rope",
            gk._rope_kernel,
            "x_ptr:*bf16, cos_ptr:*fp32, sin_ptr:*fp32, out_ptr:*bf16",
            {
                "SIGN": 1.0,
                "H": HEADS,
                "D": HEAD_DIM,
                "HALF": ROPE_HALF,
                "NOPE_BLOCK": 512,
                "HALF_BLOCK": ROPE_HALF,
            },
            {},
        ),
        (
            "rope, normed",
            gk._rope_kernel,
            "x_ptr:*bf16, cos_ptr:*fp32, sin_ptr:*fp32, out_ptr:*bf16, w_ptr:*fp32, eps:fp32",
            {
                "SIGN": 1.0,
                "H": 1,
                "D": HEAD_DIM,
                "HALF": ROPE_HALF,
                "NOPE_BLOCK": 512,
                "HALF_BLOCK": ROPE_HALF,
                "NORM": True,
                "BLOCK": HEAD_DIM,
                "HAS_W": True,
            },
            {},
        ),
        *(  # a decode step's q (per head, normed), kv (normed · w) and index queries at once
            (
                label,
                gk._ropes_kernel,
                "cos_ptr:*fp32, sin_ptr:*fp32, eps:fp32, T:i32, x0:*bf16, o0:*bf16, w0:*bf16, "
                f"x1:*bf16, o1:*bf16, w1:*fp32, x2:*bf16, o2:*bf16, w2:*{w2}",
                {"HALF": ROPE_HALF, "HALF_BLOCK": ROPE_HALF}
                | {"H0": HEADS, "D0": HEAD_DIM, "NB0": 512, "B0": HEAD_DIM, "N0": True}
                | {"W0": False, "H1": 1, "D1": HEAD_DIM, "NB1": 512, "B1": HEAD_DIM, "N1": True}
                | {"W1": True}
                | third,
                {},
            )
            for label, w2, third in ROPES_THIRD_PART
        ),
        (
            "hc pre",
            gk._hc_pre_kernel,
            "mix_ptr:*fp32, x_ptr:*bf16, scale_ptr:*fp32, base_ptr:*fp32, u_ptr:*bf16, "
            "post_ptr:*fp32, comb_ptr:*fp32, hc_eps:fp32",
            {"ITERS": 20, "HC": 4, "D": D, "BLOCK_D": 256, "PARTS": 0, "PB": 1},
            {},
        ),
        (
            "hc pre, normed",
            gk._hc_pre_kernel,
            "mix_ptr:*fp32, x_ptr:*bf16, scale_ptr:*fp32, base_ptr:*fp32, u_ptr:*bf16, "
            "post_ptr:*fp32, comb_ptr:*fp32, hc_eps:fp32, w_ptr:*fp32, eps:fp32",
            {"ITERS": 20, "HC": 4, "D": D, "BLOCK_D": D, "NORM": True, "PARTS": 0, "PB": 1},
            {"num_warps": 8},
        ),
        (  # a decode step's: the mixes as the hyper-connection update summed them in parts
            "hc pre, normed, from parts",
            gk._hc_pre_kernel,
            "mix_ptr:*fp32, x_ptr:*bf16, scale_ptr:*fp32, base_ptr:*fp32, u_ptr:*bf16, "
            "post_ptr:*fp32, comb_ptr:*fp32, hc_eps:fp32, w_ptr:*fp32, eps:fp32",
            {"ITERS": 20, "HC": 4, "D": D, "BLOCK_D": D, "NORM": True, "PARTS": D // 64}
            | {"PB": D // 64},
            {"num_warps": 8},
        ),
        (  # the model's last collapse and final norm, from the last update's partial sums
            "hc head, normed, from parts",
            gk._hc_pre_kernel,
            "mix_ptr:*fp32, x_ptr:*bf16, scale_ptr:*fp32, base_ptr:*fp32, u_ptr:*bf16, "
            "post_ptr:*bf16, comb_ptr:*bf16, hc_eps:fp32, w_ptr:*fp32, eps:fp32",
            {"ITERS": 1, "HC": 4, "D": D, "BLOCK_D": D, "NORM": True, "PARTS": D // 64}
            | {"PB": D // 64, "HEAD": True},
            {"num_warps": 8},
        ),
        (
            "hc mixes",
            gk._hc_mixes_kernel,
            "x_ptr:*bf16, fn_ptr:*fp32, out_ptr:*fp32, eps:fp32",
            {"K": 4 * D, "BK": 4096},
            {"num_warps": 8},
        ),
        *(  # alone, and (a decode step's) routed and logged in one launch
            (
                label,
                gk._route_kernel,
                "logits_ptr:*fp32, bias_ptr:*fp32, picked_ptr:*i64, experts_ptr:*i64, "
                "weights_ptr:*fp32, scale:fp32, " + route_log,
                {"E": 256, "BE": 256, "K": TOPK, "BK": 8, "HASH": False}
                | dict.fromkeys(("RECORD", "HAS_RESIDENT", "HITS", "IN_PLACE"), record),
                {},
            )
            for label, record in (("route", False), ("route and record", True))
        ),
        (
            "hc post",
            gk._hc_post_kernel,
            "f_ptr:*bf16, add_ptr:*bf16, add2_ptr:*bf16, x_ptr:*bf16, post_ptr:*fp32, "
            "comb_ptr:*fp32, out_ptr:*bf16",
            {"HC": 4, "D": D, "BLOCK_D": 256, "N_ADD": 0, "N_ADD2": 0, "NM": 0},
            {},
        ),
        (  # a decode step's: the shared expert plus the routed experts' partial sums per pick
            "hc post with the experts' sums",
            gk._hc_post_kernel,
            "f_ptr:*bf16, add_ptr:*fp32, add2_ptr:*fp32, x_ptr:*bf16, post_ptr:*fp32, "
            "comb_ptr:*fp32, out_ptr:*bf16",
            {"HC": 4, "D": D, "BLOCK_D": 256, "N_ADD": TOPK, "N_ADD2": 0, "NM": 0},
            {},
        ),
        (  # the VRAM cache's picks and the in-place reads', two tensors
            "hc post with two tensors of sums",
            gk._hc_post_kernel,
            "f_ptr:*bf16, add_ptr:*fp32, add2_ptr:*fp32, x_ptr:*bf16, post_ptr:*fp32, "
            "comb_ptr:*fp32, out_ptr:*bf16",
            {"HC": 4, "D": D, "BLOCK_D": 256, "N_ADD": TOPK, "N_ADD2": TOPK, "NM": 0},
            {},
        ),
        (  # after a host-expert layer: the device's share plus the CPU's
            "hc post after a host layer",
            gk._hc_post_kernel,
            "f_ptr:*fp32, add_ptr:*fp32, add2_ptr:*fp32, x_ptr:*bf16, post_ptr:*fp32, "
            "comb_ptr:*fp32, out_ptr:*bf16",
            {"HC": 4, "D": D, "BLOCK_D": 256, "N_ADD": 1, "N_ADD2": 0, "NM": 0},
            {},
        ),
        (  # and the next site's mixes summed in parts in the same launch
            "hc post with the next mixes",
            gk._hc_post_kernel,
            "f_ptr:*bf16, add_ptr:*fp32, add2_ptr:*fp32, x_ptr:*bf16, post_ptr:*fp32, "
            "comb_ptr:*fp32, out_ptr:*bf16, fn_ptr:*fp32, parts_ptr:*fp32",
            {"HC": 4, "D": D, "BLOCK_D": 64, "N_ADD": TOPK, "N_ADD2": TOPK, "NM": 24, "NMB": 32},
            {},
        ),
        (  # a host layer's device share: the shared expert and both tensors of sums
            "sum parts",
            gk._sum_parts_kernel,
            "f_ptr:*bf16, add_ptr:*fp32, add2_ptr:*fp32, out_ptr:*fp32",
            {"D": D, "BLOCK_D": 256, "N_ADD": TOPK, "N_ADD2": TOPK},
            {},
        ),
        (
            "swiglu",
            gk._swiglu_kernel,
            "gate_ptr:*bf16, up_ptr:*bf16, out_ptr:*bf16, limit:fp32, N:i32",
            {"BLOCK": 1024, "CLAMP": True},
            {},
        ),
        (
            "indexer scores",
            gk._index_scores_kernel,
            "q_ptr:*bf16, w_ptr:*bf16, keys_ptr:*bf16, kscale_ptr:*fp32, pos_ptr:*i64, "
            "out_ptr:*fp32, scale:fp32, C:i32",
            {"RATIO": 4, "H": 64, "D": 128, "BT": gk.INDEX_ROWS, "IEEE": False, "KSCALE": False},
            {},
        ),
        (
            "indexer scores, FP8 keys",
            gk._index_scores_kernel,
            "q_ptr:*bf16, w_ptr:*bf16, keys_ptr:*u8, kscale_ptr:*fp32, pos_ptr:*i64, "
            "out_ptr:*fp32, scale:fp32, C:i32",
            {"RATIO": 4, "H": 64, "D": 128, "BT": gk.INDEX_ROWS, "IEEE": False, "KSCALE": True},
            {},
        ),
        (
            "routing log",
            gk._record_picks_kernel,
            "experts_ptr:*i64, resident_ptr:*i1, in_place_ptr:*i1, counts_ptr:*i64, "
            "device_picks_ptr:*i64, total_picks_ptr:*i64, host_ptr:*i64",
            {"P": TOPK, "BP": 8, "HAS_RESIDENT": True, "HITS": True, "IN_PLACE": True},
            {},
        ),
    ]
    for label, m, c, overlap, into in (("CSA", 4, 512, True, True), ("HCA", 128, 512, False, True),
                                       ("indexer", 4, 128, True, True),
                                       ("HCA, the row returned", 128, 512, False, False)):  # fmt: skip
        specs.append(
            (
                f"compressor step {label}",
                gk._compressor_step_kernel,
                "kv_new_ptr:*fp32, g_new_ptr:*fp32, ape_ptr:*fp32, kv_ptr:*fp32, g_ptr:*fp32, "
                "prev_kv_ptr:*fp32, prev_g_ptr:*fp32, pos_ptr:*i64, norm_ptr:*fp32, "
                "inv_freq_ptr:*fp32, out_ptr:*bf16, index_ptr:*i64, eps:fp32",
                {
                    "M": m,
                    "C": c,
                    "OVERLAP": overlap,
                    "HALF": ROPE_HALF,
                    "RB": min(m, 4096 // c),
                    "INTO": into,
                },  # as compressor_step picks
                {"num_warps": 8},
            )
        )
    # a CSA layer's compressor and its indexer's in one launch (`compressor_steps`)
    pair_sig, pair_consts = "pos_ptr:*i64", {}
    for p, c in ((0, 512), (1, 128)):
        pair_sig += "".join(
            f", {n}{p}:*fp32"
            for n in ("kv_new", "g_new", "ape", "kv", "g", "prev_kv", "prev_g", "norm", "inv_freq")
        )
        pair_sig += f", out{p}:*bf16, index{p}:*i64, eps{p}:fp32"
        pair_consts |= {f"M{p}": 4, f"C{p}": c, f"OVERLAP{p}": True, f"HALF{p}": ROPE_HALF}
        pair_consts |= {f"RB{p}": 4, f"INTO{p}": True}
    label = "compressor steps CSA + indexer"
    specs.append((label, gk._compressor_steps_kernel, pair_sig, pair_consts, {"num_warps": 8}))
    attention_args = (
        "q_ptr:*bf16, win_ptr:*bf16, own_ptr:*bf16, comp_ptr:*bf16, vis_ptr:*i1, pos_ptr:*i64, "
        "top_ptr:*fp32, den_ptr:*fp32, acc_ptr:*fp32, scale:fp32"
    )
    # a CSA layer's picks read where the store holds them ("gathered"), as a decode step has it
    for label, n, gather in (("window only", 0, False), ("CSA top-k", 512, False),
                             ("CSA top-k gathered", 512, True), ("HCA", 8192, False)):  # fmt: skip
        args = attention_args + (", idx_ptr:*i64" if gather else "")
        rows, chunk, sw, splits = gk.decode_attention_split(128, n, HEAD_DIM)
        shape = {"W": 128, "C": n, "D": HEAD_DIM, "RB": rows, "CH": chunk, "SW": sw, "S": splits}
        specs.append(
            (
                f"decode attention {label}",
                gk._decode_attention_split_kernel,
                args,
                shape | {"GATHER": gather},
                {"num_warps": 4},
            )
        )
        rows, chunk, sw, splits = gk.decode_attention_split(128, n, HEAD_DIM, grouped=True)
        shape = {"W": 128, "C": n, "D": HEAD_DIM, "RB": rows, "CH": chunk, "SW": sw, "S": splits}
        specs.append(
            (
                f"decode attention {label}, head groups",
                gk._decode_attention_heads_kernel,
                args,
                shape | {"HG": gk.DECODE_HEAD_GROUP, "IEEE": False, "GATHER": gather},
                {"num_warps": gk.DECODE_HEAD_WARPS},
            )
        )
        specs.append(
            (
                f"decode attention merge {label}",
                gk._decode_attention_combine_kernel,
                "top_ptr:*fp32, den_ptr:*fp32, acc_ptr:*fp32, sink_ptr:*fp32, out_ptr:*fp32",
                {"D": HEAD_DIM, "S": splits, "SB": min(8, triton.next_power_of_2(splits))}
                | {"KEEP": False, "ROPE": False},
                {"num_warps": 4},
            )
        )
        specs.append(  # as a decode step has it: the ring written, the output de-rotated
            (
                f"decode attention merge {label}, ring and RoPE",
                gk._decode_attention_combine_kernel,
                "top_ptr:*fp32, den_ptr:*fp32, acc_ptr:*fp32, sink_ptr:*fp32, out_ptr:*bf16, "
                "own_ptr:*bf16, win_ptr:*bf16, pos_ptr:*i64, cos_ptr:*fp32, sin_ptr:*fp32",
                {"D": HEAD_DIM, "S": splits, "SB": min(8, triton.next_power_of_2(splits))}
                | {"KEEP": True, "W": 128, "ROPE": True, "HALF": ROPE_HALF},
                {"num_warps": 4},
            )
        )
    for label, rows, second in (("CSA", 4, 4), ("HCA", 128, 0)):
        specs.append(
            (
                f"softmax pool {label}",
                gk._softmax_pool_kernel,
                "kv1:*fp32, g1:*fp32, s1:i32, kv2:*fp32, g2:*fp32, s2:i32, out_ptr:*fp32",
                {
                    "R1": rows,
                    "RB1": rows,
                    "R2": second,
                    "RB2": max(second, 1),
                    "BC": min(128, 4096 // (rows + second)),
                },  # as softmax_pool picks
                {},
            )
        )
    rows = {"NOPE": 448, "NB": 7, "NBP": 8, "ROPE": 64}  # V4's packed FP8 KV rows
    specs.append(
        (
            "FP8 KV rows put",
            gk._fp8_rows_put_kernel,
            "rows_ptr:*bf16, index_ptr:*i64, codes_ptr:*u8, exps_ptr:*u8, rope_ptr:*bf16",
            rows,
            {},
        )
    )
    for gather in (False, True):
        specs.append(
            (
                f"FP8 KV rows read{' gathered' if gather else ''}",
                gk._fp8_rows_read_kernel,
                "codes_ptr:*u8, exps_ptr:*u8, rope_ptr:*bf16, index_ptr:*i64, out_ptr:*bf16",
                {**rows, "GATHER": gather},
                {},
            )
        )
    return [(label, fn, _sig(sig, consts), consts, opts) for label, fn, sig, consts, opts in specs]


def _hottest_loop(sass: str) -> int:
    """Instructions in the longest backward-branch loop of nvdisasm's listing."""
    at, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            at.append((int(ins.group(1), 16), ins.group(2)))
            labels.update(dict.fromkeys(pending, len(at) - 1))
            pending = []
    loops = [
        i - labels[m.group(1)] + 1
        for i, (_, ins) in enumerate(at)
        if (m := re.search(r"BRA\s+`\(\.(L_x_\d+)\)", ins)) and labels.get(m.group(1), i) < i
    ]
    return max(loops, default=0)


def _ptxas_figures(ptx: str, arch: str, weights_per_loop: float | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        done = subprocess.run(
            [str(PTXAS), "-v", "--gpu-name", arch, str(src), "-o", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        )
        sass = None
        if weights_per_loop:
            sass = subprocess.run(
                [str(PTXAS.parent / "nvdisasm"), "-c", str(cubin)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stderr)]
    out = {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills)}
    if sass is not None:
        out["loop_instructions_per_weight"] = _hottest_loop(sass) / weights_per_loop
    return out


# kernels also compiled with programmatic dependent launch (gpu_kernels.PDL), as sm_90 runs them
PDL_LABELS = ("moe gate/up", "linear rows wq_b K step 512 split 1", "rms norm", "hc post", "route")


# the GPUs built for: Hopper (the lent one), Ampere and Ada (RTX 30 / 40, the desktops this is
# for); before Ada, Triton has no fp8e4nv type and the linears read FP8 weights as bytes
ARCHES = ((90, "sm_90a", ""), (86, "sm_86", " @ sm_86"), (89, "sm_89", " @ sm_89"))
SWEEP_ONLY = (" words", "/4w", "/8w", "split 4", "by pick")


def main() -> None:
    results = {}
    # one process per architecture (Triton's compiler and ptxas run on one core each)
    with ProcessPoolExecutor(max_workers=min(len(ARCHES), os.cpu_count() or 1)) as pool:
        for part in pool.map(_build, ARCHES):
            results |= part
    print(json.dumps(results))


def _build(arch_spec: tuple[int, str, str]) -> dict:
    cap, arch, suffix = arch_spec
    specs = _specs()
    if cap >= 90:
        specs += [
            (f"{label}, PDL", fn, sig | {"PDL": "constexpr"}, consts | {"PDL": True}, opts)
            for label, fn, sig, consts, opts in specs
            if label in PDL_LABELS
        ]
    else:  # the desktops: the built-in shapes (the sweep's other ones are Hopper's here)
        specs = [spec for spec in specs if not any(t in spec[0] for t in SWEEP_ONLY)]
    if cap < 89:
        specs = [
            (label, fn, {k: v.replace("fp8e4nv", "u8") for k, v in sig.items()}, c, o)
            for label, fn, sig, c, o in specs
        ]
    target = GPUTarget("cuda", cap, 32)
    return {
        label + suffix: _compile(target, arch, label, fn, sig, consts, opts)
        for label, fn, sig, consts, opts in specs
    }


def _compile(target, arch, label, fn, sig, consts, opts) -> dict:
    # torch's allocations are 16-byte aligned, and Triton specializes on that at run time
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if "*" in t}
    weights = None  # FP4 weights a thread decodes per pass of a decode expert loop
    if label.startswith("moe ") and arch == "sm_90a":
        per_step = consts["BKB"] * 2
        per_step *= 2 if consts.get("MODE") == 4 and consts.get("F16") else 1  # gate and up
        weights = consts["BN"] * per_step / (32 * opts["num_warps"])
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned),
            target=target,
            options=opts,
        )
        out = _ptxas_figures(kernel.asm["ptx"], arch, weights)
        return out | {"waits": "griddepcontrol.wait" in kernel.asm["ptx"]}
    except Exception as exc:  # reported per kernel, so one failure shows the others too
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
