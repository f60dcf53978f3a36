"""The hardware-fit wizard on saved machine profiles (no probing of this machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _qtwait import wait_signal, wait_until
from PySide6.QtWidgets import QProgressBar, QWizard

from flashdesk.app.backend import ScriptedBackend
from flashdesk.app.settings import MODES, Settings
from flashdesk.app.window import MainWindow
from flashdesk.app.wizard import CONTEXTS, FitWizard
from flashdesk.offload.probe import HardwareProfile, Sourced

PROFILES = Path(__file__).resolve().parent / "profiles"


def profile(name: str) -> HardwareProfile:
    return HardwareProfile.load(PROFILES / f"{name}.json")


def to_plan_page(qtbot, wiz, context=131072):
    wiz.show()
    wait_until(lambda: wiz.currentPage() is wiz.probe_page)
    wiz.next()  # → model page (preset V4-Flash is the default choice)
    assert wiz.currentPage() is wiz.model_page
    wiz.next()  # → plan page
    assert wiz.currentPage() is wiz.plan_page
    wiz.plan_page.context_slider.setValue(CONTEXTS.index(context))
    wiz.plan_page.recompute()
    return wiz.plan_page


def test_probe_table_shows_every_value_with_its_source(qtbot, tmp_path):
    wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx4090_192gb_ddr5"))
    qtbot.addWidget(wiz)
    wiz.show()
    table = wiz.probe_page.table
    rows = {table.item(r, 0).text(): r for r in range(table.rowCount())}
    p = wiz.profile
    assert table.rowCount() == len(p.sourced_items()) + sum(len(g.sourced_items()) for g in p.gpus)
    r = rows["ram read gbps"]
    assert table.item(r, 1).text() == f"{p.ram_read_gbps.value:.1f} GB/s"
    assert table.item(r, 2).text() == p.ram_read_gbps.source
    assert any(k.startswith("GPU 0 · name") for k in rows)
    assert all(table.item(r, 2).text() for r in range(table.rowCount()))  # no value without source


def test_measure_bandwidth_updates_the_table(qtbot, tmp_path):
    from flashdesk.offload import bandwidth

    wiz = FitWizard(Settings(), tmp_path, profile=profile("cpu_only_256gb"))
    wiz.measure_fn = lambda: bandwidth.ram_read_gbps(threads=1, remeasure=True)
    qtbot.addWidget(wiz)
    wiz.show()
    page = wiz.probe_page
    page.measure_button.click()
    assert not page.progress.isHidden()
    wait_until(lambda: page.measure_button.isEnabled(), timeout=60000)
    assert wiz.profile.ram_read_gbps.source == "measured"
    assert page.status.text().startswith("RAM read: ")
    table = page.table
    row = next(r for r in range(table.rowCount()) if table.item(r, 0).text() == "ram read gbps")
    assert table.item(row, 2).text() == "measured"


def test_the_plan_page_predicts_with_this_machines_calibration(qtbot, tmp_path, monkeypatch):
    """The wizard predicts as `flashdesk fit` does: with the factors `bench decode` measured
    here (a damaged file gives the defaults, not an error in the page), the prompt chunk chosen
    for the machine."""
    from flashdesk.offload.predict import Efficiency

    monkeypatch.setenv("FLASHDESK_CACHE_DIR", str(tmp_path / "cache"))
    speeds = []
    for factor in (None, 0.3):
        if factor:
            Efficiency.record({"cpu_experts": factor}, "slow RAM here")
        wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx4090_192gb_ddr5"))
        qtbot.addWidget(wiz)
        to_plan_page(qtbot, wiz)
        speeds.append(wiz.prediction.decode_tok_s)
        assert wiz.plan.prefill_chunk > 1024  # a 24 GB card streaming its RAM experts
        text = wiz.plan_page.prediction.text()
        assert "A 64K-token document ≈ " in text
        assert f"{wiz.plan.prefill_chunk:,}-token GPU chunks" in text
    # The slower CPU kernels lower the prediction, by less than their factor: the GPU reads a
    # share of the pinned experts in place (zero-copy), more of it when the CPU is slower.
    assert speeds[1] < 0.7 * speeds[0]
    Efficiency.default_path().write_text("{ damaged", encoding="utf-8")
    wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx4090_192gb_ddr5"))
    qtbot.addWidget(wiz)
    to_plan_page(qtbot, wiz)
    assert wiz.prediction.decode_tok_s == pytest.approx(speeds[0])


def test_big_machine_fits(qtbot, tmp_path):
    wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx4090_192gb_ddr5"))
    qtbot.addWidget(wiz)
    page = to_plan_page(qtbot, wiz)
    assert wiz.plan.verdict == "fits"
    assert page.verdict.text().startswith("Fits — DeepSeek-V4-Flash, 128K context")
    assert "#1e8449" in page.verdict.styleSheet()
    bars = {b.objectName(): b for b in page.bars_box.findChildren(QProgressBar)}
    assert set(bars) == {"memory_gpu", "memory_ram"}
    assert "usable" in bars["memory_gpu"].format()
    assert "tok/s" in page.prediction.text() and wiz.prediction.confidence in page.prediction.text()
    assert page.isComplete()


def test_small_machine_fits_with_changes_and_lists_them(qtbot, tmp_path):
    wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx3090_64gb"))
    qtbot.addWidget(wiz)
    page = to_plan_page(qtbot, wiz)
    assert wiz.plan.verdict == "fits_with_changes"
    assert page.verdict.text().startswith("Fits with changes")
    assert "#b9770e" in page.verdict.styleSheet()
    shown = [page.changes.item(i).text() for i in range(page.changes.count())]
    assert any("paged from disk" in s for s in shown)
    assert len([s for s in shown if s.startswith("→")]) == len(wiz.plan.changes)
    # A live control: fp8 KV changes the KV size in the plan.
    kv_bf16 = wiz.plan.kv_bytes
    page.kv_combo.setCurrentText("fp8")
    page.recompute()
    assert wiz.plan.kv_dtype == "fp8" and wiz.plan.kv_bytes < kv_bf16


def test_machine_too_small_does_not_fit(qtbot, tmp_path):
    small = profile("cpu_only_256gb")
    small.ram_total_bytes = Sourced(8 << 30, "reported:test")
    small.ram_available_bytes = Sourced(6 << 30, "reported:test")
    wiz = FitWizard(Settings(), tmp_path, profile=small)
    qtbot.addWidget(wiz)
    page = to_plan_page(qtbot, wiz)
    assert wiz.plan.verdict == "does_not_fit"
    assert page.verdict.text().startswith("Does not fit")
    assert "#c0392b" in page.verdict.styleSheet()
    assert not page.isComplete()
    shown = [page.changes.item(i).text() for i in range(page.changes.count())]
    assert any("RAM" in s for s in shown)


def test_checkpoint_problems_are_listed(qtbot, tmp_path):
    from flashdesk.engine.checkpoint import write_random
    from flashdesk.engine.config import ModelConfig

    folder = write_random(tmp_path / "ckpt", ModelConfig.tiny(), seed=1)
    wiz = FitWizard(Settings(), tmp_path, profile=profile("rtx4090_192gb_ddr5"))
    qtbot.addWidget(wiz)
    wiz.show()
    wiz.next()
    page = wiz.model_page
    page.path_edit.setText(str(folder))
    page.verify()
    wait_until(lambda: page.verify_button.isEnabled(), timeout=30000)
    assert page.verified is not None and page.isComplete()
    assert page.result.text().startswith("Checkpoint OK")

    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated download
    page.verify()
    wait_until(lambda: page.verify_button.isEnabled(), timeout=30000)
    problems = [page.problems.item(i).text() for i in range(page.problems.count())]
    assert problems and problems[0].startswith("✗")
    assert any(shard.name in p for p in problems)
    assert page.verified is None and not page.isComplete()


def test_saving_a_plan_reloads_the_chat_window_with_it(qtbot, tmp_path):
    backend = ScriptedBackend(context_limit=8192)
    win = MainWindow(backend, tmp_path)
    qtbot.addWidget(win)
    wait_until(lambda: win.info is not None, timeout=10000)
    assert not win.mode_combo.model().item(MODES.index("Think Max")).isEnabled()
    wiz = win.open_wizard(profile=profile("rtx4090_192gb_ddr5"))
    to_plan_page(qtbot, wiz, context=524288)
    assert wiz.plan.verdict == "fits"
    wiz.next()
    assert wiz.currentPage() is wiz.save_page
    assert "524,288 tokens" in wiz.save_page.summary.text()
    with wait_signal(win.model_ready, timeout=10000):
        wiz.button(QWizard.WizardButton.FinishButton).click()
    saved = Settings.load(tmp_path)
    assert saved.context_limit == 524288 and saved.wizard_done
    assert saved.plan["verdict"] == "fits" and saved.plan["max_context"] == 1 << 20
    assert saved.plan["prefill_tok_s"] > 0
    assert win.info.context_limit == 524288
    assert win.mode_combo.model().item(MODES.index("Think Max")).isEnabled()
    assert "plan: fits · 512K · bf16 KV" in win.model_label.text()
    win.close()


def test_saved_plan_predicts_time_to_first_token_for_attached_documents(qtbot, tmp_path):
    from flashdesk.app.formatting import human_seconds

    win = MainWindow(ScriptedBackend(context_limit=8192), tmp_path)
    qtbot.addWidget(win)
    wait_until(lambda: win.info is not None, timeout=10000)
    wiz = win.open_wizard(profile=profile("rtx3090_64gb"))
    to_plan_page(qtbot, wiz, context=131072)
    wiz.next()
    with wait_signal(win.model_ready, timeout=10000):
        wiz.button(QWizard.WizardButton.FinishButton).click()
    assert (tmp_path / "profile.json").exists()
    wait_until(lambda: win.ttft_predictor is not None, timeout=30000)
    doc = tmp_path / "long.txt"
    doc.write_text("Memory bandwidth bounds decode speed. " * 1500)
    win.documents.add_files([doc])
    wait_until(lambda: not win.documents.busy and win.documents.total_tokens > 0, timeout=20000)
    _, total, _ = win.prompt_preview()
    predicted = win.ttft_predictor.ttft_s(total)
    assert predicted and predicted > win.ttft_predictor.ttft_s(1000)  # longer prompt, longer wait
    assert f"DeepSeek-V4-Flash reads it in ≈ {human_seconds(predicted)} (planner)" in (
        win.preview_label.text()
    )
    win.close()


def test_a_gguf_file_is_verified_planned_and_saved(qtbot, tmp_path, monkeypatch):
    """A DeepSeek-V4 GGUF is a model choice like a checkpoint folder: its header verified and
    planned with its own bytes, the plan saved with its path (the app loads it with llama.cpp);
    a GGUF of another model is refused with the planner's reason."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed (make test installs it)")
    from _gguf_headers import v4_flash_gguf

    from flashdesk.app.fit_preview import TtftPredictor
    from flashdesk.engine.gguf import metadata
    from flashdesk.engine.gguf.synthetic import write_tiny_moe

    settings = Settings()
    wiz = FitWizard(settings, tmp_path, profile=profile("rtx4090_192gb_ddr5"))
    qtbot.addWidget(wiz)
    wiz.show()
    wiz.next()
    page = wiz.model_page
    page.path_edit.setText(str(write_tiny_moe(tmp_path / "qwen.gguf")))
    page.verify()
    wait_until(lambda: page.verify_button.isEnabled(), timeout=30000)
    problems = [page.problems.item(i).text() for i in range(page.problems.count())]
    assert "'qwen3moe' model; the planner models" in problems[0] and not page.isComplete()

    real_read = metadata.read_gguf
    v4 = tmp_path / "DeepSeek-V4-Flash-Q2_K.gguf"
    monkeypatch.setattr(
        metadata, "read_gguf", lambda p, **kw: v4_flash_gguf() if Path(p) == v4 else real_read(p)
    )
    page.path_edit.setText(str(v4))
    page.verify()
    wait_until(lambda: page.verify_button.isEnabled(), timeout=30000)
    assert page.isComplete() and page.result.text().startswith("GGUF OK: DeepSeek-V4-Flash Q2_K")
    wiz.next()
    assert wiz.currentPage() is wiz.plan_page and wiz.choice.kind == "gguf"
    assert wiz.figures.total_bytes == v4_flash_gguf().weight_bytes  # the file's own bytes
    wiz.plan_page.recompute()
    assert wiz.plan.verdict == "fits"
    wiz.next()
    wiz.button(QWizard.WizardButton.FinishButton).click()
    assert settings.model_path == str(v4) and settings.plan["model_kind"] == "gguf"
    preview = TtftPredictor.build(tmp_path, settings.plan)  # the chat window's TTFT estimates
    assert preview is not None and preview.ttft_s(4096) > 0


def test_the_speed_line_says_what_a_full_context_costs():
    """Where attention at the full context slows decode (CPU attention, a long context) the
    plan page says by how much; where it does not, it says nothing more."""
    from flashdesk.app.wizard import prediction_text
    from flashdesk.engine.config import ModelConfig
    from flashdesk.engine.inventory import inventory
    from flashdesk.offload.figures import ModelFigures
    from flashdesk.offload.plan import PlanOptions, make_plan
    from flashdesk.offload.predict import predict

    config = ModelConfig.v4_flash()
    flash = ModelFigures.from_inventory(inventory(config), config, "DeepSeek-V4-Flash")
    for name, says in (("cpu_only_256gb", True), ("h200_lent_machine_measured", False)):
        machine = profile(name)
        plan = make_plan(flash, machine, PlanOptions(context=1 << 20))
        pred = predict(plan, flash, machine)
        text = prediction_text(pred, plan=plan)
        assert ("once the 1M-token context is full" in text) is says, text
        if says:
            assert f"{pred.decode_full_tok_s:.1f} once the" in text
