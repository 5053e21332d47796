"""Reward model: the pairwise loss equals an independent formula; the task runs from SFT."""

import json
import os

import jax
import numpy as np

from flaxlm.alignment import common, reward
from flaxlm.models import lora as lora_lib
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train.checkpoint import load_params, read_meta
from flaxlm.train.state import unbox

R_C = np.array([1.5, -0.3, 2.0, 0.1, -1.2, 40.0], np.float32)
R_R = np.array([0.5, 0.2, -1.0, 0.1, -2.5, -45.0], np.float32)
MARGIN = np.array([0.0, 1.0, 0.5, 2.0, 0.25, 3.0], np.float32)


def _reference(r_c, r_r, margin, lam):
    """The formula written out term by term in float64, with math's own log and exp."""
    total = 0.0
    for c, r, m in zip(r_c.astype(float), r_r.astype(float), margin.astype(float)):
        x = c - r - m
        sigma = 1.0 / (1.0 + np.exp(-x))
        total += -np.log(sigma) if sigma > 1e-300 else -x  # −log σ(x) → −x for x ≪ 0
    center = np.mean((r_c.astype(float) + r_r.astype(float)) ** 2)
    return total / len(r_c) + lam * center


def test_pairwise_loss_matches_the_formula():
    zeros = np.zeros_like(MARGIN)
    for margin, lam in ((None, None), (MARGIN, None), (None, 0.01), (MARGIN, 0.05)):
        loss, m = reward.pairwise_loss(R_C, R_R, margin=margin, center_coef=lam)
        want = _reference(R_C, R_R, zeros if margin is None else margin, lam or 0.0)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        assert np.isclose(float(m["accuracy"]), 4 / 6)  # ties (0.1 vs 0.1) do not count as correct
        np.testing.assert_allclose(float(m["margin"]), np.mean(R_C - R_R), rtol=1e-6)
    np.testing.assert_allclose(
        reward.np_pairwise_loss(R_C, R_R, MARGIN, 0.05), _reference(R_C, R_R, MARGIN, 0.05)
    )


def test_pairwise_loss_is_stable_and_pushes_the_right_way():
    loss, _ = reward.pairwise_loss(np.array([-500.0]), np.array([500.0]))
    assert np.isfinite(float(loss)) and abs(float(loss) - 1000.0) < 1e-3
    g_c, g_r = jax.grad(lambda c, r: reward.pairwise_loss(c, r)[0], argnums=(0, 1))(R_C, R_R)
    assert np.all(np.asarray(g_c) <= 0) and np.all(np.asarray(g_r) >= 0)
    assert np.all(np.isfinite(g_c)) and np.all(np.isfinite(g_r))


def test_reward_model_trains_from_an_sft_run_with_lora(sft_run, reward_cfg, tmp_path):
    sft_dir, _ = sft_run
    c = reward_cfg(init_from=sft_dir, **{"lora.rank": 4, "opt.lr": 3e-3, "seq_len": 96})
    _, summary = reward.run(c, str(tmp_path))
    ev, train = summary["eval"], summary["train"]
    for key in ("eval/loss", "eval/accuracy", "eval/margin", "eval/acc_correct_vs_wrong"):
        assert key in ev, key
    assert 0.0 <= ev["eval/accuracy"] <= 1.0 and np.isfinite(train["loss"])
    assert train["weight"] == c.batch_size  # pairs per step
    _, meta = read_meta(str(tmp_path))
    assert meta["head"] == "scalar" and meta["lora"]["rank"] == 4
    assert meta["tokenizer"].endswith("tokenizer.model")
    report = json.load(open(os.path.join(tmp_path, "data_report.json")))
    assert report["eval"]["used"] > 0
    # The backbone came from the SFT run and stayed frozen; only adapters and the head moved.
    cfg, sft_params, _ = common.load_policy(sft_dir)
    init, _ = scalar_model_fns(cfg)
    spec = lora_lib.LoraSpec(**meta["lora"])
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = unbox(jax.eval_shape(lora_lib.with_lora(init, spec), jax.random.PRNGKey(0)))
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)
    rm = load_params(str(tmp_path), target)
    backbone = rm["base"]["transformer"]
    assert "lm_head" not in backbone
    for path, leaf in jax.tree_util.tree_flatten_with_path(backbone)[0]:
        want = sft_params
        for k in path:
            want = want[k.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    assert any(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(rm["lora"]))
