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
