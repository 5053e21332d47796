"""Log-likelihood evaluation: continuation scoring, multiple choice, perplexity.

Everything reduces to one primitive: the summed log-probability of continuation tokens given
context tokens, `LoglikScorer.score([(ctx_ids, cont_ids), ...])`: the sum over j of
log p(cont[j] | ctx + cont[:j]), the first continuation token read at the last context position;
no context token is scored. A score does not depend on the batch or bucket its row lands in
(tests/evaluation/test_eval_audit.py checks both against one forward per token). Rows are
sorted by length, right-padded into buckets (lengths rounded up to a power of two, rows per batch
chosen so a batch holds about `batch_tokens` tokens, a bucket's last batch padded with empty rows
up to a power of two) and run through one jitted forward, so an evaluation compiles a couple of
shapes per bucket, not one per example, and a small bucket does not run hundreds of empty rows.
Right padding needs no segment ids: causal attention never lets a real token see the padding
after it. A mixture of experts is scored dropless (`moe_capacity_factor=0`, as `generate`
decodes it: models/decode_program.py's `decode_config`): an expert's capacity is a share of the
row's T tokens, padding included, so with drops a score would depend on its bucket's length.

Multiple choice (`multiple_choice`): each choice is scored as a continuation of the prompt;
    acc        argmax of the summed log-probability
    acc_norm   argmax of the sum divided by the choice's length in characters, as
               lm-eval-harness's acc_norm: the length of the choice without the whitespace that
               separates it from the context (" Paris" counts 5; lm-eval-harness scores
               target_delimiter + choice and divides by len(choice)), so a choice stored with its
               leading space (plain mode) and the stripped one (chat mode) normalise alike;
               acc_byte divides by that text's UTF-8 bytes (lm-eval-harness's acc_bytes),
               acc_token by the continuation's tokens (a tie goes to the first choice, np.argmax)
    truncated  questions with a choice whose context + continuation exceeded the scorer's
               max_len + 1 tokens. The question's context is cut from the left once, by what its
               longest choice needs, so every choice is still scored after the same tokens (a
               cut per choice would condition a long choice on less context, BOS lost, than a
               short one). Each sample's `truncated` says which; a warning is logged.
Perplexity (`perplexity`): documents longer than the window are scored in windows of `max_len`
tokens whose starts are `stride` apart; each token is scored once, in the first window that
reaches it, with the tokens from that window's start as context (stride < max_len gives every
token at least max_len - stride tokens of context; the last window is not extended back to a
full window as lm-eval-harness's rolling windows are). Nothing is truncated; the result reports
the window and stride used (a max_len above the model's max_seq_len is cut to it), the windows
run and the tokens scored. Texts that give no token to score are an error, not a perplexity of 1.
A document is its prefix (BOS) + its text, and EOS is not scored (lm-eval-harness's rolling
loglikelihood), whereas pretraining frames documents as BOS + text + EOS and its eval loss
includes the EOS target: the two NLLs differ by that token. `eos=True` (a spec's `add_eos`)
scores an EOS after each text too, as pretraining does; tokens then counts it, bytes do not.
The NLL is token-weighted over the whole corpus (sum of every token's NLL / tokens scored, as
lm-eval-harness's weighted perplexities), not a mean of per-document perplexities.

The prefix a document or prompt starts after is `prompts.prefix_ids`: BOS, or EOS for a tokenizer
without BOS (never the id -1 such a tokenizer reports).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.data.tokenizer import text_encoder
from flaxlm.evaluation.prompts import prefix_ids
from flaxlm.models.sharding import batch_divisor, fetch, global_batch, use_mesh
from flaxlm.models.transformer import forward
from flaxlm.train.losses import token_logprobs

log = logging.getLogger("flaxlm")


@dataclasses.dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum over the continuation tokens of log p(token | everything before it)
    n_tokens: int  # continuation tokens scored (fewer than given only after truncation)
    greedy: bool  # every continuation token is the model's argmax
    truncated: bool = False  # context (+ continuation) longer than max_len + 1: cut from the left


def _score_rows(cfg, params, tokens, targets, mask):
    """(sum of target log-probs where mask, all masked targets are the argmax) per row."""
    logits = forward(cfg, params, tokens)  # (B, T, V)
    lp = token_logprobs(logits, targets)  # (B, T)
    hit = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
    return jnp.sum(lp * mask, axis=-1), jnp.all(hit, axis=-1)


@functools.lru_cache(maxsize=8)
def _jitted_scorer(cfg, mesh=None, rules=None):
    """One jitted scoring function per model config (and mesh and rules: the model reads the
    rules when traced), shared by every LoglikScorer of it (its compiled shapes are reused
    when a notebook or the demo scores several checkpoints)."""
    del mesh, rules  # (cache keys)
    return jax.jit(functools.partial(_score_rows, cfg.replace(moe_capacity_factor=0.0)))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class LoglikScorer:
    """Batched, bucketed continuation log-likelihoods for one model.

    Args:
      cfg, params: the model (`load_model` output).
      max_len: longest input row in tokens (0 = cfg.max_seq_len); longer rows keep their last
        max_len + 1 tokens (context is dropped from the left; flagged in
        ContinuationScore.truncated and logged as a warning).
      batch_tokens: about how many tokens one forward batch holds (rows × bucket length).
      min_len: the smallest bucket length.
      pad_id: the token id written into padding (masked out, so any valid id works).
      mesh, rules: score under this mesh with these logical rules (params sharded by them, e.g.
        `load_model(..., mesh=, rules=)`): each batch's rows split over data×fsdp (padded to a
        multiple of it). Several processes: each passes the same requests and gets every score.
    """

    def __init__(self, cfg, params, *, max_len=0, batch_tokens=8192, min_len=16, pad_id=0,
                 mesh=None, rules=None):  # fmt: skip
        self.cfg, self.params = cfg, params
        self.mesh, self.rules = mesh, tuple(rules or ())
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        self.batch_tokens, self.min_len, self.pad_id = batch_tokens, min_len, pad_id
        self._fn = _jitted_scorer(cfg, mesh, self.rules if mesh is not None else ())
        self.shapes: set[tuple[int, int]] = set()  # (rows, length) batch shapes run so far

    def bucket(self, n: int) -> int:
        return min(max(_pow2_at_least(n), self.min_len), self.max_len)

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]):
        """ContinuationScore per (context ids, continuation ids), in request order.

        A request's ids are read where they lie (lists, or the int32 arrays `multiple_choice`
        passes in a `TokenRequests`): only each row's length is kept across requests, and a row
        is joined and cut to the window when its batch is filled (a task's requests are not
        copied into a second set of Python lists first).
        """
        if isinstance(requests, TokenRequests):
            get, n_req = requests.ids, len(requests)
        else:
            reqs = requests if isinstance(requests, (list, tuple)) else list(requests)
            get, n_req = reqs.__getitem__, len(reqs)
        lens = np.zeros(n_req, np.int64)  # row length after the cut (at most max_len + 1)
        cuts = np.zeros(n_req, np.int64)  # tokens cut from the left
        n_conts = np.zeros(n_req, np.int64)  # continuation tokens scored
        for i in range(n_req):
            ctx, cont = get(i)
            if len(ctx) == 0 or len(cont) == 0:
                raise ValueError(
                    f"request {i}: context and continuation need at least one token each "
                    f"(got {len(ctx)} and {len(cont)}); prepend BOS to an empty context"
                )
            n = len(ctx) + len(cont)
            _check_ids(i, _joined(ctx, cont), self.cfg.vocab_size)
            n_cut = max(0, n - (self.max_len + 1))
            lens[i], cuts[i], n_conts[i] = n - n_cut, n_cut, min(len(cont), n - n_cut - 1)
        n_trunc = int(np.count_nonzero(cuts))
        if n_trunc:
            log.warning(
                "loglik: %d of %d requests are longer than max_len + 1 = %d tokens; their "
                "context was cut from the left (ContinuationScore.truncated)",
                n_trunc, n_req, self.max_len + 1,
            )  # fmt: skip
        lens_l = lens.tolist()
        order = sorted(range(n_req), key=lambda i: -lens_l[i])
        out: list[ContinuationScore | None] = [None] * n_req
        pos = 0
        while pos < len(order):
            T = self.bucket(lens_l[order[pos]] - 1)
            # Rows per batch: the largest power of two within the token budget. A bucket's last
            # batch is padded to the next power of two (not to B: with short rows B is in the
            # hundreds), so a bucket compiles a full and a tail shape.
            B = 1 << (max(1, self.batch_tokens // T).bit_length() - 1)
            idx = [i for i in order[pos : pos + B] if self.bucket(lens_l[i] - 1) == T]
            pos += len(idx)
            B = min(B, _pow2_at_least(len(idx)))
            if mesh := self.mesh:  # rows split over data×fsdp: a multiple of it
                B += -B % batch_divisor(mesh)
            tokens = np.full((B, T), self.pad_id, np.int32)
            targets = np.full((B, T), self.pad_id, np.int32)
            mask = np.zeros((B, T), np.float32)
            for r, i in enumerate(idx):
                seq = np.asarray(_joined(*get(i)))[int(cuts[i]) :]
                n, n_cont = len(seq) - 1, int(n_conts[i])
                tokens[r, :n] = seq[:-1]
                targets[r, :n] = seq[1:]
                mask[r, n - n_cont : n] = 1.0
            self.shapes.add((B, T))
            sums, greedy = self._run(tokens, targets, mask)
            for r, i in enumerate(idx):
                out[i] = ContinuationScore(float(sums[r]), int(n_conts[i]), bool(greedy[r]),
                                           bool(cuts[i]))  # fmt: skip
        return out

    def _run(self, tokens, targets, mask):
        if self.mesh is None:
            return jax.device_get(self._fn(self.params, tokens, targets, mask))
        with use_mesh(self.mesh, self.rules):
            b = global_batch({"tokens": tokens, "targets": targets, "mask": mask}, self.mesh)
            return fetch(self._fn(self.params, b["tokens"], b["targets"], b["mask"]))


def _joined(ctx, cont):
    """context + continuation: one array when both are arrays, else one list (as before: what
    `_check_ids` reads, so its dtype rules are unchanged for list requests)."""
    if isinstance(ctx, np.ndarray) and isinstance(cont, np.ndarray) and ctx.dtype == cont.dtype:
        return np.concatenate((ctx, cont))
    return list(ctx) + list(cont)


class TokenRequests(Sequence):
    """(context ids, continuation ids) requests that keep the ids as given, e.g. int32 arrays
    (a question's choices sharing one context array, a cut context a view of it). Read as a
    sequence, each item is a (list, list) pair, as the requests were before, so any scorer
    (a stand-in in tests) sees plain lists; `LoglikScorer.score` reads the stored ids directly
    (`ids`) and never builds those lists."""

    def __init__(self):
        self._items: list[tuple] = []

    def append(self, ctx, cont) -> None:
        self._items.append((ctx, cont))

    def extend(self, other: TokenRequests) -> None:
        """Appends `other`'s requests, their ids as stored (not copied)."""
        self._items.extend(other._items)

    def ids(self, i: int) -> tuple:
        """Request i's (context, continuation) as stored."""
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ctx, cont = self._items[i]
        return _as_list(ctx), _as_list(cont)


def _as_list(ids):
    return ids.tolist() if isinstance(ids, np.ndarray) else ids


def _check_ids(i: int, seq, vocab_size: int) -> None:
    """Refuses request `i`'s token ids unless they are integers in [0, vocab_size), on the host
    before anything reaches the device: the embedding lookup would wrap a negative id around and
    read NaN or garbage past the table, and a score from either looks like any other."""
    ids = np.asarray(seq)
    if ids.dtype.kind not in "iu":  # (floats would be cast to ids silently; bools too)
        raise TypeError(f"request {i}: token ids must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(
            f"request {i}: token id {int(ids[bad[0]])} at position {int(bad[0])} of its context +"
            f" continuation is outside the model's vocabulary [0, vocab_size={vocab_size})"
        )


def _texts_arg(texts, where: str, name: str, hint: str = "") -> list[str]:
    """`texts` as a list of strings. A bare string is refused: iterated, it is a list of
    one-character documents (or choices), scored without any error."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(
            f"{where}: {name} must be a list of strings, got a {type(texts).__name__}{hint}"
        )
    texts = list(texts)  # (a generator would be used up by the first pass over it)
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{where}: {name}[{j}] must be a string, got {type(t).__name__}")
    return texts


def split_continuation(tok, context: str, continuation: str, *, bos: bool = True):
    """(context ids, continuation ids) of `context + continuation`, split at a token boundary.

    The joint text is tokenized once (as the model would have seen it); the split point is the
    longest common prefix with the context's own tokens, so a token that merges across the
    boundary counts as continuation. `bos` prepends the document prefix (`prompts.prefix_ids`:
    BOS, or EOS without one; documents start after it in training, and it gives an empty context
    something to condition on).
    """
    full = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    if k == len(full):
        raise ValueError(f"continuation {continuation!r} adds no tokens to {context[-40:]!r}")
    head = prefix_ids(tok) if bos else []
    return head + full[:k], full[k:]


def mc_predictions(logprobs, n_chars, n_bytes, n_tokens) -> dict[str, int]:
    """Predicted choice under each rule: acc (sum), acc_norm (per char), acc_byte, acc_token."""
    lp = np.asarray(logprobs, np.float64)
    per = lambda n: lp / np.maximum(np.asarray(n, np.float64), 1.0)
    return {
        "acc": int(np.argmax(lp)),
        "acc_norm": int(np.argmax(per(n_chars))),
        "acc_byte": int(np.argmax(per(n_bytes))),
        "acc_token": int(np.argmax(per(n_tokens))),
    }


def multiple_choice(scorer: LoglikScorer, requests, choices, answers):
    """Log-likelihood multiple choice.

    Args:
      requests: per question, one (context ids, continuation ids) per choice — from
        `split_continuation(tok, prompt, choice)` in plain text; in chat mode the generation
        prompt's ids and the choice's ids as the chat template renders the reply in place
        (evaluation/chat_answer.py; its closing stop id not scored). Ids may be lists or 1-D
        integer arrays: `Evaluator` passes int32 arrays, a question's choices sharing one
        context array, which a cut only views (as lists a 5-shot question held ~185 KB).
      choices: per question, the choice texts (their lengths without leading whitespace
        normalise acc_norm / acc_byte; see the module docstring).
      answers: per question, the index of the correct choice (an int in [0, its choices); any
        other value is a ValueError naming the question, not a question scored wrong).
    Returns:
      (metrics, samples): metrics acc, acc_norm, acc_byte, acc_token (means), truncated (a
      count; see the module docstring) and n; one sample per question with the per-choice
      log-probs, token counts, predictions and whether any choice was truncated.
    """
    # (A stand-in scorer without max_len, as in tests of the metric logic, cuts nothing here.)
    limit = getattr(scorer, "max_len", math.inf) + 1
    if isinstance(choices, (str, bytes)):
        raise TypeError("multiple_choice: choices must hold one list of choice texts per "
                        f"question, got a {type(choices).__name__}")  # fmt: skip
    choices = [_texts_arg(chs, "multiple_choice", f"choices[{q}]") for q, chs in enumerate(choices)]
    answers = list(answers)
    flat, cut_questions, n_long = TokenRequests(), [], 0
    for q, (reqs, chs, gold) in enumerate(zip(requests, choices, answers, strict=True)):
        if len(reqs) != len(chs):
            raise ValueError(f"question {q}: {len(reqs)} requests for {len(chs)} choices")
        # An answer outside the choices would never equal a prediction: acc 0, silently.
        try:
            ok = not isinstance(gold, bool) and 0 <= operator.index(gold) < len(chs)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"question {q}: answer {gold!r} is not a choice index in "
                             f"[0, {len(chs)}) ({len(chs)} choices)")  # fmt: skip
        # One left cut for the whole question (what its longest choice needs), so the choices
        # are scored after the same context (at least its last token); a continuation longer
        # than max_len alone is then cut by the scorer (its first tokens become context).
        over = [len(ctx) + len(cont) - limit for ctx, cont in reqs]
        cut = max([0, *over])
        n_long += sum(o > 0 for o in over)
        cut_questions.append(cut > 0)
        for ctx, cont in reqs:
            c = min(cut, max(len(ctx) - 1, 0))
            if isinstance(ctx, np.ndarray):  # (a view: the question's context is not copied)
                flat.append(ctx[c:] if c else ctx, cont)
            else:  # (a list as given, when not cut: a copy of every context was held too)
                flat.append(ctx if c == 0 and isinstance(ctx, list) else list(ctx)[c:], cont)
    if n_long:
        log.warning(
            "loglik: %d of %d requests are longer than max_len + 1 = %d tokens; their "
            "question's context was cut from the left (the same cut for each choice)",
            n_long, len(flat), limit,
        )  # fmt: skip
    scores = iter(scorer.score(flat))
    samples, hits = [], {k: [] for k in ("acc", "acc_norm", "acc_byte", "acc_token")}
    n_truncated = 0
    for reqs, chs, gold, cut_q in zip(requests, choices, answers, cut_questions, strict=True):
        gold = operator.index(gold)  # (a numpy int in, a plain int in the samples)
        sc = [next(scores) for _ in reqs]
        lp = [s.logprob for s in sc]
        ntok = [s.n_tokens for s in sc]
        texts = [c.lstrip() for c in chs]  # lm-eval-harness's len(choice): no delimiter
        preds = mc_predictions(lp, [len(c) for c in texts], [len(c.encode()) for c in texts], ntok)
        for k, v in preds.items():
            hits[k].append(float(v == gold))
        cut = cut_q or any(s.truncated for s in sc)
        n_truncated += cut
        samples.append({"logprobs": lp, "n_tokens": ntok, "answer": gold, "pred": preds,
                        "truncated": cut})  # fmt: skip
    metrics = {k: float(np.mean(v)) for k, v in hits.items()}
    metrics["truncated"] = n_truncated
    metrics["n"] = len(samples)
    return metrics, samples


def window_requests(ids: Sequence[int], max_len: int, stride: int = 0) -> TokenRequests:
    """(context, continuation) requests scoring tokens 1..n-1 of `ids` in strided windows.

    Window j holds tokens [j*stride, j*stride + max_len + 1) (max_len model inputs) and scores
    the tokens no earlier window scored. The ids are held once, as one int32 array, and every
    window's context and continuation are views of it: as Python lists a token cost ~40 bytes
    per window holding it (several windows with stride < max_len), 4 GB for a 100M-token
    corpus. Read as a sequence the requests are (list, list) pairs, as before.
    """
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride={stride} must be in [1, max_len={max_len}]")
    ids = _compact_ids(ids)
    reqs, begin, scored = TokenRequests(), 0, 1
    while scored < len(ids):
        end = min(begin + max_len + 1, len(ids))
        reqs.append(ids[begin:scored], ids[scored:end])
        scored, begin = end, begin + stride
    return reqs


def _compact_ids(ids) -> np.ndarray:
    """`ids` as one int32 array, unless they are not integers or one does not fit int32 (no
    vocabulary's id): then as numpy reads them, so the scorer's `_check_ids` names the bad id
    as it did for a list."""
    a = np.asarray(ids)
    i32 = np.iinfo(np.int32)
    if a.dtype.kind in "iu" and (a.size == 0 or i32.min <= a.min() and a.max() <= i32.max):
        return a.astype(np.int32, copy=False)
    return a


def perplexity(scorer: LoglikScorer, tok, texts, *, max_len=0, stride=0, bos: bool = True,
               eos: bool = False):  # fmt: skip
    """Token-level perplexity of held-out documents.

    Every text token of every document is predicted (the first from the prefix, BOS, when
    `bos`; without it the first token is only context, yet its bytes count in bits_per_byte);
    EOS is not, unless `eos` (then an EOS after each text is scored as well: pretraining's
    framing, BOS + text + EOS, whose eval loss includes it); a
    document is scored in windows of `max_len` tokens (0 = the scorer's max_len; larger is cut
    to it) `stride` apart (0 = max_len). Returns nll (mean per token over all documents
    together, nats: long documents weigh more), ppl = exp(nll),
    bits_per_byte, tokens (scored), bytes, docs, and the max_len, stride and windows used.
    Raises ValueError when no text has a token to score (nll would be 0/0), TypeError when
    `texts` is not a list of strings (a bare string would be scored as one-character documents).
    """
    texts = _texts_arg(texts, "perplexity", "texts", "; pass [text] to score one document")
    max_len = min(max_len or scorer.max_len, scorer.max_len)
    head = prefix_ids(tok) if bos else []
    tail = []
    if eos:
        if tok.eos_id is None or tok.eos_id < 0:
            raise ValueError("perplexity: add_eos, but the tokenizer has no EOS token")
        tail = [int(tok.eos_id)]
    requests = TokenRequests()  # (views of one int32 array per document: `window_requests`)
    text_tok = text_encoder(tok)  # documents as pretraining encodes them (HF: specials as text)
    for t in texts:
        requests.extend(window_requests(head + text_tok.encode(t) + tail, max_len, stride))
    if not requests:
        raise ValueError(
            f"perplexity: none of the {len(texts)} texts has a token to score (all empty"
            f"{'' if head else ', or one token with no BOS/EOS prefix'})"
        )
    scores = scorer.score(requests)
    total = -sum(s.logprob for s in scores)
    n_tok = sum(s.n_tokens for s in scores)
    n_bytes = sum(len(t.encode()) for t in texts)
    nll = total / max(n_tok, 1)
    return {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
        "tokens": n_tok,
        "bytes": n_bytes,
        "docs": len(texts),
        "max_len": max_len,
        "stride": stride or max_len,
        "windows": len(requests),
    }
