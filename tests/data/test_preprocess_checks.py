"""Preprocess CLI and its readers: settings checked before --overwrite deletes anything, .json
array files read as records, decontamination's eval-set counts and the report, a truncated .gz
named at its line, and Beam refusing what it does not do (tokenizer training)."""

import gzip
import json
import logging
import os

import pytest

from flaxlm.data import preprocess
from flaxlm.data import sources as S

WORDS = "river mountain forest light water stone cloud field garden valley bridge tower".split()


def doc(i: int, n: int = 30) -> str:
    """A distinct English-looking document (passes the default cleaning filters)."""
    ws = [WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] + str(i * 100 + k) for k in range(n)]
    for k in range(0, n, 3):
        ws[k] = ("the", "and", "of", "with", "that")[k % 5]
    return " ".join(ws) + "."


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": doc(i)}) + "\n" for i in range(6)))
    return str(path)


def _main(*argv):
    return preprocess.main([*argv, "--config.dedup.near=False", "--config.clean.min_words=1"])


# ---------------------------------------------------------------------------------------------
# --overwrite: every setting is checked before the old output is deleted.


@pytest.mark.parametrize(
    "override,error,message",
    [
        # (one line from the CLI, before anything is written: SystemExit with the message)
        ("--config.dedup.bands=500", SystemExit, r"dedup\.bands must be in"),
        (
            "--config.tokenizer=/nonexistent/tok.model",
            SystemExit,
            r"^tokenizer: cannot read .*tok\.model",
        ),
        ("--config.clean.scripts=('latn',)", SystemExit, r"clean\.scripts: unknown"),
        ("--config.train_tokenizer_vocab=100", SystemExit, "train_tokenizer_vocab=100"),
        ("--config.tokenizer_model_type=BPE", SystemExit, "tokenizer_model_type"),
    ],
)
def test_overwrite_with_a_bad_setting_keeps_the_earlier_output(
    tmp_path, jsonl, override, error, message
):
    out = tmp_path / "out"
    first = _main("--input", jsonl, "--output", str(out))
    before = sorted(os.listdir(out / "text"))
    with pytest.raises(error, match=message):
        _main("--input", jsonl, "--output", str(out), "--overwrite", override)
    assert sorted(os.listdir(out / "text")) == before
    assert json.loads((out / "report.json").read_text())["documents_out"] == first["documents_out"]


def _snapshot(out) -> dict:
    """Every file under ``out`` (relative path -> bytes)."""
    return {
        os.path.relpath(os.path.join(root, f), out): open(os.path.join(root, f), "rb").read()
        for root, _, files in os.walk(out)
        for f in files
    }


def test_an_overwrite_that_fails_later_puts_the_earlier_run_back(tmp_path, jsonl):
    """--overwrite deleted the earlier output before the new run started: one that failed part
    way (a truncated .gz found after its first documents) left only its own partial text/."""
    out = tmp_path / "out"
    from flaxlm.data.tokenizer import train

    tok = str(tmp_path / "tok.model")
    train([doc(i) for i in range(40)], 400, model_path=tok)
    _main("--input", jsonl, "--output", str(out), f"--config.tokenizer={tok}")
    earlier = _snapshot(out)
    assert {"report.json", "report.md", "tokenizer.model"} <= set(earlier)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(_truncated_gzip(200))
    with pytest.raises(SystemExit, match="cannot decompress"):
        _main("--input", str(bad), "--output", str(out), "--overwrite")
    assert _snapshot(out) == earlier  # byte for byte, and nothing of the failed run's text/
    # An overwrite that uses the earlier run's tokenizer keeps it (and writes its ids).
    _main("--input", jsonl, "--output", str(out), "--overwrite", f"--config.tokenizer={tok}")
    again = str(out / "tokenizer.model")
    rep = _main(
        "--input", jsonl, "--output", str(out), "--overwrite", f"--config.tokenizer={again}"
    )
    assert rep["shards"] == ["tokens/shard-00000.arrayrecord"] and os.path.exists(again)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no set-aside copy left


def test_an_overwrite_with_an_empty_result_keeps_the_earlier_run(tmp_path, jsonl, capsys):
    out = tmp_path / "out"
    _main("--input", jsonl, "--output", str(out))
    earlier = _snapshot(out)
    with pytest.raises(SystemExit, match="survived .why: the report above.; the earlier run"):
        _main("--input", jsonl, "--output", str(out), "--overwrite", "--config.clean.max_words=3")
    assert "too_long: 6" in capsys.readouterr().out  # the empty run's report, printed
    assert _snapshot(out) == earlier


def test_an_interrupted_overwrite_puts_the_earlier_run_back(tmp_path, jsonl, monkeypatch):
    """Ctrl-C (any exception) in the new run puts the earlier one back at once."""
    out = tmp_path / "out"
    _main("--input", jsonl, "--output", str(out))
    earlier = _snapshot(out)
    real_run = preprocess.run

    def interrupted(inputs, out_dir, cfg, **kw):
        os.makedirs(os.path.join(out_dir, "text"))
        open(os.path.join(out_dir, "text", "shard-00000.arrayrecord"), "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _main("--input", jsonl, "--output", str(out), "--overwrite")
    assert _snapshot(out) == earlier
    monkeypatch.setattr(preprocess, "run", real_run)


def test_a_killed_overwrite_is_mended_by_the_next_run(tmp_path, jsonl, caplog):
    """A run killed with the earlier one set aside (SIGKILL: no except clause runs) left it
    hidden in .previous-run-PID; the next preprocess into the directory puts it back first."""
    from flaxlm.data import preprocess_aside

    out = tmp_path / "out"
    _main("--input", jsonl, "--output", str(out), "--config.train_tokenizer_vocab=300")
    earlier = _snapshot(out)
    aside = preprocess_aside.set_aside(str(out))  # what the killed run did first, then it wrote:
    os.makedirs(out / "text")
    (out / "text" / "shard-00000.arrayrecord").write_bytes(b"partial")
    (out / "tokenizer.model").write_bytes(b"a tokenizer the killed run trained")
    assert sorted(os.listdir(out)) == [os.path.basename(aside), "text", "tokenizer.model"]
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit, match="already holds"):
        _main("--input", jsonl, "--output", str(out))  # no --overwrite: refused, after mending
    assert "putting back the earlier run" in caplog.text
    assert _snapshot(out) == earlier and not os.path.exists(aside)


def test_a_set_aside_run_is_removed_once_the_overwrite_had_finished(tmp_path, jsonl):
    """Killed after writing its report.json, before deleting the set-aside copy: that copy is
    stale, and the finished run stays."""
    from flaxlm.data import preprocess_aside

    out = tmp_path / "out"
    _main("--input", jsonl, "--output", str(out))
    aside = preprocess_aside.set_aside(str(out))
    new = tmp_path / "new"  # the new run's outputs, as the killed run had written them
    _main("--input", jsonl, "--output", str(new), "--config.shard_docs=2")
    for name in os.listdir(new):
        os.rename(new / name, out / name)
    later = _snapshot(out)
    with pytest.raises(SystemExit, match="already holds"):
        _main("--input", jsonl, "--output", str(out))
    assert not os.path.exists(aside)
    assert _snapshot(out) == {k: v for k, v in later.items() if not k.startswith(".")}


def test_tokenizer_model_type_is_checked_before_the_first_pass(tmp_path, jsonl):
    """A misspelt model type failed only after the whole clean/dedup pass, blaming
    train_tokenizer_vocab, and left out/text behind (so the corrected rerun refused)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^tokenizer_model_type must be bpe\|unigram, got 'BPE'"):
        _main("--input", jsonl, "--output", str(out), "--config.train_tokenizer_vocab=400",
              "--config.tokenizer_model_type=BPE")  # fmt: skip
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# .json files holding one JSON array.


def _array_file(path, texts, **extra):
    with open(path, "w") as f:
        json.dump([{"text": t, **extra} for t in texts], f, indent=2)
    return str(path)


def test_a_json_array_file_is_read_as_its_records(tmp_path):
    """json.dump(records, indent=2) was read as JSON lines: every record lost, each of its
    lines counted as malformed JSON."""
    texts = [doc(i) for i in range(10)]
    path = _array_file(tmp_path / "docs.json", texts)
    log = S.BadInputLog()
    docs = list(S.iter_documents(path, log=log))
    assert [d.text for d in docs] == texts and log.total == 0
    assert [d.loc for d in docs[:2]] == [f"{path}[0]", f"{path}[1]"]
    assert [d.key for d in docs[:2]] == [(0, 0), (0, 1)]  # element index: the resume position
    src = S.open_source(path)  # the loader's random access (an uncompressed file, too)
    assert [src[i] for i in range(len(src))] == texts
    gz = tmp_path / "docs.json.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    assert [d.text for d in S.iter_documents(str(gz))] == texts
    # A .json of JSON lines (what `datasets` writes) is still lines.
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert [d.loc for d in S.iter_documents(str(lines))][1] == f"{lines}:2"


def test_a_json_array_files_bad_records_are_counted_at_their_index(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([{"text": doc(0)}, {"txt": "x"}, "a string", {"text": "  "}]))
    log = S.BadInputLog()
    assert len(list(S.iter_documents(str(path), log=log))) == 1
    assert log.counts == {"missing_field": 2, "empty": 1}
    assert log.examples["missing_field"][0].startswith(f"{path}[1]: missing_field")
    path.write_text('[{"text": "a"},\n {"text": "b"')
    with pytest.raises(S.DataError, match=rf"^{path}: holds a JSON array .*does not parse"):
        list(S.iter_documents(str(path)))


def test_preprocess_and_decontamination_read_json_array_files(tmp_path, jsonl):
    texts = [doc(i) for i in range(100, 120)]
    arr = _array_file(tmp_path / "docs.json", texts)
    rep = _main("--input", jsonl, arr, "--output", str(tmp_path / "out"))
    assert rep["documents_in"] == 26 and rep["documents_out"] == 26 and rep["removed"] == {}
    ev = _array_file(tmp_path / "eval.json", [" ".join(texts[3].split()[5:25])])
    rep = _main("--input", jsonl, arr, "--output", str(tmp_path / "out2"),
                f"--config.dedup.decontam_paths={ev}")  # fmt: skip
    assert rep["removed"] == {"contaminated": 1}


# ---------------------------------------------------------------------------------------------
# Decontamination: what the eval set gave, in the report; flagged documents in report.md.


def _ngrams(text: str, n: int) -> set:
    ws = text.lower().split()
    return {tuple(ws[k : k + n]) for k in range(len(ws) - n + 1)}


def test_eval_items_too_short_to_match_are_counted_and_warned(tmp_path, jsonl, caplog):
    """An eval item shorter than decontam_ngram words never matches (the rule); that was
    silent, even when no eval item could match at all."""
    long_item = " ".join(doc(3).split()[2:22])  # 20 words: 8 13-grams, one in doc 3
    short = [" ".join(doc(i).split()[:10]) for i in range(4)]  # 10 words: shorter than 13
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"text": t}) + "\n" for t in [long_item, *short]))
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        rep = _main("--input", jsonl, "--output", str(tmp_path / "o1"),
                    f"--config.dedup.decontam_paths={ev}")  # fmt: skip
    want = {"eval_texts": 5, "ngrams": len(_ngrams(long_item, 13)), "too_short": 4, "ngram": 13}
    assert rep["stages"][2]["decontam"] == want
    assert rep["removed"] == {"contaminated": 1}  # doc 3 holds the long item; the rule is kept
    assert json.loads((tmp_path / "o1" / "report.json").read_text())["stages"][2]["decontam"]
    md = (tmp_path / "o1" / "report.md").read_text()
    assert "5 eval text(s)" in md and "4 shorter than 13 words" in md, md
    assert "4 of the 5 eval text(s)" in caplog.text and "dedup.decontam_ngram=13" in caplog.text
    caplog.clear()
    ev.write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        rep = _main("--input", jsonl, "--output", str(tmp_path / "o2"),
                    f"--config.dedup.decontam_paths={ev}")  # fmt: skip
    assert rep["stages"][2]["decontam"] == {**want, "eval_texts": 4, "ngrams": 0}
    assert "no 13-word n-gram" in caplog.text and "matches nothing" in caplog.text
    # Without decontam_paths: no such section, and no warning.
    caplog.clear()
    rep = _main("--input", jsonl, "--output", str(tmp_path / "o3"))
    assert "decontam" not in rep["stages"][2] and "decontam" not in caplog.text


def test_plain_text_eval_files_hold_one_item_per_line(tmp_path, jsonl, caplog):
    """A .txt eval set was read as one item (whatever txt_mode the training input had): its
    items' n-grams ran across their boundaries and the too-short count and warning never came.
    One item per line now (dedup.decontam_txt_mode), "file" still reads it whole."""
    short = [" ".join(doc(i).split()[:10]) for i in range(3)]  # 10 words each: < 13
    ev = tmp_path / "eval.txt"
    ev.write_text("".join(t + "\n" for t in short))
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        rep = _main("--input", jsonl, "--output", str(tmp_path / "o1"),
                    f"--config.dedup.decontam_paths={ev}")  # fmt: skip
    assert rep["stages"][2]["decontam"] == {"eval_texts": 3, "ngrams": 0, "too_short": 3,
                                            "ngram": 13}  # fmt: skip
    assert "no 13-word n-gram" in caplog.text
    # An item that a training document holds is found on its own line; whole, the file's
    # n-grams (across the items) were what the documents were checked against.
    ev.write_text(short[0] + "\n" + " ".join(doc(4).split()[3:20]) + "\n")
    rep = _main("--input", jsonl, "--output", str(tmp_path / "o2"),
                f"--config.dedup.decontam_paths={ev}")  # fmt: skip
    assert rep["stages"][2]["decontam"]["eval_texts"] == 2 and rep["removed"] == {
        "contaminated": 1}  # fmt: skip
    rep = _main("--input", jsonl, "--output", str(tmp_path / "o3"),
                f"--config.dedup.decontam_paths={ev}",
                "--config.dedup.decontam_txt_mode=file")  # fmt: skip
    assert rep["stages"][2]["decontam"]["eval_texts"] == 1
    with pytest.raises(SystemExit, match="dedup.decontam_txt_mode"):
        _main("--input", jsonl, "--output", str(tmp_path / "o4"),
              f"--config.dedup.decontam_paths={ev}",
              "--config.dedup.decontam_txt_mode=lines")  # fmt: skip


def test_flagged_documents_are_in_report_md(tmp_path, jsonl):
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"text": " ".join(doc(2).split()[:15])}) + "\n")
    out = tmp_path / "out"
    rep = _main("--input", jsonl, "--output", str(out), f"--config.dedup.decontam_paths={ev}",
                "--config.dedup.decontam_mode=flag")  # fmt: skip
    assert rep["stages"][2]["flagged_contaminated"] == 1 and rep["documents_out"] == 6
    md = (out / "report.md").read_text()
    assert "flagged as contaminated (decontam_mode=flag, kept): 1" in md, md


# ---------------------------------------------------------------------------------------------
# A truncated compressed file: its line, and one message from the CLI.


def _truncated_gzip(n_lines: int) -> bytes:
    body = "".join(json.dumps({"text": doc(i)}) + "\n" for i in range(n_lines)).encode()
    whole = gzip.compress(body)
    return whole[: len(whole) // 2]


def test_a_truncated_gzip_is_named_at_the_line_after_the_last_read(tmp_path, jsonl):
    path = tmp_path / "trunc.jsonl.gz"
    path.write_bytes(_truncated_gzip(300))
    docs, err = [], None
    try:
        for d in S.iter_documents(str(path)):
            docs.append(d)
    except S.DataError as e:
        err = str(e)
    assert err is not None and len(docs) > 1, (err, len(docs))
    assert err.startswith(f"{path}:{len(docs) + 1}: cannot decompress ("), err
    # A whole-file read (a JSON array, a text file read as one document) counts its lines too.
    arr = tmp_path / "docs.json.gz"
    whole = gzip.compress(json.dumps([{"text": doc(i)} for i in range(300)], indent=2).encode())
    arr.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(S.DataError, match=rf"^{arr}:[1-9]\d+: cannot decompress \("):
        list(S.iter_documents(str(arr)))
    # The CLI: one message, a non-zero exit, no traceback.
    with pytest.raises(SystemExit) as e:
        _main("--input", str(path), "--output", str(tmp_path / "out"))
    assert str(e.value).startswith(f"{path}:{len(docs) + 1}: cannot decompress")


# ---------------------------------------------------------------------------------------------
# Beam trains no tokenizer: asking it to is an error, not a run without one.


def test_beam_refuses_train_tokenizer_vocab(tmp_path, jsonl):
    beam = pytest.importorskip("flaxlm.data.beam")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"train_tokenizer_vocab=2000: .*flaxlm\.data\.preprocess"):
        beam.main(["--input", jsonl, "--output", str(out), "--config.train_tokenizer_vocab=2000"])
    assert not out.exists()
