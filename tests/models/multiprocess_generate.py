"""The generate calls of tests/models/test_decode_multiprocess.py, run here on one process (the
test imports `cases`) or, as a script, on one of several (`python THIS PORT PROCESS_ID N OUT
[differ]`): each process writes the outputs it read back to OUT.PROCESS_ID.npz."""

import sys

import numpy as np

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4, 200, 17, 3, 3, 9, 100, 42, 7, 7, 1, 2],
           [9, 9, 9, 9], [30]]  # fmt: skip
MESH = {"data": 4, "fsdp": 2}


def model_and_mesh():
    """A tiny model with a large random init (peaked distributions: a wrong row or key shows),
    its params placed with the fsdp rules over MESH."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxlm.models.config import get_variant
    from flaxlm.models.sharding import logical_axis_rules, make_mesh
    from flaxlm.models.transformer import Transformer

    cfg = get_variant("tiny", init_std=0.15)
    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    rng = np.random.default_rng(0)
    host = jax.tree.map(
        lambda s: (cfg.init_std * rng.standard_normal(s.shape)).astype(np.float32),
        nn.meta.unbox(boxed),
    )
    mesh, rules = make_mesh(MESH), logical_axis_rules("fsdp")
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    return cfg, jax.device_put(host, shardings), mesh, rules


def cases(cfg, params, mesh, rules, prompts=PROMPTS) -> dict:
    """Host outputs of a few generate calls: one key with top-p and stop tokens (5 prompts, run
    as 8 rows), greedy, per-prompt keys with 2 samples per prompt, and speculative sampling
    with a draft (the model's weights scaled by 0.7: it guesses right often, not always)."""
    import jax

    from flaxlm.models.decode import generate, prompt_keys
    from flaxlm.models.speculative import speculative_generate

    kw = dict(max_new_tokens=12, mesh=mesh, rules=rules)
    runs = {
        "sampled": generate(cfg, params, prompts, rng=jax.random.PRNGKey(7), temperature=1.0,
                            top_p=0.9, stop_tokens=(87, 6, 13), pad_id=-1, **kw),
        "greedy": generate(cfg, params, prompts, rng=jax.random.PRNGKey(0), temperature=0, **kw),
        "grouped": generate(cfg, params, prompts[:3], temperature=0.8, num_samples=2,
                            rng=prompt_keys(jax.random.PRNGKey(1), [10, 11, 12]), **kw),
        # (a sharp temperature: this model's distributions are near uniform, which any draft
        # matches)
        "speculative": speculative_generate(cfg, params, cfg, jax.tree.map(lambda x: 0.7 * x,
                                            params), prompts, rng=jax.random.PRNGKey(3),
                                            temperature=0.1, draft_tokens=3, **kw),
    }  # fmt: skip
    out = {}
    for name, res in runs.items():
        for field, value in res._asdict().items():
            out[f"{name}/{field}"] = np.asarray(jax.device_get(value))
    return out


if __name__ == "__main__":
    port, pid, n, path = sys.argv[1:5]
    from flaxlm.train.main import init_distributed

    init_distributed(f"localhost:{port}", int(n), int(pid))
    cfg, params, mesh, rules = model_and_mesh()
    prompts = PROMPTS
    if sys.argv[5:] == ["differ"] and pid == "1":
        prompts = [PROMPTS[0][:-1] + [4], *PROMPTS[1:]]
    try:
        np.savez(f"{path}.{pid}.npz", **cases(cfg, params, mesh, rules, prompts))
    except ValueError as e:
        print("VALUE_ERROR", e)
