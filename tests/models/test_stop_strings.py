"""Stop strings in the decode loop (models/stop_strings.py): the automaton finds a string at
the first token after which the *decoded* text contains it — checked against decoding every
prefix, for a SentencePiece and a byte-level BPE tokenizer — and `generate` ends rows there."""

import importlib.util
import os
import random

import jax
import numpy as np
import pytest

from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from flaxlm.models.stop_strings import StopStrings, _advance, _kmp_delta
from tests.models.test_decode import random_params


def _first_found(stops: StopStrings, ids) -> int | None:
    """The automaton run on the host: index of the token at which a string is found."""
    S = len(stops.start)
    state = stops.start.copy()
    for k, t in enumerate(ids):
        state = stops.table[np.arange(S), state, t]
        if np.any(state == stops.found):
            return k
    return None


def _brute_force(tok, strings, ids) -> int | None:
    for k in range(len(ids)):
        text = tok.decode(ids[: k + 1])
        if any(s in text for s in strings):
            return k
    return None


def test_kmp_automaton_against_substring_search():
    """From every state q (q characters matched), after a text: found iff the string occurs in
    s[:q] + text, else the longest suffix that is a prefix of the string."""
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
        delta, cols = _kmp_delta(s)
        texts = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 6))) for _ in range(10)]
        out = _advance(delta, cols, texts, np.arange(len(s) + 1))
        for q in range(len(s) + 1):
            for j, t in enumerate(texts):
                full = s[:q] + t
                want = len(s) if q == len(s) or s in full else max(
                    k for k in range(len(s)) if full.endswith(s[:k]))  # fmt: skip
                assert out[q, j] == want, (s, q, t)


def _hf_bpe(tmp_path):
    from flaxlm.models.hf_tokenizer import HFTokenizer

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("hf_tok", os.path.join(here, "hf_tokenizers.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    # merges spelling multi-character tokens, one across a newline pair ("ĊĊ" = "\n\n")
    words = ("Ġthe", "Ġcity", "ĊĊ", "Question", "Ġ42", "Ã©")
    d = helpers.write_hf_tokenizer(str(tmp_path / "bpe"), "", {"eos_token": "<|im_end|>"},
                                   merge_words=words)  # fmt: skip
    return HFTokenizer.load(d)


@pytest.fixture(params=["sentencepiece", "bpe"])
def tok(request, chat_tokenizer, tmp_path):
    return chat_tokenizer[1] if request.param == "sentencepiece" else _hf_bpe(tmp_path)


STRINGS = ["\n\n", "city of", "Question:", " 4"]


def test_found_where_the_decoded_text_first_contains_a_string(tok):
    """Random id sequences (special ids, byte pieces and the texts' own tokens mixed in) and
    encoded texts that contain the strings: the automaton's stop index is brute force's."""
    rng = random.Random(1)
    texts = ["where does Kavo live in the city of 42\n\nQuestion: yes", "café 4 the city\n\n",
             " 42 Question:", "Brel the city of", "no\nQuestion:\n\nsay"]  # fmt: skip
    seqs = [tok.encode(t) for t in texts]
    seqs += [[rng.randrange(tok.vocab_size) for _ in range(30)] for _ in range(40)]
    pool = [i for t in texts for i in tok.encode(t)]
    seqs += [[rng.choice(pool) for _ in range(25)] for _ in range(40)]
    hits = 0
    for strings in (STRINGS, ["\n\n"], ["of 42", "e"]):
        stops = StopStrings.build(tok, strings)
        for ids in seqs:
            got = _first_found(stops, ids)
            assert got == _brute_force(tok, strings, ids), (strings, ids, tok.decode(ids))
            hits += got is not None
    assert hits > 40  # the strings are found often, not vacuously never


def test_leading_space_of_the_response_is_not_text(chat_tokenizer):
    """SentencePiece drops the leading space of a decoded response: " the" is not found in a
    response that starts with "▁the" (decoded "the ..."), nor after an empty first token;
    found mid-text."""
    tok = chat_tokenizer[1]
    the = tok.encode("the")[-1]  # "▁the"
    assert tok.decode([the]) == "the"
    stops = StopStrings.build(tok, [" the"])
    assert _first_found(stops, [the]) is None
    assert _first_found(stops, [tok.eos_id, the]) is None  # eos decodes to nothing
    assert _first_found(stops, [the, the]) == 1


def test_bad_strings(chat_tokenizer):
    tok = chat_tokenizer[1]
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError, match="non-empty strings"):
            StopStrings.build(tok, bad)
    s = StopStrings.build(tok, ["a", "bb", "a"], vocab_size=512)  # duplicates dropped
    assert s.strings == ("a", "bb") and s.table.shape == (2, 8, 512)
    # ids past the tokenizer's decode as its unknown piece; special ones leave states as they are
    np.testing.assert_array_equal(
        s.table[:, :, tok.vocab_size :],
        np.repeat(s.table[:, :, [tok.unk_id]], 512 - tok.vocab_size, 2),
    )
    for i, m in enumerate((1, 2)):
        assert np.all(s.table[i, : m + 2, tok.eos_id] == np.arange(m + 2))
    assert s.start.tolist() == [2, 3] and s.found.tolist() == [1, 2]
    # a bare str is one string (iterated, it was one string per character: "Question:" ended
    # rows at the first token holding a Q, u, e, ...)
    one = StopStrings.build(tok, "Question:", vocab_size=512)
    assert one.strings == ("Question:",)
    np.testing.assert_array_equal(one.table, StopStrings.build(tok, ["Question:"], 512).table)


# --- generate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(chat_tokenizer):
    tok = chat_tokenizer[1]
    cfg = get_variant("tiny", vocab_size=512, init_std=0.15)
    return cfg, random_params(cfg), tok


def _stop_index(tok, strings, row):
    k = _brute_force(tok, strings, [int(t) for t in row])
    return len(row) if k is None else k + 1


def test_generate_ends_rows_at_the_strings(model):
    """Sampled rows (ids past the tokenizer's vocab included) end at the first token after which
    their decoded text contains a string — picked from the free run's own text — the tokens
    before are the free run's, pad after; the loop exits once every row ended."""
    cfg, params, tok = model
    prompts = [tok.encode("where does Kavo live"), tok.encode("the city of 42"), [5, 9]]
    kw = dict(max_new_tokens=24, rng=jax.random.PRNGKey(4), temperature=1.0, pad_id=-1)
    free = np.asarray(generate(cfg, params, prompts, **kw).tokens)
    texts = [tok.decode(row) for row in free]
    strings = [texts[0][8:10], texts[1][-6:-4]]  # two characters from the middle, the end
    stops = StopStrings.build(tok, strings, vocab_size=cfg.vocab_size)
    out = generate(cfg, params, prompts, stop_strings=stops, **kw)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    want = [_stop_index(tok, strings, row) for row in free]
    assert lengths.tolist() == want and min(want) < 24
    for row, free_row, n in zip(tokens, free, want):
        np.testing.assert_array_equal(row[:n], free_row[:n])
        assert np.all(row[n:] == -1)
    # with stop tokens too, under a mesh, with G samples per prompt: the same rows
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")
    sharded = generate(cfg, params, prompts, stop_strings=stops, stop_tokens=(tok.eos_id,),
                       mesh=mesh, rules=rules, **kw)  # fmt: skip
    eos_cut = [min(n, int(np.argmax(r[:n] == tok.eos_id)) + 1 if tok.eos_id in r[:n] else n)
               for r, n in zip(free, want)]  # fmt: skip
    assert np.asarray(sharded.lengths).tolist() == eos_cut
    # "all rows stopped" tested every 5 tokens (24 is no multiple): the same rows
    blocked = generate(cfg, params, prompts, stop_strings=stops, check_every=5, **kw)
    np.testing.assert_array_equal(blocked.tokens, tokens)
    grouped = generate(cfg, params, prompts[:1], stop_strings=stops, num_samples=3, **kw)
    repeated = generate(cfg, params, prompts[:1] * 3, stop_strings=stops, **kw)
    np.testing.assert_array_equal(grouped.tokens, repeated.tokens)


def test_generate_checks_the_tables(model):
    cfg, params, tok = model
    kw = dict(max_new_tokens=2, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=f"built for {tok.vocab_size} token ids.*512"):
        generate(cfg, params, [[1, 2]], stop_strings=StopStrings.build(tok, ["a"]), **kw)
    with pytest.raises(ValueError, match="StopStrings"):
        generate(cfg, params, [[1, 2]], stop_strings=["a"], **kw)


def test_generate_text_takes_plain_strings(model):
    """generate_text builds the tables itself and cuts each completion before the string: the
    completions without strings, cut there."""
    from flaxlm.models.decode import generate_text

    cfg, params, tok = model
    texts = ["where does Kavo live", "the city of 42"]
    kw = dict(max_new_tokens=16, rng=jax.random.PRNGKey(6), temperature=1.0)
    free = generate_text(cfg, params, tok, texts, **kw)
    stop = next(t for t in free if len(t) > 4)[2:4]
    cut = generate_text(cfg, params, tok, texts, stop_strings=[stop], **kw)
    assert cut == [t[: t.index(stop)] if stop in t else t for t in free]
    assert cut != free
    assert generate_text(cfg, params, tok, texts, stop_strings=stop, **kw) == cut  # a bare str
    assert generate_text(cfg, params, tok, texts, stop_strings=[], **kw) == free  # none
