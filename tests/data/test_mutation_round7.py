"""Mutation testing, round 7: data/pipeline.py behaviours the other tests left open (the
mixture's warning threshold, source-spec parsing), each against values counted here (grain's
interleave of tiny sources), not against the code's own text."""

import json
import logging

import numpy as np
import pytest

from flaxlm.data import pipeline


class _CharTok:
    """One id per character (3 + its code), BOS 1, EOS 2, pad 0."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def encode(self, text):
        return [3 + ord(c) for c in text]

    def check_fits(self, vocab_size):
        pass


def _source(path, docs):
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return str(path)


def _iterator(spec, **kw):
    c = pipeline.data_config()
    c.sources, c.read_threads = spec, 1
    c.update(kw)
    return pipeline.make_pretrain_iterator(c, seq_len=16, global_batch=2, seed=0,
                                           process_index=0, process_count=1,
                                           tokenizer=_CharTok())  # fmt: skip


def test_a_mixture_that_leaves_one_document_per_source_unread_is_not_warned(tmp_path, caplog):
    """Sizes 7 and 3 weighted 7:3: grain's interleave reads 9 of the 10 documents (6 and 3).
    One document per source is the interleave's rounding, not a mixture cut short: no
    warning. Weighted 1:1 it reads 3 and 3, and that is warned."""
    a = _source(tmp_path / "a.jsonl", [f"a{i}" for i in range(7)])
    b = _source(tmp_path / "b.jsonl", [f"b{i}" for i in range(3)])
    with caplog.at_level(logging.WARNING):
        it = _iterator(f"{a}:7,{b}:3", num_epochs=1)
    assert "mixture" not in caplog.text
    assert sum(1 for _ in it._docs) == 9
    with caplog.at_level(logging.WARNING):
        _iterator(f"{a}:1,{b}:1", num_epochs=1)
    assert "documents used per source (this process): [3, 3] of [7, 3]" in caplog.text


def test_an_entry_without_a_weight_weighs_one_beside_weighted_ones(tmp_path):
    """'a,b:3' mixes a and b 1:3 (documents): over 40 documents, 10 of a."""
    a = _source(tmp_path / "a.jsonl", ["x" * 5] * 50)
    b = _source(tmp_path / "b.jsonl", ["y" * 5] * 50)
    it = _iterator(f"{a},{b}:3")
    firsts = [next(it._docs)[1] for _ in range(40)]  # (BOS, first character, ...)
    assert firsts.count(3 + ord("x")) == 10 and firsts.count(3 + ord("y")) == 30


def test_a_colon_is_part_of_the_path_unless_what_follows_the_last_one_is_a_number(tmp_path):
    """The weight follows the *last* ':'; a non-number there is a weight error only when the
    part before it names files (else the whole entry is the pattern, to be checked later)."""
    assert pipeline.parse_sources("x:y/a.jsonl:0.5") == [("x:y/a.jsonl", 0.5)]
    assert pipeline.parse_sources("nowhere:abc") == [("nowhere:abc", 1.0)]
    real = _source(tmp_path / "r.jsonl", ["doc"])
    with pytest.raises(pipeline.DataError, match=r"the weight '0\.3x' of .*r\.jsonl' is not a"):
        pipeline.parse_sources(f"{real}:0.3x")
    with pytest.raises(pipeline.DataError, match=r"must be > 0 and finite, got 0\.0"):
        pipeline.parse_sources(f"{real}:0")


def test_each_row_of_a_batch_counts_and_rows_split_over_the_processes(tmp_path):
    """global_batch rows over all processes: each of 2 processes packs global_batch / 2."""
    a = _source(tmp_path / "a.jsonl", [f"doc {i}" for i in range(8)])
    c = pipeline.data_config()
    c.sources, c.read_threads = a, 1
    kw = dict(seq_len=16, global_batch=4, seed=0, process_count=2, tokenizer=_CharTok())
    its = [pipeline.make_pretrain_iterator(c, process_index=i, **kw) for i in range(2)]
    for it in its:
        assert next(it)["tokens"].shape == (2, 16)
    assert np.asarray(next(its[0])["tokens"]).dtype == np.int32


def test_a_mixture_resumed_on_another_process_count_says_its_sources_shares_are_near(
    tmp_path, caplog
):
    """A one-process state of a two-source mixture resumed by process 1 of 2: the saved index
    counts the mixed stream, so the warning says each source's share is only near it (a single
    source's resume skips none, a mixture's may skip or repeat a few of each)."""
    a = _source(tmp_path / "a.jsonl", [f"a doc {i}" for i in range(20)])
    b = _source(tmp_path / "b.jsonl", [f"b doc {i}" for i in range(20)])
    c = pipeline.data_config()
    c.sources, c.read_threads = f"{a}:1,{b}:1", 1

    def make(pi, pc):
        return pipeline.make_pretrain_iterator(c, seq_len=16, global_batch=2 * pc, seed=0,
                                               process_index=pi, process_count=pc,
                                               tokenizer=_CharTok())  # fmt: skip

    one = make(0, 1)
    next(one)
    with caplog.at_level(logging.WARNING):
        make(1, 2).set_state(one.get_state())
    assert "the 2 sources' documents are mixed per process" in caplog.text
    assert "none is skipped" not in caplog.text
