"""Token shards whose ``meta.json`` says ``bos_eos: true`` (records already framed with BOS/EOS,
as other tools write them) are not framed a second time by the loader."""

import os

import numpy as np
import pytest

from flaxlm.data import pipeline
from flaxlm.data.sources import DataError


def batches(pattern, tok_path, n=4):
    c = pipeline.data_config()
    c.sources, c.tokenizer, c.shuffle = pattern, tok_path, False
    it = pipeline.make_pretrain_iterator(
        c, seq_len=16, global_batch=2, seed=0, process_index=0, process_count=1
    )
    return [next(it) for _ in range(n)]


def test_framed_token_shards_get_no_second_bos_eos(tmp_path, chat_tokenizer, write_token_shard):
    tok_path, tok = chat_tokenizer

    def write_shard(*a, **k):  # the shard's files, as a data.sources pattern
        return os.path.join(write_token_shard(*a, **k), "*.arrayrecord")

    assert tok.bos_id >= 0 and tok.eos_id >= 0
    rng = np.random.default_rng(0)
    docs = [rng.integers(8, 370, rng.integers(5, 30)) for _ in range(12)]
    plain = write_shard(tmp_path / "plain", docs, tok, bos_eos=False)
    framed = write_shard(
        tmp_path / "framed", [[tok.bos_id, *d, tok.eos_id] for d in docs], tok, bos_eos=True
    )
    got, ref = batches(framed, tok_path), batches(plain, tok_path)
    for g, r in zip(got, ref):
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(g[k], r[k], err_msg=k)
    # Each document starts with exactly one BOS (a doubled one would show as BOS, BOS).
    toks = np.concatenate([b["tokens"].ravel() for b in got])
    assert not np.any((toks[:-1] == tok.bos_id) & (toks[1:] == tok.bos_id))


def test_bos_eos_that_is_not_a_bool_is_named(tmp_path, chat_tokenizer, write_token_shard):
    tok_path, tok = chat_tokenizer
    shard = write_token_shard(tmp_path / "bad", [[10, 11, 12]] * 4, tok, bos_eos="yes")
    pattern = os.path.join(shard, "*.arrayrecord")
    with pytest.raises(DataError, match=r"bad/\*\.arrayrecord.*bos_eos='yes'"):
        batches(pattern, tok_path, n=1)
