"""`flashdesk fit`: what this machine (or a saved profile) will do with the model, before any load.

The glue between the engine (config and tensor inventory, computed from config.json alone) and
the offload planner: probe or load a hardware profile, plan, predict, print a table or JSON.
Nothing here reads weights or imports torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

PRESETS = ("v4-flash", "v4-pro")
GIB = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flashdesk.offload.plan import KV_DTYPES  # light: no torch

    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--model",
        metavar="PATH",
        help="checkpoint folder (reads its config.json) or a DeepSeek-V4 .gguf file",
    )
    model.add_argument(
        "--preset", choices=PRESETS, help="a published model without a download (default v4-flash)"
    )
    parser.add_argument(
        "--ctx",
        type=_tokens,
        default=131072,
        metavar="N",
        help="context length in tokens (e.g. 131072, 128K, 1M; default 128K)",
    )
    parser.add_argument("--kv", choices=KV_DTYPES, default="bf16", help="KV-cache format")
    parser.add_argument("--profile", metavar="FILE", help="plan for a saved hardware profile")
    parser.add_argument("--save-profile", metavar="FILE", help="save the probed profile as JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--prompt",
        type=_tokens,
        default=8192,
        metavar="N",
        help="prompt length for the prefill and time-to-first-token figures (default 8K)",
    )
    parser.add_argument(
        "--vram-reserve", type=float, metavar="GIB", help="VRAM to leave free (default ~0.5 + 5%%)"
    )
    parser.add_argument(
        "--ram-reserve", type=float, metavar="GIB", help="RAM to leave free (default 4 + 5%%)"
    )
    parser.add_argument(
        "--expert-frequency",
        metavar="FILE",
        help="routing counts per layer and expert (JSON list of lists) recorded by the runtime",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="measure RAM and host-to-GPU bandwidth again, ignoring the cached figures",
    )


def _tokens(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 131072, 128K, 1M)")
    scale = {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError("a token count must be at least 1")
    return value


def build(args: argparse.Namespace):
    """(figures, profile, plan, prediction) for the command's arguments."""
    return evaluate(
        model=args.model,
        preset=args.preset or "v4-flash",
        context=args.ctx,
        kv_dtype=args.kv,
        profile_path=args.profile,
        save_profile=args.save_profile,
        prompt_tokens=args.prompt,
        vram_reserve_gib=args.vram_reserve,
        ram_reserve_gib=args.ram_reserve,
        expert_frequency_path=args.expert_frequency,
        remeasure=args.remeasure,
    )


def evaluate(
    model: str | None = None,
    preset: str = "v4-flash",
    context: int = 131072,
    kv_dtype: str = "bf16",
    profile_path: str | None = None,
    save_profile: str | None = None,
    prompt_tokens: int = 8192,
    vram_reserve_gib: float | None = None,
    ram_reserve_gib: float | None = None,
    expert_frequency_path: str | None = None,
    remeasure: bool = False,
    profile=None,
):
    """(figures, profile, plan, prediction): the whole `fit` without argparse (the app's wizard).

    `profile` (a HardwareProfile) skips probing; otherwise `profile_path` loads one or this
    machine is probed. Raises ConfigError / ProfileError / PlanError with a user-facing message.
    """
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import PlanOptions
    from flashdesk.offload.predict import Efficiency, plan_and_predict
    from flashdesk.offload.probe import HardwareProfile, ProfileError, probe

    figures = None
    if model and str(model).lower().endswith(".gguf"):
        figures = _gguf_figures(model)
    elif model:
        config = ModelConfig.from_dir(model)
        variant = "Pro" if config.hidden_size == ModelConfig.v4_pro().hidden_size else "Flash"
        name = f"DeepSeek-V4-{variant} ({model})"
    elif preset == "v4-pro":
        config, name = ModelConfig.v4_pro(), "DeepSeek-V4-Pro"
    elif preset == "v4-flash":
        config, name = ModelConfig.v4_flash(), "DeepSeek-V4-Flash"
    else:
        raise ProfileError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    if figures is None:
        figures = ModelFigures.from_inventory(inventory(config), config, name)
    if profile is None and profile_path:
        profile = HardwareProfile.load(profile_path)
    elif profile is None:
        profile = probe(remeasure=remeasure, disk_path=model)
    if save_profile:
        try:
            profile.save(save_profile)
        except OSError as exc:
            raise ProfileError(f"cannot write the profile to {save_profile}: {exc}") from None
    frequency = None
    if expert_frequency_path:
        try:
            with open(expert_frequency_path, encoding="utf-8") as f:
                frequency = json.load(f)
        except (OSError, ValueError) as exc:
            raise ProfileError(
                f"cannot read the expert-frequency profile {expert_frequency_path}: {exc}"
            ) from None
    options = PlanOptions(
        context=context,
        kv_dtype=kv_dtype,
        vram_reserve_bytes=None if vram_reserve_gib is None else int(vram_reserve_gib * GIB),
        ram_reserve_bytes=None if ram_reserve_gib is None else int(ram_reserve_gib * GIB),
        expert_frequency=frequency,
    )
    plan, prediction = plan_and_predict(figures, profile, options, prompt_tokens, Efficiency.load())
    return figures, profile, plan, prediction


def _gguf_figures(path):
    """The planner's figures for a deepseek4 GGUF file (bytes per tensor from its header)."""
    from flashdesk.engine.config import ConfigError

    try:
        from flashdesk.engine.gguf.metadata import read_gguf
        from flashdesk.engine.gguf.plan_glue import model_figures

        return model_figures(read_gguf(path))
    except ImportError:
        raise ConfigError(
            "planning a GGUF file needs the gguf extra: pip install 'flashdesk[gguf]'."
        ) from None
    except ValueError as exc:  # GGUFError: not a GGUF, or not a model the planner knows
        raise ConfigError(str(exc)) from None


class DoesNotFit(ValueError):
    """This machine cannot hold the model with these settings; `changes` are the planner's."""

    def __init__(self, changes: list[str]):
        self.changes = list(changes)
        super().__init__(
            "This machine cannot hold this model:\n" + "\n".join(f"• {c}" for c in self.changes)
        )


def plan_for_loading(
    model: str, context: int, kv_dtype: str = "bf16", vram_reserve_gib: float | None = None
):
    """(plan, None): the planner's placement for loading the checkpoint folder (or deepseek4
    GGUF file) `model` on this machine (probed; measurements cached), or (None, why) when
    planning itself failed — the model still loads then, its experts memory-mapped. Raises
    DoesNotFit when it cannot fit at all."""
    from flashdesk.offload.plan import DOES_NOT_FIT

    try:
        _figures, _profile, plan, _prediction = evaluate(
            model=model, context=context, kv_dtype=kv_dtype, vram_reserve_gib=vram_reserve_gib
        )
    except Exception as exc:  # a planning problem must not stop a model that may still load
        return None, str(exc)
    if plan.verdict == DOES_NOT_FIT:
        raise DoesNotFit(plan.changes)
    return plan, None


def report(figures, profile, plan, prediction) -> dict:
    """The JSON object of `fit --json`."""
    return {
        "model": figures.name,
        "verdict": plan.verdict,
        "changes": plan.changes,
        "notes": plan.notes,
        "context": plan.context,
        "kv_dtype": plan.kv_dtype,
        "kv_bytes": plan.kv_bytes,
        "predicted": prediction.to_json(),
        "memory": plan.memory,
        "placement": [
            {"group": g.name, "location": g.location, "bytes": g.bytes, "detail": g.detail}
            for g in plan.groups
        ],
        "plan": plan.to_json(),
        "profile": profile.to_json(),
    }


def run(args: argparse.Namespace) -> int:
    from flashdesk.engine.config import ConfigError
    from flashdesk.offload.plan import PlanError
    from flashdesk.offload.probe import ProfileError

    try:
        figures, profile, plan, prediction = build(args)
    except (ConfigError, ProfileError, PlanError) as exc:
        print(f"flashdesk fit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report(figures, profile, plan, prediction), indent=2))
    else:
        print_table(figures, profile, plan, prediction)
    return 0


# ------------------------------------------------------------------------------ table

_BYTES = re.compile(r"_bytes$")


def _value(name: str, value) -> str:
    if value is None:
        return "—"
    if _BYTES.search(name) and isinstance(value, (int, float)):
        return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / (1 << 20):.0f} MiB"
    if name.endswith("_gbps"):
        return f"{float(value):.1f} GB/s"
    if name.endswith("_mts"):
        return f"{value} MT/s"
    if name == "cpu_gflops":
        return f"{float(value):.0f} GFLOP/s"
    if name == "bf16_tflops":
        return f"{float(value):.0f} TFLOP/s"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _line(name, sourced, seen: set[str]) -> str:
    text = f"  {name:<27} {_value(name, sourced.value):<28} [{sourced.source}]"
    if sourced.note and (sourced.source == "unknown" or sourced.value is None):
        text += " (as above)" if sourced.note in seen else f" {sourced.note}"
        seen.add(sourced.note)
    return text


def print_table(figures, profile, plan, prediction) -> None:
    from flashdesk.offload.predict import DRAFT_ACCEPTANCE

    print(f"Hardware ({profile.label or 'this machine'})")
    seen: set[str] = set()
    for name, sourced in profile.sourced_items():
        print(_line(name, sourced, seen))
    for gpu in profile.gpus:
        print(f"  GPU {gpu.index}")
        for name, sourced in gpu.sourced_items():
            print("  " + _line(name, sourced, seen))
    if not profile.gpus:
        print("  GPU                         none (no NVIDIA driver/NVML): CPU-only")
    print()
    print(f"Model: {figures.name}, {figures.total_bytes / GIB:.1f} GiB on disk")
    print(
        f"Context {plan.context:,} tokens, KV {plan.kv_dtype}: {plan.kv_bytes / GIB:.3f} GiB "
        f"({plan.kv_bytes_gpu / GIB:.3f} GiB on the GPU)"
    )
    print()
    print(f"Placement ({plan.mode})")
    for g in plan.groups:
        detail = f"  {g.detail}" if g.detail else ""
        print(f"  {g.location:<10} {g.bytes / GIB:8.2f} GiB  {g.name}{detail}")
    print()
    print("Memory")
    for device, m in plan.memory.items():
        parts = ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in m.items())
        print(f"  {device:<5} {parts}")
    print()
    if plan.layers:
        p = prediction
        print(f"Predicted ({p.confidence})")
        print(
            f"  decode   {p.decode_tok_s:6.2f} tok/s   (roofline bound {p.decode_bound_tok_s:.2f}; "
            f"per token: {p.bytes_per_token.get('ram', 0) / 1e9:.2f} GB from RAM, "
            f"{p.bytes_per_token.get('gpu', 0) / 1e9:.2f} GB on the GPU, "
            f"{p.bytes_per_token.get('disk', 0) / 1e9:.2f} GB from disk)"
        )
        if p.decode_limit == "dispatch":
            per_layer = p.inputs.get("efficiency.gpu_layer_seconds", {}).get("value", 0) * 1e3
            print(
                f"           limited by each GPU layer's many small kernels "
                f"(~{per_layer:.2f} ms per layer), not by memory"
            )
        if p.decode_full_tok_s and p.decode_full_tok_s < 0.95 * p.decode_tok_s:
            print(
                f"           {p.decode_full_tok_s:.2f} tok/s once the {plan.context:,}-token "
                f"context is full (attention and the CSA indexer then score every compressed "
                f"entry each token)"
            )
        if p.speculative_tok_s:
            print(
                f"           {p.speculative_tok_s:.2f} tok/s with the MTP block's drafts if "
                f"{DRAFT_ACCEPTANCE:.0%} are kept (DeepSeek's figure; they pay from "
                f"{p.speculative_break_even:.0%}, and a stream stops drafting where they do not)"
            )
        cross = f", streaming wins from {p.crossover_tokens} tokens" if p.crossover_tokens else ""
        print(
            f"  prefill  {p.prefill_tok_s:6.1f} tok/s   (experts: {p.prefill_experts}{cross}); "
            f"time to first token for {p.prompt_tokens:,} tokens: {p.ttft_s:.1f} s"
        )
        print(f"  expected GPU hit rate of routed experts: {p.gpu_hit_rate:.1%}")
        print()
    print(f"Verdict: {plan.verdict.replace('_', ' ')}")
    for change in plan.changes:
        print(f"  - {change}")
    for note in plan.notes:
        print(f"  note: {note}")
