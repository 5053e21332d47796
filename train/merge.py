"""Checkpoint averaging and model merging: several checkpoints of one model in, one run out.

    python -m flaxlm.train.merge runs/pt --last 5 --out runs/pt_avg            # LAWA
    python -m flaxlm.train.merge runs/sft_a runs/sft_b@800 --weights 2,1 --out runs/soup
    python -m flaxlm.train.merge runs/sft_a runs/sft_b --method task_arithmetic \\
        --base runs/pt --scale 0.5 --out runs/ta
    python -m flaxlm.train.merge runs/sft_a runs/sft_b runs/sft_c --method ties --base runs/pt \\
        --density 0.2 --out runs/ties
    python -m flaxlm.train.merge runs/sft_a runs/sft_b --method slerp --t 0.3 --out runs/slerp
    python -m flaxlm.train.merge hf:~/Llama-3.2-1B-Instruct hf:~/my-llama-ft \\
        --method task_arithmetic --base hf:~/Llama-3.2-1B --out runs/ta_hf

Inputs are `RUN[@STEP]` (a run directory; its latest step without @STEP) or `hf:DIR` (a Hugging
Face checkpoint directory, as `init_from=hf:DIR` names one: read as its import, `python -m
flaxlm.models.hf import`, would be, without writing one), and so is `--base`; runs and HF
checkpoints mix when they are the same model. `--last N` takes each RUN's N newest steps
(checkpoint averaging: LAWA, Sanyal et al. 2023; the average of the last checkpoints of an
annealing phase, as Llama 3 did); `--ema` reads every input's EMA weights (train/ema.py; an
input without one, an HF checkpoint too, is an error; `--base` is always read as its params).
Methods (the formulas: train/merge_math.py):
    mean              (default) Σ w_i θ_i; `--weights w1,w2,...` (>= 0) are normalised to sum
                      to 1 (`--weights 2,1` is 2/3, 1/3), equal weights by default
    task_arithmetic   θ_base + λ Σ_t w_t (θ_t − θ_base) (Ilharco et al. 2023): `--base`,
                      `--scale` λ (default 1), `--weights` w_t (not normalised, default 1)
    ties              TIES-merging (Yadav et al. 2023): `--base`, `--density` k (default 0.2,
                      the paper's top 20 %) trimmed per tensor, `--scale` λ (default 1)
    slerp             two inputs, spherical interpolation per tensor at `--t` (default 0.5),
                      linear where the two are nearly colinear (merge_math.SLERP_COLINEAR)
Every input (and the base) must be the same model: the same model config but for the
execution-only keys (train/checkpoint_compat.py; an HF checkpoint's is the one flaxlm derives
from its config.json, models/hf_config.py), the same saved tensor shapes and the same tokenizer
(its vocabulary file byte for byte: a run's tokenizer.model or tokenizer.json against the one
an HF directory's tokenizer is read from, models/hf_tokenizer.py `tokenizer_file`); a
difference is an error naming the input and the key, tensor or file. A LoRA run is read with
its adapters merged into its base weights (as every reader does, models/lora.py `merge`), a PPO
run as its policy; a reward model (scalar head) is refused; an hf:DIR that is missing, is not
an HF checkpoint or is of an architecture flaxlm does not build is an error naming it.

Output: `--out DIR`, a run directory as `python -m flaxlm.models.hf import` writes one: one
checkpoint, step 0, whose state holds the merged params only (no optimizer state), the data
item empty, and a meta with the model config (the first input's), task "merge", the tokenizer
copied into DIR (the first input's, with its chat-template files; an HF input's tokenizer files
as its import copies them, its config.json's stop ids included), the first input's
chat-template variables, the HF architecture when the inputs that name one agree (export's
default), and `merge` (also written to DIR/merge.json and printed): the inputs with their steps
(an HF input: "hf:DIR", step null), the method and its parameters, the flaxlm version and
commit, and whether the inputs were tuned on chats (evaluation's --chat auto follows it; an HF
input counts as its import does: not). Everything that reads a
run reads it unchanged: `load_params`/`load_model`, `init_from=DIR` (any stage),
`python -m flaxlm.evaluation --checkpoint DIR`, `python -m flaxlm.generate DIR`,
`python -m flaxlm.models.hf export DIR`. It is not a training run to resume: its meta's task
"merge" makes a training run pointed at DIR as its workdir refuse it (another run's
checkpoint); start from it with init_from. DIR must not exist or be empty; the run is written
into a temporary sibling directory renamed into place, so a failure leaves nothing.

Memory: the tensors are read in groups of at most `--chunk_mb` MB (float32; a larger tensor
alone), each input's group on its own (`load_params`' partial read; an HF input's tensors of the
group from its memory-mapped safetensors shards, the rest of its tensors checked from the
headers unread, models/hf_weights.py `read_params(only=...)`; a fused HF weight, Phi-3's
qkv_proj, is read whole by each group that holds a part of it): mean and task arithmetic
hold a float32 running sum of the group, one input's group and (task arithmetic) the base's;
SLERP two groups; TIES needs every task vector of a tensor at once, so it holds all N inputs'
groups (N + 1 groups in float32). The merged params (in the params' dtype) build up to one
whole model, on the devices: `--mesh fsdp=-1` (flaxlm/cli_mesh.py) splits the reads and the
result over the local devices as for evaluation; the result does not depend on the mesh (mean
and task arithmetic bitwise; TIES and SLERP up to the float rounding of their reductions).
One process only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp

from flaxlm.train import merge_math
from flaxlm.train.merge_inputs import MergeError, Source, flat, nest, read

log = logging.getLogger("flaxlm")

METHODS = ("mean", "task_arithmetic", "ties", "slerp")
WEIGHTED = ("mean", "task_arithmetic")  # the methods that weigh their inputs (--weights)
STEP = 0  # the merged run's one checkpoint step (an import's too): not a point of a training run


def model_target(src: Source, mesh=None, rules=None):
    """ShapeDtypeStructs (with shardings: one device, or `mesh`'s per the logical `rules`) of
    the params of `src`'s model config, as load_model builds them."""
    from flaxlm.models.config import ModelConfig
    from flaxlm.train.checkpoint_read import lm_params_target

    return lm_params_target(ModelConfig.from_dict(src.meta["model_config"]), mesh, rules,
                            src.label)  # fmt: skip


def chunks(target, max_bytes: int) -> list[list[tuple]]:
    """The (path, ShapeDtypeStruct) of `target` in groups of at most `max_bytes` of float32 (a
    bigger tensor alone), in the tree's order."""
    out, size = [[]], 0
    for path, s in flat(target).items():
        n = 4 * max(1, s.size)
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append((path, s))
        size += n
    return out


def _check_args(method, sources, base, weights, scale, density, t) -> list[float]:
    """The weights each input gets (normalised for mean); MergeError for arguments the method
    does not take or values out of range."""
    n = len(sources)
    given = {"--base": base is not None, "--scale": scale is not None,
             "--density": density is not None, "--t": t is not None,
             "--weights": weights is not None}  # fmt: skip
    takes = {"mean": {"--weights"}, "task_arithmetic": {"--base", "--scale", "--weights"},
             "ties": {"--base", "--scale", "--density"}, "slerp": {"--t"}}[method]  # fmt: skip
    extra = [k for k, v in given.items() if v and k not in takes]
    if extra:
        raise MergeError(f"--method {method} takes no {', '.join(extra)} (it takes "
                         f"{', '.join(sorted(takes))})")  # fmt: skip
    if method in ("task_arithmetic", "ties") and base is None:
        raise MergeError(f"--method {method} needs --base RUN[@STEP] (or hf:DIR), the model the "
                         "inputs were fine-tuned from")  # fmt: skip
    if method == "slerp" and n != 2:
        raise MergeError(f"--method slerp merges exactly two checkpoints; got {n}")
    if n < (2 if method == "mean" else 1):
        raise MergeError(f"--method {method}: too few checkpoints to merge ({n})")
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"--density {density}: the share of each task vector kept, in (0, 1]")
    if scale is not None and not math.isfinite(scale):
        raise MergeError(f"--scale {scale}: not finite")
    if t is not None and not 0 <= t <= 1:
        raise MergeError(f"--t {t}: the interpolation point, in [0, 1] (0: the first input)")
    if weights is None:
        return [1.0 / n] * n if method == "mean" else [1.0] * n
    if len(weights) != n:
        raise MergeError(f"--weights: {len(weights)} weight(s) for {n} checkpoint(s) "
                         f"({', '.join(s.label for s in sources)})")  # fmt: skip
    if any(not math.isfinite(w) for w in weights):
        raise MergeError(f"--weights {weights}: not finite")
    if method == "mean":
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise MergeError(f"--weights {weights}: a mean's weights are >= 0 with a positive "
                             "sum (negative ones: --method task_arithmetic)")  # fmt: skip
        return [w / sum(weights) for w in weights]
    return list(weights)


def combine(method, sources, base, target, weights, scale, density, t, chunk_bytes):
    """(merged params in `target`'s dtypes and shardings, the paths SLERP took linearly)."""
    out, linear = {}, []
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    for group in chunks(target, chunk_bytes):
        sub = nest(group)
        if method == "mean":
            acc = None
            for w, src in zip(weights, sources):  # one input's group at a time
                got = read(src, sub, target)
                acc = {p: w * f32(x) if acc is None else acc[p] + w * f32(x)
                       for p, x in got.items()}  # fmt: skip
                del got
            merged = acc
        elif method == "task_arithmetic":
            b = {p: f32(x) for p, x in read(base, sub, target).items()}
            acc = {p: jnp.zeros_like(x) for p, x in b.items()}
            for w, src in zip(weights, sources):
                acc = {p: acc[p] + w * (f32(x) - b[p]) for p, x in read(src, sub, target).items()}
            merged = {p: b[p] + scale * acc[p] for p in b}
        elif method == "ties":
            b = {p: f32(x) for p, x in read(base, sub, target).items()}
            taus = [{p: f32(x) - b[p] for p, x in read(src, sub, target).items()}
                    for src in sources]  # fmt: skip
            merged = {p: merge_math.ties(b[p], [tau[p] for tau in taus], density, scale)
                      for p in b}  # fmt: skip
        else:  # slerp
            a, z = (read(src, sub, target) for src in sources)
            merged = {}
            for p in a:
                merged[p], lin = merge_math.slerp(t, f32(a[p]), f32(z[p]))
                if bool(lin):
                    linear.append("/".join(p))
        for path, s in group:
            out[path] = jax.device_put(merged[path].astype(s.dtype), s.sharding)
    return nest(out.items()), linear


def _check_out(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        raise MergeError(f"--out {out} exists and is not empty; merge into a new directory")
    return out


def _remove_leftovers(out: str) -> None:
    """Deletes what a merge into `out` killed part way left beside it (`.NAME.merge-tmp-*`)."""
    parent, name = os.path.split(out)
    for d in os.listdir(parent):
        if d.startswith(f".{name}.merge-tmp-"):
            log.warning("merge: removing %s, left by a merge that was interrupted",
                        os.path.join(parent, d))  # fmt: skip
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)


def _copy_tokenizer(first: Source, tmp: str, out: str) -> str:
    """Copies the first input's tokenizer into `tmp`; returns its path once renamed to `out`.
    An HF tokenizer.json comes with its directory's tokenizer files (chat templates, stop
    ids), and so does a tokenizer.model that is the run's own copy; another .model alone."""
    from flaxlm.models.hf_tokenizer import copy_tokenizer, tokenizer_file

    tok = first.meta["tokenizer"]
    inside = os.path.commonpath([os.path.abspath(tok), first.run]) == first.run
    if os.path.isdir(tok):
        copy_tokenizer(tok, tmp)
        return os.path.join(out, os.path.basename(tokenizer_file(tok) or tok))
    copy_tokenizer(os.path.dirname(tok) if inside or tok.endswith(".json") else tok, tmp)
    return os.path.join(out, os.path.basename(tok))


def _write(out: str, params, meta: dict, record: dict, first: Source) -> None:
    """Writes the run into a temporary sibling of `out`, then renames it into place."""
    from flaxlm.train.checkpoint import Checkpointer

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.merge-tmp-", dir=parent)
    try:
        if meta.get("tokenizer"):
            meta = {**meta, "tokenizer": _copy_tokenizer(first, tmp, out)}
        ckpt = Checkpointer(tmp, keep=1, async_save=False)
        ckpt.save(STEP, {"params": params}, {}, meta)
        ckpt.wait()
        ckpt.close()
        with open(os.path.join(tmp, "merge.json"), "w") as f:
            json.dump(record, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # (mkdtemp's 0700: a merged model is shared)
        if os.path.isdir(out):  # empty (`_check_out`)
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _same_or_none(values):
    values = {json.dumps(v, sort_keys=True) for v in values if v}
    return json.loads(values.pop()) if len(values) == 1 else None


def merge(inputs: list[str], out: str, method: str = "mean", *, last: int | None = None,
          ema: bool = False, base: str | None = None, weights: list[float] | None = None,
          scale: float | None = None, density: float | None = None, t: float | None = None,
          chunk_mb: float = 1024, mesh=None, rules=None) -> dict:  # fmt: skip
    """Merges the checkpoints `inputs` (RUN[@STEP], hf:DIR) by `method` into the new run `out`
    (module docstring); returns the record written to its meta and merge.json."""
    from flaxlm import __version__
    from flaxlm.evaluation.__main__ import trained_on_chats
    from flaxlm.train import merge_inputs
    from flaxlm.train.code_version import code_commit

    if method not in METHODS:
        raise MergeError(f"--method {method!r}: one of {', '.join(METHODS)}")
    if jax.process_count() > 1:
        raise MergeError("merge runs as one process (--mesh splits it over its local devices)")
    if last is not None and last < 1:
        raise MergeError(f"--last {last}: at least 1")
    if not chunk_mb > 0:
        raise MergeError(f"--chunk_mb {chunk_mb}: more than 0")
    out = _check_out(out)
    sources = merge_inputs.resolve(list(inputs), last, ema)
    base_src = None
    if base is not None:
        base_src = merge_inputs.argument(base, ema=False)
    weights = _check_args(method, sources, base_src, weights, scale, density, t)
    target = model_target(sources[0], mesh, rules)
    everyone = sources + ([base_src] if base_src else [])
    merge_inputs.check_compatible(everyone, target)
    if method == "ties" and density is None:
        density = 0.2
    if method in ("task_arithmetic", "ties") and scale is None:
        scale = 1.0
    if method == "slerp" and t is None:
        t = 0.5
    params, linear = combine(method, sources, base_src, target, weights, scale, density, t,
                             int(chunk_mb * 2**20))  # fmt: skip
    slerp_record = {"t": t, "colinear_threshold": merge_math.SLERP_COLINEAR,
                    "linear_tensors": linear}  # fmt: skip
    record = {
        "method": method,
        "inputs": [
            {**s.record(), **({"weight": w} if method in WEIGHTED else {})}
            for s, w in zip(sources, weights)
        ],  # fmt: skip
        "base": base_src.record() if base_src else None,
        **({"scale": scale} if scale is not None else {}),
        **({"density": density} if density is not None else {}),
        **(slerp_record if method == "slerp" else {}),
        "trained_on_chats": any(trained_on_chats(s.meta) for s in sources),
        "flaxlm_version": __version__,
        **code_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    first = sources[0]
    meta = {"task": "merge", "head": "lm", "lora": {}, "model_config": first.meta["model_config"],
            "merge": record}  # fmt: skip
    if first.meta.get("tokenizer"):
        meta["tokenizer"] = first.meta["tokenizer"]  # (the copy's path: `_write`)
    kwargs = [s.meta.get("chat_template_kwargs") for s in sources]
    if kwargs[0]:
        meta["chat_template_kwargs"] = kwargs[0]
    if any(k != kwargs[0] for k in kwargs):
        log.warning("merge: the inputs' chat-template variables differ (%s); the merged run "
                    "takes the first's, %s", kwargs, kwargs[0])  # fmt: skip
    arch = _same_or_none(s.meta.get("hf_arch") for s in everyone)
    if arch:
        meta["hf_arch"] = arch  # (export's default architecture)
    _write(out, params, meta, record, first)
    return record


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flaxlm.train.merge",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))  # fmt: skip
    p.add_argument("inputs", nargs="+", metavar="RUN[@STEP]|hf:DIR",
                   help="run directories (their latest step, or STEP), HF checkpoint "
                   "directories")  # fmt: skip
    p.add_argument("--out", required=True, help="the merged run's directory (new or empty)")
    p.add_argument("--method", default="mean", choices=METHODS)
    p.add_argument("--last", type=int, default=None,
                   help="each RUN's N newest steps (checkpoint averaging)")  # fmt: skip
    p.add_argument("--ema", action="store_true", help="the inputs' EMA weights (not --base's)")
    p.add_argument("--base", default=None, metavar="RUN[@STEP]|hf:DIR",
                   help="task_arithmetic, ties: the model the inputs were tuned from")  # fmt: skip
    p.add_argument("--weights", type=_floats, default=None,
                   help="w1,w2,...: mean (normalised), task_arithmetic (per task)")  # fmt: skip
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="task_arithmetic, ties: λ, the task vectors' scale (default 1)",
    )
    p.add_argument("--density", type=float, default=None,
                   help="ties: share of each task vector's entries kept per tensor (default "
                   "0.2)")  # fmt: skip
    p.add_argument("--t", type=float, default=None,
                   help="slerp: 0 the first input, 1 the second (default 0.5)")  # fmt: skip
    p.add_argument("--chunk_mb", type=float, default=1024,
                   help="tensors read per pass per input, in MB of float32")  # fmt: skip
    p.add_argument("--mesh", default="", help="split over local devices, e.g. fsdp=-1")
    p.add_argument("--sharding", default="fsdp", choices=("dp", "fsdp", "fsdp_tp"),
                   help="logical-rules preset for --mesh")  # fmt: skip
    return p


def _named(entry: dict) -> str:
    """An input as the record names it: RUN@STEP, or hf:DIR (which has no step)."""
    return entry["run"] if entry["step"] is None else f"{entry['run']}@{entry['step']}"


def main(argv: list[str] | None = None) -> dict:
    from flaxlm.train.checkpoint import CheckpointError
    from flaxlm.train.checkpoint_orbax import quiet_orbax_logs

    p = _parser()
    a = p.parse_args(argv)
    quiet_orbax_logs()
    mesh = rules = None
    if a.mesh:
        from flaxlm.cli_mesh import build_mesh

        try:
            mesh, rules = build_mesh(a.mesh, a.sharding)
        except (ValueError, KeyError) as e:
            p.error(f"{e.args[0] if e.args else e} (--mesh {a.mesh})")
    try:
        record = merge(a.inputs, a.out, a.method, last=a.last, ema=a.ema, base=a.base,
                       weights=a.weights, scale=a.scale, density=a.density, t=a.t,
                       chunk_mb=a.chunk_mb, mesh=mesh, rules=rules)  # fmt: skip
    except (MergeError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"merged {len(record['inputs'])} checkpoint(s) by {a.method} -> "
          f"{os.path.abspath(a.out)}")  # fmt: skip
    for i in record["inputs"]:
        weight = f"  weight {i['weight']:.6g}" if "weight" in i else ""
        print(f"  {_named(i)}{' (EMA)' if i['ema'] else ''}{weight}")
    if record["base"]:
        print(f"  base {_named(record['base'])}")
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
