"""A researcher's own raw files, as they come (found by the source-readers review): cut zstd
streams, tar archives, one file named by two data parts, long lines, wide parquet files,
nested directories, and plain text with a BOM and CRLF line ends."""

import gzip
import io
import json
import logging
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxlm.data import formats as F
from flaxlm.data import sources as S


def _jsonl(n, start=0):
    return b"".join(json.dumps({"text": f"document {i} " * 8}).encode() + b"\n"
                    for i in range(start, start + n))  # fmt: skip


def test_a_cut_zstd_file_is_an_error_naming_its_line_not_a_shorter_corpus(tmp_path):
    """zstandard's stream reader ended a cut stream as a clean end of file: half the corpus
    was read as the whole, with one malformed_json (jsonl) or nothing at all (text)."""
    zstandard = pytest.importorskip("zstandard")
    frame = zstandard.ZstdCompressor().compress(_jsonl(3000))
    (tmp_path / "whole.jsonl.zst").write_bytes(frame + zstandard.ZstdCompressor().compress(
        _jsonl(5, start=3000)))  # fmt: skip
    (tmp_path / "cut.jsonl.zst").write_bytes(frame[: len(frame) // 2])
    (tmp_path / "cut.txt.zst").write_bytes(frame[: len(frame) // 2])
    (tmp_path / "cut_second.jsonl.zst").write_bytes(frame + frame[: len(frame) // 2])
    whole = [d.text for d in S.iter_documents(str(tmp_path / "whole.jsonl.zst"))]
    assert len(whole) == 3005 and whole[-1] == "document 3004 " * 8  # both frames, whole
    for name, mode in [("cut.jsonl.zst", "file"), ("cut_second.jsonl.zst", "file"),
                       ("cut.txt.zst", "file"), ("cut.txt.zst", "line")]:  # fmt: skip
        path = str(tmp_path / name)
        cut = rf"{name}:\d+: cannot decompress \(zstd stream ended before the end of its last"
        with pytest.raises(S.DataError, match=cut):
            list(S.iter_documents(path, txt_mode=mode, log=S.BadInputLog()))
    with pytest.raises(S.DataError, match=r"cut\.jsonl\.zst:\d+: cannot decompress"):
        list(F.read_records(str(tmp_path / "cut.jsonl.zst"), F.DataReport()))


def test_a_cut_gzip_chat_file_names_its_line(tmp_path):
    path = tmp_path / "chat.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(2000))[:3000])
    with pytest.raises(S.DataError, match=r"chat\.jsonl\.gz:\d+: cannot decompress"):
        list(F.read_records(str(path), F.DataReport()))


def test_a_tar_archive_is_refused_under_any_name(tmp_path):
    """.tgz and .tar.gz were gunzipped and their tar headers and NUL padding read as text."""
    member = tmp_path / "one.txt"
    member.write_text("first file text\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(member, arcname="one.txt")
    archive = buf.getvalue()
    (tmp_path / "corpus.tgz").write_bytes(gzip.compress(archive))
    (tmp_path / "corpus.tar.gz").write_bytes(gzip.compress(archive))
    (tmp_path / "renamed.txt.gz").write_bytes(gzip.compress(archive))  # by its header
    (tmp_path / "renamed.txt").write_bytes(archive)
    for name in ("corpus.tgz", "corpus.tar.gz", "renamed.txt.gz", "renamed.txt"):
        for mode in ("file", "line"):
            with pytest.raises(S.DataError, match=rf"{name}: a tar archive is not read"):
                list(S.iter_documents(str(tmp_path / name), txt_mode=mode))
    # plain gzip text is still text
    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress(b"hello there\n"))
    assert [d.text for d in S.iter_documents(str(tmp_path / "plain.txt.gz"))] == ["hello there\n"]


def test_a_file_named_by_two_data_parts_is_read_once(tmp_path, caplog):
    """data.train=d/*.jsonl,d/a.jsonl trained a.jsonl's records twice."""
    from flaxlm.alignment import common

    (tmp_path / "a.jsonl").write_bytes(_jsonl(3))
    (tmp_path / "b.jsonl").write_bytes(_jsonl(2, start=3))
    report = F.DataReport()
    with caplog.at_level(logging.WARNING):
        recs = common.records(f"{tmp_path}/*.jsonl,{tmp_path}/a.jsonl", None, report)
    assert [loc for _, loc in recs] == [f"{tmp_path}/a.jsonl:{i}" for i in (1, 2, 3)] + [
        f"{tmp_path}/b.jsonl:{i}" for i in (1, 2)
    ]
    assert report.read == 5
    assert f"{tmp_path}/a.jsonl named again" in caplog.text


def test_a_very_long_jsonl_line_reads_whole_at_random_access(tmp_path):
    long_text = "word " * 100_000  # 500 kB: several 64 KiB reads
    path = tmp_path / "long.jsonl"
    path.write_bytes(json.dumps({"text": "short"}).encode() + b"\n"
                     + json.dumps({"text": long_text}).encode())  # no final newline  # fmt: skip
    src = S.open_source(str(path))
    assert [src[i] for i in range(len(src))] == ["short", long_text]


def test_parquet_random_access_reads_only_the_text_column(tmp_path, monkeypatch):
    """pq.read_table(path) loaded every column (a 400 MB blob column: 1.35 GB resident)."""
    path = str(tmp_path / "wide.parquet")
    pq.write_table(pa.table({"text": ["a b", "c d"], "blob": [b"x" * 1000, b"y" * 1000]}), path)
    asked = []
    read_table = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda p, **kw: asked.append(kw) or read_table(p, **kw))
    src = S.open_source(path)
    assert [src[i] for i in range(len(src))] == ["a b", "c d"]
    assert asked == [{"columns": ["text"]}]
    with pytest.raises(S.DataError, match=r"wide\.parquet: no column 'body' \(columns: "):
        S.open_source(path, text_field="body")


def test_a_directory_says_its_subdirectories_are_not_read(tmp_path, caplog):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(_jsonl(1))
    (d / "sub" / "b.jsonl").write_bytes(_jsonl(1))
    with caplog.at_level(logging.WARNING):
        assert S.expand_paths(str(d)) == [str(d / "a.jsonl")]
    assert "subdirectories are not read (sub/)" in caplog.text and "**" in caplog.text
    only_sub = tmp_path / "nested"
    (only_sub / "part").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"subdirectories are not read: \['part/'\]"):
        S.expand_paths(str(only_sub))


def test_plain_text_drops_a_bom_and_reads_crlf_as_newlines(tmp_path):
    """jsonl dropped a leading BOM; plain text kept it (a BOM-only first line was a document)
    and kept "\\r" in whole-file and blank-line documents."""
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbf\r\nfirst para\r\nstill first\r\n\r\nsecond\r\n")
    by_mode = {m: [d.text for d in S.iter_documents(str(path), txt_mode=m)]
               for m in ("file", "line", "blank")}  # fmt: skip
    assert by_mode == {
        "file": ["\nfirst para\nstill first\n\nsecond\n"],
        "line": ["first para", "still first", "second"],
        "blank": ["first para\nstill first", "second"],
    }


def test_a_jsonl_line_nested_past_the_recursion_limit_is_a_malformed_record(tmp_path):
    """A RecursionError's traceback ended the run (a crafted or corrupt line of a web dump)."""
    from flaxlm.data.source_readers import read_json_array

    path = tmp_path / "deep.jsonl"
    deep = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text(json.dumps({"text": "before"}) + "\n" + deep + "\n"
                    + json.dumps({"text": "after"}) + "\n")  # fmt: skip
    log = S.BadInputLog()
    assert [d.text for d in S.iter_documents(str(path), log=log)] == ["before", "after"]
    assert log.counts == {"malformed_json": 1}
    assert "nested too deeply" in log.examples["malformed_json"][0]
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(S.DataError, match=r"deep\.json: holds a JSON array nested too deeply"):
        read_json_array(str(array))


def test_zstd_reads_of_any_size_return_the_bytes_in_order(tmp_path):
    """The reader hands out a decoded 64 KiB chunk (here 4 MB of one repeated line) piece by
    piece, across frame ends; each read returns the next bytes, none twice or skipped."""
    zstandard = pytest.importorskip("zstandard")
    from flaxlm.data.source_codecs import _ZstdFrames

    first = b"the same line again\n" * 200_000
    second = b"a line of the second frame\n" * 1000
    path = tmp_path / "two.txt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(first)
                     + zstandard.ZstdCompressor().compress(second))  # fmt: skip
    reader, out, sizes = _ZstdFrames(str(path), zstandard.ZstdDecompressor()), [], [1, 7, 4096]
    while chunk := reader.read(sizes[len(out) % 3]):
        assert len(chunk) <= sizes[len(out) % 3]
        out.append(chunk)
    reader.close()
    assert b"".join(out) == first + second
    lines = [d.text for d in S.iter_documents(str(path), txt_mode="line")]
    assert len(lines) == 201_000 and lines[0] == "the same line again"
