"""Stepwise-supervision records of the built-in world: running-sum chains, for process reward
models (alignment/prm.py) — the tests', and the demo's should it train one.

A record asks for the sum of a few small numbers and answers it one addition per step,
carrying the running total:

    {"prompt": "Add 3, 2, 1 and 4.",
     "steps": ["3 + 2 = 5", "5 + 1 = 7", "7 + 4 = 11"],
     "labels": [1, 0, 0],
     "meta": {"task": "sum_chain", "terms": [3, 2, 1, 4], "answer": "10", "first_error": 1,
              "error": "sum"}}

With probability `p_error` one step (uniformly chosen) goes wrong, in one of two ways (`errors`):
"sum", its result is off by 1 or 2 (never below 0), or "carry", it adds to a running total
off by 1 or 2 (a copying slip: the previous result, or for the first step the first number,
written down wrong) and sums correctly from there. The steps after it add correctly to the
wrong total, so every step from the first error on is labelled 0 (Math-Shepherd's and
PRM800K's convention: a step after a mistake cannot lead to the right answer). Checking each
step on its own therefore finds the first error but not the later ones: a verifier must also
see that an earlier step went wrong. With p_error <= 0.5 the commoner label at every step
position is 1, so the step position alone predicts no better than the majority label.

Soft labels (`soft_records`): the same records labelled as Math-Shepherd labels steps without a
human, by "soft estimation" — from each step a completer finishes the chain N times and the
label is the fraction of rollouts reaching the right answer. Simulated here: a rollout slips on
each step still to go with probability `p_slip`, so from a right step i of n it succeeds with
probability (1 − p_slip)^(n − 1 − i) and the label is a Binomial(N, that) draw over N (a right
final step is 1.0); from a wrong step no rollout reaches the answer (0.0; a second slip undoing
the first is not simulated). Early right steps thus get noisy labels below 1, now and then
below 0.5 — the estimate's noise a soft-label PRM has to live with.

Splits (`split_of`): a list of numbers is held out or not by a hash of it, so held-out chains
add lists no training chain adds. Records are drawn independently (a small world repeats
some). `chain_records(n, seed=...)` is deterministic per seed; the built-in world exposes
`prm_steps` / `prm_steps_heldout` (`builtin:prm_steps`, data/synthetic.py: `world_chains`) and
the same chains soft-labelled, `prm_steps_soft` / `prm_steps_soft_heldout`.
"""

from __future__ import annotations

import random
import zlib

TASK = "sum_chain"
ERRORS = ("sum", "carry")


def _off(rng: random.Random, x: int) -> int:
    """x moved by 1 or 2, never below 0."""
    return x + rng.choice([d for d in (-2, -1, 1, 2) if x + d >= 0])


def chain_record(rng: random.Random, *, max_operand: int, n_terms: int, p_error: float,
                 errors: tuple = ERRORS) -> dict:  # fmt: skip
    """One running-sum record (see the module docstring) of `n_terms` numbers in
    [0, max_operand]: n_terms − 1 steps, one of them wrong with probability `p_error`, in one
    of the ways `errors` allows (drawn uniformly)."""
    if n_terms < 2:
        raise ValueError(f"n_terms={n_terms}: a chain needs at least two numbers")
    if not errors or set(errors) - set(ERRORS):
        raise ValueError(f"errors={errors!r}: some of {ERRORS}")
    terms = [rng.randint(0, max_operand) for _ in range(n_terms)]
    n_steps = n_terms - 1
    bad = rng.randrange(n_steps) if rng.random() < p_error else -1
    kind = rng.choice(errors) if bad >= 0 else ""
    steps, labels, total, ok = [], [], terms[0], True
    for i, b in enumerate(terms[1:]):
        if i == bad and kind == "carry":
            total = _off(rng, total)
        c = total + b
        if i == bad and kind == "sum":
            c = _off(rng, c)
        ok = ok and i != bad
        steps.append(f"{total} + {b} = {c}")
        labels.append(int(ok))
        total = c
    prompt = "Add " + ", ".join(map(str, terms[:-1])) + f" and {terms[-1]}."
    meta = {
        "task": TASK,
        "terms": terms,
        "answer": str(sum(terms)),
        "first_error": bad,
        "error": kind,
    }
    return {"prompt": prompt, "steps": steps, "labels": labels, "meta": meta}


SPLITS = ("train", "heldout")
HELDOUT_EVERY = 5  # one list of numbers in this many is held out (`split_of`)


def split_of(terms) -> str:
    """The split a list of numbers belongs to, by a hash of it: the held-out chains add lists
    of numbers no training chain adds (so held-out accuracy is not recall of a training
    record), and a correct and a corrupted chain of one list are never in two splits."""
    return SPLITS[zlib.crc32(repr(list(terms)).encode()) % HELDOUT_EVERY == 0]


def chain_records(n: int, *, seed: int = 0, split: str | None = None, max_operand: int = 5,
                  terms: tuple = (3, 4), p_error: float = 0.5,
                  errors: tuple = ERRORS) -> list[dict]:  # fmt: skip
    """`n` records drawn independently (a small world repeats some), each of a number of terms
    drawn from `terms` (an inclusive range), of the lists of numbers in `split` (None: any).
    Independent draws keep the labels' distribution the one `p_error` sets: requiring distinct
    records would run out of correct chains (one per list) first and skew a small world's
    splits towards wrong steps. Deterministic per seed."""
    if split not in (None, *SPLITS):
        raise ValueError(f"split={split!r}: one of {SPLITS} or None")
    rng = random.Random(seed)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:  # (a split no list of these sizes falls into)
            raise ValueError(f"chain_records: no {split} chains of {terms} terms in "
                             f"[0, {max_operand}]")  # fmt: skip
        rec = chain_record(rng, max_operand=max_operand, n_terms=rng.randint(*terms),
                           p_error=p_error, errors=errors)  # fmt: skip
        if split in (None, split_of(rec["meta"]["terms"])):
            out.append(rec)
    return out


def rollout_labels(record: dict, rng: random.Random, *, rollouts: int = 8,
                   p_slip: float = 0.1) -> list[float]:  # fmt: skip
    """The simulated soft estimate of each step of a `chain_record` (module docstring): the
    fraction of `rollouts` completions from it that reach the right answer."""
    n, bad = len(record["steps"]), record["meta"]["first_error"]
    out = []
    for i in range(n):
        if 0 <= bad <= i:  # the running total is already wrong
            out.append(0.0)
            continue
        p = (1.0 - p_slip) ** (n - 1 - i)
        out.append(sum(rng.random() < p for _ in range(rollouts)) / rollouts)
    return out


def soft_records(records: list[dict], *, seed: int, rollouts: int = 8,
                 p_slip: float = 0.1) -> list[dict]:  # fmt: skip
    """`records` (chain records) with their labels replaced by `rollout_labels`; the meta
    records how (`rollouts`, `p_slip`). Deterministic per seed."""
    rng = random.Random(seed)
    return [{**r, "labels": rollout_labels(r, rng, rollouts=rollouts, p_slip=p_slip),
             "meta": {**r["meta"], "rollouts": rollouts, "p_slip": p_slip}}
            for r in records]  # fmt: skip


def world_chains(max_operand: int, n_train: int, n_heldout: int, seed: int):
    """(train, held-out) chain records of a world whose arithmetic facts go up to
    `max_operand` (data/synthetic.py `WorldConfig`): 3 or 4 numbers in [0, max_operand // 3],
    so every right step is one of the world's facts (a, b <= max_operand) — an SFT model
    pretrained on its corpus has read them."""
    small = max(max_operand // 3, 1)
    return tuple(chain_records(n, seed=seed * 7919 + 17 + i, split=split, max_operand=small)
                 for i, (split, n) in enumerate(zip(SPLITS, (n_train, n_heldout))))  # fmt: skip
