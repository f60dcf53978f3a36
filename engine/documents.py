"""Documents dropped into the chat: text extraction, token counts, and the fit check.

A document is read whole, turned into plain text (PDF pages with page markers, DOCX with headings
and tables kept readable, text/code/CSV/JSON/HTML with their encoding detected), counted with the
V4 tokenizer, and checked against the context left. A document that does not fit is refused with
the numbers and the options; it is never cut silently.

No Qt here: the app calls `load_document` / `attach` from a worker thread, passing a progress
callback and a cancel flag (a `threading.Event` or any callable returning True to stop).

Public API:
  load_document(path, *, max_bytes=MAX_FILE_BYTES, progress=None, cancel=None) -> Document
  attach(files, budget, *, tokenizer=None, progress=None, cancel=None) -> Attachment
  ContextBudget(context_tokens, used_tokens, reserved_answer_tokens, max_context_tokens=None)
  DocumentError (message for the user), DocumentCancelled
"""

from __future__ import annotations

import codecs
import html.parser
import io
import os
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flashdesk.engine.tokenizer import V4Tokenizer

MAX_FILE_BYTES = 256 * 1024 * 1024  # larger files are refused before reading (stated to the user)
READ_CHUNK = 4 * 1024 * 1024

# progress(stage, done, total): stage is "reading" (bytes), "extracting" (pages / blocks) or
# "counting" (characters); called from the loading thread.
Progress = Callable[[str, int, int], None]
Cancel = threading.Event | Callable[[], bool] | None

TEXT_KINDS = {
    ".txt": "text",
    ".text": "text",
    ".log": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
}
# fmt: off
CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".cu", ".rs", ".go", ".java", ".kt",
    ".swift", ".m", ".mm", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".pl", ".lua",
    ".r", ".jl", ".scala", ".cs", ".fs", ".sh", ".bash", ".zsh", ".ps1", ".bat", ".sql", ".css",
    ".scss", ".xml", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".tex", ".bib", ".make",
    ".cmake", ".gradle", ".proto", ".graphql", ".vue", ".svelte", ".dart", ".hs", ".ml", ".ex",
    ".exs", ".erl", ".clj", ".el", ".vim", ".asm", ".s", ".f90", ".ipynb",
})
# fmt: on
NOT_SUPPORTED = {
    ".doc": "the old Word .doc format; open it in Word or LibreOffice and save it as .docx",
    ".xls": "a spreadsheet; export the sheet as CSV",
    ".xlsx": "a spreadsheet; export the sheet as CSV",
    ".ppt": "a presentation; export it as PDF",
    ".pptx": "a presentation; export it as PDF",
    ".odt": "an OpenDocument text; save it as .docx or PDF",
    ".rtf": "RTF; save it as .docx or plain text",
    ".epub": "an e-book; convert it to PDF or text",
}
SUPPORTED_TEXT = "PDF, DOCX, plain text, Markdown, source code, CSV, JSON and HTML"


class DocumentError(Exception):
    """A file that cannot be attached; `str(err)` is the message for the user (what, what to do)."""

    def __init__(self, path: str | os.PathLike[str], message: str):
        super().__init__(message)
        self.path = Path(path)
        self.message = message


class DocumentCancelled(Exception):
    """The user cancelled loading or counting."""


@dataclass(frozen=True)
class Part:
    """A selectable piece of a document: a PDF page, a DOCX/Markdown section, or the whole text."""

    title: str
    text: str


@dataclass(frozen=True)
class Document:
    """Extracted text of one file, in parts (pages or sections) the user can choose from."""

    path: Path
    kind: str  # pdf, docx, text, markdown, code, csv, json, html
    parts: tuple[Part, ...]
    encoding: str | None = None  # text files: the detected encoding
    pages: int | None = None  # PDFs: pages in the file
    notes: tuple[str, ...] = ()  # things the user should know (pages without text, replaced bytes)
    selection: tuple[int, ...] | None = None  # part indices kept by `select`, None = all

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def text(self) -> str:
        return "\n\n".join(p.text for p in self.parts)

    def select(self, indices: Iterable[int]) -> Document:
        """The same document with only the chosen parts (0-based indices, e.g. PDF pages - 1)."""
        chosen = sorted(set(indices))
        if not chosen or chosen[0] < 0 or chosen[-1] >= len(self.parts):
            raise ValueError(
                f"choose parts between 0 and {len(self.parts) - 1} of {self.name}; got {chosen}"
            )
        base = self.selection if self.selection is not None else tuple(range(len(self.parts)))
        return replace(
            self,
            parts=tuple(self.parts[i] for i in chosen),
            selection=tuple(base[i] for i in chosen),
        )

    def describe(self) -> str:
        what = {"pdf": "PDF", "docx": "DOCX", "csv": "CSV", "json": "JSON", "html": "HTML"}.get(
            self.kind, self.kind
        )
        if self.kind == "pdf":
            n = len(self.parts)
            shown = f"{n} of {self.pages} pages" if n != self.pages else f"{self.pages} pages"
            return f"{what}, {shown}"
        if self.selection is not None:
            return f"{what}, {len(self.parts)} selected sections"
        return what


def _cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _check(cancel: Cancel) -> None:
    if _cancelled(cancel):
        raise DocumentCancelled("cancelled")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _read_file(path: Path, max_bytes: int, progress: Progress | None, cancel: Cancel) -> bytes:
    """The whole file, or a DocumentError that says why not (missing, too big, vanished...)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DocumentError(
            path,
            f"{path.name} was not found in {path.parent} (moved or deleted?). Attach it again "
            "from where it is now.",
        ) from None
    except OSError as exc:
        raise DocumentError(path, f"Cannot open {path.name}: {exc.strerror or exc}.") from None
    if path.is_dir():
        raise DocumentError(path, f"{path.name} is a folder; attach the files inside it instead.")
    size = st.st_size
    if size > max_bytes:
        raise DocumentError(
            path,
            f"{path.name} is {_mb(size)}; FlashDesk reads files up to {_mb(max_bytes)} "
            f"({max_bytes // 2**20} MiB). Split it, or export only the part you need.",
        )
    if size == 0:
        raise DocumentError(path, f"{path.name} is empty (0 bytes); there is nothing to attach.")
    chunks = []
    done = 0
    try:
        with open(path, "rb") as f:
            while True:
                _check(cancel)
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
                if done > max_bytes:
                    raise DocumentError(
                        path,
                        f"{path.name} grew past {_mb(max_bytes)} while it was being read; "
                        "FlashDesk reads files up to that size.",
                    )
                if progress:
                    progress("reading", done, size)
    except PermissionError:
        raise DocumentError(
            path,
            f"FlashDesk is not allowed to read {path.name} (permission denied). Copy it somewhere "
            "you own, or change its permissions.",
        ) from None
    except FileNotFoundError:
        raise DocumentError(
            path, f"{path.name} vanished before it could be read. Attach it again."
        ) from None
    except OSError as exc:
        raise DocumentError(
            path,
            f"Reading {path.name} failed after {_mb(done)} ({exc.strerror or exc}): the file was "
            "moved, deleted or its drive disconnected while it was being read. Attach it again "
            "once it is back.",
        ) from None
    if done != size:
        raise DocumentError(
            path,
            f"{path.name} changed while it was being read ({size:,} bytes when opened, {done:,} "
            "read): it was truncated, replaced or deleted. Wait until it is saved completely "
            "and attach it again.",
        )
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------
# Text files
# ------------------------------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NON_SPACE = re.compile(r"\S")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_INVALID_UTF8 = re.compile("[\udc80-\udcff]")  # bytes kept by surrogateescape
_VALID_NON_ASCII = re.compile("[^\x00-\x7f\udc80-\udcff]")


def _binary_error(path: Path) -> DocumentError:
    return DocumentError(
        path,
        f"{path.name} is a binary file, not text. FlashDesk reads {SUPPORTED_TEXT}; convert it "
        "to one of those first.",
    )


_LATIN1_LETTER = re.compile("[\u00c0-\u00ff]")
_LETTER = re.compile(r"[^\W\d_]")
_WESTERN_EXTRA = re.compile(
    "[^\x00-\x7f\u00a0-\u00ff\u20ac\u201a-\u201e\u2013\u2014\u2018\u2019\u2022\u2026\u0152\u0153\u0160\u0161\u0178\u017d\u017e]"
)


def _as_western(data: bytes) -> str | None:
    """The text as Windows-1252 if it reads like Western European text, else None.

    Charset detectors are unreliable on short Latin texts (they pick Baltic or Mac code pages);
    Windows-1252 is by far the most common legacy encoding. Other scripts read as 1252 give words
    made entirely of accented letters, so the share of accented letters decides.
    """
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    sample = text[:65536]
    if _WESTERN_EXTRA.search(sample):
        return None
    letters = len(_LETTER.findall(sample))
    accented = len(_LATIN1_LETTER.findall(sample))
    return text if letters and accented <= 0.3 * letters else None


def decode_text(path: Path, data: bytes) -> tuple[str, str, list[str]]:
    """(text, encoding, notes): BOM, then UTF-8, then a detected legacy encoding.

    UTF-8 with a few invalid bytes is kept as UTF-8 with U+FFFD in their place (and a note),
    instead of being misread as a legacy encoding.
    """
    notes: list[str] = []
    for bom, enc in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc), enc.replace("-sig", ""), notes
            except UnicodeDecodeError:
                text = data.decode(enc, errors="replace")
                notes.append(f"{path.name}: some bytes were not valid {enc} and show as \ufffd.")
                return text, enc, notes
    sample = data[: 1 << 16]
    if b"\x00" in sample:  # UTF-16/32 without a BOM, or binary
        import charset_normalizer

        best = charset_normalizer.from_bytes(sample).best()
        if best is None or not (best.encoding or "").startswith(("utf_16", "utf_32")):
            raise _binary_error(path)
        return data.decode(best.encoding, errors="replace"), best.encoding, notes
    try:
        text = data.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        loose = data.decode("utf-8", errors="surrogateescape")
        bad = len(_INVALID_UTF8.findall(loose))
        multibyte = len(_VALID_NON_ASCII.findall(loose))
        if multibyte > 0 and bad <= max(4, multibyte // 20):
            text = data.decode("utf-8", errors="replace")
            encoding = "utf-8"
            notes.append(
                f"{path.name}: {bad:,} byte{'s' * (bad != 1)} were not valid UTF-8 and show as "
                "\ufffd; the rest was read as UTF-8."
            )
        elif (western := _as_western(data)) is not None:
            text, encoding = western, "cp1252"
        else:
            import charset_normalizer

            best = charset_normalizer.from_bytes(sample).best()
            if best is None or best.encoding is None:
                raise _binary_error(path) from None
            encoding = best.encoding
            text = data.decode(encoding, errors="replace")
    head = text[:65536]
    if len(_CONTROL.findall(head)) > max(8, len(head) // 100):
        raise _binary_error(path)
    return text, encoding, notes


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, with line breaks where blocks end."""

    # fmt: off
    BLOCKS = frozenset({
        "p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6",
        "section", "article", "header", "footer", "pre", "blockquote", "title", "dt", "dd", "hr",
    })
    # fmt: on
    SKIP = frozenset(("script", "style", "noscript", "template", "svg"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif tag in self.BLOCKS:
            self.out.append("\n")
        if tag in ("td", "th"):
            self.out.append(" | ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.out.append(data)


def _html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    text = "".join(parser.out)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\s*\n\s*(\n\s*)+", "\n\n", text).strip()


_MD_HEADING = re.compile(r"^#{1,2} \S", flags=re.MULTILINE)


def _sections(text: str, heading: re.Pattern[str], name: str) -> list[Part]:
    """Split at headings; text before the first heading is its own part."""
    starts = [m.start() for m in heading.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    parts = []
    for a, b in zip(starts, [*starts[1:], len(text)], strict=True):
        chunk = text[a:b].strip()
        if chunk:
            title = chunk.split("\n", 1)[0].lstrip("#").strip()[:80] if a else name
            parts.append(Part(title=title, text=chunk))
    return parts


def _load_text(path: Path, kind: str, data: bytes) -> Document:
    text, encoding, notes = decode_text(path, data)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if kind == "html":
        text = _html_to_text(text)
    if _NON_SPACE.search(text) is None:
        raise DocumentError(path, f"{path.name} contains only white space; nothing to attach.")
    if kind == "markdown":
        parts = _sections(text, _MD_HEADING, path.name)
    else:
        parts = [Part(title=path.name, text=text.strip("\n"))]
    return Document(path=path, kind=kind, parts=tuple(parts), encoding=encoding, notes=tuple(notes))


# ------------------------------------------------------------------------------------------------
# PDF
# ------------------------------------------------------------------------------------------------

_PDFIUM_LOCK = threading.Lock()  # PDFium is not thread-safe


def _load_pdf(path: Path, data: bytes, progress: Progress | None, cancel: Cancel) -> Document:
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            code = getattr(exc, "err_code", None)
            if code == pdfium_c.FPDF_ERR_PASSWORD:
                raise DocumentError(
                    path,
                    f"{path.name} is password-protected (encrypted). Open it in a PDF viewer, "
                    "save or print an unprotected copy, and attach that.",
                ) from None
            if code == pdfium_c.FPDF_ERR_SECURITY:
                raise DocumentError(
                    path,
                    f"{path.name} uses a security handler FlashDesk cannot open. Save an "
                    "unprotected copy and attach that.",
                ) from None
            raise DocumentError(
                path,
                f"{path.name} is not a readable PDF (damaged or not really a PDF: {exc}). Open "
                "it in a PDF viewer and save a fresh copy.",
            ) from None
        try:
            n = len(pdf)
            parts = []
            empty = []
            for i in range(n):
                _check(cancel)
                page = pdf[i]
                textpage = page.get_textpage()
                try:
                    text = textpage.get_text_range()
                finally:
                    textpage.close()
                    page.close()
                text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
                text = text.strip()
                if not text:
                    empty.append(i + 1)
                    text = "[no text layer on this page]"
                parts.append(Part(title=f"Page {i + 1}", text=f"--- Page {i + 1} ---\n{text}"))
                if progress:
                    progress("extracting", i + 1, n)
        finally:
            pdf.close()
    if n == 0:
        raise DocumentError(path, f"{path.name} has no pages.")
    if len(empty) == n:
        raise DocumentError(
            path,
            f"{path.name} has no text layer — OCR not supported. It looks like a scan or images "
            "of text; run it through an OCR tool (for example ocrmypdf) and attach the result.",
        )
    notes = []
    if empty:
        listed = ", ".join(map(str, empty[:20])) + (" …" if len(empty) > 20 else "")
        notes.append(
            f"{path.name}: {len(empty)} of {n} pages have no text layer (scanned?) and are "
            f"attached as empty — OCR not supported: pages {listed}."
        )
    return Document(path=path, kind="pdf", parts=tuple(parts), pages=n, notes=tuple(notes))


def write_text_pdf(pages: Sequence[Sequence[str]], font_size: float = 10.0) -> bytes:
    """A PDF whose page k shows the lines `pages[k]` as real text (Helvetica).

    Used by the documents benchmark, the tests and the self-test; an empty line list gives a page
    without text. Characters outside Latin-1 may not render in the standard font.
    """
    import ctypes

    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    with _PDFIUM_LOCK:
        pdf = pdfium.PdfDocument.new()
        try:
            for lines in pages:
                page = pdf.new_page(612, 792)
                for k, line in enumerate(lines):
                    obj = pdfium_c.FPDFPageObj_NewTextObj(pdf.raw, b"Helvetica", font_size)
                    buf = ctypes.create_string_buffer(line.encode("utf-16-le") + b"\0\0")
                    pdfium_c.FPDFText_SetText(
                        obj, ctypes.cast(buf, ctypes.POINTER(pdfium_c.FPDF_WCHAR))
                    )
                    pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 40, 760 - k * font_size * 1.3)
                    pdfium_c.FPDFPage_InsertObject(page.raw, obj)
                pdfium_c.FPDFPage_GenerateContent(page.raw)
                page.close()
            out = io.BytesIO()
            pdf.save(out)
        finally:
            pdf.close()
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# DOCX
# ------------------------------------------------------------------------------------------------


def _docx_table(table) -> str:
    rows = []
    for r, row in enumerate(table.rows):
        cells = []
        seen = set()
        for cell in row.cells:  # a merged cell appears once per grid column it spans
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()).replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
        if r == 0:
            rows.append("|" + " --- |" * len(cells))
    return "\n".join(rows)


def _load_docx(path: Path, data: bytes, progress: Progress | None, cancel: Cancel) -> Document:
    import docx
    from docx.table import Table

    if data[:8] == bytes.fromhex("d0cf11e0a1b11ae1"):
        raise DocumentError(
            path,
            f"{path.name} is password-protected or in the old Word .doc format. Open it in "
            "Word or LibreOffice and save an unprotected .docx copy.",
        )
    try:
        doc = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DocumentError(
            path,
            f"{path.name} is not a readable DOCX (damaged, or not really a Word file: {exc}). "
            "Open it in Word or LibreOffice and save it again.",
        ) from None
    except Exception as exc:  # python-docx raises various lxml/package errors on broken files
        raise DocumentError(
            path, f"{path.name} could not be read as DOCX ({type(exc).__name__}: {exc})."
        ) from None
    blocks = list(doc.iter_inner_content())
    parts: list[Part] = []
    title = path.name
    lines: list[str] = []

    def close_section() -> None:
        text = "\n\n".join(x for x in lines if x).strip()
        if text:
            parts.append(Part(title=title, text=text))

    for k, block in enumerate(blocks):
        _check(cancel)
        if isinstance(block, Table):
            lines.append(_docx_table(block))
        else:
            text = block.text.strip()
            style = (block.style.name if block.style is not None else "") or ""
            level = 0
            if style == "Title":
                level = 1
            elif style.startswith("Heading "):
                digits = style.removeprefix("Heading ").strip()
                level = int(digits) if digits.isdigit() else 1
            if level and text:
                if level <= 2:
                    close_section()
                    lines = []
                    title = text[:80]
                lines.append("#" * min(level, 6) + " " + text)
            elif text:
                if "List Number" in style:
                    text = "1. " + text
                elif "List" in style:
                    text = "- " + text
                lines.append(text)
        if progress:
            progress("extracting", k + 1, len(blocks))
    close_section()
    if not parts:
        raise DocumentError(path, f"{path.name} contains no text; nothing to attach.")
    return Document(path=path, kind="docx", parts=tuple(parts))


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def kind_of(path: str | os.PathLike[str]) -> str:
    """How a file will be read: pdf, docx, markdown, code, csv, json, html or text."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pdf":
        return "pdf"
    if suffix == ".docx":
        return "docx"
    if suffix in CODE_SUFFIXES:
        return "code"
    return TEXT_KINDS.get(suffix, "text")


def load_document(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_FILE_BYTES,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> Document:
    """Read and extract one file. Raises DocumentError (user message) or DocumentCancelled."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in NOT_SUPPORTED:
        raise DocumentError(
            path,
            f"{path.name} is {NOT_SUPPORTED[suffix]}. FlashDesk reads {SUPPORTED_TEXT}.",
        )
    data = _read_file(path, max_bytes, progress, cancel)
    _check(cancel)
    head = data[:8]
    kind = kind_of(path)
    if kind == "pdf" or head.startswith(b"%PDF-"):
        doc = _load_pdf(path, data, progress, cancel)
    elif kind == "docx":
        doc = _load_docx(path, data, progress, cancel)
    elif head.startswith(b"PK\x03\x04") and kind == "text":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            names = []
        if "word/document.xml" not in names:
            raise _binary_error(path)
        doc = _load_docx(path, data, progress, cancel)
    else:
        doc = _load_text(path, kind, data)
    return _escape_control_tokens(doc)


def _escape_control_tokens(doc: Document) -> Document:
    """Control-token strings quoted in a document stay text (see V4Tokenizer.escape_control_tokens)."""
    from flashdesk.engine.tokenizer import load_tokenizer

    tok = load_tokenizer()
    parts = []
    escaped = 0
    for part in doc.parts:
        text, n = tok.escape_control_tokens(part.text)
        escaped += n
        parts.append(Part(title=part.title, text=text) if n else part)
    if not escaped:
        return doc
    note = (
        f"{doc.name}: {escaped:,} DeepSeek control-token strings (such as <think>) were marked "
        "with a zero-width space so that the model reads them as text."
    )
    return replace(doc, parts=tuple(parts), notes=(*doc.notes, note))


@dataclass(frozen=True)
class ContextBudget:
    """Where the attachment must fit.

    context_tokens: the session's context size. used_tokens: the prompt without the attachment
    (history, system text, the user's message). reserved_answer_tokens: kept free for the answer
    (and reasoning). max_context_tokens: the largest context the memory plan allows, if known.
    """

    context_tokens: int
    used_tokens: int = 0
    reserved_answer_tokens: int = 0
    max_context_tokens: int | None = None

    @property
    def available(self) -> int:
        return max(0, self.context_tokens - self.used_tokens - self.reserved_answer_tokens)


@dataclass(frozen=True)
class AttachedDocument:
    document: Document
    tokens: int  # tokens of its whole section in the message, header included
    part_tokens: tuple[int, ...]  # per part (page/section), separators included


@dataclass
class Attachment:
    """The result of `attach`: what would be sent, its size, and whether it fits.

    content: the text to put before the user's message (every file under a header with its
        name); `tokens` is exactly its token count.
    failures: files that could not be read (each with its message); the others are attached.
    refusal: None when it fits; otherwise the message to show (numbers and options).
    """

    documents: list[AttachedDocument]
    failures: list[DocumentError]
    content: str
    tokens: int
    budget: ContextBudget
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.tokens <= self.budget.available

    @property
    def refusal(self) -> str | None:
        return None if self.fits else _refusal(self)

    def message(self, user_text: str) -> str:
        """The user message with the documents in front of it."""
        return self.content + user_text


def _section_pieces(doc: Document) -> list[str]:
    """The message text of one document as pieces whose token counts add up exactly.

    Each piece ends with a newline and the next starts with a non-space character, a boundary the
    tokenizer never merges across (see tokenizer._SAFE_BOUNDARY).
    """
    header = f"[File: {doc.name} ({doc.describe()})]\n"
    pieces = [header]
    for part in doc.parts:
        text = part.text.strip()
        pieces.append(text + "\n\n")
    pieces.append(f"[End of file: {doc.name}]\n\n")
    # A part starting with white space would merge with the previous newline; strip() above makes
    # every piece start with non-space text.
    return pieces


def attach(
    files: Iterable[str | os.PathLike[str] | Document],
    budget: ContextBudget,
    *,
    tokenizer: V4Tokenizer | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    progress: Progress | None = None,
    cancel: Cancel = None,
) -> Attachment:
    """Load (or take already loaded) documents, count their tokens, and check the fit.

    Files that cannot be read are reported in `failures`, not raised; cancelling raises
    DocumentCancelled. Nothing is ever truncated: an attachment over budget has `fits == False`
    and a `refusal` message.
    """
    if tokenizer is None:
        from flashdesk.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    docs: list[Document] = []
    failures: list[DocumentError] = []
    for item in files:
        _check(cancel)
        if isinstance(item, Document):
            docs.append(item)
            continue
        try:
            docs.append(load_document(item, max_bytes=max_bytes, progress=progress, cancel=cancel))
        except DocumentError as err:
            failures.append(err)

    pieces_per_doc = [_section_pieces(d) for d in docs]
    flat = [p for pieces in pieces_per_doc for p in pieces]
    counts = tokenizer.count_many(
        flat,
        progress=(lambda done, total: progress("counting", done, total)) if progress else None,
        cancel=(lambda: _cancelled(cancel)) if cancel is not None else None,
    )
    if counts is None:
        raise DocumentCancelled("cancelled")
    attached = []
    k = 0
    for doc, pieces in zip(docs, pieces_per_doc, strict=True):
        c = counts[k : k + len(pieces)]
        k += len(pieces)
        attached.append(AttachedDocument(document=doc, tokens=sum(c), part_tokens=tuple(c[1:-1])))
    notes = [n for d in docs for n in d.notes]
    return Attachment(
        documents=attached,
        failures=failures,
        content="".join(flat),
        tokens=sum(counts),
        budget=budget,
        notes=notes,
    )


def _refusal(att: Attachment) -> str:
    b = att.budget
    need = att.tokens
    lines = [
        f"The attached documents need {need:,} tokens, but only {b.available:,} are free in this "
        f"session's {b.context_tokens:,}-token context ({b.used_tokens:,} for the conversation "
        f"and your message, {b.reserved_answer_tokens:,} kept for the answer). Nothing was cut; "
        "nothing was sent.",
        "Options:",
    ]
    required = need + b.used_tokens + b.reserved_answer_tokens
    if b.max_context_tokens is not None and b.max_context_tokens > b.context_tokens:
        if required <= b.max_context_tokens:
            lines.append(
                f"- Raise the context to at least {required:,} tokens (your memory plan allows "
                f"up to {b.max_context_tokens:,})."
            )
        else:
            lines.append(
                f"- Raising the context is not enough: your memory plan allows at most "
                f"{b.max_context_tokens:,} tokens, and this needs {required:,}."
            )
    elif b.max_context_tokens is not None:
        lines.append(
            f"- The context is already at your memory plan's maximum ({b.context_tokens:,})."
        )
    for a in sorted(att.documents, key=lambda a: -a.tokens):
        doc = a.document
        if len(doc.parts) > 1:
            unit = "pages" if doc.kind == "pdf" else "sections"
            avg = sum(a.part_tokens) // len(a.part_tokens)
            lines.append(
                f"- Choose {unit} of {doc.name}: {len(doc.parts)} {unit}, {a.tokens:,} tokens "
                f"(about {avg:,} per {unit[:-1]})."
            )
        else:
            lines.append(f"- Attach a shorter part of {doc.name} ({a.tokens:,} tokens).")
    if len(att.documents) > 1:
        lines.append("- Attach fewer files.")
    lines.append("- Start a new chat to free the space the conversation uses.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# `flashdesk documents FILE...`
# ------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", help="documents to read and count")
    parser.add_argument(
        "--context", type=int, default=1_048_576, help="context size in tokens (default 1M)"
    )
    parser.add_argument(
        "--reserve", type=int, default=32_768, help="tokens kept free for the answer"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    """Count the tokens of documents as the app would attach them, and say whether they fit."""
    import json
    import time

    t0 = time.perf_counter()
    budget = ContextBudget(args.context, 0, args.reserve)
    att = attach(args.files, budget)
    seconds = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(
                {
                    "documents": [
                        {
                            "path": str(a.document.path),
                            "kind": a.document.kind,
                            "parts": len(a.document.parts),
                            "tokens": a.tokens,
                        }
                        for a in att.documents
                    ],
                    "failures": [{"path": str(f.path), "message": f.message} for f in att.failures],
                    "notes": att.notes,
                    "tokens": att.tokens,
                    "available": budget.available,
                    "fits": att.fits,
                    "seconds": seconds,
                },
                ensure_ascii=False,
            )
        )
    else:
        for a in att.documents:
            print(f"{a.document.name}: {a.tokens:,} tokens ({a.document.describe()})")
        for f in att.failures:
            print(f"{f.path.name}: not attached: {f.message}")
        for note in att.notes:
            print(f"note: {note}")
        print(f"total {att.tokens:,} tokens, read and counted in {seconds:.2f} s")
        print(att.refusal or f"fits: {budget.available:,} tokens free")
    return 0 if att.fits and not att.failures else 1
