"""The blockwise attention kernel (`attention_impl="flash"`, models/flash_attention.py) against
plain XLA attention: the training step's memory, and the kernel's time on this machine.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m flaxlm.bench.flash_attention --memory tiny:2048,small:4096 \\
            --time small:2048 --docs 0,64

memory  one row of SEQ tokens, the gradient of the LM loss compiled for this machine's first
        device (nothing runs); XLA's buffer assignment gives the step's temporaries. Attention
        "xla" holds (N, T, T) float32 scores and probabilities per layer for the backward.
time    one layer's attention alone, forward and backward (the gradient of a random projection
        of its output), jitted, the median of `--runs` calls after a warm-up, with the
        variant's heads at batch `--batch`. `--docs D` packs each row with documents of D
        tokens (0 = one document per row): the blockwise kernel skips the tiles that no query
        of a block can see, the XLA kernel computes and masks the whole square. "tiles" is the
        share of the (T/b)² tiles the forward visits.

On a GPU cuDNN's fused kernel is the fast path where it applies (bench/train_throughput.py);
this kernel is for what it refuses (soft-capped logits, long split sequences) and for TPUs and
CPUs. Prints a markdown table; `--json PATH` also writes the records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

GiB = 2**30


def _params(cfg):
    import jax

    from flaxlm.train.pretrain import model_fns

    init = model_fns(cfg)[0]
    return jax.eval_shape(lambda: jax.tree.map(
        lambda x: getattr(x, "value", x), init(jax.random.PRNGKey(0)),
        is_leaf=lambda x: hasattr(x, "value")))  # fmt: skip


def memory(variant: str, seq: int, impl: str, block: int) -> dict:
    """Temporaries of one train step's gradient, one row of `seq` tokens."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from flaxlm.models.config import get_variant
    from flaxlm.models.sharding import logical_axis_rules, make_mesh, use_mesh
    from flaxlm.train.pretrain import lm_loss, model_fns

    cfg = get_variant(variant, max_seq_len=seq, attention_impl=impl, flash_block=block)
    tokens = jnp.zeros((1, seq), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones((1, seq), jnp.float32)}
    loss_fn = lm_loss(model_fns(cfg)[1], ml_collections.ConfigDict({"z_loss": 0.0}))
    fn = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh, logical_axis_rules("fsdp")):
        compiled = fn.lower(_params(cfg)).compile()
    return {"kind": "memory", "variant": variant, "seq": seq, "impl": impl, "block": block,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB}  # fmt: skip


def kernel_time(variant: str, seq: int, impl: str, block: int, batch: int, doc: int,
                runs: int) -> dict:  # fmt: skip
    """Forward + backward of one layer's attention: median seconds over `runs` calls."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.models.attention import attention_mask, causal_mask, xla_attention
    from flaxlm.models.config import get_variant
    from flaxlm.models.flash_attention import flash_attention, visited_tiles

    cfg = get_variant(variant)
    B, T, N, K, H = batch, seq, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_
    dtype = jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=s), dtype)
                  for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H), (B, T, N, H)])  # fmt: skip
    packed = None
    if doc:
        seg = np.arange(T) // doc + 1
        packed = (jnp.asarray(np.broadcast_to(seg, (B, T)), jnp.int32),
                  jnp.asarray(np.broadcast_to(np.arange(T) % doc, (B, T)), jnp.int32))  # fmt: skip
    if impl == "flash":

        def attend(q, k, v):
            return flash_attention(q, k, v, *(packed or ()), block=block)
    else:
        if packed is None:
            mask = causal_mask(T, T, 0)
        else:
            slot = jnp.broadcast_to(jnp.arange(T), (B, T))
            mask = attention_mask(packed[0], packed[0], slot, slot, packed[1], packed[1])

        def attend(q, k, v):
            return xla_attention(q, k, v, mask)

    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w).astype(jnp.float32),
                            argnums=(0, 1, 2)))  # fmt: skip
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v))
        times.append(time.perf_counter() - t0)
    visited, _ = visited_tiles(T, T, *(packed or ()), block=block)
    tiles = float(np.mean(np.asarray(visited)))
    return {"kind": "time", "variant": variant, "seq": seq, "impl": impl, "block": block,
            "batch": B, "doc": doc, "seconds": statistics.median(times),
            "tiles": tiles if impl == "flash" else 1.0}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", default="tiny:2048", help="VARIANT:SEQ,... ('' = none)")
    p.add_argument("--time", default="tiny:1024", help="VARIANT:SEQ,... ('' = none)")
    p.add_argument("--impls", default="xla,flash")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--docs", default="0", help="document lengths for --time (0 = one per row)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", help="also write the records here")
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    records = []
    if a.memory:
        print("| shape | seq | impl | step temporaries, GiB | vs xla |")
        print("|---|---|---|---|---|")
        for shape in a.memory.split(","):
            variant, seq = shape.split(":")
            base = None
            for impl in impls:
                r = memory(variant, int(seq), impl, a.block)
                records.append(r)
                base = base or r["temp_gib"]
                print(f"| {variant} | {seq} | {impl} | {r['temp_gib']:.3f} | "
                      f"{r['temp_gib'] / base:.3f} |", flush=True)  # fmt: skip
    if a.time:
        print("\n| shape | seq | batch | document | impl | fwd+bwd ms | vs xla | tiles visited |")
        print("|---|---|---|---|---|---|---|---|")
        for shape in a.time.split(","):
            variant, seq = shape.split(":")
            for doc in map(int, a.docs.split(",")):
                base = None
                for impl in impls:
                    r = kernel_time(variant, int(seq), impl, a.block, a.batch, doc, a.runs)
                    records.append(r)
                    base = base or r["seconds"]
                    print(f"| {variant} | {seq} | {a.batch} | {doc or 'whole row'} | {impl} | "
                          f"{1e3 * r['seconds']:.1f} | {r['seconds'] / base:.2f} | "
                          f"{r['tiles']:.2f} |", flush=True)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
