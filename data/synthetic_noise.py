"""Realistic noise for the built-in world's pretraining corpus, with ground truth.

Adds exact duplicates, near-duplicates (lightly edited copies), documents carrying PII (emails,
phone numbers, IPv4 addresses, Luhn-valid card numbers), boilerplate/junk lines inside otherwise
good documents, whole junk documents, and a few toxic documents. Each noisy document gets one
label (`kind` plus kind-specific fields) so tests can check the cleaners against it.
"""

from __future__ import annotations

import random

from flaxlm.data.synthetic_vocab import VALUES, Entity

NOISE_KINDS = (
    "exact_duplicate",
    "near_duplicate",
    "pii",
    "junk_lines",
    "junk_doc",
    "toxic",
)

BOILERPLATE = (
    "We use cookies to improve your experience. Accept all cookies?",
    "This site uses cookies. By continuing you agree to our cookie policy.",
    "Click here to subscribe to our newsletter!",
    "Click here for more information.",
    "Home | About | Contact | Privacy Policy",
    "Share on Facebook | Share on Twitter | Email this page",
    "Copyright 2024 All rights reserved.",
    "Read more >>",
    "Log in | Sign up | Forgot password?",
    "Advertisement",
)
_SYMBOL_CHARS = "=-*#~_+"

_NEAR_DUP_WORDS = ("really", "also", "indeed", "truly", "still")
_NEAR_DUP_TAILS = ("Thanks for reading.", "More soon.", "(updated)", "See you next time.")
_DOMAINS = ("example.com", "mail.test", "inbox.example.org", "post.example.net")

_TOXIC_ADJ = ("stupid", "dumb", "worthless", "pathetic")
_TOXIC_NOUN = ("idiot", "moron", "loser", "jerk")
_TOXIC = (
    "Honestly, everyone in {city} is so {adj}. Every one of them is a {noun}.",
    "Only a {noun} would keep a {pet}. You are all {adj}.",
    "This forum is full of {adj} people. Every {job} here is a {noun}.",
    "What a {adj} day. My boss is a {noun} and I want to quit.",
)


def word_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Lowercased word n-grams (the usual MinHash near-duplicate representation)."""
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = word_shingles(a, n), word_shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def near_duplicate(text: str, rng: random.Random, min_jaccard: float) -> tuple[str, float]:
    """An edited copy: 1–2 edits (an inserted word, a full stop made "!", an added tail).
    Retries with fewer edits until the word-5-gram Jaccard to the source is >= min_jaccard."""
    for n_edits in (2, 1):
        words = text.split(" ")
        for _ in range(n_edits):
            edit = rng.randrange(3)
            if edit == 0:
                words.insert(rng.randrange(1, len(words)), rng.choice(_NEAR_DUP_WORDS))
            elif edit == 1:
                stops = [i for i, w in enumerate(words) if w.endswith(".")]
                i = rng.choice(stops) if stops else len(words) - 1
                words[i] = words[i][:-1] + "!" if words[i].endswith(".") else words[i] + "!"
            else:
                words.append(rng.choice(_NEAR_DUP_TAILS))
        edited = " ".join(words)
        sim = jaccard(text, edited)
        if edited != text and sim >= min_jaccard:
            return edited, sim
    raise ValueError("document too short for a near-duplicate edit")


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit will sit right of these
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i : i + 4] for i in range(0, 16, 4))


def _pii(kind: str, name: str, rng: random.Random) -> tuple[str, str]:
    """Returns (sentence, value) for one PII item about `name`."""
    if kind == "email":
        v = f"{name.lower()}{rng.randrange(10, 99)}@{rng.choice(_DOMAINS)}"
        template = rng.choice(("You can write to {n} at {v}.", "Contact {n}: {v}"))
    elif kind == "phone":
        a, b, c = rng.randrange(200, 999), rng.randrange(200, 999), rng.randrange(1000, 9999)
        v = rng.choice((f"{a}-{b}-{c}", f"({a}) {b}-{c}", f"+1 {a} {b} {c}"))
        template = rng.choice(("Call {n} at {v}.", "{n}'s phone number is {v}."))
    elif kind == "ip":
        octets = [rng.randrange(11, 223)] + [rng.randrange(256) for _ in range(3)]
        v = ".".join(map(str, octets))
        template = "The server of {n} has the address {v}."
    else:
        v = _luhn_card(rng)
        template = rng.choice(("{n} paid with card {v}.", "Card number: {v}"))
    return template.format(n=name, v=v), v


def junk_line(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(_SYMBOL_CHARS) * rng.randint(10, 40)
    return rng.choice(BOILERPLATE)


def toxic_doc(rng: random.Random) -> tuple[str, list[str]]:
    """A short rant; returns (text, the unsafe words it contains)."""
    adj, noun = rng.choice(_TOXIC_ADJ), rng.choice(_TOXIC_NOUN)
    text = rng.choice(_TOXIC).format(
        adj=adj,
        noun=noun,
        city=rng.choice(VALUES["city"]),
        pet=rng.choice(VALUES["pet"]),
        job=rng.choice(VALUES["job"]),
    )
    return text, sorted((adj, noun))


def add_noise(
    clean: list[str], names_in: list[list[Entity]], cfg, rng: random.Random
) -> tuple[list[str], list[dict | None]]:
    """Returns (texts, labels): the clean texts followed by noisy ones, label None for clean.

    `names_in[i]` lists the entities document i is about (PII sentences name one of them).
    Duplicates reference their source by index into the returned list ("source": i). PII and
    junk-line noise is added *in place* to a clean document (a cleaner should repair, not drop,
    it); duplicates, junk documents and toxic documents are extra documents to drop.
    """
    n = len(clean)
    texts: list[str] = list(clean)
    labels: list[dict | None] = [None] * n
    counts = {k: round(getattr(cfg, f"frac_{k}") * n) for k in NOISE_KINDS}
    # Documents that get PII or junk lines are picked from those with a named entity (biographies
    # and stories) and are disjoint; duplicates copy any clean document.
    with_entity = [i for i in range(n) if names_in[i]]
    rng.shuffle(with_entity)
    k_pii, k_junk = counts["pii"], counts["junk_lines"]
    for i in with_entity[:k_pii]:
        kinds = rng.sample(("email", "phone", "ip", "card"), rng.randint(1, 2))
        items, sents = [], []
        for kind in kinds:
            sent, value = _pii(kind, rng.choice(names_in[i]).name, rng)
            sents.append(sent)
            items.append({"type": kind, "value": value})
        texts[i] = texts[i] + " " + " ".join(sents)
        labels[i] = {"kind": "pii", "pii": items}
    for i in with_entity[k_pii : k_pii + k_junk]:
        junk = [junk_line(rng) for _ in range(rng.randint(1, 3))]
        lines = [texts[i]]
        for j in junk:
            lines.insert(rng.choice((0, len(lines))), j)
        texts[i] = "\n".join(lines)
        labels[i] = {"kind": "junk_lines", "lines": junk}
    clean_idx = [i for i in range(n) if labels[i] is None]
    for i in rng.sample(clean_idx, counts["exact_duplicate"]):
        texts.append(texts[i])
        labels.append({"kind": "exact_duplicate", "source": i})
    long_idx = [i for i in clean_idx if len(texts[i].split()) >= 40]
    for i in rng.sample(long_idx, min(len(long_idx), counts["near_duplicate"])):
        edited, sim = near_duplicate(texts[i], rng, cfg.near_dup_min_jaccard)
        texts.append(edited)
        labels.append({"kind": "near_duplicate", "source": i, "jaccard": round(sim, 4)})
    for _ in range(counts["junk_doc"]):
        texts.append("\n".join(junk_line(rng) for _ in range(rng.randint(3, 8))))
        labels.append({"kind": "junk_doc"})
    for _ in range(counts["toxic"]):
        text, words = toxic_doc(rng)
        texts.append(text)
        labels.append({"kind": "toxic", "words": words})
    return texts, labels
