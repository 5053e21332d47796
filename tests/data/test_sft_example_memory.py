"""Host memory of rendered SFT examples (`sft.load_examples` -> `render_sft`), and that holding
them compactly changed no training or held-out batch, loss mask or order.

Every example kept, for the whole run, its record's messages (a list of dicts of strings), meta
and tools besides its ids and mask; SFT reads only the ids, the mask and the location ("loc",
which names the file a resume's fingerprint checks): generation eval reads its prompts itself
(`rl_eval.heldout_sets`). Now `sft` asks `render_sft(compact=True)` for {"ids" int32,
"mask" bool, "loc"}; the default (full) examples are unchanged for the stages that render a
prompt from the messages again (distill's GKD mix, `prompts_of`).
"""

import json
import tracemalloc

import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import common, sft
from flaxlm.data import formats as F
from tests.evaluation.test_perplexity_memory import _peak

WORDS = "where does Kavo live in Brel the city of 42 yes no a number say or".split()


@pytest.fixture(scope="module")
def template(chat_tokenizer):
    return F.ChatTemplate(chat_tokenizer[1])


def _write_chats(path, n, seed=0):
    """n chat records (system, user, assistant, user, assistant; ~640 characters) with a meta,
    written as jsonl."""
    rng = np.random.default_rng(seed)
    say = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": say(20)}]
            for _ in range(2):
                msgs.append({"role": "user", "content": say(int(rng.integers(30, 60)))})
                msgs.append({"role": "assistant", "content": say(int(rng.integers(5, 40)))})
            meta = {"task": "chat", "id": f"rec-{i}", "answer": say(3), "source": "test"}
            f.write(json.dumps({"messages": msgs, "meta": meta}) + "\n")
    return str(path)


def _config(train, seq_len=512):
    c = ml_collections.ConfigDict({"seq_len": seq_len, "batch_size": 4})
    c.data = common.data_config(train, "")
    return c


def _retained(fn):
    """Traced bytes still held after `fn()`, with its result alive."""
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[0], out
    finally:
        tracemalloc.stop()


def test_sft_examples_are_held_compactly(tmp_path, template):
    """Traced bytes held per example after `sft.load_examples` (records of ~640 characters,
    ~180 tokens), the growth from 100 to 400 records: on the old code 4.85 KB (int32 ids, a
    float32 mask, and the record's messages, meta and tools); now 1.40 KB (int32 ids, a bool
    mask, the loc string and the dict)."""
    n, cfg = 100, _config("")
    small, large = _write_chats(tmp_path / "s.jsonl", n), _write_chats(tmp_path / "l.jsonl", 4 * n)
    load = lambda p: sft.load_examples(p, cfg, template, F.DataReport(), compact=True)  # noqa: E731
    load(small)  # (first-call allocations out of the measurement)
    a, ex_small = _retained(lambda: load(small))
    b, ex_large = _retained(lambda: load(large))
    assert len(ex_small) == n and len(ex_large) == 4 * n
    per_example = (b - a) / (3 * n)
    assert per_example < 2_500, f"{per_example:.0f} bytes per example (the old code: 4.85 KB)"
    assert set(ex_large[0]) == {"ids", "mask", "loc"}
    assert ex_large[0]["ids"].dtype == np.int32 and ex_large[0]["mask"].dtype == bool


def test_loading_never_holds_every_raw_record(tmp_path, template):
    """The peak while loading, per record (100 -> 400): the records were read into one list
    before any was rendered (`common.records`), so every raw record was held at once, 4.6 KB
    each at the peak; SFT, pairs and KTO read them as they render them
    (`common.iter_records`), and the peak is the compact examples plus one record (1.4 KB)."""
    n, cfg = 100, _config("")
    small, large = _write_chats(tmp_path / "s.jsonl", n), _write_chats(tmp_path / "l.jsonl", 4 * n)
    load = lambda p: sft.load_examples(p, cfg, template, F.DataReport(), compact=True)  # noqa: E731
    load(small)
    per_record = (_peak(lambda: load(large)) - _peak(lambda: load(small))) / (3 * n)
    assert per_record < 2_500, f"{per_record:.0f} bytes per record at the peak (was ~4.6 KB)"


def _equal_batches(xs, ys):
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def test_compact_examples_give_the_same_batches(tmp_path, template):
    """Compact examples against the full ones (the unchanged default, what SFT trained on):
    the same examples in the same order, truncated ones included (seq_len 200), each ids and
    mask equal to the template's own rendering when not cut; every training batch of two
    shuffled epochs equal, dtypes too, and the same resume state (fingerprint); the held-out
    loss batches equal."""
    path = _write_chats(tmp_path / "c.jsonl", 60, seed=3)
    cfg, rep_full, rep_compact = _config(path, seq_len=200), F.DataReport(), F.DataReport()
    full = sft.load_examples(path, cfg, template, rep_full)
    compact = sft.load_examples(path, cfg, template, rep_compact, compact=True)
    assert rep_full.to_dict() == rep_compact.to_dict() and rep_full.truncated > 0
    assert [ex["loc"] for ex in compact] == [ex["loc"] for ex in full]
    for c, f in zip(compact, full, strict=True):
        assert np.array_equal(c["ids"], f["ids"]) and np.array_equal(c["mask"], f["mask"])
        ids, mask = F.render_chat(f["messages"], template)
        if len(ids) == len(f["ids"]):  # (not cut: the straightforward rendering)
            assert np.array_equal(c["ids"], ids) and np.array_equal(c["mask"], mask)
    kw = dict(seq_len=200, batch=4, pad_id=0, seed=7, shuffle=True, num_epochs=2, sources=path)
    a, b = F.SFTBatches(full, **kw), F.SFTBatches(compact, **kw)
    _equal_batches(list(a), list(b))
    assert a.get_state() == b.get_state()
    pad = template.tok.pad_id
    _equal_batches(sft.loss_eval_batches(full, cfg, pad), sft.loss_eval_batches(compact, cfg, pad))
