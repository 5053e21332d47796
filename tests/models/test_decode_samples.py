"""`generate(..., num_samples=G)`: G samples per prompt from one prefill per prompt — the same
rows as the prompts repeated G times (GRPO's groups), with less prefill compute."""

import jax
import numpy as np
import pytest

from flaxlm.models import decode
from flaxlm.models.decode import generate, generate_program, prompt_keys
from flaxlm.models.sharding import logical_axis_rules, make_mesh
from tests.models.test_decode import GEMMA2, PROMPTS, _kernel_model, _model


def _repeated(prompts, G):
    return [p for p in prompts for _ in range(G)]


def _assert_same(got, want):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.mark.parametrize("G", [2, 3])
def test_samples_are_the_repeated_prompts_rows(model, G):
    """One key, sampling with stop tokens (some rows end early, the loop exits on "all
    stopped"): tokens, lengths and logprobs of `[p]*G` per prompt, rows b·G + g; a group's
    samples differ from each other."""
    cfg, params = model
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(7), temperature=1.0, pad_id=-1)
    free = np.asarray(generate(cfg, params, _repeated(PROMPTS, G), **kw).tokens)
    kw["stop_tokens"] = (int(free[0, 2]), int(free[-1, 4]))
    want = generate(cfg, params, _repeated(PROMPTS, G), **kw)
    got = generate(cfg, params, PROMPTS, num_samples=G, **kw)
    assert got.tokens.shape == (3 * G, 10)
    _assert_same(got, want)
    assert np.asarray(got.lengths).min() < 10  # some row stopped early
    assert len({tuple(r) for r in np.asarray(got.tokens)[:G]}) > 1  # not G copies of one


def test_greedy_groups_are_copies_of_the_prompts_decode(model):
    """Greedy: every sample of a prompt is that prompt's greedy decode; one prompt with
    num_samples=2 needs no padding row."""
    cfg, params = model
    kw = dict(max_new_tokens=10, rng=jax.random.PRNGKey(0), temperature=0)
    one = np.asarray(generate(cfg, params, PROMPTS, **kw).tokens)
    got = np.asarray(generate(cfg, params, PROMPTS, num_samples=4, **kw).tokens)
    np.testing.assert_array_equal(got, np.repeat(one, 4, axis=0))
    single = generate(cfg, params, PROMPTS[2:], num_samples=2, **kw)
    np.testing.assert_array_equal(single.tokens, np.repeat(one[2:], 2, axis=0))


def test_per_prompt_keys_give_each_sample_its_own_key(model):
    """Sample g of prompt b follows fold_in(key_b, g): the same as generating that prompt
    alone with that key, wherever the prompt sits and whatever its batch mates."""
    cfg, params = model
    kw = dict(max_new_tokens=10, temperature=1.0)
    keys = prompt_keys(jax.random.PRNGKey(3), [10, 11, 12])
    got = np.asarray(generate(cfg, params, PROMPTS, rng=keys, num_samples=3, **kw).tokens)
    for b, g in [(0, 0), (1, 2), (2, 1)]:
        alone = generate(cfg, params, [PROMPTS[b]], rng=jax.random.fold_in(keys[b], g)[None],
                         **kw)  # fmt: skip
        np.testing.assert_array_equal(got[3 * b + g], np.asarray(alone.tokens)[0])
    moved = generate(cfg, params, PROMPTS[::-1], rng=keys[::-1], num_samples=3, **kw)
    np.testing.assert_array_equal(np.asarray(moved.tokens)[6:9], got[:3])
    with pytest.raises(ValueError, match="2 per-prompt keys for 3 prompts"):
        generate(cfg, params, PROMPTS, rng=keys[:2], num_samples=3, **kw)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_rings_and_the_kernel(attention):
    """Gemma 2's mixed layers with rings (per-row ring slots and metadata repeated too), and
    the Pallas step kernel: the repeated prompts' tokens."""
    cfg, params = _kernel_model(**GEMMA2)
    kw = dict(max_new_tokens=8, rng=jax.random.PRNGKey(5), temperature=0.9,
              decode_attention=attention)  # fmt: skip
    want = generate(cfg, params, _repeated(PROMPTS, 2), **kw)
    _assert_same(generate(cfg, params, PROMPTS, num_samples=2, **kw), want)


@pytest.mark.parametrize("prompts,G", [(PROMPTS[:2], 4), (PROMPTS, 2)])
def test_under_a_sharded_mesh(model, prompts, G):
    """2 prompts × 4 samples on data×fsdp = 4 (prompts padded to 4 for the prefill, 8 rows
    decoded) and 3 × 2 (6 rows padded to 8): the unsharded tokens."""
    cfg, params = model
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), logical_axis_rules("fsdp_tp")
    kw = dict(max_new_tokens=8, rng=jax.random.PRNGKey(1), temperature=1.0)
    want = generate(cfg, params, _repeated(prompts, G), **kw)
    got = generate(cfg, params, prompts, num_samples=G, mesh=mesh, rules=rules, **kw)
    assert got.tokens.shape == (len(prompts) * G, 8)
    _assert_same(got, want)
    # per-prompt keys, one per sample, split over the devices with the rows
    kw["rng"] = prompt_keys(jax.random.PRNGKey(2), range(len(prompts)))
    want = generate(cfg, params, prompts, num_samples=G, **kw)
    _assert_same(generate(cfg, params, prompts, num_samples=G, mesh=mesh, rules=rules, **kw),
                 want)  # fmt: skip


def test_the_prefill_runs_once_per_prompt(model):
    """The compiled program's flops: a 100-token prompt sampled 8 times (2 new tokens, so the
    prefill dominates) costs about an eighth of its 8 copies' program."""
    cfg, params = model
    prompt = [list(np.arange(1, 101) % 250 + 3)]
    kw = dict(rng=jax.random.PRNGKey(0), max_new_tokens=2, temperature=1.0)

    def flops(prompts, **extra):
        fn, args = generate_program(cfg, prompts, **kw, **extra)
        cost = fn.lower(params, *args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    shared, repeated = flops(prompt, num_samples=8), flops(prompt * 8)
    assert shared < 0.25 * repeated, (shared, repeated)


def test_bad_num_samples(model):
    cfg, params = model
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            generate(cfg, params, PROMPTS, num_samples=bad, max_new_tokens=2,
                     rng=jax.random.PRNGKey(0))  # fmt: skip
    assert decode.repeat_rows(np.arange(3), 2, 5).tolist() == [0, 0, 1, 1, 2]
