"""Domain blocklists: hosts read from URLs as a blocklist compares them, subdomains blocked and
look-alike names not, records' URLs read from every format, and preprocess / Beam dropping the
blocked documents with the report saying how many URLs were checked."""

import json
import os
import string

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from flaxlm.data import preprocess, sources
from flaxlm.data.clean import Cleaner, clean_config
from flaxlm.data.clean_url import DomainSet, host_of, load_domain_list, normalize_entry


@pytest.mark.parametrize("url, host", [
    ("https://www.Example.COM/a/b?q=1#x", "www.example.com"),
    ("http://user:pw@example.com:8080/", "example.com"),
    ("example.com/page.html", "example.com"),  # (dumps that drop the scheme)
    ("//cdn.example.com/x.js", "cdn.example.com"),
    ("https://example.com./", "example.com"),
    ("https://bücher.de/", "xn--bcher-kva.de"),
    ("http://192.168.0.1:80/x", "192.168.0.1"),
    ("http://[2001:db8::1]/", "2001:db8::1"),
    ("mailto:someone@example.com", None),
    ("javascript:void(0)", None),
    ("example.com:8080/x", "example.com"),
    ("", None),
    ("   ", None),
    ("http://[oops/", None),
])  # fmt: skip
def test_host_of(url, host):
    assert host_of(url) == host


def test_the_fast_path_reads_hosts_as_urlsplit_does():
    """Plain http(s) URLs skip urlsplit (most of a crawl's): the same host either way."""
    from urllib.parse import urlsplit

    rng = np.random.default_rng(0)
    letters = list(string.ascii_letters + string.digits + "-_")
    for _ in range(2000):
        labels = [
            "".join(rng.choice(letters, rng.integers(1, 8))) for _ in range(rng.integers(1, 4))
        ]
        host = ".".join(labels) + rng.choice(["", "."])
        scheme = rng.choice(["http://", "https://", "HTTP://", "//"])
        port, rest = rng.choice(["", ":8080", ":"]), rng.choice(["", "/", "/a/b", "?q=1", "#x"])
        url = scheme + host + port + rest
        want = urlsplit(url).hostname
        assert host_of(url) == (want.rstrip(".") if want else None), url


@pytest.mark.parametrize("line, domain", [
    ("example.com\n", "example.com"),
    ("*.Example.com", "example.com"),
    (".example.com", "example.com"),
    ("http://example.com:8080/path", "example.com"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("10.0.0.1", "10.0.0.1"),
    ("   # a comment", None),
    ("", None),
    ("ads.example.com  # trailing comment", "ads.example.com"),
])  # fmt: skip
def test_normalize_entry(line, domain):
    assert normalize_entry(line) == domain


@pytest.mark.parametrize("line", ["two words.com", "a..b.com", "-bad.com", "bad_.com!"])
def test_normalize_entry_refuses_what_is_no_domain(line):
    with pytest.raises(ValueError, match="not a domain"):
        normalize_entry(line)


def test_a_domain_blocks_its_subdomains_and_nothing_else():
    blocked = DomainSet(["example.com", "xxx", "10.0.0.1", "ads.site.org"])
    assert len(blocked) == 4
    for host in ("example.com", "www.example.com", "a.b.example.com", "anything.xxx",
                 "10.0.0.1", "ads.site.org", "x.ads.site.org"):  # fmt: skip
        assert blocked.blocks(host), host
    for host in ("notexample.com", "example.com.au", "example.co", "site.org", "10.0.0.10",
                 "0.0.1", "www.site.org", "xxx.com"):  # fmt: skip
        assert not blocked.blocks(host), host


def test_the_list_is_read_once_and_again_when_it_changes(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("# adult\nexample.com\n\n*.other.net\n")
    first = load_domain_list(str(f))
    assert load_domain_list(str(f)) is first and first.blocks("www.other.net")
    f.write_text("example.com\nthird.org\n")
    os.utime(f, ns=(1, 10**18))  # (a new mtime even within the clock's resolution)
    again = load_domain_list(f" {f} ")
    assert again is not first and again.blocks("third.org") and not again.blocks("other.net")
    g = tmp_path / "two.txt"
    g.write_text("fine.com\nnot a domain\n")
    with pytest.raises(sources.DataError, match=f"{g}:2: not a domain"):
        load_domain_list(f"{f},{g}")


def _doc(rng, n=80):
    stop = ["the", "of", "and", "to", "that", "with", "have", "be"]
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n)]
    for i in range(0, n, 5):
        words[i] = stop[i % 8]
    return " ".join(words).capitalize() + "."


def test_the_cleaner_drops_blocked_urls_first(tmp_path):
    f = tmp_path / "block.txt"
    f.write_text("bad.example\n")
    cfg = clean_config()
    cfg.blocked_domains = str(f)
    c = Cleaner(cfg)
    doc = _doc(np.random.default_rng(0))
    assert c(doc, "in.jsonl:1", "https://www.bad.example/p") is None
    assert c(doc, "in.jsonl:2", "https://good.example/p") is not None
    assert c(doc, "in.jsonl:3", None) is not None
    assert c("too short", "in.jsonl:4", "http://bad.example") is None  # (blocked, not short)
    rep = c.report()
    assert rep["removed"] == {"blocked_domain": 2}
    assert rep["examples"]["blocked_domain"][0] == "in.jsonl:1: https://www.bad.example/p"
    assert rep["urls"] == {"checked": 3, "no_url": 1}
    assert "urls" not in Cleaner(clean_config()).report()  # (no list: nothing counted)


def test_records_carry_their_url_in_every_format(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one", "url": "http://a.com"}\n{"text": "two"}\n'
                 '{"text": "three", "url": 7}\n{"text": "four", "url": " "}\n')  # fmt: skip
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"text": "five", "url": "http://b.com"}]))
    pqf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"url": ["http://c.com", None], "text": ["six", "seven"]}), str(pqf))
    nourl = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["eight"]}), str(nourl))
    fea = tmp_path / "e.feather"
    feather.write_feather(
        pa.table({"id": [1], "url": ["http://e.com"], "text": ["nine"]}), str(fea)
    )
    txt = tmp_path / "f.txt"
    txt.write_text("ten")
    paths = [str(p) for p in (j, arr, pqf, nourl, fea, txt)]
    got = [(d.text, d.url) for d in sources.iter_documents(paths, url_field="url")]
    assert got == [("one", "http://a.com"), ("two", None), ("three", None), ("four", None),
                   ("five", "http://b.com"), ("six", "http://c.com"), ("seven", None),
                   ("eight", None), ("nine", "http://e.com"), ("ten", None)]  # fmt: skip
    assert all(d.url is None for d in sources.iter_documents(paths))  # (not asked: none read)
    bad = tmp_path / "g.parquet"
    pq.write_table(pa.table({"text": ["x"], "url": [3]}), str(bad))
    with pytest.raises(sources.DataError, match="url"):
        list(sources.iter_documents(str(bad), url_field="url"))


@pytest.fixture
def crawl(tmp_path):
    rng = np.random.default_rng(1)
    urls = [
        "https://news.good.org/a",
        "https://www.bad.example/1",
        "http://bad.example/2",
        "https://notbad.example/3",
        "https://cdn.spam.net/x",
        None,
        "https://good.org/b",
    ]
    rows = [{"text": _doc(rng), "url": u} for u in urls]
    with open(tmp_path / "crawl.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    pq.write_table(pa.table({"text": [_doc(rng), _doc(rng)],
                             "url": ["https://spam.net/", "https://fine.net/"]}),
                   str(tmp_path / "more.parquet"))  # fmt: skip
    block = tmp_path / "ut1_adult.txt"
    block.write_text("# a blocklist\nbad.example\n*.spam.net\n")
    return [str(tmp_path / "crawl.jsonl"), str(tmp_path / "more.parquet")], str(block)


def test_preprocess_drops_blocked_domains(tmp_path, crawl):
    inputs, block = crawl
    over = [f"--config.clean.blocked_domains={block}", "--config.url_field=url"]
    rep = preprocess.main(["--input", *inputs, "--output", str(tmp_path / "out"), *over])
    assert rep["removed"] == {"blocked_domain": 4}
    clean = rep["stages"][1]
    assert clean["urls"] == {"checked": 8, "no_url": 1}
    assert rep["documents_out"] == 5
    md = (tmp_path / "out" / "report.md").read_text()
    assert "URLs checked against clean.blocked_domains: 8, 4 of them blocked" in md
    assert "bad.example/1" in md  # (an example names the URL)
    kept = [d.text for d in sources.iter_documents(str(tmp_path / "out"))]
    assert len(kept) == 5


def test_a_blocklist_without_url_field_or_with_a_bad_line_is_refused(tmp_path, crawl):
    inputs, block = crawl
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="clean.blocked_domains needs url_field"):
        preprocess.main(["--input", *inputs, "--output", str(out),
                         f"--config.clean.blocked_domains={block}"])  # fmt: skip
    bad = tmp_path / "bad.txt"
    bad.write_text("ok.com\nno good\n")
    with pytest.raises(SystemExit, match=f"clean.blocked_domains: {bad}:2: not a domain"):
        preprocess.main(["--input", *inputs, "--output", str(out), "--config.url_field=url",
                         f"--config.clean.blocked_domains={bad}"])  # fmt: skip
    with pytest.raises(SystemExit, match="clean.blocked_domains: cannot read"):
        preprocess.main(["--input", *inputs, "--output", str(out), "--config.url_field=url",
                         f"--config.clean.blocked_domains={tmp_path / 'missing.txt'}"])  # fmt: skip
    assert not out.exists()


def test_beam_drops_the_same_documents(tmp_path, crawl):
    beam_mod = pytest.importorskip("flaxlm.data.beam")
    inputs, block = crawl
    over = [f"--config.clean.blocked_domains={block}", "--config.url_field=url"]
    ref = preprocess.main(["--input", *inputs, "--output", str(tmp_path / "cli"), *over])
    got = beam_mod.main(["--input", *inputs, "--output", str(tmp_path / "beam"), *over,
                         "--num_shards=2", "--runner=DirectRunner"])  # fmt: skip
    assert got["removed"] == ref["removed"] and got["documents_out"] == ref["documents_out"]
    assert got["stages"][1]["urls"] == ref["stages"][1]["urls"]
    assert sorted(d.text for d in sources.iter_documents(str(tmp_path / "beam"))) == sorted(
        d.text for d in sources.iter_documents(str(tmp_path / "cli")))  # fmt: skip
