"""Speculative decoding with the MTP block on the CPU: what a draft and a two-token verify cost
against a plain decode step, and what that makes of V4-Flash at a given acceptance.

Random weights draft almost nothing right, so the speed-up itself cannot be measured here. What
can: the step costs, measured on a 2-layer real-dimension checkpoint with its MTP block against
their bytes at the RAM bandwidth measured in the same run, and from them (times following
bytes) the acceptance at which drafting breaks even and the speed-up at DeepSeek's reported
~0.8, on this model and on the whole V4-Flash (spec §6.1's byte budget).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _machine
from decode import _nbytes, bench_config, decode_bytes

from flashdesk.offload.predict import DRAFT_ACCEPTANCE, drafting_gain

PROMPT_TOKENS = 64
ROUNDS = 12  # draft + verify against a plain step, alternated; trimmed means


def spec_config():
    return bench_config().replace(num_nextn_predict_layers=1, compress_ratios=(0, 4, 0))


def mtp_draft_bytes(rt) -> int:
    """Bytes a draft reads: the MTP block's non-expert weights, its experts for one token and
    the head (the block's linears sized as the runtime holds them)."""
    from decode import _linear_bytes

    model = rt.model
    mtp = model.mtp[0]
    block = mtp.block
    a, m = block.attn, block.moe
    dense = sum(_linear_bytes(x) for x in (a.wq_a, a.wq_b, a.wkv, a.wo_b, a.wo_a))
    dense += _linear_bytes(mtp.e_proj) + _linear_bytes(mtp.h_proj) + _linear_bytes(m.router.weight)
    dense += sum(_linear_bytes(x) for x in (m.shared.w1, m.shared.w2, m.shared.w3))
    experts = _nbytes(*m.host.parts[0]) * rt.config.num_experts_per_tok
    head = _nbytes(model.head, getattr(model.head_linear, "scale", None))
    return dense + experts + head


def v4_flash_prediction(acceptance: float) -> dict:
    """Spec §6.1's bytes per token of V4-Flash in CPU mode (bf16 head as the runtime holds it),
    plain and speculative, and the speed-up and break-even acceptance if times follow bytes."""
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures

    config = ModelConfig.v4_flash()
    f = ModelFigures.from_inventory(inventory(config), config, "v4-flash")
    k = f.experts_per_token
    experts = sum(k * layer.expert_bytes for layer in f.layers)
    plain = sum(layer.dense_read_bytes + layer.shared_bytes for layer in f.layers)
    plain += experts + f.head_bytes + f.final_bytes + f.embed_row_bytes
    mtp_read = f.mtp_bytes - (f.n_experts - k) * f.expert_bytes  # its experts: k of them
    verify = plain + experts  # the draft token's experts on top
    draft = mtp_read + f.head_bytes
    return _speedup(plain, draft, verify, acceptance) | {
        "plain_gb_per_token": plain / 1e9,
        "verify_gb": verify / 1e9,
        "draft_gb": draft / 1e9,
    }


def _speedup(plain: float, draft: float, verify: float, acceptance: float) -> dict:
    """A step (draft + verify) against a plain one, as the planner prices it (`drafting_gain`)."""
    speedup, break_even = drafting_gain(plain, draft + verify, acceptance)
    return {"break_even_acceptance": break_even, "speedup_at_acceptance": speedup}


def _trimmed_ms(values: list[float]) -> float:
    kept = sorted(values)[2:-2] if len(values) > 6 else values
    return sum(kept) / len(kept) * 1e3


def run(json_output: bool = False) -> dict:
    import torch

    from flashdesk.engine.checkpoint import write_random
    from flashdesk.engine.runtime import Placement, load_runtime
    from flashdesk.offload.bandwidth import ram_read_gbps

    say, info = _machine.start(json_output)
    say("writing a 2-layer real-dimension checkpoint with its MTP block (16 experts)…")
    config = spec_config()
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator())
    gbps = float(ram_read_gbps(remeasure=True).value)
    times: dict[str, list[float]] = {"plain": [], "draft": [], "verify": []}
    with tempfile.TemporaryDirectory(prefix="flashdesk-bench-speculative-") as folder:
        write_random(folder, config, seed=0)
        where = Placement.uniform(config, "pageable", "cpu")
        with (
            load_runtime(folder, placement=where, refresh_every=None) as plain,
            load_runtime(folder, placement=where, refresh_every=None, speculative=True) as spec,
        ):
            described = spec.describe()
            dense_b, expert_b = decode_bytes(plain)
            draft_b = mtp_draft_bytes(spec)
            plain_state, spec_state = plain.new_state(), spec.new_state()
            token = int(plain.prefill(prompt, plain_state).argmax())
            spec.prefill(prompt, spec_state)
            for _ in range(ROUNDS):
                t = time.perf_counter()
                plain.decode(token, plain_state)
                times["plain"].append(time.perf_counter() - t)
                t = time.perf_counter()
                draft = int(spec.draft(token, spec_state).argmax())
                times["draft"].append(time.perf_counter() - t)
                t = time.perf_counter()
                out = spec.verify([token, draft], spec_state)
                times["verify"].append(time.perf_counter() - t)
                spec.reject_last(spec_state)  # keeps both states at the same tokens
                token = int(out[0].argmax())
    ms = {name: _trimmed_ms(v) for name, v in times.items()}
    bytes_of = {"plain": dense_b + expert_b, "draft": draft_b, "verify": dense_b + 2 * expert_b}
    ratio = {name: bytes_of[name] / (gbps * 1e9) * 1e3 / ms[name] for name in ms}
    here = _speedup(ms["plain"], ms["draft"], ms["verify"], DRAFT_ACCEPTANCE)
    full = v4_flash_prediction(DRAFT_ACCEPTANCE)
    figures = {
        "machine": info,
        "placement": described,
        "ram_read_gbps": gbps,
        "ms": ms,
        "bytes": bytes_of,
        "ratio_to_bytes_bound": ratio,
        "acceptance_assumed": DRAFT_ACCEPTANCE,
        "this_model": here,
        "v4_flash_cpu": full,
    }
    for name in ("plain", "draft", "verify"):
        say(
            f"{name:7s} {ms[name]:7.1f} ms  ({bytes_of[name] / 1e6:,.0f} MB: "
            f"{ratio[name]:.2f} × the {gbps:.1f} GB/s bound)"
        )
    say(
        f"this 2-layer model: drafting breaks even at {here['break_even_acceptance']:.2f} "
        f"acceptance; at {DRAFT_ACCEPTANCE} it gives {here['speedup_at_acceptance']:.2f} × "
        "(the 1 GB head, read again by each draft, is most of its bytes)"
    )
    say(
        f"V4-Flash, CPU mode, by bytes ({full['plain_gb_per_token']:.2f} GB a token; a draft "
        f"{full['draft_gb']:.2f}, a verify {full['verify_gb']:.2f}): breaks even at "
        f"{full['break_even_acceptance']:.2f}, {full['speedup_at_acceptance']:.2f} × at "
        f"{DRAFT_ACCEPTANCE} (random weights cannot measure the acceptance)"
    )
    return figures
