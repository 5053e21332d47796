"""Config keys that do not change the training batches are no data-order change on a resume
(train/loop_resume.py): data.read_threads / data.prefetch / data.on_changed_sources at info,
the held-out data keys as such; each counted as a different data order before."""

import json
import logging

import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.configs.common import override
from flaxlm.data import pipeline
from flaxlm.train import loop_resume


def test_the_neutral_data_keys_draw_the_same_batches(tmp_path, chat_tokenizer):
    """What makes them neutral: a resume with other values reads exactly the batches the
    uninterrupted run does (a mixture, split packing, 2 epochs)."""
    tok_path, _ = chat_tokenizer
    paths = []
    for name, n in (("a", 23), ("b", 17)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": f"where does Kavo live {name} {i} " * (i % 5 + 1)})
                             + "\n" for i in range(n)))  # fmt: skip
        paths.append(str(p))

    def make(**kw):
        c = pipeline.data_config()
        c.sources, c.tokenizer, c.num_epochs = f"{paths[0]}:2,{paths[1]}:1", tok_path, 2
        c.update(kw)
        return pipeline.make_pretrain_iterator(c, seq_len=16, global_batch=2, seed=4,
                                               process_index=0, process_count=1)  # fmt: skip

    ref = make(read_threads=0, prefetch=256)
    for _ in range(5):
        next(ref)
    state = json.loads(json.dumps(ref.get_state()))
    want = list(ref)
    c = pretrain_config.get_config("variant=tiny")
    neutral = {k.split(".")[1]: v for k, v in
               {"data.read_threads": 5, "data.prefetch": 2, "data.on_changed_sources": "warn",
                "data.eval_sources": "x.jsonl", "data.eval_batches": 9}.items()}  # fmt: skip
    assert set(f"data.{k}" for k in neutral) <= set(loop_resume.ORDER_NEUTRAL_DATA_KEYS) | set(
        loop_resume.EVAL_DATA_KEYS
    )
    assert all(k in c.data for k in neutral)
    it = make(**neutral)
    it.set_state(state)
    got = list(it)
    assert len(got) == len(want) > 3
    for a, b in zip(got, want):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    "changed",
    [{"data.read_threads": 16, "data.prefetch": 1024}, {"data.on_changed_sources": "warn"},
     {"data.eval_sources": "heldout.jsonl", "data.eval_batches": 9}],
)  # fmt: skip
def test_a_resume_with_neutral_data_keys_is_no_data_order_change(changed, caplog):
    saved = pretrain_config.get_config("variant=tiny").to_dict()
    now = pretrain_config.get_config("variant=tiny")
    override(now, changed)
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        changes = loop_resume._report_config_changes(now, saved, 100)
    assert set(changes) == set(changed)  # still recorded (events.jsonl)
    assert "DIFFERENT DATA ORDER" not in caplog.text
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if "data.eval_sources" in changed:  # held-out metrics move: said so, as such
        assert len(warned) == 2 and all("held-out" in m for m in warned), warned
    else:
        assert not warned, warned
    caplog.clear()
    override(now, {"data.shuffle": False})  # a key that does change the order still warns
    with caplog.at_level(logging.INFO, logger="flaxlm"):
        loop_resume._report_config_changes(now, saved, 100)
    assert "RESUME WITH A DIFFERENT DATA ORDER: data.shuffle changed" in caplog.text


def test_each_data_order_key_warns_and_a_url_is_compared_as_written(caplog):
    """seed, batch_size and seq_len change which batches a resumed run draws: each is named
    in the data-order warning. A URL or spec in a data path key is compared as written (in a
    bucket "a/../x" is another object than "x"; only local paths are resolved), and values
    that are not path lists differ when they differ."""
    saved = pretrain_config.get_config("variant=tiny").to_dict()
    for key, value in [("seed", 7), ("batch_size", 3), ("seq_len", 48)]:
        now = pretrain_config.get_config("variant=tiny")
        override(now, {key: value})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="flaxlm"):
            assert set(loop_resume._report_config_changes(now, saved, 100)) == {key}
        assert f"RESUME WITH A DIFFERENT DATA ORDER: {key} changed" in caplog.text
    assert not loop_resume._same_paths("data.sources", "gs://b/a/../x", "gs://b/x")
    assert loop_resume._same_paths("data.sources", "gs://b/x:0.5", " gs://b/x:0.5")
    assert not loop_resume._same_paths("data.sources", ["a"], ["b"])
