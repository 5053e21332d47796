"""Shared plumbing of the benches that set two ways of running `generate` side by side from
their compiled programs (bench/window_cache.py, bench/group_prefill.py): the config as a
backend measures it, abstract params to compile without weights (here or for an H200 with
no GPU, bench/gpu_aot.py), a median timer, and the command line (records appended to
OUT/NAME.jsonl, a markdown table of the latest ones in OUT/NAME.md)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from flaxlm.bench import driver

GiB = 2**30


def backend_config(cfg, target=None):
    """(cfg as measured on this backend or `target`, backend name): float32 on the CPU
    (XLA:CPU copies bf16 matmul operands to float32, which swamps the figure), cuDNN
    attention on a GPU (the prefill as a GPU config runs it)."""
    import jax

    backend = target.platform if target is not None else jax.default_backend()
    if backend == "cpu":
        return cfg.replace(dtype="float32", param_dtype="float32"), backend
    return cfg.replace(attention_impl="cudnn"), backend


def abstract_params(cfg, target=None):
    """(init function, the params' abstract shapes, `place`: array -> what the compile takes,
    an abstract array on `target` when given, else the array itself)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxlm.models.transformer import Transformer
    from flaxlm.train.state import unbox

    init = lambda r: unbox(Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)))["params"]  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    place = lambda x: x  # noqa: E731
    if target is not None:
        one = jax.sharding.SingleDeviceSharding(target)
        place = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=one)  # noqa: E731
    return init, abstract, place


def median_s(call, runs: int = 3) -> float:
    """Median wall time of `call(i)` for i = 1..runs after a warm-up `call(0)` (compiles)."""
    call(0)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv, *, doc: str, name: str, shapes: dict, default: list, tiny: str, measure,
         table, key: tuple) -> None:  # fmt: skip
    """The command line of such a bench: `measure(shape, timed, target) -> records` per shape;
    the table shows the latest record of every `key` (record fields) in OUT."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help=f"the CPU shape {tiny}, timed")
    p.add_argument("--time", action="store_true", help="also time the calls (random params)")
    p.add_argument("--shapes", default="", help="comma-separated subset of " + ",".join(shapes))
    p.add_argument("--h200", action="store_true",
                   help="compile for an H200 here (CUDA plugin; bench/gpu_aot.py)")  # fmt: skip
    a = p.parse_args(argv)
    chosen = a.shapes.split(",") if a.shapes else ([tiny] if a.tiny else default)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{name}.jsonl")
    target = None
    if a.h200:
        from flaxlm.bench.gpu_aot import h200_devices

        target = h200_devices()[0]
    for shape in chosen:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in measure(shape, a.time or a.tiny, target))
    md = markdown(path, table, key)
    driver.write_table(a.out, f"{name}.md", md.rstrip("\n"))
    print(md)


def markdown(path: str, table, key: tuple) -> str:
    """`table` of the latest record of every `key` (record fields) in the JSONL file `path`."""
    with open(path) as f:  # in order of arrival
        latest = {tuple(r[k] for k in key): r for r in map(json.loads, filter(str.strip, f))}
    return table(list(latest.values()))
