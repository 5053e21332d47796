"""WARC reading and HTML main-text extraction throughput (data/source_warc.py, data/html_text.py).

    .venv/bin/python -m flaxlm.bench.warc_extract [--pages 120] [--kb 200] [--warc PATH]
        [--baseline OLD_HTML_TEXT.py] [--check] [--profile] [--tiny]

Builds a gzip WARC (one gzip member per record, as Common Crawl writes them) of synthetic but
realistic pages, seeded: a head with styles, scripts and meta tags, a header, a nav of link
lists, a cookie banner, an article of headings, paragraphs with inline markup, named and numeric
entities, comments, lists (nested, ordered), tables, ``<pre>`` code, figures, a share box,
related links, reader comments, a sidebar and a footer; some pages with broken markup (unclosed
``<p>``/``<li>``/``<td>``, stray end tags, XHTML ``<div/>``), some behind ``<main>`` only, some
a plain list of links. Each page is ``--kb`` KB or so; requests and metadata records sit between
the responses as in a crawl. ``--html-list`` builds it of real pages instead (a file naming
HTML files), ``--warc`` takes an existing WARC.

Measures (one process, the best of ``--repeat`` runs): reading alone (``iter_records`` keeping
what ``iter_warc`` keeps) and reading + extraction (``iter_warc``), as MB/s of WARC
(decompressed bytes) and pages/s. ``--baseline FILE`` also measures the extraction with another
html_text module in the same run (the one before the fast tokenizer path:
``git show d6aaa32:data/html_text.py > /tmp/old_html_text.py``), and ``--check`` asserts every
page's text is byte-identical under both. ``--profile`` prints the top of a cProfile of one
extraction pass. ``--tiny``: a few small pages, one run (the smoke test). Prints JSON.

Measured (2-core dev machine, CPU, Python 3.11.7, 2026-12-07, best of 3, old and new module in
the same run, at c4195c9; bench/RESULTS.md, "WARC HTML extraction"): the default 120 pages
(24.1 MB of WARC): reading 169 MB/s; extraction 2.15 MB/s (10.7 pages/s) before the fast
tokenizer path, 4.26 MB/s (21.3 pages/s) with it, 1.98x; 566 real HTML pages found on the
machine (57.2 MB): 2.50 -> 5.85 MB/s, 2.34x; texts byte-identical (``--check``).
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import importlib.util
import io
import json
import os
import pstats
import random
import tempfile
import time

from flaxlm.data import source_warc
from flaxlm.data.source_errors import BadInputLog

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "river water valley mountain glacier erosion sediment channel delta basin flood current bank "
    "meander oxbow tributary estuary rainfall drainage geology landscape climate season forest "
    "research measured survey century region northern southern coastal rapid gradual"
).split()
ACCENTED = ["café", "naïve", "résumé", "Zürich", "São Paulo", "Kraków", "façade", "Ærø", "東京"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&nbsp;", "&copy;", "&mdash;", "&#8217;",
            "&#x2014;", "&eacute;", "&hellip;", "&trade;", "&amp", "&bogus;", "&#169"]  # fmt: skip


def _sentence(rng: random.Random, n: int | None = None) -> str:
    words = [rng.choice(WORDS) for _ in range(n or rng.randint(6, 22))]
    if rng.random() < 0.3:
        words[rng.randrange(len(words))] = rng.choice(ACCENTED)
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(".!?.")


def _inline(rng: random.Random) -> str:
    """A paragraph's content: sentences with inline markup, entities, links and comments."""
    parts = []
    for _ in range(rng.randint(2, 7)):
        s = _sentence(rng)
        r = rng.random()
        if r < 0.15:
            s = f'<a href="/w/{rng.randint(1, 999)}" title="more">{s}</a>'
        elif r < 0.3:
            s = f"<em>{s}</em> <strong class='x'>{_sentence(rng, 3)}</strong>"
        elif r < 0.4:
            s = f"{s} {rng.choice(ENTITIES)} <code>x&lt;y</code>"
        elif r < 0.45:
            s = f"{s}<!-- editor note: {_sentence(rng, 4)} --> <span\n  data-x='1'>{s}</span>"
        elif r < 0.5:
            s = f"{s}<br>{_sentence(rng)}<sup>[{rng.randint(1, 40)}]</sup>"
        parts.append(s)
    sep = rng.choice([" ", "\n  ", "  \t", " \u00a0"])
    return sep.join(parts)


def _links(rng: random.Random, n: int, cls: str = "menu") -> str:
    items = "".join(
        f'<li class="item"><a href="/c/{rng.randint(1, 99999)}">{_sentence(rng, 2)[:-1]}</a></li>'
        for _ in range(n)
    )
    return f'<ul class="{cls}">{items}</ul>'


def _table(rng: random.Random, broken: bool) -> str:
    rows = []
    for _ in range(rng.randint(3, 12)):
        cells = "".join(
            (f"<td>{_sentence(rng, 3)}" if broken else f"<td> {_sentence(rng, 3)} </td>")
            for _ in range(rng.randint(2, 5))
        )
        rows.append(f"<tr>{cells}" if broken else f"<tr>{cells}</tr>\n")
    head = "<thead><tr><th>Name</th><th>Value &amp; unit</th></tr></thead>"
    return (
        f"<table class='data'><caption>{_sentence(rng, 4)}</caption>{head}<tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _list(rng: random.Random, depth: int = 0) -> str:
    tag = rng.choice(["ul", "ol"])
    items = []
    for _ in range(rng.randint(2, 6)):
        inner = _sentence(rng)
        if depth < 2 and rng.random() < 0.25:
            inner += _list(rng, depth + 1)
        items.append(f"<li>{inner}" + ("" if rng.random() < 0.2 else "</li>"))
    return f"<{tag}>" + "\n".join(items) + f"</{tag}>"


def _pre(rng: random.Random) -> str:
    lines = [f"    x{i} = {rng.randint(0, 99)} &lt;&lt; 2  # {_sentence(rng, 3)}" for i in range(8)]
    return "<pre><code>\n" + "\n".join(lines) + "\n</code></pre>"


def _article_block(rng: random.Random, broken: bool) -> str:
    r = rng.random()
    if r < 0.55:
        return f"<p>{_inline(rng)}" + ("" if broken and rng.random() < 0.3 else "</p>") + "\n"
    if r < 0.63:
        return f"<h{rng.randint(2, 4)} id='s{rng.randint(1, 99)}'>{_sentence(rng, 5)}</h2>\n"
    if r < 0.72:
        return _list(rng)
    if r < 0.78:
        return _table(rng, broken)
    if r < 0.82:
        return _pre(rng)
    if r < 0.86:
        return (f'<figure><img src="/i/{rng.randint(1, 99)}.png" alt="x"><figcaption>'
                f"{_sentence(rng)}</figcaption></figure>")  # fmt: skip
    if r < 0.9:
        return f"<blockquote><p>{_inline(rng)}</p></blockquote>"
    if r < 0.93:
        return "<div class='share-buttons'><a href='/s'>Share</a> <a href='/t'>Post</a></div>"
    if r < 0.96:
        return f"<div class='related'>{_links(rng, 5, 'teasers')}</div>"
    return f"<div><div><span>{_inline(rng)}</span></div></div><div/>"


def page(rng: random.Random, size: int) -> str:
    """One page of about ``size`` characters."""
    broken = rng.random() < 0.3
    layout = rng.choice(["article", "article", "main", "body", "links"])
    head = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_sentence(rng, 5)}</title><meta name='description' content='{_sentence(rng)}'>"
        "<link rel='stylesheet' href='/s.css'><style>body{margin:0} .a>p{color:#333}"
        " p:before{content:'<p>'}</style>"
        "<script type='text/javascript'>var s = '<div>' + 1 < 2 && x > 3; // </p>\n"
        "window.dataLayer=[];</script>"
        '<script type=\'application/ld+json\'>{"@type": "Article"}</script></head>\n'
    )
    top = (
        f"<body class='single {rng.choice(['has-sidebar', 'post', 'page'])}'>"
        f"<header class='site-header'><a href='/'>Site</a>{_links(rng, 8, 'nav-menu')}</header>"
        f"<nav>{_links(rng, rng.randint(10, 40))}</nav>"
        "<div id='cookie-banner' style='display: block'>We use cookies. <button>OK</button></div>"
        f"<div class='breadcrumb'><a href='/'>Home</a> &raquo; <a href='/x'>X</a></div>\n"
    )
    bottom = (
        f"<section id='comments'><h2>Comments</h2><p>{_inline(rng)}</p></section>"
        f"<aside class='sidebar'><h3>Popular</h3>{_links(rng, 15, 'popular')}</aside>"
        "<div hidden>hidden text</div><div aria-hidden='true'>aria hidden</div>"
        f"<footer><p>&copy; 2024 Site</p>{_links(rng, 12, 'footer-links')}</footer>"
        "<noscript>Enable JavaScript.</noscript><svg><text>icon</text></svg>"
        "<script>track();</script></body></html>"
    )
    body: list[str] = []
    n = len(head) + len(top) + len(bottom)
    while n < size:
        if layout == "links":
            b = f"<h2>{_sentence(rng, 3)}</h2>" + _links(rng, rng.randint(10, 30), "index")
        else:
            b = _article_block(rng, broken)
        if broken and rng.random() < 0.05:
            b += rng.choice(["</div>", "</span></b>", "<p>", "</li>", "<div/>"])
        body.append(b)
        n += len(b)
    main = "".join(body)
    if layout == "article":
        main = (f"<main><article class='post'><header><h1>{_sentence(rng, 6)}</h1>"
                f"<p class='byline'>By A. Writer</p></header>{main}</article></main>")  # fmt: skip
    elif layout == "main":
        main = f"<div id='page'><main id='content'>{main}</main></div>"
    else:
        main = f"<div class='content'>{main}</div>"
    return head + top + main + bottom


def _record(kind: str, block: bytes, url: str, *fields: str) -> bytes:
    head = ["WARC/1.0", f"WARC-Type: {kind}", "WARC-Record-ID: <urn:uuid:0>",
            f"WARC-Target-URI: {url}", *fields, f"Content-Length: {len(block)}"]  # fmt: skip
    return "\r\n".join(head).encode() + b"\r\n\r\n" + block + b"\r\n\r\n"


def build_warc(path: str, pages: int, kb: int, seed: int = 0, files: list[str] = ()) -> int:
    """Writes a per-record gzip WARC of ``pages`` generated HTML responses, or of the pages in
    ``files`` (as they are: no charset declared); returns its decompressed size."""
    rng = random.Random(seed)
    total = 0
    with open(path, "wb") as f:
        for i in range(len(files) or pages):
            url = f"https://site{i % 17}.example.org/p/{i}"
            if files:
                with open(files[i], "rb") as page_file:
                    body = page_file.read()
                ctype = b"text/html"
            else:
                body = page(rng, int(kb * 1000 * rng.uniform(0.5, 1.5))).encode("utf-8")
                ctype = b"text/html; charset=utf-8"
            http = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\n\r\n" + body
            recs = [
                _record("request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", url),
                _record("response", http, url, "Content-Type: application/http; msgtype=response"),
                _record("metadata", b"fetchTimeMs: 12\r\n", url),
            ]
            for r in recs:
                total += len(r)
                f.write(gzip.compress(r, 6))
    return total


def _load(path: str):
    spec = importlib.util.spec_from_file_location("_baseline_html_text", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path: str) -> int:
    n = 0
    for rec in source_warc.iter_records(path, source_warc._keep):
        n += rec.type == "response"
    return n


def _extract(path: str, html_to_text) -> list:
    """All documents of ``path`` with ``html_to_text`` as the extractor."""
    saved = source_warc.html_to_text
    source_warc.html_to_text = html_to_text
    try:
        return [(loc, text) for _, loc, text, _ in source_warc.iter_warc(path, BadInputLog())]
    finally:
        source_warc.html_to_text = saved


def _timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=120)
    p.add_argument("--kb", type=int, default=200, help="page size, KB (0.5x to 1.5x of it)")
    p.add_argument("--warc", help="an existing WARC to read instead of a generated one")
    p.add_argument("--html-list", help="a file naming HTML files (one a line): the pages")
    p.add_argument("--baseline", help="another html_text.py to measure in the same run")
    p.add_argument("--check", action="store_true", help="texts identical to --baseline's")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="5 pages of ~20 KB, one run (smoke)")
    args = p.parse_args(argv)
    if args.tiny:
        args.pages, args.kb, args.repeat = 5, 20, 1
    with tempfile.TemporaryDirectory() as tmp:
        path = args.warc
        if path is None:
            path = os.path.join(tmp, "bench.warc.gz")
            files = []
            if args.html_list:
                with open(args.html_list) as f:
                    files = [line.strip() for line in f if line.strip()]
            build_warc(path, args.pages, args.kb, files=files)
        with source_warc.open_bytes(path) as f:
            size = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
        t_read, pages = _timed(lambda: _read(path), args.repeat)
        t_new, docs = _timed(lambda: _extract(path, source_warc.html_to_text), args.repeat)
        res = {
            "warc_mb": round(size / 1e6, 2),
            "pages": pages,
            "read_mb_s": round(size / 1e6 / t_read, 1),
            "read_pages_s": round(pages / t_read, 1),
            "extract_mb_s": round(size / 1e6 / t_new, 2),
            "extract_pages_s": round(pages / t_new, 2),
        }
        if args.baseline:
            old = _load(args.baseline).html_to_text
            t_old, old_docs = _timed(lambda: _extract(path, old), args.repeat)
            res["baseline_extract_mb_s"] = round(size / 1e6 / t_old, 2)
            res["baseline_extract_pages_s"] = round(pages / t_old, 2)
            res["speedup"] = round(t_old / t_new, 2)
            if args.check:
                assert len(old_docs) == len(docs)
                bad = [a[0] for a, b in zip(old_docs, docs, strict=True) if a != b]
                assert not bad, f"texts differ: {bad[:5]}"
                res["identical_docs"] = len(docs)
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(_extract, path, source_warc.html_to_text)
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
