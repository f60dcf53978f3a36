"""Document extraction and token counting throughput: a generated 1,000-page PDF and a 50 MB text.

Bounds measured in the same run: PDFium's bare text extraction loop (pages/s) for our PDF loader,
a plain read + UTF-8 decode (MB/s) for our text loader, and one `tokenizers` encode call on one
thread (tokens/s) for our parallel counter. Also printed: seconds to count one million tokens,
the figure that decides whether counting a dropped document feels instant.
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path

import _machine  # benchmarks/_machine.py: benchmarks/ is on sys.path when they run

PDF_PAGES = 1000
LINES_PER_PAGE = 40
TEXT_BYTES = 50 * 1000 * 1000
SINGLE_THREAD_SAMPLE_CHARS = 4 * 1024 * 1024

_WORDS = re.findall(
    r"\S+",
    "the of and to in is that for it as with was on be by at this are from or an which have not "
    "memory model context token expert layer attention bandwidth kernel thread cache prompt "
    "über café naïve Straße 東京 数据 模型 résumé 2024 3.14159 (see §5) — “quoted” x=y+1;",
)


def _lines(rng: random.Random, count: int, words_per_line: int = 14) -> list[str]:
    words = rng.choices(_WORDS, k=count * words_per_line)
    return [" ".join(words[i : i + words_per_line]) for i in range(0, len(words), words_per_line)]


def _best(fn, repeats: int = 2) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _bare_pdfium(path: Path) -> int:
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(path)
    chars = 0
    for i in range(len(pdf)):
        page = pdf[i]
        textpage = page.get_textpage()
        chars += len(textpage.get_text_range())
        textpage.close()
        page.close()
    pdf.close()
    return chars


def run(json_output: bool = False) -> dict:
    from flashdesk.engine.documents import load_document, write_text_pdf
    from flashdesk.engine.tokenizer import load_tokenizer

    info = _machine.describe()
    tok = load_tokenizer()
    rng = random.Random(0)
    figures: dict = {"machine": info}

    with tempfile.TemporaryDirectory(prefix="flashdesk-bench-") as tmp:
        folder = Path(tmp)

        # -- PDF ---------------------------------------------------------------------------------
        pdf_path = folder / "generated.pdf"
        pages = [_lines(rng, LINES_PER_PAGE, 10) for _ in range(PDF_PAGES)]
        pdf_path.write_bytes(write_text_pdf(pages, font_size=9.0))
        bound_s, _ = _best(lambda: _bare_pdfium(pdf_path))
        ours_s, doc = _best(lambda: load_document(pdf_path))
        pdf_text = doc.text
        count_s, pdf_tokens = _best(lambda: tok.count(pdf_text))
        figures.update(
            pdf_pages=PDF_PAGES,
            pdf_bytes=pdf_path.stat().st_size,
            pdf_extract_pages_per_s=PDF_PAGES / ours_s,
            pdf_bound_pages_per_s=PDF_PAGES / bound_s,
            pdf_extract_ratio=bound_s / ours_s,
            pdf_tokens=pdf_tokens,
            pdf_count_tokens_per_s=pdf_tokens / count_s,
        )
        del pages, doc

        # -- 50 MB text --------------------------------------------------------------------------
        text_path = folder / "generated.txt"
        with open(text_path, "wb") as f:
            written = 0
            while written < TEXT_BYTES:
                block = ("\n".join(_lines(rng, 20_000)) + "\n").encode("utf-8")
                f.write(block)
                written += len(block)
        size = text_path.stat().st_size
        bound_s, _ = _best(lambda: text_path.read_bytes().decode("utf-8"))
        ours_s, doc = _best(lambda: load_document(text_path))
        text = doc.text
        count_s, text_tokens = _best(lambda: tok.count(text), repeats=1)
        sample = text[:SINGLE_THREAD_SAMPLE_CHARS]
        single_s, single_ids = _best(
            lambda: tok._tok.encode(sample, add_special_tokens=False).ids, repeats=1
        )
        single_tps = len(single_ids) / single_s
        figures.update(
            text_bytes=size,
            text_load_mb_per_s=size / 1e6 / ours_s,
            text_bound_mb_per_s=size / 1e6 / bound_s,
            text_load_ratio=bound_s / ours_s,
            text_tokens=text_tokens,
            text_count_tokens_per_s=text_tokens / count_s,
            single_thread_tokens_per_s=single_tps,
            count_parallel_ratio=(text_tokens / count_s) / single_tps,
            seconds_per_million_tokens=1e6 / (text_tokens / count_s),
        )

    if not json_output:
        f = figures
        _machine.print_machine(info)
        print(
            f"PDF, {f['pdf_pages']} pages ({f['pdf_bytes'] / 1e6:.1f} MB): extraction "
            f"{f['pdf_extract_pages_per_s']:,.0f} pages/s; bare PDFium loop (the bound) "
            f"{f['pdf_bound_pages_per_s']:,.0f} pages/s; ratio {f['pdf_extract_ratio']:.2f}"
        )
        print(
            f"PDF text: {f['pdf_tokens']:,} tokens counted at {f['pdf_count_tokens_per_s']:,.0f} "
            "tokens/s"
        )
        print(
            f"text, {f['text_bytes'] / 1e6:.0f} MB: loading {f['text_load_mb_per_s']:,.0f} MB/s; "
            f"plain read + UTF-8 decode (the bound) {f['text_bound_mb_per_s']:,.0f} MB/s; ratio "
            f"{f['text_load_ratio']:.2f}"
        )
        print(
            f"text: {f['text_tokens']:,} tokens counted at {f['text_count_tokens_per_s']:,.0f} "
            f"tokens/s; one tokenizers call on one thread (the bound) "
            f"{f['single_thread_tokens_per_s']:,.0f} tokens/s; ratio "
            f"{f['count_parallel_ratio']:.2f}"
        )
        print(f"counting 1M tokens takes {f['seconds_per_million_tokens']:.2f} s")
    return figures
