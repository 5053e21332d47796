"""Context parallelism's memory: one long row's training gradient compiled with its sequence
split over 1, 2, ... devices (`mesh.context`, models/sharding.py), per device, with plain XLA
attention (`context_attention`'s blocks of rows under a split) or the blockwise kernel
(`attention_impl="flash"`, `context_flash_attention` under a split).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m flaxlm.bench.context_parallel --shapes small:8192,tiny:2048 --contexts 1,2,8 \\
            --impls xla,flash

Nothing runs: each program is compiled for this machine's (simulated) devices and XLA's buffer
assignment gives its temporaries per device; the all-gathers in the program are counted with
their shapes (only keys and values should be gathered). On a GPU the attention kernel and its
memory differ (cuDNN's flash attention keeps no score matrix), so read the ratios, not the
GiB, for a GPU plan.
"""

from __future__ import annotations

import argparse
import collections

GiB = 2**30


def measure(variant: str, seq: int, context: int, impl: str = "xla") -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from flaxlm.models.config import get_variant
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
    from flaxlm.train.pretrain import lm_loss, model_fns

    cfg = get_variant(variant, max_seq_len=seq, attention_impl=impl)
    init, apply = model_fns(cfg)
    params = jax.eval_shape(lambda: jax.tree.map(
        lambda x: getattr(x, "value", x), init(jax.random.PRNGKey(0)),
        is_leaf=lambda x: hasattr(x, "value")))  # fmt: skip
    tokens = jnp.asarray(np.zeros((1, seq), np.int32))
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones((1, seq), jnp.float32)}
    loss_fn = lm_loss(apply, ml_collections.ConfigDict({"z_loss": 0.0}))
    mesh = make_mesh({"context": context}, devices=jax.devices()[:context])
    fn = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    with use_mesh(mesh, logical_axis_rules("fsdp")):
        compiled = fn.lower(params).compile()
    gathers = collections.Counter(
        line.split("=")[1].split("all-gather")[0].strip().split("{")[0]
        for line in compiled.as_text().splitlines()
        if " all-gather(" in line
    )
    return {"variant": variant, "seq": seq, "context": context, "impl": impl,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB,
            "all_gathers": dict(gathers)}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="tiny:2048", help="VARIANT:SEQ,...")
    p.add_argument("--contexts", default="1,2,8")
    p.add_argument("--impls", default="xla", help="attention_impl values: xla,flash")
    a = p.parse_args(argv)
    print("| shape | attention | context | temporaries per device, GiB | vs context 1 | "
          "all-gathers |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        variant, seq = shape.split(":")
        for impl in a.impls.split(","):
            base = None
            for c in map(int, a.contexts.split(",")):
                r = measure(variant, int(seq), c, impl)
                base = base or r["temp_gib"]
                gathers = ", ".join(f"{n}× {s}" for s, n in r["all_gathers"].items()) or "none"
                print(f"| {shape} | {impl} | {c} | {r['temp_gib']:.3f} | "
                      f"{r['temp_gib'] / base:.3f} | {gathers} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
