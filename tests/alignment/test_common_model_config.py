"""Training rows longer than the model's max_seq_len are warned about, once the stage knows its
model (`alignment/common.resolve_model_config`, pretraining's task), with the key to set: SFT
with seq_len=1024 over a max_seq_len=256 model trained without a word, and the checkpoint
still said 256."""

import logging

from flaxlm.alignment import common
from flaxlm.models.config import get_variant, rows_past_max_seq_len


def test_the_warning_names_both_lengths_and_the_key():
    cfg = get_variant("tiny")  # max_seq_len 256
    assert rows_past_max_seq_len(cfg, 256) == rows_past_max_seq_len(cfg, 0) == ""
    why = rows_past_max_seq_len(cfg, 1024)
    assert "seq_len=1024" in why and "max_seq_len=256" in why
    assert "--config.model.max_seq_len=1024" in why


def test_a_stage_warns_when_its_rows_are_longer(caplog):
    config = __import__("flaxlm.configs.sft", fromlist=["get_config"]).get_config("variant=tiny")
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        common.resolve_model_config(config, {})
    assert not [r for r in caplog.records if "max_seq_len" in r.getMessage()]
    config.seq_len = 1024
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        cfg = common.resolve_model_config(config, {})
    assert cfg.max_seq_len == 256
    assert any("seq_len=1024 is past" in r.getMessage() for r in caplog.records)
