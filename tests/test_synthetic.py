"""The in-memory model source (`SyntheticCheckpoint`) and `flashdesk bench --synthetic`."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flashdesk import bench
from flashdesk.engine.checkpoint import Checkpoint, write_random
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.runtime import Placement, RuntimeLoadError, load_runtime
from flashdesk.engine.synthetic import SyntheticCheckpoint

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def test_same_bytes_as_the_written_checkpoint_and_same_logits(tmp_path):
    config = ModelConfig.tiny()
    folder = write_random(tmp_path / "m", config, seed=5)
    synthetic = SyntheticCheckpoint(config, seed=5)
    with Checkpoint.open(folder) as ckpt:
        assert sorted(synthetic.names()) == sorted(ckpt.names())
        for name in ckpt.names():
            a, b = ckpt.raw(name), synthetic.raw(name)
            assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), name
            assert torch.equal(_bytes(a), _bytes(b)), name
            assert synthetic.info(name).nbytes == ckpt.info(name).nbytes
    ids = torch.arange(12) * 7 % config.vocab_size
    placement = Placement.uniform(config, "pageable")
    with load_runtime(folder, placement=placement) as rt:
        want = rt.forward_full(ids)
    with load_runtime(synthetic, placement=placement) as rt:
        got = rt.forward_full(ids)
    assert torch.equal(got, want)


def test_expert_pool_shares_storage_and_refuses_disk_placement():
    config = ModelConfig.tiny()
    n = config.n_routed_experts
    synthetic = SyntheticCheckpoint(config, seed=1, expert_pool=2)
    assert synthetic.shares_expert_storage
    p0, p1 = (spec.prefix for spec in config.main_layers[:2])
    same = [
        synthetic.raw(f"{p}ffn.experts.{e}.w1.weight").data_ptr() for p, e in ((p0, 0), (p1, 2))
    ]
    assert same[0] == same[1]  # expert 2 of layer 1 aliases pool expert 0
    other = synthetic.raw(f"{p0}ffn.experts.1.w1.weight").data_ptr()
    assert other != same[0]
    made = synthetic.resident_bytes()
    synthetic.raw(f"{p1}ffn.experts.{n - 1}.w1.weight")  # pool expert (n-1) % 2 = 1
    assert synthetic.resident_bytes() == made  # no new bytes: it is a pool expert already made
    with pytest.raises(RuntimeLoadError, match="memory-mapped from disk"):
        load_runtime(synthetic, placement=Placement.uniform(config, "mmap"))
    with load_runtime(
        SyntheticCheckpoint(config, 1, 2), placement=Placement.uniform(config, "pageable")
    ) as rt:
        logits = rt.forward_full(torch.arange(6))
        # each expert the runtime holds is its own copy, not the shared pool bytes
        host = rt.hosts[0]
        assert host.parts[0][0].data_ptr() != host.parts[2][0].data_ptr()
        assert torch.equal(host.parts[0][0], host.parts[2][0])
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="expert_pool"):
        SyntheticCheckpoint(config, expert_pool=0)


def _load_bench_module():
    spec = importlib.util.spec_from_file_location(
        "synthetic_bench_test", BENCHMARKS / "synthetic.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_synthetic_config_cuts_layers_and_refuses_nonsense():
    module = _load_bench_module()
    config = module._config("v4-flash", 3)
    assert config.num_hidden_layers == 3 and len(config.compress_ratios) == 3
    assert config.num_nextn_predict_layers == 0 and config.num_hash_layers <= 3
    assert (
        module._config("v4-flash", None).num_hidden_layers
        == ModelConfig.v4_flash().num_hidden_layers
    )
    with pytest.raises(SystemExit, match="--layers"):
        module._config("v4-flash", 0)
    with pytest.raises(SystemExit, match="unknown synthetic model"):
        module._config("v5", None)


def test_the_plan_keeps_the_deepest_context_up_to_the_window():
    """A 1M depth plans the model's whole 1M window (its steps fit in the margin it is filled
    short of); on the H200 the 1M run stopped with a PlanError at 1,048,608 tokens."""
    module = _load_bench_module()
    one_m = 1 << 20
    assert module._plan_context(8192, (), 64, one_m, "m") == 8192
    assert module._plan_context(8192, (131072,), 64, one_m, "m") == 131072 + 128
    assert module._plan_context(8192, (131072, one_m), 64, one_m, "m") == one_m
    assert module.DEPTH_MARGIN > 2 + module.DEPTH_STEPS  # the steps after a filled depth fit
    with pytest.raises(SystemExit, match="beyond the 1,048,576-token context"):
        module._plan_context(8192, (one_m + 1,), 64, one_m, "m")


def test_vram_option_leaves_the_plan_a_desktop_cards_memory():
    """--vram 24 on a 139 GiB H200: the reserve leaves 24 GiB less the planner's own reserve
    for such a card, as `flashdesk fit` would plan on one."""
    module = _load_bench_module()
    gib = 1 << 30
    usable = 139 * gib
    reserve = module._vram_reserve(usable, 24)
    assert usable - reserve == 24 * gib - (gib // 2 + 24 * gib // 20)
    with pytest.raises(SystemExit, match=r"at most this GPU's usable 139\.0 GiB"):
        module._vram_reserve(usable, 200)
    with pytest.raises(SystemExit, match="above 0"):
        module._vram_reserve(usable, 0)


def test_bench_cli_passes_the_synthetic_options(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "benchmarks"
    fake.mkdir()
    (fake / "synthetic.py").write_text(
        "def run(json_output=False, **kw):\n    print('KW', sorted(kw.items()))\n    return kw\n"
    )
    (fake / "kernels.py").write_text(
        "def run(json_output=False):\n    print('KERNELS')\n    return {}\n"
    )
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: fake)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = ["--synthetic", "v4-flash", "--layers", "2", "--decode-steps", "5", "--kv", "fp8"]
    args += ["--vram", "24"]
    assert bench.run(parser.parse_args([*args, "--depth", "128K", "1M"])) == 0
    out = capsys.readouterr().out
    assert (
        "('layers', 2)" in out
        and "('decode_steps', 5)" in out
        and "('model', 'v4-flash')" in out
        and "('profile_steps', 0)" in out
        and "('kv_dtype', 'fp8')" in out
        and "('depths', (131072, 1048576))" in out
        and "('vram_gib', 24.0)" in out
    )
    assert bench.run(parser.parse_args(["--all"])) == 0  # --all leaves the full-size run out
    assert capsys.readouterr().out.strip() == "KERNELS"


@pytest.mark.parametrize("kv_format", ["native", "fp8"])
def test_fill_context_makes_a_state_at_a_depth(kv_format):
    """A state as if `position` tokens had been read (rounded down to the compress ratios):
    the stores hold position/ratio rows with room for the next ones, and decode and prompt
    calls go on from there with finite logits."""
    from flashdesk.engine.runtime import load_runtime
    from flashdesk.engine.synthetic import fill_context

    config = ModelConfig.tiny(
        num_hidden_layers=3, num_nextn_predict_layers=0, compress_ratios=(0, 4, 16), head_dim=80
    )
    with load_runtime(SyntheticCheckpoint(config, seed=1)) as rt:
        state = rt.new_state(kv_format)
        fill_context(state, config, 1000 + 7)
        assert state.position == 1008 - 16  # a multiple of 16 (and of 4)
        for spec, layer in zip(config.main_layers, state.layers, strict=True):
            for store in (layer.kv_entries, layer.index_keys):
                if store is not None:
                    assert store.n == 992 // spec.compress_ratio
                    assert store.capacity > store.n + 8
        assert layer.window.slots().abs().sum() > 0
        logits = rt.decode(5, state)
        logits2 = rt.prefill(list(range(1, 20)), state)
        assert torch.isfinite(logits).all() and torch.isfinite(logits2).all()
        assert state.position == 992 + 20


def test_the_floors_it_records_are_the_planners_own_model_solved_for_the_run():
    """`bench --synthetic` records the GPU's per-layer decode and prefill floors at which the
    planner's model gives the measured times, not time ÷ layers (a run bound by the CPU's experts
    would put their time on the GPU's kernels); a time the figure alone cannot reach records
    nothing."""
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import PlanOptions
    from flashdesk.offload.predict import Efficiency, plan_and_predict, predict
    from flashdesk.offload.probe import HardwareProfile, Sourced

    module = _load_bench_module()
    config = ModelConfig.v4_flash().replace(num_nextn_predict_layers=0)
    figures = ModelFigures.from_inventory(inventory(config), config, "V4-Flash")
    profile = HardwareProfile.load(
        Path(__file__).parent / "profiles" / "h200_lent_machine_measured.json"
    )
    options = PlanOptions(context=8192, vram_reserve_bytes=100 << 30)  # as a ~40 GiB card
    plan, _ = plan_and_predict(figures, profile, options, 2048, Efficiency())
    assert sum(lp.experts_ram > 0 for lp in plan.layers) > 20  # mostly the CPU's experts
    truth = Efficiency()
    truth.gpu_layer_seconds = Sourced(0.42e-3, "calibrated", "the run")
    truth.gpu_prefill_token_seconds = Sourced(25e-6, "calibrated", "the run")
    run = predict(plan, figures, profile, 2048, truth)
    step_s, prefill_s = 1 / run.decode_tok_s, 2048 / run.prefill_tok_s
    sys.path.insert(0, str(BENCHMARKS))
    try:
        floors = module._solved_floors(
            plan, figures, profile, 2048, Efficiency(), step_s, prefill_s
        )
        assert floors["gpu_layer_seconds"] == pytest.approx(0.42e-3, rel=1e-3)
        assert floors["gpu_prefill_token_seconds"] == pytest.approx(25e-6, rel=1e-3)
        assert step_s / len(plan.layers) > 1.5 * 0.42e-3  # what time ÷ layers would have said
        # faster than the model's CPU experts alone allow: no floor reproduces it
        assert "gpu_layer_seconds" not in module._solved_floors(
            plan, figures, profile, 2048, Efficiency(), step_s / 3, prefill_s
        )
    finally:
        sys.path.remove(str(BENCHMARKS))
