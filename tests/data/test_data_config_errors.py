"""Bad data settings stop with one line naming the config key, before anything is written.

The trainer (`flaxlm.train.main.run_task`) turns a `DataError` into one line; a missing source
(`data.sources=/nonexistent`), a weight that is not a number or not > 0, a model vocab smaller
than the tokenizer, a misspelt `data.pack_mode` / `data.txt_mode` / `data.on_changed_sources`
used to end in tracebacks (`FileNotFoundError: no files match ...` naming no key). Preprocess
(`flaxlm.data.preprocess.main`) checked a misspelt `txt_mode`, a missing tokenizer or word list
only once it had written `out/text/meta.json`, so the corrected rerun refused ("already holds a
preprocess run"), and took `shard_docs` / `batch_docs` of 0 silently.
"""

import json
import os
import re

import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.data import pipeline, preprocess
from flaxlm.data.source_errors import DataError
from flaxlm.train import main as train_main

DOC = "the river runs past the old mill and into the valley where farmers grow wheat"


def _jsonl(path, n=8):
    path.write_text("".join(json.dumps({"text": f"{DOC} {i}."}) + "\n" for i in range(n)))
    return str(path)


# ---------------------------------------------------------------------------------------------
# The trainer: one line naming the key, before any step.


@pytest.fixture
def text(tmp_path):
    return _jsonl(tmp_path / "train.jsonl"), _jsonl(tmp_path / "heldout.jsonl")


def _train_error(tmp_path, tok_path, vocab_size=2048, **data) -> str:
    """The one line `run_task` stops a tiny text pretraining run with (its SystemExit); `data`:
    the `data.` keys set."""
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.seq_len, c.batch_size, c.model.vocab_size = 16, 8, vocab_size
        c.data.tokenizer, c.data.read_threads, c.data.prefetch = tok_path, 1, 4
        c.data.update(data)
    with pytest.raises(SystemExit) as e:
        train_main.run_task("flaxlm.train.pretrain", c, str(tmp_path / "run"))
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("DataError: "), msg
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    return msg


@pytest.mark.parametrize("key", ["sources", "eval_sources"])
def test_a_source_that_matches_nothing_names_its_key(tmp_path, text, chat_tokenizer, key):
    train, heldout = text
    sources = {"sources": train, "eval_sources": heldout, key: "/nonexistent/x*.jsonl"}
    msg = _train_error(tmp_path, chat_tokenizer[0], **sources)
    assert f"data.{key}: no files match '/nonexistent/x*.jsonl'" in msg


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf"])
def test_a_weight_not_above_zero_is_one_line(tmp_path, text, chat_tokenizer, weight):
    train, heldout = text
    msg = _train_error(
        tmp_path, chat_tokenizer[0], sources=f"{train}:{weight}", eval_sources=heldout
    )
    assert f"data.sources: weight of '{train}' must be > 0 and finite" in msg


@pytest.mark.parametrize("weight", ["abc", "0.3x"])
def test_a_weight_that_is_not_a_number_is_named(tmp_path, text, chat_tokenizer, weight):
    """`/data/tokens:abc` was taken as a path: "no files match '/data/tokens:abc'"."""
    train, heldout = text
    msg = _train_error(
        tmp_path, chat_tokenizer[0], sources=f"{train}:{weight}", eval_sources=heldout
    )
    assert f"data.sources: the weight {weight!r} of {train!r} is not a number" in msg
    with pytest.raises(DataError, match=r"^data\.eval_sources: the weight 'abc' of"):
        pipeline.parse_sources(f"{heldout}:abc", key="data.eval_sources")


def test_a_path_with_a_colon_is_still_a_path(tmp_path):
    odd = _jsonl(tmp_path / "a:b.jsonl")
    assert pipeline.parse_sources(odd) == [(odd, 1.0)]
    assert pipeline.parse_sources(f"{odd}:2") == [(odd, 2.0)]
    # A pattern matching nothing, whatever follows its last ':', is left for the missing-file
    # error (which names the whole entry): no file decides it was a weight.
    assert pipeline.parse_sources("nope/x:abc") == [("nope/x:abc", 1.0)]


def test_a_model_vocab_below_the_tokenizer_is_one_line(tmp_path, text, chat_tokenizer):
    train, heldout = text
    tok_path, tok = chat_tokenizer
    msg = _train_error(tmp_path, tok_path, sources=train, eval_sources=heldout, vocab_size=256)
    assert f"has {tok.vocab_size} pieces but the model's vocab_size is 256" in msg


def test_empty_eval_sources_with_sources_is_one_line(tmp_path, text, chat_tokenizer):
    msg = _train_error(tmp_path, chat_tokenizer[0], sources=text[0], eval_sources="")
    assert "data.eval_sources is empty" in msg and "--config.eval_every=0" in msg


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("pack_mode", "Split", r"data\.pack_mode must be split\|pad, got 'Split'"),
        ("txt_mode", "lines", r"data\.txt_mode must be file\|line\|blank, got 'lines'"),
        ("on_changed_sources", "ignore", r"data\.on_changed_sources must be one of"),
        ("num_epochs", -1, r"data\.num_epochs must be an integer >= 0, got -1"),
        ("prefetch", -2, r"data\.prefetch must be an integer >= 0, got -2"),
        ("tokenizer", "/nonexistent/tok.model", r"data\.tokenizer: cannot read '/nonexistent"),
    ],
)
def test_bad_data_settings_name_the_key(tmp_path, text, chat_tokenizer, key, value, message):
    train, heldout = text
    settings = {"sources": train, "eval_sources": heldout, key: value}
    msg = _train_error(tmp_path, chat_tokenizer[0], **settings)
    assert re.search(message, msg), msg


def test_a_bad_pack_mode_is_refused_before_any_source_is_opened(tmp_path):
    """Checked with the other settings: it used to surface from the packer, after every source
    was opened and indexed (here: the missing one would have been named instead)."""
    c = pipeline.data_config()
    c.sources, c.pack_mode = str(tmp_path / "nope.jsonl"), "pack"
    with pytest.raises(DataError, match=r"^data\.pack_mode must be split\|pad, got 'pack'$"):
        pipeline.make_pretrain_iterator(
            c, seq_len=8, global_batch=2, seed=0, process_index=0, process_count=1
        )


def test_a_missing_source_is_refused_before_the_tokenizer_is_read(tmp_path):
    """Every pattern is checked first (the tokenizer here does not exist either)."""
    c = pipeline.data_config()
    c.sources, c.tokenizer = f"{tmp_path / 'nope*.jsonl'}:2", str(tmp_path / "nope.model")
    with pytest.raises(DataError, match=r"^data\.sources: no files match '.*nope\*\.jsonl'$"):
        pipeline.make_pretrain_iterator(
            c, seq_len=8, global_batch=2, seed=0, process_index=0, process_count=1
        )


# ---------------------------------------------------------------------------------------------
# Preprocess: refused before anything is written; the corrected rerun works.


def _pre(inp, out, *overrides):
    return preprocess.main(["--input", inp, "--output", str(out), "--config.clean.min_words=1",
                            "--config.dedup.near=False", *overrides])  # fmt: skip


def _pre_error(inp, out, *overrides) -> str:
    with pytest.raises(SystemExit) as e:
        _pre(inp, out, *overrides)
    msg = str(e.value.code)
    assert "\n" not in msg, msg
    assert not out.exists(), sorted(os.listdir(out))  # nothing written
    return msg


def test_a_misspelt_txt_mode_writes_nothing_and_the_rerun_works(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(f"{DOC} one.\n{DOC} two.\n")
    out = tmp_path / "bo"
    msg = _pre_error(str(src), out, "--config.txt_mode=lines")
    assert msg == "txt_mode must be file|line|blank, got 'lines'"
    assert _pre(str(src), out, "--config.txt_mode=line")["documents_out"] == 2


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.tokenizer=/nonexistent/tok.model", "tokenizer: cannot read '/nonexistent/tok"),
        ("--config.clean.toxic_lists=/nonexistent/w.txt",
         "clean.toxic_lists: cannot read '/nonexistent/w.txt'"),
        ("--config.shard_docs=0", "shard_docs must be an integer >= 1, got 0"),
        ("--config.batch_docs=-1", "batch_docs must be an integer >= 1, got -1"),
        ("--config.dedup.bands=500", r"dedup.bands must be in"),
        ("--config.tokenizer_model_type=BPE", "tokenizer_model_type must be bpe|unigram"),
    ],
)  # fmt: skip
def test_bad_preprocess_settings_are_one_line_and_write_nothing(tmp_path, override, message):
    src = _jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    assert message in _pre_error(src, out, override)
    assert _pre(src, out)["documents_out"] == 8


def test_no_tokenizer_sample_is_refused_when_one_is_trained(tmp_path):
    """tokenizer_sample_docs=0 with a tokenizer to train: the reservoir stayed empty and the
    training failed after the whole clean/dedup pass; now one line, nothing written."""
    src = _jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "out"
    msg = _pre_error(src, out, "--config.train_tokenizer_vocab=400",
                     "--config.tokenizer_sample_docs=0")  # fmt: skip
    assert msg == "tokenizer_sample_docs must be an integer >= 1, got 0"
    assert _pre(src, out, "--config.tokenizer_sample_docs=0")["documents_out"] == 8  # no training
