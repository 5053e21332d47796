"""Shared fixtures of the alignment tests: tiny configs on the "small" built-in world, and one
short SFT run that the reward-model tests start from."""

import pytest

from flaxlm.configs import reward as reward_config
from flaxlm.configs import sft as sft_config
from flaxlm.configs.common import override

VOCAB = 512  # tokenizer trained on the small world's corpus; fast, and fits the tiny model


def tiny(config_module, cache_dir, **overrides):
    """A runlocal config shrunk for tests (small world, small vocab, short rows)."""
    c = config_module.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.progress_bar = False
        c.eval_at_start = False
        c.data.world = "small"
        c.data.builtin_vocab_size = VOCAB
        c.data.cache_dir = str(cache_dir)
        c.model.vocab_size = VOCAB
        c.seq_len, c.batch_size = 64, 8
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 6, 6, 6, 3
        c.opt.warmup_steps = 1
    return override(c, overrides)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer_cache")


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, cache_dir):
    """(workdir, summary) of a 6-step SFT run from scratch with generation eval."""
    from flaxlm.alignment import sft

    c = tiny(sft_config, cache_dir, **{
        "eval_gen.sets": "builtin:sft_heldout", "eval_gen.examples": 8,
        "eval_gen.batch": 8, "eval_gen.max_new_tokens": 6,
    })  # fmt: skip
    workdir = str(tmp_path_factory.mktemp("sft"))
    _, summary = sft.run(c, workdir)
    return workdir, summary


@pytest.fixture
def reward_cfg(cache_dir):
    return lambda **kw: tiny(reward_config, cache_dir, **kw)


@pytest.fixture
def sft_cfg(cache_dir):
    return lambda **kw: tiny(sft_config, cache_dir, **kw)
