"""The offload planner on synthetic machines. Expected figures come from the spec's tables and
formulas (written out here), not from the planner's code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import inventory
from flashdesk.offload.figures import ModelFigures
from flashdesk.offload.plan import (
    DISK,
    DOES_NOT_FIT,
    FITS,
    FITS_WITH_CHANGES,
    GPU,
    PlanError,
    PlanOptions,
    make_plan,
)
from flashdesk.offload.predict import predict
from flashdesk.offload.probe import (
    GIB,
    GpuProfile,
    HardwareProfile,
    estimated,
    reported,
)

PROFILES = Path(__file__).parent / "profiles"

# Spec §4.2 / §6.1 figures for V4-Flash.
EXPERT_BYTES = 13_369_344
EXPERTS_TOTAL = 147_169_738_752
CHECKPOINT_BYTES = 159_609_485_896
LAYERS, CSA_LAYERS, HCA_LAYERS = 43, 21, 20


def spec_kv_bytes(n: int, kv: str) -> int:
    """Spec §3.3: 43·128·e_kv + 21·⌊N/4⌋·(e_kv+e_idx) + 20·⌊N/128⌋·e_kv + state. The state
    is what the engine's compressors carry: 60 KiB per CSA layer (6·m·c floats for the KV and
    the indexer's compressor; the spec counts the reference's layout, 80 KiB), 512 KiB per HCA
    layer."""
    e_kv, e_idx = {"bf16": (1024, 256), "fp8": (584, 132)}[kv]
    state = CSA_LAYERS * 60 * 1024 + HCA_LAYERS * 512 * 1024
    return (
        LAYERS * 128 * e_kv
        + CSA_LAYERS * (n // 4) * (e_kv + e_idx)
        + HCA_LAYERS * (n // 128) * e_kv
    ) + state


@pytest.fixture(scope="module")
def flash() -> ModelFigures:
    config = ModelConfig.v4_flash()
    return ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Flash")


def load(name: str) -> HardwareProfile:
    return HardwareProfile.load(PROFILES / f"{name}.json")


def check_budgets(plan, profile: HardwareProfile) -> None:
    """The plan's totals stay within what the profile has, minus reserves; pinned within the cap."""
    ram = plan.memory["ram"]
    assert ram["used"] <= ram["budget"]
    assert ram["budget"] + ram["reserve"] <= profile.usable_ram_bytes() + 1
    assert (
        ram["pinned"]
        + ram["pageable"]
        + (plan.memory.get(GPU, {}).get("used", 0) if plan.mode == "unified" else 0)
        == ram["used"]
    )
    if plan.mode == "gpu+cpu":
        gpu = plan.memory[GPU]
        assert gpu["used"] <= gpu["budget"]
        assert gpu["budget"] + gpu["reserve"] <= profile.gpu.usable_vram_bytes
        cap = profile.pin_cap_bytes.value or 0
        assert plan.pinned_bytes <= cap
    else:
        assert plan.pinned_bytes == 0
    for lp in plan.layers:
        assert lp.experts_gpu + lp.experts_ram + lp.experts_disk == 256
        assert lp.gpu_hit_rate + lp.ram_hit_rate + lp.disk_rate == pytest.approx(1.0)


# ---------------------------------------------------------------------------- model figures


def test_figures_match_the_spec_budget(flash):
    assert flash.expert_bytes == EXPERT_BYTES
    assert flash.experts_total_bytes == EXPERTS_TOTAL
    assert flash.total_bytes == CHECKPOINT_BYTES
    assert flash.total_params == pytest.approx(284.33e9, rel=1e-4)
    assert flash.active_params == pytest.approx(13.27e9, rel=2e-3)
    # Spec §6.1: non-expert layer weights 6.709 GB + head 1.059 GB read every token; stored, the
    # three hash layers' 6.2 MB tid2eid tables come on top (one row of each is read per token).
    assert flash.dense_total_bytes == pytest.approx(6.709e9 + 1.059e9 + 3 * 6.2e6, rel=2e-3)
    tables = [layer.table_bytes for layer in flash.layers]
    assert tables[:3] == [129280 * 6 * 8] * 3 and not any(tables[3:])
    read = sum(layer.dense_read_bytes + layer.shared_bytes for layer in flash.layers)
    assert read == pytest.approx(6.709e9, rel=1e-3)
    assert [layer.attention for layer in flash.layers].count("csa") == CSA_LAYERS
    assert [layer.attention for layer in flash.layers].count("hca") == HCA_LAYERS


@pytest.mark.parametrize(
    ("n", "bf16_gib", "fp8_gib"),
    [
        (4096, 0.043, 0.029),
        (32768, 0.227, 0.132),
        (131072, 0.856, 0.484),
        (262144, 1.696, 0.954),
        (524288, 3.376, 1.894),
        (1048576, 6.735, 3.774),
    ],
)
def test_kv_bytes_match_the_spec_table(flash, n, bf16_gib, fp8_gib):
    assert flash.kv_bytes(n, "bf16") / GIB == pytest.approx(bf16_gib, rel=0.01, abs=6e-4)
    assert flash.kv_bytes(n, "fp8") / GIB == pytest.approx(fp8_gib, rel=0.01, abs=6e-4)
    assert flash.kv_bytes(n, "bf16") == spec_kv_bytes(n, "bf16")
    assert flash.kv_bytes(n, "fp8") == spec_kv_bytes(n, "fp8")


def test_kv_read_per_token_matches_the_spec_table(flash):
    # Spec §6.2: KV read per decode token at 1M: 1594 MB (BF16), 832 MB (FP8 layout).
    for kv, mb in (("bf16", 1594), ("fp8", 832)):
        read = sum(flash.kv_read_layer_bytes(layer, 1 << 20, kv) for layer in flash.layers)
        assert read / 1e6 == pytest.approx(mb, rel=0.005)


def test_v4_pro_kv_at_1m():
    config = ModelConfig.v4_pro()
    pro = ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Pro")
    # Spec §3.3 cross-check: the formula for V4-Pro (30 CSA + 31 HCA) gives ≈ 9.6 GiB BF16 at 1M.
    assert pro.kv_bytes(1 << 20, "bf16") / GIB == pytest.approx(9.6, rel=0.01)
    assert pro.n_experts == 384 and len(pro.layers) == 61


# ---------------------------------------------------------------------------- scenarios


def test_rtx4090_192gb_fits_with_experts_in_ram_at_128k(flash):
    profile = load("rtx4090_192gb_ddr5")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    check_budgets(plan, profile)
    assert plan.verdict == FITS and plan.changes == []
    assert plan.mode == "gpu+cpu" and plan.cpu_attention_layers == [] and plan.head_on == GPU
    assert plan.kv_bytes_gpu == plan.kv_bytes == spec_kv_bytes(131072, "bf16")
    assert plan.disk_bytes == 0
    ram_experts = sum(lp.experts_ram for lp in plan.layers)
    gpu_experts = sum(lp.experts_gpu for lp in plan.layers)
    assert ram_experts + gpu_experts == 43 * 256
    assert ram_experts * EXPERT_BYTES > 0.85 * EXPERTS_TOTAL  # the experts live in RAM
    # 24 GB leaves room for whole expert layers beside ~8.7 GB of attention, head and KV.
    assert len(plan.gpu_expert_layers) >= 2
    assert plan.pinned_bytes == ram_experts * EXPERT_BYTES  # memlock unlimited: all pinned
    locations = {(g.name, g.location) for g in plan.groups}
    assert ("KV cache", GPU) in locations and ("embedding", "pageable") in locations


def test_rtx3090_64gb_names_disk_paging_and_lower_bit_models(flash):
    profile = load("rtx3090_64gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    check_budgets(plan, profile)
    assert plan.verdict == FITS_WITH_CHANGES
    # 64 GB cannot hold 147 GB of experts, even with 24 GB of VRAM beside it.
    assert plan.disk_bytes > EXPERTS_TOTAL - (64 + 24) * GIB
    assert plan.memory[DISK]["mapped"] == plan.disk_bytes
    text = "\n".join(plan.changes)
    paging = next(c for c in plan.changes if "paged from disk" in c)
    predicted = predict(plan, flash, profile).decode_tok_s
    assert f"~{predicted:.2f} tok/s" in paging
    sizes = [int(s) for s in re.findall(r"GGUF[^~]*~(\d+) GB", text)]
    assert len(sizes) == 2 and min(sizes) >= 78 and max(sizes) <= 106
    assert "more RAM" in text
    # memlock is 8 MiB here: nothing pinned, and the plan says how to change that.
    assert plan.pinned_bytes == 0
    assert any("ulimit -l" in n for n in plan.notes)


def test_cpu_only_256gb_fits(flash):
    profile = load("cpu_only_256gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    check_budgets(plan, profile)
    assert plan.mode == "cpu" and plan.verdict == FITS and GPU not in plan.memory
    assert all(lp.attention_on == "cpu" and lp.experts_ram == 256 for lp in plan.layers)
    # all but the MTP block's experts (memory-mapped: it drafts in the CPU mode, spec §6.1's
    # 171.2 MB of its other weights in RAM)
    mtp_experts = 256 * 13_369_344
    assert plan.memory["ram"]["used"] == pytest.approx(
        CHECKPOINT_BYTES - mtp_experts + spec_kv_bytes(131072, "bf16"), rel=1e-6
    )
    mtp = next(g for g in plan.groups if g.name == "MTP block")
    assert mtp.bytes == 3_593_787_756 - mtp_experts and "speculative" in mtp.detail


def test_8gb_gpu_at_1m_moves_what_must_move(flash):
    profile = load("gpu8gb_192gb")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    check_budgets(plan, profile)
    assert plan.verdict == FITS_WITH_CHANGES
    moved = plan.cpu_attention_layers
    assert moved, "attention + KV at 1M cannot all fit in 8 GB"
    # The KV cache at 1M is mostly CSA (spec §3.3: ~98 %): those layers give up least per byte.
    assert all(flash.layers[i].attention == "csa" for i in moved)
    assert plan.kv_bytes_gpu < plan.kv_bytes == spec_kv_bytes(1 << 20, "bf16")
    change = plan.changes[0]
    assert "run on the CPU" in change and f"{len(moved)} of 43 layers" in change
    assert any("GPU with at least" in c for c in plan.changes)
    # At 32K the same card still cannot hold ~7.8 GB of always-read weights: it says so too.
    short = make_plan(flash, profile, PlanOptions(context=32768))
    assert short.verdict == FITS_WITH_CHANGES and short.kv_bytes_gpu > 0


def test_fp8_kv_or_shorter_context_is_offered_when_it_helps(flash):
    profile = load("rtx3090_64gb")
    # A 12 GB card: 7.8 GB of weights + 6.7 GiB of BF16 KV at 1M do not fit; FP8 KV does not
    # either, but a shorter context does.
    profile.gpus[0].vram_free_bytes = reported(12 * GIB, "nvml")
    profile.gpus[0].vram_total_bytes = reported(12 * GIB, "nvml")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    assert any(c.startswith("or --ctx") for c in plan.changes)
    profile.gpus[0].vram_free_bytes = reported(16 * GIB, "nvml")
    profile.gpus[0].vram_total_bytes = reported(16 * GIB, "nvml")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    assert any(c.startswith("or --kv fp8") for c in plan.changes)
    fp8 = make_plan(flash, profile, PlanOptions(context=1 << 20, kv_dtype="fp8"))
    assert fp8.cpu_attention_layers == [] and fp8.kv_bytes == spec_kv_bytes(1 << 20, "fp8")


def test_apple_unified_memory_is_not_counted_twice(flash):
    profile = load("apple_m3max_128gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    check_budgets(plan, profile)
    assert plan.mode == "unified"
    in_memory = sum(g.bytes for g in plan.groups if g.location not in (DISK, "not loaded"))
    assert in_memory <= profile.usable_ram_bytes()
    # 148.6 GiB of weights cannot sit in 128 GB: experts page from disk, or a 2-3-bit GGUF fits.
    assert plan.verdict == FITS_WITH_CHANGES and plan.disk_bytes > 0
    assert any("GGUF" in c and "fits in RAM" in c for c in plan.changes)


def test_windows_pins_at_most_half_of_ram(flash):
    profile = load("windows_rtx4090_192gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    check_budgets(plan, profile)
    assert plan.verdict == FITS
    assert plan.pinned_bytes <= 192 * GIB // 2
    ram_experts = sum(lp.experts_ram for lp in plan.layers) * EXPERT_BYTES
    assert plan.pinned_bytes > 0 and plan.pageable_bytes >= ram_experts - plan.pinned_bytes
    assert any("pinned" in n and "half of RAM" in n for n in plan.notes)


def test_too_little_ram_shrinks_the_context_then_does_not_fit(flash):
    profile = load("cpu_only_256gb")
    profile.ram_total_bytes = reported(16 * GIB, "psutil")
    profile.ram_available_bytes = reported(15 * GIB, "psutil")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    check_budgets(plan, profile)
    assert plan.verdict == FITS_WITH_CHANGES and plan.context < 1 << 20
    assert plan.changes[0].startswith("smaller context")
    # The always-read weights plus the KV at the chosen context fit in the RAM budget.
    assert (
        flash.dense_total_bytes + flash.embed_bytes + spec_kv_bytes(plan.context, "bf16")
        <= (plan.memory["ram"]["budget"])
    )
    profile.ram_total_bytes = reported(8 * GIB, "psutil")
    profile.ram_available_bytes = reported(7 * GIB, "psutil")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    assert plan.verdict == DOES_NOT_FIT
    assert any("GiB of RAM" in c for c in plan.changes)
    assert any("GGUF" in c for c in plan.changes)


def test_expert_frequency_puts_the_hottest_experts_on_the_gpu(flash):
    profile = load("rtx4090_192gb_ddr5")
    counts = [[1000.0 / (1 + (e * 7 + i) % 256) for e in range(256)] for i in range(43)]
    plan = make_plan(flash, profile, PlanOptions(expert_frequency=counts))
    uniform = make_plan(flash, profile)
    check_budgets(plan, profile)
    for lp in plan.layers:
        if lp.whole_layer_on_gpu or not lp.hot_expert_ids:
            continue
        hottest = sorted(range(256), key=lambda e: -counts[lp.index][e])[: lp.experts_gpu]
        assert set(lp.hot_expert_ids) == set(hottest)
    assert sum(lp.gpu_hit_rate for lp in plan.layers) > 1.5 * sum(
        lp.gpu_hit_rate for lp in uniform.layers
    )


def test_bad_options_are_explained(flash):
    profile = load("rtx4090_192gb_ddr5")
    with pytest.raises(PlanError, match="KV dtype"):
        make_plan(flash, profile, PlanOptions(kv_dtype="int4"))
    with pytest.raises(PlanError, match=r"outside 1\.\.1048576"):
        make_plan(flash, profile, PlanOptions(context=2 << 20))
    with pytest.raises(PlanError, match="has 2 layers"):
        make_plan(flash, profile, PlanOptions(expert_frequency=[[1] * 256] * 2))
    with pytest.raises(PlanError, match="non-negative"):
        make_plan(flash, profile, PlanOptions(expert_frequency=[[1] * 255] * 43))


# ---------------------------------------------------------------------------- never over-commit


def _random_profile(ram_gib, avail, vram_gib, memlock_gib, windows, unified) -> HardwareProfile:
    profile = HardwareProfile(label="random")
    profile.os = reported("Windows 11" if windows else "Linux 6.8", "platform")
    profile.ram_total_bytes = reported(ram_gib * GIB, "psutil")
    profile.ram_available_bytes = reported(int(ram_gib * avail * GIB), "psutil")
    profile.ram_read_gbps = estimated(60.0)
    profile.physical_cores = reported(8, "psutil")
    if windows:
        profile.pin_cap_bytes = estimated(ram_gib * GIB // 2)
    else:
        profile.pin_cap_bytes = reported(int(memlock_gib * GIB), "getrlimit(RLIMIT_MEMLOCK)")
    if unified:
        from flashdesk.offload.probe import apple_gpu

        profile.gpus = [apple_gpu("M3 Max", ram_gib * GIB)]
    elif vram_gib:
        gpu = GpuProfile()
        gpu.vram_total_bytes = reported(vram_gib * GIB, "nvml")
        gpu.vram_free_bytes = reported(int(vram_gib * 0.95 * GIB), "nvml")
        gpu.memory_bandwidth_gbps = estimated(900.0)
        profile.gpus = [gpu]
    return profile


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ram_gib=st.integers(8, 512),
    avail=st.floats(0.5, 1.0),
    vram_gib=st.sampled_from([0, 4, 8, 12, 16, 24, 32, 48, 80]),
    memlock_gib=st.sampled_from([0.0078125, 0.5, 8, 64, 1024]),
    windows=st.booleans(),
    unified=st.booleans(),
    ctx=st.sampled_from([4096, 32768, 131072, 524288, 1 << 20]),
    kv=st.sampled_from(["bf16", "fp8"]),
)
def test_plans_never_over_commit(
    flash, ram_gib, avail, vram_gib, memlock_gib, windows, unified, ctx, kv
):
    profile = _random_profile(ram_gib, avail, vram_gib, memlock_gib, windows, unified)
    plan = make_plan(flash, profile, PlanOptions(context=ctx, kv_dtype=kv))
    if plan.verdict == DOES_NOT_FIT:
        assert plan.changes and not plan.layers
        # Only when RAM cannot hold even what is read every token at the smallest context.
        always_read = flash.embed_bytes + flash.dense_total_bytes + spec_kv_bytes(4096, kv)
        if plan.mode == "unified":  # one pool: the GPU's workspace and copies are RAM too
            always_read += plan.gpu_workspace_bytes
            always_read += flash.dense_total_on(gpu=True) - flash.dense_total_on(gpu=False)
        assert plan.memory["ram"]["budget"] < always_read
        return
    check_budgets(plan, profile)
    if plan.disk_bytes or (plan.cpu_attention_layers and plan.mode != "cpu"):
        assert plan.verdict == FITS_WITH_CHANGES
    if plan.verdict == FITS:
        assert plan.disk_bytes == 0 and plan.context == ctx


def test_profile_probed_on_the_lent_h200_machine(flash):
    # Written by `probe()` on the lent GPU host (NVML, torch copies, 16 threads): the NVML path.
    profile = load("h200_lent_machine_measured")
    gpu = profile.gpu
    for name in (
        "name",
        "vram_total_bytes",
        "compute_capability",
        "pcie_gen_max",
        "driver_version",
    ):
        assert getattr(gpu, name).source == "reported:nvml", name
    assert gpu.h2d_pinned_gbps.source == gpu.h2d_pageable_gbps.source == "measured"
    assert gpu.h2d_pinned_gbps.value > 4 * gpu.h2d_pageable_gbps.value
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    check_budgets(plan, profile)
    assert plan.verdict == FITS and plan.kv_bytes_gpu == spec_kv_bytes(1 << 20, "bf16")
    # ~130 GiB of VRAM beside ~14 GiB of attention, head and KV: most expert layers go whole.
    assert len(plan.gpu_expert_layers) >= 30


def test_without_disk_paging_a_small_machine_does_not_fit(flash):
    profile = load("rtx3090_64gb")
    plan = make_plan(flash, profile, PlanOptions(allow_disk=False))
    assert plan.verdict == DOES_NOT_FIT
    assert plan.changes[0].startswith("does not fit without paging from disk")
    with pytest.raises(PlanError, match="cannot be negative"):
        make_plan(flash, profile, PlanOptions(ram_reserve_bytes=-1))


def test_two_gpus_use_the_larger_one_and_say_so(flash):
    profile = load("rtx3090_64gb")
    small = GpuProfile(index=1)
    small.vram_total_bytes = reported(8 * GIB, "nvml")
    small.vram_free_bytes = reported(8 * GIB, "nvml")
    profile.gpus.append(small)
    plan = make_plan(flash, profile)
    assert plan.memory[GPU]["capacity"] == 24 * GIB
    assert any("2 GPUs found" in n and "GPU 0" in n for n in plan.notes)


def test_offload_imports_neither_engine_nor_app_and_plans_without_torch():
    import ast
    import subprocess
    import sys

    offload = Path(__file__).resolve().parent.parent / "offload"
    for path in offload.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("flashdesk.app"), (path.name, name)
                # Only the C extension (lazily, to measure) and torch (lazily, to time copies).
                if name.startswith("flashdesk.engine"):
                    assert name == "flashdesk.engine._kernels", (path.name, name)
                if name.startswith(("flashdesk.engine", "torch")):
                    assert node.col_offset > 0, f"{path.name} imports {name} at module level"
    code = (
        "import sys, json;"
        "from flashdesk.engine.config import ModelConfig;"
        "from flashdesk.engine.inventory import inventory;"
        "from flashdesk.offload.figures import ModelFigures;"
        "from flashdesk.offload.plan import make_plan;"
        "from flashdesk.offload.predict import predict;"
        "from flashdesk.offload.probe import HardwareProfile;"
        "c = ModelConfig.v4_flash(); f = ModelFigures.from_inventory(inventory(c), c);"
        f"p = HardwareProfile.load({str(PROFILES / 'rtx3090_64gb.json')!r});"
        "plan = make_plan(f, p); predict(plan, f, p);"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'PySide6'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_unified_does_not_fit_message_counts_the_gpu_workspace(flash):
    """Found by the property test: 13 GiB of unified memory. The refusal's figures must agree
    with the decision (the GPU workspace comes out of the same pool)."""
    profile = _random_profile(13, 1.0, 0, 8, False, True)
    plan = make_plan(flash, profile, PlanOptions(context=4096, kv_dtype="bf16"))
    assert plan.verdict == DOES_NOT_FIT
    need = flash.embed_bytes + flash.dense_total_bytes + spec_kv_bytes(4096, "bf16")
    workspace = flash.prefill_workspace(PlanOptions().prefill_chunk, 4096)
    assert plan.gpu_workspace_bytes == workspace
    need += workspace
    assert plan.memory["ram"]["budget"] < need
    assert f"need {need / 2**30:.1f} GiB" in plan.changes[0]
