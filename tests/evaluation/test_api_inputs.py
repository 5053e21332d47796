"""The log-likelihood API given inputs of the wrong shape or range: errors that name the
argument, the request or the question, where a score of garbage (or acc 0) came back before."""

import numpy as np
import pytest

from flaxlm.evaluation import loglik
from flaxlm.evaluation.loglik import ContinuationScore, LoglikScorer


class _Tok:
    """A character-level stand-in tokenizer (ids 3.. for bytes), BOS 1, EOS 2."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [3 + b for b in text.encode()]


class _Scorer:
    """Scores every continuation token -1 (the metric logic on its own)."""

    max_len = 64

    def score(self, requests):
        return [ContinuationScore(-float(len(cont)), len(cont), False) for _, cont in requests]


def test_perplexity_of_a_bare_string_is_a_type_error():
    # It was scored as len(text) one-character documents, without a word.
    with pytest.raises(TypeError, match=r"perplexity: texts must be a list of strings, got a "
                                        r"str; pass \[text\]"):  # fmt: skip
        loglik.perplexity(_Scorer(), _Tok(), "a held-out document")
    with pytest.raises(TypeError, match=r"perplexity: texts\[1\] must be a string, got bytes"):
        loglik.perplexity(_Scorer(), _Tok(), ["ok", b"bytes"])
    got = loglik.perplexity(_Scorer(), _Tok(), (t for t in ["ab", "c"]))  # any iterable of str
    assert (got["docs"], got["tokens"], got["bytes"]) == (2, 3, 3)


def test_multiple_choice_choices_as_a_bare_string_is_a_type_error():
    requests = [[([1], [2])] * 2]
    with pytest.raises(TypeError, match=r"multiple_choice: choices\[0\] must be a list of str"):
        loglik.multiple_choice(_Scorer(), requests, ["ab"], [0])  # one question's, unwrapped
    with pytest.raises(TypeError, match=r"multiple_choice: choices must hold one list"):
        loglik.multiple_choice(_Scorer(), requests, "ab", [0])


@pytest.mark.parametrize("answer", [2, 5, -1, "1", 1.0, True, None])
def test_multiple_choice_answer_that_is_no_choice_index_names_the_question(answer):
    requests = [[([1], [2])] * 2] * 2
    with pytest.raises(ValueError, match=rf"question 1: answer {answer!r} is not a choice index"
                                         r" in \[0, 2\) \(2 choices\)"):  # fmt: skip
        # (scored acc 0 before: the prediction, 0 or 1, never equals it)
        loglik.multiple_choice(_Scorer(), requests, [["a", "b"]] * 2, [0, answer])


def test_multiple_choice_takes_a_numpy_answer_and_records_an_int():
    _, samples = loglik.multiple_choice(_Scorer(), [[([1], [2])] * 2], [["a", "b"]], np.int64([1]))
    assert samples[0]["answer"] == 1 and type(samples[0]["answer"]) is int


@pytest.mark.parametrize("bad", [-1, 512, 10**6])
def test_score_refuses_token_ids_outside_the_vocabulary_before_running(model, bad):
    cfg, params = model
    assert cfg.vocab_size == 512
    scorer = LoglikScorer(cfg, params)
    requests = [([1, 5], [7]), ([1, 5, bad], [7])]
    # A negative id wrapped around the embedding; one past it read NaN or garbage: a score.
    with pytest.raises(ValueError, match=rf"^request 1: token id {bad} at position 2 .*"
                                         r"vocabulary \[0, vocab_size=512\)"):  # fmt: skip
        scorer.score(requests)
    with pytest.raises(ValueError, match=r"^request 0: token id "):
        scorer.score([([1], [bad])])
    assert scorer.shapes == set()  # refused on the host: no batch was run
    with pytest.raises(TypeError, match=r"request 0: token ids must be integers, got dtype float"):
        scorer.score([([1, 2.5], [7])])  # (it was cast to id 2)
    assert scorer.score([([1, 5], [511])])[0].n_tokens == 1  # the edges are ids
