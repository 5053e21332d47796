"""Helpers of the PPO / GRPO / DPO tests: an "SFT" run and a "reward-model" run with random tiny
params (numpy init, written as checkpoints in about a second) and the small world's tokenizer,
and tiny task configs on the small world. Loaded by path (tests use --import-mode=importlib)."""

import os

import jax
import numpy as np

from flaxlm.alignment import common
from flaxlm.configs.common import override
from flaxlm.models.config import get_variant
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

VOCAB = 512


def random_params(init, seed: int):
    """Params of `init`'s shapes: normal(0.05) matrices, unit norm scales (no jitted init)."""
    abstract = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "scale"
        else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
        abstract,
    )  # fmt: skip


def placed_params(init, mesh, rules, seed: int = 0):
    """`random_params(init, seed)` placed with `init`'s training shardings under `mesh`."""
    from flaxlm.train.state import param_shardings

    _, shardings = param_shardings(init, jax.random.PRNGKey(0), mesh, rules)
    return jax.device_put(random_params(init, seed), shardings)


EMA_SEED = {"lm": 2, "rm": 3}  # seeds of fake_runs(ema=True)'s EMA weights (random_params)


def write_run(workdir: str, params, meta: dict, ema=None) -> str:
    """A one-step run holding `params` (and `ema`, an EMA of the weights, as a run trained
    with ema.decay > 0 saves it beside them)."""
    ck = Checkpointer(workdir, keep=1, async_save=False)
    ck.save(1, {"params": params, **({"ema": ema} if ema is not None else {})}, {}, meta)
    ck.wait()
    ck.close()
    return workdir


def fake_runs(root: str, cache_dir: str, ema: bool = False, **model) -> tuple[str, str]:
    """(sft_dir, rm_dir): random tiny LM and scalar-head runs sharing the small world's
    tokenizer; the reward model's backbone is the LM's (as a real chain would start). `ema`:
    each also holds an EMA of the weights, `random_params(init, EMA_SEED[kind])` (other
    weights than its params). `model`: ModelConfig fields over the tiny variant's (e.g. a
    mixture of experts)."""
    import ml_collections

    from flaxlm.alignment.common import data_config

    c = ml_collections.ConfigDict({"data": data_config("", ""), "init_from": ""})
    c.data.world, c.data.builtin_vocab_size, c.data.cache_dir = "small", VOCAB, str(cache_dir)
    tok = common.resolve_tokenizer(c, {})
    tok_path = os.path.join(root, "tokenizer.model")
    tok.save(tok_path)
    cfg = get_variant("tiny", vocab_size=VOCAB, **model)
    lm = random_params(model_fns(cfg)[0], 0)
    rm = random_params(scalar_model_fns(cfg)[0], 1)
    rm["transformer"] = jax.tree.map(np.copy, {k: v for k, v in lm.items() if k != "lm_head"})
    meta = {"model_config": cfg.to_dict(), "tokenizer": tok_path, "lora": {}}
    lm_ema = random_params(model_fns(cfg)[0], EMA_SEED["lm"]) if ema else None
    rm_ema = random_params(scalar_model_fns(cfg)[0], EMA_SEED["rm"]) if ema else None
    sft = write_run(os.path.join(root, "sft"), lm, {**meta, "head": "lm"}, lm_ema)
    rm_dir = write_run(os.path.join(root, "rm"), rm, {**meta, "head": "scalar"}, rm_ema)
    return sft, rm_dir


def tiny(config_module, cache_dir, arg="runlocal=True", **overrides):
    """A runlocal config on the small world, shrunk for tests (8 simulated devices: batches
    are multiples of 8)."""
    c = config_module.get_config(arg)
    with c.unlocked():
        c.progress_bar = False
        c.eval_at_start = False
        c.data.world = "small"
        c.data.builtin_vocab_size = VOCAB
        c.data.cache_dir = str(cache_dir)
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 4, 0, 0, 2
        c.opt.warmup_steps = 1
    return override(c, overrides)


def forbid_reference_copy(monkeypatch):
    """A LoRA policy's reference is its own frozen base: loading a reference copy fails."""
    from flaxlm.alignment import rl_common

    def no_second_copy(*a, **k):
        raise AssertionError("a LoRA policy's reference is its own base")

    monkeypatch.setattr(rl_common, "frozen_lm", no_second_copy)


def other_tokenizer_run(workdir: str, tokenizer: str, head: str = "lm") -> str:
    """A run whose meta names another tokenizer (its params are a stand-in: a stage must refuse
    it before loading them), and a monkeypatch-able loader that fails if anything is loaded."""
    return write_run(workdir, {"w": np.zeros(2, np.float32)},
                     {"tokenizer": tokenizer, "head": head, "lora": {}})  # fmt: skip


def forbid_loads(monkeypatch):
    """Loading any frozen model (reference, reward model) fails: a check ran too late."""
    from flaxlm.alignment import rl_common

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the tokenizer check")

    for name in ("frozen_lm", "frozen_scalar"):
        monkeypatch.setattr(rl_common, name, no_load)


def check_lora_rl_run(workdir: str, sft: str, policy) -> dict:
    """The checks of a two-rollout LoRA RL run whose final policy params are `policy`
    ({"base", "lora"}): the first rollout's KL is exactly 0 (b = 0: policy = reference = base)
    and the second's is not; the decoder's logprobs are the policy's; the base is the SFT
    run's, bit for bit; the adapters trained; the checkpoint's policy reads back with them
    merged. Returns the checkpoint meta."""
    from flaxlm.models import lora as lora_lib
    from flaxlm.train.metrics import read_metrics

    recs = [r for r in read_metrics(workdir) if "rollout/kl" in r]
    assert [r["rollout/iteration"] for r in recs] == [0, 1]
    assert recs[0]["rollout/kl"] == 0.0 and recs[1]["rollout/kl"] > 0
    # The decoder sampled with the trained adapters merged: its logprobs are the policy's.
    assert all(r["rollout/logprob_gap"] < 1e-4 for r in recs)
    _, base, _ = common.load_policy(sft)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(policy["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(policy["lora"]))
    _, merged, meta = common.load_policy(workdir)
    want = lora_lib.merge(jax.device_get(policy), lora_lib.LoraSpec(**meta["lora"]))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    return meta
