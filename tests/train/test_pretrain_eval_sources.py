"""Several held-out sources (`data.eval_sources`) are interleaved by weight in the held-out
batches (train/pretrain.py `eval_order`): they were read one after the other, so the batches
held the first source's documents only and the others were never measured."""

import json
import logging

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.train import pretrain


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _config(eval_sources, tok_path, batches=4):
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.seq_len, c.batch_size = 16, 4
        c.data.sources, c.data.eval_sources, c.data.tokenizer = eval_sources, eval_sources, tok_path
        c.data.read_threads, c.data.prefetch, c.data.eval_batches = 1, 8, batches
    return c


def _documents_per_source(batches, tok, firsts):
    """How many documents of each source start in `batches` (by the token after their BOS)."""
    t = np.concatenate([b["tokens"] for b in batches])
    g = np.concatenate([b["targets"] for b in batches])
    starts = g[(t == tok.bos_id) & (np.concatenate([b["loss_mask"] for b in batches]) > 0)]
    return [int((starts == f).sum()) for f in firsts]


@pytest.fixture
def heldout(tmp_path, chat_tokenizer):
    tok_path, tok = chat_tokenizer
    a = _write(tmp_path / "ha.jsonl", [f"Kavo live {i}" for i in range(200)])
    b = _write(tmp_path / "hb.jsonl", [f"Brel city {i}" for i in range(200)])
    firsts = [tok.encode("Kavo live 1")[0], tok.encode("Brel city 1")[0]]
    assert firsts[0] != firsts[1]
    return a, b, firsts


@pytest.mark.parametrize("weights,share", [(("", ""), 0.5), ((":0.5", ":0.5"), 0.5),
                                           ((":3", ":1"), 0.75)])  # fmt: skip
def test_every_held_out_source_is_measured_by_its_weight(heldout, chat_tokenizer, weights, share):
    tok_path, tok = chat_tokenizer
    a, b, firsts = heldout
    spec = f"{a}{weights[0]},{b}{weights[1]}"
    got = _documents_per_source(pretrain.text_eval_batches(_config(spec, tok_path), tok), tok,
                                firsts)  # fmt: skip
    assert min(got) > 0, got  # (before: [n, 0])
    assert abs(got[0] - share * sum(got)) <= 1.5, got


def test_one_held_out_source_gives_its_documents_in_order(heldout, chat_tokenizer):
    """One source: its documents in file order, as they always were (the order is the identity,
    and the batches are the first documents' packing)."""
    tok_path, tok = chat_tokenizer
    a, _, _ = heldout
    np.testing.assert_array_equal(pretrain.eval_order([7], [0.5]), np.arange(7))
    got = pretrain.text_eval_batches(_config(a, tok_path), tok)
    t = np.concatenate([b["tokens"] for b in got]).ravel()
    m = np.concatenate([b["loss_mask"] for b in got]).ravel() > 0
    starts = np.flatnonzero((t == tok.bos_id) & m)
    texts = [tok.decode(t[s + 1 : s + 1 + len(tok.encode(f"Kavo live {i}"))])
             for i, s in enumerate(starts[:-1])]  # fmt: skip
    assert texts == [f"Kavo live {i}" for i in range(len(starts) - 1)]


def test_a_held_out_source_that_runs_out_is_logged(tmp_path, heldout, chat_tokenizer, caplog):
    tok_path, tok = chat_tokenizer
    a, b, firsts = heldout
    short = _write(tmp_path / "short.jsonl", ["Brel city 1", "Brel city 2"])
    with caplog.at_level(logging.WARNING):
        got = pretrain.text_eval_batches(_config(f"{a},{short}", tok_path), tok)
    assert _documents_per_source(got, tok, firsts)[1] == 2
    assert f"data.eval_sources: {short} ran out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pretrain.text_eval_batches(_config(f"{a},{b}", tok_path), tok)
    assert "ran out" not in caplog.text
