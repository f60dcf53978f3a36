"""V4 prompt encoding and completion parsing, checked against DeepSeek's official golden files.

tests/data/dsv4_encoding/ holds the four cases of the official `encoding/tests` (MIT); our encoder
must reproduce each prompt byte for byte and parse the assistant turns out of it again.
"""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashdesk.engine.chat import (
    EOS,
    THINK_MAX_MIN_CONTEXT,
    THINK_MAX_PREFIX,
    ChatFormatError,
    CompletionStream,
    Mode,
    ModeUnavailable,
    TurnStream,
    check_mode,
    encode_messages,
    mode_available,
    parse_completion,
    parse_tool_calls,
)
from flashdesk.engine.tokenizer import load_tokenizer

GOLDEN = Path(__file__).parent / "data" / "dsv4_encoding"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def golden(n):
    return (GOLDEN / f"test_output_{n}.txt").read_text(encoding="utf-8")


def golden_input(n):
    return json.loads((GOLDEN / f"test_input_{n}.json").read_text(encoding="utf-8"))


def assistant_turns(prompt, marker):
    """Completion texts of every assistant turn opened by `marker` (what the model generated)."""
    out = []
    start = prompt.find(marker)
    while start != -1:
        start += len(marker)
        end = prompt.find(EOS, start) + len(EOS)
        out.append(prompt[start:end])
        start = prompt.find(marker, end)
    return out


# -- golden files ------------------------------------------------------------------------------


def test_golden_1_thinking_with_tools_tool_results_folded():
    data = golden_input(1)
    prompt = encode_messages(data["messages"], Mode.THINK_HIGH, tools=data["tools"], tokenize=False)
    assert prompt.text == golden(1)
    # tools given inside the messages (the official way) render identically
    msgs = golden_input(1)["messages"]
    msgs[0]["tools"] = data["tools"]
    assert encode_messages(msgs, "think-high", tokenize=False).text == golden(1)

    first, last = assistant_turns(prompt.text, "<｜Assistant｜><think>")
    call = parse_completion(first, Mode.THINK_HIGH, strict=True)
    assert call.reasoning == (
        "The user wants to know the weather in Beijing. I should use the get_weather tool."
    )
    assert call.answer == ""
    assert call.finished
    assert [c.name for c in call.tool_calls] == ["get_weather"]
    assert call.tool_calls[0].parsed == {"location": "Beijing", "unit": "celsius"}
    assert call.tool_calls[0].arguments == '{"location": "Beijing", "unit": "celsius"}'

    final = parse_completion(last, Mode.THINK_HIGH, strict=True)
    assert final.reasoning == "Got the weather data. Let me format a nice response."
    assert final.answer == (
        "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity."
    )
    assert final.tool_calls == []


def test_golden_2_thinking_drops_earlier_reasoning():
    prompt = encode_messages(golden_input(2), Mode.THINK_HIGH, tokenize=False).text
    assert prompt == golden(2)
    assert "The user said hello" not in prompt
    (last,) = assistant_turns(prompt, "<｜Assistant｜><think>")
    parsed = parse_completion(last, Mode.THINK_HIGH, strict=True)
    assert parsed.reasoning == "The user asks about the capital of France. It is Paris."
    assert parsed.answer == "The capital of France is Paris."


def test_golden_3_developer_tools_and_latest_reminder():
    assert encode_messages(golden_input(3), "think-high", tokenize=False).text == golden(3)


def test_golden_4_quick_instruction_action_in_chat_mode():
    assert encode_messages(golden_input(4), "non-think", tokenize=False).text == golden(4)


def test_think_high_and_explicit_effort_high_are_the_same_prompt():
    msgs = golden_input(2)
    assert encode_messages(msgs, "think-high", tokenize=False).text == golden(2)


# -- the spec's examples and the three modes ---------------------------------------------------

SYS_HI = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}]


def test_spec_example_ids_non_think():
    prompt = encode_messages(SYS_HI, Mode.NON_THINK)
    assert prompt.text == "<｜begin▁of▁sentence｜>SYS<｜User｜>Hi<｜Assistant｜></think>"
    assert prompt.ids == [0, 53, 20842, 128803, 23166, 128804, 128822]
    assert len(prompt) == 7


def test_spec_example_ids_think_high():
    prompt = encode_messages(SYS_HI, "think-high")
    assert prompt.ids == [0, 53, 20842, 128803, 23166, 128804, 128821]


def test_think_max_inserts_the_effort_block_after_bos():
    text = encode_messages(SYS_HI, Mode.THINK_MAX, tokenize=False).text
    assert text == (
        "<｜begin▁of▁sentence｜>" + THINK_MAX_PREFIX + "SYS<｜User｜>Hi<｜Assistant｜><think>"
    )
    assert THINK_MAX_PREFIX.startswith(
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    )
    assert THINK_MAX_PREFIX.endswith("is left unchecked.\n\n")
    assert THINK_MAX_PREFIX.count("\n") == 4
    # no system message: the block goes right before the first user turn
    no_sys = encode_messages([{"role": "user", "content": "Hi"}], "think-max", tokenize=False)
    assert (
        no_sys.text
        == "<｜begin▁of▁sentence｜>" + THINK_MAX_PREFIX + "<｜User｜>Hi<｜Assistant｜><think>"
    )


def test_spec_tokenizer_example_roundtrip():
    tok = load_tokenizer()
    text = "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert tok.encode(text) == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    parsed = parse_completion("推理</think>答案<｜end▁of▁sentence｜>", "think-high", strict=True)
    assert (parsed.reasoning, parsed.answer, parsed.finished) == ("推理", "答案", True)


def test_think_max_needs_384k_context():
    ok, why = mode_available(Mode.THINK_MAX, 131_072)
    assert not ok
    assert "393,216" in why and "131,072" in why and "Think High" in why
    assert mode_available("think-max", THINK_MAX_MIN_CONTEXT) == (True, "")
    assert mode_available("think-high", 4096) == (True, "")
    assert check_mode("non-think", 1024) is Mode.NON_THINK
    with pytest.raises(ModeUnavailable, match="384K"):
        check_mode("think-max", THINK_MAX_MIN_CONTEXT - 1)
    with pytest.raises(ModeUnavailable):
        encode_messages(SYS_HI, "think-max", context_tokens=65_536, tokenize=False)
    assert encode_messages(SYS_HI, "think-max", context_tokens=1_048_576, tokenize=False).text


def test_multi_turn_history_in_each_mode():
    history = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "B"},
    ]
    non = encode_messages(history, "non-think", tokenize=False).text
    assert non == (
        "<｜begin▁of▁sentence｜><｜User｜>A<｜Assistant｜></think>a1<｜end▁of▁sentence｜>"
        "<｜User｜>B<｜Assistant｜></think>"
    )
    think = encode_messages(history, "think-high", tokenize=False).text
    assert think == (
        "<｜begin▁of▁sentence｜><｜User｜>A<｜Assistant｜></think>a1<｜end▁of▁sentence｜>"
        "<｜User｜>B<｜Assistant｜><think>"
    )
    # with tools defined, earlier reasoning is kept
    kept = encode_messages(history, "think-high", tools=[WEATHER_TOOL], tokenize=False).text
    assert "<｜Assistant｜><think>r1</think>a1<｜end▁of▁sentence｜>" in kept
    assert kept.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n")
    assert kept.endswith("<｜User｜>B<｜Assistant｜><think>")


def test_tool_results_sorted_by_call_order_and_merged_into_one_user_turn():
    msgs = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "user", "content": "and?"},
    ]
    text = encode_messages(msgs, "non-think", tokenize=False).text
    assert text.endswith(
        "<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand?"
        "<｜Assistant｜></think>"
    )
    assert msgs[2]["role"] == "tool"  # the caller's list is not modified


def test_tool_call_arguments_render_string_flag():
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "arguments": json.dumps({"s": "x", "n": 3, "l": [1]}),
                    },
                }
            ],
        },
    ]
    text = encode_messages(msgs, "non-think", tokenize=False).text
    assert text.endswith(
        '</think>ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">x</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
    )


def test_bad_messages_get_clear_errors():
    with pytest.raises(ChatFormatError, match="role"):
        encode_messages([{"content": "x"}], "non-think", tokenize=False)
    with pytest.raises(ChatFormatError, match="Unknown message role 'robot'"):
        encode_messages([{"role": "robot", "content": "x"}], "non-think", tokenize=False)
    with pytest.raises(ChatFormatError, match="OpenAI tool object"):
        encode_messages(SYS_HI, "non-think", tools=[{"name": "f"}], tokenize=False)
    with pytest.raises(ValueError):
        encode_messages(SYS_HI, "think-ultra", tokenize=False)


# -- parsing -----------------------------------------------------------------------------------

CALL_TEXT = (
    "Let me look.</think>Checking.\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="query" string="true">V4 "flash"\nline 2</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="n" string="false">5</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"a": [1, true]}</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="noop">\n\n</｜DSML｜invoke>\n'  # no arguments: an empty line
    "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
)


def test_parse_tool_calls_respects_string_flag():
    c = parse_completion(CALL_TEXT, "think-high", strict=True)
    assert c.reasoning == "Let me look."
    assert c.answer == "Checking."
    assert [t.name for t in c.tool_calls] == ["search", "noop"]
    assert c.tool_calls[0].parsed == {
        "query": 'V4 "flash"\nline 2',
        "n": 5,
        "opts": {"a": [1, True]},
    }
    assert c.tool_calls[1].parsed == {}
    assert c.finished and not c.problems
    short = parse_tool_calls('\n<｜DSML｜invoke name="noop">\n</｜DSML｜invoke>\n')
    assert short[0].parsed == {}
    # the parsed turn encodes back to the same text
    msg = c.to_message()
    again = encode_messages(
        [{"role": "user", "content": "q"}, msg], "think-high", tools=[WEATHER_TOOL], tokenize=False
    )
    assert again.text.endswith("<｜Assistant｜><think>" + CALL_TEXT)


def test_parse_without_mode_guesses_from_think_end():
    assert parse_completion("r</think>a" + EOS).reasoning == "r"
    plain = parse_completion("just an answer" + EOS)
    assert (plain.reasoning, plain.answer, plain.finished) == ("", "just an answer", True)


def test_parse_stopped_generation_is_kept_not_an_error():
    c = parse_completion("half a thou", "think-high")
    assert c.reasoning == "half a thou" and c.answer == "" and not c.finished
    assert "still reasoning" in c.problems[0]
    c = parse_completion("r</think>partial answ", "think-high", strict=True)
    assert (c.answer, c.finished, c.problems) == ("partial answ", False, [])


def test_malformed_dsml_keeps_the_text_and_reports_it():
    bad = (
        'ans\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam="x">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
        + EOS
    )
    c = parse_completion(bad, "non-think")
    assert c.tool_calls == []
    assert c.answer == bad[: -len(EOS)]
    assert "Malformed DSML invoke" in c.problems[0]
    with pytest.raises(ChatFormatError, match="Malformed"):
        parse_completion(bad, "non-think", strict=True)
    dup = (
        '\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    )
    with pytest.raises(ChatFormatError, match="Duplicate parameter 'a'"):
        parse_tool_calls(dup)
    cut = parse_completion('a\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n', "non-think")
    assert "cut off" in cut.problems[0] and cut.answer.endswith('invoke name="f">\n')
    junk = parse_completion("r</think>a" + EOS + "more", "think-high")
    assert "after the end of the turn" in junk.problems[0]
    with pytest.raises(ChatFormatError, match="special token"):
        parse_completion("a</think>b" + EOS, "non-think", strict=True)


def test_invalid_json_value_with_string_false_is_kept_unparsed():
    c = parse_completion(
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="x" string="false">not json</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS,
        "non-think",
    )
    assert c.tool_calls[0].parsed is None
    assert c.tool_calls[0].arguments == '{"x": not json}'


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_stream_matches_whole_parse_under_any_chunking(seed):
    rng = random.Random(seed)
    texts = [CALL_TEXT, "推理</think>答案" + EOS, "r</think>a\n\nb\n\n<｜DS not a call" + EOS]
    for text in texts:
        stream = CompletionStream("think-high")
        events = []
        i = 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            events += stream.feed(text[i:j])
            i = j
        got = stream.close()
        want = parse_completion(text, "think-high")
        assert (got.reasoning, got.answer, got.tool_calls, got.finished) == (
            want.reasoning,
            want.answer,
            want.tool_calls,
            want.finished,
        )
        streamed_reasoning = "".join(e.text for e in events if e.kind == "reasoning")
        streamed_answer = "".join(e.text for e in events if e.kind == "answer")
        assert streamed_reasoning == want.reasoning and streamed_answer == want.answer
        assert "<" not in streamed_reasoning.replace("<｜DS not", "")


def test_stream_reports_phases_in_order_and_holds_back_split_markers():
    s = CompletionStream(Mode.THINK_MAX)
    assert s.phase == "reasoning"
    assert [e.text for e in s.feed("thinking </th")] == ["thinking "]  # "</th" held back
    events = s.feed("ink>Answer")
    assert [(e.kind, e.text or e.phase) for e in events] == [
        ("phase", "answer"),
        ("answer", "Answer"),
    ]
    assert s.feed("\n\n<｜DS") == []  # could be the DSML block: held back
    events = s.feed(
        'ML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    )
    kinds = [e.kind for e in events]
    assert kinds == ["phase", "tool_call", "phase"]
    assert events[1].tool_call.name == "f"
    assert s.phase == "done"
    s.feed(EOS)
    final = s.close()
    assert final.finished and final.answer == "Answer" and not final.problems
    non = CompletionStream("non-think")
    assert non.phase == "answer"
    assert [e.text for e in non.feed("Hello")] == ["Hello"]


def test_turn_stream_from_token_ids():
    tok = load_tokenizer()
    text = "想一想 😀</think>答案 ✓" + CALL_TEXT.split("</think>", 1)[1]
    ids = tok.encode(text)
    stream = TurnStream("think-high", tok)
    events = []
    for i in ids:
        events += stream.push(i)
        assert "\ufffd" not in "".join(e.text for e in events)
    final = stream.close()
    assert final.reasoning == "想一想 😀"
    assert final.answer == "答案 ✓Checking."
    assert [c.name for c in final.tool_calls] == ["search", "noop"] and final.finished
    assert [e.phase for e in events if e.kind == "phase"] == ["answer", "tool_calls", "done"]


_plain = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<｜\r"), max_size=40
)
_value = st.one_of(
    _plain, st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)
)


@settings(max_examples=150, deadline=None)
@given(
    reasoning=_plain,
    answer=_plain.filter(lambda s: "\n\n" not in s),
    calls=st.lists(
        st.tuples(
            st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
            st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), _value, max_size=3),
        ),
        max_size=3,
    ),
    mode=st.sampled_from(["think-high", "non-think"]),
)
def test_encode_then_parse_roundtrip_property(reasoning, answer, calls, mode):
    """An assistant turn rendered by encode_messages parses back to the same turn."""
    msg = {"role": "assistant", "content": answer}
    if mode == "think-high":
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = [
            {"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for n, a in calls
        ]
    prompt = encode_messages(
        [{"role": "user", "content": "q"}, msg], mode, tools=[WEATHER_TOOL], tokenize=False
    ).text
    opener = "<｜Assistant｜>" + ("<think>" if mode == "think-high" else "</think>")
    completion = prompt[prompt.index(opener) + len(opener) :]
    got = parse_completion(completion, mode, strict=True)
    assert got.finished and not got.problems
    assert got.answer == answer
    assert got.reasoning == (reasoning if mode == "think-high" else "")
    assert [(c.name, c.parsed) for c in got.tool_calls] == [(n, a) for n, a in calls]
