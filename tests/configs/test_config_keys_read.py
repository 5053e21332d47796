"""Every key a config file defines is read by the code that runs it (a key nobody reads misleads
whoever changes it: nothing happens).

A static scan, precise per stage: for each config file and its main `arg` variants, the code
that can run it is the task's module (train/main.py `TASKS[config.task]`; the preprocessing
CLI for `configs/preprocess_world.py`) with the trainer (train/main.py, train/loop.py) and every
flaxlm module these import, transitively (function-level imports included; configs/*.py files
only define keys, so of them only configs/common.py counts). A leaf key `a.b.key` counts as
read when one of those files reads the name `key` — an attribute (`cfg.key`), a subscript or
`.get("key")`, a `getattr(x, "key")`, or a string naming it in a check table (`need("key",
...)`) — and that same file names the key's section `b` in an identifier or a string
(`config.rollout`, `loss_cfg`, f"opt.{key}": it handles, or is handed, that section); a key
without a section needs the read alone. So distill's on-policy `rollout` section, run by
alignment/distill.py's imports, cannot pass on the strength of GRPO's reads of
`rollout.empty_reward` (alignment/grpo.py is not among them), nor `grpo.loss_agg`'s name pass
for an `opt.loss_agg`.

What it cannot see: a read in an imported module on a path the stage never takes (distill
imports alignment/rl_eval.py, which reads `rollout.heldout_prompts` for the RL stages only),
and a section whose name is a common word (`ema`) is checked by its key names alone, nearly.

Sections handed whole to a dataclass (`model` → ModelConfig.from_dict, `lora` → LoraSpec) are
read by construction: their keys must be the dataclass's fields (an extra key would not build).
Reads a static scan cannot see are in `ALLOWED`, each with why.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import os
import re
from typing import NamedTuple

import pytest
from ml_collections import ConfigDict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = ("models", "train", "data", "alignment", "evaluation", "configs", "flaxlm")

# config file → the `arg` strings whose configs are checked: the default and every variant
# that adds or swaps sections or keys (loss types, LoRA, on-policy / text distillation, ...).
VARIANTS = {
    "pretrain": [None, "data=markov", "variant=125m"],
    "optimizers": [None],
    "scaling": [None, "predict=True"],
    "sft": [None, "lora=8"],
    "reward": [None, "lora=8"],
    "prm": [None, "lora=8"],
    "dpo": [None, "lora=8"]
    + [f"loss={t}" for t in ("conservative", "ipo", "simpo", "orpo", "exo_pair", "discopop")],
    "kto": [None, "lora=8"],
    "online_dpo": [None, "loss=ipo"],
    "ppo": [None, "lora=8"],
    "grpo": [None, "lora=8"],
    "distill": [None, "on_policy=True", "text=True"],
    "preprocess_world": [None],
}
# Entry modules of a config without `task` (the preprocessing settings).
ENTRY = {"preprocess_world": ["flaxlm.data.preprocess", "flaxlm.data.beam"]}
TRAINER = ["flaxlm.train.main", "flaxlm.train.loop"]

# Keys read where the scan cannot see it: (config file or "*", dotted key) → why. None today;
# an entry says where the read is (e.g. a module imported by name through importlib).
ALLOWED: dict[tuple[str, str], str] = {}


def _code_files() -> list[str]:
    out = []
    for folder in FOLDERS:
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    # configs/*.py define keys; only configs/common.py's helpers read them (model_keys_given)
    return [
        f
        for f in out
        if not (os.path.dirname(f) == os.path.join(REPO, "configs") and not f.endswith("common.py"))
    ]


def _module_file(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "flaxlm":
        return None
    base = os.path.join(REPO, *(parts[1:] or ["flaxlm"]))
    if len(parts) == 2 and parts[1] not in FOLDERS:  # flaxlm.generate → flaxlm/generate.py
        base = os.path.join(REPO, "flaxlm", parts[1])
    for cand in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.exists(cand):
            return cand
    return None


class _FileScan(NamedTuple):
    imports: set  # flaxlm module names this file imports (anywhere in it)
    names: set  # names it reads: attributes, subscripts, .get / getattr strings, other strings
    # the words of its identifiers and strings (`loss_cfg`, "opt.{key}" → loss, cfg, opt, key):
    # a file that names a section so handles it (or receives it: `make_optimizer(opt_cfg)`)
    words: set


@functools.cache
def _scan(path: str) -> _FileScan:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    imports, names, words = set(), set(), set()
    for node in ast.walk(tree):
        ident = getattr(node, "id", None) or getattr(node, "arg", None)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            ident = node.name
        if isinstance(ident, str):
            words |= {ident, *ident.split("_")}
        if isinstance(node, ast.Import):
            imports |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imports.add(node.module)
            imports |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import mod`
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            names.add(node.attr)
            words |= {node.attr, *node.attr.split("_")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # cfg["key"], cfg.get("key"), getattr(cfg, "key"), "key" in cfg, need("key", ...)
            names.add(node.value)
            for word in re.split(r"[^A-Za-z0-9_]+", node.value):
                words |= {word, *word.split("_")}
    return _FileScan({m for m in imports if m.startswith("flaxlm")}, names, words)


def _closure(modules) -> set[str]:
    """The files of `modules` and of every flaxlm module they import, transitively."""
    todo = [f for f in map(_module_file, modules) if f]
    seen: set[str] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += [g for g in map(_module_file, _scan(f).imports) if g and g not in seen]
    return seen & set(_code_files())


def _leaves(c: ConfigDict, prefix=()):
    for k in c:
        if isinstance(c[k], ConfigDict):
            yield from _leaves(c[k], prefix + (k,))
        else:
            yield prefix + (k,)


def _wholesale():
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.lora import LoraSpec

    return {"model": ModelConfig, "lora": LoraSpec}


def unread_keys(name: str, config: ConfigDict) -> list[str]:
    """The dotted keys of `config` (from configs/`name`.py) that the code running it never
    reads, by the rules of the module docstring."""
    task = config.get("task")
    if task is not None:
        from flaxlm.train.main import TASKS

        entry = [TASKS[task], *TRAINER]
    else:
        entry = ENTRY[name]
    files = sorted(_closure(entry))
    wholesale = _wholesale()
    bad = []
    for path in _leaves(config):
        dotted = ".".join(path)
        if (name, dotted) in ALLOWED or ("*", dotted) in ALLOWED:
            continue
        if path[0] in wholesale and len(path) == 2:
            if path[1] not in {f.name for f in dataclasses.fields(wholesale[path[0]])}:
                bad.append(dotted)
            continue
        key, section = path[-1], (path[-2] if len(path) > 1 else None)
        if not any(
            key in _scan(f).names and (section is None or section in _scan(f).words) for f in files
        ):
            bad.append(dotted)
    return bad


def _config(name: str, arg: str | None) -> ConfigDict:
    return importlib.import_module(f"flaxlm.configs.{name}").get_config(arg)


def test_every_config_file_is_checked():
    files = {f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")}
    assert files - {"__init__", "common"} == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_key_is_read_by_the_code_that_runs_it(name):
    for arg in VARIANTS[name]:
        bad = unread_keys(name, _config(name, arg))
        assert not bad, (
            f"configs/{name}.py:{arg or ''} defines keys nothing that runs it reads: {bad}. "
            "Remove them, wire them up, or (a read the scan cannot see) add them to ALLOWED "
            "with why."
        )


@pytest.mark.parametrize(
    "name, arg, key",
    [
        ("sft", None, "opt.dummy_unused_key"),  # a new key no code reads
        ("pretrain", None, "dummy_unused_key"),  # ... at the top level
        ("grpo", None, "lora.dummy_unused_key"),  # not a LoraSpec field
        # a key another stage reads (grpo.py, ppo.py) but not this one's code: distillation's
        # rollouts have no rewards
        ("distill", "on_policy=True", "rollout.empty_reward"),
        ("ppo", None, "rollout.jsd_beta"),  # a name only another stage's code reads
        ("ppo", None, "guard.vf_coef"),  # read by ppo.py, but as a `ppo` key, not a `guard` one
        ("grpo", None, "opt.loss_agg"),  # ... as a `grpo` key
    ],
)
def test_a_key_nobody_reads_fails(name, arg, key):
    """The check can fail: a key added to a config that its stage's code does not read."""
    c = _config(name, arg)
    *sections, leaf = key.split(".")
    node = c
    with c.unlocked():
        for s in sections:
            node = node[s]
        node[leaf] = 1.0 if leaf not in node else node[leaf]
    assert key in unread_keys(name, c)
