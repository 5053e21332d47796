"""Preprocess CLI on bad input: leftover shards, --overwrite over its own input, bad values."""

import json
import os

import pytest

from flaxlm.data import preprocess
from flaxlm.data.tokenizer import Tokenizer

DOC = "The river and the mountain have a forest of tall trees that grow with the light."


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"{DOC} {i}"}) + "\n" for i in range(6)))
    return str(path)


def _main(*argv):
    return preprocess.main([*argv, "--config.dedup.near=False", "--config.clean.min_words=1"])


def test_leftover_shards_of_an_interrupted_run_are_not_mixed_in(tmp_path, jsonl):
    out = str(tmp_path / "out")
    _main("--input", jsonl, "--output", out, "--config.shard_docs=1")
    os.remove(os.path.join(out, "report.json"))  # as if the run had died before its report
    with pytest.raises(SystemExit, match="already holds a preprocess run"):
        _main("--input", jsonl, "--output", out, "--config.shard_docs=100")
    rep = _main("--input", jsonl, "--output", out, "--config.shard_docs=100", "--overwrite")
    assert sorted(os.listdir(os.path.join(out, "text"))) == ["meta.json", "shard-00000.arrayrecord"]
    assert rep["shards"] == ["text/shard-00000.arrayrecord"]
    # The library entry point refuses to write next to old shards, too.
    os.remove(os.path.join(out, "report.json"))
    with pytest.raises(ValueError, match=r"already holds 1 shard\(s\)"):
        preprocess.run([jsonl], out, preprocess.preprocess_config())


def test_overwrite_never_deletes_its_own_input(tmp_path, jsonl):
    out = str(tmp_path / "out")
    _main("--input", jsonl, "--output", out)
    with pytest.raises(SystemExit, match="would delete input"):
        _main("--input", os.path.join(out, "text"), "--output", out, "--overwrite")
    assert os.path.exists(os.path.join(out, "text", "shard-00000.arrayrecord"))


def test_bad_override_values_name_the_key(tmp_path, jsonl):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="config key 'shard_docs': cannot read 'abc' as int"):
        _main("--input", jsonl, "--output", out, "--config.shard_docs=abc")
    with pytest.raises(SystemExit, match="config key 'strict': expected a boolean, got 'ture'"):
        _main("--input", jsonl, "--output", out, "--config.strict=ture")


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, jsonl):
    bad = tmp_path / "tok.model"
    bad.write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tok\.model: not a SentencePiece model"):
        Tokenizer.load(str(bad))


def test_a_config_file_without_get_config_is_named(tmp_path, jsonl):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("x = 1\n")
    with pytest.raises(SystemExit, match=r"cfg\.py: defines no get_config\(\)"):
        _main("--input", jsonl, "--output", str(tmp_path / "out"), "--config", str(cfg))


def test_a_corpus_that_loses_every_document_fails_after_writing_its_report(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"txt": "wrong field"}\nnot json\n')
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="none of the 2 documents"):
        _main("--input", str(src), "--output", out)
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["documents_out"] == 0 and sum(report["removed"].values()) == 2


def test_an_input_typo_writes_nothing_and_the_corrected_run_succeeds(tmp_path, jsonl):
    """A glob matching nothing left out/text/meta.json behind; the rerun with the corrected
    glob then refused: "already holds a preprocess run"."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--input: no files match '.*\*\.jsonll'"):
        _main("--input", str(tmp_path / "*.jsonll"), "--output", str(out))
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="no files match"):
        preprocess.run([str(tmp_path / "*.jsonll")], str(out), preprocess.preprocess_config())
    assert not out.exists()
    assert _main("--input", str(tmp_path / "*.jsonl"), "--output", str(out))["documents_out"] == 6


def test_decontam_paths_may_have_spaces_and_a_missing_one_names_the_key(tmp_path, jsonl):
    """A decontam_paths of "a.jsonl, b.jsonl" looked for " b.jsonl": a FileNotFoundError that
    did not say which setting held the path (and main had already deleted an --overwrite'd
    output)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"text": "first eval item"}) + "\n")
    b.write_text(json.dumps({"text": "second eval item"}) + "\n")
    cfg = preprocess.preprocess_config()
    cfg.dedup.decontam_paths = f"{a}, {b} ,"
    assert preprocess.load_eval_texts(cfg) == ["first eval item", "second eval item"]
    cfg.dedup.decontam_paths = f"{a}, {tmp_path / 'nope.jsonl'}"
    with pytest.raises(FileNotFoundError, match=r"^dedup\.decontam_paths: no files match '/"):
        preprocess.load_eval_texts(cfg)
    out = tmp_path / "out"
    _main("--input", jsonl, "--output", str(out))
    with pytest.raises(SystemExit, match=r"^dedup\.decontam_paths: no files match .*nope\.jsonl"):
        _main("--input", jsonl, "--output", str(out), "--overwrite",
              f"--config.dedup.decontam_paths={cfg.dedup.decontam_paths}")  # fmt: skip
    assert (out / "text").is_dir()  # the earlier run is still there


def test_tokenizer_training_with_no_surviving_document_writes_the_report(tmp_path):
    """SentencePiece's RuntimeError on an empty sample, no report; now the same failure as
    without training."""
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps({"content": f"{DOC} {i}"}) + "\n" for i in range(5)))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"none of the 5 documents .* \(why: .*report\.md\)"):
        _main("--input", str(src), "--output", out, "--config.train_tokenizer_vocab=400")
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["removed"] == {"missing_field": 5} and report["tokenizer"] is None
    assert os.path.exists(os.path.join(out, "report.md"))
    assert not os.path.exists(os.path.join(out, "tokenizer.model"))


def test_a_tokenizer_vocab_below_the_fixed_pieces_is_refused_before_any_output(tmp_path, jsonl):
    from flaxlm.data.tokenizer import fixed_pieces

    out = tmp_path / "out"
    n = fixed_pieces()
    with pytest.raises(SystemExit, match=rf"train_tokenizer_vocab={n} is too small: .* {n} fixed"):
        _main("--input", jsonl, "--output", str(out), f"--config.train_tokenizer_vocab={n}")
    assert not out.exists()
    # Above the fixed pieces, too few for the text's characters: an error naming the key.
    with pytest.raises(ValueError, match=r"train_tokenizer_vocab=270: SentencePiece bpe"):
        _main("--input", jsonl, "--output", str(out), "--config.train_tokenizer_vocab=270")
