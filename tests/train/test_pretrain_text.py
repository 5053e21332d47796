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
