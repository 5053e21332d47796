"""Compile the benchmark programs for an H200 on a machine without a GPU (deviceless AOT).

    make gpu-image-venv      # once: .venv-gpu-image, the GPU image's jax 0.11.2 + CUDA plugin
    .venv-gpu-image/bin/python -m flaxlm.bench.gpu_aot --out OUT   # the GPU suite's flax cases
    .venv-gpu-image/bin/python -m flaxlm.bench.gpu_aot --out OUT \\
        --cases train:7b:flax:bf16_params,decode:1b:flax:b64:fused --hlo   # + OUT/CASE.hlo.txt

Use the GPU image's jax (`make gpu-image-venv`, needs a python3.12): XLA changes between
releases, and what the H200 runs is what its jax compiles. (`make gpu-aot-venv` builds the same
with .venv's jax, 0.10 here, which differed: it fused the KV cache's slices into the attention
matmuls where 0.11.2 copies them, bench/RESULTS.md.)

GPU leases are short and rare; what can be known before one should be. jax's CUDA plugin
compiles for a GPU it is only told about (`jax.experimental.topologies`, with the H200's
description in bench/h200_target_config.txtpb), so XLA's real GPU compiler — fusion, cuDNN
attention, buffer assignment, command buffers — runs here on the CPU. Not run: autotuning (it
needs the device), so matmul tilings are XLA's defaults, not the ones a GPU run picks.

Cases are the flaxlm cases of the benches, prefixed by their bench:
  train:SHAPE:flax:PLAN[:FLAGS]          bench/train_throughput.py (the same jitted step, built
                                         by its `flax_train_program`)
  decode:SHAPE:flax:bB[:OPTION|FLAGS]    bench/decode.py (the same `generate` program)
FLAGS are driver.XLA_FLAG_SETS names, OPTION a decode GENERATE_OPTIONS name. Each case compiles
in its own subprocess (XLA flags are read once per process). Reported per case:
  memory      XLA's buffer assignment for the program: arguments (train state / weights),
              outputs, aliased (donated arguments reused as outputs), temporaries; peak =
              arguments + outputs − aliased + temporaries, the device memory the program needs
              (checked against the H200: the 1.1B `fast` step, 37.3 GiB here, peaked at 37.2
              GiB there, bench/RESULTS.md). `fits`: peak ≤ 139 GiB, what a lease exposes.
  kernels     opcode counts of the program's kernels (each loop body once) and custom-call
              targets (cuDNN attention, cuBLAS)
  launches    from XLA's thunk sequence: kernels, CUDA-graph launches and kernels launched one
              by one, for the program and per iteration of its largest loop (a decode step)
  traffic     bytes the kernels read and write, by kind (matmul, attention, other: the
              memory-bound rest), estimated from operand and result shapes (bench/hlo_text.py
              `kernel_traffic`), for the program (loop bodies once) and one loop iteration;
              the table shows a train step's and a decode step's. Against HBM bandwidth it
              bounds a step from below; against the ideal bytes (weights + KV for decoding)
              it shows what the compiled program moves beyond them.
  loop_body_kernels / loop_body_ops (decode)   as bench/decode.py records them on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import tempfile
import time

GiB = 2**30
HBM_GIB = 139  # what one H200 lease exposes to a process
TARGET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h200_target_config.txtpb")


def suite_cases() -> list[str]:
    """The flaxlm train and decode cases of the GPU suite (bench/gpu_suite.py GPU_CASES), in its
    order: what the next lease will run, compiled here first."""
    from flaxlm.bench.gpu_suite import GPU_CASES

    out = []
    for _, _, case_args in GPU_CASES:
        if callable(case_args):  # chosen on the GPU from what earlier cases measure
            continue
        bench, *args = case_args
        prefix = {"train_throughput": "train", "decode": "decode"}.get(bench)
        if prefix and "--cases" in args:
            cases = args[args.index("--cases") + 1].split(",")
            out += [f"{prefix}:{c}" for c in cases if c.split(":")[1] == "flax"]
    return out


NO_PLUGIN = (
    "bench/gpu_aot.py needs jax's CUDA plugin (it compiles for a GPU this machine does not "
    "have): run `make gpu-image-venv` (the GPU image's jax; needs python3.12) and use "
    ".venv-gpu-image/bin/python, or `make gpu-aot-venv` (this jax) and .venv-gpu-aot/bin/python"
)


def h200_devices() -> list:
    """Compile-only H200 devices: XLA's GPU compiler targets them, nothing can run on them."""
    from jax.experimental import topologies

    with open(TARGET_CONFIG) as f:
        target = f.read()
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=target)
    except Exception as e:  # no CUDA plugin: "Unknown backend", or no PJRT topology support
        raise SystemExit(f"{NO_PLUGIN} ({type(e).__name__}: {e})") from None
    return list(topo.devices)


def parse_case(case: str) -> tuple[str, str, list[str], dict]:
    """(bench, the bench's own case, the extra parts: flag sets / options, the environment
    with those flag sets) of a case name; a malformed name stops with what it should be."""
    from flaxlm.bench import decode, driver, train_throughput

    bench, _, rest = case.partition(":")
    parts = rest.split(":")
    if bench == "train":
        if len(parts) < 2 or parts[0] not in train_throughput.SHAPES or parts[1] != "flax":
            raise SystemExit(f"case {case!r}: want train:SHAPE:flax[:PLAN[:FLAGS]], SHAPE one "
                             f"of {sorted(train_throughput.SHAPES)}")  # fmt: skip
        own, extra = ":".join(parts[:3]), parts[3:]
        allowed = ("profile",)  # a run option: nothing to compile differently
    elif bench == "decode":
        if (len(parts) < 3 or parts[0] not in decode.SHAPES or parts[1] != "flax"
                or not parts[2].startswith("b") or not parts[2][1:].isdigit()):  # fmt: skip
            raise SystemExit(f"case {case!r}: want decode:SHAPE:flax:bBATCH[:OPTION|FLAGS], "
                             f"SHAPE one of {sorted(decode.SHAPES)}")  # fmt: skip
        own, extra = ":".join(parts[:3]), parts[3:]
        allowed = decode.CASE_OPTIONS  # (profile: nothing to compile differently)
    else:
        raise SystemExit(f"case {case!r}: the bench must be train or decode")
    return bench, own, extra, driver.case_env(case, extra, allowed=allowed)


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    parts = {k: getattr(ma, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
    peak = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    rec = {f"{k}_gib": round(v / GiB, 3) for k, v in parts.items()}
    rec["peak_gib"] = round(peak / GiB, 3)
    rec["fits"] = peak <= HBM_GIB * GiB
    return rec


def _abstract(x, sharding):
    import jax
    import numpy as np

    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def compile_train(case: str, devices):
    """The compiled train step of a train_throughput flaxlm case, for `devices`."""
    import jax
    import jax.numpy as jnp

    from flaxlm.bench.train_throughput import flax_train_program
    from flaxlm.models.sharding import batch_sharding, use_mesh
    from flaxlm.train.state import abstract_state

    prog = flax_train_program(case, devices)
    mesh, B, T = prog["mesh"], prog["batch"], prog["seq"]
    state = abstract_state(prog["init_params"], prog["tx"], prog["shardings"])
    rows = batch_sharding(mesh, 2)
    batch = {k: jax.ShapeDtypeStruct((B, T), dt, sharding=rows)
             for k, dt in (("tokens", jnp.int32), ("targets", jnp.int32),
                           ("loss_mask", jnp.float32))}  # fmt: skip
    with use_mesh(mesh, prog["rules"]):
        return prog["step"].lower(state, batch).compile()


def compile_decode(case: str, extra: list[str], devices):
    """The compiled `generate` program of a bench/decode.py flaxlm case, for `devices[0]`."""
    import jax
    import numpy as np

    from flaxlm.bench.decode import flax_case, option_settings
    from flaxlm.models.decode import (
        MIN_ROWS,
        generate_program,
        resolve_decode_gemm,
        resolve_decode_norm,
    )
    from flaxlm.models.decode_attention import lowering_target

    shape, _, b = case.split(":")[:3]
    options = {}
    for name in extra:
        options.update(option_settings(name))
    cfg, init, tokens, kw = flax_case(shape, int(b[1:]), options)
    # `generate`'s "auto" picks the kernel on CUDA GPUs: the target here, not this process's
    kw.setdefault("decode_attention", "pallas")
    kw["decode_gemm"] = resolve_decode_gemm(kw.get("decode_gemm", "auto"),
                                            quantize=kw.get("quantize", "none"), cuda=True,
                                            rows=max(len(tokens), MIN_ROWS))  # fmt: skip
    kw["decode_norm"] = resolve_decode_norm(kw.get("decode_norm", "auto"), cfg,
                                            kw["decode_attention"], kw["decode_gemm"],
                                            kw.get("decode_mlp", "xla"),
                                            kw.get("quantize", "none") != "none",
                                            cuda=True)  # fmt: skip
    one = jax.sharding.SingleDeviceSharding(devices[0])
    params = jax.tree.map(lambda x: _abstract(x, one), jax.eval_shape(init, jax.random.PRNGKey(0)))
    fn, args = generate_program(cfg, tokens, rng=jax.random.PRNGKey(0), **kw)
    args = [params] + [jax.tree.map(lambda x: _abstract(np.asarray(x), one), a) for a in args]
    # Pallas kernels (`:pallas`) are lowered for the H200, not for this machine's CPU. Only
    # then: under jax 0.11 the abstract mesh that names the target also changes what the same
    # program compiles to for the CPU (not for the H200), which the tests compare.
    # (Compiled for this process's CPU, as the tests do, the kernel is Pallas' interpreter: no
    # GPU target to name, and naming one changed the CPU program under jax 0.11.)
    target = lowering_target(devices[0].device_kind)
    kernel = kw.get("decode_attention", "").startswith("pallas")
    on_gpu = devices[0].platform in ("gpu", "cuda")
    with target if kernel and on_gpu else contextlib.nullcontext():
        return fn.lower(*args).compile()


def run_one(case: str, dump_dir: str, hlo_dir: str = "") -> dict:
    """Compiles one case (in this process) and reads what it compiled to; with `hlo_dir`, also
    writes the optimised HLO there (HLO_DIR/CASE.hlo.txt) for reading by hand."""
    import jax

    from flaxlm.bench import hlo_text

    bench, own, extra, _ = parse_case(case)
    devices = h200_devices()
    t0 = time.perf_counter()
    compiled = compile_train(own, devices) if bench == "train" else (
        compile_decode(own, extra, devices))  # fmt: skip
    rec = {"case": case, "compile_s": round(time.perf_counter() - t0, 1),
           "jax": jax.__version__, "target": devices[0].device_kind}  # fmt: skip
    hlo = compiled.as_text()
    if hlo_dir:
        with open(os.path.join(hlo_dir, case.replace(":", "_") + ".hlo.txt"), "w") as f:
            f.write(hlo)
    ops, targets = hlo_text.program_ops(hlo)
    rec.update(memory=_memory(compiled), kernels=ops, custom_calls=targets)
    rec["traffic_gib"] = {scope: {kind: round(b / GiB, 3) for kind, b in kinds.items()}
                          for scope, kinds in hlo_text.traffic(hlo).items()}  # fmt: skip
    if bench == "decode":
        body = hlo_text.loop_body_ops(hlo)
        rec.update(loop_body_kernels=sum(body.values()), loop_body_ops=body)
    thunks = sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt")))
    if thunks:  # the largest dumped module is the program (others: small helper jits)
        with open(max(thunks, key=os.path.getsize)) as f:
            rec["launches"] = hlo_text.thunk_launches(f.read())
    return rec


def table(records: list[dict]) -> str:
    lines = [
        "| case | peak GiB (args + temp) | fits 139 GiB | kernels | host launches | custom calls "
        "| loop iteration: kernels / host launches | traffic GiB: matmul + attention + other "
        "(per step; decode: per token) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:120]} ||||||||")
            continue
        m, launches = r["memory"], r.get("launches", {})
        loop = launches.get("loop")
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["custom_calls"].items())) or "–"
        per_iteration = f"{loop['kernels']} / {loop['host_launches']}" if loop else "–"
        t = r.get("traffic_gib", {}).get("loop" if r["case"].startswith("decode:") else "program")
        traffic = f"{t['matmul']:.2f} + {t['attention']:.2f} + {t['other']:.2f}" if t else "–"
        lines.append(
            f"| {r['case']} | {m['peak_gib']:.1f} ({m['argument_gib']:.1f} + "
            f"{m['temp_gib']:.1f}) | {'yes' if m['fits'] else 'no'} | "
            f"{sum(r['kernels'].values())} | "
            f"{launches.get('program', {}).get('host_launches', '–')} | {calls} | "
            f"{per_iteration} | {traffic} | {r['compile_s']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="", help="comma list (default: the GPU suite's)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--fresh", action="store_true", help="forget earlier records in OUT")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    p.add_argument("--hlo", action="store_true", help="also write each optimised HLO to OUT")
    p.add_argument("--dump", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; the GPU is compile-only
    from flaxlm.bench import driver

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gpu_aot.jsonl")
    if a.one:
        driver.run_one(path, a.one, lambda: run_one(a.one, a.dump, a.out if a.hlo else ""))
        return
    cases = [c for c in a.cases.split(",") if c] or suite_cases()
    envs = {c: parse_case(c)[3] for c in cases}  # every name checked before the first compile
    h200_devices()  # no plugin: stop here, once, with the set-up command
    if a.fresh and os.path.exists(path):
        os.remove(path)
    for case in cases:
        with tempfile.TemporaryDirectory() as dump:  # XLA's dump, read for the thunk sequence
            env = dict(envs[case], JAX_PLATFORMS="cpu")  # the GPU is a compile-only target
            dump_flags = f"--xla_dump_to={dump} --xla_dump_hlo_module_re=^jit_(run|train_step)$"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {dump_flags}".strip()
            cmd = [sys.executable, os.path.abspath(__file__), "--out", a.out, "--one", case,
                   "--dump", dump] + (["--hlo"] if a.hlo else [])  # fmt: skip
            driver.run_case(cmd, case, path, a.timeout, env)
    md = table(driver.latest_records(path))
    driver.write_table(a.out, "gpu_aot.md", md)
    print(md)
    driver.exit_if_failed(path, cases)  # a case that fails to compile fails the command


if __name__ == "__main__":
    main()
