"""What the checkpoint fingerprints cost (train/checkpoint_fingerprint.py), next to the save.

    .venv/bin/python -m flaxlm.bench.checkpoint_fingerprint [--variant 125m] [--out DIR]

Builds a model variant's training state (float32 params and AdamW's two moments, on the
default devices), then times, on the same state:
  fingerprint_cold_s   the first fingerprint of the state (compile + one pass)
  fingerprint_s        the next one (one pass over every array), median of `--repeats`
  save_s               a synchronous orbax save of the state without fingerprints: the peer
                       (Checkpointer.save records them; this is what the save cost before)
  restore_s            a restore of that step without the check
and the ratio fingerprint_s / save_s: what the fingerprint adds to each save (and, as the
same pass, to each restore). Prints JSON and writes OUT/checkpoint_fingerprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from flaxlm.models.config import get_variant
from flaxlm.models.transformer import Transformer
from flaxlm.train import checkpoint_fingerprint as fingerprint
from flaxlm.train.state import unbox


def state_of(variant: str) -> dict:
    cfg = get_variant(variant)
    params = unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
        "params"
    ])  # fmt: skip
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="125m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    state = jax.block_until_ready(state_of(a.variant))
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "nbytes")]
    cold = _timed(lambda: fingerprint.fingerprints(state))
    warm = [_timed(lambda: fingerprint.fingerprints(state)) for _ in range(a.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ocp.StandardCheckpointer()
        path = os.path.join(tmp, "state")
        save = _timed(lambda: (ckpt.save(path, state), ckpt.wait_until_finished()))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restore = _timed(lambda: jax.block_until_ready(ckpt.restore(path, abstract)))
        ckpt.close()
    out = {
        "variant": a.variant,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "arrays": len(leaves),
        "state_gb": round(sum(x.nbytes for x in leaves) / 1e9, 3),
        "fingerprint_cold_s": round(cold, 3),
        "fingerprint_s": round(statistics.median(warm), 3),
        "save_s": round(save, 3),
        "restore_s": round(restore, 3),
        "fingerprint_over_save": round(statistics.median(warm) / save, 3),
    }
    print(json.dumps(out))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "checkpoint_fingerprint.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
