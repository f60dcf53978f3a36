"""Every benchmark loads the way `flashdesk bench` loads it and has the entry point it calls.

The benchmarks themselves run at real dimensions (minutes each) and are not part of the suite;
this keeps a renamed import or a missing `run()` from going unnoticed until someone benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys

import pytest

from flashdesk import bench

NAMES = bench.available()


def test_benchmarks_are_found():
    assert {"bandwidth", "kernels", "layer", "decode", "checkpoint"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_module_loads_with_run(name, monkeypatch):
    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    module = importlib.import_module(name)
    try:
        assert "json_output" in inspect.signature(module.run).parameters
    finally:
        sys.modules.pop(name, None)


def test_bench_list_and_unknown_name(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--list"])) == 0
    assert "kernels" in capsys.readouterr().out


def test_the_gpu_sweep_times_each_call_on_bytes_out_of_l2(monkeypatch):
    """A sweep's timed calls cycle over copies of their operands past the L2 cache (a decode
    step reads each weight cold): enough copies of a small weight, none of a large one."""
    import torch

    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    module = importlib.import_module("gpu_kernels")
    weight, scale = torch.arange(64, dtype=torch.uint8), torch.ones(2)
    copies = module._cold_copies("cuda", (weight, scale), 64 << 20)
    assert len(copies) == 3  # 3 × 64 MB ≥ 192 MB
    assert len({c[0].data_ptr() for c in copies}) == 3
    assert all(torch.equal(c[0], weight) and torch.equal(c[1], scale) for c in copies)
    assert len(module._cold_copies("cuda", (weight,), 64)) == module.MAX_COPIES
    assert len(module._cold_copies("cuda", (weight,), 1 << 30)) == 1
    assert len(module._cold_copies("cpu", (weight,), 64)) == 1  # the interpreter: no copies


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_gpu_kernels_benchmark_runs_its_steps(monkeypatch):
    """The GPU expert benchmark (for the lent machine, where each minute counts) runs every step
    here at small dims in Triton's interpreter: a mistake shows before device time is spent."""
    from _triton import kernels_device

    if kernels_device() != "cpu":
        pytest.skip("a GPU machine runs the real benchmark")
    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    module = importlib.import_module("gpu_kernels")
    try:
        out = module.measure(
            "cpu",
            False,
            (128, 64, 8),
            reps=1,
            tile_choices=[
                module.TILE_CHOICES[0],
                ((32, 128, 32, 128), 4, (2, 0, 1)),
                ((8, 256, 8, 256), 4, (0, 1, 1), 3),  # steps in flight (FP4_STAGES)
                ((32, 64, 32, 64), 4, (4, 0, 1)),  # the integer dots, against their reference
            ],
            token_counts=(2,),
            linears=[("fp8", 256, 128, 2, True, False), ("bf16", 64, 64, 1, False, True)],
            by_pick_choices=module.BY_PICK_CHOICES[:1],
            grouped_choices=module.GROUPED_CHOICES[:1],
            prompt_tokens=12,
            linear_choices=[module.LINEAR_CHOICES[i] for i in (1, 5, 7)],  # rows, rows, dot
            attention=(4, 64, 8),  # no group of 16 heads: the per-head kind alone (below)
            attention_rows=(12, 40),
            attention_splits=(16, 32),
        )
        assert out["speedup_over_torch"] > 0 and out["dequant_gbps"] > 0
        assert [lin["gbps"] > 0 for lin in out["linears"]] == [True, True]
        assert all(lin["rows_stages_3_us"] > 0 for lin in out["linears"])
        assert [len(lin["choices"]) for lin in out["linears"]] == [3, 3]
        # the integer dots against their own reference: an h within float rounding of a tie
        # between two int8 codes may round either way (x is unseeded here: ~3e-3 when it does)
        close = [r["err"] < (1e-2 if r["mode"][0] == 4 else 1e-5) for r in out["tiles"]]
        assert close == [True] * 4
        assert out["choices"]["FP4_STAGES"] in (1, 3)
        assert out["by_pick"][0]["err"] < 1e-2 and out["decode_moe_best"] in ("rows", "by pick")
        assert out["prompt"]["best"]["err"] < 2e-2 and out["prompt"]["torch_ms"] > 0
        assert out["zero_copy"]["err"] < 1e-5 and out["zero_copy"]["gbps"] > 0
        from flashdesk.engine import gpu_tuning  # what it would record on a GPU fits

        assert [len(size["ms"]) for size in out["attention"]["sizes"]] == [2, 2]
        assert out["choices"]["DECODE_ROWS_PER_SPLIT"] in (16, 32)
        assert "DECODE_ATTENTION" not in out["choices"]
        assert {"TILES", "DECODE_MOE", "GROUPED_TILES", "LINEAR_KIND"} <= set(out["choices"])
        assert all(gpu_tuning.valid(name, v) for name, v in out["choices"].items())
        # each shape whose fastest choice was a "rows" one keeps it, keyed N x K x groups x bytes
        rows_won = {
            gpu_tuning.shape_name(lin["shape"]): tuple(lin["best_spec"][1:])
            for lin in out["linears"]
            if lin["best_spec"][0] == "rows"
        }
        assert set(rows_won) <= {"256x128x2x1", "64x64x1x2"}
        assert out["choices"].get("LINEAR_ROWS_BY_SHAPE", {}) == rows_won
        json.dumps(out)  # what --json prints
        assert "skipped" in module.run(True)  # no GPU here
    finally:
        sys.modules.pop("gpu_kernels", None)


def test_gpu_kernels_benchmark_times_attention_in_head_groups(monkeypatch):
    """With a group's 16 heads the sink attention is timed both ways and the faster kind
    named, as `bench gpu-kernels` records it (gpu_kernels.DECODE_ATTENTION)."""
    from _triton import kernels_device

    if kernels_device() != "cpu":
        pytest.skip("a GPU machine runs the real benchmark")
    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    try:
        module = importlib.import_module("gpu_kernels")
        out = module._attention_figures(
            "cpu", (16, 32, 8), (12,), ((16,), (32,)), 1, 1.0, lambda *a: None
        )
        assert [len(size["heads_ms"]) for size in out["sizes"]] == [1]
        assert out["best_kind"] in ("head", "heads") and out["best_head_rows_per_split"] == 32
    finally:
        sys.modules.pop("gpu_kernels", None)


def test_decode_calibration_on_a_gpu_reproduces_the_measured_step(monkeypatch):
    """On a GPU the planner's decode time is set by a per-layer floor (the small kernels) or by
    the bytes; `bench decode` solves for the figure that sets it, so the calibrated prediction
    takes the measured step. (Charging the whole step to the bandwidth "measured" 0.22 on an
    H200 and the calibrated prediction was 0.66 × the run.)"""
    from pathlib import Path

    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import PlanOptions, make_plan
    from flashdesk.offload.predict import predict
    from flashdesk.offload.probe import HardwareProfile

    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    decode = importlib.import_module("decode")
    try:
        config = ModelConfig.v4_flash()
        figures = ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Flash")
        profile = HardwareProfile.load(
            Path(__file__).parent / "profiles" / "h200_lent_machine_measured.json"
        )
        plan = make_plan(figures, profile, PlanOptions(context=4096))
        prediction = predict(plan, figures, profile, decode.PROMPT_TOKENS)
        assert prediction.decode_limit == "dispatch"
        for step_s in (0.6 / prediction.decode_tok_s, 1.5 / prediction.decode_tok_s):
            got = decode._calibrated(figures, profile, plan, prediction, step_s, 0.0, 90.0, True)
            assert set(got["measured_efficiency"]) == {"gpu_layer_seconds"}
            assert got["predicted_calibrated_over_measured"] == pytest.approx(1.0, rel=1e-3)
    finally:
        sys.modules.pop("decode", None)


def _v4_flash_cpu_plan(context: int) -> tuple:
    """V4-Flash's figures, the CPU-only test profile and the plan for `context` tokens on it."""
    from pathlib import Path

    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import PlanOptions, make_plan
    from flashdesk.offload.probe import HardwareProfile

    config = ModelConfig.v4_flash()
    figures = ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Flash")
    profile = HardwareProfile.load(Path(__file__).parent / "profiles" / "cpu_only_256gb.json")
    return figures, profile, make_plan(figures, profile, PlanOptions(context=context))


def test_decode_calibration_on_the_cpu_reproduces_step_and_prefill(monkeypatch):
    """On the CPU the run's decode split sets cpu_experts / cpu_dense (less the layers' measured
    glue, which becomes cpu_layer_seconds) and its timed prefill cpu_flops, solved with the
    decode figures in place: the calibrated planner's prefill takes
    the measured time, whether the run was faster or slower than the default predicts."""
    from flashdesk.offload.predict import Efficiency, predict
    from flashdesk.offload.probe import Sourced

    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    decode = importlib.import_module("decode")
    try:
        figures, profile, plan = _v4_flash_cpu_plan(4096)
        assert plan.mode == "cpu"
        prediction = predict(plan, figures, profile, decode.PROMPT_TOKENS)
        step_s, expert_s = 1.3 / prediction.decode_tok_s, 0.5 / prediction.decode_tok_s
        tokens = decode.CPU_PREFILL_TOKENS
        ram = float(profile.ram_bandwidth().value)  # the run measures the profile's bound
        for slower in (0.5, 3.0):
            prefill_s = slower * predict(plan, figures, profile, tokens).ttft_s
            glue_s = 0.1 * (step_s - expert_s) / len(plan.layers)  # a tenth of the step's rest
            got = decode._calibrated(
                figures, profile, plan, prediction, step_s, expert_s, ram, False, prefill_s, glue_s
            )
            measured = got["measured_efficiency"]
            assert set(measured) == {"cpu_experts", "cpu_dense", "cpu_flops", "cpu_layer_seconds"}
            assert measured["cpu_layer_seconds"] == glue_s
            assert got["predicted_calibrated_over_measured"] == pytest.approx(1.0, rel=1e-3)
            eff = Efficiency()
            for name, value in measured.items():
                setattr(eff, name, Sourced(value, "calibrated"))
            again = predict(plan, figures, profile, tokens, eff)
            assert again.ttft_s == pytest.approx(prefill_s, rel=1e-3)
            assert got["prefill_tok_s"] == pytest.approx(tokens / prefill_s)
        # no glue measured: the default's, which the prediction adds, comes off the rest
        got = decode._calibrated(figures, profile, plan, prediction, step_s, expert_s, ram, False)
        assert "cpu_flops" not in got["measured_efficiency"] and "prefill_tok_s" not in got
        default = Efficiency().cpu_layer_seconds.value
        assert got["measured_efficiency"]["cpu_layer_seconds"] == default
        assert got["predicted_calibrated_over_measured"] == pytest.approx(1.0, rel=1e-3)
        # glue "measured" beyond the step's rest is not credible: capped at 90 % of it
        got = decode._calibrated(
            figures, profile, plan, prediction, step_s, expert_s, ram, False, None, step_s
        )
        rest = step_s - expert_s
        capped = got["measured_efficiency"]["cpu_layer_seconds"]
        assert capped == pytest.approx(0.9 * rest / len(plan.layers))
        assert got["predicted_calibrated_over_measured"] == pytest.approx(1.0, rel=1e-3)
    finally:
        sys.modules.pop("decode", None)


def test_the_deepest_context_calibrates_the_cpu_attention(monkeypatch):
    """The time the deepest timed context adds to a CPU step (against the start's steps timed
    beside it) sets cpu_attention: the calibrated planner adds that time there, whether the
    kernels ran faster or slower than the default predicts; the other factors stay as given."""
    from flashdesk.offload.predict import Efficiency, decode_tok_s_at

    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    decode = importlib.import_module("decode")
    try:
        figures, profile, plan = _v4_flash_cpu_plan(1 << 20)
        measured = {"cpu_layer_seconds": 1e-3}
        eff = decode._efficiency(measured)
        start = 1.0 / decode_tok_s_at(plan, figures, profile, 1, eff)
        for depth, slower in ((1 << 20, 0.5), (1 << 18, 2.0)):
            default_added = 1.0 / decode_tok_s_at(plan, figures, profile, depth, eff) - start
            added = slower * default_added
            rows = [  # the deepest row decides; a shallower one is ignored
                {"depth": 4096, "tok_s": 1.0, "start_tok_s": 2.0},
                {"depth": depth, "tok_s": 1.0 / (start + added), "start_tok_s": 1.0 / start},
            ]
            value = decode._attention_calibrated(rows, figures, profile, plan, measured)
            default = Efficiency().cpu_attention.value
            assert value == pytest.approx(default / slower, rel=0.02)  # compute ∝ 1 / efficiency
            again = decode._efficiency(measured | {"cpu_attention": value})
            got = 1.0 / decode_tok_s_at(plan, figures, profile, depth, again)
            assert got - 1.0 / decode_tok_s_at(plan, figures, profile, 1, again) == pytest.approx(
                added, rel=1e-3
            )
    finally:
        sys.modules.pop("decode", None)


def test_bisection_finds_a_root_or_the_nearer_end(monkeypatch):
    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    decode = importlib.import_module("decode")
    try:
        assert decode._solve(lambda v: v * v - 2.0, 0.0, 4.0) == pytest.approx(2**0.5)
        assert decode._solve(lambda v: 3.0 - v, 0.0, 4.0) == pytest.approx(3.0)  # decreasing
        assert decode._solve(lambda v: v + 1.0, 0.0, 4.0) == 0.0  # never reaches: nearer end
    finally:
        sys.modules.pop("decode", None)


def test_speculative_prediction_follows_the_specs_byte_budget(monkeypatch):
    """V4-Flash in CPU mode by spec §6.1: 11.22 GB a token; a verify adds the draft token's
    3.45 GB of experts, a draft reads the MTP block's share and the head again (~1.31 GB)."""
    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    speculative = importlib.import_module("speculative")
    try:
        full = speculative.v4_flash_prediction(0.8)
        assert full["plain_gb_per_token"] == pytest.approx(11.22, abs=0.02)
        assert full["verify_gb"] - full["plain_gb_per_token"] == pytest.approx(3.45, abs=0.01)
        assert full["draft_gb"] == pytest.approx(0.171 + 0.080 + 1.059, abs=0.01)
        assert full["break_even_acceptance"] == pytest.approx(0.42, abs=0.01)
        assert full["speedup_at_acceptance"] == pytest.approx(1.26, abs=0.01)
        here = speculative._speedup(100.0, 50.0, 110.0, 0.6)  # a step of 160 for 1.6 tokens
        assert here == pytest.approx({"break_even_acceptance": 0.6, "speedup_at_acceptance": 1.0})
    finally:
        sys.modules.pop("speculative", None)
        sys.modules.pop("decode", None)


def test_synthetic_times_the_vram_experts_other_decode(monkeypatch):
    """`bench --synthetic`'s A/B of the VRAM experts' decode (run on a lent GPU only): the
    integer dots in FP4_INT8's shape where FP4_MODE is a float one, the built-in float decode
    where it is MODE 4, the steps captured anew under each; the settings come back after, and a
    failure is reported instead of ending the run."""
    from flashdesk.engine import decode_graphs, gpu_kernels

    monkeypatch.syspath_prepend(str(bench.benchmarks_dir()))
    module = importlib.import_module("synthetic")
    seen = []

    class Graphs:  # what a capture would see of the settings
        def __init__(self, model):
            seen.append((gpu_kernels.TILES, gpu_kernels.WARPS, gpu_kernels.FP4_MODE))
            self.usable = True

    monkeypatch.setattr(decode_graphs, "GraphDecoder", Graphs)
    monkeypatch.setattr(gpu_kernels, "checked", lambda name, device: name == "FP4 int8 dots")
    rt = argparse.Namespace(model=None, device="cuda", graphs=None)
    try:
        before = (gpu_kernels.TILES, gpu_kernels.WARPS, gpu_kernels.FP4_MODE)
        got = module._other_fp4_decode(rt, lambda warmup: 0.02)
        assert got == {"decode_tok_s_int8_dots": 50.0, "int8_dots_checked": True,
                       "fp4_decode_graphs": True}  # fmt: skip
        assert seen == [gpu_kernels.FP4_INT8]
        monkeypatch.setattr(gpu_kernels, "FP4_MODE", (4, 0, 1))
        got = module._other_fp4_decode(rt, lambda warmup: 0.04)
        assert got["decode_tok_s_float_dots"] == 25.0 and seen[1] == gpu_kernels.FLOAT_FP4
        assert gpu_kernels.FP4_MODE == (4, 0, 1)
        monkeypatch.setattr(gpu_kernels, "FP4_MODE", before[2])
        assert before[:2] == (gpu_kernels.TILES, gpu_kernels.WARPS)

        def fails(warmup):
            raise RuntimeError("capture failed")

        assert module._other_fp4_decode(rt, fails) == {
            "fp4_decode_error": "RuntimeError: capture failed"
        }
        assert before == (gpu_kernels.TILES, gpu_kernels.WARPS, gpu_kernels.FP4_MODE)
    finally:
        sys.modules.pop("synthetic", None)
