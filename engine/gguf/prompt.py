"""Chat prompts for GGUF models: V4's own encoder for `deepseek4`, the file's template otherwise.

A V4 GGUF gets exactly the prompt the native engine builds (engine/chat.py, byte-identical to
DeepSeek's encoder; the GGUF's vocabulary is V4's, so the ids are the same). Other models carry a
Jinja chat template in `tokenizer.chat_template`; it is rendered with jinja2's sandbox as
Hugging Face does, and if it uses something jinja2 cannot run, llama.cpp's built-in template
matcher (`llama_chat_apply_template`) is tried before giving up with a clear message.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from flashdesk.engine.gguf.errors import GGUFError


@dataclass(frozen=True)
class GGUFPrompt:
    ids: list[int]
    text: str


def _jinja_render(template: str, messages: Sequence[dict], bos: str, eos: str) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=list(messages),
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
    )


def _builtin_render(llama_cpp, template: str, messages: Sequence[dict]) -> str:
    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        role, content = str(m["role"]).encode(), str(m.get("content") or "").encode()
        keep += [role, content]
        chat[i].role, chat[i].content = role, content
    size = 4096 + 2 * sum(len(x) for x in keep)
    buf = ctypes.create_string_buffer(size)
    n = int(
        llama_cpp.llama_chat_apply_template(template.encode(), chat, len(chat), True, buf, size)
    )
    if n < 0:
        raise GGUFError("llama.cpp does not recognise this model's chat template.")
    if n > size:
        buf = ctypes.create_string_buffer(n)
        n = int(
            llama_cpp.llama_chat_apply_template(template.encode(), chat, len(chat), True, buf, n)
        )
    return buf.raw[:n].decode("utf-8", errors="replace")


def encode_chat(model, tokenizer, messages: Sequence[dict], mode: str = "non-think") -> GGUFPrompt:
    """A conversation as prompt ids for `model` (a LlamaCppModel) and its Session tokenizer."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise GGUFError(f"Every message needs a 'role'; got {m!r}.")
    if model.info.is_v4:
        from flashdesk.engine.chat import encode_messages

        encoded = encode_messages(messages, mode, tokenizer=tokenizer)
        return GGUFPrompt(list(encoded.ids or []), encoded.text)
    template = model.info.chat_template
    if not template:
        raise GGUFError(
            f"{model.info.path.name} carries no chat template (tokenizer.chat_template), so "
            "FlashDesk cannot tell how to format a conversation for it. Use an instruct/chat "
            "GGUF of the model."
        )
    plain = [{"role": m["role"], "content": str(m.get("content") or "")} for m in messages]
    bos = model.piece(model.bos_id).decode("utf-8", "replace") if model.bos_id >= 0 else ""
    eos_ids = model.stop_ids
    eos = model.piece(eos_ids[0]).decode("utf-8", "replace") if eos_ids else ""
    try:
        text = _jinja_render(template, plain, bos, eos)
    except Exception as exc:  # jinja2 errors of any kind: try llama.cpp's own matcher
        try:
            text = _builtin_render(model._llama, template, plain)
        except GGUFError:
            raise GGUFError(
                f"The chat template of {model.info.path.name} could not be applied ({exc}). "
                "Use a GGUF with a standard chat template."
            ) from exc
    ids = tokenizer.encode(text, special=True)
    if model.add_bos and not text.startswith(bos) and model.bos_id >= 0:
        ids = [model.bos_id, *ids]
    return GGUFPrompt(ids, text)
