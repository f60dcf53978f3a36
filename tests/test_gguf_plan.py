"""The planner on GGUF inventories: bytes from the file, the same roofline, and the plan as a
llama.cpp placement (GPU layers, expert tensors kept on the CPU, mlock, KV type)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed (make test installs it)")

from _gguf_headers import v4_flash_gguf

from flashdesk.engine.config import ModelConfig
from flashdesk.engine.gguf.backend import GGUFPlacement
from flashdesk.engine.gguf.errors import GGUFError
from flashdesk.engine.gguf.metadata import read_gguf
from flashdesk.engine.gguf.plan_glue import gguf_inventory, model_figures
from flashdesk.engine.gguf.synthetic import write_tiny_moe
from flashdesk.engine.inventory import inventory
from flashdesk.offload.figures import ModelFigures
from flashdesk.offload.plan import DISK, FITS, GPU, PlanOptions, make_plan
from flashdesk.offload.predict import predict
from flashdesk.offload.probe import HardwareProfile

PROFILES = Path(__file__).parent / "profiles"


def test_gguf_inventory_splits_stacked_experts_into_rows():
    info = v4_flash_gguf()
    rows = gguf_inventory(info).tensors
    experts = [r for r in rows if r.component == "routed_experts"]
    assert len(experts) == 3 * 43 * 256
    assert sum(r.nbytes for r in experts) == info.expert_bytes
    assert {r.expert for r in experts} == set(range(256))
    embed = next(r for r in rows if r.component == "embed")
    assert embed.shape[0] == 129_280  # rows first, as the planner reads the vocabulary


def test_figures_carry_the_file_bytes_and_the_v4_structure():
    info = v4_flash_gguf()
    figures = model_figures(info)
    config = ModelConfig.v4_flash()
    native = ModelFigures.from_inventory(inventory(config), config, "fp4")
    assert figures.total_bytes == info.weight_bytes
    assert [lf.attention for lf in figures.layers] == [lf.attention for lf in native.layers]
    assert [lf.n_experts for lf in figures.layers] == [256] * 43
    assert figures.layers[0].hash_routed and not figures.layers[5].hash_routed
    # Same parameters, fewer bytes: 2.625-bit experts against FP4's 4.25 bits.
    assert figures.layers[3].expert_params == native.layers[3].expert_params
    ratio = figures.layers[3].expert_bytes / native.layers[3].expert_bytes
    assert 0.55 < ratio < 0.7
    assert figures.experts_total_bytes < 0.7 * native.experts_total_bytes
    assert figures.kv_bytes(131072, "bf16") == native.kv_bytes(131072, "bf16")


def test_a_64gb_machine_pages_fp4_from_disk_but_fits_the_2bit_gguf():
    profile = HardwareProfile.load(PROFILES / "rtx3090_64gb.json")
    config = ModelConfig.v4_flash()
    native = ModelFigures.from_inventory(inventory(config), config, "fp4")
    figures = model_figures(v4_flash_gguf())
    fp4_plan = make_plan(native, profile)
    assert fp4_plan.disk_bytes > 0
    gguf_plan = make_plan(figures, profile)
    assert gguf_plan.disk_bytes < fp4_plan.disk_bytes
    fp4_speed = predict(fp4_plan, native, profile).decode_tok_s
    gguf_speed = predict(gguf_plan, figures, profile).decode_tok_s
    assert gguf_speed > fp4_speed  # fewer bytes per token on the same roofline
    assert DISK in {g.location for g in fp4_plan.groups}


def test_plan_becomes_a_llama_cpp_placement():
    profile = HardwareProfile.load(PROFILES / "rtx4090_192gb_ddr5.json")
    figures = model_figures(v4_flash_gguf())
    plan = make_plan(figures, profile)
    assert plan.verdict == FITS
    placement = GGUFPlacement.from_plan(plan, n_layers=43)
    gpu_expert_layers = set(plan.gpu_expert_layers)
    if all(lp.attention_on == GPU for lp in plan.layers) and plan.head_on == GPU:
        assert placement.n_gpu_layers == -1
    patterns = placement.override_patterns
    if placement.cpu_moe is True:
        assert patterns == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    else:
        kept = {int(p.split(".")[1].rstrip("\\")) for p in patterns}
        assert kept == set(range(43)) - gpu_expert_layers
    assert placement.context == plan.context
    assert placement.mlock == (plan.pinned_bytes > 0)
    assert placement.kv_type == {"bf16": "bf16", "fp8": "q8_0"}[plan.kv_dtype]


def test_non_v4_gguf_is_refused_by_the_planner(tmp_path):
    with pytest.raises(GGUFError, match="'qwen3moe' model; the planner models"):
        model_figures(read_gguf(write_tiny_moe(tmp_path / "m.gguf")))


def test_a_cpu_build_of_llama_cpp_and_the_quantized_kv_cache():
    """llama.cpp without GPU support keeps everything on the CPU whatever the plan; the FP8 KV
    plan becomes q8_0 with flash attention on (llama.cpp quantizes the V cache only with it)."""
    profile = HardwareProfile.load(PROFILES / "rtx4090_192gb_ddr5.json")
    figures = model_figures(v4_flash_gguf())
    plan = make_plan(figures, profile, PlanOptions(context=8192, kv_dtype="fp8"))
    on_gpu = GGUFPlacement.from_plan(plan, n_layers=43)
    assert on_gpu.n_gpu_layers != 0 and on_gpu.kv_type == "q8_0" and on_gpu.flash_attn is True
    assert on_gpu.describe().startswith("llama.cpp: ") and "KV cache q8_0, 8,192 tokens" in (
        on_gpu.describe()
    )
    cpu = GGUFPlacement.from_plan(plan, n_layers=43, gpu_offload=False)
    assert (cpu.n_gpu_layers, cpu.cpu_moe, cpu.kv_type) == (0, True, "q8_0")
    assert cpu.describe() == "llama.cpp on the CPU; KV cache q8_0, 8,192 tokens"
    bf16 = make_plan(figures, profile, PlanOptions(context=8192))
    assert GGUFPlacement.from_plan(bf16, n_layers=43).flash_attn is None  # llama.cpp decides


def test_fit_plans_a_gguf_file(tmp_path, monkeypatch):
    """`flashdesk fit --model X.gguf` (and the app's load) plan from the file's header; a GGUF
    the planner does not model is refused with its message."""
    from flashdesk.engine.config import ConfigError
    from flashdesk.engine.gguf import metadata
    from flashdesk.fit import evaluate

    profile = HardwareProfile.load(PROFILES / "rtx4090_192gb_ddr5.json")
    tiny = write_tiny_moe(tmp_path / "qwen.gguf")
    with pytest.raises(ConfigError, match="'qwen3moe' model; the planner models"):
        evaluate(model=str(tiny), profile=profile)
    monkeypatch.setattr(metadata, "read_gguf", lambda path: v4_flash_gguf())
    figures, _profile, plan, prediction = evaluate(
        model="DeepSeek-V4-Flash-Q2_K.gguf", context=8192, profile=profile
    )
    assert figures.total_bytes == v4_flash_gguf().weight_bytes
    assert plan.verdict == FITS and prediction.decode_tok_s > 0


def test_the_app_loads_a_v4_gguf_with_the_planners_placement(tmp_path, monkeypatch):
    """The app plans a DeepSeek-V4 GGUF as it plans a checkpoint (the wizard's KV format), and
    llama.cpp gets that placement; the GPU only where its build can offload; other GGUFs (the
    demo model) run on the CPU."""
    from flashdesk import fit
    from flashdesk.app.engine_backend import EngineBackend
    from flashdesk.engine.gguf import llama_glue

    profile = HardwareProfile.load(PROFILES / "rtx4090_192gb_ddr5.json")
    figures = model_figures(v4_flash_gguf())
    asked = []

    def plan_for_loading(model, context, kv_dtype="bf16", vram_reserve_gib=None):
        asked.append((model, context, kv_dtype))
        return make_plan(figures, profile, PlanOptions(context=context, kv_dtype=kv_dtype)), None

    monkeypatch.setattr(fit, "plan_for_loading", plan_for_loading)
    path = tmp_path / "DeepSeek-V4-Flash-Q2_K.gguf"
    backend = EngineBackend(path, tmp_path, context_limit=8192)
    backend.configure(str(path), 8192, "", {"kv_dtype": "fp8"})
    info = v4_flash_gguf()
    for offload in (True, False):
        monkeypatch.setattr(llama_glue, "gpu_offload_supported", lambda offload=offload: offload)
        placement = backend._gguf_placement(path, info, 4096, False, lambda f, what: None)
        assert asked[-1] == (str(path), 8192, "fp8")
        assert placement.kv_type == "q8_0" and placement.context == 4096
        assert (placement.n_gpu_layers != 0) == offload
    demo = backend._gguf_placement(path, info, 4096, True, lambda f, what: None)
    assert demo == GGUFPlacement(context=4096) and len(asked) == 2
