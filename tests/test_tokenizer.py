"""The V4 tokenizer: special ids, exact parallel counting, streaming decode without broken UTF-8."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashdesk.engine import tokenizer as tk
from flashdesk.engine.tokenizer import (
    EXPECTED_SPECIAL_IDS,
    VOCAB_SIZE,
    TokenizerError,
    V4Tokenizer,
    bundled_tokenizer_path,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_bundled_tokenizer_is_v4(tok):
    assert tok.vocab_size == VOCAB_SIZE
    for text, want in EXPECTED_SPECIAL_IDS.items():
        assert tok.token_id(text) == want
    assert tok.token_id("<｜action｜>") == 128829
    assert tok.token_id("<｜image｜>") == 129279
    assert load_tokenizer() is tok  # shared, loaded once
    with pytest.raises(KeyError):
        tok.token_id("<｜no such token｜>")


def test_encode_adds_nothing_and_matches_special_tokens_in_text(tok):
    assert tok.encode("Hi") == [23166]
    assert tok.encode("<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>") == [0, 23166, 1]
    assert tok.decode([0, 23166, 1]) == "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>"
    assert tok.decode([0, 23166, 1], skip_special_tokens=True) == "Hi"


def test_byte_table_agrees_with_tokenizers_decode(tok):
    rng = random.Random(0)
    ids = rng.sample(range(VOCAB_SIZE), 4000)
    for i in ids:
        want = tok._tok.decode([i], skip_special_tokens=False)
        got = tok.decode([i])
        assert got == want, i


SAMPLES = [
    "plain ASCII, numbers 1234567 and punctuation!?",
    "héllo wörld — ñ, Ω, ∑ ∫",
    "中文句子，日本語のテキスト、한국어 문장",
    "emoji 😀👍🏽 flags 🇫🇷🇯🇵 family 👨‍👩‍👧‍👦 math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<｜User｜>mixed<｜Assistant｜><think>ρ</think>答案<｜end▁of▁sentence｜>",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder_never_emits_broken_utf8(tok, text):
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert tok.decode(ids) == text


def test_stream_decoder_holds_back_split_character(tok):
    # "😀" is 4 bytes; byte-level BPE may spell it as several tokens: feed byte tokens one by one.
    byte_ids = [tok._tok.token_to_id("".join(_byte_char(b))) for b in "😀".encode()]
    assert None not in byte_ids
    dec = tok.stream_decoder()
    out = [dec.push(i) for i in byte_ids]
    assert out == ["", "", "", "😀"]
    # a stream cut inside a character shows a replacement character only at the end
    dec = tok.stream_decoder()
    assert dec.push(byte_ids[0]) == ""
    assert dec.flush() == "\ufffd"


def _byte_char(b):
    table = {v: k for k, v in tk._CHAR_TO_BYTE.items()}
    return table[b]


def test_stream_decoder_can_skip_special_tokens(tok):
    dec = tok.stream_decoder(skip_special_tokens=True)
    assert dec.push_many(tok.encode("<｜begin▁of▁sentence｜>ok<｜end▁of▁sentence｜>")) == "ok"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_stream_decode_roundtrip_property(text):
    tok = load_tokenizer()
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text


def test_parallel_count_is_exact(tok, monkeypatch):
    rng = random.Random(1)
    words = [
        "alpha",
        "β",
        "中文",
        "12345",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "x.",
        "😀",
        "<｜User｜>",
        "'s",
    ]
    text = "".join(rng.choice(words) for _ in range(30_000))
    whole = tok._tok.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(tk, "PARALLEL_MIN_CHARS", 1000)
    pieces = tk._split_for_parallel(text, 997)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert sum(len(tok._tok.encode(p, add_special_tokens=False).ids) for p in pieces) == len(whole)
    monkeypatch.setattr(tk, "PARALLEL_PIECE_CHARS", 997)
    assert tok.encode(text) == whole
    assert tok.count(text) == len(whole)
    assert tok.count_many(["Hi", text, ""]) == [1, len(whole), 0]


def test_model_folder_tokenizer_and_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"has no tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"not a readable tokenizer\.json"):
        load_tokenizer(tmp_path)
    # a real tokenizer.json, but not V4's special ids -> refused
    data = json.loads(bundled_tokenizer_path().read_text(encoding="utf-8"))
    for added in data["added_tokens"]:
        if added["content"] == "<think>":
            added["content"] = "<thinking>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not the DeepSeek-V4 tokenizer"):
        V4Tokenizer(tmp_path / "tokenizer.json")
    good = tmp_path / "good"
    good.mkdir()
    (good / "tokenizer.json").write_bytes(bundled_tokenizer_path().read_bytes())
    assert load_tokenizer(good).encode("Hi") == [23166]


def test_escape_control_tokens_makes_them_plain_text(tok):
    added = set(tok._tok.get_added_tokens_decoder())
    text = 'Quote: <think>x</think> <｜User｜>hi<｜end▁of▁sentence｜> <｜DSML｜invoke name="f">'
    assert added & set(tok.encode(text))
    escaped, n = tok.escape_control_tokens(text)
    assert n == 5
    assert not added & set(tok.encode(escaped))
    assert escaped.replace("\u200b", "") == text
    assert tok.escape_control_tokens("plain text, no markers") == ("plain text, no markers", 0)
