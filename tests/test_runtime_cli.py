"""`flashdesk generate` / `flashdesk chat` end to end on a tiny checkpoint with V4's vocabulary."""

from __future__ import annotations

import json

import pytest

from flashdesk.cli import main
from flashdesk.engine.checkpoint.writer import write_random
from flashdesk.engine.config import ModelConfig

V4_VOCAB = 129_280


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = ModelConfig.tiny(vocab_size=V4_VOCAB, num_hidden_layers=2)
    return write_random(tmp_path_factory.mktemp("cli") / "ckpt", config, seed=3)


def test_generate_json_is_greedy_and_reproducible(folder, capsys):
    argv = ["generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "5"]
    argv += ["--temperature", "0", "--json", "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stats"]["generated_tokens"] >= 1
    assert first["stats"]["stop_reason"] in ("max_tokens", "eos")
    assert first["stats"]["prompt_tokens"] > 1
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == first["answer"]


def test_chat_streams_and_prints_stats(folder, capsys, monkeypatch):
    lines = iter(["Hi there", "/reset", "Again", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    argv = ["chat", "--model", str(folder), "--max-tokens", "3", "--seed", "1", "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("decode") >= 1 and err.count("stop: ") == 2


def test_clear_errors(folder, tmp_path, capsys):
    assert main(["generate", "--model", str(folder)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
    small = write_random(tmp_path / "small", ModelConfig.tiny(num_hidden_layers=2), seed=1)
    assert main(["generate", "--model", str(small), "--prompt", "x", "--device", "cpu"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_kv_format_option(folder, capsys):
    """--kv bf16 holds the cache at half of the CPU model's float32 rows; --kv fp8 on a model
    whose rows the FP8 layout cannot hold is refused with what to pick."""
    argv = ["generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "2"]
    argv += ["--temperature", "0", "--json", "--device", "cpu"]
    held = {}
    for kv in (None, "bf16"):
        assert main(argv + (["--kv", kv] if kv else [])) == 0
        held[kv] = json.loads(capsys.readouterr().out)["stats"]["kv_bytes"]
    assert held["bf16"] < held[None]
    assert main([*argv, "--kv", "fp8"]) == 2
    assert "bf16 KV" in capsys.readouterr().err


def test_speculative_option(folder, capsys, monkeypatch):
    """--speculative drafts with the MTP block: the same greedy answer, and the share of drafts
    kept in the stats (JSON and the chat's stats line)."""
    argv = ["generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "10"]
    argv += ["--temperature", "0", "--json", "--device", "cpu"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--speculative"]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["answer"] == plain["answer"]
    assert plain["stats"]["draft_acceptance"] is None
    assert 0 <= drafted["stats"]["draft_acceptance"] <= 1
    lines = iter(["Hi there", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat = ["chat", "--model", str(folder), "--max-tokens", "8", "--temperature", "0"]
    assert main([*chat, "--device", "cpu", "--speculative"]) == 0
    assert "drafts kept" in capsys.readouterr().err
