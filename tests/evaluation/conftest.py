"""Shared fixtures of the evaluation tests: the small built-in world, a tokenizer trained on it,
a tiny checkpoint whose vocabulary fits that tokenizer, and a direct log-prob reference."""

import jax
import numpy as np
import pytest

REF_LEN = 64  # the model's max_seq_len; the reference forward always runs at this length


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    from flaxlm.data.synthetic import write_world

    path = tmp_path_factory.mktemp("world")
    write_world(str(path), "small", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tok_path(world_dir, tmp_path_factory):
    from flaxlm.data import tokenizer
    from flaxlm.data.synthetic import load_world

    texts = [d["text"] for d in load_world(world_dir).pretrain]
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    tokenizer.train(texts, vocab_size=400, model_path=path)
    return path


@pytest.fixture(scope="session")
def tok(tok_path):
    from flaxlm.data.tokenizer import Tokenizer

    return Tokenizer.load(tok_path)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A tiny checkpoint trained for 2 steps (markov data), vocab 512 so the 400-piece test
    tokenizer fits, max_seq_len 64 so long documents need several windows."""
    from flaxlm.configs import pretrain as pretrain_config
    from flaxlm.train import pretrain

    c = pretrain_config.get_config("variant=tiny,runlocal=True,data=markov")
    with c.unlocked():
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 2, 0, 2, 1
        c.batch_size, c.seq_len = 8, 32
        c.model.vocab_size, c.model.max_seq_len = 512, REF_LEN
        c.progress_bar = False
    path = tmp_path_factory.mktemp("run")
    pretrain.run(c, str(path))
    return str(path)


@pytest.fixture(scope="session")
def model(run_dir):
    """(cfg, params) of the tiny checkpoint."""
    from flaxlm.train.checkpoint import load_model

    cfg, params, _ = load_model(run_dir)
    return cfg, params


@pytest.fixture(scope="session")
def ref_logits(model):
    """ids -> float64 logits (len(ids), V) straight from the model's forward (no evaluation
    code involved), always run at length REF_LEN (right padding; causal attention)."""
    from flaxlm.models.transformer import forward

    cfg, params = model
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))

    def ref(ids):
        ids = [int(i) for i in ids]
        assert 1 <= len(ids) <= REF_LEN
        x = np.zeros((1, REF_LEN), np.int32)
        x[0, : len(ids)] = ids
        return np.asarray(fwd(params, x), np.float64)[0, : len(ids)]

    return ref


@pytest.fixture(scope="session")
def ref_logprobs(ref_logits):
    """ids -> array of log p(ids[t] | ids[:t]) for t = 1..len-1 (a float64 log-softmax)."""

    def ref(ids):
        ids = [int(i) for i in ids]
        logits = ref_logits(ids[:-1])
        m = logits.max(-1, keepdims=True)
        logsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        return logsm[np.arange(len(ids) - 1), ids[1:]]

    return ref
