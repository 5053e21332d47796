"""Mixture-of-experts router losses in every alignment trainer (DPO and online DPO, KTO, reward
model, GRPO, PPO's policy and critic, distillation): each loss over a tiny MoE model equals the
same loss without router losses plus aux·load_balance + z·router_z, the statistics computed
here independently (the model applied with the "moe" collection mutable, `collect_stats`) over
the rows of the forward pass with gradient, padding excluded; the metrics carry them as
`moe/*`; a dense model's traced program is the same with or without the coefficients; and each
task built from MoE runs wires `loss.moe_aux` / `loss.moe_z` into its loss."""

import functools
import importlib.util
import os

import jax
import numpy as np
import pytest

from flaxlm.alignment import distill, dpo, grpo, kto, online_dpo, ppo, reward
from flaxlm.configs import distill as distill_config
from flaxlm.configs import dpo as dpo_config
from flaxlm.configs import grpo as grpo_config
from flaxlm.configs import kto as kto_config
from flaxlm.configs import online_dpo as online_dpo_config
from flaxlm.configs import ppo as ppo_config
from flaxlm.configs import reward as reward_config
from flaxlm.models import moe
from flaxlm.models.config import get_variant
from flaxlm.models.heads import ScalarHeadModel, scalar_model_fns
from flaxlm.models.transformer import Transformer
from flaxlm.train.losses import router_coefs
from flaxlm.train.pretrain import model_fns
from flaxlm.train.step import finish_metrics

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

MOE = dict(n_experts=4, n_experts_per_token=2, d_expert=24)
AUX, Z = 0.5, 0.25  # large enough that a missing (or doubled) term is far outside tolerance
ROUTER = (AUX, Z)
B, T = 4, 16
FAMILIES = ("dpo", "kto", "reward", "grpo", "ppo", "distill", "distill_chunked")
STAT_KEYS = {f"moe/{k}" for k in moe.STATS}


def _rows(rng, prefix=""):
    """B right-padded rows of random tokens; padding (segment id 0) holds random non-zero ids
    too, so a trainer that let it count would change the statistics."""
    lengths = rng.integers(T // 2, T + 1, B)
    lengths[0] = T // 2  # at least one padded row
    real = np.arange(T)[None] < lengths[:, None]
    mask = real & (np.arange(T)[None] >= 3)  # a "response" after a 3-token "prompt"
    return {
        f"{prefix}tokens": rng.integers(1, H.VOCAB, (B, T)).astype(np.int32),
        f"{prefix}targets": rng.integers(1, H.VOCAB, (B, T)).astype(np.int32),
        f"{prefix}positions": np.where(real, np.arange(T)[None], 0).astype(np.int32),
        f"{prefix}segment_ids": real.astype(np.int32),
        f"{prefix}loss_mask": mask.astype(np.float32),
    }


def _batch(family: str) -> dict:
    rng = np.random.default_rng(0)
    seq = lambda: rng.normal(-20.0, 3.0, B).astype(np.float32)  # noqa: E731
    tok = lambda: rng.normal(-3.0, 0.5, (B, T)).astype(np.float32)  # noqa: E731
    if family in ("dpo", "reward"):
        b = {**_rows(rng, "chosen_"), **_rows(rng, "rejected_"), "valid": np.ones(B, np.float32)}
        return {**b, "ref_chosen_logps": seq(), "ref_rejected_logps": seq(),
                "margin": np.zeros(B, np.float32)}  # fmt: skip
    if family == "kto":
        return {**_rows(rng), **_rows(rng, "kl_"), "label": np.array([1, 0, 1, 0], np.float32),
                "valid": np.ones(B, np.float32), "kl_valid": np.ones(B, np.float32),
                "ref_logps": seq(), "ref_kl_logps": seq()}  # fmt: skip
    if family == "grpo":
        return {**_rows(rng), "old_logprobs": tok(), "ref_logprobs": tok(),
                "advantages": rng.normal(size=B).astype(np.float32),
                "rollout/reward_mean": np.full(B, 0.5, np.float32)}  # fmt: skip
    if family == "ppo":
        return {**_rows(rng), "old_logprobs": tok(), "old_values": tok(), "returns": tok(),
                "advantages": rng.normal(size=(B, T)).astype(np.float32)}  # fmt: skip
    return _rows(rng)  # distill


@functools.cache
def _params(kind: str, dense: bool = False):
    """Random tiny params (numpy, no jitted init): "lm" or "scalar" (reward model, critic)."""
    cfg = _cfg(dense)
    init = (model_fns if kind == "lm" else scalar_model_fns)(cfg)[0]
    return H.random_params(init, {"lm": 0, "scalar": 1}[kind])


def _cfg(dense: bool):
    return get_variant("tiny", vocab_size=H.VOCAB, **({} if dense else MOE))


def _stats(kind: str, params, batch, prefixes=("",)) -> dict:
    """The router statistics of one pass over the rows of `prefixes`, computed here: the model
    applied with the "moe" collection mutable, averaged over layers by `collect_stats`."""
    x = {k: np.concatenate([batch[p + k] for p in prefixes])
         for k in ("tokens", "positions", "segment_ids")}  # fmt: skip
    return _stats_fn(kind)(params, x["tokens"], x["positions"], x["segment_ids"])


@functools.cache
def _stats_fn(kind: str):
    model = (Transformer if kind == "lm" else ScalarHeadModel)(_cfg(False))

    def stats(params, tokens, positions, segment_ids):
        _, state = model.apply({"params": params}, tokens, positions, segment_ids,
                               mutable=[moe.COLLECTION])  # fmt: skip
        return moe.collect_stats(state[moe.COLLECTION])

    return jax.jit(stats)  # (eager, the op-by-op dispatch took ~10 s per shape)


def _case(family: str, dense: bool = False):
    """(loss_fn(router) -> the family's loop loss (params, batch, rng), params, batch,
    [(metric prefix, statistics the router losses must use)])."""
    batch = _batch(family)
    lm, rm = _params("lm", dense), _params("scalar", dense)
    apply, v_apply = model_fns(_cfg(dense))[1], scalar_model_fns(_cfg(dense))[1]
    if family == "dpo":
        d = dpo_config.dpo_config("sigmoid")
        return (
            (lambda r: dpo.dpo_loss_fn(apply, d, r)),
            lm,
            batch,
            [("moe/", lambda: _stats("lm", lm, batch, dpo.PAIR))],
        )
    if family == "kto":  # the matched rows' pass: the mismatched ones carry no gradient
        k = kto_config.kto_config()
        return (
            (lambda r: kto.kto_loss_fn(apply, k, router=r)),
            lm,
            batch,
            [("moe/", lambda: _stats("lm", lm, batch))],
        )
    if family == "reward":
        return (
            (lambda r: reward.reward_loss_fn(v_apply, True, 0.01, r)),
            rm,
            batch,
            [("moe/", lambda: _stats("scalar", rm, batch, dpo.PAIR))],
        )
    if family == "grpo":
        g = grpo_config.grpo_config(4)
        return (
            (lambda r: grpo.grpo_loss_fn(apply, g, 0.7, r)),
            lm,
            batch,
            [("moe/", lambda: _stats("lm", lm, batch))],
        )
    if family == "ppo":  # a mixture policy and a mixture critic: each its own router losses
        p = ppo_config.ppo_config()
        both = {"policy": lm, "value": rm}
        return (
            (lambda r: ppo.ppo_loss_fn(apply, v_apply, p, 0.7, (r, r))),
            both,
            batch,
            [
                ("moe/", lambda: _stats("lm", lm, batch)),
                ("value/moe/", lambda: _stats("scalar", rm, batch)),
            ],
        )
    # distillation: a mixture student, a dense frozen teacher
    d = distill_config.distill_config()
    chunk = 4 if family == "distill_chunked" else 0
    teacher = _params("lm", dense=True)
    t_apply = model_fns(_cfg(True))[1]

    def make(r):
        fn = distill.distill_loss_fn(apply, t_apply, d, chunk, router=r)
        return lambda params, b, rng: fn(params, b, rng, teacher)

    return make, lm, batch, [("moe/", lambda: _stats("lm", lm, batch))]


@pytest.mark.parametrize("family", FAMILIES)
def test_router_losses_join_the_loss_of_the_pass_with_gradient(family):
    """loss(router) = loss(None) + aux·load_balance + z·router_z with the statistics of the
    rows the trainer differentiates (padding excluded), and `moe/*` (PPO's critic:
    `value/moe/*`) are exactly those statistics."""
    make, params, batch, want = _case(family)
    both = jax.jit(lambda p, b: (make(None)(p, b, None), make(ROUTER)(p, b, None)))
    (plain, m0), (loss, m) = both(params, batch)  # (one compile for the two)
    m0, m = finish_metrics(m0), finish_metrics(m)  # (KTO's counts and per-kind means, as logged)
    expected = float(plain)
    for prefix, stats_fn in want:
        stats = stats_fn()
        assert {k for k in m if k.startswith(prefix)} == {prefix + s for s in moe.STATS}
        for s in moe.STATS:
            np.testing.assert_allclose(float(m[prefix + s]), float(stats[s]), rtol=1e-5,
                                       atol=1e-6, err_msg=f"{family} {prefix}{s}")  # fmt: skip
        expected += AUX * float(stats["load_balance"]) + Z * float(stats["router_z"])
        assert float(stats["router_z"]) > 0.1  # Z·router_z is far outside the tolerance
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    # Every other metric is the loss's without router losses; none of them says moe.
    assert not any("moe/" in k for k in m0)
    for k, v in m0.items():
        np.testing.assert_allclose(np.asarray(m[k]), np.asarray(v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dense_models_program_is_unchanged(family):
    """A dense model asks for no statistics (`router_coefs` is None), and even handed the
    coefficients its loss traces to the same program: no extra outputs, no moe metrics."""
    assert router_coefs({"moe_aux": AUX, "moe_z": Z}, moe=False) is None
    make, params, batch, _ = _case(family, dense=True)
    without = jax.make_jaxpr(make(None))(params, batch, None)
    with_coefs = jax.make_jaxpr(make(ROUTER))(params, batch, None)
    assert str(without) == str(with_coefs)
    _, metrics = jax.eval_shape(make(None), params, batch, None)
    assert not any("moe/" in k for k in metrics)


def test_router_coefs_read_the_config_or_the_defaults():
    assert router_coefs({"moe_aux": AUX, "moe_z": Z}, moe=True) == ROUTER
    assert router_coefs(None, moe=True) == (0.01, 0.001)  # a config without a loss section
    for module in (dpo_config, kto_config, online_dpo_config, grpo_config, ppo_config,
                   reward_config, distill_config):  # fmt: skip
        c = module.get_config("runlocal=True")
        assert (c.loss.moe_aux, c.loss.moe_z) == (0.01, 0.001), module.__name__


# ---------------------------------------------------------------------------------------------
# The tasks built from mixture runs wire `loss.moe_aux` / `loss.moe_z` into their losses


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("moe_runs")), cache_dir, **MOE)


def _built_metrics(task, batch, frozen=None):
    """The metrics of the task's loss, traced (never compiled) at its params' shapes."""
    from flaxlm.train.state import unbox

    params = unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    args = (params, batch, jax.random.PRNGKey(0)) + ((frozen,) if frozen is not None else ())
    loss, metrics = jax.eval_shape(task.loss_fn, *args)
    assert loss.shape == ()
    return metrics


@pytest.mark.parametrize("name", ["dpo", "kto", "online_dpo", "grpo", "ppo", "reward",
                                  "distill"])  # fmt: skip
def test_each_task_built_from_mixture_runs_adds_the_router_losses(name, moe_runs, cache_dir):
    from flaxlm.models.sharding import make_mesh

    sft, rm = moe_runs
    small = {"batch_size": 8, "seq_len": 64, "data.eval": "", "eval_every": 0,
             "loss.moe_aux": AUX, "loss.moe_z": Z}  # fmt: skip
    module, build, batch, extra = {
        "dpo": (dpo_config, dpo.build_task, _batch("dpo"), {"dpo.ref_logps": "online"}),
        "kto": (kto_config, kto.build_task, _batch("kto"), {}),
        "online_dpo": (online_dpo_config, online_dpo.build_task, _batch("dpo"), {}),
        "grpo": (grpo_config, grpo.build_task, _batch("grpo"), {}),
        "ppo": (ppo_config, ppo.build_task, _batch("ppo"), {"reward_from": rm}),
        "reward": (reward_config, reward.build_task, _batch("reward"), {}),
        "distill": (distill_config, distill.build_task, _batch("distill"),
                    {"distill.teacher": sft, "distill.eval_teacher": False}),
    }[name]  # fmt: skip
    if name in ("online_dpo", "grpo", "ppo"):  # rollout rows: prompt + response caps
        small = {k: v for k, v in small.items() if k not in ("seq_len", "data.eval")}
    c = H.tiny(module, cache_dir, init_from=sft, **{**small, **extra})
    task = build(c, make_mesh(dict(c.mesh)), None)
    metrics = _built_metrics(task, batch, task.frozen)
    assert STAT_KEYS <= set(metrics), sorted(metrics)
    if name == "ppo":  # the critic (the reward model's mixture backbone) has its own
        assert {f"value/{k}" for k in STAT_KEYS} <= set(metrics)
