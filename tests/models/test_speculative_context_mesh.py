"""Per-row cache writes under a mesh that splits the cache's slot axis over `context`
(models/speculative.py's steps, `Transformer` with a (B,) cache index): the model as its own
draft keeps every draft and gives the tokens of the run without a mesh, and a prefill followed
by 1- and 2-token per-row steps in one program leaves the cache and logits of the run without
a mesh. Written with the slot axis split, XLA put the next shard's old value into a shard's
edge slot (models/attention_cache.py `write_cache_rows`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.models import decode
from flaxlm.models.config import get_variant
from flaxlm.models.sharding import batch_sharding, logical_axis_rules, make_mesh, use_mesh
from flaxlm.models.speculative import speculative_generate
from flaxlm.models.transformer import Transformer, init_cache
from tests.models.test_decode import PROMPTS, random_params

KEY = jax.random.PRNGKey(0)
SHAPE = {"context": 2, "data": 4}  # 3 prompts → 4 rows, one per data shard


@pytest.fixture(scope="module")
def target():
    cfg = get_variant("tiny", init_std=0.15)
    return cfg, random_params(cfg)


def test_self_draft_under_a_context_split_mesh(target):
    """Draft = target: acceptance 1.0 (it was 8/9) and the no-mesh run's tokens."""
    cfg, params = target
    kw = dict(max_new_tokens=7, rng=KEY, temperature=0.0, draft_tokens=3)
    ref = jax.device_get(speculative_generate(cfg, params, cfg, params, PROMPTS, **kw))
    mesh = dict(mesh=make_mesh(SHAPE), rules=logical_axis_rules("fsdp"))
    out = jax.device_get(speculative_generate(cfg, params, cfg, params, PROMPTS, **mesh, **kw))
    assert out.acceptance_rate(3) == 1.0 and int(out.rejected.sum()) == 0
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.accepted, ref.accepted)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_per_row_steps_after_a_prefill_in_one_program(target):
    """Prefill, then steps of 2, 1 and 1 tokens at per-row slots (as speculative decoding's
    draft), all in one jitted program; the caches passed between them constrained as
    `generate`'s (slot axis split over `context`): every row's segment ids, keys and logits as
    without a mesh (the old program zeroed a row's slot 5 of 12, the first shard's last)."""
    cfg, params = target
    dcfg = decode.decode_config(cfg)
    model = Transformer(dcfg)
    B, P, S = 4, 8, 12
    lens = np.array([4, 6, 3, 8], np.int32)
    rng = np.random.default_rng(0)
    toks = np.where(np.arange(P)[None] < lens[:, None], rng.integers(1, 250, (B, P)), 0)
    new = rng.integers(1, 250, (B, 4)).astype(np.int32)

    def run(params, toks, lens, new, sharded):
        v = {"params": params}
        slots = jnp.arange(P, dtype=jnp.int32)
        seg = (slots[None] < lens[:, None]).astype(jnp.int32)
        cache = decode._constrain_cache(init_cache(dcfg, B, S, None), sharded)
        _, cache = model.apply(v, toks, jnp.broadcast_to(slots, (B, P)), seg, cache,
                               method="backbone", prefill=True)  # fmt: skip
        start, outs, i = lens, [], 0
        for size in (2, 1, 1):
            pos = start[:, None] + jnp.arange(size, dtype=jnp.int32)[None]
            logits, cache = model.apply(v, new[:, i : i + size], pos,
                                        cache={**cache, "index": start})  # fmt: skip
            cache = decode._constrain_cache(cache, sharded)
            outs.append(logits)
            start, i = start + size, i + size
        return jnp.concatenate(outs, 1), cache

    f = jax.jit(run, static_argnums=4)
    ref_logits, ref = jax.device_get(f(params, toks, lens, new, False))
    mesh = make_mesh(SHAPE)
    with use_mesh(mesh, logical_axis_rules("fsdp")):
        args = [jax.device_put(x, batch_sharding(mesh, x.ndim)) for x in (toks, lens, new)]
        logits, got = jax.device_get(f(params, *args, True))
    np.testing.assert_array_equal(got["segment_ids"], ref["segment_ids"])
    np.testing.assert_array_equal(got["positions"], ref["positions"])
    for (gk, gv), (rk, rv) in zip(got["kv"], ref["kv"]):
        np.testing.assert_allclose(gk, rk, atol=1e-5)
        np.testing.assert_allclose(gv, rv, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
