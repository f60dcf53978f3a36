"""Speed prediction (roofline against the spec's per-token bytes) and the `flashdesk fit` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from flashdesk.cli import main
from flashdesk.engine.config import ModelConfig
from flashdesk.engine.inventory import inventory
from flashdesk.fit import _tokens
from flashdesk.offload.figures import ModelFigures
from flashdesk.offload.plan import PlanError, PlanOptions, make_plan
from flashdesk.offload.predict import Efficiency, _rates, predict
from flashdesk.offload.probe import GIB, HardwareProfile, ProfileError, Sourced

PROFILES = Path(__file__).parent / "profiles"
EXPERT_BYTES = 13_369_344
# Spec §6.1: bytes read per decode token: non-expert layer weights 6.709 GB, head 1.059 GB,
# routed experts 3.449 GB (11.22 GB in all); §6.2: KV read at 128K (BF16) 214 MB.
NON_EXPERT_PER_TOKEN = 6.709e9 + 1.059e9
EXPERTS_PER_TOKEN = 3.449e9
KV_READ_128K = 214e6


@pytest.fixture(scope="module")
def flash() -> ModelFigures:
    config = ModelConfig.v4_flash()
    return ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Flash")


def load(name: str) -> HardwareProfile:
    return HardwareProfile.load(PROFILES / f"{name}.json")


def test_rtx4090_decode_is_within_the_roofline(flash):
    profile = load("rtx4090_192gb_ddr5")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    pred = predict(plan, flash, profile)
    ram_bw, gpu_bw = 72.0e9, 1008.1e9  # the profile's measured RAM read, GPU memory bandwidth
    gpu_share = sum(lp.experts_gpu for lp in plan.layers) / (43 * 256)
    from_ram = EXPERTS_PER_TOKEN * (1 - gpu_share)  # uniform routing
    assert 0.8 * EXPERTS_PER_TOKEN < from_ram < EXPERTS_PER_TOKEN
    on_gpu = NON_EXPERT_PER_TOKEN + KV_READ_128K + EXPERTS_PER_TOKEN * gpu_share
    bound = 1.0 / (from_ram / ram_bw + on_gpu / gpu_bw)  # ≈ 3.45 GB ÷ RAM bw + the GPU part
    # The model overlaps the shared/GPU experts with the CPU experts: a little faster than the sum.
    assert pred.decode_bound_tok_s == pytest.approx(bound, rel=0.05)
    assert pred.decode_bound_tok_s <= ram_bw / from_ram
    assert 0.2 * pred.decode_bound_tok_s <= pred.decode_tok_s < pred.decode_bound_tok_s
    # ~3 GB of experts per token from RAM: memory, not the GPU layers' kernels, sets the pace
    dispatch = Efficiency().gpu_layer_seconds.value * len(plan.layers)
    assert pred.decode_tok_s <= 1.0 / dispatch and pred.decode_limit == "memory"
    assert pred.bytes_per_token["ram"] == pytest.approx(from_ram, rel=0.01)
    assert pred.gpu_hit_rate == pytest.approx(gpu_share, rel=1e-6)
    assert pred.confidence == "estimated"
    assert pred.inputs["ram_read_gbps"]["source"] == "measured"


def test_cpu_only_bound_is_all_bytes_over_ram_bandwidth(flash):
    profile = load("cpu_only_256gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    pred = predict(plan, flash, profile)
    per_token = NON_EXPERT_PER_TOKEN + EXPERTS_PER_TOKEN + KV_READ_128K
    assert pred.decode_bound_tok_s == pytest.approx(64.0e9 / per_token, rel=0.01)
    gpu = predict(*_plan_for(flash, "rtx4090_192gb_ddr5"))
    assert pred.decode_tok_s < gpu.decode_tok_s
    assert pred.decode_limit == "memory"  # no GPU layers: nothing to dispatch
    assert pred.prefill_experts == "cpu" and pred.crossover_tokens is None


def test_the_cpu_mode_predicts_its_mtp_drafts(flash):
    """Drafting in the CPU mode: a draft reads the MTP block's weights, one token's experts and
    the head again (plus one layer's glue); its verify the draft token's experts. At the assumed
    acceptance that beats a plain step; where the GPU runs the layers nothing is predicted."""
    from flashdesk.offload.predict import DRAFT_ACCEPTANCE, speculative_seconds

    profile = load("cpu_only_256gb")
    plan = make_plan(flash, profile, PlanOptions(context=131072))
    pred = predict(plan, flash, profile)
    eff = Efficiency()
    draft, verify = speculative_seconds(plan, flash, _rates(profile), eff)
    ram = 64.0e9
    mtp_dense = 171_235_692
    head = flash.head_on(False)  # the BF16 head (1,059,061,760 B) and the final norm
    glue = eff.cpu_layer_seconds.value
    assert draft == pytest.approx(
        (mtp_dense + head) / (ram * eff.cpu_dense.value)
        + 6 * EXPERT_BYTES / (ram * eff.cpu_experts.value)
        + glue,
        rel=1e-6,
    )
    assert verify == pytest.approx(EXPERTS_PER_TOKEN / (ram * eff.cpu_experts.value), rel=0.01)
    step = 1 / pred.decode_tok_s + draft + verify
    assert pred.speculative_tok_s == pytest.approx((1 + DRAFT_ACCEPTANCE) / step)
    assert pred.speculative_break_even == pytest.approx(step * pred.decode_tok_s - 1)
    assert pred.decode_tok_s < pred.speculative_tok_s and 0.2 < pred.speculative_break_even < 0.6
    gpu = predict(*_plan_for(flash, "rtx4090_192gb_ddr5"))
    assert gpu.speculative_tok_s is None and gpu.speculative_break_even is None


def test_cpu_layers_pay_their_glue_per_token(flash):
    """A layer computed on the CPU costs `cpu_layer_seconds` of torch/Python glue per decode
    token beside its bytes: 43 of them in V4-Flash's CPU-only step; none in the bound, none on a
    GPU layer."""
    from flashdesk.offload.predict import Efficiency

    profile = load("cpu_only_256gb")
    plan = make_plan(flash, profile, PlanOptions(context=4096))
    none, some = Efficiency(), Efficiency()
    none.cpu_layer_seconds = Sourced(1e-12, "calibrated")
    some.cpu_layer_seconds = Sourced(2e-3, "calibrated")
    fast, slow = predict(plan, flash, profile, 64, none), predict(plan, flash, profile, 64, some)
    layers = len(plan.layers)
    assert 1 / slow.decode_tok_s - 1 / fast.decode_tok_s == pytest.approx(layers * 2e-3)
    assert slow.decode_bound_tok_s == fast.decode_bound_tok_s
    gpu_plan, _, gpu_profile = _plan_for(flash, "h200_lent_machine_measured")
    assert not gpu_plan.cpu_attention_layers
    a, b = (predict(gpu_plan, flash, gpu_profile, 64, e) for e in (none, some))
    assert a.decode_tok_s == b.decode_tok_s


def _plan_for(flash, name, **options):
    profile = load(name)
    return make_plan(flash, profile, PlanOptions(**options)), flash, profile


def test_disk_paging_is_priced_by_disk_bandwidth(flash):
    plan, _, profile = _plan_for(flash, "rtx3090_64gb")
    pred = predict(plan, flash, profile)
    from_disk = sum(lp.disk_rate for lp in plan.layers) * 6 * EXPERT_BYTES
    assert pred.bytes_per_token["disk"] == pytest.approx(from_disk)
    # Disk reads alone bound the speed: 3 GB/s NVMe (estimated in the profile).
    assert pred.decode_bound_tok_s <= 3.0e9 / from_disk
    fast = load("rtx3090_64gb")
    fast.disk_read_gbps = Sourced(12.0, "estimated")
    assert predict(plan, flash, fast).decode_tok_s > pred.decode_tok_s


def test_prefill_streams_experts_for_long_prompts(flash):
    plan, _, profile = _plan_for(flash, "rtx4090_192gb_ddr5")
    short = predict(plan, flash, profile, prompt_tokens=64)
    long = predict(plan, flash, profile, prompt_tokens=32768)
    assert short.prefill_experts == "cpu"
    assert long.prefill_experts in ("gpu stream", "mixed")
    assert long.crossover_tokens is not None and 64 < long.crossover_tokens <= 8192
    assert long.prefill_tok_s > short.prefill_tok_s
    assert long.ttft_s == pytest.approx(32768 / long.prefill_tok_s)
    # Pageable copies (memlock 8 MiB) make streaming dearer: the crossover moves up or vanishes.
    slow = load("rtx4090_192gb_ddr5")
    slow.pin_cap_bytes = Sourced(8 << 20, "reported:getrlimit(RLIMIT_MEMLOCK)")
    slow_plan = make_plan(flash, slow)
    assert slow_plan.pinned_bytes == 0
    slow_cross = predict(slow_plan, flash, slow, prompt_tokens=32768).crossover_tokens
    assert slow_cross is None or slow_cross > long.crossover_tokens


def test_the_plan_carries_the_crossover_to_the_runtime(flash):
    """`record_crossover` gives a GPU+CPU plan the predicted crossover as the chunk size from
    which the runtime streams a prompt's host experts (the fixed default would stream 256-1023
    token chunks on a home machine whose CPU the planner finds faster there); a CPU plan keeps
    the default, which the runtime ignores without a GPU."""
    from flashdesk.engine.runtime import streaming_threshold
    from flashdesk.offload.plan import DEFAULT_STREAM_MIN_TOKENS
    from flashdesk.offload.predict import record_crossover

    plan, _, profile = _plan_for(flash, "rtx4090_192gb_ddr5")
    assert plan.stream_min_tokens == DEFAULT_STREAM_MIN_TOKENS  # before a prediction
    prediction = predict(plan, flash, profile)
    record_crossover(plan, prediction)
    assert plan.stream_min_tokens == prediction.crossover_tokens == 1024
    assert plan.to_json()["stream_min_tokens"] == 1024
    assert streaming_threshold("plan", plan) == 1024
    assert streaming_threshold("plan", None) == DEFAULT_STREAM_MIN_TOKENS
    assert streaming_threshold(64, plan) == 64 and streaming_threshold(None, plan) is None
    for bad in ("always", 0):
        with pytest.raises(ValueError, match="stream_min_tokens"):
            streaming_threshold(bad, plan)
    cpu_plan, _, cpu_profile = _plan_for(flash, "cpu_only_256gb")
    record_crossover(cpu_plan, predict(cpu_plan, flash, cpu_profile))
    assert cpu_plan.stream_min_tokens == DEFAULT_STREAM_MIN_TOKENS


def test_frequency_profile_raises_the_prediction(flash):
    profile = load("rtx4090_192gb_ddr5")
    counts = [[1.0 / (1 + e) ** 1.2 for e in range(256)] for _ in range(43)]
    skewed = make_plan(flash, profile, PlanOptions(expert_frequency=counts))
    uniform = make_plan(flash, profile)
    # fewer expert bytes from RAM per token: faster where memory is the limit
    assert (
        predict(skewed, flash, profile).decode_tok_s > predict(uniform, flash, profile).decode_tok_s
    )
    # a layer's CPU experts run after its GPU kernels up to the routing, in series: the time
    # fewer RAM bytes save per token is the same under a far higher floor per layer (the eager
    # runtime: ~3 ms), not hidden beneath it
    eager = Efficiency()
    eager.gpu_layer_seconds = Sourced(3.2e-3, "measured", "decode steps issued op by op")

    def saved(efficiency=None) -> float:
        step = [1 / predict(p, flash, profile, efficiency=efficiency).decode_tok_s
                for p in (uniform, skewed)]  # fmt: skip
        return step[0] - step[1]

    assert saved() > 0
    assert saved(eager) == pytest.approx(saved(), rel=1e-6)


def test_a_machine_holding_nearly_all_experts_is_bound_by_the_gpu_layers_kernels(flash):
    """The lent H200: 9,903 of 11,008 experts in VRAM. The per-layer floor the benchmark measured
    there (0.28 ms with CUDA graphs) sets most of the prediction, not the bytes; the five host
    layers' CPU experts come on top, in series (run 6, 2026-11-28: 59.4 tok/s, 60.5 with
    programmatic dependent launch)."""
    profile = load("h200_lent_machine_measured")
    plan = make_plan(flash, profile, PlanOptions(context=4096))
    pred = predict(plan, flash, profile)
    floor = Efficiency().gpu_layer_seconds.value * len(plan.layers)
    assert pred.decode_limit == "dispatch"
    assert 0.7 / floor < pred.decode_tok_s <= 1.0 / floor
    assert 57 < pred.decode_tok_s < 66
    assert pred.decode_bound_tok_s > 2.5 * pred.decode_tok_s  # run 6: 0.24 × the bound
    # prefill: the measured cost per prompt token and GPU layer sets most of it there too (the
    # RAM experts' copies add to it, in series: their layers' grouped kernels wait for them)
    per_token = Efficiency().gpu_prefill_token_seconds.value * len(plan.layers)
    assert 0.6 / per_token < pred.prefill_tok_s <= 0.9 / per_token
    faster = Efficiency()
    faster.gpu_prefill_token_seconds = Sourced(5e-6, "calibrated", "bench --synthetic")
    assert predict(plan, flash, profile, efficiency=faster).prefill_tok_s > 2 * pred.prefill_tok_s


def test_calibrated_efficiency_and_its_file(tmp_path, flash):
    eff = Efficiency()
    for name in eff.to_json():
        old = getattr(eff, name)
        setattr(eff, name, Sourced(old.value, "calibrated", "bench run"))
    path = tmp_path / "calibration.json"
    eff.save(path)
    loaded = Efficiency.load(path)
    assert loaded.all_calibrated()
    plan, _, profile = _plan_for(flash, "rtx4090_192gb_ddr5")
    assert predict(plan, flash, profile, efficiency=loaded).confidence == "calibrated"
    assert Efficiency.load(tmp_path / "absent.json").cpu_experts.source == "estimated"
    path.write_text("{broken")
    with pytest.raises(ProfileError, match="delete it"):
        Efficiency.load(path)


# ---------------------------------------------------------------------------- flashdesk fit


def _fit_json(capsys, *args) -> dict:
    assert main(["fit", "--json", *args]) == 0

    def not_json(constant):
        raise AssertionError(f"fit --json printed {constant}, which is not JSON")

    return json.loads(capsys.readouterr().out, parse_constant=not_json)


def test_fit_json_has_the_required_keys(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    out = _fit_json(capsys, "--profile", str(PROFILES / "rtx4090_192gb_ddr5.json"))
    assert out["verdict"] == "fits" and out["changes"] == []
    assert out["kv_bytes"] / GIB == pytest.approx(0.856, rel=0.01)
    for key in ("decode_tok_s", "prefill_tok_s", "confidence", "ttft_s"):
        assert key in out["predicted"]
    assert set(out["memory"]) >= {"gpu", "ram"}
    assert out["memory"]["gpu"]["used"] <= out["memory"]["gpu"]["budget"]
    for name, value in out["profile"].items():
        if isinstance(value, dict):
            assert set(value) >= {"value", "source"}, name
    for gpu in out["profile"]["gpus"]:
        assert all(set(v) >= {"value", "source"} for k, v in gpu.items() if k != "index")
    assert any(p["location"] == "gpu" for p in out["placement"])


def test_fit_kv_at_1m(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    profile = str(PROFILES / "cpu_only_256gb.json")
    fp8 = _fit_json(capsys, "--profile", profile, "--ctx", "1M", "--kv", "fp8")
    bf16 = _fit_json(capsys, "--profile", profile, "--ctx", "1048576")
    assert fp8["kv_bytes"] / GIB == pytest.approx(3.774, rel=0.01)
    assert bf16["kv_bytes"] / GIB == pytest.approx(6.735, rel=0.01)


def test_fit_table(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    assert main(["fit", "--profile", str(PROFILES / "rtx3090_64gb.json")]) == 0
    text = capsys.readouterr().out
    for needle in (
        "Hardware (RTX 3090",
        "[measured]",
        "[reported:nvml]",
        "Placement (gpu+cpu)",
        "Memory",
        "Predicted (estimated)",
        "Verdict: fits with changes",
        "paged from disk",
        "GGUF",
    ):
        assert needle in text, needle


def test_fit_with_a_model_folder_and_frequency_file(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(ModelConfig.v4_flash().to_hf_dict()))
    freq = tmp_path / "freq.json"
    freq.write_text(json.dumps([[float(256 - e) for e in range(256)]] * 43))
    out = _fit_json(
        capsys,
        "--model",
        str(model),
        "--profile",
        str(PROFILES / "rtx4090_192gb_ddr5.json"),
        "--expert-frequency",
        str(freq),
    )
    hot = [lp for lp in out["plan"]["layers"] if lp["hot_expert_ids"]]
    assert hot and all(lp["hot_expert_ids"][0] == 0 for lp in hot)


def test_fit_errors_are_messages(capsys, tmp_path):
    assert main(["fit", "--profile", str(tmp_path / "nope.json")]) == 2
    assert "no profile at" in capsys.readouterr().err
    assert (
        main(["fit", "--model", str(tmp_path), "--profile", str(PROFILES / "cpu_only_256gb.json")])
        == 2
    )
    assert "No config.json" in capsys.readouterr().err
    bad = tmp_path / "freq.json"
    bad.write_text("[[1, 2]]")
    args = [
        "fit",
        "--profile",
        str(PROFILES / "cpu_only_256gb.json"),
        "--expert-frequency",
        str(bad),
    ]
    assert main(args) == 2
    assert "expert-frequency profile has 1 layers" in capsys.readouterr().err


def test_fit_probes_this_machine_and_saves_the_profile(capsys, monkeypatch, tmp_path):
    from flashdesk.offload import bandwidth

    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    # The measurement itself is tested in test_probe.py; here only its wiring into `fit`.
    fake = {"best_gbps": 33.0, "mean_gbps": 30.0, "passes": 9, "threads": 2, "nbytes": 1 << 29}
    monkeypatch.setattr(bandwidth, "measure_ram_read", lambda threads=0, seconds=1.0: fake)
    saved = tmp_path / "here.json"
    out = _fit_json(capsys, "--save-profile", str(saved), "--ctx", "4K")
    again = HardwareProfile.load(saved)
    assert again.ram_read_gbps.source == "measured" and again.ram_read_gbps.value == 33.0
    assert out["profile"]["ram_read_gbps"]["source"] == "measured"
    assert out["verdict"] in ("fits", "fits_with_changes", "does_not_fit")


def test_token_counts():
    assert _tokens("128K") == 131072 and _tokens("1M") == 1 << 20 and _tokens("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        _tokens("lots")


def test_fit_json_for_a_machine_that_cannot_run_it(capsys, tmp_path):
    small = HardwareProfile.load(PROFILES / "cpu_only_256gb.json")
    small.ram_total_bytes = Sourced(8 * GIB, "reported:psutil")
    small.ram_available_bytes = Sourced(7 * GIB, "reported:psutil")
    path = tmp_path / "small.json"
    small.save(path)
    out = _fit_json(capsys, "--profile", str(path))  # strict JSON: no Infinity/NaN
    assert out["verdict"] == "does_not_fit" and out["changes"]
    assert out["predicted"]["decode_tok_s"] == 0.0 and out["predicted"]["ttft_s"] is None
    assert main(["fit", "--profile", str(path)]) == 0
    assert "Verdict: does not fit" in capsys.readouterr().out


def test_evaluate_without_argparse_for_the_wizard(tmp_path, monkeypatch):
    from flashdesk.fit import evaluate, report

    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    profile = load("rtx4090_192gb_ddr5")
    figures, used, plan, prediction = evaluate(preset="v4-pro", context=32768, profile=profile)
    assert used is profile and figures.name == "DeepSeek-V4-Pro"
    # 1.6 T parameters (~860 GB) cannot sit in 192 GB: experts page from disk.
    assert plan.verdict == "fits_with_changes" and plan.disk_bytes > 600e9
    out = report(figures, used, plan, prediction)
    assert json.loads(json.dumps(out))["kv_bytes"] == plan.kv_bytes
    with pytest.raises(ProfileError, match="unknown preset"):
        evaluate(preset="v5", profile=profile)


def test_measured_efficiencies_are_recorded_and_merged(tmp_path):
    """`bench decode` feeds its measured factors back through `Efficiency.record`: merged into
    the calibration file, the others kept, read back as calibrated by the planner's `load`."""
    path = tmp_path / "cache" / "calibration.json"
    assert Efficiency.record({"cpu_experts": 0.6}, "first run", path) == path
    Efficiency.record({"cpu_dense": 0.4}, "second run", path)
    eff = Efficiency.load(path)
    assert eff.cpu_experts.value == 0.6 and eff.cpu_experts.source == "calibrated"
    assert eff.cpu_dense.value == 0.4 and eff.cpu_dense.note == "second run"
    assert eff.pcie.source == "estimated"  # untouched factors stay estimates
    assert set(json.loads(path.read_text())) == {"cpu_experts", "cpu_dense"}  # only measured ones
    # a file from an older release also held the defaults of its day as estimates: those give
    # way to today's defaults (this VM's file kept a 5 ms GPU layer floor the H200 run cut to 0.57)
    stale = json.loads(path.read_text()) | {
        "gpu_layer_seconds": {"value": 0.005, "source": "estimated", "note": "old default"}
    }
    path.write_text(json.dumps(stale), encoding="utf-8")
    assert Efficiency.load(path).gpu_layer_seconds.value == Efficiency().gpu_layer_seconds.value
    path.write_text("{ not json", encoding="utf-8")  # a damaged file is replaced
    Efficiency.record({"cpu_dense": 0.5}, "third run", path)
    assert Efficiency.load(path).cpu_dense.value == 0.5
    with pytest.raises(ValueError, match="unknown efficiency"):
        Efficiency.record({"warp_drive": 1.0}, "x", path)
    with pytest.raises(ValueError, match="not a positive number"):
        Efficiency.record({"cpu_dense": float("nan")}, "x", path)


def test_prefill_workspace_model(flash):
    """A GPU prefill chunk's memory beside the weights and KV: per chunk token (the attention's
    query-sized temporaries, the streamed experts' float32 outputs), per context token (a CSA
    layer's indexer scores for one query block), plus fixed scratch."""
    from flashdesk.engine.model import attention
    from flashdesk.offload import figures as fig

    assert fig.GATHER_QUERY_BLOCK == attention.GATHER_QUERY_BLOCK  # the query block it prices
    assert flash.prefill_token_bytes == 16 * 64 * 512 + 4 * 6 * 4096  # 608 KiB for V4-Flash
    assert flash.prefill_context_bytes == (16 * 64 * 4 + 4 * 128) // 4
    ws = flash.prefill_workspace
    assert ws(1024, 131072) == fig.PREFILL_BASE_BYTES + 1024 * 622592 + 131072 * 1152
    assert 1.1 * GIB < ws(1024, 131072) < 1.3 * GIB  # about the old fixed 1 GiB
    assert ws(1024, 1 << 20) - ws(1024, 4096) > GIB  # 1M tokens: the indexer's scores add ~1.1 GiB
    assert ws(8192, 131072) - ws(1024, 131072) == 7168 * 622592
    pro = ModelConfig.v4_pro()
    pro_figures = ModelFigures.from_inventory(inventory(pro), pro)
    assert pro_figures.prefill_token_bytes > flash.prefill_token_bytes  # twice the heads


def test_the_plan_chooses_long_prefill_chunks_where_pcie_bounds_them(flash):
    """Each GPU prefill call copies the experts kept in RAM across PCIe once: a card that holds
    few of them prefills a long document several times faster in longer chunks, for a few GiB of
    workspace the VRAM expert cache gives up (decode nearly unchanged). Where VRAM is scarce or
    most experts are on the GPU anyway the chunk stays short."""
    from flashdesk.offload.plan import DEFAULT_PREFILL_CHUNK
    from flashdesk.offload.predict import (
        CHUNK_MAX_DECODE_LOSS,
        LONG_PROMPT,
        WORKSPACE_MAX_SHARE,
        plan_and_predict,
    )

    profile = load("rtx4090_192gb_ddr5")
    options = PlanOptions(context=131072)
    short = make_plan(flash, profile, options)
    assert short.prefill_chunk == DEFAULT_PREFILL_CHUNK
    plan, pred = plan_and_predict(flash, profile, options, prompt_tokens=LONG_PROMPT)
    assert plan.prefill_chunk >= 4096
    assert plan.gpu_workspace_bytes == flash.prefill_workspace(plan.prefill_chunk, 131072)
    assert plan.gpu_workspace_bytes <= WORKSPACE_MAX_SHARE * profile.gpu.usable_vram_bytes
    assert plan.memory["gpu"]["used"] <= plan.memory["gpu"]["capacity"]
    before = predict(short, flash, profile, prompt_tokens=LONG_PROMPT)
    assert pred.prefill_tok_s > 3 * before.prefill_tok_s  # 163 → 831 tok/s as profiled
    assert pred.decode_tok_s >= (1 - CHUNK_MAX_DECODE_LOSS) * before.decode_tok_s
    assert sum(lp.experts_gpu for lp in plan.layers) < sum(lp.experts_gpu for lp in short.layers)
    assert plan.stream_min_tokens == pred.crossover_tokens  # recorded as `fit` does
    assert plan.to_json()["prefill_chunk"] == plan.prefill_chunk
    assert predict(plan, flash, profile, 100).ttft_s == pytest.approx(
        predict(short, flash, profile, 100).ttft_s, rel=0.05
    )  # a short prompt is one call either way

    # 8 GB card: the workspace would cost decode more than it gains; CPU only: no GPU chunks
    for name in ("gpu8gb_192gb", "cpu_only_256gb"):
        kept, _ = plan_and_predict(flash, load(name), options)
        assert kept.prefill_chunk == DEFAULT_PREFILL_CHUNK
    # nearly every expert in VRAM (H200): little to copy, so little to gain past 2048
    h200, _ = plan_and_predict(flash, load("h200_lent_machine_measured"), options)
    assert h200.prefill_chunk <= 2048
    # asked for: an explicit workspace, or no choice
    fixed = PlanOptions(context=131072, gpu_workspace_bytes=GIB)
    assert plan_and_predict(flash, profile, fixed)[0].prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert plan_and_predict(flash, profile, options, choose_chunk=False)[0].prefill_chunk == (
        DEFAULT_PREFILL_CHUNK
    )
    with pytest.raises(PlanError, match="prefill_chunk"):
        make_plan(flash, profile, PlanOptions(prefill_chunk=0))


def test_fit_reports_the_chosen_chunk(capsys, tmp_path):
    code = main(
        ["fit", "--profile", str(PROFILES / "rtx4090_192gb_ddr5.json"), "--ctx", "128K", "--json"]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["prefill_chunk"] >= 4096 and plan["gpu_workspace_bytes"] > 4 * GIB


def test_prompts_are_prefilled_in_equal_calls():
    """As few calls as the chunk allows, sizes within one token of each other: a short tail
    would run its experts on the CPU (below the streaming crossover) or pay a whole call's PCIe
    copies for a few tokens. The Session splits prompts the same way (tests/test_generate.py)."""
    from flashdesk.offload.predict import prefill_pieces

    assert prefill_pieces(9000, 8192) == [4500, 4500]
    assert prefill_pieces(8192, 8192) == [8192]
    assert prefill_pieces(10, 4) == [4, 3, 3]
    assert prefill_pieces(0, 512) == [] and prefill_pieces(1, 512) == [1]
    for tokens in range(1, 300, 7):
        for chunk in (1, 2, 5, 64, 128):
            sizes = prefill_pieces(tokens, chunk)
            assert sum(sizes) == tokens and len(sizes) == -(-tokens // chunk)
            assert max(sizes) <= chunk and max(sizes) - min(sizes) <= 1


def test_decode_at_a_full_context_pays_the_attention_compute(flash, capsys, monkeypatch, tmp_path):
    """Once the context is full each decode token's CSA indexer scores every compressed entry
    (V4-Flash at 1M: 21 CSA layers × 262,144 entries × 16,384 FLOP ≈ 90 GFLOP, plus the
    attention): priced at the prompt FLOP rate of the device that runs each layer's attention.
    On a CPU that costs more than the bytes; on a GPU holding the attention it is small."""
    from flashdesk.offload.predict import (
        INDEXER_FLOP_PER_ENTRY,
        _rates,
        decode_attention_seconds,
        decode_tok_s_at,
    )

    profile = load("cpu_only_256gb")
    plan = make_plan(flash, profile, PlanOptions(context=1 << 20))
    pred = predict(plan, flash, profile)
    eff = Efficiency()
    rates = _rates(profile)
    cpu_flops = rates.cpu_gflops.value * 1e9 * eff.cpu_attention.value
    csa = sum(layer.attention == "csa" for layer in flash.layers)
    indexer = csa * INDEXER_FLOP_PER_ENTRY * (1 << 20) / 4 / cpu_flops
    full = decode_attention_seconds(plan, flash, rates, eff, 1 << 20)
    assert indexer < full < 1.5 * indexer  # the indexer is most of it, HCA the rest
    assert 1 / pred.decode_full_tok_s == pytest.approx(1 / pred.decode_tok_s + full, rel=1e-9)
    assert pred.decode_full_tok_s < 0.7 * pred.decode_tok_s
    # the figure grows with the depth, from ~nothing at the start of a context
    depths = [decode_tok_s_at(plan, flash, profile, d, eff) for d in (0, 4096, 65536, 1 << 20)]
    assert depths == sorted(depths, reverse=True)
    assert depths[0] == pytest.approx(pred.decode_tok_s, rel=0.01)
    assert depths[-1] == pytest.approx(pred.decode_full_tok_s, rel=1e-9)
    gpu = predict(*_plan_for(flash, "h200_lent_machine_measured", context=1 << 20))
    assert gpu.decode_full_tok_s > 0.9 * gpu.decode_tok_s
    # `flashdesk fit` says so where it matters
    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path))
    main(["fit", "--profile", str(PROFILES / "cpu_only_256gb.json"), "--ctx", "1M"])
    out = capsys.readouterr().out
    assert f"{pred.decode_full_tok_s:.2f} tok/s once the 1,048,576-token context is full" in out
    got = _fit_json(capsys, "--profile", str(PROFILES / "cpu_only_256gb.json"), "--ctx", "1M")
    assert got["predicted"]["decode_full_tok_s"] == pytest.approx(pred.decode_full_tok_s, rel=1e-6)


def test_the_gpu_reads_a_share_of_the_pinned_experts_in_place(flash):
    """RTX 4090 + DDR5: the GPU reads a share of each host layer's pinned picks across PCIe
    while the CPU computes the rest, the share at which both finish together (RAM at the CPU
    kernels' efficiency against PCIe at the zero-copy one), the RAM read bounding the two
    together. Decode gains; the bytes bound does not move. No GPU: no share."""
    from flashdesk.offload.predict import plan_and_predict, zero_copy_share

    profile = load("rtx4090_192gb_ddr5")
    plan, pred = plan_and_predict(flash, profile, PlanOptions(context=8192))
    eff = Efficiency()
    ram = float(profile.ram_bandwidth().value) * float(eff.cpu_experts.value)
    pcie = float(profile.gpu.h2d_pinned_gbps.value) * float(eff.zero_copy.value)
    assert plan.pinned_bytes > 0
    assert plan.zero_copy_share == pytest.approx(pcie / (ram + pcie), rel=1e-6)
    assert 0.1 < plan.zero_copy_share < 0.5
    off = Efficiency()
    off.zero_copy = Sourced(1e-9, "estimated", "no zero-copy")
    without = predict(plan, flash, profile, 8192, off)
    assert pred.decode_tok_s > 1.1 * without.decode_tok_s
    assert pred.decode_bound_tok_s == pytest.approx(without.decode_bound_tok_s)
    cpu_plan, _ = plan_and_predict(flash, load("cpu_only_256gb"), PlanOptions(context=8192))
    assert cpu_plan.zero_copy_share == 0.0
    assert zero_copy_share(cpu_plan, _rates(load("cpu_only_256gb")), eff) == 0.0
