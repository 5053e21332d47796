"""Mutation testing, round 6: data/dedup.py, data/packing.py and data/chat_template.py
behaviours the other tests left open, each checked against a reference written here (a
brute-force search, a hand-built row, python-int hashing), not against the code's own text."""

import numpy as np
import pytest
from scipy.integrate import quad

from flaxlm.data import dedup
from tests.data.test_pipeline import _ListDocs

# ---------------------------------------------------------------------------------------------
# dedup


def _banding_reference(threshold: float, num_perm: int) -> tuple[int, int]:
    """Every (bands, rows) with bands * rows <= num_perm, FP + FN area by adaptive quadrature."""
    best = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0, threshold)[0]
            fn = quad(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1)[0]
            if best is None or fp + fn < best[0]:
                best = (fp + fn, (b, r))
    return best[1]


@pytest.mark.parametrize("num_perm", [8, 16])
def test_optimal_bands_is_the_best_of_every_banding_that_fits(num_perm):
    """Including the bandings that use every permutation (rows = num_perm // bands): at 16
    permutations most optima are such (0.6 → 4 x 4, 0.8 → 2 x 8)."""
    for t in (0.3, 0.5, 0.6, 0.8, 0.9):
        assert dedup.optimal_bands.__wrapped__(t, num_perm) == _banding_reference(t, num_perm), t


def _minhash_reference(hasher: dedup.MinHasher, shingle_set: np.ndarray) -> np.ndarray:
    """min over shingles of the high 32 bits of (a·x + b) mod 2^64, in python ints."""
    if not len(shingle_set):
        return np.full(hasher.num_perm, 0xFFFFFFFF, np.uint32)
    a, b = [int(v) for v in hasher.a], [int(v) for v in hasher.b]
    xs = [int(x) for x in shingle_set]
    return np.array(
        [min(((ap * x + bp) % 2**64) >> 32 for x in xs) for ap, bp in zip(a, b)], np.uint32
    )


def test_signatures_of_documents_after_an_empty_one_stay_in_their_rows():
    """An empty document first or between others keeps its all-0xFFFFFFFF row, and every other
    row is its own document's signature (a brute-force MinHash)."""
    texts = ["", "alpha beta gamma delta epsilon zeta", "", "one two three four five six seven"]
    sets = [dedup.shingles(t, 3) for t in texts]
    h = dedup.MinHasher(16, seed=3)
    sigs = h.signatures(sets)
    for s, row in zip(sets, sigs):
        np.testing.assert_array_equal(row, _minhash_reference(h, s))
    assert (sigs[0] == 0xFFFFFFFF).all() and (sigs[2] == 0xFFFFFFFF).all()


def test_an_eval_text_of_exactly_n_words_is_not_too_short():
    """n words give one n-gram: it can match, so the report does not count it as too short."""
    exact = " ".join(f"w{i}" for i in range(13))
    short = " ".join(f"w{i}" for i in range(12))
    d = dedup.Decontaminator([exact, short, exact + " w13"], n=13)
    assert d.summary() == {"eval_texts": 3, "ngrams": 2, "too_short": 1, "ngram": 13}
    assert d.hits("prefix " + exact) == 1


def test_an_eval_item_of_several_forms_has_the_ngrams_of_all_of_them():
    """An item given as (raw, cleaned) forms matches a document sharing an n-gram with either;
    it is too short only when no form has an n-gram."""
    raw = " ".join(f"r{i}" for i in range(5))
    cleaned = " ".join(f"c{i}" for i in range(5))
    d = dedup.Decontaminator([(raw, cleaned), ("r1 r2", "c1")], n=5)
    assert d.summary() == {"eval_texts": 2, "ngrams": 2, "too_short": 1, "ngram": 5}
    assert d.hits("x " + raw) == 1 and d.hits(cleaned + " y") == 1 and d.hits("r1 r2 c1") == 0


@pytest.mark.parametrize(
    "key,value",
    [("threshold", 1.0), ("threshold", 0.0), ("ngram", 0), ("decontam_ngram", 0), ("bands", 129)],
)
def test_dedup_settings_outside_their_range_are_refused(key, value):
    """Threshold 1 (no Jaccard lies above it), 0-word shingles or n-grams, more bands than
    permutations: each an error naming the key."""
    cfg = dedup.dedup_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=f"dedup.{key}"):
        dedup.check_config(cfg)


def test_dedup_settings_at_their_bounds_are_accepted():
    cfg = dedup.dedup_config()
    cfg.update(ngram=1, decontam_ngram=1, bands=cfg.num_perm, threshold=0.999)
    dedup.check_config(cfg)


def test_explicit_bands_take_every_permutation_that_fits():
    """``bands`` set: rows = num_perm // bands (16 / 4 = 4, 128 / 9 = 14), what the report says."""
    cfg = dedup.dedup_config()
    cfg.update(num_perm=16, bands=4)
    assert dedup.lsh_params(cfg) == (4, 4)
    cfg.update(num_perm=128, bands=9)
    assert dedup.lsh_params(cfg) == (9, 14)
    assert dedup.Deduper(cfg).report()["lsh"] == {"bands": 9, "rows": 14, "threshold": 0.8}


def test_report_keeps_three_examples_per_reason():
    d = dedup.Deduper()
    text = "the same document word for word, again and again"
    d.keep_batch([text] * 5, [f"f:{i}" for i in range(5)])
    assert d.removed == {"exact_duplicate": 4}
    assert [e.split(":")[1] for e in d.examples["exact_duplicate"]] == ["1", "2", "3"]


def test_an_exact_copy_of_a_contaminated_document_counts_as_a_duplicate():
    """Exact dedup runs first: the first copy is dropped as contaminated, the second as the
    exact duplicate it is (each document is counted under one reason, its first stage's)."""
    ev = " ".join(f"e{i}" for i in range(13))
    for mode in ("drop", "flag"):
        cfg = dedup.dedup_config()
        cfg.decontam_mode = mode
        d = dedup.Deduper(cfg, eval_texts=[ev])
        assert d.keep_batch(["intro " + ev, "intro " + ev]) == [mode == "flag", False]
        want = {"exact_duplicate": 1, **({"contaminated": 1} if mode == "drop" else {})}
        assert d.removed == want, mode
        assert d.flagged == (mode == "flag")


# ---------------------------------------------------------------------------------------------
# packing


# (_ListDocs: the list-backed document iterator of test_pipeline.py)


def test_a_resume_where_another_document_of_the_same_length_stands_starts_it_whole(caplog):
    """The saved state names the document being cut by its content, not its length alone: a
    different 10-token document at that position is read from its start (with a warning),
    not from the saved offset 4 into it."""
    from flaxlm.data.packing import PackedBatchIterator

    kw = dict(seq_len=4, batch=1, pad_id=0)
    it = PackedBatchIterator(_ListDocs([range(10, 20)]), **kw)
    next(it)
    state = it.get_state()
    assert state["carry"] and state["offset"] == 4
    other = PackedBatchIterator(_ListDocs([range(50, 60)]), **kw)
    other.set_state(state)
    np.testing.assert_array_equal(next(other)["tokens"][0], [50, 51, 52, 53])
    assert "not the one at that position now" in caplog.text
    same = PackedBatchIterator(_ListDocs([range(10, 20)]), **kw)
    same.set_state(state)  # the same document: resumed at its offset
    np.testing.assert_array_equal(next(same)["tokens"][0], [14, 15, 16, 17])


# ---------------------------------------------------------------------------------------------
# chat_template


def test_split_reasoning_splits_at_the_last_marker_and_drops_the_answers_leading_space():
    from flaxlm.data.chat_template import split_reasoning

    text = "<think>is it </think>? no</think> \n The answer is 5."
    assert split_reasoning(text, "</think>") == ("<think>is it </think>? no", "The answer is 5.",
                                                 False)  # fmt: skip
    assert split_reasoning("still thinking", "</think>") == ("still thinking", "", True)
    assert split_reasoning("</think>", "</think>") == ("", "", False)


class _FakeHFTok:
    """Just what JinjaChatTemplate reads of an HF tokenizer (a template that fails the probe
    conversation: its end id is then the first stop id)."""

    name, chat_template, eos_id, bos_id, stop_ids = "fake", "{{ fail }}", 2, -1, (2, 7)

    def __init__(self, bos):
        self.bos_token_id = bos

    def render_chat_text(self, *a, **kw):
        raise RuntimeError("no probe")


def test_jinja_head_is_a_leading_bos_only():
    """The leading ids truncation never cuts: the template's BOS when the ids start with it,
    nothing otherwise (or without a BOS)."""
    from flaxlm.data.chat_template import JinjaChatTemplate

    t = JinjaChatTemplate(_FakeHFTok(bos=1))
    assert (t.end_id, t.stop_tokens) == (2, (2, 7))
    assert [t.head(ids) for ids in ([1, 5, 6], [5, 1, 6], [], [1])] == [1, 0, 0, 1]
    assert JinjaChatTemplate(_FakeHFTok(bos=-1)).head([5, 6]) == 0


def test_a_blank_reasoning_content_renders_with_flaxlms_template(chat_tokenizer):
    """A whitespace-only `reasoning_content` loses nothing: the turn renders as without it;
    a real one needs a Jinja template (flaxlm's has no format for it)."""
    from flaxlm.data.chat_template import ChatTemplate, TemplateError, render_chat

    t = ChatTemplate(chat_tokenizer[1])
    conv = [{"role": "user", "content": "where does Kavo live"},
            {"role": "assistant", "content": "in Brel"}]  # fmt: skip
    ids, mask = render_chat(conv, t)
    blank = [conv[0], {**conv[1], "reasoning_content": " \n "}]
    got_ids, got_mask = render_chat(blank, t)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_mask, mask)
    with pytest.raises(TemplateError, match="reasoning"):
        render_chat([conv[0], {**conv[1], "reasoning_content": "say yes"}], t)


class _CharTok:
    """A tokenizer with flaxlm's chat tokens: one id per character (100 + its code)."""

    name, eos_id = "chars", 2

    def __init__(self, bos_id):
        self.bos_id = bos_id

    def special_ids(self):
        from flaxlm.data.chat_records import ROLES

        return {f"<|{r}|>": 10 + k for k, r in enumerate(ROLES)} | {"<|end|>": 9}

    def encode(self, text):
        return [100 + ord(c) for c in text]


@pytest.mark.parametrize("bos", [1, -1])
def test_flaxlm_template_opens_with_bos_only_when_the_tokenizer_has_one(bos):
    """Qwen2's tokenizer has no BOS (id -1): the conversation starts at its first role token,
    not with a -1 (the embedding would wrap it to the last row)."""
    from flaxlm.data.chat_records import ROLES
    from flaxlm.data.chat_template import ChatTemplate, render_chat

    tok = _CharTok(bos)
    role = {r: 10 + k for k, r in enumerate(ROLES)}
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = render_chat(conv, ChatTemplate(tok))
    body = [role["user"], 204, 205, 9, role["assistant"], 221, 211, 9, 2]
    assert ids.tolist() == ([1] if bos >= 0 else []) + body
    assert mask.tolist() == [0.0] * (len(ids) - 4) + [1.0, 1.0, 1.0, 0.0]


TRIMMING_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + (m.content | trim)"
    " + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_stop_token_in_an_answer_a_trimming_template_renders_is_trained_whole(
    tmp_path, byte_chat_tokenizer
):
    """A template that trims the content renders it otherwise as it is: the answer is found
    (stripped) in the text, so one that spells the stop token "<|im_end|>" trains whole, up to
    the template's own <|im_end|> after it, rather than being dropped as stop_in_content."""
    from flaxlm.data.chat_template import render_chat, training_template
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "tok"), TRIMMING_CHATML))
    t = training_template(tok)
    answer = "  says <|im_end|> then stops \n"
    ids, mask = render_chat([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": answer}], t)  # fmt: skip
    trained = [int(i) for i, m in zip(ids, mask) if m]
    assert trained == tok.encode(answer.strip()) + [t.end_id]
    assert t.end_id in tok.encode(answer.strip())  # (the answer does spell the stop id)


def test_jinja_truncation_floor_is_the_end_of_the_message_before_the_final_answers(
    tmp_path, byte_chat_tokenizer
):
    """`_render_jinja`'s keep_from: the ids of the messages before the trailing assistant
    turns (what truncation may not cut into), 0 when the conversation is assistant turns only."""
    from flaxlm.data.chat_template import _render_jinja, training_template
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "tok"), TRIMMING_CHATML))
    t = training_template(tok)
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    user_ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    for msgs, want in (([u, a], len(user_ids)), ([u, a, a], len(user_ids)), ([a], 0),
                       ([a, a], 0)):  # fmt: skip
        ids, mask, keep, head = _render_jinja(msgs, t)
        assert (keep, head) == (want, 0), msgs
        assert ids[:keep].tolist() == user_ids[:keep]
