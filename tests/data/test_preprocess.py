"""Preprocess CLI: mixed inputs → shards + report; accounting adds up; shards load; strict mode."""

import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxlm.data import pipeline, preprocess
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import Tokenizer

STOP = ["the", "of", "and", "to", "that", "with", "have", "be"]


def en_doc(rng, n=120):
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n)]
    for i in range(0, n, 6):
        words[i] = STOP[i % len(STOP)]
    return " ".join(words).capitalize() + "."


def zh_doc(rng, n=150):
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 200)]
    chars = list(rng.choice(han, n))
    for i in range(0, n, 7):
        chars[i] = "的是在了"[i % 4]
    return "".join(chars) + "。"


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    en = [en_doc(rng) for _ in range(40)]
    zh = [zh_doc(rng) for _ in range(10)]
    near = en[0].split()
    near[30], near[31] = near[31], near[30]
    rows = [{"text": t} for t in en + zh] + [
        {"text": en[1].upper()},  # exact duplicate after normalisation
        {"text": " ".join(near)},  # near duplicate (one swap)
        {"text": "too short"},
        {"text": en_doc(rng) + " You idiot."},  # toxic
        {"text": en_doc(rng) + " Mail jane@example.com or call 415-555-2671."},  # PII, kept
        {"body": "no text field"},
    ]
    j = tmp_path / "in.jsonl"
    j.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{broken\n")
    txt = tmp_path / "doc.txt"
    txt.write_text(en_doc(rng))
    pqf = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [en_doc(rng), zh_doc(rng), None]}), str(pqf))
    return [str(j), str(txt), str(pqf)], en


def test_cli_end_to_end_with_trained_tokenizer(tmp_path, inputs):
    paths, en = inputs
    out = str(tmp_path / "out")
    rep = preprocess.main(
        [
            "--input",
            *paths,
            "--output",
            out,
            "--config.train_tokenizer_vocab=600",
            "--config.shard_docs=20",
            "--config.batch_docs=16",
        ]
    )
    # 56 + 1 broken jsonl lines, 1 text file, 3 parquet rows = 61 records read.
    assert rep["documents_in"] == 61
    assert rep["removed"] == {
        "malformed_json": 1,
        "missing_field": 2,
        "too_short": 1,
        "toxic": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    assert rep["documents_out"] == 61 - 7
    assert rep["documents_in"] == rep["documents_out"] + sum(rep["removed"].values())
    clean = next(s for s in rep["stages"] if s["stage"] == "clean")
    assert clean["pii_redacted"] == {"EMAIL": 1, "PHONE": 1}
    assert len(rep["shards"]) == 3 and rep["tokens"] > 5000
    md = open(f"{out}/report.md").read()
    assert "| dedup |" in md and "near_duplicate: 1" in md and "in.jsonl:" in md
    assert json.load(open(f"{out}/report.json"))["documents_out"] == 54
    # report.md states the boilerplate lines line cleaning stripped (report.json only, before)
    stages = [{**s, "boilerplate_lines_stripped": 3} if s["stage"] == "clean" else s
              for s in rep["stages"]]  # fmt: skip
    md = preprocess.format_report({**rep, "stages": stages})
    assert "Boilerplate lines stripped from kept documents: 3 (" in md

    # The loader reads the token shards (tokenizer found beside them) ...
    cfg = pipeline.data_config()
    cfg.sources, cfg.num_epochs, cfg.shuffle, cfg.read_threads = f"{out}/tokens", 1, False, 1
    it = pipeline.make_pretrain_iterator(
        cfg, seq_len=256, global_batch=2, seed=0, process_index=0, process_count=1
    )
    tok = it.tokenizer
    assert tok.sha256 == Tokenizer.load(f"{out}/tokenizer.model").sha256
    stream = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in it])
    # ... and the ids are those of the cleaned text shards, first document first.
    cfg.sources, cfg.tokenizer = f"{out}/text", f"{out}/tokenizer.model"
    text_it = pipeline.make_pretrain_iterator(
        cfg, seq_len=256, global_batch=2, seed=0, process_index=0, process_count=1
    )
    np.testing.assert_array_equal(
        stream, np.concatenate([b["targets"][b["loss_mask"] > 0] for b in text_it])
    )
    first = tok.encode(en[0]) + [tok.eos_id]
    np.testing.assert_array_equal(stream[: len(first)], first)
    assert "<EMAIL>" in "".join(tok.decode_batch([stream]))


def test_given_tokenizer_single_pass_and_overwrite(tmp_path, inputs):
    paths, _ = inputs
    out = str(tmp_path / "o1")
    preprocess.main(["--input", *paths, "--output", out, "--config.train_tokenizer_vocab=500"])
    out2 = str(tmp_path / "o2")
    rep = preprocess.main(
        [
            "--input",
            paths[0],
            "--output",
            out2,
            f"--config.tokenizer={out}/tokenizer.model",
            "--config.dedup.near=False",
            "--config.clean.min_words=1",
        ]
    )
    assert "near_duplicate" not in rep["removed"] and "too_short" not in rep["removed"]
    assert rep["shards"] == ["tokens/shard-00000.arrayrecord"]
    with pytest.raises(SystemExit, match="already holds"):
        preprocess.main(["--input", paths[0], "--output", out2])
    with pytest.raises(SystemExit, match="unknown config key 'clean.nope'"):
        preprocess.main(
            ["--input", paths[0], "--output", out2, "--overwrite", "--config.clean.nope=1"]
        )


def _strict():
    cfg = preprocess.preprocess_config()
    cfg.strict = True
    return cfg


def test_strict_raises_with_file_line(tmp_path, inputs):
    paths, _ = inputs
    with pytest.raises(DataError, match=r"in\.jsonl:56: missing_field"):
        preprocess.run([paths[0]], str(tmp_path / "r"), _strict())
    # The CLI: the same message, as one line and a non-zero exit (no traceback).
    with pytest.raises(SystemExit, match=r"in\.jsonl:56: missing_field"):
        preprocess.main(
            ["--input", paths[0], "--output", str(tmp_path / "s"), "--config.strict=True"]
        )


def test_decontamination_and_workers(tmp_path, inputs):
    paths, en = inputs
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(json.dumps({"text": " ".join(en[5].split()[10:30])}) + "\n")
    rep = preprocess.main(
        [
            "--input",
            paths[0],
            "--output",
            str(tmp_path / "d"),
            f"--config.dedup.decontam_paths={evalf}",
            "--config.workers=2",
        ]
    )
    assert rep["removed"]["contaminated"] == 1
    assert rep["documents_in"] == rep["documents_out"] + sum(rep["removed"].values())


def test_report_says_its_megabytes_are_of_the_text_read(tmp_path, inputs):
    """report.md said "MB kept text in" for bytes_in, which counts the text of every document
    read, the dropped ones too; the label now says "text read"."""
    paths, _ = inputs
    out = tmp_path / "r"
    rep = preprocess.run([paths[0]], str(out), preprocess.preprocess_config())
    texts = []
    for line in open(paths[0], encoding="utf-8"):
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError):
            pass  # the broken line and the record without a text field are not read
    assert rep["documents_out"] < len(texts)  # documents were dropped ...
    assert rep["bytes_in"] == sum(len(t.encode()) for t in texts)  # ... and still counted
    md = (out / "report.md").read_text()
    assert f"{rep['bytes_in'] / 1e6:.2f} MB text read" in md and "kept text" not in md


def test_decontamination_finds_eval_items_holding_a_line_the_cleaner_strips(tmp_path):
    """The cleaner strips symbol-only lines ("***") from training text, and the eval texts were
    only normalised: every n-gram spanning that line was in the eval item alone, so a training
    document holding the item was kept."""
    rng = np.random.default_rng(1)
    item = (
        "Question: what is the capital city of the small northern province\n***\n"
        "Answer: the capital city is Brelford on the coast"
    )
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(json.dumps({"text": item}) + "\n")
    rows = [en_doc(rng) + "\n\n" + item + "\n\n" + en_doc(rng), en_doc(rng)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    cfg = preprocess.preprocess_config()
    cfg.dedup.decontam_paths, cfg.dedup.near = str(evalf), False
    rep = preprocess.run([str(src)], str(tmp_path / "out"), cfg)
    assert rep["removed"].get("contaminated") == 1 and rep["documents_out"] == 1
    # Both forms of the item: the stripped one (first) and the item as written (a line's context
    # decides whether it is boilerplate; test_clean_ambiguous_text.py).
    assert preprocess.load_eval_texts(cfg)[0] == (item.replace("\n***", ""), item)
    cfg.clean.strip_boilerplate_lines = False  # the eval side mirrors the cleaner's settings
    assert preprocess.load_eval_texts(cfg)[0] == item


def test_a_tokenizer_smaller_than_asked_is_warned_and_reported(tmp_path, inputs, caplog):
    """train_tokenizer_vocab=32000 on a corpus of a few thousand words: SentencePiece makes
    fewer pieces (hard_vocab_limit off). That used to pass without a word, and report.md never
    said the vocab size the model needs; now a warning names both, and so does the report."""
    import logging

    paths, _ = inputs
    out = tmp_path / "v"
    cfg = preprocess.preprocess_config()
    cfg.train_tokenizer_vocab = 32000
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        rep = preprocess.run(paths, str(out), cfg)
    made = Tokenizer.load(str(out / "tokenizer.model")).vocab_size
    assert made < 32000
    assert (rep["vocab_size"], rep["train_tokenizer_vocab"]) == (made, 32000)
    assert f"train_tokenizer_vocab=32000: the corpus supported only {made} pieces" in caplog.text
    assert f"--config.model.vocab_size={made}" in caplog.text
    md = (out / "report.md").read_text()
    assert f"vocab_size: {made} (--config.model.vocab_size" in md and "asked 32000" in md
    # a tokenizer given: its size reported, nothing asked and nothing warned
    caplog.clear()
    cfg = preprocess.preprocess_config()
    cfg.tokenizer = str(out / "tokenizer.model")
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        rep = preprocess.run([paths[0]], str(tmp_path / "given"), cfg)
    assert (rep["vocab_size"], rep["train_tokenizer_vocab"]) == (made, None)
    assert "supported only" not in caplog.text
    assert f"vocab_size: {made} (" in (tmp_path / "given" / "report.md").read_text()
