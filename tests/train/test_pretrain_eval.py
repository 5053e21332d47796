"""The held-out batches of text pretraining (train/pretrain.py `text_eval_batches`): framed and
packed as training is, bad records under `data.strict`, documents tokenized as packing needs."""

import json

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.data import pipeline
from flaxlm.data.sources import DataError
from flaxlm.train import pretrain

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def config(eval_sources, tok_path, **data):
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.seq_len, c.batch_size = 16, 2
        c.data.sources, c.data.eval_sources, c.data.tokenizer = eval_sources, eval_sources, tok_path
        c.data.shuffle, c.data.num_epochs, c.data.read_threads, c.data.prefetch = False, 1, 1, 8
        c.data.update(data)
    return c


def training_batches(c, n):
    it = pipeline.make_pretrain_iterator(
        c.data, seq_len=c.seq_len, global_batch=c.batch_size, seed=0, process_index=0,
        process_count=1,
    )  # fmt: skip
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("mode", ["split", "pad"])
def test_held_out_batches_are_framed_and_packed_as_training(
    tmp_path, chat_tokenizer, write_token_shard, mode
):
    """Token shards whose meta.json says `bos_eos: true` got a second BOS and EOS in the held-out
    batches only (training adds none), and the held-out text was always packed in split mode:
    the eval loss was measured on other sequences than the model trains on."""
    tok_path, tok = chat_tokenizer
    rng = np.random.default_rng(0)
    docs = [rng.integers(8, 370, rng.integers(5, 20)) for _ in range(12)]
    plain = write_token_shard(tmp_path / "plain", docs, tok, bos_eos=False)
    framed = write_token_shard(
        tmp_path / "framed", [[tok.bos_id, *d, tok.eos_id] for d in docs], tok, bos_eos=True
    )
    ref = training_batches(config(plain, tok_path, pack_mode=mode), 3)
    for shards in (plain, framed):
        c = config(shards, tok_path, pack_mode=mode)
        with c.unlocked():
            c.data.eval_batches = 3
        got = pretrain.text_eval_batches(c, tok)
        assert len(got) == 3
        for i, (g, r) in enumerate(zip(got, ref)):
            for k in KEYS:
                np.testing.assert_array_equal(g[k], r[k], err_msg=f"{shards} batch {i} {k}")
    if mode == "pad":  # packed otherwise than split mode would (else the test says nothing)
        split = training_batches(config(plain, tok_path, pack_mode="split"), 3)
        assert any((r["tokens"] != s["tokens"]).any() for r, s in zip(ref, split))


def test_held_out_bad_records_follow_data_strict_and_are_logged(tmp_path, chat_tokenizer, caplog):
    """With data.strict a malformed training line raised, the same line in eval_sources was
    skipped; leniently, bad held-out records were dropped without a log line."""
    tok_path, tok = chat_tokenizer
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"text": "where does Kavo live"}\n{"text": broken\n{"txt": "wrong field"}\n'
                   '{"text": "the city of Brel"}\n')  # fmt: skip
    with pytest.raises(DataError, match=r"heldout\.jsonl:2: malformed_json"):
        pretrain.text_eval_batches(config(str(bad), tok_path, strict=True), tok)
    with caplog.at_level("WARNING"):
        (batch,) = pretrain.text_eval_batches(config(str(bad), tok_path), tok)
    assert f"data.eval_sources {bad}: skipped 2 bad records" in caplog.text
    assert "'malformed_json': 1" in caplog.text and "'missing_field': 1" in caplog.text
    assert batch["loss_mask"].sum() > 0


def test_held_out_documents_are_tokenized_as_the_batches_need_them(tmp_path, chat_tokenizer):
    """Every held-out document was tokenized up front, though `eval_batches` batches hold a few:
    a large held-out set cost its whole tokenization at startup. The batches are those of the
    documents in order either way (the test above compares them with training's)."""
    tok_path, tok = chat_tokenizer
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": f"where does Kavo live {i}"}) + "\n"
                               for i in range(400)))  # fmt: skip

    class Counting:
        def __init__(self):
            self.calls = 0

        def encode(self, text):
            self.calls += 1
            return tok.encode(text)

        def __getattr__(self, name):
            return getattr(tok, name)

    counting = Counting()
    c = config(str(heldout), tok_path)
    with c.unlocked():
        c.data.eval_batches = 1
    (batch,) = pretrain.text_eval_batches(c, counting)
    assert batch["loss_mask"].sum() == 2 * 16
    assert counting.calls < 100, counting.calls  # 400 before
