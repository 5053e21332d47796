"""Chat-mode multiple choice and win rate score an answer's ids as training renders them
(evaluation/chat_answer.py): with a Jinja chat template the conversation is tokenized whole, so
a SentencePiece answer has no "▁" after `[/INST]` and a byte-level one keeps the "Ġ" of
`ASSISTANT: Paris`; win-rate rows are the reward-training rows, truncation included; and bad
prompts in completion files fail by line before the reward model loads."""

import json

import numpy as np
import pytest

from flaxlm.data.formats import render_chat, render_preferences, training_template
from flaxlm.evaluation import winrate
from flaxlm.evaluation.harness import Evaluator
from flaxlm.evaluation.loglik import ContinuationScore
from flaxlm.evaluation.tasks import TaskSpec
from flaxlm.models.config import ModelConfig

# Mistral-7B-Instruct v0.1/v0.2's template (abridged): the answer follows `[/INST]` directly.
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}"
           "{% endif %}{% endfor %}")  # fmt: skip
# Vicuna-style: a space between the header and the answer, which a byte-level BPE merges in.
VICUNA = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
          "{% else %}ASSISTANT: {{ m['content'] }}</s>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT:{% endif %}")  # fmt: skip
WORDS = ["Paris", "Rome"]


def _hf_tok(d, kind: str, template: str, merge_words=()):
    """An HF tokenizer directory: `metaspace` (SentencePiece-style, as Llama 2's / Mistral's
    tokenizer.json) or `bytelevel` BPE; merges spell WORDS with and without their leading
    space mark, so an answer encoded alone and in place give different ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from flaxlm.models.hf_tokenizer import load_tokenizer

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    if kind == "metaspace":
        alpha, mark = ["▁"] + [c for c in chars if c != " "], "▁"
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        dec = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        alpha, mark = sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġ"
        pre, dec = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    vocab, merges = {c: i for i, c in enumerate(alpha)}, []
    for w in [*merge_words, *(mark + w for w in WORDS), *WORDS]:
        for k in range(2, len(w) + 1):
            if w[:k] not in vocab:
                merges.append((w[: k - 1], w[k - 1]))
                vocab[w[:k]] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer, tk.decoder = pre, dec
    tk.add_special_tokens(["<s>", "</s>"])
    d.mkdir()
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))  # fmt: skip
    return load_tokenizer(str(d / "tokenizer.json"))


class _Recorder:
    """A scorer that records the (context, continuation) requests it is given."""

    max_len = 255

    def __init__(self):
        self.seen = []

    def score(self, reqs):
        self.seen.extend(reqs)
        return [ContinuationScore(-float(len(c)), len(c), False) for _, c in reqs]


def _mc_requests(tmp_path, tok, rows, **spec):
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = Evaluator(ModelConfig(vocab_size=512, max_seq_len=256), None, tok)
    ev.scorer = _Recorder()
    ev.run(TaskSpec("mc", "multiple_choice", str(f), chat=True, **spec))
    return ev.scorer.seen


@pytest.mark.parametrize("kind,template", [("metaspace", MISTRAL), ("bytelevel", VICUNA)])
def test_chat_multiple_choice_scores_the_ids_sft_trains(tmp_path, kind, template):
    tok = _hf_tok(tmp_path / "tok", kind, template)
    rows = [{"context": f"Capital of {c}?", "choices": WORDS, "answer": 0}
            for c in ("France", "Italy")]  # fmt: skip
    seen = _mc_requests(tmp_path, tok, rows, num_fewshot=1)  # each row the other's shot
    t = training_template(tok)
    assert len(seen) == 4
    for n, (ctx, cont) in enumerate(seen):
        shot, q = rows[1 - n // 2], rows[n // 2]
        msgs = [{"role": "user", "content": shot["context"]},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": q["context"]},
                {"role": "assistant", "content": WORDS[n % 2]}]  # fmt: skip
        ids, mask = render_chat(msgs, t)  # what SFT trains: the whole text tokenized once
        stop = int(np.flatnonzero(mask)[-1])  # the final answer's stop id; its ids before it
        start = stop + 1 - int(np.argmin(mask[stop::-1]))  # where that run of targets starts
        assert list(ctx) == ids[:start].tolist()
        assert list(cont) == ids[start:stop].tolist()  # the stop id is not scored
        names = [tok.tok.id_to_token(i) for i in cont]
        # what the old harness scored (the choice encoded alone) differs from the template's
        assert names == ([WORDS[n % 2]] if kind == "metaspace" else ["Ġ" + WORDS[n % 2]])
        assert list(cont) != tok.encode(WORDS[n % 2])


def test_chat_multiple_choice_with_flaxlms_template_is_unchanged(tmp_path, chat_tokenizer):
    """flaxlm's own template encodes each turn's content on its own: the continuation is the
    choice encoded alone after the generation prompt, as before and as SFT trains it."""
    _, tok = chat_tokenizer
    seen = _mc_requests(tmp_path, tok, [{"context": "where does Kavo live",
                                         "choices": ["in Brel", "yes"], "answer": 0}])  # fmt: skip
    prompt = render_chat([{"role": "user", "content": "where does Kavo live"}], tok,
                         add_generation_prompt=True)[0].tolist()  # fmt: skip
    assert seen == [(prompt, tok.encode("in Brel")), (prompt, tok.encode("yes"))]
    for ctx, cont in seen:  # and SFT trains exactly these ids, then `<|end|>`
        msgs = [{"role": "user", "content": "where does Kavo live"},
                {"role": "assistant", "content": tok.decode(cont)}]  # fmt: skip
        ids, mask = render_chat(msgs, tok)
        assert ids[np.flatnonzero(mask)].tolist() == [*cont, tok.token_id("<|end|>")]
        assert ids[: len(ctx)].tolist() == ctx


def test_chat_choice_merging_into_the_generation_prompt_is_an_error(tmp_path):
    # the answer follows "ASSISTANT" directly: a merge "TP" (ranked first) crosses the turn
    template = VICUNA.replace("ASSISTANT: {{", "ASSISTANT{{").replace(
        "ASSISTANT:{% endif", "ASSISTANT{% endif"
    )
    tok = _hf_tok(tmp_path / "tok", "bytelevel", template, merge_words=["TP"])
    with pytest.raises(
        ValueError,
        match=r"mc\.jsonl:1: task 'mc': choice 0 \('Paris'\) cannot "
        r"be scored as the chat template renders it \(template_boundary\)",
    ):
        _mc_requests(tmp_path, tok, [{"context": "Capital?", "choices": WORDS, "answer": 0}])


def _scored_rows(monkeypatch, tok, max_len, prompts, responses):
    """The rows reward_model_scorer feeds the reward model (its forward replaced by a recorder)."""
    import jax

    from flaxlm.models import heads

    rows = []

    def apply(params, tokens, positions, seg):
        rows.extend(list(map(int, t[s > 0])) for t, s in zip(tokens, seg))
        return np.zeros(tokens.shape, np.float32)

    monkeypatch.setattr(heads, "scalar_model_fns", lambda cfg: (None, apply))
    monkeypatch.setattr(jax, "jit", lambda f: f)
    cfg = ModelConfig(vocab_size=512, max_seq_len=max_len)
    winrate.reward_model_scorer(cfg, None, tok, batch_size=2)(prompts, responses)
    return rows[: len(prompts)]  # (a batch's padding rows after them)


@pytest.mark.parametrize("kind,template", [("metaspace", MISTRAL), ("bytelevel", VICUNA)])
def test_win_rate_rows_are_the_reward_training_rows(tmp_path, monkeypatch, kind, template):
    tok = _hf_tok(tmp_path / "tok", kind, template)
    prompt, L = "Capital of France?", 256
    rows = _scored_rows(monkeypatch, tok, L, [prompt] * 2, WORDS)
    rec = {"prompt": prompt, "chosen": WORDS[0], "rejected": WORDS[1]}
    pair = render_preferences([(rec, "x:1")], training_template(tok), L)[0]
    # a training row's inputs are ids[:-1]: the last is the stop id, where the reward is read
    assert rows == [pair["chosen"][0][:-1].tolist(), pair["rejected"][0][:-1].tolist()]
    assert rows[0][-1] == tok.eos_id


def test_win_rate_truncates_as_reward_training_does(tmp_path, monkeypatch):
    tok = _hf_tok(tmp_path / "tok", "metaspace", MISTRAL)
    L, prompt = 32, "Capital of France? " * 4
    rows = _scored_rows(monkeypatch, tok, L, [prompt], [" Paris"])
    rec = {"prompt": prompt, "chosen": " Paris", "rejected": " Rome"}
    pair = render_preferences([(rec, "x:1")], training_template(tok), L)[0]
    assert len(rows[0]) == L and rows[0][0] == tok.token_id("<s>")  # the BOS kept, as trained
    assert rows[0] == pair["chosen"][0][:-1].tolist()
    # an answer longer than the row (training drops the pair): BOS and the row's end kept
    long = "Paris " * 40
    row = _scored_rows(monkeypatch, tok, L, ["Hi"], [long])[0]
    full = render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long}],
                       training_template(tok))[0].tolist()[:-1]  # fmt: skip
    assert row == full[:1] + full[-(L - 1) :]


def test_a_blank_answer_renders_through_a_jinja_template(tmp_path):
    """A model that stopped at once answers "": with a Jinja template the conversation is the
    template's own rendering of an empty assistant turn (then the one untrained id after the
    stop id), its answer span empty (start == stop, the stop id right after the prompt)."""
    from flaxlm.evaluation.chat_answer import render_answer

    tok = _hf_tok(tmp_path / "tok", "metaspace", MISTRAL)
    msgs = [{"role": "user", "content": "Capital of France?"}]
    r = render_answer(training_template(tok), msgs, "")
    whole = tok.render_chat_template(msgs + [{"role": "assistant", "content": ""}],
                                     add_generation_prompt=False)  # fmt: skip
    assert r.ids[:-1].tolist() == whole
    assert r.start == r.stop == len(whole) - 1 and whole[-1] == tok.eos_id


def test_bad_prompt_messages_fail_by_line_before_the_reward_model_loads(tmp_path):
    good = json.dumps({"prompt": "where does Kavo live", "completion": "in Brel"})
    bad = [
        ([{"role": "bot", "content": "x"}], r"prompt\[0\] has unknown role 'bot'"),
        ([{"content": "x"}], r"prompt\[0\] lacks 'role'/'content'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}],
         "the last message is an assistant turn"),
    ]  # fmt: skip
    for prompt, match in bad:
        f = tmp_path / "c.jsonl"
        f.write_text(good + "\n" + json.dumps({"prompt": prompt, "completion": "yes"}) + "\n")
        with pytest.raises(ValueError, match=rf"c\.jsonl:2: prompt must be .*{match}"):
            winrate.read_completions(str(f))
        # the command line stops with that one line, before looking at the reward model
        with pytest.raises(SystemExit, match=rf"c\.jsonl:2: .*{match}"):
            winrate.main([str(f), str(f), "--reward_model", str(tmp_path / "no_run")])
