"""Pretraining on the built-in world through the text pipeline; the tokenizer travels along."""

import os

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.data.tokenizer import Tokenizer
from flaxlm.train import pretrain
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics


def test_text_pretraining_learns_and_records_its_tokenizer(tmp_path):
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.progress_bar = False
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 30, 30, 30, 10
    pretrain.run(c, str(tmp_path))
    evals = [r["eval/nll"] for r in read_metrics(tmp_path) if "eval/nll" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 2.0  # from ~log(V) to well below
    _, meta = read_meta(str(tmp_path))
    assert meta["tokenizer"] == os.path.join(str(tmp_path), "tokenizer.model")
    tok = Tokenizer.load(meta["tokenizer"])
    assert tok.vocab_size <= meta["model_config"]["vocab_size"]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"


def _own_data(tmp_path):
    """A jsonl corpus, its token shards from the preprocess CLI, and that tokenizer."""
    import json

    from flaxlm.data import preprocess

    words = "river fox train garden museum bridge harbour village letter morning".split()
    docs = [" ".join(words[(i + j) % 10] for j in range(40 + i % 7)) for i in range(60)]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "data"
    preprocess.main(["--input", str(src), "--output", str(out), "--config.do_clean=False",
                     "--config.dedup.near=False", "--config.dedup.exact=False",
                     "--config.train_tokenizer_vocab=300"])  # fmt: skip
    return str(src), str(out / "tokens"), Tokenizer.load(str(out / "tokenizer.model"))


def test_own_sources_need_their_own_heldout(tmp_path):
    """With data.sources set, an empty eval_sources used to score the built-in demo world's
    held-out text (with the run's tokenizer) as `eval/nll`; now it is refused, naming the keys.
    Held-out token shards must come from the run's tokenizer."""
    import pytest

    from flaxlm.data.sources import DataError
    from flaxlm.data.tokenizer import train

    raw, shards, tok = _own_data(tmp_path)
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.batch_size, c.seq_len, c.data.eval_batches = 2, 32, 1
        c.data.sources = shards
    with pytest.raises(ValueError, match="data.eval_sources is empty"):
        pretrain.text_eval_batches(c, tok)
    for heldout in (raw, shards):  # raw text, or token shards of the same tokenizer
        with c.unlocked():
            c.data.eval_sources = heldout
        (batch,) = pretrain.text_eval_batches(c, tok)
        assert batch["tokens"].shape == (2, 32) and int(batch["tokens"].max()) < tok.vocab_size
    other = train(["a b c d e f g h i j k l m n o p"] * 50, 300)
    with pytest.raises(DataError, match="data.eval_sources .* tokenizer sha256"):
        pretrain.text_eval_batches(c, other)
