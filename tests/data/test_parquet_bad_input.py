"""Parquet inputs that cannot be read as text are DataErrors naming the file, as Arrow files'
are (tests/data/test_sources_arrow.py), in all three readers: the streaming reader
(`iter_documents`), the loader's random access (`open_source` / `ParquetSource`) and the
chat/preference records (`read_records`).

Checked: a text column that is not a string type (one error naming the file and column, not
every row counted as bad input), a column name given twice, a garbage, empty or truncated file,
a corrupt row group (the rows before it read, the error at the first row not read) and invalid
UTF-8 in a string column (pyarrow writes and reads it without complaint; the readers validate
every batch). Good files read exactly as before: as the same rows written as jsonl read, and a
chat file's records and "file:row" locations as `pq.read_table(path).to_pylist()` gave them.
Every parquet file is written here with pyarrow."""

import re

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from flaxlm.data import formats as F
from flaxlm.data import sources as S
from tests.data.test_sources_arrow import (  # noqa: F401 (template: a fixture used here)
    BAD,
    PAIRS,
    SFT,
    TEXTS,
    _chat,
    _table,
    docs_and_log,
    raises_in_each_reader,
    template,
    text_table,
    write_jsonl,
)

# (TEXTS: text rows with the bad ones the readers count; the chat records and the template,
# shared with the Arrow tests)
ROWS = S.ARROW_BATCH_ROWS  # rows the streaming readers read (and validate) at a time


def write_parquet(path, table, row_group_size: int | None = None) -> str:
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def read_all(src) -> list:
    return [src[i] for i in range(len(src))]


def invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding ``values``' bytes as they are (not checked as UTF-8)."""
    return pa.array(values, pa.binary()).view(pa.string())


# ---------------------------------------------------------------------------------------------
# Good files read as before


@pytest.mark.parametrize("encoding", ["string", "large_string", "dictionary"])
def test_good_parquet_text_reads_what_jsonl_reads(tmp_path, encoding):
    """Both text readers, row groups of 3 rows (a batch runs across them), each column type a
    text column may have: the documents, keys, locations and bad-row counts of the jsonl."""
    col = {
        "string": pa.array(TEXTS, pa.string()),
        "large_string": pa.array(TEXTS, pa.large_string()),
        "dictionary": pa.array(TEXTS).dictionary_encode(),
    }[encoding]
    jl = write_jsonl(tmp_path / "x.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    path = write_parquet(tmp_path / "x.parquet", text_table(col=col), row_group_size=3)
    want, want_log = docs_and_log(jl)
    docs, log = docs_and_log(path)
    assert [(d.text, d.key) for d in docs] == [(d.text, d.key) for d in want]
    assert [d.text for d in docs] == [t for t in TEXTS if t and t.strip()]
    assert [d.loc for d in docs] == [f"{path}:{r}" for r in (1, 4, 6, 7)]
    assert log.counts == want_log.counts == {k: len(v) for k, v in BAD.items()}
    assert log.examples == {k: [f"{path}:{r}: {k}" for r in v] for k, v in BAD.items()}
    want_log, log = S.BadInputLog(), S.BadInputLog()
    want_src, src = S.open_source(jl, log=want_log), S.open_source(path, log=log)
    assert isinstance(src, S.ParquetSource)
    assert read_all(src) == read_all(want_src) == [d.text for d in docs]
    assert log.counts == want_log.counts
    assert log.examples == {k: [f"{path}:{r}: {k}" for r in v] for k, v in BAD.items()}


def test_a_parquet_file_of_many_batches_reads_whole_and_in_order(tmp_path):
    """More rows than one batch, in row groups that do not line up with the batches."""
    texts = [f"doc {i}" for i in range(2 * ROWS + 5)]
    path = write_parquet(tmp_path / "big.parquet", text_table(texts), row_group_size=700)
    docs = list(S.iter_documents(path, log=S.BadInputLog(strict=True)))
    assert [d.text for d in docs] == texts
    assert [d.key[1] for d in docs] == list(range(len(texts)))
    assert docs[-1].loc == f"{path}:{len(texts)}"
    assert read_all(S.open_source(path, log=S.BadInputLog(strict=True))) == texts


def _no_nulls(records):
    return [{k: v for k, v in r.items() if v is not None} for r in records]


def _plain(example: dict) -> dict:
    """A rendered example, comparable: arrays as lists, without its file's location."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in example.items() if k != "loc"}


def test_good_chat_parquet_records_are_as_before(tmp_path, template):  # noqa: F811
    """Read batch by batch now: the same records (nulls and all) and "file:row" locations as
    the whole-table read gave, the jsonl's records once nulls are dropped (the chat format reads
    a null as absent), and the same rendered examples."""
    many = [{"prompt": f"the river {i}", "completion": "a forest", "margin": i % 3 or None}
            for i in range(2 * ROWS + 5)]  # fmt: skip
    for name, rows in (("sft", SFT), ("pairs", PAIRS), ("many", many)):
        jl = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        path = write_parquet(tmp_path / f"{name}.parquet", _table(rows), row_group_size=700)
        before = [(r, f"{path}:{i + 1}") for i, r in enumerate(pq.read_table(path).to_pylist())]
        report = F.DataReport()
        got = list(F.read_records(path, report))
        assert got == before
        assert [loc for _, loc in got] == [f"{path}:{i + 1}" for i in range(len(rows))]
        want = [r for r, _ in F.read_records(jl, F.DataReport())]
        assert _no_nulls(r for r, _ in got) == _no_nulls(want)
        assert report.read == len(rows)
    want, report = F.DataReport(), F.DataReport()
    out_jl = F.render_sft(F.read_records(str(tmp_path / "sft.jsonl"), want), template, 64,
                          report=want)  # fmt: skip
    out = F.render_sft(F.read_records(str(tmp_path / "sft.parquet"), report), template, 64,
                       report=report)  # fmt: skip
    assert len(out) == 3 and [ex["meta"] for ex in out] == [{"answer": "a"}, {}, {}]
    assert [_plain(ex) for ex in out] == [_plain(ex) for ex in out_jl]
    assert report.log.counts == want.log.counts == {"empty_assistant": 1}
    assert report.log.examples["empty_assistant"][0].startswith(f"{tmp_path}/sft.parquet:4: ")


# ---------------------------------------------------------------------------------------------
# A column that is not text


@pytest.mark.parametrize(
    "col, typ",
    [
        (pa.array([1, 2, 3]), "int64"),
        (pa.array([0.5, None, 2.0]), "double"),
        (pa.array([b"a b", b"c d", None], pa.binary()), "binary"),  # bytes, not UTF-8 text
        (pa.nulls(3), "null"),  # a column of nulls alone: no type to read as text
        (pa.array([["a"], ["b"], None]), "list<element: string>"),  # (as parquet names it)
    ],
    ids=["int64", "double", "binary", "null", "list"],
)  # fmt: skip
def test_a_non_string_text_column_is_one_error_naming_file_and_column(tmp_path, col, typ):
    """The streaming reader counted each row as "missing_field" (a whole file dropped as bad
    input, or stopping a strict run at row 1 for a wrong text_field); now, as the random-access
    reader (and an Arrow file) did, it is the file's one error, raised before any row."""
    path = write_parquet(tmp_path / "x.parquet", text_table(col=col))
    message = rf"^{re.escape(path)}: column 'text' has type {re.escape(typ)}, not string$"
    log = S.BadInputLog()
    with pytest.raises(S.DataError, match=message):
        next(S.iter_documents(path, log=log))
    assert log.total == 0  # no row was read, nor counted
    with pytest.raises(S.DataError, match=message):
        S.open_source(path)
    with pytest.raises(S.DataError, match=message):  # the class the loader builds, directly
        S.ParquetSource(path, "text", S.BadInputLog())


def test_chat_records_take_columns_of_any_type(tmp_path, template):  # noqa: F811
    """Not an error for the chat/preference reader: it reads whole rows without knowing which
    fields are texts (`data.fields` is applied after it), and numbers (`margin`), booleans
    (`label`) and lists of structs (`messages`) are columns of its records. A prompt column of
    numbers is bad input record by record, as the same jsonl's prompts are."""
    rows = [{"prompt": i, "completion": "a forest"} for i in range(3)]
    jl = write_jsonl(tmp_path / "x.jsonl", rows)
    path = write_parquet(tmp_path / "x.parquet", pa.Table.from_pylist(rows))
    assert [r for r, _ in F.read_records(path, F.DataReport())] == rows
    want, report = F.DataReport(), F.DataReport()
    assert F.render_sft(F.read_records(jl, want), template, 64, report=want) == []
    assert F.render_sft(F.read_records(path, report), template, 64, report=report) == []
    assert report.log.counts == want.log.counts and report.log.total == 3


def test_a_column_named_twice_is_an_error_naming_the_file(tmp_path):
    """Which of two "text" columns is the text is not guessed: the streaming reader read the
    first, the chat reader raised pyarrow's unnamed error (a row read as a dict would keep one
    value, the other unsaid), the random-access one said the file was unreadable."""
    twice = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    path = write_parquet(tmp_path / "twice.parquet", twice)
    message = r": column 'text' appears 2 times \(columns: \['text', 'text'\]\)$"
    raises_in_each_reader(path, message)
    # The chat reader's Arrow branch shares the check (to_pylist kept the last column's value).
    arrow = str(tmp_path / "twice.arrow")
    with ipc.new_stream(arrow, twice.schema) as w:
        w.write_table(twice)
    raises_in_each_reader(arrow, message, readers=("chat",))


# ---------------------------------------------------------------------------------------------
# Damaged files


def test_garbage_empty_and_truncated_parquet_files_are_errors_naming_them(tmp_path):
    """Only the streaming and random-access readers named the file; the chat reader raised
    pyarrow's "Could not open Parquet input source" ArrowInvalid."""
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b'{"text": "this is jsonl, not parquet"}\n')
    raises_in_each_reader(garbage, r": not a readable parquet file \(Parquet magic bytes")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    raises_in_each_reader(empty, r": not a readable parquet file \(Parquet file size is 0")
    whole = write_parquet(tmp_path / "whole.parquet", text_table([f"doc {i}" for i in range(40)]))
    data = open(whole, "rb").read()
    half = tmp_path / "half.parquet"  # cut in half: no footer, so not one row can be read
    half.write_bytes(data[: len(data) // 2])
    raises_in_each_reader(half, r": not a readable parquet file \(Parquet magic bytes")


def _corrupt_row_group(path, group: int, column: str = "text") -> None:
    """Overwrites the pages of ``column`` in row group ``group`` of ``path`` (its footer, which
    says where they are, stays whole)."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    names = [meta.column(j).path_in_schema for j in range(meta.num_columns)]
    chunk = meta.column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start : start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    open(path, "wb").write(bytes(data))


def test_a_corrupt_row_group_names_the_first_row_not_read(tmp_path):
    """Three row groups of one batch each, the third's text pages overwritten: the streaming and
    chat readers give the 2048 rows before it and then a DataError at row 2049 (the chat reader
    read the whole table first: no record, and pyarrow's OSError naming nothing); the
    random-access reader, which reads the column whole, names the file."""
    texts = [f"document number {i}" for i in range(3 * ROWS)]
    path = write_parquet(tmp_path / "rg.parquet", text_table(texts), row_group_size=ROWS)
    _corrupt_row_group(path, 2)
    message = rf"^{re.escape(path)}:{2 * ROWS + 1}: cannot read the parquet rows \("
    docs = []
    with pytest.raises(S.DataError, match=message):
        docs.extend(S.iter_documents(path, log=S.BadInputLog(strict=True)))
    assert [d.text for d in docs] == texts[: 2 * ROWS]
    records = []
    with pytest.raises(S.DataError, match=message):
        records.extend(F.read_records(path, F.DataReport()))
    assert [r["text"] for r, _ in records] == texts[: 2 * ROWS]
    assert records[-1][1] == f"{path}:{2 * ROWS}"
    with pytest.raises(S.DataError, match=rf"^{re.escape(path)}: not a readable parquet file"):
        S.open_source(path)


def test_invalid_utf8_in_a_parquet_string_column_is_an_error_naming_it(tmp_path):
    """pyarrow writes a string column's bytes unchecked, and reads them back unchecked (the
    read table is only found invalid by a full validation): the readers validate each batch, so
    the bytes are a DataError naming file:row (the first row of the batch holding them, as for
    an Arrow file), not the UnicodeDecodeError (streaming, chat) or ArrowInvalid (random access)
    that named nothing."""
    texts = [b"fine %d" % i for i in range(ROWS + 5)]
    texts[ROWS + 2] = b"z\xff\xfez"  # in the second batch (and row group)
    path = str(tmp_path / "bad.parquet")
    try:
        write_parquet(path, text_table(col=invalid_utf8(texts)), row_group_size=ROWS)
    except pa.ArrowInvalid:  # a later pyarrow may refuse to write it: nothing then to read
        pytest.skip("this pyarrow refuses to write invalid UTF-8 to parquet")
    table = pq.read_table(path)  # pyarrow itself reads the file without complaint
    assert table.num_rows == len(texts)
    with pytest.raises(pa.ArrowInvalid, match="Invalid UTF8"):
        table.validate(full=True)
    message = rf"^{re.escape(path)}:{ROWS + 1}: cannot read the parquet rows \(.*Invalid UTF8"
    docs = []
    with pytest.raises(S.DataError, match=message):
        docs.extend(S.iter_documents(path))
    assert len(docs) == ROWS  # the first batch's rows, all read
    raises_in_each_reader(path, rf":{ROWS + 1}: cannot read the parquet rows \(.*Invalid UTF8")
    # nested in a chat record: a message's content
    content = invalid_utf8([b"the river", b"a forest", b"tall trees", b"\xc3\x28"])
    turns = pa.StructArray.from_arrays(
        [pa.array(["user", "assistant"] * 2), content], names=["role", "content"]
    )
    messages = pa.ListArray.from_arrays(pa.array([0, 2, 4], pa.int32()), turns)
    path = str(tmp_path / "chat.parquet")
    try:
        write_parquet(path, pa.table({"messages": messages}))
    except pa.ArrowInvalid:  # (as above)
        pytest.skip("this pyarrow refuses to write invalid UTF-8 to parquet")
    raises_in_each_reader(path, r":1: cannot read the parquet rows \(", readers=("chat",))
