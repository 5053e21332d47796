"""Preference records that parse but carry no usable preference are counted, not trained on."""

import json

import pytest

from flaxlm.data import formats as F
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import train as train_tokenizer

WORDS = "the river and mountain have a forest of tall trees that grow with light".split()


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 320))


def test_identical_pairs_and_non_finite_margins_are_bad_input(tmp_path, template):
    rows = [
        {"prompt": "the river", "chosen": "a forest", "rejected": "tall trees"},
        {"prompt": "the river", "chosen": "a forest", "rejected": "a forest"},
        '{"prompt": "the river", "chosen": "a forest", "rejected": "light", "margin": NaN}',
        {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]  # fmt: skip
    path = tmp_path / "pref.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    report = F.DataReport()
    pairs = F.render_preferences(F.read_records(str(path), report), template, 64, report=report)
    assert [p["loc"] for p in pairs] == [f"{path}:1"]
    bad = report.to_dict()["bad_input"]
    assert bad["counts"] == {"identical_pair": 2, "bad_margin": 1}
    assert bad["examples"]["bad_margin"] == [f"{path}:3: bad_margin (margin=nan is not finite)"]
    strict = F.DataReport(strict=True)
    with pytest.raises(DataError, match=r"pref\.jsonl:2: identical_pair"):
        F.render_preferences(F.read_records(str(path), strict), template, 64, report=strict)


def test_a_bool_margin_a_late_system_turn_and_trailing_assistant_turns():
    """A boolean margin is no number (JSON's true read as a margin of 1.0); a system turn after
    the first message is refused, at index 1 too; an unpaired (KTO) record's completion is all
    of its trailing assistant turns, not only the last."""
    fields = F.fields_config()
    pair = {"prompt": "the river", "chosen": "a forest", "rejected": "tall trees"}
    for margin in (True, False):
        with pytest.raises(F.FormatError, match="is not a number") as e:
            F.preference_parts({**pair, "margin": margin}, fields)
        assert e.value.reason == "bad_margin"
    assert F.preference_parts({**pair, "margin": 2}, fields)[3] == 2.0
    user, system = {"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}
    one, two = {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}
    with pytest.raises(F.FormatError, match=r"messages\[1\]: a system message must come first"):
        F.sft_messages({"messages": [user, system, one]}, fields)
    rec = {"messages": [system, user, one, two], "label": False}
    assert F.unpaired_parts(rec, fields) == [([system, user], [one, two], False)]


def test_null_fields_of_a_mixed_parquet_file_are_absent(tmp_path, template):
    """Parquet gives every row every column, null where the row has none. A null field counted
    as present: prompt/completion rows next to messages rows were dropped as bad_messages,
    pairs without a margin as bad_margin, KTO's preference rows next to labelled chats as
    bad_label. Null is now absent (margin 0.0, meta {})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [{"role": "user", "content": "the river"}, {"role": "assistant", "content": "a forest"}]
    sft = pa.Table.from_pylist([
        {"messages": msgs, "prompt": None, "completion": None, "meta": {"answer": "a"}},
        {"messages": None, "prompt": "the river", "completion": "tall trees", "meta": None},
    ])  # fmt: skip
    pq.write_table(sft, tmp_path / "sft.parquet")
    report = F.DataReport()
    out = F.render_sft(F.read_records(str(tmp_path / "sft.parquet"), report), template, 64,
                       report=report)  # fmt: skip
    assert report.to_dict()["dropped"] == 0 and len(out) == 2
    assert [ex["meta"] for ex in out] == [{"answer": "a"}, {}]
    assert out[1]["messages"][-1]["content"] == "tall trees"

    pairs = pa.Table.from_pylist([
        {"prompt": "the river", "chosen": "a forest", "rejected": "light", "margin": 2.5},
        {"prompt": "the river", "chosen": "tall trees", "rejected": "light", "margin": None},
    ])  # fmt: skip
    pq.write_table(pairs, tmp_path / "pairs.parquet")
    report = F.DataReport()
    out = F.render_preferences(F.read_records(str(tmp_path / "pairs.parquet"), report),
                               template, 64, report=report)  # fmt: skip
    assert report.to_dict()["dropped"] == 0 and [p["margin"] for p in out] == [2.5, 0.0]

    kto = pa.Table.from_pylist([
        {"messages": msgs, "label": True, "prompt": None, "chosen": None, "rejected": None},
        {"messages": None, "label": None, "prompt": "the river", "chosen": "a forest",
         "rejected": "light"},
    ])  # fmt: skip
    pq.write_table(kto, tmp_path / "kto.parquet")
    report = F.DataReport()
    out = F.render_unpaired(F.read_records(str(tmp_path / "kto.parquet"), report), template, 64,
                            report=report)  # fmt: skip
    assert report.to_dict()["dropped"] == 0 and [e["label"] for e in out] == [True, True, False]


def test_a_meta_that_is_not_an_object_is_bad_input(tmp_path, template):
    """A `meta` that is not a JSON object used to become {} without a word (its reference
    answer lost); it is bad input "bad_meta" with file:line, in every reader."""
    chat = {"prompt": "the river", "completion": "a forest"}
    pair = {"prompt": "the river", "chosen": "a forest", "rejected": "light"}
    for name, row, render in (("sft", chat, F.render_sft), ("pairs", pair, F.render_preferences),
                              ("kto", {**chat, "label": True}, F.render_unpaired)):  # fmt: skip
        path = tmp_path / f"{name}.jsonl"
        rows = [{**row, "meta": {"answer": "7"}}, {**row, "meta": "7"}, {**row, "meta": None}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = F.DataReport()
        out = render(F.read_records(str(path), report), template, 64, report=report)
        assert [e["loc"] for e in out][:1] == [f"{path}:1"] and len(out) == 2, name
        bad = report.to_dict()["bad_input"]
        assert bad["counts"] == {"bad_meta": 1}, name
        assert bad["examples"]["bad_meta"] == [
            f"{path}:2: bad_meta (meta='7' is not a JSON object)"
        ], name


def test_a_json_file_holding_an_array_is_its_records(tmp_path, template):
    """A .json file holding one top-level JSON array (Alpaca style) was read as jsonl: every
    line of a pretty-printed one malformed_json ("22 of 22 records dropped"), a one-line one a
    single bad_record. Its elements are now the records, each located as file[index]; a .json
    file of JSON lines (what `datasets` writes) is still read by line."""
    import gzip

    rows = [{"prompt": f"the river {i}", "completion": f"a forest {i}"} for i in range(4)]
    paths = {"pretty.json": json.dumps(rows, indent=2), "oneline.json": json.dumps(rows),
             "bom.json": "\ufeff" + json.dumps(rows)}  # fmt: skip
    for name, text in paths.items():
        (tmp_path / name).write_text(text)
    with gzip.open(tmp_path / "packed.json.gz", "wt") as f:
        f.write(json.dumps(rows, indent=1))
    for name in [*paths, "packed.json.gz"]:
        path = str(tmp_path / name)
        report = F.DataReport()
        out = F.render_sft(F.read_records(path, report), template, 64, report=report)
        r = report.to_dict()
        assert (r["records"], r["used"], r["dropped"]) == (4, 4, 0), (name, r)
        assert [ex["loc"] for ex in out] == [f"{path}[{i}]" for i in range(4)]
        assert [ex["messages"][-1]["content"] for ex in out] == [x["completion"] for x in rows]
    lines = tmp_path / "lines.json"  # JSON lines under a .json name
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = F.DataReport()
    assert len(F.render_sft(F.read_records(str(lines), report), template, 64, report=report)) == 4
    # An element that is no record is counted where it is; an array that does not parse names
    # the file (not one malformed_json per line).
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([rows[0], "the river", {"prompt": "\ud800", "completion": "x"}]))
    report = F.DataReport()
    assert len(F.render_sft(F.read_records(str(mixed), report), template, 64,
                            report=report)) == 1  # fmt: skip
    assert report.to_dict()["bad_input"]["counts"] == {"bad_record": 1, "invalid_utf8": 1}
    assert report.to_dict()["bad_input"]["examples"]["bad_record"][0].startswith(f"{mixed}[1]: ")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows, indent=2)[:-3])
    with pytest.raises(DataError, match=rf"^{broken}: holds a JSON array .*does not parse"):
        list(F.read_records(str(broken), F.DataReport()))


def test_a_truncated_jsonl_line_names_its_own_fault(tmp_path):
    """The line's newline went to json.loads, so a record cut off mid-string was reported as
    an "Invalid control character" and a missing comma at "line 2 column 1" beside the file's
    own line number; the detail now says what is wrong in that line, and where."""
    from flaxlm.data.source_readers import _json_value
    from flaxlm.data.sources import BadInputLog

    log = BadInputLog(strict=False)
    for raw in (b'{"text": "unterminated\n', b'{"role": "user"\n'):
        assert _json_value(raw, "a.jsonl:2", log) == (False, None)
    details = str(log.examples)
    assert "Unterminated string starting at: column 10" in details
    assert "Expecting ',' delimiter: column 16" in details
    assert "control character" not in details and "line 2" not in details
