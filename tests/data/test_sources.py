"""Readers: jsonl / text / parquet / ArrayRecord, bad input counted (lenient) or raised (strict)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from flaxlm.data import sources as S

GOOD = ["first document", "第二个文档", "third one"]


def write_bad_jsonl(path):
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),
        b'{"text": "unterminated',  # line 2 malformed
        json.dumps({"text": GOOD[1]}, ensure_ascii=False).encode(),
        b'{"text": "bad \xff\xfe bytes"}',  # line 4 invalid UTF-8
        json.dumps({"body": "no text field"}).encode(),  # line 5
        json.dumps({"text": "   "}).encode(),  # line 6 empty
        json.dumps({"text": 42}).encode(),  # line 7 not a string
        b"",  # line 8 blank: a separator, not a record
        json.dumps({"text": GOOD[2]}).encode(),  # line 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_jsonl_lenient_counts_every_bad_line_with_location(tmp_path):
    path = write_bad_jsonl(tmp_path / "a.jsonl")
    log = S.BadInputLog()
    docs = list(S.iter_documents(path, log=log))
    assert [d.text for d in docs] == GOOD
    assert [d.loc for d in docs] == [f"{path}:1", f"{path}:3", f"{path}:9"]
    assert log.counts == {"malformed_json": 1, "invalid_utf8": 1, "missing_field": 2, "empty": 1}
    assert log.examples["malformed_json"][0].startswith(f"{path}:2: malformed_json")
    assert log.examples["invalid_utf8"][0].startswith(f"{path}:4:")
    assert len(docs) + log.total == 8  # nothing dropped silently


@pytest.mark.parametrize("strict_line", [2])
def test_jsonl_strict_raises_with_file_line(tmp_path, strict_line):
    path = write_bad_jsonl(tmp_path / "a.jsonl")
    with pytest.raises(S.DataError, match=rf"a\.jsonl:{strict_line}: malformed_json"):
        list(S.iter_documents(path, log=S.BadInputLog(strict=True)))


def test_text_modes(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("para one\nstill one\n\n\npara two\n\nbad \xff line\n\n".encode("latin-1"))
    log = S.BadInputLog()
    blocks = list(S.iter_documents(str(p), txt_mode="blank", log=log))
    assert [d.text for d in blocks] == ["para one\nstill one", "para two"]
    assert [d.loc for d in blocks] == [f"{p}:1", f"{p}:5"] and log.counts == {"invalid_utf8": 1}
    lines = list(S.iter_documents(str(p), txt_mode="line", log=S.BadInputLog()))
    assert [d.text for d in lines] == ["para one", "still one", "para two"]
    whole = S.BadInputLog()
    assert list(S.iter_documents(str(p), txt_mode="file", log=whole)) == []
    assert whole.counts == {"invalid_utf8": 1}


def test_parquet_streaming_and_random_access(tmp_path):
    path = str(tmp_path / "x.parquet")
    pq.write_table(
        pa.table({"text": ["a doc", None, "", "另一个", "last"], "n": [1, 2, 3, 4, 5]}),
        path,
        row_group_size=2,
    )
    log = S.BadInputLog()
    docs = list(S.iter_documents(path, log=log))
    assert [(d.text, d.loc) for d in docs] == [
        ("a doc", f"{path}:1"),
        ("另一个", f"{path}:4"),
        ("last", f"{path}:5"),
    ]
    assert log.counts == {"missing_field": 1, "empty": 1}
    src = S.open_source(path, log=S.BadInputLog())
    assert [src[i] for i in range(len(src))] == ["a doc", "另一个", "last"]
    with pytest.raises(S.DataError, match="no column 'body'"):
        list(S.iter_documents(path, text_field="body"))


def test_jsonl_random_access_matches_stream(tmp_path):
    path = write_bad_jsonl(tmp_path / "a.jsonl")
    log = S.BadInputLog()
    src = S.open_source(path, log=log)
    assert [src[i] for i in range(len(src))] == GOOD
    assert log.total == 5  # reported once, at open time


def test_arrayrecord_text_shards_and_globs(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(2):
        w = ArrayRecordWriter(str(d / f"part-{k}.arrayrecord"), "group_size:1")
        for t in GOOD:
            w.write(f"{k}:{t}".encode())
        w.close()
    docs = list(S.iter_documents(str(d / "*.arrayrecord")))
    assert [d_.text for d_ in docs] == [f"{k}:{t}" for k in range(2) for t in GOOD]
    assert docs[4].key == (1, 1)
    src = S.open_source(str(d))
    assert len(src) == 6 and src[4] == "1:第二个文档"
    with pytest.raises(FileNotFoundError, match="no files match"):
        S.expand_paths(str(tmp_path / "missing*.jsonl"))


def test_concat_source(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"text": t}) for t in ["a0", "a1"]))
    b.write_text("\n".join(json.dumps({"text": t}) for t in ["b0", "b1", "b2"]))
    src = S.open_source(str(tmp_path / "*.jsonl"))
    assert [src[i] for i in range(len(src))] == ["a0", "a1", "b0", "b1", "b2"]


def _jsonl_bytes(texts):
    return b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts)


def test_gzip_and_zstd_inputs_are_decompressed(tmp_path):
    """A .jsonl.gz was read as text: its 5 records counted as one invalid_utf8 document."""
    import gzip

    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(GOOD)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(GOOD)))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"line one\r\nline two\n"))
    # named by what it holds, not by its codec: the magic bytes say gzip
    (tmp_path / "d.jsonl").write_bytes(gzip.compress(_jsonl_bytes(["misnamed"])))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        log = S.BadInputLog()
        docs = list(S.iter_documents(str(tmp_path / name), log=log))
        assert [d.text for d in docs] == GOOD and log.total == 0
        assert docs[1].loc == f"{tmp_path / name}:2"
        src = S.open_source(str(tmp_path / name))  # no byte offsets: held in memory
        assert [src[i] for i in range(len(src))] == GOOD
    lines = S.iter_documents(str(tmp_path / "c.txt.gz"), txt_mode="line")
    assert [d.text for d in lines] == ["line one", "line two"]
    assert [d.text for d in S.iter_documents(str(tmp_path / "d.jsonl"))] == ["misnamed"]
    assert S.file_format("x.JSONL.GZ") == "jsonl" and S.file_format("x.txt.zst") == "text"


def test_unreadable_compression_is_an_error_naming_the_file(tmp_path):
    import gzip

    (tmp_path / "plain.jsonl.gz").write_bytes(_jsonl_bytes(GOOD))  # named .gz, not gzip
    (tmp_path / "a.jsonl.bz2").write_bytes(b"BZh91AY&SY...")
    (tmp_path / "b.jsonl").write_bytes(b"\xfd7zXZ\x00\x00rest")  # xz under a .jsonl name
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(GOOD * 50))[:60])
    cases = {
        "plain.jsonl.gz": r"plain\.jsonl\.gz: named \.gz but is not gzip-compressed",
        "a.jsonl.bz2": r"a\.jsonl\.bz2: bzip2-compressed input is not supported",
        "b.jsonl": r"b\.jsonl: xz-compressed input is not supported",
        "cut.jsonl.gz": r"cut\.jsonl\.gz:\d+: cannot decompress \(Compressed file ended",
    }
    for name, message in cases.items():
        with pytest.raises(S.DataError, match=message):
            list(S.iter_documents(str(tmp_path / name)))  # lenient: not counted as one bad doc


def test_text_lines_of_a_crlf_file_keep_no_carriage_return(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"first line\r\nsecond line\r\n\r\nthird\r\n")
    assert [d.text for d in S.iter_documents(str(p), txt_mode="line")] == [
        "first line",
        "second line",
        "third",
    ]


def test_dictionary_encoded_parquet_column_is_text(tmp_path):
    """pandas' categorical columns are dictionary<string>: the loader rejected them."""
    path = str(tmp_path / "dict.parquet")
    col = pa.array(["hello world", "second", "hello world", None]).dictionary_encode()
    pq.write_table(pa.table({"text": col}), path)
    log = S.BadInputLog()
    src = S.open_source(path, log=log)
    assert [src[i] for i in range(len(src))] == ["hello world", "second", "hello world"]
    assert log.counts == {"missing_field": 1}
    assert [d.text for d in S.iter_documents(path, log=S.BadInputLog())] == [
        src[i] for i in range(len(src))
    ]
    pq.write_table(pa.table({"text": pa.array([1, 2])}), path)
    with pytest.raises(S.DataError, match=r"column 'text' has type int64, not string"):
        S.open_source(path)


def test_a_preprocess_output_directory_reads_its_corpus_not_its_report(tmp_path):
    """data.sources=out/ trained on report.md and report.json as plain text."""
    out = tmp_path / "out"
    (out / "text").mkdir(parents=True)
    w = ArrayRecordWriter(str(out / "text" / "shard-00000.arrayrecord"), "group_size:1")
    for t in GOOD:
        w.write(t.encode())
    w.close()
    (out / "text" / S.META_FILE).write_text(json.dumps({"format": "text"}))
    (out / "report.json").write_text("{}")
    (out / "report.md").write_text("# Preprocess report\n")
    assert S.expand_paths(str(out)) == [str(out / "text" / "shard-00000.arrayrecord")]
    assert [d.text for d in S.iter_documents(str(out))] == GOOD
    (out / "tokens").mkdir()  # a run that tokenized: its token shards are the corpus
    (out / "tokens" / "shard-00000.arrayrecord").write_bytes(b"")
    assert S.expand_paths(str(out)) == [str(out / "tokens" / "shard-00000.arrayrecord")]
    # An ordinary directory is still its files.
    assert S.expand_paths(str(out / "text")) == [str(out / "text" / "shard-00000.arrayrecord")]


def test_a_directory_reads_its_data_files_only(tmp_path, caplog):
    """data.sources=DIR read every file in it: a README.md became a training document, and a
    Hadoop `_SUCCESS` marker and a hidden `.part-0.jsonl.crc` were counted as bad records."""
    import gzip

    d = tmp_path / "crawl"
    d.mkdir()
    (d / "part-0.jsonl").write_bytes(_jsonl_bytes(GOOD[:2]))
    (d / "part-1.JSONL.GZ").write_bytes(gzip.compress(_jsonl_bytes(GOOD[2:])))
    (d / "notes.txt").write_text("a plain text document")
    (d / "b.jsonl.bz2").write_bytes(b"BZh91AY&SY...")  # data, in a codec no reader has
    (d / "README.md").write_text("# My dataset\nThe crawl of 2024. Do not share.\n")
    (d / "_SUCCESS").write_text("")
    (d / ".part-0.jsonl.crc").write_bytes(b"crc\x00\x01\xff\xfe")
    (d / "sub").mkdir()
    with caplog.at_level("WARNING"):
        got = S.expand_paths(str(d))
    names = ["b.jsonl.bz2", "notes.txt", "part-0.jsonl", "part-1.JSONL.GZ"]
    assert got == [str(d / n) for n in names]
    assert f"{d}: skipped 1 file(s) that are not data (README.md)" in caplog.text
    assert "_SUCCESS" not in caplog.text and ".crc" not in caplog.text
    (d / "b.jsonl.bz2").unlink()  # else reading it is an error naming it
    log = S.BadInputLog()
    src = S.open_source(str(d), log=log)
    assert sorted(src[i] for i in range(len(src))) == sorted(GOOD + ["a plain text document"])
    assert log.total == 0
    # A skipped file is still read when named, and a directory of nothing else is an error.
    assert [x.text for x in S.iter_documents(str(d / "README.md"))][0].startswith("# My")
    e = tmp_path / "spark"
    e.mkdir()
    (e / "part-00000").write_text("text without a suffix\n")
    (e / "_SUCCESS").write_text("")
    with pytest.raises(FileNotFoundError, match=r"no data files in directory .*spark.* \(skipped "
                       r"\['part-00000'\]: not \.jsonl/.*; name the files, or match them with a "
                       r"glob such as '.*spark/\*'"):  # fmt: skip
        S.expand_paths(str(e))
    assert S.expand_paths(str(e / "part-*")) == [str(e / "part-00000")]
    # The glob that error suggests used to match the `_SUCCESS` marker too (an empty document,
    # or a bad record in a jsonl glob); a pattern that asks for `_` names still gets them.
    assert S.expand_paths(str(e / "*")) == [str(e / "part-00000")]
    assert S.expand_paths(str(e / "_*")) == [str(e / "_SUCCESS")]
    assert S.is_data_file("shard-00000.arrayrecord") and not S.is_data_file("meta.json")
