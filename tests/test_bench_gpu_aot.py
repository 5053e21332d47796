"""bench/gpu_aot.py and bench/hlo_text.py: reading compiled programs (kernels, CUDA-graph
launches) from hand-written texts in XLA's formats, case names, and that the programs gpu_aot
compiles are the ones the benches run. Compiling for the H200 itself needs jax's CUDA plugin
(.venv-gpu-aot); without it the tool must say how to get it."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxlm.bench import gpu_aot, hlo_text
from flaxlm.bench.decode import flax_case
from flaxlm.models.decode import generate_program

HAS_PLUGIN = importlib.util.find_spec("jax_plugins") is not None  # CUDA / ROCm plugins
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The layout of XLA's *.thunk_sequence_after_thunk_passes.txt (abridged from a real dump):
# a prefill command buffer, then a while loop whose condition kernel runs alone and whose body
# is one command buffer, then a kernel launched on its own.
THUNKS = """\
000: kCommandBuffer [source       | next=004 (1)]
    001: kCustomKernel [source        | next=002 (1)] loop_select_fusion_3 grid: [256, 1, 1]
    002: kCustomKernel [prev=001 (1)  | next=003 (2)] fusion_335 grid: [512, 1, 1]
    003: kCopy         [prev=002 (1)  | sink        ] kCopy
004: kWhile         [prev=000 (1) | next=009 (1)]
condition:
    005: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
  body:
    000: kCommandBuffer [source | sink]
        006: kCustomKernel [source       | next=007 (1)] gemm_fusion_dot_65 grid: [8, 1, 1]
        007: kCustomKernel [prev=006 (1) | next=008 (1)] input_reduce_fusion grid: [1, 1, 1]
        008: kCopy         [prev=007 (1) | sink        ] kCopy
009: kCustomKernel  [prev=004 (1) | sink        ] loop_convert_fusion_65 grid: [128, 1, 1]
"""


def test_thunk_launches_counts_graphs_and_lone_kernels():
    kinds = [k for k, _ in hlo_text.thunk_tree(THUNKS)]
    assert kinds.count("kCommandBuffer") == 2 and kinds.count("kWhile") == 1
    rec = hlo_text.thunk_launches(THUNKS)
    # Program: 3 + 1 + 3 + 1 kernels; two graphs; the condition kernel and the last kernel
    # run alone.
    assert rec["program"] == {
        "kernels": 8,
        "graph_launches": 2,
        "kernels_outside_graphs": 2,
        "host_launches": 4,
    }
    # One loop iteration: the condition kernel alone plus the body's one graph of 3 kernels.
    assert rec["loop"] == {
        "kernels": 4,
        "graph_launches": 1,
        "kernels_outside_graphs": 1,
        "host_launches": 2,
    }
    assert "loop" not in hlo_text.thunk_launches(THUNKS.split("004:")[0])


HLO = """HloModule m

%small_body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %a = s32[] add(s32[] %x, s32[] %y)
  ROOT %t = (s32[]) tuple(s32[] %a)
}

%fused_computation (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(f32[4]{0} %q)
}

%big_body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %g = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %p), index=1
  %f = f32[4]{0} fusion(f32[4]{0} %g), kind=kLoop, calls=%fused_computation
  %d = f32[4]{0} custom-call(f32[4]{0} %f), custom_call_target="__cublas$gemm"
  %w = (s32[]) while((s32[]) %i), condition=%c, body=%small_body
  ROOT %t = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %d)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %c = f32[4]{0} custom-call(f32[4]{0} %x), custom_call_target="__cudnn$fmhaSoftmax"
  %l = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%c2, body=%big_body
  ROOT %r = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %l), index=1
}
"""


def test_program_ops_counts_every_kernel_once_with_targets():
    ops, targets = hlo_text.program_ops(HLO)
    assert ops == {"custom-call": 2, "fusion": 1, "add": 1}
    assert targets == {"__cudnn$fmhaSoftmax": 1, "__cublas$gemm": 1}
    # the largest loop body: its fusion and cuBLAS call plus its nested loop's add; the
    # fusion's own exponential is inside its one kernel
    assert hlo_text.loop_body_ops(HLO) == {"fusion": 1, "custom-call": 1, "add": 1}
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_text.program_ops(HLO.split("ENTRY")[0])


TRAFFIC_HLO = """HloModule m

%fused_slice (p0: bf16[2,4,8], p1: bf16[8,16]) -> f32[4,16] {
  %p0 = bf16[2,4,8]{2,1,0} parameter(0)
  %s = bf16[1,4,8]{2,1,0} slice(%p0), slice={[0:1], [0:4], [0:8]}
  %b = bf16[4,8]{1,0} bitcast(%s)
  %p1 = bf16[8,16]{1,0} parameter(1)
  ROOT %d = f32[4,16]{1,0} dot(%b, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (kv: bf16[2,4,8], w: bf16[8,16], table: f32[1000,16], idx: s32[4]) -> f32[16] {
  %kv = bf16[2,4,8]{2,1,0} parameter(0)
  %w = bf16[8,16]{1,0} parameter(1)
  %table = f32[1000,16]{1,0} parameter(2)
  %idx = s32[4]{0} parameter(3)
  %upd = bf16[2,4,1]{2,1,0} parameter(4)
  %i = s32[] parameter(5)
  %gemm_fusion_dot = f32[4,16]{1,0} fusion(%kv, %w), kind=kCustom, calls=%fused_slice
  %loop_gather_fusion = f32[4,16]{1,0} fusion(%table, %idx), kind=kLoop, calls=%fg
  %loop_dynamic_update_slice_fusion = bf16[2,4,8]{2,1,0} fusion(%kv, %upd, %i), kind=kLoop
  %cc = f32[4,16]{1,0} custom-call(%loop_gather_fusion), custom_call_target="__cudnn$fmhaSoftmax"
  %pallas_call = (bf16[4,8]{1,0}, bf16[2,4,8]{2,1,0}) custom-call(%i, %kv, %kv), PALLAS_ATTRS
  ROOT %r = f32[16]{0} fusion(%gemm_fusion_dot), kind=kInput, calls=%fr
}
""".replace(
    "PALLAS_ATTRS",
    'custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{1}: (1, {})}',
)


def test_kernel_traffic_counts_what_each_kernel_moves():
    t = hlo_text.traffic(TRAFFIC_HLO)["program"]
    # the gemm reads the slice of the cache it uses (1·4·8 bf16), all of w, writes f32[4,16]
    assert t["matmul"] == 64 + 256 + 256
    # the cuDNN call: its operand and result; the Pallas call: the index, the cache once (it
    # is passed twice), its first output; the second output is the cache updated in place
    assert t["attention"] == (256 + 256) + (4 + 128 + 64)
    # the lookup reads 4·16 table entries (not 1000 rows) and 4 ids, writes f32[4,16]; the
    # in-place cache write reads and writes its update and index; the reduction reads it all
    assert t["other"] == (256 + 16 + 256) + 2 * (16 + 4) + (256 + 64)
    assert "loop" not in hlo_text.traffic(TRAFFIC_HLO)


SLICED_HLO = """HloModule m

%half (g: bf16[4,8], m: f32[2,8]) -> f32[2,8] {
  %g = bf16[4,8]{1,0} parameter(0)
  %c = f32[4,8]{1,0} convert(%g)
  %s = f32[2,8]{1,0} slice(%c), slice={[0:2], [0:8]}
  %m = f32[2,8]{1,0} parameter(1)
  ROOT %r = f32[2,8]{1,0} add(%s, %m)
}

%both (a: bf16[4,8], b: bf16[4,8]) -> bf16[2,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %lo = bf16[2,8]{1,0} slice(%a), slice={[0:2], [0:8]}
  %b = bf16[4,8]{1,0} parameter(1)
  %hi = bf16[2,8]{1,0} slice(%b), slice={[2:4], [0:8]}
  ROOT %r = bf16[2,8]{1,0} multiply(%lo, %hi)
}

ENTRY %main (g: bf16[4,8], m: f32[2,8]) -> bf16[2,8] {
  %g = bf16[4,8]{1,0} parameter(0)
  %m = f32[2,8]{1,0} parameter(1)
  %loop_add_fusion = f32[2,8]{1,0} fusion(%g, %m), kind=kLoop, calls=%half
  ROOT %loop_multiply_fusion = bf16[2,8]{1,0} fusion(%g, %g), kind=kLoop, calls=%both
}
"""


def test_kernel_traffic_of_sliced_and_repeated_operands():
    """A gradient sliced out of a stacked one through a convert reads its half (in the stored
    dtype); one buffer passed twice and sliced into both halves is read once, whole."""
    t = hlo_text.traffic(SLICED_HLO)["program"]
    assert t["other"] == (2 * 8 * 2 + 64 + 64) + (4 * 8 * 2 + 2 * 8 * 2)


GATHERED_HLO = """HloModule m

%fused_reduce (w: bf16[8,4,16], x: bf16[4], i: s32[2,1]) -> bf16[2,16] {
  %w = bf16[8,4,16]{2,1,0} parameter(0)
  %i = s32[2,1]{1,0} parameter(2)
  %g = bf16[2,4,16]{2,1,0} gather(%w, %i), offset_dims={1,2}, ROWS, slice_sizes={1,4,16}
  %x = bf16[4]{0} parameter(1)
  %xb = bf16[2,4,16]{2,1,0} broadcast(%x), dimensions={1}
  %m = bf16[2,4,16]{2,1,0} multiply(%g, %xb)
  %z = bf16[] constant(0)
  ROOT %r = bf16[2,16]{1,0} reduce(%m, %z), dimensions={1}, to_apply=%add
}

%twice (t: f32[3,8], j: s32[10,1]) -> f32[10,8] {
  %t = f32[3,8]{1,0} parameter(0)
  %j = s32[10,1]{1,0} parameter(1)
  ROOT %g = f32[10,8]{1,0} gather(%t, %j), offset_dims={1}, ROWS, slice_sizes={1,8}
}

ENTRY %main (w: bf16[8,4,16], x: bf16[4], i: s32[2,1], t: f32[3,8], j: s32[10,1]) -> bf16[2,16] {
  %w = bf16[8,4,16]{2,1,0} parameter(0)
  %x = bf16[4]{0} parameter(1)
  %i = s32[2,1]{1,0} parameter(2)
  %t = f32[3,8]{1,0} parameter(3)
  %j = s32[10,1]{1,0} parameter(4)
  %input_reduce_fusion = bf16[2,16]{1,0} fusion(%w, %x, %i), kind=kInput, calls=%fused_reduce
  %input_gather_fusion = f32[10,8]{1,0} fusion(%t, %j), kind=kInput, calls=%twice
  ROOT %r = bf16[2,16]{1,0} copy(%input_reduce_fusion)
}
""".replace("ROWS", "collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1")


def test_kernel_traffic_of_gathered_operands():
    """A reduction that gathers 2 of 8 experts' kernels (a few-token MoE step, models/moe.py)
    reads those 2, not all 8, and its indices whole; a gather reading rows more than once
    reads at most the whole operand."""
    t = hlo_text.traffic(GATHERED_HLO)["program"]
    reduce = 2 * 4 * 16 * 2 + 4 * 2 + 2 * 4 + 2 * 16 * 2  # gathered, x, indices, result
    gather = 3 * 8 * 4 + 10 * 4 + 10 * 8 * 4  # the table once, indices, result
    assert t["other"] == reduce + gather + 2 * (2 * 16 * 2)  # + the copy


def test_case_names():
    bench, own, extra, env = gpu_aot.parse_case("train:1b:flax:fast:cmdbuf")
    assert (bench, own, extra) == ("train", "1b:flax:fast", ["cmdbuf"])
    assert "xla_gpu_enable_command_buffer" in env["XLA_FLAGS"]
    assert gpu_aot.parse_case("decode:1b:flax:b64:while8")[:3] == (
        "decode",
        "1b:flax:b64",
        ["while8"],
    )
    for bad, says in [
        ("train:1b:hf-eager", "train:SHAPE:flax"),
        ("decode:1b:flax:64", "bBATCH"),
        ("decode:3b:flax:b1", "SHAPE one of"),
        ("decode:1b:flax:b64:nosuch", "nosuch"),
        ("eval:1b:flax", "train or decode"),
    ]:
        with pytest.raises(SystemExit, match=says):
            gpu_aot.parse_case(bad)
    # The default cases are the GPU suite's flax train/decode cases, every one a valid name.
    suite = gpu_aot.suite_cases()
    assert "train:1b:flax:fast:profile" in suite and "decode:1b:flax:b1" in suite
    assert not [c for c in suite if ":hf" in c]
    for case in suite:
        gpu_aot.parse_case(case)


def test_compiles_the_programs_the_benches_run():
    """gpu_aot's abstract arguments give the programs the benches run: compiled here for the
    CPU, the decode program's loop body is the one bench/decode.py compiles from real arrays,
    and the train step's buffers hold the state the bench creates."""
    cpu = jax.devices()
    compiled = gpu_aot.compile_decode("tiny:flax:b4", [], cpu)
    cfg, init, tokens, kw = flax_case("tiny", 4)
    # The matmuls `generate` picks on a CUDA GPU for 4 rows (Triton's gemms: cuBLAS from 64
    # rows), which is what gpu_aot compiles for — not this CPU's "auto", whatever the rows.
    fn, args = generate_program(cfg, tokens, rng=jax.random.PRNGKey(1), decode_gemm="xla", **kw)
    real = fn.lower(jax.jit(init)(jax.random.PRNGKey(0)), *args).compile().as_text()
    assert hlo_text.loop_body_ops(compiled.as_text()) == hlo_text.loop_body_ops(real)
    n = lambda c: sum(hlo_text.loop_body_ops(c.as_text()).values())  # noqa: E731
    # The options reach generate: cuBLAS concatenates the projections (fewer matmuls: the CPU
    # has no dot merger) unless told not to (then the CPU's program is Triton's, its compiler
    # option for GPUs ignored here).
    assert n(gpu_aot.compile_decode("tiny:flax:b4", ["cublas"], cpu)) < n(compiled)
    assert n(gpu_aot.compile_decode("tiny:flax:b4", ["cublas", "unfused"], cpu)) == n(compiled)

    train = gpu_aot.compile_train("tiny:flax", cpu)
    mem = gpu_aot._memory(train)
    assert mem["argument_gib"] > 0 and mem["fits"]
    assert mem["peak_gib"] >= mem["argument_gib"]


@pytest.mark.skipif(HAS_PLUGIN, reason="this environment has the CUDA plugin: see the live test")
def test_without_the_cuda_plugin_it_names_the_setup(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "flaxlm.bench.gpu_aot", "--out", str(tmp_path),
         "--cases", "decode:tiny:flax:b4"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert run.returncode != 0
    assert "make gpu-aot-venv" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "gpu_aot.jsonl").exists()


# The GPU image's jax first (`make gpu-image-venv`), else this jax with its plugin.
AOT_PY = next((p for p in (os.path.join(ROOT, v, "bin", "python")
                           for v in (".venv-gpu-image", ".venv-gpu-aot")) if os.path.exists(p)),
              "")  # fmt: skip


@pytest.mark.skipif(
    os.environ.get("FLAXLM_GPU_AOT") != "1" or not AOT_PY,
    reason="H200 compile: set FLAXLM_GPU_AOT=1 after `make gpu-image-venv` or `make "
    "gpu-aot-venv` (5.6 GB of CUDA libs)",
)
def test_live_h200_compile(tmp_path):
    cases = ["decode:tiny:flax:b4", "train:tiny:flax"]
    subprocess.run(
        [AOT_PY, "-m", "flaxlm.bench.gpu_aot", "--out", str(tmp_path), "--cases", ",".join(cases)],
        check=True, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    )  # fmt: skip
    recs = {r["case"]: r for r in map(json.loads, (tmp_path / "gpu_aot.jsonl").open())}
    assert set(recs) == set(cases)
    dec = recs["decode:tiny:flax:b4"]
    assert dec["target"] == "NVIDIA H200" and dec["loop_body_kernels"] > 0
    # XLA's default command buffers put the decode step in one CUDA graph; only the loop's
    # condition kernel launches alone.
    assert dec["launches"]["loop"]["graph_launches"] == 1
    assert dec["launches"]["loop"]["kernels"] >= dec["loop_body_kernels"]
    assert recs["train:tiny:flax"]["memory"]["argument_gib"] > 0
    assert np.isfinite(recs["train:tiny:flax"]["memory"]["peak_gib"])


# Compiles a Gemma-3-style model (mixed local/global layers, q/k norms, two RoPEs) for the H200:
# what runs where, which a CPU cannot show. Prints one JSON line.
MIXED_LAYERS = """
import json, jax, jax.numpy as jnp
from flaxlm.bench.gpu_aot import h200_devices
from flaxlm.models.config import get_variant
from flaxlm.models.decode import generate_program
from flaxlm.models.decode_attention import lowering_target
from flaxlm.models.transformer import Transformer
one = jax.sharding.SingleDeviceSharding(h200_devices()[0])
base = dict(vocab_size=1024, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64,
            d_ff=512, norm_placement="sandwich", norm_unit_offset=True, scale_embeddings=True,
            qk_norm="head", sliding_window=512, sliding_window_pattern=3, rope_local_theta=1e4,
            dtype="bfloat16", attention_impl="cudnn", max_seq_len=8192)
def abstract(cfg):
    p = jax.eval_shape(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32)),
                       jax.random.PRNGKey(0))["params"]
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), p)
out = {}
for name, kw, packed in (("unrolled", {}, False), ("scanned", {"scan_layers": True}, False),
                         ("scanned_masks", {"scan_layers": True}, True),
                         ("softcap", {"attn_logit_softcap": 50.0}, False)):
    cfg = get_variant("tiny", **{**base, **kw})
    def loss(p, t, cfg=cfg, packed=packed):
        seg = jnp.ones_like(t) if packed else None
        return Transformer(cfg).apply({"params": p}, t, None, seg).astype(jnp.float32).mean()
    toks = jax.ShapeDtypeStruct((8, 4096), jnp.int32, sharding=one)
    c = jax.jit(jax.grad(loss)).lower(abstract(cfg), toks).compile()
    out[name] = {"cudnn": c.as_text().count("__cudnn$fmha"),
                 "temp": c.memory_analysis().temp_size_in_bytes}
cfg = get_variant("tiny", **{**base, "attention_impl": "xla", "attn_logit_softcap": 50.0})
fn, args = generate_program(cfg, [[1] * 32] * 4, rng=jax.random.PRNGKey(0), max_new_tokens=32,
                            decode_attention="pallas")
args = [abstract(cfg)] + [jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype, sharding=one)
                          for x in args]
with lowering_target():
    out["pallas_softcap_triton"] = fn.lower(*args).compile().as_text().count(
        "__gpu$xla.gpu.triton")
# Decoding past the window (256 + 1024 tokens, W=512): with and without the local layers' rings
cfg = get_variant("tiny", **base)
for ring in (False, True):
    fn, args = generate_program(cfg, [[1] * 256] * 8, rng=jax.random.PRNGKey(0),
                                max_new_tokens=1024, decode_attention="pallas", window_cache=ring)
    args = [abstract(cfg)] + [jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype,
                                                   sharding=one) for x in args]
    with lowering_target():
        c = fn.lower(*args).compile()
    out[f"decode_rings_{ring}"] = {"triton": c.as_text().count("__gpu$xla.gpu.triton"),
                                   "cudnn": c.as_text().count("__cudnn$fmha"),
                                   "temp": c.memory_analysis().temp_size_in_bytes}
print(json.dumps(out))
"""


@pytest.mark.skipif(
    os.environ.get("FLAXLM_GPU_AOT") != "1" or not AOT_PY,
    reason="H200 compile: set FLAXLM_GPU_AOT=1 after `make gpu-image-venv` or `make "
    "gpu-aot-venv` (5.6 GB of CUDA libs)",
)
def test_live_h200_compile_of_mixed_local_and_global_layers():
    """Unrolled: one cuDNN kernel per layer and direction (its own window each); scanned: the
    local and the global kernel in the loop body (lax.cond), without the (B, T, T) masks an
    elementwise selection needs (less temporary memory); soft-capping: the XLA path (cuDNN
    has none) in blocks of query rows; the Pallas decode kernel with a soft-cap compiles for
    every layer; decoding past the window, the kernel runs in every layer over full caches
    and over the local layers' rings alike, the prefill is one cuDNN kernel per layer, and the
    rings take less memory."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([AOT_PY, "-c", MIXED_LAYERS], capture_output=True, text=True,
                         env={**env, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["unrolled"]["cudnn"] == 2 * 6 and got["scanned"]["cudnn"] == 2 * 2
    assert got["scanned_masks"]["cudnn"] == 2 and got["softcap"]["cudnn"] == 0
    assert got["scanned"]["temp"] < got["scanned_masks"]["temp"]
    # soft-capped: XLA attention in remat'd blocks of query rows, not (B, N, T, T) scores
    # (2.40 GiB where the whole-sequence XLA attention needed 29.5)
    assert got["softcap"]["temp"] < 2 * got["unrolled"]["temp"]
    assert got["pallas_softcap_triton"] == 6
    full, rings = got["decode_rings_False"], got["decode_rings_True"]
    assert full["triton"] == rings["triton"] == 6 and full["cudnn"] == rings["cudnn"] == 6
    assert rings["temp"] < full["temp"]
