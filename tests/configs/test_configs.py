"""Every config file builds, is locked, and its sweep expands; typos fail naming the key."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(
    f
    for f in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(f).startswith(("_", "common"))
)


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_key(config, dotted):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_builds_locks_and_sweeps(path):
    mod = _load(path)
    for arg in (None, "runlocal=True"):
        c = mod.get_config(arg)
        assert c.is_locked
        with pytest.raises(AttributeError):
            c.definitely_not_a_key = 1
    runs = []
    if hasattr(mod, "sweep"):
        mod.sweep(lambda **kw: runs.append(kw), None)
        assert runs, "sweep() added no runs"
        c = mod.get_config(None)
        for run in runs:
            for key in run:
                assert _has_key(c, key), f"sweep key {key} is not in the config"


def test_misspelt_override_names_the_key(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flaxlm.train.main",
        "--config",
        os.path.join(REPO, "configs", "pretrain.py") + ":variant=tiny",
        "--workdir",
        str(tmp_path),
        "--config.opt.lrr=0.01",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "lrr" in out.stderr and not (tmp_path / "checkpoints").exists()


def test_unknown_config_arg_names_the_key():
    mod = _load(os.path.join(REPO, "configs", "pretrain.py"))
    with pytest.raises(KeyError, match="varaint"):
        mod.get_config("varaint=tiny")
    with pytest.raises(ValueError, match="runlocal"):
        mod.get_config("runlocal=maybe")


def test_python_override_sets_existing_keys_and_names_a_typo():
    from flaxlm.configs import sft
    from flaxlm.configs.common import override

    c = override(sft.get_config("variant=tiny"), {"opt.lr": 0.5, "total_steps": 7})
    assert (c.opt.lr, c.total_steps) == (0.5, 7)
    for key, message in [("opt.lrr", "no key 'opt.lrr'"), ("optim.lr", "no section 'optim'"),
                         ("opt.lr.x", "no key 'opt.lr.x'")]:  # fmt: skip
        with pytest.raises(KeyError, match=message):
            override(c, {key: 1})
    assert c.opt.lr == 0.5  # a failed override leaves the config as it was
    with pytest.raises(AttributeError):
        c.new_key = 1  # still locked


def test_pretrain_steps_arg_moves_warmup_and_checkpoints():
    """`steps=` shortens the run and its warmup with it (warmup came from the variant's default
    length: `variant=125m,steps=100` warmed up for 1000 steps, the whole run and more)."""
    mod = _load(os.path.join(REPO, "configs", "pretrain.py"))
    c = mod.get_config("variant=125m,steps=100")
    assert c.total_steps == 100 and c.opt.warmup_steps == 5
    c = mod.get_config("variant=tiny,runlocal=True,steps=20")
    assert c.opt.warmup_steps == 1
    assert mod.get_config("variant=tiny,runlocal=True,steps=1").ckpt_every == 1  # not 0 = never
    c = mod.get_config("variant=125m")  # the defaults are unchanged
    assert (c.total_steps, c.opt.warmup_steps) == (20000, 1000)
    c = mod.get_config("variant=tiny,runlocal=True")
    assert (c.total_steps, c.opt.warmup_steps, c.ckpt_every) == (200, 10, 100)
