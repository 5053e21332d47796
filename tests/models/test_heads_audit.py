"""Scalar heads (reward model, critic) against references written here: each sequence's own
unpadded forward of the language-model backbone, read in float64.

* the reward is h·w + b at the sequence's last real token (last segment id > 0), whatever the
  row length, the padding amount, the padding token ids, the other rows of the batch, and
  whether positions are passed; per-token values at real positions are h_t·w + b;
* values are float32 even when the backbone computes in bfloat16;
* the head starts as kernel ~ N(0, init_std²) over d_model (logical axis "embed"), bias 0, in
  the weight dtype; a row without real tokens reads position 0 (its reward is padding's).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.config import get_variant
from flaxlm.models.heads import (
    ScalarHead,
    last_token_index,
    scalar_model_fns,
    sequence_values,
)
from flaxlm.models.transformer import Transformer
from flaxlm.train.state import unbox

CFG = get_variant("tiny", n_layers=1)
SEQS = [[5, 9, 100, 7, 3, 44, 18], [1], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


@functools.cache
def _setup():
    init, apply = scalar_model_fns(CFG)
    rng = np.random.default_rng(0)

    def value(path, s):
        if path[-1].key == "scale":
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    params = jax.tree_util.tree_map_with_path(
        value, unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    )
    params["head"]["bias"] = np.float32(0.37)
    return params, jax.jit(apply)


@functools.cache
def _reference(seq: tuple) -> np.ndarray:
    """Per-token values of `seq` run alone (exact length, no padding, no segment ids): the LM
    backbone's final hidden states · w + b, in float64."""
    params, _ = _setup()
    backbone = jax.jit(lambda p, t: Transformer(CFG).apply({"params": p}, t, method="backbone")[0])
    h = np.asarray(backbone(params["transformer"], np.asarray([seq], np.int32))[0], np.float64)
    w = np.asarray(params["head"]["kernel"], np.float64)
    return h @ w + float(params["head"]["bias"])


def _rows(T, pad, seqs=SEQS, positions=True):
    tokens = np.asarray(pad(len(seqs), T), np.int32)
    seg = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], seg[i, : len(s)] = s, 1
    pos = np.where(seg > 0, np.arange(T), 0).astype(np.int32) if positions else None
    return tokens, pos, seg


def test_reward_is_the_last_real_token_of_the_sequence_run_alone():
    params, apply = _setup()
    want = np.asarray([_reference(tuple(s))[-1] for s in SEQS])
    junk = np.random.default_rng(1)
    pads = {
        "zeros": lambda b, t: np.zeros((b, t)),
        "junk": lambda b, t: junk.integers(0, CFG.vocab_size, (b, t)),
    }
    # Row lengths 16 and 32, padding ids 0 or random, positions given or not (0..T-1).
    cases = ((16, "zeros", True), (16, "junk", True), (16, "junk", False), (32, "junk", True))
    for T, name, positions in cases:
        tokens, pos, seg = _rows(T, pads[name], positions=positions)
        values = np.asarray(apply(params, tokens, pos, seg))
        got = np.asarray(sequence_values(values, seg))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{T} {name}")
        for i, s in enumerate(SEQS):  # the critic's V(s_t) at every real position
            np.testing.assert_allclose(values[i, : len(s)], _reference(tuple(s)), rtol=1e-5,
                                       atol=1e-5)  # fmt: skip
    # The other rows do not matter: the rows in another order.
    tokens, pos, seg = _rows(16, pads["junk"], SEQS[::-1])
    got = np.asarray(sequence_values(apply(params, tokens, pos, seg), seg))
    np.testing.assert_allclose(got, want[::-1], rtol=1e-5, atol=1e-5)


def test_head_conventions():
    # Indexing: the last position with segment id > 0; a padding-only row reads position 0.
    seg = np.asarray([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [1, 0, 0, 0, 0, 0]])
    assert np.asarray(last_token_index(seg)).tolist() == [2, 5, 0, 0]
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert np.asarray(sequence_values(values, seg)).tolist() == [2.0, 11.0, 12.0, 18.0]
    # Init: kernel ~ N(0, init_std²) over d_model, bias 0, in the weight dtype, axis "embed".
    cfg = get_variant("tiny", d_model=4096, n_heads=32, n_kv_heads=32, param_dtype="bfloat16")
    boxed = ScalarHead(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 4096)))["params"]
    assert boxed["kernel"].names == ("embed",) and boxed["bias"].names == ()
    head = unbox(boxed)
    k = np.asarray(head["kernel"], np.float32)
    assert head["kernel"].dtype == jnp.bfloat16 and head["bias"].dtype == jnp.bfloat16
    assert abs(k.std() / cfg.init_std - 1) < 0.05 and abs(k.mean()) < 4 * cfg.init_std / 64
    assert float(head["bias"]) == 0.0
    # Values are float32 even from a bfloat16 backbone (compared across sequences).
    _, apply16 = scalar_model_fns(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"))
    init16 = scalar_model_fns(CFG.replace(param_dtype="bfloat16"))[0]
    p16 = unbox(jax.eval_shape(init16, jax.random.PRNGKey(0)))
    out = jax.eval_shape(apply16, p16, jnp.zeros((2, 8), jnp.int32))
    assert out.shape == (2, 8) and out.dtype == jnp.float32
