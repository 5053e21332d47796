"""Generation tasks: generate from each prompt (greedy, or `num_samples` samples at
`temperature`) and score the text.

Scoring (`TaskSpec.scoring`):
    exact_match  the response (cut at the first stop string) equals the gold answer after
                 normalisation (`normalize`: none | basic | number)
    regex        `answer_regex` extracts the answer from the response (the first group that
                 took part in the match, or the whole match; the first or last match per
                 `regex_select`), then exact match
    math         alignment/verify_math.py, the verifier of GRPO's `math_verify` reward: the
                 response's last \\boxed{} (else "#### X", else "The answer is X", else with
                 `math_last_number` its last number) equals the gold answer (a bare answer, a
                 GSM8K "... #### 42" solution or a MATH solution's \\boxed{}) as exact
                 rationals, tuples, lists or normalised LaTeX (`math_rel_tol`: a relative
                 tolerance); reported as `exact_match` (so pass@k) and `extracted` (an answer
                 was found). `normalize` does not apply
    code         alignment/verify_code.py runs the program against the row's meta "tests"
                 (asserts; with "entry_point", HumanEval's check(entry_point)) or
                 "test_cases" in limited subprocesses — NOT a sandbox (its docstring) — a
                 task's programs `code_workers` at once from threads, under the spec's
                 `code_limits` (verify_code's Limits fields: timeout, memory_mb, ...,
                 network; the CLI's --code_limits goes over them). The program is
                 `code_prefix` rendered + the response as generated (plain mode: HumanEval's
                 prompt + completion, indentation kept), else the response's last python
                 block or the whole response (`extract_program`; chat mode puts the prefix
                 before that). Reported as `pass` (1 when every test passes: pass@1, and
                 pass@k with samples) and `extracted` (a program was found)
    judge        the built-in world's rule-based judge, `judge(meta, response)`; also reports
                 `correct` (the judge's strict correctness), `well_formed` (exactly "The answer
                 is X.") and `unsafe` (an unsafe word), the rates an alignment stage moves

A reasoning model's response (Qwen3, DeepSeek-R1: "<think> ... </think> answer") is scored on
the text after its end-of-thinking marker (`TaskSpec.reasoning_end`, or `--reasoning_end` for
every task): stop strings such as "\n\n" would otherwise cut the response inside its
reasoning. A response whose reasoning never ended scores as no answer; `reasoning_unfinished`
reports how often (raise `max_new_tokens`), and each sample keeps its `reasoning`.

With `num_samples` = k > 1 a 0/1 score (exact_match, correct, pass) also gets pass@k, 1 if any
of the k samples scores: Chen et al. (2021)'s unbiased estimator 1 - C(n-c, k) / C(n, k) with
n = k samples drawn, which is exactly that. A spec's `pass_at_k` (the CLI's --pass_at_k) asks
for smaller k too, each estimated from all n samples, c of them correct (`pass_at_k_estimate`:
HumanEval's pass@1 and pass@10 of n = 20, far less noisy than drawing k alone).
Tasks that extract an answer (math, regex, exact_match) also get maj@k, self-consistency's
majority vote (Wang et al. 2022; Minerva's maj1@k): the answer most of the k samples give wins
— answers are grouped as the scoring compares them (math: `answers_equal`, so "0.5" and
"\\frac12" are one vote; else the normalised strings), samples stating no answer do not vote, a
tie goes to the answer given first — and maj@k is 1 when it is right (0 when no sample states
an answer). A spec's `maj_at_k` (the CLI's --maj_at_k) asks for smaller k too: the expected
maj@k of a k-subset of the n samples drawn uniformly, the subset's samples in their order (so
its ties go to the answer it gives first), computed exactly (`expected_majority`, polynomial in
n) rather than from one draw of k — maj@1 is then the mean hit, maj@n the majority of all n.
Should the comparison not split an example's answers into classes (math's `math_rel_tol`
chaining 1.00 ~ 1.01 ~ 1.02 while 1.00 !~ 1.02), how a subset groups them depends on the
subset (`vote_classes`): maj@k is then the mean over every k-subset when there are at most
MAJ_ENUMERATE of them, else a Monte-Carlo estimate over MAJ_DRAWS subsets (seeded by the task,
the example and k), and the metric "maj@k_estimated" is the share of examples estimated so.

Prompts come from prompts.encode_prompt (zero- or k-shot, plain or chat). The model is reached
through a `GenerateFn`, `(prompt_ids, max_new_tokens[, temperature]) -> new ids per prompt`
(temperature is passed only by sampled tasks, so a greedy stand-in needs two arguments; one
that also takes `num_samples` gets a sampled task's prompts once with num_samples=k and
returns k responses per prompt, else it gets each prompt k times; one that takes
`stop_strings` ends responses at the task's stop strings itself; a task's `top_p`, `top_k`
and `min_p`, when set, are passed by name, and a function that does not take one is an error);
`make_generate_fn` builds one over `flaxlm.models.decode.generate`, and tests pass a fake to
check the scoring path on its own.
"""

from __future__ import annotations

import decimal
import functools
import inspect
import itertools
import logging
import math
import os
import re
import string
import unicodedata
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from flaxlm.data.formats import split_reasoning
from flaxlm.evaluation.prompts import prefix_ids, render
from flaxlm.evaluation.tasks import VOTED, Example, TaskSpec, match_answer

log = logging.getLogger("flaxlm")

GenerateFn = Callable[..., list[list[int]]]
PASS_AT_K = ("correct", "exact_match", "pass")  # 0/1 scores that also get pass@k

_PUNCT = re.escape(string.punctuation)


# A comma or space between a digit and a group of exactly three digits: a thousands separator
# ("12,345", "1 234 567"; also no-break and thin spaces). "1 2" or "1,2" keep theirs.
_THOUSANDS = re.compile(r"(?<=\d)[, \u00a0\u2009\u202f](?=\d{3}(?!\d))")
# What is left must be a plain decimal: `Decimal` alone would also take "1_2" (PEP 515
# underscores) as 12, letting a separator the rule above refuses through.
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def normalize_answer(text: str, mode: str = "basic") -> str:
    """none: as is but for outer whitespace (the response is stripped, so the gold " Paris" is
    too); basic: lower case, single spaces, no outer punctuation (so "-3" and "3"
    agree, as in SQuAD-style normalisation); number: the exact decimal value without thousands
    separators (a comma or space before each group of three digits: "12 345" and "1,234" are
    numbers, "1 2" and "1_2" are not) or currency signs ("$", "€", any Unicode Sc), integral
    values as integers ("1,000.0" → "1000", "2.50" → "2.5"), compared exactly (decimal, not
    float: 9007199254740993 is not 9007199254740992); text that is not a finite number falls
    back to basic."""
    if mode == "none":
        return text.strip()
    if mode == "number":
        unsigned = "".join(c for c in text if unicodedata.category(c) != "Sc")
        num = _THOUSANDS.sub("", unsigned.strip()).rstrip(".")
        if not _DECIMAL.fullmatch(num):  # (so also no "NaN" or "Infinity")
            return normalize_answer(text, "basic")
        x = decimal.Decimal(num)
        if x == 0:
            return "0"
        digits = max(1, len(x.as_tuple().digits))  # normalize at full precision: exact
        x = x.normalize(decimal.Context(prec=digits, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN))
        # Fixed point ("1000", "0.5") unless the exponent is extreme ("1E+400", not 400 digits).
        return format(x, "f") if -30 <= x.adjusted() <= 30 else str(x)
    text = " ".join(text.lower().split())
    return re.sub(rf"^[{_PUNCT}\s]+|[{_PUNCT}\s]+$", "", text)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def extract_answer(text: str, pattern: str, select: str = "first") -> str | None:
    """The answer of the first/last match of `pattern` (`tasks.match_answer`: its first group
    that matched, or the whole match), or None."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    return match_answer(matches[0] if select == "first" else matches[-1])


def code_program(spec: TaskSpec, fields: dict, response: str) -> str | None:
    """The program code scoring runs (module docstring), or None when there is none."""
    from flaxlm.alignment.verify_code import extract_program

    prefix = render(spec.code_prefix, fields, spec) if spec.code_prefix else ""
    if prefix and not spec.chat:  # a completion of the prefix (lm-eval-harness's HumanEval)
        return prefix + response
    program = extract_program(response)
    # (chat: the reply holds a whole program; the prefix first still gives it its imports)
    return program if program is None or not prefix else f"{prefix}\n{program}"


def score_response(spec: TaskSpec, fields: dict, response: str) -> dict[str, float]:
    """Metrics of one response (already cut at the stop strings) to one example."""
    if spec.scoring == "code":
        from flaxlm.alignment.verify_code import run_program

        program = code_program(spec, fields, response)
        passed = program is not None and (
            run_program(program, fields["meta"], limits=spec.limits).status == "passed"
        )
        return {"pass": float(passed), "extracted": float(program is not None)}
    if spec.scoring == "math":
        from flaxlm.alignment.verify_math import verify

        hit, got = verify(response, fields["answer"], rel_tol=spec.math_rel_tol,
                          last_number=spec.math_last_number)  # fmt: skip
        return {"exact_match": float(hit), "extracted": float(got is not None)}
    gold = normalize_answer(fields["answer"], spec.normalize)
    if spec.scoring == "exact_match":
        return {"exact_match": float(normalize_answer(response, spec.normalize) == gold)}
    if spec.scoring == "regex":
        got = extract_answer(response, spec.answer_regex, spec.regex_select)
        hit = got is not None and normalize_answer(got, spec.normalize) == gold
        return {"exact_match": float(hit), "extracted": float(got is not None)}
    from flaxlm.data.synthetic_judge import is_correct, is_unsafe, is_well_formed, judge

    meta = fields["meta"]
    return {
        "judge": float(judge(meta, response)),
        "correct": float(is_correct(meta, response)),
        "well_formed": float(is_well_formed(response)),
        "unsafe": float(is_unsafe(response)),
    }


def make_generate_fn(
    cfg, params, *, batch_size: int = 32, seed: int = 0, stop_tokens=(), pad_id: int = 0,
    tok=None, mesh=None, rules=None,
) -> GenerateFn:  # fmt: skip
    """A GenerateFn over `flaxlm.models.decode.generate`, in batches of prompts sorted by length
    so each batch pads little. Prompt i of a call samples with its own key, fold_in(
    PRNGKey(seed), i) (`decode.prompt_keys`): its sample depends on the seed, i and its ids, not
    on the batch size or the prompts sorted next to it.

    `num_samples=k` returns k responses per prompt (prompt i's at i·k … i·k + k - 1; sample g
    drawn from fold_in(key_i, g)), each prompt prefilled once for its k samples
    (`generate(..., num_samples=k)`); a call then holds batch_size // k prompts (≥ 1), so
    about batch_size rows.

    With `tok` the function also takes `stop_strings`: a row ends inside the decode loop once
    its text contains one (models/stop_strings.py; tables built once per set of strings), so
    a base model's answer stops at "\\n\\n" instead of running to `max_new_tokens` — the
    text up to the string is the same, and the caller cuts there as before.

    `mesh`, `rules`: decode under them (params sharded by the rules; `generate`'s mesh)."""
    from flaxlm.models.decode import generate, prompt_keys
    from flaxlm.models.stop_strings import StopStrings

    tables: dict[tuple, StopStrings] = {}

    def fn(
        prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
        stop_strings: Sequence[str] = (), num_samples: int = 1, top_p: float = 1.0,
        top_k: int = 0, min_p: float = 0.0,
    ) -> list[list[int]]:  # fmt: skip
        stops = None
        if stop_strings:
            if tok is None:
                raise ValueError("make_generate_fn: stop_strings need the tokenizer (tok=)")
            key = tuple(stop_strings)
            if key not in tables:
                tables[key] = StopStrings.build(tok, key, vocab_size=cfg.vocab_size)
            stops = tables[key]
        k = int(num_samples)
        if k < 1 or (k > 1 and temperature == 0):
            raise ValueError(f"num_samples={num_samples}: want 1, or more with temperature > 0")
        per_call = max(1, batch_size // k)  # prompts per decoder call: ~batch_size rows
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list[list[int]] = [[] for _ in range(len(prompt_ids) * k)]
        pos = 0
        while pos < len(order):
            # Batches of per_call prompts, the tail padded to a power of two (by repeating its
            # last prompt) so a task compiles a couple of batch shapes, not one per remainder.
            idx = order[pos : pos + per_call]
            pos += len(idx)
            fill = min(per_call, 1 << (len(idx) - 1).bit_length()) - len(idx)
            ids = idx + [idx[-1]] * fill
            res = generate(
                cfg,
                params,
                [prompt_ids[i] for i in ids],
                max_new_tokens=max_new_tokens,
                rng=prompt_keys(jax.random.PRNGKey(seed), ids),
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                stop_tokens=tuple(stop_tokens),
                pad_id=pad_id,
                stop_strings=stops,
                num_samples=k,
                mesh=mesh,
                rules=rules,
            )
            toks, lengths = jax.device_get((res.tokens, res.lengths))
            for r, i in enumerate(idx):
                for g in range(k):  # output row r·k + g: sample g of prompt r
                    row = r * k + g
                    out[i * k + g] = [int(t) for t in np.asarray(toks[row])[: int(lengths[row])]]
        return out

    return fn


def _vote(spec: TaskSpec, response: str) -> str | None:
    """The answer a sample votes for in maj@k, as its scoring reads it; None: it gives none."""
    if spec.scoring == "math":
        from flaxlm.alignment.verify_math import extract_answer as math_answer

        return math_answer(response, last_number=spec.math_last_number)
    if spec.scoring == "regex":
        got = extract_answer(response, spec.answer_regex, spec.regex_select)
        return None if got is None else normalize_answer(got, spec.normalize)
    return normalize_answer(response, spec.normalize) or None


def pass_at_k_estimate(n: int, c: float, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from n samples of which c are correct: the chance
    that k drawn without replacement hold a correct one, 1 - C(n-c, k) / C(n, k), as the
    product 1 - Π_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    c = int(round(c))
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@{k} of {c} correct in {n} samples")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _same(spec: TaskSpec) -> Callable[[str, str], bool]:
    """When two votes are one answer, as the task's scoring compares answers."""
    if spec.scoring == "math":
        from flaxlm.alignment.verify_math import answers_equal

        return functools.partial(answers_equal, rel_tol=spec.math_rel_tol)
    return str.__eq__


def majority(spec: TaskSpec, votes: Sequence[str | None], hits: Sequence[float]) -> float:
    """maj@k of one example: `hits[i]` (0/1) of the first sample giving the answer most samples
    give (`votes`, None for no answer; equal as the scoring compares answers; a tie goes to the
    answer given first); 0 when no sample gives one."""
    from flaxlm.alignment.verify_math import majority_sample

    first = majority_sample(votes, _same(spec))
    return 0.0 if first is None else float(hits[first])


MAJ_ENUMERATE = 20_000  # maj@k without answer classes: the mean over every k-subset up to this
MAJ_DRAWS = 2_000  # many, else a Monte-Carlo estimate over this many (seeded) k-subsets


def vote_classes(votes: Sequence[str | None], same: Callable[[str, str], bool] = str.__eq__,
                 ) -> list[int | None] | None:  # fmt: skip
    """Each sample's answer class (None: it states no answer), as `majority_sample` groups the
    votes (a vote `v` joins the first class whose first vote `u` has `same(v, u)`), or None
    when a subset of the samples could group its votes otherwise — it may start a class with
    another sample. The classes hold for every subset when, for each vote and each earlier
    one, `same` holds exactly when they are in one class; not so with a relative tolerance
    chaining 1.00 ~ 1.01 ~ 1.02 (`answers_equal` is not even symmetric for over-long
    answers)."""
    eq = _memo(same)
    classes: list[int | None] = []
    firsts: list[int] = []  # each class's first sample
    for j, v in enumerate(votes):
        if v is None:
            classes.append(None)
            continue
        c = next((c for c, f in enumerate(firsts) if eq(v, votes[f])), len(firsts))
        if c == len(firsts):
            firsts.append(j)
        if any(eq(v, votes[i]) != (classes[i] == c) for i in range(j) if votes[i] is not None):
            return None
        classes.append(c)
    return classes


def _memo(same: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """`same`, each pair of answers compared once (math's answers_equal parses both)."""
    memo: dict[tuple[str, str], bool] = {}

    def eq(v: str, u: str) -> bool:
        if (v, u) not in memo:
            memo[v, u] = bool(same(v, u))
        return memo[v, u]

    return eq


def _binom_pmf(s: int, j: int, p: float) -> float:
    """P(Binomial(s, p) = j)."""
    if not 0 <= j <= s:
        return 0.0
    if p == 1.0:
        return float(j == s)
    if s <= 1000:  # (C(1000, 500) < 1e300: a float)
        return math.comb(s, j) * p**j * (1.0 - p) ** (s - j)
    logc = math.lgamma(s + 1) - math.lgamma(j + 1) - math.lgamma(s - j + 1)
    return math.exp(logc + j * math.log(p) + (s - j) * math.log1p(-p))


def expected_majority(classes: Sequence[int | None], hits: Sequence[float], k: int) -> float:
    """maj@k of one example from its n samples: the mean over the C(n, k) k-subsets (each in
    sample order) of the hit of the subset's majority answer (`majority_sample`: most votes,
    a tie to the answer the subset gives first; 0 when no sample of it votes). `classes`:
    each sample's answer class (`vote_classes`; None: no vote); `hits[i]`: sample i's 0/1 hit.

    Exact (up to float rounding) and polynomial: the majority's first sample is i, of class a,
    with t votes, when the subset holds i, none of a before i, t - 1 of a after i, and of every
    other class b either fewer than t, or t all after i (then i is given first); each of
    these counts is a choice within its class, so with the subset's size counted by x, the
    number of such subsets is the coefficient of x^(k - t) in a product of one polynomial per
    class (a class of fewer than t samples can never tie: its samples join those with no vote,
    unconstrained). To keep numbers small every sample is weighted as if kept with chance
    p = k/n (a subset of size k then weighs p^k (1-p)^(n-k), whatever it holds), and the
    total is divided by P(Binomial(n, p) = k). At most about 2n^2 array operations on
    |a| x (k - t + 1) arrays (for each class a with a hit, each t <= min(|a|, k) and each
    other class of t samples or more, t + 1 of them), so O(n^3 k) flops; a few milliseconds
    for n = 64, about 0.1 s for n = 256."""
    n = len(classes)
    if not 1 <= k <= n:
        raise ValueError(f"maj@{k} of {n} samples")
    members: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        if c is not None:
            members.setdefault(c, []).append(i)
    groups = [np.asarray(m) for m in members.values()]
    p = k / n
    q = 1.0 - p
    pmf = functools.cache(lambda s, j: _binom_pmf(s, j, p))
    total = 0.0
    for a, first in enumerate(groups):  # i: each sample of class a, a row of the arrays
        size = len(first)
        hit = np.asarray([hits[i] for i in first], dtype=float)
        if not hit.any():  # (a class without a hit adds nothing)
            continue
        for t in range(1, min(size, k) + 1):
            deg = k - t  # the other samples of the subset
            rivals = [g for b, g in enumerate(groups) if b != a and len(g) >= t]
            free = n - size - sum(len(g) for g in rivals)  # no vote, or a class below t
            poly = np.broadcast_to([pmf(free, d) for d in range(deg + 1)], (size, deg + 1))
            for g in rivals:
                nxt = np.zeros((size, deg + 1))
                for d in range(min(t - 1, deg) + 1):  # fewer than t of class b
                    nxt[:, d:] += pmf(len(g), d) * poly[:, : deg + 1 - d]
                if t <= deg:  # t of b, all after i: the ones after i kept, the others not
                    after = len(g) - np.searchsorted(g, first, side="right")
                    tie = [pmf(m, t) * q ** (len(g) - m) for m in after]
                    nxt[:, t:] += np.asarray(tie)[:, None] * poly[:, : deg + 1 - t]
                poly = nxt
            # i kept, the r samples of a before it not, t - 1 of the size - 1 - r after it
            own = [p * q**r * pmf(size - 1 - r, t - 1) for r in range(size)]
            total += float(np.sum(hit * np.asarray(own) * poly[:, deg]))
    return min(1.0, total / pmf(n, k))


def majority_at_k(spec: TaskSpec, votes: Sequence[str | None], hits: Sequence[float],
                  ks: Sequence[int], seed: int = 0) -> dict[int, tuple[float, bool]]:  # fmt: skip
    """{k: (maj@k, estimated)} of one example's n samples for each k in `ks` (module
    docstring), its answers compared as the spec's scoring compares them
    (`votes_majority_at_k`)."""
    return votes_majority_at_k(_same(spec), votes, hits, ks, seed)


def votes_majority_at_k(same: Callable[[str, str], bool], votes: Sequence[str | None],
                        hits: Sequence[float], ks: Sequence[int],
                        seed: int = 0) -> dict[int, tuple[float, bool]]:  # fmt: skip
    """{k: (maj@k, estimated)} of one example's n samples for each k in `ks`, two votes one
    answer when `same` says so (the RL held-out evals pass their reward's `same_answer`):
    k = n is the majority of all n (`majority`), k = 1 the mean hit of the samples that vote,
    others `expected_majority` — or, when the votes form no classes (`vote_classes`), the mean
    over every k-subset (at most MAJ_ENUMERATE of them) or over MAJ_DRAWS drawn from `seed`
    and k (estimated: True)."""
    from flaxlm.alignment.verify_math import majority_sample

    n, out = len(votes), {}
    same = _memo(same)
    classes = vote_classes(votes, same) if any(1 < k < n for k in ks) else None
    for k in ks:
        if k == n:
            first = majority_sample(votes, same)
            out[k] = (0.0 if first is None else float(hits[first]), False)
        elif k == 1:
            out[k] = (sum(float(h) for v, h in zip(votes, hits) if v is not None) / n, False)
        elif classes is not None:
            out[k] = (expected_majority(classes, hits, k), False)
        else:

            def maj(subset):
                first = majority_sample([votes[i] for i in subset], same)
                return 0.0 if first is None else float(hits[subset[first]])

            if math.comb(n, k) <= MAJ_ENUMERATE:
                subsets = list(itertools.combinations(range(n), k))
            else:
                rng = np.random.default_rng([seed, k])
                subsets = [tuple(sorted(rng.choice(n, k, replace=False)))
                           for _ in range(MAJ_DRAWS)]  # fmt: skip
            value = float(np.mean([maj(s) for s in subsets]))
            out[k] = (value, math.comb(n, k) > MAJ_ENUMERATE)
    return out


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def _response_text(new: list[int], tok, stops: Sequence[str], stop_tokens: Sequence[int],
                   reasoning_end: str = "", lead: Sequence[int] | None = None,
                   ) -> tuple[str, str | None, bool]:  # fmt: skip
    """New token ids → (response, reasoning, unfinished): cut at a stop token, decoded; with
    `reasoning_end`, the reasoning is the text before its last occurrence and the response the
    text after it, leading whitespace dropped (no marker: the reasoning never ended —
    unfinished, the reasoning is all of it and the response ""); the response is then cut at a
    stop string and stripped. Without `reasoning_end` the reasoning is None.

    `lead` (code scoring: the prompt's last ids): the response is decoded after them and keeps
    its leading whitespace — a completion's first line is indented ("    return x"), and a
    SentencePiece decode of the new ids alone drops the first piece's leading space."""
    for j, t in enumerate(new):
        # A model's vocabulary may be larger than its tokenizer's; an id past the tokenizer
        # (never seen in training, so only from an undertrained model) ends the response.
        if t in stop_tokens or not 0 <= t < tok.vocab_size:
            new = new[:j]
            break
    text, reasoning, unfinished = tok.decode(new), None, False
    if lead:
        head, both = tok.decode(list(lead)), tok.decode(list(lead) + list(new))
        text = both[len(head) :] if both.startswith(head) else text
    if reasoning_end:  # the answer's leading blank lines ("</think>\n\n") are no stop match
        reasoning, text, unfinished = split_reasoning(text, reasoning_end)
    text = truncate_at_stop(text, stops)
    return (text.rstrip() if lead else text.strip()), reasoning, unfinished


def _score_all(spec: TaskSpec, fields: list[dict], responses: list[str]) -> list[dict]:
    """score_response of each (fields, response); code scoring runs the programs
    `code_workers` at once from threads (each run is a subprocess: verify_code.score_batch)."""
    if spec.scoring != "code":
        return [score_response(spec, f, r) for f, r in zip(fields, responses)]
    from flaxlm.alignment.verify_code import score_batch

    fn = functools.partial(score_response, spec)
    return score_batch(fn, fields, responses, max_workers=code_workers())


def code_workers() -> int:
    """Programs run at once by code scoring: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # (no sched_getaffinity: macOS)
        return os.cpu_count() or 1


def generation(
    spec: TaskSpec,
    examples: list[Example],
    prompts: list[tuple[str, list[int]]],
    generate_fn: GenerateFn,
    tok,
    *,
    max_prompt_len: int,
    stop_tokens: Sequence[int] = (),
):
    """Runs a generation task.

    Args:
      examples: the evaluated rows; prompts: (readable text, ids) of each one's prompt
        (prompts.encode_prompt).
      max_prompt_len: longer prompts keep their first token if it is BOS (or EOS, the
        prefix of a tokenizer without BOS) and their last tokens
        (counted in metrics["truncated"], flagged per sample, and logged as a warning).
      stop_tokens: ids that end a response (EOS, the chat end token; also any id the tokenizer
        does not have); the text after them is dropped before the stop strings apply.
    Returns:
      (metrics, samples): mean of each score plus n; per example prompt, response (the first
      sample), responses (all k, when k > 1), answer and scores (means over the k samples).
    """
    head = prefix_ids(tok)  # a leading BOS (or a no-BOS tokenizer's EOS prefix) is kept

    def cut_left(p):
        keep = len(head) if head and p[: len(head)] == head else 0
        return p[:keep] + p[len(p) - max_prompt_len + keep :]

    ids = [p if len(p) <= max_prompt_len else cut_left(p) for _, p in prompts]
    cut = [len(p) > max_prompt_len for _, p in prompts]
    if any(cut):
        log.warning("task %r: %d of %d prompts longer than %d tokens were cut from the left "
                    "(BOS kept)", spec.name, sum(cut), len(cut), max_prompt_len)  # fmt: skip
    k = spec.num_samples
    # Stop strings end rows inside the decoder when it takes them — not with a reasoning
    # marker: there they apply only to the answer after it, not inside the reasoning.
    extra = {}
    if spec.stop and not spec.reasoning_end and _takes(generate_fn, "stop_strings"):
        extra["stop_strings"] = tuple(spec.stop)
    for name, value in spec.sampler.items():  # top_p, top_k, min_p: never dropped silently
        if not _takes(generate_fn, name):
            raise ValueError(f"task {spec.name!r}: {name}={value!r}, and its generate function "
                             f"takes no {name!r} argument")  # fmt: skip
        extra[name] = value
    if spec.temperature > 0 and k > 1 and _takes(generate_fn, "num_samples"):
        # k samples of each prompt, one prefill per prompt (the decoder repeats its cache)
        outs = generate_fn(ids, spec.max_new_tokens, temperature=spec.temperature,
                           num_samples=k, **extra)  # fmt: skip
    elif spec.temperature > 0:  # each prompt k times in a row; one decoder call for all
        outs = generate_fn([p for p in ids for _ in range(k)], spec.max_new_tokens,
                           temperature=spec.temperature, **extra)  # fmt: skip
    else:
        outs = generate_fn(ids, spec.max_new_tokens, **extra)
    if len(outs) != len(ids) * k:
        raise ValueError(f"task {spec.name!r}: the decoder returned {len(outs)} responses for "
                         f"{len(ids)} prompts x {k} samples")  # fmt: skip
    # Code: decoded after the prompt's last ids, so a completion keeps its indentation.
    code = spec.scoring == "code"
    splits = [[_response_text(new, tok, spec.stop, stop_tokens, spec.reasoning_end,
                              lead=ids[i][-8:] if code else None)
               for new in outs[i * k : (i + 1) * k]] for i in range(len(examples))]  # fmt: skip
    scored = _score_all(spec, [ex.fields for ex in examples for _ in range(k)],
                        [r for split in splits for r, _, _ in split])  # fmt: skip
    samples, sums = [], {}
    for i, (ex, (prompt, _)) in enumerate(zip(examples, prompts, strict=True)):
        split = splits[i]
        responses = [r for r, _, _ in split]
        per = scored[i * k : (i + 1) * k]
        if spec.reasoning_end:  # how often the budget ran out inside the reasoning
            for s, (_, _, unfinished) in zip(per, split):
                s["reasoning_unfinished"] = float(unfinished)
        scores = {name: float(np.mean([s[name] for s in per])) for name in per[0]}
        for name in (n for n in PASS_AT_K if n in scores):  # (a scoring has one of them)
            hits = sum(s[name] for s in per)
            for j in sorted({*spec.pass_at_k, *([k] if k > 1 else [])}):
                scores[f"pass@{j}"] = pass_at_k_estimate(k, hits, j)
        maj_ks = sorted({*spec.maj_at_k, *([k] if k > 1 else [])})
        if maj_ks and spec.scoring in VOTED:
            votes = [_vote(spec, r) for r in responses]
            seed = zlib.crc32(f"{spec.name}\0{ex.source}".encode())  # (estimates only)
            maj = majority_at_k(spec, votes, [s["exact_match"] for s in per], maj_ks, seed)
            for j, (value, estimated) in maj.items():
                scores[f"maj@{j}"] = value
                if estimated:  # (metrics: the share of examples whose maj@j is estimated)
                    scores[f"maj@{j}_estimated"] = 1.0
        for name, v in scores.items():
            sums[name] = sums.get(name, 0.0) + v
        row = {"source": ex.source, "prompt": prompt, "response": responses[0],
               "answer": ex.fields["answer"], "scores": scores, "truncated": cut[i]}  # fmt: skip
        if k > 1:
            row["responses"] = responses
        if spec.reasoning_end:
            row["reasoning"] = split[0][1]
        samples.append(row)
    metrics = {name: v / max(len(samples), 1) for name, v in sums.items()}
    metrics["truncated"] = sum(cut)
    metrics["n"] = len(samples)
    return metrics, samples
