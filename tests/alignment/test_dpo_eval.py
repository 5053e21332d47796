"""DPO's held-out `loss` is the training objective: with `dpo.sft_coef` (RPO) it includes the
chosen answers' per-token NLL, as `dpo_loss_fn` does, and reports the two parts."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import dpo
from flaxlm.configs import dpo as dpo_config

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)


def test_eval_loss_is_the_training_loss_with_the_sft_term(tmp_path, cache_dir):
    """Was: eval/loss left out RPO's α·NLL (train 1.06 vs eval 0.43 on the same pairs)."""
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, shard_batch, use_mesh
    from flaxlm.train.pretrain import model_fns

    sft, _ = H.fake_runs(str(tmp_path), cache_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "prompt": f"What is {i} plus 3?", "chosen": f"The answer is {i + 3}.",
        "rejected": f"The answer is {i + 4}, I think.",
    }) + "\n" for i in range(8)))  # fmt: skip
    c = H.tiny(dpo_config, cache_dir, init_from=sft, **{
        "batch_size": 8, "seq_len": 64, "data.train": str(pairs), "data.eval": str(pairs),
        "eval_gen.sets": "", "eval_every": 4, "dpo.sft_coef": 0.5,
    })  # fmt: skip
    mesh = make_mesh(dict(c.mesh))
    task = dpo.build_task(c, mesh, None)
    # a policy other than the reference (seed 0), so that the preference term is not log 2
    policy = H.random_params(model_fns(H.get_variant("tiny", vocab_size=H.VOCAB))[0], 5)
    with use_mesh(mesh, logical_axis_rules(c.sharding)):  # one batch: all 8 pairs
        train_loss, _ = jax.jit(task.loss_fn)(policy, shard_batch(next(task.train_batches),
                                                                  mesh), None)  # fmt: skip
    ev = task.eval_fn(policy)
    assert ev["loss"] == pytest.approx(float(train_loss), rel=1e-5)
    assert ev["sft_nll"] > 0 and abs(ev["pref_loss"] - np.log(2)) > 1e-3
    assert ev["loss"] == pytest.approx(ev["pref_loss"] + 0.5 * ev["sft_nll"], rel=1e-6)
