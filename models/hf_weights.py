"""HF tensors <-> flaxlm params: the name and layout plan, shard-by-shard loading with its
checks, and the export's tensors and safetensors shards.

Weight layout. HF Linear weights are (out, in); our projection kernels contract their leading
axes: q/k/v (D, heads, H) = W.T reshaped, o (N, H, D) = W.T reshaped, MLP (in, out) = W.T, LM
head (D, V). Both use the "rotate half" RoPE layout, so no q/k permutation is needed (the parity
fixtures in tests/fixtures/hf prove it to 1e-4 in fp32 against transformers). Phi-3/Phi-4's
fused qkv_proj and gate_up_proj weights split into q/k/v and gate/up (joined again on export).
A multimodal checkpoint's text model (MULTIMODAL) has its tensors under a prefix; the other
towers' tensors are skipped.

Experts. Import reads the per-expert tensors of every published checkpoint and of
transformers' save_pretrained (experts.j.{gate,up,down}_proj), one host buffer per stacked
(E, ...) kernel placed when its E rows are read, and transformers 5's fused layout
(save_original_format=False: experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F),
Mixtral's under mlp.); export writes the per-expert layout, which old and new transformers
load.

Large checkpoints load shard by shard (model.safetensors.index.json; a model.safetensors beside
it wins, as in transformers): each tensor is read from the memory-mapped file, converted and
placed on device (in its shards when a mesh is given) before the next is read, so the host
never holds a second copy of the model. Missing, unexpected, duplicated or misshapen tensors
and unreadable files raise HFError naming the file and the tensor. A partial read (`only`: the
params of a group of tensors, as `python -m flaxlm.train.merge` reads its inputs) reads just
those tensors' data and checks the others from the shards' headers. Export fetches one param
at a time while writing each shard (at most max_shard_bytes, with an index when there are
several).

Separate from the config (models/hf_config.py) because the tensors follow from a ModelConfig
alone; models/hf.py's load_pretrained / save_pretrained call `read_params`, `export_tensors`
and `write_shards`.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_arch import (
    _EXPERT_NAMES,
    _FUSED_WEIGHTS,
    _OTHER_TOWERS,
    MULTIMODAL,
    load_hf_json,
)
from flaxlm.models.hf_tokenizer import HFError
from flaxlm.models.sharding import uneven_split
from flaxlm.models.transformer import Transformer


class _Row(tuple):
    """A plan target that is one row of a stacked param: (path, row, rows) — expert `row` of
    an (E, ...) expert kernel, which HF keeps as one tensor per expert."""

    path = property(lambda self: self[0])
    row = property(lambda self: self[1])
    rows = property(lambda self: self[2])


def _plan(cfg: ModelConfig, arch: str | None = None, fused_experts: bool = False
          ) -> dict[str, tuple]:  # fmt: skip
    """HF tensor name -> (our param path, HF shape, to_ours, to_hf); for an HF weight that
    holds several of ours (Phi-3's fused ones) a list of paths, to_ours giving a list; for one
    expert's weight a `_Row` of our stacked expert kernel. `fused_experts`: the experts as
    transformers 5 keeps them in memory (and writes with save_original_format=False), one
    gate_up_proj (E, 2F, D) and one down_proj (E, D, F) per layer; else one tensor per expert
    and projection, as every published checkpoint (and transformers' save_pretrained)."""
    D, N, K, H, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, cfg.d_ff,
                        cfg.vocab_size)  # fmt: skip
    same = (lambda w: w, lambda p: p)
    lin = (lambda w: w.T, lambda p: p.T)

    def heads(n):  # (n*H, D) <-> (D, n, H)
        return (lambda w: w.T.reshape(D, n, H), lambda p: p.reshape(D, n * H).T)

    def bias(n):
        return (lambda b: b.reshape(n, H), lambda p: p.reshape(n * H))

    def joined(parts, rows):  # one HF weight stacking several of ours on its output rows
        cuts = np.cumsum(rows)[:-1]
        return (
            lambda w: [f(x) for (f, _), x in zip(parts, np.split(w, cuts, axis=0))],
            lambda ps: np.concatenate([g(p) for (_, g), p in zip(parts, ps)], axis=0),
        )

    fused = arch in _FUSED_WEIGHTS
    out = {"model.embed_tokens.weight": (("embed", "embedding"), (V, D), *same)}
    out["model.norm.weight"] = (("final_norm", "scale"), (D,), *same)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), (V, D), *lin)
    o = (lambda w: w.T.reshape(N, H, D), lambda p: p.reshape(N * H, D).T)
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.", f"layers_{i}"
        if cfg.norm_placement == "post":  # OLMo 2: after attention / the MLP
            out[hf + "post_attention_layernorm.weight"] = ((us, "attn_norm", "scale"), (D,), *same)
            out[hf + "post_feedforward_layernorm.weight"] = ((us, "mlp_norm", "scale"), (D,),
                                                             *same)  # fmt: skip
        elif cfg.norm_placement == "sandwich":  # Gemma 2/3: before and after each
            for theirs, ours in (("input_layernorm", "attn_norm"),
                                 ("post_attention_layernorm", "attn_post_norm"),
                                 ("pre_feedforward_layernorm", "mlp_norm"),
                                 ("post_feedforward_layernorm", "mlp_post_norm")):  # fmt: skip
                out[hf + f"{theirs}.weight"] = ((us, ours, "scale"), (D,), *same)
        else:
            out[hf + "input_layernorm.weight"] = ((us, "attn_norm", "scale"), (D,), *same)
            out[hf + "post_attention_layernorm.weight"] = ((us, "mlp_norm", "scale"), (D,), *same)
        for name, n in (("q", N), ("k", K), ("v", K)) if not fused else ():
            p = hf + f"self_attn.{name}_proj."
            out[p + "weight"] = ((us, "attn", name, "kernel"), (n * H, D), *heads(n))
            if cfg.qkv_bias:
                out[p + "bias"] = ((us, "attn", name, "bias"), (n * H,), *bias(n))
        if fused:  # one weight, split on the output rows: q (N·H), k (K·H), v (K·H)
            paths = [(us, "attn", x, "kernel") for x in "qkv"]
            out[hf + "self_attn.qkv_proj.weight"] = (paths, ((N + 2 * K) * H, D), *joined(
                [heads(N), heads(K), heads(K)], [N * H, K * H, K * H]))  # fmt: skip
        if cfg.qk_norm != "none":  # per head: (H,); OLMo 2's over all heads: (N·H,), (K·H,)
            for name, n in (("q_norm", N), ("k_norm", K)):
                size = H if cfg.qk_norm == "head" else n * H
                out[hf + f"self_attn.{name}.weight"] = ((us, "attn", name, "scale"), (size,), *same)
        out[hf + "self_attn.o_proj.weight"] = ((us, "attn", "o", "kernel"), (D, N * H), *o)
        if cfg.n_experts:
            out.update(_expert_plan(cfg, arch, i, fused_experts))
            continue
        for name, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            if fused and name != "down":
                continue
            out[hf + f"mlp.{name}_proj.weight"] = ((us, "mlp", name, "kernel"), shape, *lin)
        if fused:  # gate rows first, then up (Phi3MLP chunks the output in two)
            paths = [(us, "mlp", x, "kernel") for x in ("gate", "up")]
            split = joined([lin, lin], [F, F])
            out[hf + "mlp.gate_up_proj.weight"] = (paths, (2 * F, D), *split)
    return out


def _expert_plan(cfg: ModelConfig, arch: str | None, i: int, fused: bool) -> dict[str, tuple]:
    """Layer i's router, experts (and Qwen2-MoE's shared expert) in `_plan`'s terms. Mixtral
    keeps them under block_sparse_moe. (w1 gate, w3 up, w2 down), transformers 5 in memory under
    mlp.; the others under mlp. (gate_proj, up_proj, down_proj)."""
    D, E, F, S = cfg.d_model, cfg.n_experts, cfg.d_expert_, cfg.d_shared_expert
    us = (f"layers_{i}", "mlp")
    lin = (lambda w: w.T, lambda p: p.T)
    block = "block_sparse_moe" if arch == "mixtral" and not fused else "mlp"
    hf = f"model.layers.{i}.{block}."
    out = {hf + "gate.weight": ((*us, "router", "kernel"), (E, D), *lin)}
    experts = {x: (*us, "experts", x, "kernel") for x in ("gate", "up", "down")}
    if fused:  # (E, 2F, D): gate rows, then up rows, per expert; down (E, D, F)
        swap = (lambda w: np.swapaxes(w, 1, 2), lambda p: np.swapaxes(p, 1, 2))
        out[hf + "experts.gate_up_proj"] = (
            [experts["gate"], experts["up"]], (E, 2 * F, D),
            lambda w: [np.swapaxes(w[:, :F], 1, 2), np.swapaxes(w[:, F:], 1, 2)],
            lambda ps: np.concatenate([np.swapaxes(p, 1, 2) for p in ps], axis=1),
        )  # fmt: skip
        out[hf + "experts.down_proj"] = (experts["down"], (E, D, F), *swap)
    else:  # all experts' gates, then ups, then downs: export fetches each kernel once
        names = _EXPERT_NAMES.get(arch, ("gate_proj", "up_proj", "down_proj"))
        for x, theirs, shape in zip(("gate", "up", "down"), names, ((F, D), (F, D), (D, F))):
            for j in range(E):
                out[hf + f"experts.{j}.{theirs}.weight"] = (_Row((experts[x], j, E)), shape, *lin)
    if S:  # Qwen2-MoE's shared expert, scaled by sigmoid(x · shared_expert_gate)
        for x, shape in (("gate", (S, D)), ("up", (S, D)), ("down", (D, S))):
            out[hf + f"shared_expert.{x}_proj.weight"] = ((*us, "shared", x, "kernel"), shape, *lin)
    if cfg.shared_expert_gate:
        out[hf + "shared_expert_gate.weight"] = ((*us, "shared_gate", "kernel"), (1, D), *lin)
    return out


def _zero_extras(cfg: ModelConfig, arch: str) -> dict[str, tuple]:
    """Tensors an HF arch needs that our model does not have (written as zeros on export):
    Qwen2 and Qwen2-MoE always have q/k/v biases; the others' attention_bias also biases
    o_proj."""
    D, H = cfg.d_model, cfg.head_dim_
    out = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}.self_attn."
        if arch in ("qwen2", "qwen2_moe") and not cfg.qkv_bias:
            for name, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                out[p + f"{name}_proj.bias"] = (n * H,)
        if arch not in ("qwen2", "qwen2_moe") and cfg.qkv_bias:
            out[p + "o_proj.bias"] = (D,)
    return out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _tensor_names(path: str) -> list[str]:
    """The tensor names of an HF directory's weights (headers or the index only); [] when
    they cannot be read (`read_params` then names the problem)."""
    from safetensors import safe_open

    try:
        files = _shard_files(path)
        if files == ["model.safetensors"]:
            with safe_open(os.path.join(path, files[0]), framework="numpy") as f:
                return list(f.keys())
        return list(load_hf_json(path, "model.safetensors.index.json")["weight_map"])
    except Exception:
        return []


def _has_fused_experts(names: list[str]) -> bool:
    """Whether a checkpoint keeps its experts fused (transformers 5's in-memory layout:
    mlp.experts.gate_up_proj / down_proj), judged by its tensor names."""
    return any(n.endswith(".experts.gate_up_proj") for n in names)


def _check_layer_count(names: list[str], cfg: ModelConfig, path: str) -> None:
    """Refuses a config.json with more layers than the weights hold before the per-layer plan
    is built (num_hidden_layers=1000000 beside a 2-layer checkpoint took 62 s and 4.8 GB, then
    MemoryError). A missing tensor of a layer that is there is named later, as ever."""
    found = [int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))]
    if names and max(found, default=-1) + 1 < cfg.n_layers:
        raise HFError(f"{path}: config.json says num_hidden_layers={cfg.n_layers}, but the "
                      f"weights hold {max(found, default=-1) + 1} layer(s)")  # fmt: skip


def _shard_files(path: str) -> list[str]:
    # transformers reads model.safetensors when both it and an index are present (a stale index
    # left beside a re-saved single file): so do we, or we would load other weights than it does
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = load_hf_json(path, "model.safetensors.index.json").get("weight_map")
        if not weight_map:
            raise HFError(f"{index}: no 'weight_map'")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index}: 'weight_map' is not a {{tensor: file}} object")
        for tensor, file in weight_map.items():
            # A shard is a file of this directory: a '../x' or absolute name read a file
            # elsewhere (a downloaded index could point anywhere), a number was a TypeError.
            if not isinstance(file, str) or not file or os.path.basename(file) != file:
                raise HFError(f"{index}: weight_map[{tensor!r}] = {file!r} is not the name of "
                              "a file in this directory")  # fmt: skip
        return sorted(set(weight_map.values()))
    raise HFError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _placements(cfg: ModelConfig, mesh, rules, where: str = ""):
    """Our param path -> sharding (or None: default device). `where`: the HF directory, for
    the error of a mesh that cannot hold the model."""
    if mesh is None:
        return lambda path: None
    import flax.linen as nn

    boxed = jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32)), jax.random.PRNGKey(0)
    )["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    # Checked before any tensor is read: placing one that does not split evenly raised jax's
    # IndivisibleError, naming neither the weight nor the mesh that was asked for.
    what = uneven_split(nn.meta.unbox(boxed), boxed, shardings, mesh)
    if what:
        raise HFError(f"{where}: {what}; load it under another mesh or sharding rules")
    return lambda path: _get(shardings, path)


def read_params(path: str, cfg: ModelConfig, arch: str | None, mesh=None, rules=None, *,
                only: set[tuple] | None = None, place=None) -> dict:  # fmt: skip
    """`cfg`'s params from the safetensors of the HF directory `path` (whose config.json says
    model_type `arch`), read shard by shard; `mesh`, `rules`: each tensor placed in its shards.
    Returns the unrolled layer layout.

    `only`: the param paths to read (tuples of keys), for a reader that must never hold a
    whole model (train/merge_inputs.py reads a group of tensors at a time); every other
    tensor is still checked (name, dtype, shape, none missing) from the shards' headers, its
    data left unread; an empty set reads nothing and checks everything. `place`: path ->
    sharding (None: the default device), instead of `mesh` and `rules`."""
    from safetensors import safe_open

    prefix = MULTIMODAL[arch][1] if arch in MULTIMODAL else ""
    names = _tensor_names(path)
    _check_layer_count(names, cfg, path)
    fused = bool(cfg.n_experts) and _has_fused_experts(names)
    plan = _plan(cfg, arch, fused)
    place = place or _placements(cfg, mesh, rules, path)
    params, seen = {}, set()
    stacks = {}  # our expert kernel -> [host buffer (E, ...), rows filled], until complete
    for fname in _shard_files(path):
        full = os.path.join(path, fname)
        if not os.path.exists(full):
            raise HFError(f"{path}: shard {fname} listed in the index is missing")
        try:  # safetensors' own errors ("incomplete metadata", ...) name no file
            handle = safe_open(full, framework="numpy")
        except Exception as e:
            raise HFError(f"{full}: cannot read safetensors: {type(e).__name__}: {e}") from e
        with handle as f:
            for stored in f.keys():
                if prefix and stored.startswith(_OTHER_TOWERS):
                    continue  # (a multimodal checkpoint's image tower: not the text model)
                name = stored[len(prefix) :] if prefix and stored.startswith(prefix) else stored
                if prefix and name == stored:
                    raise HFError(f"{full}: unexpected tensor {stored} (the text model's are "
                                  f"under {prefix!r})")  # fmt: skip
                if name in seen:
                    raise HFError(f"{full}: tensor {stored} appears in two shards")
                if name not in plan:
                    if name.endswith("o_proj.bias") and cfg.qkv_bias:
                        if np.any(_tensor(f, stored, full) != 0):  # Llama attention_bias
                            raise HFError(f"{full}: {name} is nonzero; o_proj bias unsupported")
                        continue
                    if _ignorable(name, cfg):
                        continue
                    j = re.search(r"\.experts\.(\d+)\.", name)
                    if j and cfg.n_experts and int(j.group(1)) >= cfg.n_experts:
                        raise HFError(f"{full}: tensor {name} is expert {j.group(1)}, but "
                                      f"config.json has {cfg.n_experts} experts (num_experts / "
                                      "num_local_experts)")  # fmt: skip
                    raise HFError(f"{full}: unexpected tensor {name} for {cfg_summary(cfg)}")
                ours, shape, to_ours, _ = plan[name]
                skip = only is not None and not _wanted(ours, only)
                w = None if skip else _tensor(f, stored, full)
                got = _stored_shape(f, stored, full) if skip else tuple(w.shape)
                if got != shape:
                    raise HFError(
                        f"{full}: tensor {name} has shape {got}, expected {shape} from config.json"
                    )
                if skip:  # (checked, not read)
                    seen.add(name)
                    continue
                if isinstance(ours, list):  # a fused HF weight: several of ours
                    for p, part in zip(ours, to_ours(w)):
                        if only is not None and p not in only:
                            continue
                        part = np.asarray(part).astype(cfg.weight_dtype)
                        _set(params, p, jax.device_put(part, place(p)))
                elif isinstance(ours, _Row):  # one expert's: placed when all E are read
                    row = np.asarray(to_ours(w)).astype(cfg.weight_dtype)
                    if ours.path not in stacks:
                        buf = np.empty((ours.rows, *row.shape), row.dtype)
                        stacks[ours.path] = [buf, 0]
                    stack = stacks[ours.path]
                    stack[0][ours.row] = row
                    stack[1] += 1
                    if stack[1] == ours.rows:
                        _set(params, ours.path, jax.device_put(stack[0], place(ours.path)))
                        del stacks[ours.path], stack
                    del row
                else:
                    w = np.asarray(to_ours(w)).astype(cfg.weight_dtype)
                    _set(params, ours, jax.device_put(w, place(ours)))
                seen.add(name)
                del w
    missing = [n for n in plan if n not in seen]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise HFError(f"{path}: missing tensor(s) {missing[:5]}{more}")
    return params


# safetensors dtypes a weight may be stored in. An integer one (a quantized checkpoint's I8/U8
# weights, whose scales live in other tensors) was cast to float as it was: |w| up to 127.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _wanted(ours, only: set[tuple]) -> bool:
    """Whether a `_plan` target (a path, a fused weight's paths, an expert's `_Row`) holds a
    param of `only`."""
    if isinstance(ours, list):
        return any(p in only for p in ours)
    return (ours.path if isinstance(ours, _Row) else ours) in only


def _check_dtype(dtype: str | None, name: str, full: str) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        hint = ("an FP8-quantized checkpoint: dequantize it to bfloat16 first" if "F8" in dtype
                else "a quantized checkpoint? flaxlm reads float weights only")  # fmt: skip
        raise HFError(f"{full}: tensor {name} is stored as {dtype}, not as a float "
                      f"({'/'.join(FLOAT_DTYPES)}): {hint}")  # fmt: skip


def _stored_shape(f, name: str, full: str) -> tuple:
    """A tensor's shape from its shard's header, its dtype checked as `_tensor` checks it: a
    tensor a partial read (`read_params(only=...)`) skips is checked without reading it."""
    try:
        header = f.get_slice(name)
        dtype, shape = header.get_dtype(), tuple(header.get_shape())
    except Exception:  # (`_tensor` names what is wrong with the file)
        return tuple(_tensor(f, name, full).shape)
    _check_dtype(dtype, name, full)
    return shape


def _tensor(f, name: str, full: str) -> np.ndarray:
    try:
        dtype = f.get_slice(name).get_dtype()
    except Exception:  # (read below: `get_tensor` names what is wrong with the file)
        dtype = None
    _check_dtype(dtype, name, full)
    try:
        return f.get_tensor(name)
    except Exception as e:  # a truncated or corrupt file
        raise HFError(f"{full}: cannot read tensor {name}: {type(e).__name__}: {e}") from e


def cfg_summary(cfg: ModelConfig) -> str:
    return (f"L={cfg.n_layers} D={cfg.d_model} N={cfg.n_heads} K={cfg.n_kv_heads} "
            f"qkv_bias={cfg.qkv_bias} qk_norm={cfg.qk_norm} norms={cfg.norm_placement} "
            f"tied={cfg.tie_embeddings}"
            + (f" experts={cfg.n_experts} top-{cfg.n_experts_per_token} "
               f"shared={cfg.d_shared_expert}" if cfg.n_experts else ""))  # fmt: skip


def _safe_dtype(x: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x).astype(dtype))


def export_tensors(cfg: ModelConfig, params, arch: str, np_dtype, max_shard_bytes: int
                   ) -> list[list[tuple]]:  # fmt: skip
    """The HF `arch` tensors of `params` (unboxed, unrolled layers) in HF order, grouped into
    shards of at most `max_shard_bytes` (in `np_dtype`): (name, shape, fetch) each, `fetch`
    reading its param(s) from the device only when called."""
    tensors = []  # (name, fetch) in HF order; fetched one at a time while writing

    last = [None, None]  # the last param fetched: an expert kernel serves its E tensors

    def host(path):  # one param on the host
        if last[0] != path:
            last[:] = path, None  # (the previous one freed first)
            x = np.asarray(jax.device_get(_get(params, path)))
            scale = _get(params, path[:-1]).get("kernel_scale") if path[-1] == "kernel" else None
            if scale is not None:
                # quant.quantize_params' int8 kernel: HF has no per-channel int8 format, and
                # written as it is, its integers (up to ±127) would load as the float weights.
                # Dequantized in float32 as the model does (quant.dequantize); the scale keeps
                # the input axes as size 1, so it broadcasts over this kernel's own layout.
                x = x.astype(np.float32) * np.asarray(jax.device_get(scale), np.float32)
            last[1] = x
        return last[1]

    def ours_on_host(ours):
        if isinstance(ours, _Row):
            return host(ours.path)[ours.row]
        return [host(p) for p in ours] if isinstance(ours, list) else host(ours)

    for name, (ours, shape, _, to_hf) in _plan(cfg, arch).items():
        tensors.append((name, shape, lambda ours=ours, to_hf=to_hf: to_hf(ours_on_host(ours))))
    for name, shape in _zero_extras(cfg, arch).items():
        tensors.append((name, shape, lambda shape=shape: np.zeros(shape, np.float32)))
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_shards(shards: list[list[tuple]], directory: str, np_dtype) -> None:
    """Writes `export_tensors`' shards into `directory` as `np_dtype` safetensors: one
    model.safetensors, or numbered files and a model.safetensors.index.json."""
    from safetensors.numpy import save_file

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        arrays = {}
        for name, _, fetch in shard:
            arrays[name] = _safe_dtype(fetch(), np_dtype)
            weight_map[name] = fname
            total += arrays[name].nbytes
        save_file(arrays, os.path.join(directory, fname), metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
