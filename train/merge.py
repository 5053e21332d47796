"""Checkpoint averaging and model merging: several checkpoints of one model in, one run out.

    python -m flaxlm.train.merge runs/pt --last 5 --out runs/pt_avg            # LAWA
    python -m flaxlm.train.merge runs/sft_a runs/sft_b@800 --weights 2,1 --out runs/soup
    python -m flaxlm.train.merge runs/sft_a runs/sft_b --method task_arithmetic \\
        --base runs/pt --scale 0.5 --out runs/ta
    python -m flaxlm.train.merge runs/sft_a runs/sft_b runs/sft_c --method ties --base runs/pt \\
        --density 0.2 --out runs/ties           # --ties_scope global: over the whole vector
    python -m flaxlm.train.merge runs/sft_a runs/sft_b --method dare_ties --base runs/pt \\
        --density 0.3 --seed 1 --out runs/dare  # or dare_linear (--weights, as task_arithmetic)
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
                      the paper's top 20 %), `--scale` λ (default 1); `--ties_scope tensor`
                      (default, as mergekit) trims each tensor to its top k and takes the
                      majority sign of a zero-sum entry per tensor, `global` (the paper's) over
                      each whole task vector, exactly, in three more passes over the inputs
    dare_linear       DARE (Yu et al. 2024): each task vector's entries dropped with
                      probability 1 − p and the kept ones scaled by 1/p (`--density` p, default
                      0.2), then task arithmetic: `--base`, `--scale`, `--weights`, `--seed`
    dare_ties         DARE's drop and rescale, then TIES' sign election and disjoint mean (no
                      magnitude trim): `--base`, `--density`, `--scale`, `--seed`,
                      `--ties_scope` (of the majority sign; global: one more pass)
    slerp             two inputs, spherical interpolation per tensor at `--t` (default 0.5),
                      linear where the two are nearly colinear (merge_math.SLERP_COLINEAR)
Every input (and the base) must be the same model: the same model config but for the
execution-only keys (train/checkpoint_compat.py; an HF checkpoint's is the one flaxlm derives
from its config.json, models/hf_config.py) and `param_dtype` (a float32 fine-tune merges with
the bfloat16 or float16 HF checkpoint it started from: inputs of different dtypes are all read
in float32, and the result is stored in the first input's), the same saved tensor shapes and the
same tokenizer (its vocabulary file byte for byte: a run's tokenizer.model or tokenizer.json
against the one an HF directory's tokenizer is read from, models/hf_tokenizer.py
`tokenizer_file`); a difference is an error naming the input and the key, tensor or file. A LoRA
run is read with its adapters merged into its base weights (as every reader does, models/lora.py
`merge`), a PPO run as its policy; a reward model (scalar head) is refused; an hf:DIR that is
missing, is not an HF checkpoint or is of an architecture flaxlm does not build is an error
naming it.
A flag the method does not take (`--seed` but for dare_*, `--ties_scope` but for ties and
dare_ties, ...), a missing `--base`, or a value out of range (`--density` outside (0, 1], a
`--seed` outside [0, 2^32)) is an error naming the flag, before any tensor is read.

DARE's masks (merge_math.py, `dare_key`): each tensor's is drawn from (`--seed`, the input's
index in the inputs, the tensor's path) alone, by jax.random on the devices that hold it: the
same seed gives the same merge whatever `--chunk_mb`, the mesh or the order of the reads (and
dare_linear and dare_ties drop the same entries); reordering the inputs changes them.

Output: `--out DIR`, a run directory as `python -m flaxlm.models.hf import` writes one: one
checkpoint, step 0, whose state holds the merged params only (no optimizer state), the data
item empty, and a meta with the model config (the first input's), task "merge", the tokenizer
copied into DIR (the first input's, with its chat-template files; an HF input's tokenizer files
as its import copies them, its config.json's stop ids included), the first input's
chat-template variables, the HF architecture when the inputs that name one agree (export's
default), and `merge` (also written to DIR/merge.json and printed): the inputs with their steps
(an HF input: "hf:DIR", step null), the method and its parameters (defaults included: DARE's
seed and how its masks are drawn, TIES' scope; global TIES each input's threshold |τ| and the
majority sign), the flaxlm version and
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
SLERP two groups; TIES and dare_ties need every task vector of a tensor at once, so they hold
all N inputs' groups (N + 1 groups in float32); dare_linear as task arithmetic. `--ties_scope
global` first reads every input through (a group at a time, as above) to find what the merge of
any group needs of the whole task vectors: ties each input's threshold, the m-th largest |τ| of
all its entries, exact, by radix selection on the float32 bit patterns (two passes counting
them in 2^16 bins per input; merge_math.KthMagnitude), then (ties, dare_ties) the majority sign
(one pass): the inputs are read 4 times (ties) or 2 times (dare_ties) in all. The merged params
(in the params' dtype) build up to one whole model, on the devices: `--mesh fsdp=-1`
(flaxlm/cli_mesh.py) splits the reads and the result over the local devices as for
evaluation; the result does not depend on the mesh nor on `--chunk_mb`, bitwise (SLERP under a
mesh: up to the float rounding of its norms, reductions over the split tensors). One process.
"""

from __future__ import annotations

import argparse
import dataclasses
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

METHODS = ("mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
WEIGHTED = ("mean", "task_arithmetic", "dare_linear")  # they weigh their inputs (--weights)
DARE = ("dare_linear", "dare_ties")  # drop and rescale each task vector (--seed)
ELECTED = ("ties", "dare_ties")  # TIES' sign election and disjoint merge (--ties_scope)
SCOPES = ("tensor", "global")
# The flags each method takes; any other one given is an error naming it.
TAKES = {
    "mean": {"--weights"},
    "task_arithmetic": {"--base", "--scale", "--weights"},
    "ties": {"--base", "--scale", "--density", "--ties_scope"},
    "dare_linear": {"--base", "--scale", "--weights", "--density", "--seed"},
    "dare_ties": {"--base", "--scale", "--density", "--seed", "--ties_scope"},
    "slerp": {"--t"},
}
DEFAULT_DENSITY = 0.2  # TIES' paper's top 20 %; DARE's too (a drop rate of 0.8)
DARE_RNG = ("jax.random.bernoulli(density), threefry2x32 key(seed) folded with the input's "
            "index and crc32 of the tensor path, threefry_partitionable")  # fmt: skip
STEP = 0  # the merged run's one checkpoint step (an import's too): not a point of a training run


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A method and its parameters, defaults filled in; None: a parameter it does not take."""

    method: str
    weights: list[float]  # each input's (mean: normalised)
    scale: float | None = None
    density: float | None = None
    t: float | None = None
    seed: int | None = None
    scope: str | None = None  # ties, dare_ties: "tensor" or "global"


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


def _check_flags(method, sources, base, given: dict) -> None:
    """MergeError for a flag `method` does not take, a missing --base, a wrong input count."""
    n, takes = len(sources), TAKES[method]
    extra = [k for k, v in given.items() if v is not None and k not in takes]
    if extra:
        raise MergeError(f"--method {method} takes no {', '.join(extra)} (it takes "
                         f"{', '.join(sorted(takes))})")  # fmt: skip
    if "--base" in takes and base is None:
        raise MergeError(f"--method {method} needs --base RUN[@STEP] (or hf:DIR), the model the "
                         "inputs were fine-tuned from")  # fmt: skip
    if method == "slerp" and n != 2:
        raise MergeError(f"--method slerp merges exactly two checkpoints; got {n}")
    if n < (2 if method == "mean" else 1):
        raise MergeError(f"--method {method}: too few checkpoints to merge ({n})")


def _check_values(density, scale, t, seed, scope) -> None:
    """MergeError, naming the flag, for a value out of its range."""
    if density is not None and not 0 < density <= 1:
        raise MergeError(f"--density {density}: the share of each task vector kept, in (0, 1]")
    if scale is not None and not math.isfinite(scale):
        raise MergeError(f"--scale {scale}: not finite")
    if t is not None and not 0 <= t <= 1:
        raise MergeError(f"--t {t}: the interpolation point, in [0, 1] (0: the first input)")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**32):  # (jax: 32 bits)
        raise MergeError(f"--seed {seed}: DARE's seed, an integer in [0, 2^32)")
    if scope is not None and scope not in SCOPES:
        raise MergeError(f"--ties_scope {scope!r}: one of {', '.join(SCOPES)}")


def _check_weights(method, sources, weights) -> list[float]:
    """The weights each input gets (normalised for mean)."""
    n = len(sources)
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


def _check_args(method, sources, base, weights=None, scale=None, density=None, t=None,
                seed=None, scope=None) -> Recipe:  # fmt: skip
    """The Recipe (defaults filled in) of the arguments; MergeError, naming the flag, for one
    the method does not take or a value out of range. Reads no array."""
    given = {"--base": base, "--scale": scale, "--density": density, "--t": t,
             "--weights": weights, "--seed": seed, "--ties_scope": scope}  # fmt: skip
    _check_flags(method, sources, base, given)
    _check_values(density, scale, t, seed, scope)
    takes = TAKES[method]

    def default(flag, value, fallback):  # (a flag the method does not take stays None)
        return fallback if flag in takes and value is None else value

    return Recipe(method, _check_weights(method, sources, weights),
                  scale=default("--scale", scale, 1.0),
                  density=default("--density", density, DEFAULT_DENSITY),
                  t=default("--t", t, 0.5), seed=default("--seed", seed, 0),
                  scope=default("--ties_scope", scope, "tensor"))  # fmt: skip


# --- the merge, a group of tensors at a time ----------------------------------------------------
def _f32(x):
    return x.astype(jnp.float32)


def _read_f32(src, sub, target) -> dict:
    return {p: _f32(x) for p, x in read(src, sub, target).items()}


def _task_vector(src, b, sub, target) -> dict:
    """{path: τ = θ − θ_base} of `src`'s group `sub`, `b` the base's group (float32)."""
    return {p: _f32(x) - b[p] for p, x in read(src, sub, target).items()}


def _sparsifier(recipe: Recipe, thresholds=None):
    """(input index, path, τ) -> the τ a method combines: TIES' trim (per tensor, or at the
    input's whole-vector `thresholds`), DARE's drop and rescale, or τ itself."""
    if recipe.method == "ties" and thresholds is not None:
        return lambda i, path, tau: merge_math.trim_at(tau, thresholds[i])
    if recipe.method == "ties":
        return lambda i, path, tau: merge_math.trim(tau, recipe.density)
    if recipe.method in DARE:
        return lambda i, path, tau: merge_math.dare(
            tau, merge_math.dare_key(recipe.seed, i, path), recipe.density
        )
    return lambda i, path, tau: tau


def _sparse_task_vectors(sources, base, sub, target, sparse) -> tuple[dict, list[dict]]:
    """(the base's group, each input's sparsified task vector of the group): N + 1 groups."""
    b = _read_f32(base, sub, target)
    taus = [{p: sparse(i, p, x) for p, x in _task_vector(src, b, sub, target).items()}
            for i, src in enumerate(sources)]  # fmt: skip
    return b, taus


def _mean_group(recipe, sources, sub, target) -> dict:
    acc = None
    for w, src in zip(recipe.weights, sources):  # one input's group at a time
        got = read(src, sub, target)
        acc = {p: w * _f32(x) if acc is None else acc[p] + w * _f32(x) for p, x in got.items()}
        del got
    return acc


def _linear_group(recipe, sources, base, sub, target, sparse) -> dict:
    """task_arithmetic, dare_linear: θ_base + λ Σ_t w_t τ_t, one input's group at a time."""
    b = _read_f32(base, sub, target)
    acc = {p: jnp.zeros_like(x) for p, x in b.items()}
    for i, (w, src) in enumerate(zip(recipe.weights, sources)):
        tau = _task_vector(src, b, sub, target)
        acc = {p: acc[p] + w * sparse(i, p, tau[p]) for p in acc}
    return {p: b[p] + recipe.scale * acc[p] for p in b}


def _elected_group(recipe, sources, base, sub, target, sparse, majority) -> dict:
    """ties, dare_ties: every input's group at once (the election is per entry over them)."""
    b, taus = _sparse_task_vectors(sources, base, sub, target, sparse)
    return {p: merge_math.elect_and_merge(b[p], [tau[p] for tau in taus], recipe.scale,
                                          majority)
            for p in b}  # fmt: skip


def _slerp_group(recipe, sources, sub, target) -> tuple[dict, list[str]]:
    a, z = (read(src, sub, target) for src in sources)
    merged, linear = {}, []
    for p in a:
        merged[p], lin = merge_math.slerp(recipe.t, _f32(a[p]), _f32(z[p]))
        if bool(lin):
            linear.append("/".join(p))
    return merged, linear


def combine(recipe: Recipe, sources, base, target, chunk_bytes, thresholds=None, majority=None):
    """(merged params in `target`'s dtypes and shardings, the paths SLERP took linearly).
    `thresholds` (ties) and `majority` (ties, dare_ties): `--ties_scope global`'s statistics
    of the whole task vectors (`global_thresholds`, `global_majority`); None: per tensor."""
    out, linear = {}, []
    sparse = _sparsifier(recipe, thresholds)
    for group in chunks(target, chunk_bytes):
        sub = nest(group)
        if recipe.method == "mean":
            merged = _mean_group(recipe, sources, sub, target)
        elif recipe.method in ("task_arithmetic", "dare_linear"):
            merged = _linear_group(recipe, sources, base, sub, target, sparse)
        elif recipe.method in ELECTED:
            merged = _elected_group(recipe, sources, base, sub, target, sparse, majority)
        else:
            merged, lin = _slerp_group(recipe, sources, sub, target)
            linear += lin
        for path, s in group:
            out[path] = jax.device_put(merged[path].astype(s.dtype), s.sharding)
    return nest(out.items()), linear


# --- --ties_scope global: the whole task vectors' statistics, in passes of their own ------------
def _every_task_vector(sources, base, target, chunk_bytes):
    """(input index, path, τ) of every tensor of every input: one pass over the checkpoints,
    a group at a time, one input's group (and the base's) in memory."""
    for group in chunks(target, chunk_bytes):
        sub = nest(group)
        b = _read_f32(base, sub, target)
        for i, src in enumerate(sources):
            for path, tau in _task_vector(src, b, sub, target).items():
                yield i, path, tau


def global_thresholds(sources, base, target, density, chunk_bytes) -> list[float | None]:
    """Each input's TIES threshold over its whole task vector: the m-th largest |τ| over all
    its tensors, m = trim_count(the model's size, density), exact (merge_math.KthMagnitude:
    two passes over the checkpoints, 2^16 counts per input); None for density 1 (all kept)."""
    if density >= 1:
        return [None] * len(sources)
    size = sum(s.size for s in flat(target).values())
    found = [merge_math.KthMagnitude(merge_math.trim_count(size, density)) for _ in sources]
    for k in range(merge_math.KthMagnitude.PASSES):
        log.info("merge: --ties_scope global: thresholds, pass %d of %d", k + 1,
                 merge_math.KthMagnitude.PASSES)  # fmt: skip
        for i, _, tau in _every_task_vector(sources, base, target, chunk_bytes):
            found[i].add(tau)
        for f in found:
            f.end_pass()
    return [f.value for f in found]


def global_majority(recipe, sources, base, target, chunk_bytes, thresholds=None) -> int:
    """Σ γ over every entry of the model (merge_math.sign_mass): the sign an entry whose
    Σ_t τ̂_t is exactly 0 takes under `--ties_scope global`; one pass (N + 1 groups held)."""
    log.info("merge: --ties_scope global: the majority sign, one pass")
    sparse, total = _sparsifier(recipe, thresholds), 0
    for group in chunks(target, chunk_bytes):
        b, taus = _sparse_task_vectors(sources, base, nest(group), target, sparse)
        total += sum(merge_math.sign_mass(jnp.stack([tau[p] for tau in taus])) for p in b)
    return total


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


def _whole_vector_stats(recipe, sources, base, target, chunk_bytes):
    """(thresholds, majority) of `--ties_scope global` (None, None for any other merge)."""
    if recipe.scope != "global":
        return None, None
    thresholds = None
    if recipe.method == "ties":
        thresholds = global_thresholds(sources, base, target, recipe.density, chunk_bytes)
    return thresholds, global_majority(recipe, sources, base, target, chunk_bytes, thresholds)


def _method_record(recipe: Recipe, linear, majority) -> dict:
    """The method's parameters as the record gives them (those it takes, defaults included)."""
    out = {k: v for k, v in (("scale", recipe.scale), ("density", recipe.density))
           if v is not None}  # fmt: skip
    if recipe.method in DARE:
        out.update(seed=recipe.seed, dare_rng=DARE_RNG)
    if recipe.method in ELECTED:
        out["ties_scope"] = recipe.scope
    if majority is not None:  # (global: the sign of Σ γ over the model; 0 when it ties)
        out["majority_sign"] = (majority > 0) - (majority < 0)
    if recipe.method == "slerp":
        out.update(t=recipe.t, colinear_threshold=merge_math.SLERP_COLINEAR,
                   linear_tensors=linear)  # fmt: skip
    return out


def _input_records(recipe: Recipe, sources, thresholds) -> list[dict]:
    """Each input as the record names it, with its weight (weighing methods) and its whole
    task vector's threshold (`--ties_scope global` TIES)."""
    out = []
    for i, (s, w) in enumerate(zip(sources, recipe.weights)):
        entry = {**s.record(), **({"weight": w} if recipe.method in WEIGHTED else {})}
        if thresholds is not None:
            entry["threshold"] = thresholds[i]
        out.append(entry)
    return out


def merge(inputs: list[str], out: str, method: str = "mean", *, last: int | None = None,
          ema: bool = False, base: str | None = None, weights: list[float] | None = None,
          scale: float | None = None, density: float | None = None, t: float | None = None,
          seed: int | None = None, ties_scope: str | None = None, chunk_mb: float = 1024,
          mesh=None, rules=None) -> dict:  # fmt: skip
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
    recipe = _check_args(method, sources, base_src, weights, scale, density, t, seed, ties_scope)
    target = model_target(sources[0], mesh, rules)
    everyone = sources + ([base_src] if base_src else [])
    merge_inputs.check_compatible(everyone, target)
    reads = merge_inputs.read_target(everyone, target)  # float32 where the inputs' dtypes differ
    chunk_bytes = int(chunk_mb * 2**20)
    thresholds, majority = _whole_vector_stats(recipe, sources, base_src, reads, chunk_bytes)
    params, linear = combine(recipe, sources, base_src, reads, chunk_bytes, thresholds,
                             majority)  # fmt: skip
    if reads is not target:  # the first input's param_dtype, as its model config says
        params = jax.tree.map(lambda x, s: x.astype(s.dtype), params, target)
    record = {
        "method": method,
        "inputs": _input_records(recipe, sources, thresholds),
        "base": base_src.record() if base_src else None,
        **_method_record(recipe, linear, majority),
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
                   help="task_arithmetic, ties, dare_*: the model the inputs were tuned "
                   "from")  # fmt: skip
    p.add_argument("--weights", type=_floats, default=None,
                   help="w1,w2,...: mean (normalised), task_arithmetic and dare_linear (per "
                   "task)")  # fmt: skip
    p.add_argument("--scale", type=float, default=None,
                   help="task_arithmetic, ties, dare_*: λ, the task vectors' scale (default "
                   "1)")  # fmt: skip
    p.add_argument("--density", type=float, default=None,
                   help=f"ties: share of each task vector's entries kept by magnitude; dare_*: "
                   f"the probability an entry is kept (default {DEFAULT_DENSITY})")  # fmt: skip
    p.add_argument("--seed", type=int, default=None,
                   help="dare_*: the drop masks' seed (default 0); with the input's index and "
                   "the tensor's path it makes each tensor's mask")  # fmt: skip
    p.add_argument("--ties_scope", default=None, choices=SCOPES,
                   help="ties, dare_ties: trim threshold (ties) and majority sign per tensor "
                   "(default, as mergekit) or over the whole task vector (the paper's; more "
                   "passes over the inputs)")  # fmt: skip
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
                       seed=a.seed, ties_scope=a.ties_scope, chunk_mb=a.chunk_mb, mesh=mesh,
                       rules=rules)  # fmt: skip
    except (MergeError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"merged {len(record['inputs'])} checkpoint(s) by {a.method} -> "
          f"{os.path.abspath(a.out)}")  # fmt: skip
    for i in record["inputs"]:
        weight = f"  weight {i['weight']:.6g}" if "weight" in i else ""
        kept = f"  |τ| >= {i['threshold']:.6g}" if i.get("threshold") is not None else ""
        print(f"  {_named(i)}{' (EMA)' if i['ema'] else ''}{weight}{kept}")
    if record["base"]:
        print(f"  base {_named(record['base'])}")
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
