"""Sizes and lengths no run can mean are refused naming the key, before anything is built or
trained: they used to fail deep in numpy (a markov `batch_size=0` or `data.markov_branching=0`:
IndexError), in the eval (`data.eval_batches=0`: KeyError 'nll'), or to "succeed" (`seq_len=0`
trained at loss 0.0; `total_steps=0` trained nothing and exited 0)."""

import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data.markov import MarkovStream
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop, pretrain


def _config(data="markov", **overrides):
    c = pretrain_config.get_config(f"variant=tiny,runlocal=True,data={data}")
    return override(c, {"progress_bar": False, "eval_at_start": False, **overrides})


@pytest.mark.parametrize(
    "key,value,data",
    [
        ("batch_size", 0, "markov"),
        ("seq_len", 0, "markov"),
        ("data.eval_batches", 0, "markov"),
        ("data.eval_batches", -1, "text"),
        ("data.markov_branching", 0, "markov"),
        ("data.markov_branching", 257, "markov"),  # more successors than tokens (vocab 256)
    ],
)
def test_sizes_no_batch_can_have_are_named_at_build_time(key, value, data):
    c = _config(data, **{key: value})
    with pytest.raises(ValueError, match=rf"config: {key}={value} must be an integer >= 1"):
        pretrain.build_task(c, make_mesh({"data": -1}))


def test_the_held_out_text_refuses_eval_batches_below_one_itself():
    """Distillation builds its held-out text here without build_task's check."""
    c = _config("text", **{"data.eval_batches": 0})
    with pytest.raises(ValueError, match=r"data\.eval_batches=0 must be an integer >= 1"):
        pretrain.text_eval_batches(c, tokenizer=None)


def test_the_smallest_sizes_are_accepted():
    c = _config(batch_size=8, seq_len=1, **{"data.eval_batches": 1, "data.markov_branching": 1})
    pretrain.check_sizes(c)  # seq_len 1: one (input, target) pair a row
    loop.check_cadence(_config(total_steps=1))


@pytest.mark.parametrize("steps", [0, -5])
def test_total_steps_below_one_is_refused_before_anything_is_built(tmp_path, steps):
    with pytest.raises(ValueError, match=rf"config: total_steps={steps} must be an integer >= 1"):
        pretrain.run(_config(total_steps=steps), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(global_batch=0), "global_batch=0"),
        (dict(seq_len=0), "seq_len=0"),
        (dict(branching=0), "branching=0"),
        (dict(branching=17), "branching=17 must be <= vocab_size=16"),
    ],
)
def test_markov_stream_names_the_argument(kwargs, name):
    args = {"vocab_size": 16, "seq_len": 8, "global_batch": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"MarkovStream: {name}"):
        MarkovStream(**args)
