"""LoRA (Hu et al., 2021) as a transform over parameter pytrees — no change to any model module.

    spec = LoraSpec(rank=8, alpha=16, targets="attn/(q|v)")
    init = with_lora(init_params, spec)    # rng -> {"base": params, "lora": adapters}
    apply = lora_apply(apply, spec)         # same call as before, on the {"base", "lora"} tree
    tx, _ = make_optimizer(cfg.opt, steps, trainable_mask=lambda p: trainable_mask(p, spec))
    plain = merge(params, spec)             # export: the base tree with the adapters folded in

Targets are kernels whose *module path* (the param path without "/kernel", e.g.
"layers_3/attn/q" or "transformer/layers/mlp/up") matches the regex `targets` (`re.search`).

Kernels are `Proj` kernels of any rank: a query kernel is (D, N, H), the attention output
(N, H, D), MLP kernels (D, F) / (F, D). A kernel is split into input dims (contracted with the
activations: the first `IN_DIMS.get(name, 1)` dims) and output dims (the rest); scanned layers
(a "layers" path component) add a leading L dim. The adapter pair for a kernel with input dims
I and output dims O is

    a: (L?, prod(I), r)   normal(1/sqrt(prod(I)))      — the paper's Aᵀ
    b: (L?, r, prod(O))   zeros (so training starts at the base model)  — the paper's Bᵀ

and the effective kernel is W + (alpha / r) · reshape(a @ b, I + O), i.e. the paper's
W₀x + (α/r)·BAx in our x·W layout (scale alpha / r, not rsLoRA's alpha / √r; the flattening of
the input dims is row-major, so for the o kernel x·W sums x[n, h]·W[n, h, :] and the adapter
sees x.reshape(N·H)). Each kernel's `a` has its own key (one draw for all L layers of a
scanned kernel), in the base kernel's dtype; `b = 0` makes a fresh LoRA model compute exactly
the base model's logits. `lora_apply` folds the adapters in at every call (a few
r·(I+O)-sized matmuls, negligible next to the activations) and stops gradients through the
frozen base weights: their gradient is exactly zero and XLA materialises none (with
`opt.grad_accum > 1`, train/step.py accumulates the trainable leaves only, given the same mask);
`trainable_mask` gives the optimizer adapters only (plus base
params matching `train_extra`, e.g. a reward head; matching nothing is an error), so optimizer
state holds only what trains and frozen params are neither updated nor weight-decayed.

Runs: a LoRA run's checkpoint holds {"base", "lora"} (the whole base, so it resumes and loads
alone) and its meta["lora"] the spec; every reader merges — train/checkpoint.load_model (eval,
`python -m flaxlm.generate`, HF export), alignment/common.load_lm_params (init_from, frozen
reference policies), rl_common.load_scalar_params (reward models) — so nothing downstream sees
adapters. Under a mesh the adapters are replicated (their boxes name no axis); the base keeps
its training shardings, and so do merged weights.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from flaxlm.models.sharding import unboxed

# Kernels whose first two dims are inputs ((N, H) -> D of the attention output projection).
IN_DIMS = {"o": 2}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 0  # adapter rank r; 0 = LoRA off
    alpha: float = 16.0  # scale alpha; the update is (alpha / rank) · a @ b
    targets: str = "attn/(q|v)"  # regex over module paths of the kernels to adapt
    train_extra: str = ""  # regex over base param paths that also train (e.g. "^head/")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lora_config(rank: int = 0) -> ml_collections.ConfigDict:
    """The `lora` config section of SFT / reward / DPO configs."""
    c = ml_collections.ConfigDict()
    c.rank = rank  # adapter rank r; 0 = LoRA off (full fine-tuning)
    c.alpha = 16.0  # the update is (alpha / rank) · a @ b
    c.targets = "attn/(q|v)"  # regex over kernel module paths, e.g. "attn/(q|k|v|o)|mlp"
    c.train_extra = ""  # regex over base param paths that train too (reward models: "^head/")
    return c


def check_base_is_reference(spec: LoraSpec | None, stage: str) -> None:
    """A ValueError for `lora.train_extra` in a stage whose reference model is the policy's
    own frozen base (GRPO, online DPO, PPO, KTO): the base leaves it trains would move the
    reference with the policy, and the KL terms would be measured against a moving target."""
    if spec and spec.train_extra:
        raise ValueError(
            f"{stage}: lora.train_extra={spec.train_extra!r} trains base parameters, but with "
            "LoRA the reference is the policy's own base (params['base']): it would move with "
            "training. Drop lora.train_extra, or train without LoRA (lora.rank=0) for a frozen "
            "reference copy"
        )


def spec_from_config(section) -> LoraSpec | None:
    """The `lora` config section → LoraSpec, or None when rank == 0. A negative rank, an
    alpha that is not a positive finite number (alpha = 0 would train adapters that change
    nothing) and a regex that does not compile are errors naming the key."""
    d = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    spec = LoraSpec(**d)
    if spec.rank < 0:
        raise ValueError(f"lora.rank={spec.rank} must be >= 0")
    if spec.rank == 0:
        return None
    if not (math.isfinite(spec.alpha) and spec.alpha > 0):
        raise ValueError(f"lora.alpha={spec.alpha} must be > 0 (the update is (alpha/rank)·a@b)")
    for key in ("targets", "train_extra"):
        try:
            re.compile(getattr(spec, key))
        except re.error as e:
            raise ValueError(
                f"lora.{key}={getattr(spec, key)!r} is not a regular expression: {e}"
            ) from None
    return spec


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def kernel_layout(path: str, shape) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(leading, input, output) dims of the kernel at param path `path` (".../name/kernel")."""
    parts = path.split("/")
    # leading batch-like dims: scanned layers' layer axis, a mixture of experts' expert axis
    n_lead = ("layers" in parts) + ("experts" in parts)
    n_in = IN_DIMS.get(parts[-2] if len(parts) > 1 else "", 1)
    shape = tuple(shape)
    if len(shape) < n_lead + n_in + 1:
        raise ValueError(f"lora: kernel {path} of shape {shape} has no output dims")
    return shape[:n_lead], shape[n_lead : n_lead + n_in], shape[n_lead + n_in :]


def target_paths(params, spec: LoraSpec) -> dict[str, tuple]:
    """{param path: kernel shape} of the kernels `spec.targets` selects (an error if none)."""
    pat = re.compile(spec.targets)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(unboxed(params))[0]:
        p = _path_str(path)
        module, _, name = p.rpartition("/")
        if name == "kernel" and jnp.ndim(leaf) >= 2 and pat.search(module):
            out[p] = tuple(leaf.shape)
    if not out:
        raise ValueError(f"lora.targets={spec.targets!r} matches no kernel of the model")
    return out


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return tree


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def init_adapters(rng, params, spec: LoraSpec, boxed: bool = False) -> dict:
    """Adapters for the targeted kernels of `params`: {path...: {"a", "b"}} (see module doc)."""
    flat = {}
    dtypes = {
        _path_str(p): leaf.dtype for p, leaf in jax.tree_util.tree_flatten_with_path(
            unboxed(params))[0]
    }  # fmt: skip
    for i, (path, shape) in enumerate(sorted(target_paths(params, spec).items())):
        lead, ins, outs = kernel_layout(path, shape)
        d_in, d_out = math.prod(ins), math.prod(outs)
        a = jax.random.normal(jax.random.fold_in(rng, i), (*lead, d_in, spec.rank), dtypes[path])
        a = a / math.sqrt(d_in)
        b = jnp.zeros((*lead, spec.rank, d_out), dtypes[path])
        if boxed:  # adapters are small: replicated on every device
            a = nn.LogicallyPartitioned(a, (None,) * a.ndim)
            b = nn.LogicallyPartitioned(b, (None,) * b.ndim)
        flat[path] = {"a": a, "b": b}
    return _nest(flat)


def with_lora(init_params, spec: LoraSpec):
    """rng -> {"base": boxed base params, "lora": boxed adapters}, for the loop's Task."""

    def init(rng):
        base = init_params(rng)
        return {"base": base, "lora": init_adapters(jax.random.fold_in(rng, 1), base, spec, True)}

    return init


def for_training(init_params, section):
    """(spec, init, prepare) of a model trained per the `lora` config `section`: with rank > 0
    the adapters join the init (`with_lora`) and `prepare(params)` folds them into the frozen
    base for the forward (once per step, before any chunked loss); rank 0: (None, init_params,
    None), the full model."""
    spec = spec_from_config(section)
    if spec is None:
        return None, init_params, None
    return spec, with_lora(init_params, spec), functools.partial(merge, spec=spec, freeze_base=True)


def delta(path: str, kernel_shape, adapter: dict, spec: LoraSpec):
    """(alpha/r) · a @ b reshaped to the kernel's shape."""
    lead, ins, outs = kernel_layout(path, kernel_shape)
    return (spec.scale * jnp.matmul(adapter["a"], adapter["b"])).reshape(*lead, *ins, *outs)


def merge(params, spec: LoraSpec, freeze_base: bool = False):
    """The base tree with every adapter folded into its kernel.

    With `freeze_base`, gradients stop at base params that do not train (all but those
    matching `spec.train_extra`), so the backward pass never computes base gradients.
    Adapters whose kernel is absent from the base tree (a partial load) are ignored. Boxed
    (nn.Partitioned) params are unboxed first: the box would add a level to every path, so no
    adapter would find its kernel.
    """
    base, lora = unboxed(params["base"]), unboxed(params["lora"])
    extra = re.compile(spec.train_extra) if spec.train_extra else None
    adapters = {_path_str(p[:-1]): None for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]}

    def fold(path, w):
        p = _path_str(path)
        if freeze_base and not (extra and extra.search(p)):
            w = jax.lax.stop_gradient(w)
        if p in adapters:
            w = w + delta(p, w.shape, _get(lora, p), spec).astype(w.dtype)
        return w

    return jax.tree_util.tree_map_with_path(fold, base)


def lora_apply(apply_fn, spec: LoraSpec):
    """Wraps `apply_fn(params, *args)` to take {"base", "lora"} params (see module doc)."""

    def apply(params, *args, **kwargs):
        return apply_fn(merge(params, spec, freeze_base=True), *args, **kwargs)

    return apply


def _top_level_split(regex: str, sep: str = "|") -> list[str]:
    """`regex` split at the `sep` characters outside (), [] and escapes."""
    parts, depth, cls, esc, cur = [], 0, False, False, ""
    for ch in regex:
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif cls:
            cls = ch != "]"
        elif ch == "[":
            cls = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


# A group of plain alternatives, e.g. "(q|k|v)" or "(?:gate|up)": expanded member by member.
_PLAIN_GROUP = re.compile(r"\((?:\?:)?([\w/.]+(?:\|[\w/.]+)+)\)")
_MAX_SPELLINGS = 256


def target_spellings(regex: str) -> list[str]:
    """The alternatives a targets regex spells out: each top-level `|` alternative, with its
    groups of plain words ("attn/(q|k|v|o)") expanded into one pattern per member (up to
    _MAX_SPELLINGS; a regex with more, or with other constructs, is kept whole there)."""
    out = []
    for alt in _top_level_split(regex):
        groups = list(_PLAIN_GROUP.finditer(alt))
        members = [g.group(1).split("|") for g in groups]
        if not groups or math.prod(len(m) for m in members) > _MAX_SPELLINGS:
            out.append(alt)
            continue
        pieces = re.split(_PLAIN_GROUP.pattern, alt)[::2]  # the text around the groups
        for choice in itertools.product(*members):
            out.append("".join(p + c for p, c in zip(pieces, (*choice, ""), strict=True)))
    return out


def unmatched_spellings(params, spec: LoraSpec) -> list[str]:
    """The spellings of `spec.targets` (`target_spellings`) that select no kernel: a misspelt
    member ("mlp/(gate|up|dwon)") silently adapts fewer modules when the rest matches."""
    kernels = [
        _path_str(path).rpartition("/")[0]
        for path, leaf in jax.tree_util.tree_flatten_with_path(unboxed(params))[0]
        if _path_str(path).endswith("/kernel") and jnp.ndim(leaf) >= 2
    ]
    bad = []
    for alt in target_spellings(spec.targets):
        try:
            pat = re.compile(alt)
        except re.error:  # a piece that only compiles within the whole regex
            continue
        if not any(pat.search(m) for m in kernels):
            bad.append(alt)
    return bad


def module_kinds(paths) -> list[str]:
    """Kernel module paths without their layer index ("layers_3/attn/q" -> "attn/q")."""
    kinds = {re.sub(r"(^|/)layers(_\d+)?/", r"\1", p.rpartition("/kernel")[0]) for p in paths}
    return sorted(kinds)


def trainable_mask(params, spec: LoraSpec):
    """Bools for make_optimizer: every adapter, and base params matching `train_extra`.

    A `train_extra` that matches no base param is an error (a misspelt "^head/" would leave a
    reward model's fresh head frozen at its random init, silently). Logs which kernels get
    adapters, and warns of each spelling of `targets` that selects none."""
    extra = re.compile(spec.train_extra) if spec.train_extra else None
    base = jax.tree_util.tree_map_with_path(
        lambda p, _: bool(extra and extra.search(_path_str(p))), params["base"]
    )
    if extra and not any(jax.tree.leaves(base)):
        top = sorted(params["base"]) if isinstance(params["base"], dict) else []
        raise ValueError(
            f"lora.train_extra={spec.train_extra!r} matches no base parameter (paths look like "
            f"'head/kernel', 'layers_0/attn/q/kernel'; top-level names: {top})"
        )
    paths = target_paths(params["base"], spec)
    _report_targets(spec, len(paths), tuple(module_kinds(paths)),
                    tuple(unmatched_spellings(params["base"], spec)))  # fmt: skip
    return {"base": base, "lora": jax.tree.map(lambda _: True, params["lora"])}


@functools.cache  # once per run: the loop asks for the mask for the optimizer, step and EMA
def _report_targets(spec: LoraSpec, n: int, kinds: tuple, unmatched: tuple) -> None:
    logging.info("LoRA rank %d (alpha %g) on %d kernels: %s", spec.rank, spec.alpha, n,
                 ", ".join(kinds))  # fmt: skip
    for alt in unmatched:
        logging.warning("lora.targets=%r: %r selects no kernel (module paths look like "
                        "'layers_0/attn/q', 'layers_0/mlp/down')", spec.targets, alt)  # fmt: skip


def count_params(tree, mask=None) -> int:
    """Number of scalars in `tree` (only where `mask` is True, if given)."""
    leaves = jax.tree.leaves(unboxed(tree))
    if mask is None:
        return sum(math.prod(jnp.shape(x)) for x in leaves)
    return sum(math.prod(jnp.shape(x)) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)


def abstract_adapters(abstract_params, spec: LoraSpec) -> dict:
    """ShapeDtypeStructs of the adapters `init_adapters` would create (a checkpoint target)."""
    return jax.eval_shape(lambda: init_adapters(jax.random.PRNGKey(0), abstract_params, spec))
