"""The docs' commands stay true to the code (README, docs/CONTRIBUTING.md and bench/RESULTS.md:
a GPU lease runs what RESULTS.md says, with no time to debug a renamed flag): every
`--config.KEY` shown is a key of a stage config (or of preprocessing's), every
`python -m flaxlm.X` shown is a module, and every `--flag` written after one is a flag that
module (or a flaxlm module it imports) defines.

Static, so it runs in a second: the configs are built, the CLIs are read, nothing runs. The
commands themselves run elsewhere (the demo, the journeys, tests/test_python_api.py)."""

import ast
import importlib.util
import os
import re

import pytest

from flaxlm.configs import distill, dpo, grpo, kto, online_dpo, ppo, pretrain, prm, reward, sft
from flaxlm.data.preprocess import preprocess_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/CONTRIBUTING.md", "bench/RESULTS.md")
TEXT = "\n".join(open(os.path.join(REPO, p), encoding="utf-8").read() for p in DOCS)
PLACEHOLDERS = {"a.b"}  # README: "Any key can be overridden with `--config.a.b=value`"


def _configs():
    stages = (pretrain, sft, reward, prm, dpo, kto, distill, ppo, grpo, online_dpo)
    return [m.get_config("") for m in stages] + [preprocess_config()]


def _has(config, key) -> bool:
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def test_every_config_key_the_readme_shows_exists():
    keys = {k.rstrip(".") for k in re.findall(r"--config\.([A-Za-z_][\w.]*)", TEXT)}
    assert len(keys) > 30, "the pattern no longer finds the docs' overrides"
    configs = _configs()
    missing = sorted(k for k in keys - PLACEHOLDERS if not any(_has(c, k) for c in configs))
    assert not missing, f"the docs name config keys no config has: {missing}"


def _sources(module: str) -> str:
    """The module's source, its package's modules when it is a package (`python -m` runs its
    __main__), and the flaxlm modules it imports (a bench's flags live in a shared helper)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"the docs run `python -m {module}`: no such module"
    paths = [spec.origin]
    if spec.origin.endswith("__init__.py"):
        main = os.path.join(os.path.dirname(spec.origin), "__main__.py")
        paths += [main] if os.path.exists(main) else []
    text = ""
    for path in paths:
        src = open(path, encoding="utf-8").read()
        text += src
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flaxlm"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    try:
                        dep = importlib.util.find_spec(name)
                    except ModuleNotFoundError:
                        dep = None
                    if dep is not None and dep.origin and dep.origin.endswith(".py"):
                        text += open(dep.origin, encoding="utf-8").read()
    return text


def _commands():
    """(module, flags, line) of each `python -m flaxlm...` in the docs. A comment after the
    command may show more of its flags, but from a mention of another command on ("# generate
    --json files") its flags are that command's."""
    found = []
    for line in TEXT.splitlines():
        for m in re.finditer(r"python -m (flaxlm[\w.]*)((?:(?!python -m)[^`\n])*)", line):
            found.append((m.group(1), m.group(2), line.strip()))
    names = {module.rsplit(".", 1)[-1] for module, _, _ in found}
    out = []
    for module, rest, line in found:
        command, _, comment = rest.partition("#")
        others = "|".join(sorted(names - {module.rsplit(".", 1)[-1]}))
        comment = re.split(rf"\b(?:{others})\b", comment)[0]
        flags = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command + " " + comment)
        out.append((module, [f for f in flags if f != "--config"], line))
    return out


COMMANDS = _commands()


def test_the_readme_has_commands():
    assert len({m for m, _, _ in COMMANDS}) > 15


@pytest.mark.parametrize("module", sorted({m for m, _, _ in COMMANDS}))
def test_each_module_the_readme_runs_exists_and_defines_its_flags(module):
    src = _sources(module)
    missing = [
        (flag, line[:90])
        for m, flags, line in COMMANDS
        if m == module
        for flag in flags
        if f'"{flag}"' not in src and f"'{flag}'" not in src
    ]
    assert not missing, f"the docs show flags `python -m {module}` does not define: {missing}"
