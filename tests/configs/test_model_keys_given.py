"""The `model.` keys a run gives (`--config.model.X=...`, `override(config, {"model.X": ...})`)
are recorded in `config.model_keys_given`, so `model_keys_set` names them over an init_from
source even when the value equals the variant's default (they used to be inferred by diffing
against that default only, and dropped: fp32 asked over a float16 HF source trained in fp16)."""

import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from flaxlm.alignment.common import with_model_keys_set
from flaxlm.configs import sft
from flaxlm.configs.common import model_keys_set, override
from flaxlm.models.config import get_variant
from flaxlm.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _cli(monkeypatch, *argv):
    """The config train/main.py builds from `argv` (its own `parsed_config`)."""
    argv = ["main", "--config", os.path.join(REPO, "configs", "sft.py") + ":variant=tiny", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    values(argv)
    return train_main.parsed_config(values["config"])


def test_command_line_model_keys_equal_to_the_default_are_set(monkeypatch):
    default = sft.get_config("variant=tiny").model
    assert (default.dtype, default.param_dtype) == ("float32", "float32")
    c = _cli(monkeypatch, "--config.init_from=hf:/x", "--config.model.dtype=float32",
             "--config.model.param_dtype", "float32", "--config.opt.lr=1e-3")  # fmt: skip
    assert c.model_keys_given == ("dtype", "param_dtype") and c.is_locked
    assert model_keys_set(c) == {"dtype": "float32", "param_dtype": "float32"}
    # over a float16 source (an HF export) the run computes and stores its weights in fp32
    source = get_variant("tiny", dtype="float16", param_dtype="float16")
    run = with_model_keys_set(c, source)
    assert (run.dtype, run.param_dtype) == ("float32", "float32")
    # nothing given on the command line: the source's own
    plain = _cli(monkeypatch, "--config.init_from=hf:/x")
    assert plain.model_keys_given == () and model_keys_set(plain) == {}
    assert with_model_keys_set(plain, source) == source


def test_python_override_records_model_keys_and_the_diff_still_counts():
    c = override(sft.get_config("variant=tiny"), {"model.dtype": "float32", "opt.lr": 1e-3})
    assert c.model_keys_given == ("dtype",)
    assert model_keys_set(c) == {"dtype": "float32"}
    # a config edited directly (a Python config file, an older config): found by the diff
    with c.unlocked():
        c.model.remat_policy = "full"
    assert model_keys_set(c) == {"dtype": "float32", "remat_policy": "full"}


def test_training_in_float16_is_refused_naming_the_key():
    """No loss scaling: float16 compute underflowed most of the logits' gradient (and float16
    weights drop small updates), silently. An HF float16 source imports as one, so the
    alignment stages (resolve_model_config) and pretraining both refuse it, naming the key
    to set; a float16 source with the keys given trains."""
    import pytest

    from flaxlm.alignment import common
    from flaxlm.configs import pretrain
    from flaxlm.models.config import check_trainable_dtypes
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train.pretrain import build_task

    check_trainable_dtypes(get_variant("tiny", dtype="bfloat16", param_dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"model.dtype='float16'.*--config.model.dtype=bfloat16"):
        check_trainable_dtypes(get_variant("tiny", dtype="float16"))
    with pytest.raises(ValueError, match=r"model.param_dtype='float16'.*param_dtype=float32"):
        check_trainable_dtypes(get_variant("tiny", param_dtype="float16"))
    c = override(pretrain.get_config("variant=tiny,runlocal=True,data=markov"),
                 {"model.dtype": "float16"})  # fmt: skip
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        build_task(c, make_mesh({"data": -1}))
    meta = {"model_config": get_variant("tiny", dtype="float16", param_dtype="float16").to_dict()}
    plain = override(sft.get_config("variant=tiny"), {"init_from": "src"})
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        common.resolve_model_config(plain, meta)
    given = override(sft.get_config("variant=tiny"), {
        "init_from": "src", "model.dtype": "bfloat16", "model.param_dtype": "float32"})  # fmt: skip
    cfg = common.resolve_model_config(given, meta)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")


def test_an_assignment_the_source_overrides_is_warned_about(caplog):
    """`config.model.attention_impl = "xla"` in a notebook equals the variant's default, so
    it cannot be told from it: the source's "cudnn" was kept without a word. Now a warning
    names the key, both values and how to set it; `override` sets it."""
    import logging

    c = sft.get_config("variant=tiny")
    with c.unlocked():
        c.init_from = "hf:/x"
        c.model.attention_impl = c.model.attention_impl  # the default, "typed in"
    source = get_variant("tiny", attention_impl="cudnn")
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        assert with_model_keys_set(c, source).attention_impl == "cudnn"
    assert "keeps the source's model.attention_impl='cudnn' (this config: 'xla')" in caplog.text
    assert "override(config" in caplog.text
    caplog.clear()
    c = override(c, {"model.attention_impl": "xla"})
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        assert with_model_keys_set(c, source).attention_impl == "xla"
    assert "keeps the source's" not in caplog.text
