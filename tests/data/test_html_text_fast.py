"""The HTML tokenizer's fast path (data/html_text.py, ``_TreeBuilder.goahead``) gives the same
parser events as html.parser's own loop on seeded tag soup (odd whitespace, quotes, "/", "=",
entities, comments, script), and bench/warc_extract.py runs (its --tiny smoke mode, comparing
the module with itself)."""

import random

import pytest

from flaxlm.bench import warc_extract
from flaxlm.data import html_text

SEPS = [" ", "  ", "\t", "\n", "\r\n", "\f", "\x0b", "\xa0", "\u2003", "", "/", " / "]
NAMES = ["a", "href", "class", "data-x", "xml:lang", "_u", "aria-hidden", "@c", "v.b", "B", "é",
         'x"', "1a"]  # fmt: skip
VALUES = ['"v"', "'w'", "u", "/p", "x/", "", '"a>b"', "'&amp;x'", "a&lt;b", "&", "é", "`q`",
          "a=b", '"', "x'y", "&#169", '""', "''", '"x/"', "a\x00b"]  # fmt: skip
TAGS = ["div", "p", "A", "my-el", "svg:x", "td", "br", "script", "style", "h1", "x\xa0y", "a1",
        "Pre", "li"]  # fmt: skip
OTHER = ["text &amp; x", "</div>", "</ p >", "</script>", "</style >", "<!-- c -->", " ", "</A\n>",
         "</a x>", "<", "&", "&#", "<!DOCTYPE html>", "<?php x ?>", "<![CDATA[x]]>", "</", "<!--",
         "-->", "\x00", "é", "&lt", ">", "</p", "<a", "='w'"]  # fmt: skip


def _tag(rng: random.Random) -> str:
    s = "<" + rng.choice(TAGS)
    for _ in range(rng.randint(0, 4)):
        s += rng.choice(SEPS[:4] if rng.random() < 0.8 else SEPS) + rng.choice(NAMES)
        if rng.random() < 0.7:
            s += rng.choice(["=", " = ", "==", "\t=", "=\xa0"]) if rng.random() < 0.2 else "="
            s += rng.choice(VALUES)
    s += rng.choice(["", " ", "\n", "/", " /", "\xa0"]) if rng.random() < 0.4 else ""
    return s + (">" if rng.random() < 0.95 else "")


class _Recorder(html_text._TreeBuilder):
    def __init__(self):
        super().__init__()
        self.events = []

    def handle_starttag(self, tag, attrs):
        self.events.append(("start", tag, list(attrs)))
        super().handle_starttag(tag, attrs)

    def handle_startendtag(self, tag, attrs):
        self.events.append(("startend", tag, list(attrs)))
        super().handle_startendtag(tag, attrs)

    def handle_endtag(self, tag):
        self.events.append(("end", tag))
        super().handle_endtag(tag)

    def handle_data(self, data):
        self.events.append(("data", data))
        super().handle_data(data)

    def handle_comment(self, data):
        self.events.append(("comment", data))

    def handle_decl(self, data):
        self.events.append(("decl", data))

    def handle_pi(self, data):
        self.events.append(("pi", data))


def _events(page: str):
    parser = _Recorder()
    parser.feed(page)  # (as html_to_text feeds a page, then closes it)
    left = parser.rawdata
    if parser.rawdata.startswith("<"):
        parser.rawdata = ""
    parser.close()
    return parser.events, left


@pytest.mark.skipif(not html_text._FAST_LOOP, reason="another html.parser: its own loop runs")
def test_fast_path_gives_html_parsers_events(monkeypatch):
    rng = random.Random(0)
    for _ in range(3000):
        parts = [_tag(rng) if rng.random() < 0.6 else rng.choice(OTHER)
                 for _ in range(rng.randint(1, 10))]  # fmt: skip
        page = "".join(parts)
        fast = _events(page)
        monkeypatch.setattr(html_text, "_FAST_LOOP", False)
        slow = _events(page)
        monkeypatch.setattr(html_text, "_FAST_LOOP", True)
        assert fast == slow, page
        text = html_text.html_to_text(page)
        monkeypatch.setattr(html_text, "_FAST_LOOP", False)
        assert html_text.html_to_text(page) == text, page
        monkeypatch.setattr(html_text, "_FAST_LOOP", True)


def test_bench_smoke():
    res = warc_extract.main(["--tiny", "--baseline", html_text.__file__, "--check"])
    assert res["pages"] == 5 and res["identical_docs"] == 5
    assert res["read_mb_s"] > 0 and res["extract_mb_s"] > 0 and res["baseline_extract_mb_s"] > 0
