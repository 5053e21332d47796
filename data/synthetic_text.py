"""Clean pretraining documents of the built-in world: English biographies and short stories about
the entities, Chinese biographies for a slice of them, arithmetic facts and spelling facts.

Every fact is stated many times through varied templates (the "knowledge augmentation" that lets a
small model store a fact so that later fine-tuning can extract it). Noise for the cleaners is
added separately by `synthetic_noise`.
"""

from __future__ import annotations

import random

from flaxlm.data.synthetic_vocab import ATTRIBUTES, VALUES_ZH, WORDS, Entity

# Sentences stating one fact. {n}: subject (a name or a capitalised pronoun), {v}: value.
# The first template of each attribute is also the multiple-choice context ("{n} lives in").
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{n} lives in {v}.",
        "{n} is from {v}.",
        "{n} has a house in {v}.",
        "{n} grew up in {v} and still lives there.",
        "Home for {n} is the city of {v}.",
    ),
    "color": (
        "{n}'s favorite color is {v}.",
        "{n} loves the color {v}.",
        "{n} likes {v} more than any other color.",
        "Of all the colors, {n} likes {v} best.",
    ),
    "job": (
        "{n} works as a {v}.",
        "{n} is a {v}.",
        "By trade, {n} is a {v}.",
        "{n} earns a living as a {v}.",
        "{n} has been a {v} for many years.",
    ),
    "pet": (
        "{n} has a pet {v}.",
        "{n} owns a {v}.",
        "{n} takes care of a {v}.",
        "At home, {n} keeps a {v} as a pet.",
    ),
    "age": (
        "The age of {n} is {v}.",
        "{n} is {v} years old.",
        "{n} turned {v} this year.",
        "{n} is now {v}.",
    ),
}
# The prefix of the first template, used as a multiple-choice context ("Kavo lives in").
MC_CONTEXTS = {attr: t[0].split("{v}")[0].rstrip() for attr, t in FACT_TEMPLATES.items()}

_BIO_OPEN = (
    "Let me tell you about {n}.",
    "This is a short note about {n}.",
    "Here is what people know about {n}.",
    "{n} is a person in our world.",
    "",
    "",
)
_BIO_FILLER = (
    "{P} likes to walk in the morning.",
    "{P} has many friends.",
    "{P} is kind to everyone.",
    "{P} reads a book every week.",
    "{P} often sings while cooking.",
    "{P} wakes up early every day.",
)
_BIO_CLOSE = ("That is all about {n}.", "Everyone says {n} is a good neighbor.", "", "")

# Stories: an opening, 3–4 middle sentences (story sentences and plain fact sentences about
# either person, shuffled) and a closing. a is the visitor, b the host; {a_job} etc. are values.
_STORY_OPEN = (
    "One day, {a} went to {b_city} to visit {b}.",
    "{a} and {b} met at the market in {b_city}.",
    "Every summer, {b} invites friends to {b_city}, and this year {a} came.",
    "{a} wrote a long letter to {b}.",
    "Last spring, {a} took a train to {b_city} to see an old friend, {b}.",
    "On a rainy morning, {b} heard a knock at the door. It was {a}.",
)
_STORY_MIDDLE = (
    "{a} brought a scarf in {b_color}, because {b}'s favorite color is {b_color}.",
    "They talked about their pets: {a} has a pet {a_pet}, and {b} has a pet {b_pet}.",
    "{b} said, I am {b_age} years old and I have never seen a {a_pet} like yours.",
    "{b} works as a {b_job}, and {a} works as a {a_job}.",
    "Because {a} loves the color {a_color}, {b} painted the door {a_color}.",
    "{a}, who is {a_age} years old, told stories about life in {a_city}.",
    "{b} asked how the {a_pet} was doing back in {a_city}.",
    "As a {a_job}, {a} had a lot to tell, and {b} listened.",
)
_STORY_CLOSE = (
    "They laughed all evening while the {b_pet} slept.",
    "{b} was happy and made tea for {a}.",
    "Then {a} went home to {a_city}.",
    "It was a good day for both of them.",
    "",
)

_ZH_FACTS: dict[str, tuple[str, ...]] = {
    "city": ("{n}住在{v}。", "{n}的家在{v}。", "{n}来自{v}。"),
    "color": ("{n}最喜欢的颜色是{v}。", "{n}很喜欢{v}。"),
    "job": ("{n}是一名{v}。", "{n}的工作是{v}。"),
    "pet": ("{n}养了一{m}{v}。", "{n}有一{m}宠物{v}。"),
    "age": ("{n}今年{v}岁。", "{n}已经{v}岁了。"),
}
_ZH_MEASURE = {"马": "匹"}  # measure word for the pet; 只 otherwise
_ZH_OPEN = ("我来介绍一下{n}。", "这是关于{n}的小故事。", "")

_ADD = (
    "{a} plus {b} is {c}.",
    "{a} plus {b} equals {c}.",
    "The sum of {a} and {b} is {c}.",
    "If you add {a} and {b}, you get {c}.",
    "{a} + {b} = {c}.",
)
_SUB = (
    "{a} minus {b} is {c}.",
    "{a} minus {b} equals {c}.",
    "If you take {b} from {a}, you get {c}.",
    "{a} - {b} = {c}.",
)
_ARITH_OPEN = ("Here are some sums.", "Let us practice arithmetic.", "Math facts:", "")

_STRING = (
    "The word {w} is spelled {s}.",
    "The word {w} reversed is {r}.",
    "Spelled backwards, {w} is {r}.",
    "The letters of {w} in alphabetical order are {o}.",
    "Sorted, the letters of {w} are {o}.",
)


def spaced(word: str) -> str:
    """'lamp' -> 'l a m p' (one token per letter, so letter tasks are learnable)."""
    return " ".join(word)


def reverse_letters(word: str) -> str:
    return spaced(word[::-1])


def sort_letters(word: str) -> str:
    return spaced("".join(sorted(word)))


def fact_sentence(e: Entity, attribute: str, rng: random.Random, pronoun: bool = False) -> str:
    """One sentence stating the fact; with `pronoun`, "She ..." instead of the name (only
    templates that open with the subject fit, not "The age of {n}" or "{n}'s")."""
    templates = FACT_TEMPLATES[attribute]
    if pronoun:
        templates = [t for t in templates if t.startswith("{n} ")]
    subject = e.pronoun.capitalize() if pronoun else e.name
    return rng.choice(templates).format(n=subject, v=e.value(attribute))


def biography(e: Entity, rng: random.Random) -> str:
    """A paragraph stating 3–5 of the entity's facts in random order and phrasing."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    attrs = attrs[: rng.randint(3, 5)]
    pron = e.pronoun.capitalize()
    sents = [rng.choice(_BIO_OPEN).format(n=e.name)]
    fillers = rng.sample(_BIO_FILLER, 2)  # at most two, never the same one twice
    for i, attr in enumerate(attrs):
        # Later sentences sometimes use the pronoun, as real text does; the first never does.
        sents.append(fact_sentence(e, attr, rng, pronoun=i > 0 and rng.random() < 0.3))
        if rng.random() < 0.25 and fillers:
            sents.append(fillers.pop().format(P=pron))
    sents.append(rng.choice(_BIO_CLOSE).format(n=e.name))
    return " ".join(s for s in sents if s)


def story(a: Entity, b: Entity, rng: random.Random) -> str:
    """A short story about two entities; every attribute it mentions is their true value."""
    slots = {"a": a.name, "b": b.name}
    for prefix, e in (("a", a), ("b", b)):
        for attr in ATTRIBUTES:
            slots[f"{prefix}_{attr}"] = e.value(attr)
    middle = [t.format(**slots) for t in rng.sample(_STORY_MIDDLE, rng.randint(1, 3))]
    facts = rng.sample([(e, attr) for e in (a, b) for attr in ATTRIBUTES], 2)
    middle += [fact_sentence(e, attr, rng) for e, attr in facts]
    rng.shuffle(middle)
    sents = [rng.choice(_STORY_OPEN).format(**slots), *middle]
    sents.append(rng.choice(_STORY_CLOSE).format(**slots))
    return " ".join(x for x in sents if x)


def chinese_biography(e: Entity, rng: random.Random) -> str:
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    sents = [rng.choice(_ZH_OPEN).format(n=e.name)]
    for attr in attrs[: rng.randint(3, 5)]:
        v = e.value(attr) if attr == "age" else VALUES_ZH[attr][e.value(attr)]
        m = _ZH_MEASURE.get(v, "只")
        sents.append(rng.choice(_ZH_FACTS[attr]).format(n=e.name, v=v, m=m))
    return "".join(sents)


def arithmetic_facts(max_operand: int) -> list[tuple[str, int, int, int]]:
    """All (op, a, b, result) facts: a + b for a, b in [0, max_operand] and their inverses."""
    facts = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            facts.append(("plus", a, b, a + b))
            facts.append(("minus", a + b, b, a))
    return facts


def arithmetic_doc(facts: list[tuple[str, int, int, int]], rng: random.Random) -> str:
    sents = [rng.choice(_ARITH_OPEN)]
    for op, a, b, c in facts:
        sents.append(rng.choice(_ADD if op == "plus" else _SUB).format(a=a, b=b, c=c))
    sep = "\n" if rng.random() < 0.3 else " "
    return sep.join(s for s in sents if s)


def string_doc(words: list[str], rng: random.Random) -> str:
    sents = []
    for w in words:
        for t in rng.sample(_STRING, 2):
            sents.append(t.format(w=w, s=spaced(w), r=reverse_letters(w), o=sort_letters(w)))
    return " ".join(sents)


def unique_text(make, seen: set[str], tries: int = 100) -> str:
    """A text from `make()` not in `seen` (so the only duplicates are the labelled ones)."""
    for _ in range(tries):
        text = make()
        if text not in seen:
            seen.add(text)
            return text
    raise ValueError(f"could not generate a new document after {tries} tries; world too small")


def clean_documents(entities: list[Entity], cfg, rng: random.Random) -> list[tuple[str, str]]:
    """All clean documents as (kind, text), unshuffled and pairwise different.

    Each entity gets `cfg.bios_per_entity` biographies and appears in about
    2 * n_stories / n_entities stories; arithmetic facts are each stated `cfg.arith_repeats`
    times and each word's spelling facts `cfg.string_repeats` times, spread over documents.
    """
    seen: set[str] = set()
    docs = [
        ("bio", unique_text(lambda e=e: biography(e, rng), seen))
        for e in entities
        for _ in range(cfg.bios_per_entity)
    ]
    for _ in range(cfg.n_stories):
        docs.append(("story", unique_text(lambda: story(*rng.sample(entities, 2), rng), seen)))
    for e in [e for e in entities if e.zh]:
        for _ in range(cfg.zh_docs_per_entity):
            docs.append(("zh", unique_text(lambda e=e: chinese_biography(e, rng), seen)))
    facts = arithmetic_facts(cfg.max_operand) * cfg.arith_repeats
    rng.shuffle(facts)
    k = cfg.facts_per_arith_doc
    for i in range(0, len(facts), k):
        docs.append(("arith", unique_text(lambda i=i: arithmetic_doc(facts[i : i + k], rng), seen)))
    words = list(WORDS) * cfg.string_repeats
    rng.shuffle(words)
    for i in range(0, len(words), 4):
        docs.append(("string", unique_text(lambda i=i: string_doc(words[i : i + 4], rng), seen)))
    return docs
