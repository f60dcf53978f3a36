"""Every benchmark loads the way `flashdesk bench` loads it and has the entry point it calls.

The benchmarks themselves run at real dimensions (minutes each) and are not part of the suite;
this keeps a renamed import or a missing `run()` from going unnoticed until someone benchmarks.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
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
            tile_choices=module.TILE_CHOICES[:2],
            token_counts=(2,),
            linears=[("fp8", 256, 128, 2, True), ("bf16", 64, 64, 1, False)],
            by_pick_choices=module.BY_PICK_CHOICES[:1],
            grouped_choices=module.GROUPED_CHOICES[:1],
            prompt_tokens=12,
            linear_choices=[module.LINEAR_CHOICES[4], module.LINEAR_CHOICES[6]],
        )
        assert out["speedup_over_torch"] > 0 and out["dequant_gbps"] > 0
        assert [lin["gbps"] > 0 for lin in out["linears"]] == [True, True]
        assert [len(lin["choices"]) for lin in out["linears"]] == [2, 2]
        assert [r["err"] < 1e-5 for r in out["tiles"]] == [True, True]
        assert out["by_pick"][0]["err"] < 1e-2 and out["decode_moe_best"] in ("rows", "by pick")
        assert out["prompt"]["best"]["err"] < 2e-2 and out["prompt"]["torch_ms"] > 0
        from flashdesk.engine import gpu_tuning  # what it would record on a GPU fits

        assert {"TILES", "DECODE_MOE", "GROUPED_TILES", "LINEAR_KIND"} <= set(out["choices"])
        assert all(gpu_tuning.valid(name, v) for name, v in out["choices"].items())
        assert "skipped" in module.run(True)  # no GPU here
    finally:
        sys.modules.pop("gpu_kernels", None)
