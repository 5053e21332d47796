"""Fixed tables of the built-in world: attribute values (English and Chinese), words for the string
tasks, the mild unsafe-word list, and the entity generator.

Everything the world's text can say is drawn from these small lists, so a sentencepiece model of
1–2k pieces covers it and a model of a few million parameters can learn it on a laptop.
"""

from __future__ import annotations

import dataclasses
import random

# The attributes every entity has, in the order they are usually stated.
ATTRIBUTES = ("city", "color", "job", "pet", "age")

# Value tables. Jobs and pets start with a consonant so every template can say "a {job}".
VALUES: dict[str, tuple[str, ...]] = {
    "city": ("Paris", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Rome", "Quito"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "job": ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "singer", "miner"),
    "pet": ("cat", "dog", "rabbit", "parrot", "horse", "goat", "turtle", "hamster"),
}
AGE_RANGE = (18, 79)  # inclusive; ages are drawn uniformly from it

VALUES_ZH: dict[str, dict[str, str]] = {
    "city": {
        "Paris": "巴黎",
        "Lima": "利马",
        "Oslo": "奥斯陆",
        "Cairo": "开罗",
        "Delhi": "德里",
        "Tokyo": "东京",
        "Rome": "罗马",
        "Quito": "基多",
    },
    "color": {
        "red": "红色",
        "blue": "蓝色",
        "green": "绿色",
        "yellow": "黄色",
        "purple": "紫色",
        "orange": "橙色",
        "white": "白色",
        "black": "黑色",
    },
    "job": {
        "baker": "面包师",
        "farmer": "农民",
        "teacher": "老师",
        "doctor": "医生",
        "painter": "画家",
        "sailor": "水手",
        "singer": "歌手",
        "miner": "矿工",
    },
    "pet": {
        "cat": "猫",
        "dog": "狗",
        "rabbit": "兔子",
        "parrot": "鹦鹉",
        "horse": "马",
        "goat": "山羊",
        "turtle": "乌龟",
        "hamster": "仓鼠",
    },
}

# Short common words for the reverse/sort tasks (3–5 letters, lowercase, no repeats).
WORDS = (
    "cat dog sun map cup hat pen box bus egg fox jam key kit log mud net owl pig rug "
    "sky toy van web yak zip ant bee cow elk hen ram bat arm leg ink ice oak pea "
    "lamp ship bird fish frog star moon tree rock sand wind rain snow leaf seed road "
    "door desk book song cake milk soup rice bread apple lemon grape chair table river "
    "cloud stone plant horse sheep tiger zebra mouse house train light"
).split()

# Mild unsafe words: a few toxic documents in the corpus and unsafe candidate answers use them,
# and the judge penalises any response that contains one (matched as whole words).
UNSAFE_WORDS = (
    "idiot",
    "stupid",
    "moron",
    "dumb",
    "loser",
    "jerk",
    "worthless",
    "pathetic",
    "shut up",
    "hate you",
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "You answer questions about the world. Keep answers short.",
    "Be concise and polite.",
)

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_CODAS = ("", "", "", "n", "r", "l")


@dataclasses.dataclass(frozen=True)
class Entity:
    """One person of the world. `split` is "train" (facts also in SFT) or "heldout" (pretraining
    corpus only); `zh` marks the slice whose facts are also written in Chinese."""

    name: str
    pronoun: str  # "she" or "he"
    city: str
    color: str
    job: str
    pet: str
    age: int
    split: str
    zh: bool

    def value(self, attribute: str) -> str:
        """The attribute's value as text ("Paris", "34")."""
        return str(getattr(self, attribute))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def attribute_values(attribute: str) -> tuple[str, ...]:
    """All values an attribute can take, as text."""
    if attribute == "age":
        return tuple(str(a) for a in range(AGE_RANGE[0], AGE_RANGE[1] + 1))
    return VALUES[attribute]


def reserved_words() -> set[str]:
    """Lowercase words the world's templates and tables use; generated names avoid them so a
    whole-word search for a name never hits ordinary text."""
    words = set(WORDS)
    for values in VALUES.values():
        words.update(v.lower() for v in values)
    # Common English words that syllable names could collide with.
    words.update(
        "bale bare bone dare date dome done dose fame fare gale game gone kale lane late lone "
        "lore made male mane mare mile mine mole more mule name nine none nose note pale pane "
        "pole pore pose rare rate robe role rose rule sale same sole some sore tale tame tile "
        "time tone tore tune vole vote zone dine fine line pine tine wine gave save wave rave "
        "ravine divine marine tomato potato banana salami".split()
    )
    return words


def _make_name(rng: random.Random) -> str:
    n_syllables = rng.choice((2, 2, 2, 3))
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_entities(
    n_entities: int, n_heldout: int, zh_fraction: float, rng: random.Random
) -> list[Entity]:
    """Generates `n_entities` people with unique names; the last `n_heldout` (after a shuffle) form
    the held-out split. Attribute values are balanced per split so chance stays near 1/8."""
    if not 0 < n_heldout < n_entities:
        raise ValueError(f"need 0 < n_heldout ({n_heldout}) < n_entities ({n_entities})")
    reserved = reserved_words()
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_entities:
        name = _make_name(rng)
        if name.lower() in reserved or name in seen:
            continue
        # Names must not prefix each other ("Kalo" / "Kalon") so substring checks stay exact.
        if any(o.startswith(name) or name.startswith(o) for o in seen):
            continue
        seen.add(name)
        names.append(name)
    splits = ["train"] * (n_entities - n_heldout) + ["heldout"] * n_heldout
    # Cycle through shuffled value lists so every value appears about equally often.
    columns = {}
    for attr, values in VALUES.items():
        col = [values[i % len(values)] for i in range(n_entities)]
        rng.shuffle(col)
        columns[attr] = col
    n_zh = round(zh_fraction * n_entities)
    zh_idx = set(rng.sample(range(n_entities), n_zh))
    return [
        Entity(
            name=names[i],
            pronoun=rng.choice(("she", "he")),
            city=columns["city"][i],
            color=columns["color"][i],
            job=columns["job"][i],
            pet=columns["pet"][i],
            age=rng.randint(*AGE_RANGE),
            split=splits[i],
            zh=i in zh_idx,
        )
        for i in range(n_entities)
    ]
