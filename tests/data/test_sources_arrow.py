"""Arrow IPC inputs (.arrow / .feather: the stream format HF `datasets` writes, and the file
format, Feather v2) read as the same rows written as jsonl read: the streaming reader
(`iter_documents`, bad rows counted at path:row), the loader's random access (`open_source`,
dictionary-encoded and other string columns too), the chat/preference records, and the
preprocess CLI. A missing or non-string column and a damaged file are DataErrors naming the
file. Every .arrow file is written here with pyarrow."""

import json
import pickle
import re

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from flaxlm.data import formats as F
from flaxlm.data import preprocess
from flaxlm.data import sources as S
from flaxlm.data.tokenizer import train as train_tokenizer

# Text rows with the bad ones the readers count: a null (missing_field), "" and blanks (empty).
TEXTS = ["a first doc", None, "", "另一个 document", "   \n", "the fifth", "last one"]
BAD = {"missing_field": [2], "empty": [3, 5]}  # 1-based rows


def write_arrow(path, table, kind: str, batch_rows: int = 2) -> str:
    """`table` as an Arrow IPC `kind` ("stream" | "file") file of `batch_rows`-row batches."""
    new = ipc.new_stream if kind == "stream" else ipc.new_file
    with new(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(batch)
    return str(path)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_table(texts=TEXTS, col=None) -> pa.Table:
    """A "text" column beside another column the readers must not need."""
    col = pa.array(texts) if col is None else col
    return pa.table({"id": pa.array(range(len(col)), pa.int64()), "text": col})


def docs_and_log(path, **kw):
    log = S.BadInputLog()
    docs = list(S.iter_documents(path, log=log, **kw))
    return docs, log


def test_arrow_names_are_arrow_files():
    """`.arrow`/`.feather` (any case) are Arrow, and data in a directory; they were "text"."""
    assert S.file_format("data-00000-of-00001.arrow") == "arrow"
    assert S.file_format("x.FEATHER") == "arrow" and S.file_format("x.arrows") == "text"
    assert S.is_data_file("train.arrow") and S.is_data_file("t.feather")


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_streaming_arrow_reads_what_jsonl_reads(tmp_path, kind):
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    jl = write_jsonl(tmp_path / "x.jsonl", rows)
    arrow = write_arrow(tmp_path / "x.arrow", text_table(), kind)
    want, want_log = docs_and_log(jl)
    docs, log = docs_and_log(arrow)
    assert [(d.text, d.key) for d in docs] == [(d.text, d.key) for d in want]
    assert [d.text for d in docs] == [t for t in TEXTS if t and t.strip()]
    assert [d.loc for d in docs] == [f"{arrow}:{r}" for r in (1, 4, 6, 7)]
    assert log.counts == want_log.counts == {k: len(v) for k, v in BAD.items()}
    assert log.examples == {k: [f"{arrow}:{r}: {k}" for r in v] for k, v in BAD.items()}
    strict = S.BadInputLog(strict=True)  # strict: the first bad row, by its location
    with pytest.raises(S.DataError, match=rf"^{re.escape(arrow)}:2: missing_field$"):
        list(S.iter_documents(arrow, log=strict))


def test_a_feather_file_and_a_directory_of_arrow_files_are_read(tmp_path):
    """The name alone says Arrow: a Feather v2 file, and the .arrow shards of a directory (HF's
    save_to_disk names them data-0000i-of-0000n.arrow; they used to be skipped as not data)."""
    feather = write_arrow(tmp_path / "x.feather", text_table(), "file")
    assert [d.text for d in S.iter_documents(feather, log=S.BadInputLog())][:1] == ["a first doc"]
    d = tmp_path / "ds"
    d.mkdir()
    for i, texts in enumerate([["one", "two"], ["three"]]):
        write_arrow(d / f"data-{i:05d}-of-00002.arrow", text_table(texts), "stream")
    # with the JSON files save_to_disk writes beside them: descriptions, not records
    (d / "dataset_info.json").write_text(json.dumps({"features": {"text": {}}}))
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "x.arrow"}]}))
    log = S.BadInputLog(strict=True)
    assert [x.text for x in S.iter_documents(str(d), log=log)] == ["one", "two", "three"]
    src = S.open_source(str(d), log=S.BadInputLog(strict=True))
    assert [src[i] for i in range(len(src))] == ["one", "two", "three"]
    other = tmp_path / "plain"  # (a state.json among jsonl files is still data)
    other.mkdir()
    (other / "state.json").write_text(json.dumps({"text": "a record"}) + "\n")
    assert [x.text for x in S.iter_documents(str(other))] == ["a record"]


def test_one_large_batch_is_read_whole_and_in_order(tmp_path):
    """A file written as one batch larger than the rows made Python strings at a time."""
    texts = [f"doc {i}" for i in range(2 * S.ARROW_BATCH_ROWS + 5)]
    path = write_arrow(tmp_path / "big.arrow", text_table(texts), "stream", batch_rows=len(texts))
    docs = list(S.iter_documents(path))
    assert [d.text for d in docs] == texts
    assert [d.key[1] for d in docs] == list(range(len(texts)))
    assert docs[-1].loc == f"{path}:{len(texts)}"
    reader = S.open_arrow(path, "text")
    assert [len(b) for b in S.arrow_batches(path, reader)] == [S.ARROW_BATCH_ROWS] * 2 + [5]


def _encodings():
    """The string columns the readers take, each with TEXTS' values and nulls."""
    out = {
        "string": pa.array(TEXTS, pa.string()),
        "large_string": pa.array(TEXTS, pa.large_string()),
        "dictionary": pa.array(TEXTS).dictionary_encode(),
    }
    if hasattr(pa, "string_view"):
        out["string_view"] = pa.array(TEXTS, pa.string_view())
    return out


@pytest.mark.parametrize("kind", ["stream", "file"])
@pytest.mark.parametrize("encoding", sorted(_encodings()))
def test_random_access_arrow_reads_what_jsonl_reads(tmp_path, kind, encoding):
    col = _encodings()[encoding]
    jl = write_jsonl(tmp_path / "x.jsonl", [{"text": t} for t in TEXTS])
    arrow = write_arrow(tmp_path / "x.arrow", text_table(col=col), kind)
    want_log, log = S.BadInputLog(), S.BadInputLog()
    want = S.open_source(jl, log=want_log)
    src = S.open_source(arrow, log=log)
    assert isinstance(src, S.ArrowSource)
    assert [src[i] for i in range(len(src))] == [want[i] for i in range(len(want))]
    assert len(src) == 4 and src[1] == "另一个 document"
    assert log.counts == want_log.counts  # reported once, at open time, at path:row
    assert log.examples == {k: [f"{arrow}:{r}: {k}" for r in v] for k, v in BAD.items()}
    again = pickle.loads(pickle.dumps(src))  # to grain's worker processes, without the file
    assert [again[i] for i in range(len(again))] == [src[i] for i in range(len(src))]
    # the streaming reader takes the same column types (a dictionary-encoded one included)
    assert [d.text for d in S.iter_documents(arrow)] == [src[i] for i in range(len(src))]


def test_arrow_beside_jsonl_in_one_source(tmp_path):
    jl = write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl"}])
    arrow = write_arrow(tmp_path / "b.arrow", text_table(["from arrow", ""]), "stream")
    log = S.BadInputLog()
    src = S.open_source([jl, arrow], log=log)
    assert [src[i] for i in range(len(src))] == ["from jsonl", "from arrow"]
    assert log.examples == {"empty": [f"{arrow}:2: empty"]}


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_missing_and_non_string_columns_name_the_file(tmp_path, kind):
    path = write_arrow(tmp_path / "x.arrow", text_table(), kind)
    p = re.escape(path)
    with pytest.raises(S.DataError, match=rf"^{p}: no column 'body' \(columns: \['id', 'text'\]"):
        list(S.iter_documents(path, text_field="body"))
    with pytest.raises(S.DataError, match=rf"^{p}: no column 'body'"):
        S.open_source(path, text_field="body")
    # A number column is not text: one error for the file, not each row counted as bad input.
    with pytest.raises(S.DataError, match=rf"^{p}: column 'id' has type int64, not string$"):
        list(S.iter_documents(path, text_field="id"))
    with pytest.raises(S.DataError, match=rf"^{p}: column 'id' has type int64, not string$"):
        S.open_source(path, text_field="id")
    # two columns of the name: which is the text is not guessed
    twice = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    path = write_arrow(tmp_path / "twice.arrow", twice, kind)
    with pytest.raises(S.DataError, match=rf"^{re.escape(path)}: column 'text' appears 2 times"):
        list(S.iter_documents(path))
    dict_ints = pa.table({"text": pa.array([1, 2, 1]).dictionary_encode()})
    path = write_arrow(tmp_path / "d.arrow", dict_ints, kind)
    with pytest.raises(S.DataError, match=r"column 'text' has type dictionary<values=int64"):
        S.open_source(path)


def raises_in_each_reader(path, message, readers=("stream", "random", "chat")):
    """Each of ``readers`` (streaming, random access, chat records) raises a DataError matching
    ``^{path}{message}``."""
    p = re.escape(str(path))
    for reader in readers:
        with pytest.raises(S.DataError, match=rf"^{p}{message}"):
            if reader == "stream":
                list(S.iter_documents(str(path)))
            elif reader == "random":
                S.open_source(str(path))
            else:
                list(F.read_records(str(path), F.DataReport()))


def test_damaged_arrow_files_are_errors_naming_them(tmp_path):
    check = raises_in_each_reader
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b'{"text": "this is jsonl, not Arrow"}\n')
    check(garbage, ": not a readable Arrow file")
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    check(empty, ": not a readable Arrow file")

    table = text_table([f"document number {i}" for i in range(40)])
    whole = (tmp_path / "s.arrow", tmp_path / "f.arrow")
    write_arrow(whole[0], table, "stream", batch_rows=10)
    write_arrow(whole[1], table, "file", batch_rows=10)
    # a stream cut mid-batch: its schema and first batches read, the rest cannot be counted
    cut = tmp_path / "cut_stream.arrow"
    data = whole[0].read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 4])
    check(cut, r":\d+: cannot read the Arrow rows")
    # the file format cut short has no footer: its own error, not the stream reader's
    cut = tmp_path / "cut_file.arrow"
    data = whole[1].read_bytes()
    cut.write_bytes(data[: len(data) - 20])
    check(cut, r": not a readable Arrow file \(Not an Arrow file\)")


def test_invalid_utf8_in_an_arrow_file_is_an_error_naming_it(tmp_path):
    """IPC reading does not check string bytes: a batch is validated before its rows are used
    (to_pylist raised UnicodeDecodeError with no file named)."""
    good = text_table(["fine", "zzzz"])
    path = write_arrow(tmp_path / "bad.arrow", good, "stream", batch_rows=10)
    data = open(path, "rb").read()
    assert data.count(b"zzzz") == 1
    with open(path, "wb") as f:
        f.write(data.replace(b"zzzz", b"z\xff\xfez"))
    with pytest.raises(S.DataError, match=rf"^{re.escape(path)}:1: cannot read the Arrow rows"):
        list(S.iter_documents(path))
    with pytest.raises(S.DataError, match=rf"^{re.escape(path)}:1: cannot read the Arrow rows"):
        S.open_source(path)


# ---------------------------------------------------------------------------------------------
# Chat / preference records

WORDS = "the river and mountain have a forest of tall trees that grow with light".split()


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 320))


def _chat(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


SFT = [
    {"messages": _chat("the river", "a forest"), "meta": {"answer": "a"}},
    {"messages": [{"role": "system", "content": "be brief"}, *_chat("tall trees", "light")]},
    {"prompt": "the mountain", "completion": "grow with light"},  # other columns: null in Arrow
    {"messages": _chat("the river", "   ")},  # bad input: an empty assistant turn
]
PAIRS = [
    {"prompt": "the river", "chosen": "a forest", "rejected": "light", "margin": 1.5},
    {"prompt": "the river", "chosen": "tall trees", "rejected": "light"},
]


def _table(rows) -> pa.Table:
    """`rows` as a table of every column any row has (from_pylist takes the first row's)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _plain(value):
    """A rendered example, comparable: arrays (a pair's (ids, mask) too) as lists, without its
    file's location."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "loc"}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_chat_records_from_arrow_equal_jsonl(tmp_path, kind, template):
    for name, rows in (("sft", SFT), ("pairs", PAIRS)):
        jl = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        arrow = write_arrow(tmp_path / f"{name}.arrow", _table(rows), kind)
        want_report, report = F.DataReport(), F.DataReport()
        want = list(F.read_records(jl, want_report))
        got = list(F.read_records(arrow, report))
        assert [loc for _, loc in got] == [f"{arrow}:{i + 1}" for i in range(len(rows))]
        # Arrow gives every row every column (null where the jsonl row has none): the same
        # record once nulls are dropped, as the chat format reads a null (`has`)
        assert [{k: v for k, v in r.items() if v is not None} for r, _ in got] == [
            {k: v for k, v in r.items() if v is not None} for r, _ in want
        ]
        assert report.read == want_report.read == len(rows)
    sft_jl, sft_arrow = (F.DataReport(), F.DataReport())
    out_jl = F.render_sft(F.read_records(str(tmp_path / "sft.jsonl"), sft_jl), template, 64,
                          report=sft_jl)  # fmt: skip
    out = F.render_sft(F.read_records(str(tmp_path / "sft.arrow"), sft_arrow), template, 64,
                       report=sft_arrow)  # fmt: skip
    assert len(out) == 3 and [ex["meta"] for ex in out] == [{"answer": "a"}, {}, {}]
    assert [_plain(ex) for ex in out] == [_plain(ex) for ex in out_jl]
    assert sft_arrow.log.counts == sft_jl.log.counts == {"empty_assistant": 1}
    assert sft_arrow.log.examples["empty_assistant"][0].startswith(f"{tmp_path}/sft.arrow:4: ")
    pr_jl, pr = F.DataReport(), F.DataReport()
    pairs = F.render_preferences(F.read_records(str(tmp_path / "pairs.arrow"), pr), template,
                                 64, report=pr)  # fmt: skip
    pairs_jl = F.render_preferences(F.read_records(str(tmp_path / "pairs.jsonl"), pr_jl),
                                    template, 64, report=pr_jl)  # fmt: skip
    assert [p["margin"] for p in pairs] == [p["margin"] for p in pairs_jl] == [1.5, 0.0]
    assert [_plain(p) for p in pairs] == [_plain(p) for p in pairs_jl]
    assert [p["loc"] for p in pairs] == [f"{tmp_path}/pairs.arrow:{i}" for i in (1, 2)]


def test_chat_records_name_formats_they_read(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text("not records\n")
    with pytest.raises(S.DataError, match=r"must be \.jsonl, \.json, \.parquet or \.arrow"):
        list(F.read_records(str(path), F.DataReport()))


# ---------------------------------------------------------------------------------------------
# The preprocess CLI


def _doc(i: int, n: int = 30) -> str:
    """A distinct English-looking document (passes the default cleaning filters)."""
    ws = [WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] + str(i * 100 + k) for k in range(n)]
    for k in range(0, n, 3):
        ws[k] = ("the", "and", "of", "with", "that")[k % 5]
    return " ".join(ws) + "."


def _main(*argv):
    return preprocess.main([*argv, "--config.dedup.near=False", "--config.clean.min_words=1"])


def test_preprocess_reads_an_arrow_input_as_its_jsonl(tmp_path):
    texts = [_doc(i) for i in range(6)] + [None, "", _doc(2)]  # two bad rows, one duplicate
    jl = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    arrow = write_arrow(tmp_path / "in.arrow", text_table(texts), "stream", batch_rows=4)
    want = _main("--input", jl, "--output", str(tmp_path / "out_jsonl"))
    rep = _main("--input", arrow, "--output", str(tmp_path / "out_arrow"))
    assert rep["documents_out"] == want["documents_out"] == 6
    assert rep["documents_in"] == want["documents_in"]
    assert json.loads((tmp_path / "out_arrow" / "report.json").read_text())["documents_out"] == 6

    def written(out, report):  # the cleaned text the run wrote, in its order
        return [
            d.text for d in S.iter_documents([str(tmp_path / out / s) for s in report["shards"]])
        ]

    assert written("out_arrow", rep) == written("out_jsonl", want)
