"""WARC and WET input (data/source_warc.py): records framed exactly by Content-Length in plain,
per-record gzip, single-member gzip and zstd files; HTML responses decoded and extracted, WET
text taken as it is, everything else skipped and counted by kind; damaged files named by file,
record and byte; preprocess and Beam reading a crawl with its URLs for the domain blocklist."""

import gzip
import json
import re
import zlib

import brotli
import pytest

from flaxlm.data import preprocess, sources
from flaxlm.data.source_warc import MAX_HTML_BYTES, _decompress, decode_html, iter_records


def record(kind: str, block: bytes, url: str | None = None, *fields: str) -> bytes:
    head = ["WARC/1.0", f"WARC-Type: {kind}", "WARC-Record-ID: <urn:uuid:0>"]
    head += [f"WARC-Target-URI: {url}"] if url else []
    if kind == "response":
        head.append("Content-Type: application/http; msgtype=response")
    head += [*fields, f"Content-Length: {len(block)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + block + b"\r\n\r\n"


def http(body: bytes, status: str = "200 OK", *fields: str) -> bytes:
    head = "".join(f + "\r\n" for f in [f"HTTP/1.1 {status}", *fields])
    return head.encode() + b"\r\n" + body


def html(body: str) -> bytes:
    return http(body.encode(), "200 OK", "Content-Type: text/html; charset=utf-8")


def chunked(data: bytes, size: int = 7) -> bytes:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


GOOD = "<html><head><title>Rivers</title></head><body><nav><a href='/'>Home</a></nav>"
GOOD += "<article><h1>Rivers</h1><p>The river bends near the café.</p></article>"
GOOD += "<footer>&copy; good.org</footer></body></html>"
GZIPPED = gzip.compress(b"<p>Blocked page text</p>")
LATIN = b"<p>Caf\xe9 cr\xe8me \x93quoted\x94</p>"  # (0x93/0x94: cp1252's curly quotes)
META = b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
META += b"</head><body><p>Na\xefve r\xe9sum\xe9</p></body></html>"

# (record, its document's text or None, why it is skipped)
CRAWL = [
    (record("warcinfo", b"software: test\r\nformat: WARC 1.0\r\n"), None, "warcinfo"),
    (record("request", b"GET /a HTTP/1.1\r\nHost: www.good.org\r\n\r\n", "https://www.good.org/a"),
     None, "request"),
    (record("response", html(GOOD), "https://www.good.org/a"),
     "Rivers\nThe river bends near the café.", ""),
    (record("metadata", b"fetchTimeMs: 12\r\n", "https://www.good.org/a"), None, "metadata"),
    (record("response", http(b"\x89PNG\r\n", "200 OK", "Content-Type: image/png"),
            "https://img.good.org/logo.png"), None, "response_not_html"),
    (record("response", http(b"<p>gone</p>", "404 Not Found", "Content-Type: text/html"),
            "https://www.good.org/missing"), None, "response_not_200"),
    (record("response", http(b"", "301 Moved Permanently", "Location: /b"),
            "https://www.good.org/old"), None, "response_not_200"),
    # chunked and gzip-encoded, as a server sent it
    (record("response", http(chunked(GZIPPED), "200 OK", "Content-Type: text/html",
                             "Transfer-Encoding: chunked", "Content-Encoding: gzip"),
            "http://sub.blocked.example/page"), "Blocked page text", ""),
    # latin-1 declared in the HTTP header: read as windows-1252, as browsers do
    (record("response", http(LATIN, "200 OK", "Content-Type: text/html; charset=ISO-8859-1"),
            "http://latin.example/"), "Café crème “quoted”", ""),
    # the charset of a <meta http-equiv>, no Content-Type charset
    (record("response", http(META, "200 OK", "Content-Type: text/html"), "http://meta.example/"),
     "Naïve résumé", ""),
    # no Content-Type at all: HTML by its first bytes; a URL in <> (WARC 1.0's grammar)
    (record("response", http(b"  <!DOCTYPE html><p>Sniffed page</p>"), "<http://sniff.example/>"),
     "Sniffed page", ""),
    (record("response", html("<p>One<p>Two<li>Three </div></span><b>Bold"),
            "http://broken.example/"), "One\nTwo\n- Three Bold", ""),
    (record("revisit", b"", "https://www.good.org/a", "WARC-Profile: identical-payload-digest"),
     None, "revisit"),
    (record("response", html("<nav><a href='/'>Home</a></nav>"), "http://empty.example/"),
     None, "no_text"),
    (record("response", b"example.com. 300 IN A 1.2.3.4", "dns:example.com",
            "Content-Type: text/dns"), None, "response_not_http"),
    (record("response", b"garbage\r\n\r\n<p>x</p>", "http://garbage.example/"),
     None, "response_bad_http"),
    (record("response", http(b"\xff\xff\xff\xff", "200 OK", "Content-Type: text/html",
                             "Content-Encoding: br"), "http://brotli.example/"),
     None, "response_bad_encoding"),  # (a corrupt brotli stream)
]  # fmt: skip
URLS = {
    3: "https://www.good.org/a", 8: "http://sub.blocked.example/page", 9: "http://latin.example/",
    10: "http://meta.example/", 11: "http://sniff.example/", 12: "http://broken.example/",
}  # fmt: skip
SKIPPED = {"warcinfo": 1, "request": 1, "metadata": 1, "revisit": 1, "response_not_html": 1,
           "response_not_200": 2, "no_text": 1, "response_not_http": 1, "response_bad_http": 1,
           "response_bad_encoding": 1}  # fmt: skip


def write(path, records, per_record_gzip=True):
    data = [r if isinstance(r, bytes) else r[0] for r in records]
    if not str(path).endswith(".gz"):
        path.write_bytes(b"".join(data))
    elif per_record_gzip:  # one gzip member a record, as Common Crawl writes them
        path.write_bytes(b"".join(map(gzip.compress, data)))
    else:
        path.write_bytes(gzip.compress(b"".join(data)))
    return str(path)


def read(path, strict=False):
    log = sources.BadInputLog(strict=strict)
    docs = list(sources.iter_documents(path, log=log))
    return docs, log


@pytest.mark.parametrize("name, per_record", [
    ("crawl.warc.gz", True), ("one-member.warc.gz", False), ("crawl.warc", True),
])  # fmt: skip
def test_a_crawl_gives_its_html_pages_main_text_with_urls(tmp_path, name, per_record):
    path = write(tmp_path / name, CRAWL, per_record)
    docs, log = read(path)
    want = [(n, text) for n, (_, text, _) in enumerate(CRAWL, 1) if text is not None]
    assert [(d.text, d.url) for d in docs] == [(t, URLS[n]) for n, t in want]
    assert [d.loc for d in docs] == [f"{path}:{n}" for n, _ in want]
    assert [d.key for d in docs] == [(0, n - 1) for n, _ in want]  # (skipped records counted)
    assert log.skipped == SKIPPED and log.total == 0
    assert log.to_dict()["skipped"] == SKIPPED
    assert sources.BadInputLog().to_dict() == {"counts": {}, "examples": {}}  # (as before)


def test_wet_records_are_taken_as_they_are(tmp_path):
    lang = "WARC-Identified-Content-Language: eng,fra"
    wet = [
        record("warcinfo", b"software: test\r\n"),
        record("conversion", "Title line\nBody text é\n".encode(), "https://a.org/", lang),
        record("conversion", b"", "https://empty.org/"),
        record("conversion", b"bad \xff byte", "https://bad.org/"),
        record("conversion", "\ufeffSecond page".encode(), "https://b.org/"),
    ]
    path = write(tmp_path / "CC-MAIN-0001.warc.wet.gz", wet)
    assert sources.file_format(path) == "warc"
    docs, log = read(path)
    assert [(d.text, d.url, d.loc) for d in docs] == [
        ("Title line\nBody text é\n", "https://a.org/", f"{path}:2"),
        ("Second page", "https://b.org/", f"{path}:5"),
    ]
    assert log.skipped == {"warcinfo": 1, "no_text": 1}
    assert log.counts == {"invalid_utf8": 1}  # bad input, as a jsonl line's would be
    assert log.examples["invalid_utf8"][0].startswith(f"{path}:4: invalid_utf8")
    with pytest.raises(sources.DataError, match=re.escape(f"{path}:4: invalid_utf8")):
        read(path, strict=True)  # (the skipped records did not raise)
    recs = list(iter_records(path))
    assert [r.type for r in recs] == ["warcinfo"] + ["conversion"] * 4
    assert recs[1].languages == ("eng", "fra") and recs[2].languages == ()
    assert recs[1].number == 2 and recs[1].offset == len(wet[0])  # (decompressed offsets)


def test_zstd_and_directories(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    blob = b"".join(r for r, _, _ in CRAWL[:3])
    (tmp_path / "a.warc.zst").write_bytes(zstandard.ZstdCompressor().compress(blob))
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "b.wet").write_bytes(record("conversion", b"WET text", "https://c.org/"))
    docs, log = read(str(tmp_path))  # a directory: its WARC files are data, its README is not
    assert [d.text for d in docs] == ["Rivers\nThe river bends near the café.", "WET text"]
    assert log.skipped == {"warcinfo": 1, "request": 1}
    assert sources.is_data_file("x.warc.wat.gz") and sources.file_format("X.WARC.GZ") == "warc"


def test_content_encodings_br_zstd_and_stacked(tmp_path):
    """Servers send pages brotli- or zstd-encoded (Content-Encoding: br, zstd), one coding over
    another ("gzip, br": br applied last, undone first); each page is read. A payload stored
    decoded under its coding's header is taken as it is; a corrupt one is counted; none
    expands past MAX_HTML_BYTES."""
    zstandard = pytest.importorskip("zstandard")
    page = b"<!DOCTYPE html><p>Encoded page text</p>"
    cases = {
        "br": brotli.compress(page),
        "zstd": zstandard.ZstdCompressor().compress(page),
        "gzip, br": brotli.compress(gzip.compress(page)),
        "deflate,zstd": zstandard.ZstdCompressor().compress(zlib.compress(page)),
        "identity": page,
    }
    for coding, body in cases.items():
        assert _decompress(body, coding) == page, coding
    assert _decompress(page, "br") == page  # stored decoded (no brotli stream, plainly HTML)
    assert _decompress(page, "zstd") == page  # (no zstd magic)
    assert _decompress(b"\xff\xff\xff\xff", "br") is None
    assert _decompress(b"\x28\xb5\x2f\xfd" + b"\xff" * 16, "zstd") is None
    assert _decompress(page, "compress") is None  # (a coding it does not know)
    big = b"<p>" + b"a" * (3 * MAX_HTML_BYTES)
    for coding, body in (("br", brotli.compress(big)),
                         ("zstd", zstandard.ZstdCompressor().compress(big))):  # fmt: skip
        assert len(body) < MAX_HTML_BYTES // 100  # (a small payload...)
        got = _decompress(body, coding)
        assert got == big[: len(got)] and MAX_HTML_BYTES <= len(got) < 2 * MAX_HTML_BYTES
    half = brotli.compress(big)[:2000]  # cut short: what it holds
    assert big.startswith(_decompress(half, "br")) and _decompress(half, "br")
    recs = [record("response", http(body, "200 OK", "Content-Type: text/html",
                                    f"Content-Encoding: {coding}"), f"http://e{k}.example/")
            for k, (coding, body) in enumerate(cases.items())]  # fmt: skip
    docs, log = read(write(tmp_path / "enc.warc.gz", recs))
    assert [d.text for d in docs] == ["Encoded page text"] * len(cases) and not log.skipped


def test_decode_html_charsets():
    assert decode_html("é".encode("cp1252")) == "é"  # not UTF-8: windows-1252
    assert decode_html("é€".encode()[:-1]) == "é"  # (UTF-8 cut inside a character)
    assert decode_html(b"abc\xe9") == "abcé"  # (no UTF-8 before it: a cp1252 character)
    assert decode_html(b"\xef\xbb\xbf\xc3\xa9", "text/html; charset=latin-1") == "é"  # BOM wins
    assert decode_html("é".encode("utf-16-le"), "text/html; charset=utf-16le") == "é"
    assert decode_html(b"<meta charset=utf-16><p>\xc3\xa9") == "<meta charset=utf-16><p>é"
    assert decode_html(b"\xe9", 'text/html; charset="nonsense"') == "é"  # unknown: sniffed


def _damage(tmp_path, name, blob):
    path = tmp_path / name
    path.write_bytes(blob)
    return str(path)


def test_damaged_files_name_the_file_record_and_byte(tmp_path):
    recs = [r for r, _, _ in CRAWL[:4]]
    at3 = len(recs[0]) + len(recs[1])  # where record 3 starts
    cases = {
        "cut.warc": (b"".join(recs)[: at3 + 200],
                     rf"cut\.warc:3: WARC record at byte {at3}: the file ends \d+ bytes into its "
                     rf"{len(html(GOOD))}-byte block \(truncated\?\)"),
        "version.warc": (recs[0] + b"WARC/2.0\r\n" + recs[1][10:],
                         rf"version\.warc:2: WARC record at byte {len(recs[0])}: not a WARC "
                         r"1\.0/1\.1 record: its first line is b'WARC/2\.0\\r\\n'"),
        "nolength.warc": (recs[0] + recs[1].replace(b"Content-Length", b"Content-Size"),
                          r"nolength\.warc:2: .* has no Content-Length"),
        "badlength.warc": (recs[0] + recs[1].replace(b"Content-Length: ", b"Content-Length: x"),
                           r"badlength\.warc:2: .*Content-Length 'x\d+' is not a byte count"),
        "short.warc": (recs[0] + recs[1].replace(b"Length: 39", b"Length: 29"),
                       rf"short\.warc:2: WARC record at byte {len(recs[0])}: its 29-byte block "
                       r"is followed by b'od.org\\r\\n', not an empty line \(a wrong "
                       r"Content-Length\?\)"),
        "header.warc": (recs[0] + recs[1][:40], r"header\.warc:2: .*ends inside its header"),
        "notwarc.warc": (b'{"text": "a jsonl file named .warc"}\n',
                         r"notwarc\.warc:1: WARC record at byte 0: not a WARC 1\.0/1\.1 record"),
    }  # fmt: skip
    members = [gzip.compress(r) for r in recs]
    corrupt = bytearray(members[2])
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 8] = b"\x00" * 8
    cases["corrupt.warc.gz"] = (
        members[0] + members[1] + bytes(corrupt) + members[3],
        rf"corrupt\.warc\.gz:3: WARC record at byte {at3} of the decompressed data: cannot "
        "decompress",
    )
    cases["cut.warc.gz"] = (b"".join(members)[:-30], r"cut\.warc\.gz:4: .*cannot decompress")
    for name, (blob, match) in cases.items():
        path = _damage(tmp_path, name, blob)
        with pytest.raises(sources.DataError, match=match):
            read(path)  # lenient too: the records after the damage cannot be found
    # the records before the damage were read
    log = sources.BadInputLog()
    docs = sources.iter_documents(str(tmp_path / "cut.warc"), log=log)
    with pytest.raises(sources.DataError):
        for _ in docs:
            pass
    assert log.skipped == {"warcinfo": 1, "request": 1}


@pytest.fixture
def crawl_gz(tmp_path):
    prose = [
        ("https://www.good.org/rivers", "The river runs through the valley and the town is on "
         "the bank of it, where the old bridge is."),
        ("http://sub.blocked.example/x", "This page is on a domain that the list blocks, with "
         "all of its subdomains and the pages that are on them."),
        ("https://fine.net/forest", "In the forest there are tall trees that grow with the "
         "light, and the path goes up to the top of the hill."),
    ]  # fmt: skip
    recs = [record("warcinfo", b"software: test\r\n")]
    for url, text in prose:
        page = html(f"<nav><a href='/'>Home</a></nav><p>{text}</p>")
        recs += [record("request", b"GET / HTTP/1.1\r\n\r\n", url), record("response", page, url)]
    recs.append(record("response", http(b"%PDF-1.4", "200 OK", "Content-Type: application/pdf"),
                       "https://fine.net/a.pdf"))  # fmt: skip
    path = write(tmp_path / "crawl.warc.gz", recs)
    block = tmp_path / "blocklist.txt"
    block.write_text("blocked.example\n")
    return path, str(block), [t for _, t in prose]


def test_preprocess_blocks_a_domain_of_a_crawl_without_url_field(tmp_path, crawl_gz):
    path, block, texts = crawl_gz
    out = tmp_path / "out"
    rep = preprocess.main(["--input", path, "--output", str(out),
                           f"--config.clean.blocked_domains={block}",
                           "--config.dedup.near=False", "--config.clean.min_words=1"])  # fmt: skip
    assert rep["documents_in"] == 3 and rep["removed"] == {"blocked_domain": 1}
    assert rep["stages"][1]["urls"] == {"checked": 3}  # (every document had its URL)
    skipped = {"warcinfo": 1, "request": 3, "response_not_html": 1}
    assert rep["stages"][0]["skipped"] == skipped
    assert json.loads((out / "report.json").read_text())["stages"][0]["skipped"] == skipped
    md = (out / "report.md").read_text()
    assert "Records read that are not documents (skipped, not bad input): request: 3, " in md
    assert "sub.blocked.example/x" in md  # (the blocked example names its URL)
    kept = [d.text for d in sources.iter_documents(str(out))]
    assert kept == [texts[0], texts[2]]
    # a jsonl input beside it has no URLs unless url_field names them: still refused, named
    jl = tmp_path / "more.jsonl"
    jl.write_text(json.dumps({"text": texts[0], "url": "https://x.org/"}) + "\n")
    with pytest.raises(SystemExit, match=f"needs url_field: .* in {re.escape(str(jl))} "):
        preprocess.main(["--input", path, str(jl), "--output", str(tmp_path / "o2"),
                         f"--config.clean.blocked_domains={block}"])  # fmt: skip


def test_beam_reads_a_crawl_as_the_cli_does(crawl_gz):
    beam = pytest.importorskip("flaxlm.data.beam")
    path, _, texts = crawl_gz
    out = list(beam._ReadFile(preprocess.preprocess_config()).process((4, path)))
    docs, stats = out[:-1], out[-1].value
    assert docs == [((4, 2), f"{path}:3", texts[0], "https://www.good.org/rivers"),
                    ((4, 4), f"{path}:5", texts[1], "http://sub.blocked.example/x"),
                    ((4, 6), f"{path}:7", texts[2], "https://fine.net/forest")]  # fmt: skip
    assert stats["read"]["in"] == 3 and stats["read"]["out"] == 3
    assert stats["read"]["skipped"] == {"warcinfo": 1, "request": 3, "response_not_html": 1}
    merged = beam.merge_stats(stats, stats)  # (per-file stats add up, skips too)
    assert merged["read"]["skipped"]["request"] == 6
