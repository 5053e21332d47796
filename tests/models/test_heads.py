"""Scalar-head model: LM params slot into its backbone; rewards are read at the last real token."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.config import get_variant
from flaxlm.models.heads import last_token_index, scalar_model_fns, sequence_values
from flaxlm.models.transformer import Transformer
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

CFG = get_variant("tiny")


def np_init(abstract, seed):
    """Random values for a tree of shapes in numpy: compiling a jitted init costs ~10 s here."""
    rng = np.random.default_rng(seed)

    def value(path, s):
        if path[-1].key == "scale":
            return np.ones(s.shape, s.dtype)
        return (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


def _params():
    init, apply = scalar_model_fns(CFG)
    params = np_init(unbox(jax.eval_shape(init, jax.random.PRNGKey(0))), 0)
    lm_init = model_fns(CFG)[0]
    lm = np_init(unbox(jax.eval_shape(lm_init, jax.random.PRNGKey(0))), 1)
    return params, jax.jit(apply), lm


def test_lm_params_slot_into_the_backbone():
    params, apply, lm = _params()
    assert set(params) == {"transformer", "head"} and set(params["head"]) == {"kernel", "bias"}
    # Same tree as the LM's, minus the vocabulary projection that a scalar head never uses.
    lm_shapes = jax.tree.map(jnp.shape, {k: v for k, v in lm.items() if k != "lm_head"})
    assert jax.tree.map(jnp.shape, params["transformer"]) == lm_shapes
    params = {**params, "transformer": {k: v for k, v in lm.items() if k != "lm_head"}}
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, CFG.vocab_size)
    values = apply(params, tokens)
    hidden, _ = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t, method="backbone"))(
        lm, tokens
    )
    want = hidden @ params["head"]["kernel"] + params["head"]["bias"]
    assert values.shape == (2, 10) and values.dtype == jnp.float32
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    params, apply, _ = _params()
    params["head"]["bias"] = jnp.asarray(0.3)
    seq = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (1, 7), 0, CFG.vocab_size))
    alone = apply(params, seq)[0, -1]
    # The same 7 tokens in rows of 16, followed by different garbage (not zeros) each.
    junk = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (3, 9), 0, CFG.vocab_size))
    tokens = np.concatenate([np.repeat(seq, 3, 0), junk], 1)
    seg = np.asarray([[1] * 7 + [0] * 9] * 3)
    pos = np.where(seg > 0, np.arange(16), 0)
    r = sequence_values(apply(params, tokens, pos, seg), seg)
    np.testing.assert_allclose(r, np.full(3, alone), rtol=1e-5, atol=1e-6)
    seg = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert last_token_index(seg).tolist() == [2, 4, 0]


def test_per_token_values_are_causal():
    params, apply, _ = _params()
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 12), 0, CFG.vocab_size)
    base = apply(params, tokens)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % CFG.vocab_size)
    out = apply(params, changed)
    np.testing.assert_array_equal(out[0, :8], base[0, :8])
    assert not np.allclose(out[0, 8:], base[0, 8:])
