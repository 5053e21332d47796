"""The reproduction scripts (alignment/check.py, alignment/rl_check.py) train for minutes to
hours, so the suite runs their cheap parts: argument checks, what a re-run reports, and the
chain's parameter copies of a run whose tokenizer is an HF tokenizer.json."""

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from flaxlm.alignment import check, rl_check
from tests.hf_tokenizers import imported_qwen2_run


def test_rl_check_refuses_an_unknown_method_before_training(capsys):
    """`--only ppo,grpp` trained PPO in full, then stopped on a raw KeyError: 'grpp' (no
    results.json)."""
    with pytest.raises(SystemExit) as e:
        rl_check.main(["--only", "ppo,grpp", "--workdir", "/nonexistent/never-made"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--only: unknown ['grpp']" in err and "'ppo'" in err


def test_check_rerun_keeps_the_times_of_the_stages_it_reuses(tmp_path, monkeypatch):
    """A re-run resumes each finished stage at its last step (nothing is retrained), and its
    results.json said the stages took about a second each."""
    monkeypatch.setitem(check.PLANS, "tiny", (3, 1e-3, 2, 2))

    def fake_stage(config, workdir):  # a stage's trace: a checkpoint at total_steps, evals
        done = os.path.join(workdir, "checkpoints", str(config.total_steps))
        if not os.path.isdir(done):
            time.sleep(0.05)  # "training"
            os.makedirs(done)
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                for step in (0, config.total_steps):
                    f.write(json.dumps({"step": step, "eval/nll": 1.0 / (1 + step)}) + "\n")

    for mod in (check.pretrain, check.sft, check.reward):
        monkeypatch.setattr(mod, "run", fake_stage)
    check.main(["--workdir", str(tmp_path)])
    first = json.loads((tmp_path / "results.json").read_text())["times"]
    assert set(first) == {"pretrain_s", "sft_s", "reward_s"}
    assert min(first.values()) >= 0.05
    shutil.rmtree(tmp_path / "sft")  # this stage trains again; the others are reused
    check.main(["--workdir", str(tmp_path)])
    second = json.loads((tmp_path / "results.json").read_text())["times"]
    assert second["pretrain_s"] == first["pretrain_s"]
    assert second["reward_s"] == first["reward_s"]
    assert second["sft_s"] != first["sft_s"] and second["sft_s"] >= 0.05


def test_copy_params_keeps_an_hf_tokenizer_readable(tmp_path):
    """copy_params saved any tokenizer as tokenizer.model, so an imported tokenizer.json was
    then read as SentencePiece ("not a SentencePiece model")."""
    from flaxlm.models.hf_tokenizer import load_tokenizer
    from flaxlm.train import checkpoint as ckpt_lib

    run, _ = imported_qwen2_run(str(tmp_path))
    copy = str(tmp_path / "copy")
    rl_check.copy_params(run, copy)
    _, meta = ckpt_lib.read_meta(copy)
    assert os.path.dirname(meta["tokenizer"]) == copy
    assert load_tokenizer(meta["tokenizer"]).encode("w3 w7") == [5, 9]
    _, params, _ = ckpt_lib.load_model(copy)
    _, want, _ = ckpt_lib.load_model(run)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))
