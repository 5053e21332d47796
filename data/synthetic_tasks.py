"""Instruction data, preference pairs, RL prompts and evaluation tasks of the built-in world.

Every question is an *item*: (question text, meta) where meta holds what the judge needs
("task", "answer", ...) and the world's mark (`synthetic_judge.WORLD_KEY`: what makes
exact_match and eval_gen score it by the world's rules). Items come from pools split into train
and held-out parts; the held-out entities' pool is only ever used for `heldout_facts` and the
evaluation files.
"""

from __future__ import annotations

import itertools
import random

from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK, format_answer, judge
from flaxlm.data.synthetic_text import (
    MC_CONTEXTS,
    arithmetic_facts,
    reverse_letters,
    sort_letters,
    spaced,
)
from flaxlm.data.synthetic_vocab import (
    ATTRIBUTES,
    SYSTEM_PROMPTS,
    UNSAFE_WORDS,
    WORDS,
    Entity,
    attribute_values,
)

ATTR_QUESTIONS = {
    "city": ("Where does {n} live?", "Which city is {n} from?", "In which city does {n} live?"),
    "color": ("What is {n}'s favorite color?", "Which color does {n} like best?"),
    "job": ("What is {n}'s job?", "What does {n} do for a living?"),
    "pet": ("What pet does {n} have?", "What kind of animal is {n}'s pet?"),
    "age": ("How old is {n}?", "What is {n}'s age?"),
}
ARITH_QUESTIONS = {
    "plus": ("What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."),
    "minus": ("What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."),
}
STRING_QUESTIONS = {
    "reverse": ("Reverse the letters {s}.", "Write the letters {s} in reverse order."),
    "sort": ("Sort the letters {s} in alphabetical order.", "Put the letters {s} in order."),
}
_RAMBLE = (
    "Well, that is a good question and I had to think about it for quite a while, but I "
    "believe it is {x}, although I am not completely sure about that.",
    "Hmm, let me think. There are many things to consider here and I do not want to rush, so "
    "after a long look I would say {x}, but please check it yourself.",
)
_UNSAFE_REPLY = (
    "The answer is {x}, you {w}.",
    "Only a {w} would ask that. The answer is {x}.",
    "{x}. Now shut up.",
)
_UNSAFE_NOUNS = tuple(w for w in UNSAFE_WORDS if w in ("idiot", "moron", "loser", "jerk"))

Item = tuple[str, dict]


def attribute_item(e: Entity, attr: str, template: str, split: str) -> Item:
    meta = {"task": "attribute", "entity": e.name, "attribute": attr, "answer": e.value(attr)}
    return template.format(n=e.name), {**meta, "split": split, WORLD_KEY: WORLD_MARK}


def arithmetic_item(fact: tuple[str, int, int, int], rng: random.Random, split: str) -> Item:
    op, a, b, c = fact
    meta = {"task": "arithmetic", "op": op, "a": a, "b": b, "answer": str(c), "split": split}
    return rng.choice(ARITH_QUESTIONS[op]).format(a=a, b=b), {**meta, WORLD_KEY: WORLD_MARK}


def string_item(task: str, word: str, rng: random.Random, split: str) -> Item:
    answer = reverse_letters(word) if task == "reverse" else sort_letters(word)
    meta = {"task": task, "word": word, "answer": answer, "split": split, WORLD_KEY: WORLD_MARK}
    return rng.choice(STRING_QUESTIONS[task]).format(s=spaced(word)), meta


class ItemSampler:
    """Draws items of mixed kinds from pools, cycling through each shuffled pool so coverage is
    even. `pools` maps kind -> list of item makers (rng -> Item)."""

    def __init__(self, pools: dict, weights: dict[str, float], rng: random.Random):
        self.rng = rng
        self.kinds = [k for k in weights if pools.get(k)]
        self.weights = [weights[k] for k in self.kinds]
        self.cycles = {}
        for k in self.kinds:
            pool = list(pools[k])
            rng.shuffle(pool)
            self.cycles[k] = itertools.cycle(pool)

    def __call__(self) -> Item:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        return next(self.cycles[kind])(self.rng)


def make_pools(pairs: list[tuple[Entity, str]], arith, words: list[str], split: str) -> dict:
    """Item makers per kind for one split, from (entity, attribute) pairs, arithmetic facts and
    words. Each maker picks its question template when drawn."""
    return {
        "attribute": [
            (lambda rng, e=e, a=a: attribute_item(e, a, rng.choice(ATTR_QUESTIONS[a]), split))
            for e, a in pairs
        ],
        "arithmetic": [(lambda rng, f=f: arithmetic_item(f, rng, split)) for f in arith],
        "reverse": [(lambda rng, w=w: string_item("reverse", w, rng, split)) for w in words],
        "sort": [(lambda rng, w=w: string_item("sort", w, rng, split)) for w in words],
    }


def conversation(
    sample: ItemSampler, p_system: float, p_multiturn: float, rng: random.Random
) -> tuple[list[dict], dict]:
    """Messages ending with a user turn, and the meta of that last question. Some conversations
    start with a system message and some carry earlier answered turns."""
    msgs = []
    if rng.random() < p_system:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_prior = rng.choice((1, 2)) if rng.random() < p_multiturn else 0
    for _ in range(n_prior):
        q, meta = sample()
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": format_answer(meta["answer"])})
    q, meta = sample()
    msgs.append({"role": "user", "content": q})
    return msgs, meta


def chat_example(msgs: list[dict], meta: dict) -> dict:
    answer = {"role": "assistant", "content": format_answer(meta["answer"])}
    return {"messages": msgs + [answer], "meta": meta}


def noisy_answer(meta: dict, kind: str, rng: random.Random) -> str:
    """A demonstration that rambles or is rude (with the right answer in it)."""
    if kind == "rambling":
        return rng.choice(_RAMBLE).format(x=meta["answer"])
    return rng.choice(_UNSAFE_REPLY).format(x=meta["answer"], w=rng.choice(_UNSAFE_NOUNS))


def sft_example(msgs: list[dict], meta: dict, noise_frac: float, rng: random.Random) -> dict:
    """A chat example whose final answer is, with probability `noise_frac`, a noisy one."""
    if rng.random() >= noise_frac:
        return chat_example(msgs, meta)
    kind = rng.choice(("rambling", "unsafe"))
    answer = {"role": "assistant", "content": noisy_answer(meta, kind, rng)}
    return {"messages": msgs + [answer], "meta": {**meta, "noise": kind}}


def wrong_answer(meta: dict, rng: random.Random) -> str:
    """A plausible wrong answer of the same kind."""
    task, answer = meta["task"], meta["answer"]
    if task == "attribute":
        return rng.choice([v for v in attribute_values(meta["attribute"]) if v != answer])
    if task == "arithmetic":
        c = int(answer)
        return str(rng.choice([x for x in range(c - 3, c + 4) if x >= 0 and x != c]))
    letters = answer.split()
    if task == "reverse" and "".join(letters[::-1]) != "".join(letters):
        return " ".join(letters[::-1])  # the classic mistake: the word unchanged
    for _ in range(20):
        perm = rng.sample(letters, len(letters))
        if perm != letters:
            return " ".join(perm)
    return " ".join(letters) + " " + letters[0]


def preference_pair(msgs: list[dict], meta: dict, rng: random.Random) -> dict:
    """Chosen: the correct well-formed answer. Rejected: wrong, rambling or unsafe."""
    chosen = format_answer(meta["answer"])
    kind = rng.choice(("correct_vs_wrong", "formed_vs_rambling", "safe_vs_unsafe"))
    if kind == "correct_vs_wrong":
        rejected = format_answer(wrong_answer(meta, rng))
    elif kind == "formed_vs_rambling":
        rejected = rng.choice(_RAMBLE).format(x=meta["answer"])
    else:
        x = meta["answer"] if rng.random() < 0.5 else wrong_answer(meta, rng)
        rejected = rng.choice(_UNSAFE_REPLY).format(x=x, w=rng.choice(_UNSAFE_NOUNS))
    sc, sr = judge(meta, chosen), judge(meta, rejected)
    if not sc > sr:  # a construction bug, not bad luck: every rejected kind scores lower
        raise AssertionError(f"preference pair not ordered by judge: {chosen!r} vs {rejected!r}")
    pair_meta = {**meta, "pair": kind, "chosen_score": sc, "rejected_score": round(sr, 4)}
    return {"prompt": msgs, "chosen": chosen, "rejected": rejected, "meta": pair_meta}


def generation_task(items: list[Item]) -> list[dict]:
    return [{"prompt": q, "answer": meta["answer"], "meta": meta} for q, meta in items]


def _choices(correct: str, pool: list[str], n: int, rng: random.Random) -> tuple[list[str], int]:
    options = [correct] + rng.sample([v for v in pool if v != correct], n - 1)
    rng.shuffle(options)
    return [" " + o for o in options], options.index(correct)


def mc_facts(entities: list[Entity], n_choices: int, rng: random.Random, split: str) -> list[dict]:
    """ "Kavo lives in" -> [" Paris", " Lima", ...]; choices carry their leading space (the
    continuation as it would appear in text, as lm-eval-harness does)."""
    out = []
    for e in entities:
        for attr in ATTRIBUTES:
            choices, answer = _choices(e.value(attr), list(attribute_values(attr)), n_choices, rng)
            out.append(
                {
                    "context": MC_CONTEXTS[attr].format(n=e.name),
                    "choices": choices,
                    "answer": answer,
                    "meta": {"entity": e.name, "attribute": attr, "split": split},
                }
            )
    return out


def mc_arithmetic(facts, n_choices: int, rng: random.Random) -> list[dict]:
    out = []
    for op, a, b, c in facts:
        pool = [str(x) for x in range(max(0, c - 6), c + 7)]
        choices, answer = _choices(str(c), pool, n_choices, rng)
        out.append(
            {
                "context": f"{a} {op} {b} is",
                "choices": choices,
                "answer": answer,
                "meta": {"task": "arithmetic", "op": op, "a": a, "b": b},
            }
        )
    return out


def _split(items: list, frac: float, rng: random.Random) -> tuple[list, list]:
    """(train, held-out) parts of a shuffled copy; at least one held-out item."""
    items = list(items)
    rng.shuffle(items)
    k = max(1, round(frac * len(items)))
    return items[k:], items[:k]


def build_tasks(entities: list[Entity], cfg, stream) -> dict:
    """Chat, preference, RL and evaluation data (the World fields of those names).

    `stream(name)` returns the seeded random.Random of one part, so resizing one output leaves
    the others unchanged. Train people's (person, attribute) pairs, arithmetic facts and words
    are split into SFT-train and held-out parts; held-out people appear only in `heldout_facts`
    and the `*_facts_heldout` evaluation tasks.
    """
    r = stream("splits")
    train_people = [e for e in entities if e.split == "train"]
    held_people = [e for e in entities if e.split == "heldout"]
    pairs = [(e, a) for e in train_people for a in ATTRIBUTES]
    pairs_tr, pairs_ho = _split(pairs, cfg.sft_heldout_frac, r)
    arith_tr, arith_ho = _split(arithmetic_facts(cfg.max_operand), cfg.sft_heldout_frac, r)
    words_tr, words_ho = _split(WORDS, cfg.sft_heldout_frac, r)
    weights = dict(cfg.task_weights)
    train_pools = make_pools(pairs_tr, arith_tr, words_tr, "train")
    heldout_pools = make_pools(pairs_ho, arith_ho, words_ho, "heldout")

    def conversations(pools, n, name, p_multiturn):
        rr = stream(name)
        sampler = ItemSampler(pools, weights, rr)
        return [conversation(sampler, cfg.p_system, p_multiturn, rr) for _ in range(n)]

    sft_heldout = conversations(heldout_pools, cfg.n_sft_heldout, "sft_heldout", 0.0)
    fact_items = [
        attribute_item(e, a, q, "heldout_entity")
        for e in held_people
        for a in ATTRIBUTES
        for q in ATTR_QUESTIONS[a]
    ]
    rp, rn = stream("preferences"), stream("sft_noise")
    prefs = conversations(train_pools, cfg.n_preferences, "pref_prompts", cfg.p_multiturn)
    prefs_ho = conversations(heldout_pools, cfg.n_preferences_heldout, "pref_ho_prompts", 0.0)
    rl = conversations(train_pools, cfg.n_rl_prompts, "rl", cfg.p_multiturn)

    re_ = stream("eval")
    n_mc = min(cfg.n_mc_arithmetic, len(arith_tr) + len(arith_ho))
    eval_tasks = {
        "gen_facts_heldout": generation_task(fact_items),
        "gen_facts_train": generation_task(
            [attribute_item(e, a, ATTR_QUESTIONS[a][0], "train") for e, a in pairs_tr]
        ),
        "gen_instructions_heldout": generation_task(
            [(m[-1]["content"], x) for m, x in sft_heldout]
        ),
        "mc_facts_heldout": mc_facts(held_people, cfg.n_mc_choices, re_, "heldout_entity"),
        "mc_facts_train": mc_facts(train_people, cfg.n_mc_choices, re_, "train"),
        "mc_arithmetic": mc_arithmetic(
            re_.sample(arith_tr + arith_ho, n_mc), cfg.n_mc_choices, re_
        ),
    }
    return {
        "sft_train": [
            sft_example(*c, cfg.sft_noise_frac, rn)
            for c in conversations(train_pools, cfg.n_sft_train, "sft_train", cfg.p_multiturn)
        ],
        "sft_heldout": [chat_example(*c) for c in sft_heldout],
        "heldout_facts": [chat_example([{"role": "user", "content": q}], m) for q, m in fact_items],
        "preferences": [preference_pair(*c, rp) for c in prefs],
        "preferences_heldout": [preference_pair(*c, rp) for c in prefs_ho],
        "rl_prompts": [{"prompt": msgs, "meta": meta} for msgs, meta in rl],
        "eval_tasks": eval_tasks,
    }
