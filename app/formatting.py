"""Numbers and Markdown as the window shows them; pure functions, tested without Qt."""

from __future__ import annotations

import re
from typing import Any

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:  # context sizes: 1M, as the context menus say
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 90:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    if minutes < 90:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


STOP_REASONS = {
    "eos": "finished",
    "stop_token": "stop token",
    "max_tokens": "hit the token limit",
    "cancelled": "stopped",
    "context_full": "context full",
}


def stats_line(stats: dict[str, Any]) -> str:
    """'12.3 tok/s · first token 420 ms · 120 tokens · finished' (parts missing are left out)."""
    if not stats:
        return ""
    parts = []
    if stats.get("decode_tok_s"):
        parts.append(f"{stats['decode_tok_s']:.1f} tok/s")
    if stats.get("draft_acceptance") is not None:
        parts.append(f"drafts kept {100 * stats['draft_acceptance']:.0f}%")
    if stats.get("ttft_s") is not None:
        parts.append(f"first token {human_seconds(stats['ttft_s'])}")
    generated = stats.get("generated_tokens") or 0
    reasoning = stats.get("reasoning_tokens") or 0
    if generated:
        tok = f"{generated:,} tokens"
        if reasoning:
            tok += f" ({reasoning:,} reasoning)"
        parts.append(tok)
    if stats.get("prompt_tokens"):
        cached = stats.get("reused_tokens") or 0
        parts.append(
            f"prompt {stats['prompt_tokens']:,}" + (f" ({cached:,} cached)" if cached else "")
        )
    reason = stats.get("stop_reason")
    if reason:
        parts.append(STOP_REASONS.get(reason, reason))
    return " · ".join(parts)


def thought_label(reasoning_s: float | None, streaming: bool) -> str:
    if streaming:
        return "Thinking…"
    if reasoning_s is None:
        return "Reasoning"
    return f"Thought for {max(1, round(reasoning_s))} s"


def context_meter_text(used: int, limit: int, kv_bytes: int | None) -> str:
    text = f"{used:,} / {human_tokens(limit)} tokens"
    if kv_bytes:
        text += f" · KV {human_bytes(kv_bytes)}"
    return text


def markdown_with_copy_links(markdown: str) -> tuple[str, list[str]]:
    """Put a 'Copy code' link (URL `copy:N`) above every fenced code block.

    Returns the Markdown to render and the code blocks' text, in order. A fence still open at the
    end (an answer mid-stream) counts as a block up to the end.
    """
    out: list[str] = []
    blocks: list[str] = []
    fence: str | None = None
    current: list[str] = []
    for line in markdown.split("\n"):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                current = []
                out.append(f"[Copy code](copy:{len(blocks)})")
                out.append("")
                blocks.append("")
            out.append(line)
        else:
            closes = (
                match is not None
                and match.group(1)[0] == fence[0]
                and len(match.group(1)) >= len(fence)
                and line.strip() == match.group(1)
            )
            if closes:
                fence = None
                blocks[-1] = "\n".join(current)
                out.append(line)
                continue
            current.append(line)
            blocks[-1] = "\n".join(current)
            out.append(line)
    return "\n".join(out), blocks
