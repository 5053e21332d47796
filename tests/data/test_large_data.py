"""Host-side data paths stay linear, and do each piece of work once, on datasets far bigger
than the other tests use (500k SFT chats, 1M RL prompts, 10M documents against a large
decontamination set, 50k-item evaluation tasks).

No wall-clock assertion: each test counts operations — calls of a tokenizer's encode, of the
record-field config, of a permutation, elements sorted — whose number is what grew with the
data before (a large-data complexity review measured them; the causes are commented where they
were fixed).
"""

import json
import types

import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import rl_common
from flaxlm.data import chat_records, chat_template, dedup
from flaxlm.data import formats as F
from flaxlm.data.tokenizer import CHAT_TOKENS
from flaxlm.data.tokenizer import train as train_tokenizer
from flaxlm.evaluation import harness, tasks

WORDS = ("the river forest answer is a of and to that have with city people name mountain lake "
         "born year lives works blue green red question paris london").split()  # fmt: skip


def _sentence(i: int, n: int = 8) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i}."


@pytest.fixture(scope="module")
def tok():
    texts = [_sentence(i, 12) for i in range(400)] + [" ".join(CHAT_TOKENS)]
    return train_tokenizer(texts, 300)


class _Counting:
    """Wraps a tokenizer: counts `encode` calls (everything else is passed through)."""

    def __init__(self, tok):
        self._tok, self.calls = tok, 0

    def encode(self, text, **kw):
        self.calls += 1
        return self._tok.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


# --- SFT / preference rendering ------------------------------------------------------------------


def test_render_chat_builds_the_field_names_once_not_per_conversation(tok, monkeypatch):
    """`render_chat` checked each conversation with a fresh `fields_config()` ConfigDict (11
    ml_collections setattrs, each calling dir()): a third of rendering preference pairs."""
    template = F.ChatTemplate(tok)
    calls = []
    real = chat_records.fields_config
    monkeypatch.setattr(chat_template, "fields_config",
                        lambda: calls.append(1) or real())  # fmt: skip
    rows = [({"prompt": _sentence(i), "chosen": _sentence(i + 1), "rejected": _sentence(i + 2)},
             f"mem:{i + 1}") for i in range(50)]  # fmt: skip
    report = F.DataReport()
    out = F.render_preferences(rows, template, 128, report=report)
    assert len(out) == 50 and report.used == 50
    assert len(calls) <= 1  # (not 100: one per side of every pair)


# --- RL prompts ----------------------------------------------------------------------------------


def _rl_config():
    from flaxlm.alignment import common

    c = ml_collections.ConfigDict()
    c.data = common.data_config("", "")
    c.rollout = ml_collections.ConfigDict({"max_prompt_len": 24})
    return c


def test_rl_prompts_are_tokenized_once_each(tok, tmp_path):
    """`load_prompts` rendered every prompt twice — once uncut to measure it, once cut to
    `max_prompt_len` — though only an overlength prompt needs the second render."""
    path = tmp_path / "prompts.jsonl"
    n = 40
    with open(path, "w") as f:
        for i in range(n):  # every 10th prompt is over max_prompt_len (cut from the left)
            f.write(json.dumps({"prompt": _sentence(i, 30 if i % 10 == 0 else 4)}) + "\n")
    counting = _Counting(tok)
    template = F.ChatTemplate(counting)
    long = [i for i in range(n) if len(F.render_prompt(
        [{"role": "user", "content": _sentence(i, 30 if i % 10 == 0 else 4)}], template,
        1 << 30)[0]) > 24]  # fmt: skip
    assert 0 < len(long) < n
    report = F.DataReport()
    counting.calls = 0
    out = rl_common.load_prompts(str(path), _rl_config(), template, report)
    assert len(out) == n and report.truncated == len(long)
    assert all(len(p["ids"]) <= 24 for p in out)
    assert counting.calls == n + len(long)  # (2n before: every prompt rendered twice)
    # the same ids as rendering each prompt cut to the budget
    for p, i in zip(out, range(n)):
        want, _ = F.render_prompt(p["messages"], F.ChatTemplate(tok), 24)
        assert p["ids"].tolist() == want.tolist(), i


def test_prompt_cursor_shuffles_once_per_epoch_not_per_rollout(monkeypatch):
    """`PromptCursor.take` drew the epoch's permutation of all N prompts at every call: N
    elements per rollout of a few prompts, quadratic over an epoch of 1M prompts."""
    made = []
    real = np.random.default_rng

    def counting_rng(seed):
        made.append(tuple(seed))
        return real(seed)

    reference = rl_common.PromptCursor(100, seed=3)
    want = [reference._order().tolist(), None]
    reference.epoch = 1
    want[1] = reference._order().tolist()
    monkeypatch.setattr(rl_common.np.random, "default_rng", counting_rng)
    cursor = rl_common.PromptCursor(100, seed=3)
    got = [i for _ in range(50) for i in cursor.take(3)]  # 150 prompts: into the second epoch
    assert got == want[0] + want[1][:50]
    assert len(made) == 2  # one permutation per epoch (51 before: one per take)
    state = cursor.get_state()
    again = rl_common.PromptCursor(100, seed=3)
    again.set_state(state)
    assert again.take(5) == cursor.take(5) == want[1][50:55]


# --- decontamination -----------------------------------------------------------------------------


def test_decontamination_lookup_does_not_sort_the_eval_table_per_document(monkeypatch):
    """`Decontaminator.hits` looked a document's n-grams up with `np.isin` against the whole
    eval n-gram table: numpy concatenates and sorts both per call, so each document cost
    O(T log T) in the table size T — quadratic when a 10M-document corpus meets a large eval
    set (a 16k-document run with 1.6k eval items took 126 s instead of 3 s). The table is
    sorted once; a lookup is a binary search per n-gram."""
    evals = [" ".join(_sentence(i, 20) for _ in range(2)) + f" item{i}" for i in range(300)]
    d = dedup.Decontaminator(evals, n=5)
    assert len(d.table) > 1000
    docs = [evals[3], "nothing of the eval set here at all, not one shared five word run", evals[7]
            + " and " + _sentence(999, 30)]  # fmt: skip
    table = set(d.table.tolist())
    want = [len(set(dedup._ngrams_exact(t, 5).tolist()) & table) for t in docs]
    sorted_elems = []
    for name in ("concatenate", "sort", "argsort"):
        real = getattr(np, name)

        def counted(a, *args, _real=real, **kw):
            sorted_elems.append(sum(np.size(x) for x in a) if isinstance(a, (list, tuple))
                                else np.size(a))  # fmt: skip
            return _real(a, *args, **kw)

        monkeypatch.setattr(np, name, counted)
    got = [d.hits(t) for t in docs]
    monkeypatch.undo()
    assert got == want and got[0] > 0 and got[1] == 0
    # numpy work per lookup is the document's n-grams, never the eval table
    assert sum(sorted_elems) < len(d.table)


# --- evaluation ----------------------------------------------------------------------------------


def _mc_task(tmp_path, n: int, **kw) -> tasks.TaskSpec:
    path = tmp_path / "mc.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            row = {"question": _sentence(i), "choices": [_sentence(i + k, 3) for k in range(4)],
                   "answer": i % 4}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return tasks.TaskSpec("mc", "multiple_choice", str(path), fields={"context": "question"},
                          template="Question: {context}\nAnswer:", **kw)  # fmt: skip


class _Scorer:
    """Stands in for the model: a choice's log-prob is minus its token count."""

    max_len = 4096

    def score(self, flat):
        return [types.SimpleNamespace(logprob=-float(len(c)), n_tokens=len(c), truncated=False)
                for _, c in flat]  # fmt: skip


def _evaluator(tok):
    ev = harness.Evaluator.__new__(harness.Evaluator)  # no model: the host side only
    ev.cfg, ev.tok, ev.bos = types.SimpleNamespace(max_seq_len=4096), tok, True
    ev.scorer, ev._template = _Scorer(), None
    return ev


def test_multiple_choice_tokenizes_each_context_once(tok, tmp_path):
    """Plain-mode multiple choice encoded every question's few-shot context 1 + c times for c
    choices: once for prompt ids it never used and once more in each choice's
    `split_continuation`; now once, plus the c joined texts."""
    n, c = 30, 4
    spec = _mc_task(tmp_path, n, num_fewshot=3)
    counting = _Counting(tok)
    reference = _evaluator(tok).run(spec)
    got = _evaluator(counting).run(spec)
    assert got["metrics"] == reference["metrics"] and got["n"] == n
    assert [s["prompt"] for s in got["samples"]] == [s["prompt"] for s in reference["samples"]]
    assert counting.calls == n * (1 + c)  # (n * (1 + 2c) before)


def test_few_shot_pool_from_the_task_file_is_read_once(tok, tmp_path, monkeypatch):
    """A task whose shots come from its own file read (and held) that file twice."""
    spec = _mc_task(tmp_path, 20, num_fewshot=2)
    reads = []
    real = tasks.read_examples
    monkeypatch.setattr(harness, "read_examples", lambda *a, **kw: reads.append(kw) or real(*a,
                        **kw))  # fmt: skip
    full = _evaluator(tok).run(spec)
    assert len(reads) == 1
    reads.clear()
    limited = _evaluator(tok).run(spec, limit=5)  # the pool is still the whole file
    assert len(reads) == 2 and limited["n"] == 5
    assert [s["prompt"] for s in limited["samples"]] == [s["prompt"] for s in full["samples"][:5]]
