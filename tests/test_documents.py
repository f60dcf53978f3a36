"""Documents: extraction per format, every kind of bad input, exact counts and the fit check.

All inputs are made here (PDFs with PDFium, DOCX with python-docx, an RC4-encrypted PDF by hand).
"""

import hashlib
import io
import json
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
import pytest

from flashdesk.engine.documents import (
    ContextBudget,
    Document,
    DocumentCancelled,
    DocumentError,
    attach,
    load_document,
    write_text_pdf,
)
from flashdesk.engine.tokenizer import load_tokenizer

# -- fixtures that build real files ------------------------------------------------------------

_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out = bytearray()
    i = j = 0
    for b in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes) -> bytes:
    """A one-page PDF encrypted with the standard security handler (RC4-40, revision 2)."""
    doc_id = bytes(range(16))
    perms = -44
    owner = _rc4(hashlib.md5((b"owner" + _PAD)[:32]).digest()[:5], (user_password + _PAD)[:32])
    key = hashlib.md5(
        (user_password + _PAD)[:32] + owner + perms.to_bytes(4, "little", signed=True) + doc_id
    ).digest()[:5]
    user = _rc4(key, _PAD)
    content = b"BT /F1 12 Tf 72 700 Td (Secret text) Tj ET"
    stream = _rc4(hashlib.md5(key + b"\x04\x00\x00\x00\x00").digest()[:10], content)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
        % (owner.hex().encode(), user.hex().encode(), perms),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    hex_id = doc_id.hex().encode()
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 6 0 R /ID [<%s> <%s>] >>\n" % (
        len(objs) + 1,
        hex_id,
        hex_id,
    )
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def scanned_pdf(pages: int = 2) -> bytes:
    """Pages that carry only a filled rectangle (what a scan looks like to a text extractor)."""
    pdf = pdfium.PdfDocument.new()
    for _ in range(pages):
        page = pdf.new_page(612, 792)
        rect = pdfium_c.FPDFPageObj_CreateNewRect(50, 50, 500, 700)
        pdfium_c.FPDFPageObj_SetFillColor(rect, 90, 90, 90, 255)
        pdfium_c.FPDFPath_SetDrawMode(rect, pdfium_c.FPDF_FILLMODE_ALTERNATE, 0)
        pdfium_c.FPDFPage_InsertObject(page.raw, rect)
        pdfium_c.FPDFPage_GenerateContent(page.raw)
        page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    return out.getvalue()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


BIG = ContextBudget(context_tokens=1_048_576, used_tokens=500, reserved_answer_tokens=8192)


# -- PDF ---------------------------------------------------------------------------------------


def test_pdf_text_with_page_markers(tmp_path):
    path = tmp_path / "report.pdf"
    path.write_bytes(write_text_pdf([["Chapter one", "Hello there"], ["Second page text"]]))
    seen = []
    doc = load_document(path, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert doc.kind == "pdf" and doc.pages == 2 and doc.notes == ()
    assert (
        doc.text == "--- Page 1 ---\nChapter one\nHello there\n\n--- Page 2 ---\nSecond page text"
    )
    assert [p.title for p in doc.parts] == ["Page 1", "Page 2"]
    assert ("extracting", 2, 2) in seen and seen[0][0] == "reading"
    second = doc.select([1])
    assert second.text == "--- Page 2 ---\nSecond page text"
    assert second.describe() == "PDF, 1 of 2 pages" and second.selection == (1,)
    with pytest.raises(ValueError, match="choose parts between 0 and 1"):
        doc.select([5])


def test_scanned_pdf_says_no_text_layer(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(scanned_pdf())
    with pytest.raises(DocumentError, match="no text layer — OCR not supported"):
        load_document(path)


def test_pdf_with_some_scanned_pages_keeps_text_and_says_which(tmp_path):
    path = tmp_path / "mixed.pdf"
    path.write_bytes(write_text_pdf([["real text"], [], ["more text"]]))
    doc = load_document(path)
    assert "pages 2" in doc.notes[0] and "OCR not supported" in doc.notes[0]
    assert doc.parts[1].text == "--- Page 2 ---\n[no text layer on this page]"
    assert "more text" in doc.text


def test_encrypted_pdf_is_refused_with_advice(tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(encrypted_pdf(b"secret"))
    # the file really is encrypted: it opens with its password and shows the text
    assert (
        "Secret text"
        in pdfium.PdfDocument(path, password="secret")[0].get_textpage().get_text_range()
    )
    with pytest.raises(DocumentError, match="password-protected") as err:
        load_document(path)
    assert "unprotected copy" in str(err.value) and err.value.path == path


def test_pdf_with_owner_password_only_is_readable(tmp_path):
    path = tmp_path / "restricted.pdf"
    path.write_bytes(encrypted_pdf(b""))
    assert "Secret text" in load_document(path).text


def test_damaged_pdf(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    with pytest.raises(DocumentError, match="not a readable PDF"):
        load_document(path)


# -- DOCX --------------------------------------------------------------------------------------


def make_docx(path):
    import docx

    d = docx.Document()
    d.add_heading("Annual Report", 0)
    d.add_paragraph("Opening words.")
    d.add_heading("Results", 1)
    d.add_paragraph("Revenue grew.")
    d.add_paragraph("first point", style="List Bullet")
    table = d.add_table(rows=3, cols=2)
    for r, (a, b) in enumerate([("Year", "Revenue"), ("2024", "10"), ("2025", "12|x")]):
        table.cell(r, 0).text = a
        table.cell(r, 1).text = b
    d.add_heading("Detail", 3)
    d.add_paragraph("Deep text.")
    d.add_heading("Outlook", 2)
    d.add_paragraph("Bright.")
    d.save(path)


def test_docx_headings_lists_and_tables_readable(tmp_path):
    path = tmp_path / "report.docx"
    make_docx(path)
    doc = load_document(path)
    assert doc.kind == "docx"
    assert [p.title for p in doc.parts] == ["Annual Report", "Results", "Outlook"]
    assert doc.parts[1].text == (
        "# Results\n\nRevenue grew.\n\n- first point\n\n"
        "| Year | Revenue |\n| --- | --- |\n| 2024 | 10 |\n| 2025 | 12\\|x |\n\n"
        "### Detail\n\nDeep text."
    )
    assert doc.parts[0].text == "# Annual Report\n\nOpening words."


def test_bad_docx(tmp_path):
    path = tmp_path / "fake.docx"
    path.write_bytes(b"this is not a zip file at all")
    with pytest.raises(DocumentError, match="not a readable DOCX"):
        load_document(path)
    ole = tmp_path / "protected.docx"
    ole.write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 600)
    with pytest.raises(DocumentError, match="password-protected or in the old Word"):
        load_document(ole)
    with pytest.raises(DocumentError, match=r"old Word \.doc format"):
        (tmp_path / "x.doc").write_bytes(b"x")
        load_document(tmp_path / "x.doc")


# -- text formats and encodings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "text"),
    [
        ("utf-8", "naïve café — 中文 😀\nline two"),
        ("utf-8-sig", "with a BOM: ünïcödé"),
        ("utf-16", "UTF-16 with BOM: 日本語"),
        (
            "cp1252",
            "Ceci est un texte en français, très élégant. Où est la gare ? Déjà vu, garçon.",
        ),
        ("cp1252", "Größe und Übermaß – “schöne” Grüße aus München, 5 €."),
        ("cp1251", "Привет, как дела? Это текст на русском языке в кодировке Windows."),
        ("gb18030", "你好，世界。这是一个中文文本文件，用于测试编码检测。我们需要足够长的文本。"),
    ],
)
def test_text_encodings_detected(tmp_path, encoding, text):
    path = tmp_path / "note.txt"
    path.write_bytes(text.encode(encoding))
    doc = load_document(path)
    assert doc.text == text
    assert doc.kind == "text" and doc.notes == ()


def test_broken_utf8_is_read_with_replacement_and_a_note(tmp_path):
    path = tmp_path / "broken.md"
    good = "Überschrift — résumé 中文 " * 20
    path.write_bytes(good.encode() + b"\xff\xfe bad \xc3" + "tail é".encode())
    doc = load_document(path)
    assert doc.encoding == "utf-8"
    assert doc.text.startswith(good) and doc.text.endswith("tail é")
    assert doc.text.count("\ufffd") == 3
    assert "3 bytes were not valid UTF-8" in doc.notes[0]


def test_crlf_markdown_sections_csv_json_code_html(tmp_path):
    md = tmp_path / "notes.md"
    md.write_bytes(b"intro\r\n\r\n# One\r\nbody 1\r\n## Two\r\nbody 2\r\n### deeper\r\n")
    doc = load_document(md)
    assert [p.title for p in doc.parts] == ["notes.md", "One", "Two"]
    assert doc.parts[2].text == "## Two\nbody 2\n### deeper"
    (tmp_path / "t.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    assert load_document(tmp_path / "t.csv").kind == "csv"
    (tmp_path / "d.json").write_text(json.dumps({"k": "v"}), encoding="utf-8")
    assert load_document(tmp_path / "d.json").text == '{"k": "v"}'
    (tmp_path / "m.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    code = load_document(tmp_path / "m.py")
    assert code.kind == "code" and code.text == "def f():\n    return 1"
    (tmp_path / "p.html").write_text(
        "<html><head><title>T</title><style>p{}</style><script>var x=1;</script></head>"
        "<body><h1>Head</h1><p>One &amp; two</p><table><tr><td>a</td><td>b</td></tr></table>"
        "</body></html>",
        encoding="utf-8",
    )
    page = load_document(tmp_path / "p.html")
    assert page.text == "T\n\nHead\n\nOne & two\n\n| a | b"
    assert "var x" not in page.text


def test_binary_empty_whitespace_and_folder(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DocumentError, match="binary file"):
        load_document(binary)
    png = tmp_path / "image.txt"  # wrong extension does not fool it
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(DocumentError, match="binary file"):
        load_document(png)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DocumentError, match="is empty"):
        load_document(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n", encoding="utf-8")
    with pytest.raises(DocumentError, match="only white space"):
        load_document(blank)
    with pytest.raises(DocumentError, match="is a folder"):
        load_document(tmp_path)


def test_size_cap_is_stated(tmp_path):
    from flashdesk.engine.documents import MAX_FILE_BYTES

    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:  # sparse: nothing is written, the size is what counts
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(DocumentError, match=r"FlashDesk reads files up to 268\.4 MB \(256 MiB\)"):
        load_document(path)
    small = tmp_path / "small.txt"
    small.write_text("x" * 5000, encoding="utf-8")
    with pytest.raises(DocumentError, match=r"small.txt is 0\.0 MB; FlashDesk reads files up to"):
        load_document(small, max_bytes=4096)


def test_missing_and_vanishing_files(tmp_path):
    gone = tmp_path / "gone.txt"
    with pytest.raises(DocumentError, match="was not found in"):
        load_document(gone)

    # the file is cut short by someone else while it is being read
    path = tmp_path / "shrinking.txt"
    path.write_bytes(b"a" * (9 * 1024 * 1024))

    def truncate_after_first_chunk(stage, done, total):
        if stage == "reading" and done == 4 * 1024 * 1024:
            path.write_bytes(b"")

    with pytest.raises(DocumentError, match="changed while it was being read"):
        load_document(path, progress=truncate_after_first_chunk)


# -- attach: counts, fit check, refusal --------------------------------------------------------


def test_attach_counts_exactly_and_fits(tmp_path, tok):
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(
        write_text_pdf([[f"page {i} line {k} text" for k in range(20)] for i in range(5)])
    )
    txt = tmp_path / "b.txt"
    txt.write_text("Plain notes.\n\n  indented\n中文 😀", encoding="utf-8")
    att = attach([pdf, txt], BIG)
    assert att.fits and att.refusal is None and att.failures == []
    assert att.tokens == tok.count(att.content) == sum(a.tokens for a in att.documents)
    assert att.content.startswith("[File: a.pdf (PDF, 5 pages)]\n--- Page 1 ---\n")
    assert "[End of file: a.pdf]\n\n[File: b.txt (text)]\nPlain notes.\n\n  indented" in att.content
    assert att.message("Summarize.").endswith("[End of file: b.txt]\n\nSummarize.")
    assert len(att.documents[0].part_tokens) == 5


def test_attach_refuses_over_budget_with_numbers_and_options(tmp_path):
    pdf = tmp_path / "long.pdf"
    pdf.write_bytes(write_text_pdf([[f"page {i} " + "word " * 60] * 10 for i in range(6)]))
    small = ContextBudget(
        context_tokens=2048, used_tokens=300, reserved_answer_tokens=1000, max_context_tokens=65536
    )
    att = attach([pdf], small)
    assert not att.fits
    msg = att.refusal
    assert f"need {att.tokens:,} tokens" in msg and "only 748 are free" in msg
    assert "2,048-token context" in msg and "Nothing was cut" in msg
    assert f"Raise the context to at least {att.tokens + 1300:,} tokens" in msg
    assert "Choose pages of long.pdf: 6 pages" in msg
    # choosing pages makes it fit
    doc = att.documents[0].document
    assert attach([doc.select([0])], small).fits
    # the plan cannot grow: say so
    capped = ContextBudget(2048, 300, 1000, max_context_tokens=2048)
    assert "already at your memory plan's maximum" in attach([doc], capped).refusal
    tiny_plan = ContextBudget(2048, 300, 1000, max_context_tokens=4096)
    assert "Raising the context is not enough" in attach([doc], tiny_plan).refusal


def test_attach_reports_failures_and_keeps_good_files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine", encoding="utf-8")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01\x02" * 100)
    att = attach([good, bad, tmp_path / "missing.pdf"], BIG)
    assert [d.document.name for d in att.documents] == ["good.txt"]
    assert [f.path.name for f in att.failures] == ["bad.bin", "missing.pdf"]
    assert "binary" in att.failures[0].message and "was not found in" in att.failures[1].message


def test_attach_from_worker_thread_with_progress_and_cancel(tmp_path, tok, monkeypatch):
    import flashdesk.engine.tokenizer as tokenizer_module

    # small batches so that a small file goes through several of them
    monkeypatch.setattr(tokenizer_module, "PARALLEL_MIN_CHARS", 20_000)
    monkeypatch.setattr(tokenizer_module, "PARALLEL_PIECE_CHARS", 10_000)
    monkeypatch.setattr(tokenizer_module, "COUNT_BATCH_CHARS", 40_000)
    path = tmp_path / "big.txt"
    path.write_text(
        ("Lorem ipsum dolor sit amet, consectetur. " * 10 + "\n") * 2000, encoding="utf-8"
    )
    result = {}
    stages = set()

    def work():
        result["att"] = attach([path], BIG, progress=lambda s, d, t: stages.add(s))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert stages == {"reading", "counting"}
    assert result["att"].tokens == tok.count(result["att"].content)

    stop = threading.Event()

    def cancel_on_counting(stage, done, total):
        if stage == "counting":
            stop.set()

    with pytest.raises(DocumentCancelled):
        attach([path, path], BIG, progress=cancel_on_counting, cancel=stop)
    stop.set()
    with pytest.raises(DocumentCancelled):
        load_document(path, cancel=stop)
    with pytest.raises(DocumentCancelled):
        attach([path], BIG, cancel=lambda: True)


def test_document_objects_can_be_attached_directly(tok):
    from pathlib import Path

    from flashdesk.engine.documents import Part

    doc = Document(path=Path("virtual.md"), kind="markdown", parts=(Part("a", "# A\nx"),))
    att = attach([doc], BIG, tokenizer=tok)
    assert att.content == "[File: virtual.md (markdown)]\n# A\nx\n\n[End of file: virtual.md]\n\n"


def test_control_token_strings_in_documents_stay_text(tmp_path, tok):
    path = tmp_path / "spec.md"
    path.write_text(
        "The prompt ends with <｜Assistant｜><think> in Think mode.\n", encoding="utf-8"
    )
    doc = load_document(path)
    assert "2 DeepSeek control-token strings" in doc.notes[0]
    assert (
        doc.text.replace("\u200b", "")
        == "The prompt ends with <｜Assistant｜><think> in Think mode."
    )
    att = attach([doc], BIG)
    assert tok.token_id("<think>") not in tok.encode(att.content)
    assert tok.token_id("<｜Assistant｜>") not in tok.encode(att.content)
    assert att.notes == list(doc.notes)


def test_documents_subcommand(tmp_path, capsys):
    from flashdesk.cli import main

    note = tmp_path / "note.txt"
    note.write_text("short note", encoding="utf-8")
    assert main(["documents", str(note), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["documents"][0]["tokens"] == out["tokens"] > 2
    assert main(["documents", str(note), "--context", "100", "--reserve", "90"]) == 1
    text = capsys.readouterr().out
    assert "note.txt:" in text and "only 10 are free" in text
