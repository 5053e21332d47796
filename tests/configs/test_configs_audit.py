"""Config files under bad input and every override form: `:arg` strings (unknown variant, typo,
wrong type), `--config.a.b=v` as the trainer parses it (ml_collections config_flags, as in
train/main.py), Python-side `override`, and every variant and sweep of every config file."""

import glob
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from flaxlm.configs.common import override
from flaxlm.models.config import VARIANTS
from flaxlm.train.sweep_plan import format_value, load_config_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(
    f
    for f in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not os.path.basename(f).startswith(("_", "common"))
)
# the ones with `variant=`
TASK_CONFIGS = ["pretrain", "sft", "reward", "prm", "dpo", "kto", "distill", "ppo", "grpo"]
# config_flags imports each config file with the deprecated load_module(): once per parse here
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _load(name):
    return load_config_module(os.path.join(REPO, "configs", f"{name}.py"))[0]


def _leaves(c, prefix=""):
    for k in c:
        if isinstance(c[k], ConfigDict):
            yield from _leaves(c[k], prefix + k + ".")
        else:
            yield prefix + k, c[k]


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def _sweep(mod, arg):
    runs = []
    mod.sweep(lambda **kw: runs.append(kw), arg)
    return runs


def _cli(monkeypatch, *argv):
    """The config main.py would build from `argv` (config_flags reads the override flags from
    sys.argv, so it is set too)."""
    argv = ["main", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                             lock_config=True)  # fmt: skip
    values(argv)
    return config.value


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_every_variant_builds_and_an_unknown_one_is_named(name):
    mod = _load(name)
    for variant in VARIANTS:
        for arg in (f"variant={variant}", f"variant={variant},runlocal=True"):
            c = mod.get_config(arg)
            assert c.is_locked and c.total_steps >= 1
    # was a bare KeyError: 'huge' (which arg? which names exist?)
    with pytest.raises(KeyError, match=r"unknown variant 'huge'.*known: \['tiny'"):
        mod.get_config("variant=huge")
    with pytest.raises(KeyError, match="did you mean '125m'"):
        mod.get_config("variant=125M")


def test_arg_typos_and_bad_values_are_named():
    pretrain, dpo = _load("pretrain"), _load("dpo")
    with pytest.raises(KeyError, match=r"'varaint' \(did you mean 'variant'\?\)"):
        pretrain.get_config("varaint=tiny")
    with pytest.raises(KeyError, match="unknown loss 'ipoo' .did you mean 'ipo'"):
        dpo.get_config("loss=ipoo")  # was KeyError: 'ipoo'
    with pytest.raises(ValueError, match="steps='1e3'"):
        pretrain.get_config("steps=1e3")
    with pytest.raises(ValueError, match="total_steps=-300 must be >= 1"):
        pretrain.get_config("variant=tiny,steps=-300")  # was a run of -300 steps
    assert pretrain.get_config("variant=mini, runlocal").total_steps == 200  # bare key = True


def test_python_override_suggests_the_full_key():
    c = _load("sft").get_config("variant=tiny")
    with pytest.raises(KeyError, match=r"'opt.lrr' \(did you mean 'opt.lr'\?\)"):
        override(c, {"opt.lrr": 1.0})
    with pytest.raises(KeyError, match=r"did you mean 'lora.rank'"):
        override(c, {"lora.rnk": 1})
    with pytest.raises(KeyError, match=r"no section 'optim'. \(did you mean 'opt'\?\)"):
        override(c, {"optim.lr": 1.0})


def test_command_line_override_forms(monkeypatch):
    path = os.path.join(REPO, "configs", "pretrain.py") + ":variant=tiny,runlocal=True"
    c = _cli(monkeypatch, "--config", path, "--config.opt.lr=1e-3", "--config.model.d_model",
             "96", "--config.mesh.data=-1", "--noconfig.eval_at_start",
             "--config.progress_bar", "--config.init_from=a b,$c")  # fmt: skip
    assert (c.opt.lr, c.model.d_model, c.mesh.data) == (1e-3, 96, -1)
    assert (c.eval_at_start, c.progress_bar, c.init_from) == (False, True, "a b,$c")
    assert type(c.opt.lr) is float and c.is_locked
    with pytest.raises(Exception, match='Did you mean "lr"'):  # absl wraps config_flags' error
        _cli(monkeypatch, "--config", path, "--config.opt.lrr=0.1")
    with pytest.raises(flags.IllegalFlagValueError, match="total_steps=1.5"):
        _cli(monkeypatch, "--config", path, "--config.total_steps=1.5")
    with pytest.raises(flags.IllegalFlagValueError, match="eval_at_start=maybe"):
        _cli(monkeypatch, "--config", path, "--config.eval_at_start=maybe")
    # scaling.py's FieldReferences follow a command-line width, as its docstring says
    scaling = os.path.join(REPO, "configs", "scaling.py")
    c = _cli(monkeypatch, "--config", scaling, "--config.model.d_model=48",
             "--config.total_steps=600")  # fmt: skip
    assert (c.model.n_heads, c.model.d_ff, c.opt.warmup_steps, c.eval_every) == (3, 144, 60, 600)
    assert c.opt.lr == pytest.approx(6e-3 * 64 / 48)


def test_scaling_evaluates_all_of_a_heldout_set_however_it_is_named(monkeypatch):
    """scaling.py's `heldout=` arg and `--config.data.eval_sources` read the same number of
    held-out batches (the latter used to keep the built-in set's 24: 1000 documents cut short)."""
    scaling = os.path.join(REPO, "configs", "scaling.py")
    by_arg = _cli(monkeypatch, "--config", scaling + ":heldout=/tmp/h.jsonl")
    by_key = _cli(monkeypatch, "--config", scaling, "--config.data.eval_sources=/tmp/h.jsonl")
    assert by_key.data.eval_sources == by_arg.data.eval_sources == "/tmp/h.jsonl"
    assert by_key.data.eval_batches == by_arg.data.eval_batches >= 100_000


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_key_survives_the_sweeps_command_line(monkeypatch, path):
    """What a sweep passes the trainer (`--config.k=format_value(v)`) parses back to v, for every
    key of every config file (a string tuple was one string: "(latin,han)")."""
    base = load_config_module(path)[0].get_config(None)
    for key, value in _leaves(base):
        got = _get(
            _cli(monkeypatch, "--config", path, f"--config.{key}={format_value(value)}"), key
        )
        assert got == value and type(got) is type(value), key


SWEPT_CONFIG_FILES = [p for p in CONFIG_FILES if hasattr(load_config_module(p)[0], "sweep")]


@pytest.mark.parametrize("path", SWEPT_CONFIG_FILES, ids=os.path.basename)
def test_sweep_runs_are_distinct_configs(path):
    """No two runs of a config's sweep train the same thing. dpo's sweep set loss_type alone, so
    conservative and robust ran with label smoothing 0: sigmoid DPO three times."""
    mod = load_config_module(path)[0]
    for arg in (None, "runlocal=True"):
        runs = _sweep(mod, arg)
        built = []
        for ov in runs:
            c = mod.get_config(arg)
            override(c, ov)
            built.append(c.to_dict())
        assert all(built[i] != built[j] for i in range(len(built)) for j in range(i)), path


def test_dpo_sweep_uses_each_losss_own_settings():
    dpo = _load("dpo")
    runs = _sweep(dpo, None)
    for ov in runs:
        section = dpo.get_config(f"loss={ov['dpo.loss_type']}").dpo
        assert ov["dpo.beta"] == section.beta
        assert ov["dpo.label_smoothing"] == section.label_smoothing
    assert {ov["dpo.loss_type"] for ov in runs if ov["dpo.label_smoothing"] > 0} == {
        "conservative",
        "robust",
        "exo_pair",
    }


def test_pretrain_sweep_fits_every_variant():
    """README's `sweep --config configs/pretrain.py:variant=125m` failed: the sweep's fixed tiny
    widths (64, 128) do not divide 125m's 12 heads."""
    from flaxlm.configs.common import to_model_config

    pretrain = _load("pretrain")
    for variant in VARIANTS:
        runs = _sweep(pretrain, f"variant={variant}")
        assert len(runs) == 4
        for ov in runs:
            c = override(pretrain.get_config(f"variant={variant}"), ov)
            to_model_config(c.model)  # a valid architecture
    runs = _sweep(pretrain, "variant=tiny")  # unchanged for tiny
    assert [(r["opt.lr"], r["model.d_model"]) for r in runs] == [
        (1e-3, 64), (1e-3, 128), (3e-3, 64), (3e-3, 128)]  # fmt: skip


def test_trainer_names_a_wrong_type_before_training(tmp_path):
    cmd = [sys.executable, "-m", "flaxlm.train.main", "--config",
           os.path.join(REPO, "configs", "pretrain.py") + ":variant=tiny", "--workdir",
           str(tmp_path), "--config.total_steps=1e3"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--config.total_steps=1e3" in out.stderr
    assert not os.listdir(tmp_path)


def test_every_stage_defaults_to_the_variant_pretraining_and_sft_default_to():
    """The configs' docstring chain (pretrain.py:runlocal=True → sft.py → dpo.py/kto.py/grpo.py/
    ppo.py/online_dpo.py with init_from the run before) starts no stage with another variant's
    sizes: the preference and RL stages defaulted to mini while pretraining and SFT made tiny
    models, so every later stage warned 'pass :variant=tiny for its sizes'."""
    from flaxlm.configs import distill, dpo, grpo, kto, online_dpo, ppo, pretrain, prm, reward, sft

    shape = lambda m: (m.n_layers, m.d_model, m.n_heads)  # noqa: E731
    made = shape(pretrain.get_config("runlocal=True").model)
    for stage in (sft, reward, prm, distill, dpo, kto, grpo, ppo, online_dpo):
        for arg in ("runlocal=True", ""):
            assert shape(stage.get_config(arg).model) == made, (stage.__name__, arg)
