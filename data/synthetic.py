"""The built-in world: a deterministic, offline, generated dataset for `make demo` and the tests.

A few dozen people with generated names (Kavo, Rulen, ...) have a city, favorite color, job, pet
and age. The world provides, from one seed:

- a pretraining corpus: English biographies and short stories stating every fact many times in
  varied phrasings, Chinese biographies for a slice of the people, arithmetic facts
  ("7 plus 5 is 12"), spelling facts ("lamp reversed is p m a l"), plus labelled noise for the
  cleaners (exact/near duplicates, PII, boilerplate lines, junk and toxic documents);
- chat instruction data with verifiable answers ("The answer is X."), some multi-turn, some with
  a system message;
- held-out splits: people whose facts appear *only* in the pretraining corpus (`heldout_facts`),
  held-out questions of the trained kinds (`sft_heldout`), plain text for perplexity;
- a rule-based judge (`judge(meta, response)`, see `synthetic_judge`) and preference pairs it
  orders; prompts for RL; evaluation task files (generation and multiple choice);
- stepwise-labelled running-sum chains for a process reward model (`prm_steps`,
  `prm_steps_heldout`, and soft-labelled as Math-Shepherd's rollouts would, `prm_steps_soft`,
  `prm_steps_soft_heldout`: synthetic_steps.py; made when asked for, not written to files).

    world = build_world("small", seed=0)          # in memory
    write_world("runs/demo/world", "demo", seed=0)  # files + manifest.json
    world = load_world("runs/demo/world")          # back from files
    refresh_world("runs/demo/world")               # an older generator's world: written again

Sizes come from a `WorldConfig`; PRESETS["demo"] fits the 2-core demo, PRESETS["small"] the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random

from flaxlm.data import synthetic_tasks as T
from flaxlm.data import synthetic_text as X
from flaxlm.data.synthetic_judge import (
    WORLD_KEY,
    WORLD_MARK,
    extract_answers,
    format_answer,
    is_correct,
    judge,
    judge_parts,
)
from flaxlm.data.synthetic_noise import NOISE_KINDS, add_noise
from flaxlm.data.synthetic_vocab import ATTRIBUTES, UNSAFE_WORDS, WORDS, Entity, make_entities

__all__ = ["ATTRIBUTES", "NOISE_KINDS", "PRESETS", "UNSAFE_WORDS", "WORLD_FORMAT", "Entity",
           "World", "WorldConfig", "build_world", "extract_answers", "format_answer",
           "is_correct", "judge", "judge_parts", "load_world", "read_jsonl", "refresh_world",
           "world_format", "write_unsafe_words", "write_world"]  # fmt: skip

log = logging.getLogger(__name__)

# Version of the files write_world writes (manifest.json "format"; a manifest without one is 1).
# 2: every question's meta carries the world's mark (synthetic_judge.WORLD_KEY), which is what
# makes exact_match and eval_gen score it by the world's rules: a format-1 world's answers, read
# as data.train / eval_gen.sets, would be compared as plain text ("The answer is 7." != "7") and
# score 0. Code that reuses a world on disk calls `refresh_world`, which writes it again.
WORLD_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world. Defaults are the demo preset."""

    n_entities: int = 48  # people in the world
    n_heldout_entities: int = 12  # of them, facts only in pretraining (never in SFT/preferences)
    zh_fraction: float = 0.25  # people whose facts are also written in Chinese
    bios_per_entity: int = 20  # English biographies per person (3–5 facts each)
    n_stories: int = 500  # two-person stories
    zh_docs_per_entity: int = 4  # Chinese biographies per person of the Chinese slice
    max_operand: int = 15  # arithmetic facts a + b and (a + b) - b for a, b in [0, max_operand]
    arith_repeats: int = 3  # times each arithmetic fact is stated in the corpus
    facts_per_arith_doc: int = 10
    string_repeats: int = 4  # times each word's spelling facts appear in the corpus
    # Noise, as fractions of the number of clean documents.
    frac_exact_duplicate: float = 0.03
    frac_near_duplicate: float = 0.05
    frac_pii: float = 0.05
    frac_junk_lines: float = 0.08
    frac_junk_doc: float = 0.02
    frac_toxic: float = 0.01
    near_dup_min_jaccard: float = 0.75  # word-5-gram Jaccard of a near-duplicate to its source
    n_heldout_text: int = 100  # documents of held-out plain text (perplexity)
    sft_heldout_frac: float = 0.2  # of train people's (person, attribute) pairs, sums and words
    n_sft_train: int = 3000
    n_sft_heldout: int = 300
    p_system: float = 0.2  # conversations that start with a system message
    p_multiturn: float = 0.2  # conversations with 1–2 earlier answered turns
    # SFT demonstrations whose final answer rambles or is rude, as human-written data sometimes
    # is: SFT imitates them, and the preference stages (reward model → PPO, DPO) are what
    # remove them. Their meta carries "noise": "rambling" | "unsafe".
    sft_noise_frac: float = 0.2
    task_weights: tuple = (("attribute", 0.5), ("arithmetic", 0.25), ("reverse", 0.125),
                           ("sort", 0.125))  # fmt: skip
    n_preferences: int = 1500
    n_preferences_heldout: int = 200
    n_rl_prompts: int = 1000
    n_mc_choices: int = 4
    n_mc_arithmetic: int = 200


PRESETS = {
    "demo": WorldConfig(),
    "small": WorldConfig(
        n_entities=12,
        n_heldout_entities=4,
        bios_per_entity=4,
        n_stories=20,
        zh_docs_per_entity=2,
        max_operand=5,
        arith_repeats=1,
        string_repeats=1,
        n_heldout_text=10,
        n_sft_train=120,
        n_sft_heldout=30,
        n_preferences=60,
        n_preferences_heldout=20,
        n_rl_prompts=30,
        n_mc_arithmetic=20,
    ),
}


@dataclasses.dataclass
class World:
    """Everything the world generates, as JSON-ready records (what `write_world` writes)."""

    config: WorldConfig
    seed: int
    entities: list[Entity]
    pretrain: list[dict]  # {"id", "text"}
    pretrain_labels: list[dict]  # per document: {"id", "content", "noise", ...noise fields}
    heldout_text: list[dict]  # {"id", "text"}
    sft_train: list[dict]  # {"messages", "meta"}
    sft_heldout: list[dict]
    heldout_facts: list[dict]
    preferences: list[dict]  # {"prompt", "chosen", "rejected", "meta"}
    preferences_heldout: list[dict]
    rl_prompts: list[dict]  # {"prompt", "meta"}
    eval_tasks: dict[str, list[dict]]

    @property
    def train_entities(self) -> list[Entity]:
        return [e for e in self.entities if e.split == "train"]

    @property
    def heldout_entities(self) -> list[Entity]:
        return [e for e in self.entities if e.split == "heldout"]

    @functools.cached_property
    def prm_steps(self) -> list[dict]:
        """Stepwise-supervision records (data/synthetic_steps.py running-sum chains) for a
        process reward model, `builtin:prm_steps`: made from the config and seed when asked
        for, not written by `write_world` (the demo's files are as before)."""
        return self._prm_chains[0]

    @functools.cached_property
    def prm_steps_heldout(self) -> list[dict]:
        """Held-out chains, none the same as a `prm_steps` one (`builtin:prm_steps_heldout`)."""
        return self._prm_chains[1]

    @functools.cached_property
    def prm_steps_soft(self) -> list[dict]:
        """The `prm_steps` chains with simulated rollout-fraction labels (synthetic_steps.py
        `soft_records`), `builtin:prm_steps_soft`."""
        return self._prm_soft_chains[0]

    @functools.cached_property
    def prm_steps_soft_heldout(self) -> list[dict]:
        """The `prm_steps_heldout` chains soft-labelled (`builtin:prm_steps_soft_heldout`)."""
        return self._prm_soft_chains[1]

    @functools.cached_property
    def _prm_soft_chains(self) -> tuple[list[dict], list[dict]]:
        from flaxlm.data.synthetic_steps import soft_records

        return tuple(soft_records(recs, seed=self.seed * 7919 + 101 + i)
                     for i, recs in enumerate(self._prm_chains))  # fmt: skip

    @functools.cached_property
    def _prm_chains(self) -> tuple[list[dict], list[dict]]:
        from flaxlm.data.synthetic_steps import world_chains

        c = self.config
        return world_chains(c.max_operand, c.n_sft_train, c.n_sft_heldout, self.seed)

    def noise_ids(self, kind: str | None = None) -> set[str]:
        """Ids of noisy pretraining documents (of one noise kind, or all)."""
        return {
            r["id"]
            for r in self.pretrain_labels
            if r["noise"] is not None and (kind is None or r["noise"] == kind)
        }

    def manifest(self) -> dict:
        noise = {k: len(self.noise_ids(k)) for k in NOISE_KINDS}
        texts = [d["text"] for d in self.pretrain]
        return {
            "format": WORLD_FORMAT,
            "seed": self.seed,
            "config": dataclasses.asdict(self.config),
            "counts": {name: len(getattr(self, name)) for name in _RECORD_FILES},
            "entities": {"train": len(self.train_entities), "heldout": len(self.heldout_entities)},
            "pretrain_chars": sum(map(len, texts)),
            "pretrain_words": sum(len(t.split()) for t in texts),
            "noise": noise,
            "eval_tasks": {
                name: {
                    "file": f"eval/{name}.jsonl",
                    "type": "generation" if name.startswith("gen_") else "multiple_choice",
                    "count": len(rows),
                }
                for name, rows in self.eval_tasks.items()
            },
        }


# World fields written one jsonl file each (name.jsonl); eval tasks go to eval/<task>.jsonl.
_RECORD_FILES = ("pretrain", "pretrain_labels", "heldout_text", "sft_train", "sft_heldout",
                 "heldout_facts", "preferences", "preferences_heldout", "rl_prompts")  # fmt: skip


def _corpus(entities: list[Entity], cfg: WorldConfig, rng: random.Random):
    """Clean documents plus noise, shuffled, with ids and one label row per document."""
    docs = X.clean_documents(entities, cfg, rng)
    about = [[e for e in entities if kind in ("bio", "story") and e.name in text]
             for kind, text in docs]  # fmt: skip
    texts, noise = add_noise([t for _, t in docs], about, cfg, rng)
    # What each document is made of: a clean kind, or "junk"/"toxic" for added documents.
    content = [k for k, _ in docs]
    for lab in noise[len(docs) :]:
        content.append(docs[lab["source"]][0] if "source" in lab else lab["kind"].split("_")[0])
    order = list(range(len(texts)))
    rng.shuffle(order)
    ids = {old: f"pt-{new:06d}" for new, old in enumerate(order)}
    pretrain, labels = [], []
    for old in order:
        row = {"id": ids[old], "content": content[old], "noise": None}
        if noise[old] is not None:
            lab = dict(noise[old])
            row["noise"] = lab.pop("kind")
            if "source" in lab:
                lab["source_id"] = ids[lab.pop("source")]
            row.update(lab)
        pretrain.append({"id": ids[old], "text": texts[old]})
        labels.append(row)
    return pretrain, labels


def _heldout_text(entities, cfg: WorldConfig, rng: random.Random, seen: set[str]) -> list[dict]:
    """Fresh clean documents of every kind, none identical to a pretraining document."""
    facts = X.arithmetic_facts(cfg.max_operand)
    makers = (
        (0.5, lambda: X.biography(rng.choice(entities), rng)),
        (0.25, lambda: X.story(*rng.sample(entities, 2), rng)),
        (0.1, lambda: X.arithmetic_doc(rng.sample(facts, cfg.facts_per_arith_doc), rng)),
        (0.1, lambda: X.string_doc(rng.sample(WORDS, 4), rng)),
        (0.05, lambda: X.chinese_biography(rng.choice(entities), rng)),
    )
    pick = lambda: rng.choices([m for _, m in makers], [w for w, _ in makers])[0]()
    texts = [X.unique_text(pick, seen) for _ in range(cfg.n_heldout_text)]
    return [{"id": f"ho-{i:06d}", "text": t} for i, t in enumerate(texts)]


def build_world(preset: str | WorldConfig = "demo", seed: int = 0, **overrides) -> World:
    """Generates the world in memory. `preset` is a PRESETS name or a WorldConfig; `overrides`
    replace config fields (e.g. n_entities=20). Same arguments, same world, byte for byte."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    cfg = dataclasses.replace(cfg, **overrides)
    rng = lambda name: random.Random(f"flaxlm-world:{seed}:{name}")  # one stream per part
    entities = make_entities(
        cfg.n_entities, cfg.n_heldout_entities, cfg.zh_fraction, rng("entities")
    )
    pretrain, labels = _corpus(entities, cfg, rng("corpus"))
    heldout_text = _heldout_text(entities, cfg, rng("heldout_text"), {d["text"] for d in pretrain})
    return World(
        config=cfg,
        seed=seed,
        entities=entities,
        pretrain=pretrain,
        pretrain_labels=labels,
        heldout_text=heldout_text,
        **T.build_tasks(entities, cfg, rng),
    )


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Rows of a jsonl file; a bad line raises naming file:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{i}: invalid JSON: {err}") from err
    return rows


def write_world(out_dir: str, preset: str | WorldConfig = "demo", seed: int = 0, **overrides):
    """Builds the world and writes it under `out_dir`; returns the World.

    Files: <name>.jsonl for pretrain, pretrain_labels, heldout_text, sft_train, sft_heldout,
    heldout_facts, preferences, preferences_heldout, rl_prompts; entities.jsonl;
    eval/<task>.jsonl; unsafe_words.txt (the world's toxic words, one a line: the data
    cleaner's extra word list, `clean.toxic_lists`); manifest.json (format `WORLD_FORMAT`, seed,
    config, counts, noise counts, eval task index), written last.
    """
    world = build_world(preset, seed, **overrides)
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    write_unsafe_words(out_dir)
    for name in _RECORD_FILES:
        _write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), getattr(world, name))
    _write_jsonl(os.path.join(out_dir, "entities.jsonl"), [e.to_json() for e in world.entities])
    for name, rows in world.eval_tasks.items():
        _write_jsonl(os.path.join(out_dir, "eval", f"{name}.jsonl"), rows)
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(world.manifest(), f, indent=1, ensure_ascii=False)
    return world


def write_unsafe_words(out_dir: str) -> str:
    """Writes out_dir/unsafe_words.txt (UNSAFE_WORDS, one a line); returns its path."""
    path = os.path.join(out_dir, "unsafe_words.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(UNSAFE_WORDS) + "\n")
    return path


def _manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _config(manifest: dict) -> WorldConfig:
    cfg = dict(manifest["config"])
    cfg["task_weights"] = tuple(tuple(kw) for kw in cfg["task_weights"])
    return WorldConfig(**cfg)


def world_format(manifest: dict) -> int:
    """The `WORLD_FORMAT` a world's manifest was written in (1: before the field existed)."""
    return int(manifest.get("format", 1))


def refresh_world(out_dir: str) -> bool:
    """Writes the world at `out_dir` again (same config and seed, logged) when an older
    generator wrote it (manifest format < `WORLD_FORMAT`: e.g. questions without the world's
    mark, which the rewards and eval_gen would score 0 when right); returns whether it did.
    The corpus is the same: what a format adds is fields of the records."""
    manifest = _manifest(out_dir)
    have = world_format(manifest)
    if have >= WORLD_FORMAT:
        return False
    log.warning(
        "%s: a world of format %d (its questions lack meta.%s=%r, so their answers are not "
        "judged by the world's rules); writing it again in format %d (same config, seed %s)",
        out_dir, have, WORLD_KEY, WORLD_MARK, WORLD_FORMAT, manifest["seed"],
    )  # fmt: skip
    write_world(out_dir, _config(manifest), manifest["seed"])
    return True


def load_world(out_dir: str) -> World:
    """Reads a world written by `write_world` back into memory (as it is on disk: an older
    format's is logged; `refresh_world` writes it again)."""
    manifest = _manifest(out_dir)
    if world_format(manifest) < WORLD_FORMAT:
        log.warning("%s: a world of format %d, older than %d (refresh_world writes it again)",
                    out_dir, world_format(manifest), WORLD_FORMAT)  # fmt: skip
    records = {name: read_jsonl(os.path.join(out_dir, f"{name}.jsonl")) for name in _RECORD_FILES}
    return World(
        config=_config(manifest),
        seed=manifest["seed"],
        entities=[Entity(**r) for r in read_jsonl(os.path.join(out_dir, "entities.jsonl"))],
        eval_tasks={
            name: read_jsonl(os.path.join(out_dir, info["file"]))
            for name, info in manifest["eval_tasks"].items()
        },
        **records,
    )
