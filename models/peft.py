"""LoRA adapters in Hugging Face PEFT's format: export a flaxlm LoRA run's adapters (to serve
them on the base model with vLLM / PEFT, or share them without the base) and import a PEFT
adapter (to evaluate, generate with or keep training it here).

    save_adapter(cfg, lora, spec, "adapter/", base_model="meta-llama/Llama-3.2-1B")
    spec, lora = load_adapter("adapter/", cfg)           # cfg: the base model's ModelConfig

    python -m flaxlm.models.hf export RUN_DIR ADAPTER_DIR --adapter
    python -m flaxlm.models.hf import-adapter HF_BASE_DIR ADAPTER_DIR RUN_DIR

Layout. A PEFT adapter directory holds adapter_config.json (r, lora_alpha, target_modules, ...)
and adapter_model.safetensors with, per adapted HF Linear (weight (out, in)),
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the update
is W + (lora_alpha / r)·B·A — flaxlm's scale and factorisation (models/lora.py: a (in, r) = Aᵀ,
b (r, out) = Bᵀ, flattened in the order the kernel's input and output dims are, which is the
order HF's Linear uses: q rows n·H + h, o columns n·H + h). Modules: q/k/v/o_proj,
gate/up/down_proj and lm_head (flaxlm's attn/q ... mlp/down, lm_head). use_rslora adapters
(scale α/√r) import with √r folded into B. An adapter covering only some layers (PEFT's
`layers_to_transform`, or a `target_modules` regex naming some) imports with zero factors on
the others (their update is exactly zero) and exports as it came: those left out again and
`layers_to_transform` written; a tensor missing from a layer the config covers is an error.

Not expressible (errors naming the key): DoRA, biases trained by PEFT (`bias` != "none"),
`modules_to_save` (whole modules trained alongside, e.g. a reward head), per-module ranks or
alphas, and adapters on modules flaxlm has no kernel for. Export refuses a LoRA run that
trains base params too (`lora.train_extra`): the adapter alone would not reproduce it.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from flaxlm.models import lora as lora_lib
from flaxlm.models.config import ModelConfig
from flaxlm.models.hf_arch import MULTIMODAL, load_hf_json
from flaxlm.models.hf_tokenizer import HFError
from flaxlm.models.sharding import unboxed

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# flaxlm module path (after layers_i/) -> HF module path (after model.layers.i.)
_LAYER_MODULES = {
    "attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
    "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
    "mlp/down": "mlp.down_proj",
}  # fmt: skip
_PREFIX = "base_model.model."


def _hf_module(path: str) -> tuple[str, int | None]:
    """(HF module name, layer or None for a scanned stack) of a flaxlm kernel path."""
    m = re.fullmatch(r"layers_(\d+)/(\w+/\w+)/kernel", path)
    if m and m.group(2) in _LAYER_MODULES:
        return f"model.layers.{m.group(1)}.{_LAYER_MODULES[m.group(2)]}", int(m.group(1))
    m = re.fullmatch(r"layers/(\w+/\w+)/kernel", path)
    if m and m.group(1) in _LAYER_MODULES:
        return f"model.layers.{{}}.{_LAYER_MODULES[m.group(1)]}", None
    if path == "lm_head/kernel":
        return "lm_head", -1
    raise HFError(f"PEFT export: no HF module for the adapted kernel {path}")


def adapter_tensors(lora, spec: lora_lib.LoraSpec, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors {name: array} of flaxlm adapters `lora` (nested as models/lora.py makes
    them: path/"kernel"/{"a", "b"}; unrolled or scanned layers)."""
    import jax

    out = {}
    flat = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(unboxed(lora))[0]:
        path = lora_lib._path_str(p)
        kernel, _, ab = path.rpartition("/")
        flat.setdefault(kernel, {})[ab] = np.asarray(jax.device_get(leaf))
    for kernel, pair in sorted(flat.items()):
        name, layer = _hf_module(kernel)
        a, b = pair["a"], pair["b"]  # (L?, in, r), (L?, r, out)
        stacks = [(name.format(i), a[i], b[i]) for i in range(a.shape[0])] if layer is None \
            else [(name, a, b)]  # fmt: skip
        for hf_name, a_i, b_i in stacks:
            out[f"{_PREFIX}{hf_name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            out[f"{_PREFIX}{hf_name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    if not out:
        raise HFError("PEFT export: the LoRA tree holds no adapters")
    return out


def save_adapter(cfg: ModelConfig, lora, spec: lora_lib.LoraSpec, path: str, *,
                 base_model: str = "", dtype=None, overwrite: bool = False,
                 arch: str | None = None) -> str:  # fmt: skip
    """Writes `lora` (with its `spec`) as a PEFT adapter directory at `path`, atomically.
    `arch`: the HF family of the base (default: the one `cfg` exports as)."""
    from safetensors.numpy import save_file

    from flaxlm.models.hf import _FUSED_WEIGHTS, _dtype_name, atomic_directory, default_arch

    if dtype is not None:
        # the float dtypes the whole-model export allows (hf_arch._DTYPES): np.dtype took
        # anything — an int8 cast rounds the factors (|x| < 1) to an all-zero adapter, float64
        # passed, and a misspelt name was a TypeError traceback naming no option.
        dtype = _dtype_name(dtype, "PEFT export")
    if spec.train_extra:
        raise HFError(
            f"PEFT export: lora.train_extra={spec.train_extra!r} trains base params too; an "
            "adapter alone would not reproduce the run (export the merged model instead)"
        )
    tensors = adapter_tensors(lora, spec, cfg)
    fused = [k for k in tensors if re.search(r"\.(q|k|v|gate|up)_proj\.", k)]
    if (arch or default_arch(cfg)) in _FUSED_WEIGHTS and fused:
        raise HFError(
            f"PEFT export: the base is a {arch or default_arch(cfg)} model, whose q/k/v and "
            f"gate/up are one fused module each; adapters on them ({fused[0]}, ...) have no "
            "PEFT module to attach to (adapt o/down/lm_head only, or export the merged model)"
        )
    tensors, layers = _drop_uncovered_layers(tensors, cfg.n_layers)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(dtype)) for k, v in tensors.items()}
    modules = sorted({k[len(_PREFIX) :].split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "target_modules": modules, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model or None,
    }  # fmt: skip
    if layers is not None:  # a partial adapter (imported with layers_to_transform) stays one
        config.update(layers_to_transform=layers, layers_pattern="layers")
    with atomic_directory(path, overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return path


def load_adapter(path: str, cfg: ModelConfig) -> tuple[lora_lib.LoraSpec, dict]:
    """(LoraSpec, adapters nested as models/lora.py makes them, unrolled layers) of the PEFT
    adapter directory `path` for the base model `cfg`. Bad input raises HFError naming the
    file and the key or tensor."""
    from safetensors import safe_open

    from flaxlm.models.hf import load_hf_json

    where = os.path.join(path, CONFIG)
    if not os.path.exists(where):
        raise HFError(f"{path}: no {CONFIG} (not a PEFT adapter directory)")
    c = load_hf_json(path, CONFIG)
    if c.get("peft_type", "LORA") != "LORA":
        raise HFError(f"{where}: peft_type {c.get('peft_type')!r} is not LORA")
    unsupported = {"use_dora": bool(c.get("use_dora")), "bias": c.get("bias", "none") != "none",
                   "modules_to_save": bool(c.get("modules_to_save")),
                   "rank_pattern": bool(c.get("rank_pattern")),
                   "alpha_pattern": bool(c.get("alpha_pattern"))}  # fmt: skip
    for key, bad in unsupported.items():
        if bad:
            raise HFError(f"{where}: {key}={c[key]!r} is not supported")
    try:
        r, alpha = int(c["r"]), float(c["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"{where}: needs numeric 'r' and 'lora_alpha' ({e})") from None
    if r < 1 or not alpha > 0:
        raise HFError(f"{where}: r={r} and lora_alpha={alpha} must be positive")
    b_factor = math.sqrt(r) if c.get("use_rslora") else 1.0  # α/√r = (α/r)·√r
    weights = os.path.join(path, WEIGHTS)
    if not os.path.exists(weights):
        raise HFError(f"{path}: no {WEIGHTS}")
    ours = {hf: p for p, hf in _kernel_names(cfg).items()}
    pairs: dict[str, dict] = {}
    try:
        handle = safe_open(weights, framework="numpy")
    except Exception as e:
        raise HFError(f"{weights}: cannot read safetensors: {type(e).__name__}: {e}") from e
    with handle as f:
        for name in f.keys():
            m = re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight", name)
            if not m or m.group(1) not in ours:
                raise HFError(
                    f"{weights}: tensor {name} is not a LoRA factor of a module "
                    f"flaxlm has ({sorted(set(_LAYER_MODULES.values()))}, lm_head)"
                )
            pairs.setdefault(ours[m.group(1)], {})[m.group(2)] = (name, f.get_tensor(name))
    flat = {}
    for kernel, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise HFError(f"{weights}: {missing} of {next(iter(pair.values()))[0]} is missing")
        (a_name, A), (b_name, B) = pair["A"], pair["B"]
        d_in, d_out = _kernel_dims(kernel, cfg)
        for nm, t, want in ((a_name, A, (r, d_in)), (b_name, B, (d_out, r))):
            if tuple(t.shape) != want:
                raise HFError(f"{weights}: tensor {nm} has shape {tuple(t.shape)}, expected "
                              f"{want} (r={r}, the base model's config)")  # fmt: skip
        dt = cfg.weight_dtype
        flat[kernel] = {"a": np.asarray(A.T, dt), "b": np.asarray(B.T * b_factor, dt)}
    if not flat:
        raise HFError(f"{weights}: no LoRA tensors")
    _fill_uncovered_layers(flat, c, cfg, r, where, weights)
    modules = sorted({k.split("/")[-2] if k != "lm_head/kernel" else "lm_head" for k in flat})
    layer_mods = [m for m in modules if m != "lm_head"]
    groups = [f"(attn|mlp)/({'|'.join(layer_mods)})$"] if layer_mods else []
    targets = "|".join(groups + (["^lm_head$"] if "lm_head" in modules else []))
    spec = lora_lib.LoraSpec(rank=r, alpha=alpha, targets=targets)
    return spec, lora_lib._nest(flat)


def _covers(c: dict, where: str, n_layers: int):
    """A predicate over HF module names ("model.layers.3.self_attn.q_proj", "lm_head"): does
    the adapter config say the adapter adapts it — `target_modules` (a list of module names
    or suffixes, a regex over the full name, "all-linear") and `layers_to_transform` (an int
    or a list of layer indices; `layers_pattern`, if given, must name "layers")."""
    layers = c.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        if not isinstance(layers, list) or not all(
            isinstance(i, int) and 0 <= i < n_layers for i in layers
        ):  # fmt: skip
            raise HFError(f"{where}: layers_to_transform={c['layers_to_transform']!r}: expected "
                          f"layer indices in [0, {n_layers})")  # fmt: skip
        pattern = c.get("layers_pattern")
        patterns = [pattern] if isinstance(pattern, str) else pattern or ["layers"]
        if "layers" not in patterns:
            raise HFError(f"{where}: layers_pattern={pattern!r}: the base model's layers are "
                          "model.layers.N (layers_pattern 'layers')")  # fmt: skip
        layers = set(layers)
    targets = c.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            regex = re.compile(targets)
        except re.error as e:
            raise HFError(f"{where}: target_modules={targets!r} is not a regex: {e}") from None

    def covers(name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if layers is not None and (not m or int(m.group(1)) not in layers):
            return False
        if targets is None:
            return True
        if targets == "all-linear":  # (PEFT's: every linear layer but the output head)
            return name != "lm_head"
        if isinstance(targets, str):
            return regex.fullmatch(name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    return covers


def _fill_uncovered_layers(flat: dict, c: dict, cfg: ModelConfig, r: int, where: str,
                           weights: str) -> None:  # fmt: skip
    """Completes `flat` (kernel path -> {"a", "b"}) to every layer of each adapted module: a
    layer the adapter does not cover (PEFT's `layers_to_transform`, a `target_modules` regex
    naming some layers) gets zero factors — its update B·A is exactly zero, as in PEFT, and
    stays zero in training (both gradients vanish); export leaves it out again
    (`_drop_uncovered_layers`). A missing layer the config says is covered is an error naming
    the tensor (a truncated adapter, not a partial one)."""
    covers = _covers(c, where, cfg.n_layers)
    names = _kernel_names(cfg)
    kinds = sorted({k.split("/", 1)[1] for k in flat if k.startswith("layers_")})
    for i in range(cfg.n_layers):
        for kind in kinds:
            kernel = f"layers_{i}/{kind}"
            if kernel in flat:
                continue
            if covers(names[kernel]):
                raise HFError(
                    f"{weights}: no tensor {_PREFIX}{names[kernel]}.lora_A.weight, though "
                    f"{where} covers that module (target_modules={c.get('target_modules')!r}, "
                    f"layers_to_transform={c.get('layers_to_transform')!r})"
                )
            d_in, d_out = _kernel_dims(kernel, cfg)
            dt = cfg.weight_dtype
            flat[kernel] = {"a": np.zeros((d_in, r), dt), "b": np.zeros((r, d_out), dt)}


def _drop_uncovered_layers(tensors: dict, n_layers: int) -> tuple[dict, list[int] | None]:
    """(tensors, layers_to_transform) for export: the modules whose factors are both all zero
    (layers a partial PEFT adapter did not cover, zero-filled on import; a LoRA run's `a` is
    random, never zero) left out, with the layers that remain as `layers_to_transform` —
    when PEFT can express that: the same layers for every adapted module and no lm_head
    (which has no layer index). Otherwise the tensors as they are (zeros included: the same
    model once PEFT loads them), and None."""
    pairs = {k.split(".lora_")[0]: k for k in tensors if ".lora_A." in k}
    zero = {
        m
        for m, a in pairs.items()
        if not tensors[a].any() and not tensors[a.replace(".lora_A.", ".lora_B.")].any()
    }
    if not zero or zero == set(pairs):
        return tensors, None
    by_kind: dict[str, set] = {}
    for m in set(pairs) - zero:
        hit = re.fullmatch(rf"{re.escape(_PREFIX)}model\.layers\.(\d+)\.(.+)", m)
        if not hit:  # lm_head: PEFT adapts no module without a layer index then
            return tensors, None
        by_kind.setdefault(hit.group(2), set()).add(int(hit.group(1)))
    layer_sets = {frozenset(v) for v in by_kind.values()}
    if len(layer_sets) != 1:
        return tensors, None
    layers = sorted(next(iter(layer_sets)))
    kept = {k: v for k, v in tensors.items() if k.split(".lora_")[0] not in zero}
    return kept, (layers if len(layers) < n_layers else None)


def _kernel_names(cfg: ModelConfig) -> dict[str, str]:
    """flaxlm kernel path -> HF module name, for every kernel an adapter may target."""
    out = {}
    for i in range(cfg.n_layers):
        for ours, hf in _LAYER_MODULES.items():
            out[f"layers_{i}/{ours}/kernel"] = f"model.layers.{i}.{hf}"
    if not cfg.tie_embeddings:
        out["lm_head/kernel"] = "lm_head"
    return out


def _kernel_dims(kernel: str, cfg: ModelConfig) -> tuple[int, int]:
    """(flattened input, flattened output) size of a kernel, as the adapter factors see it."""
    D, N, K, H, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim_, cfg.d_ff,
                        cfg.vocab_size)  # fmt: skip
    name = kernel.split("/")[-2]
    return {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D),
            "gate": (D, F), "up": (D, F), "down": (F, D), "lm_head": (D, V)}[name]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Runs: a LoRA run's adapters out, an HF base + PEFT adapter in


def export_run_adapter(run_dir: str, path: str, step=None, dtype=None,
                       overwrite: bool = False, ema: bool = False) -> str:  # fmt: skip
    """Writes the adapters of a flaxlm LoRA run (latest or `step`; a PPO run's: its policy's;
    `ema`: their EMA, train/ema.py) as a PEFT adapter directory; its base_model_name_or_path is
    the HF checkpoint whose weights the adapters apply to, if one does (`_base_model`)."""
    import jax
    import jax.numpy as jnp

    from flaxlm.models.hf import check_export_target
    from flaxlm.models.transformer import Transformer
    from flaxlm.train import checkpoint as ckpt_lib
    from flaxlm.train.state import unbox

    check_export_target(run_dir, path)
    step, meta = ckpt_lib.read_meta(run_dir, step)
    spec = lora_lib.LoraSpec(**meta["lora"]) if (meta.get("lora") or {}).get("rank") else None
    if spec is None:
        raise HFError(f"{run_dir}: not a LoRA run (no lora rank in its checkpoint meta); "
                      "export the model without --adapter")  # fmt: skip
    head = meta.get("head", "lm")  # "policy_value": a PPO run, whose policy's adapters go out
    if head not in ("lm", "policy_value"):
        raise HFError(f"{run_dir}: a {head!r}-head run; PEFT adapters here are for causal "
                      "language models")  # fmt: skip
    cfg = ModelConfig.from_dict(meta["model_config"])
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    base = unbox(jax.eval_shape(
        lambda r: Transformer(cfg).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
        jax.random.PRNGKey(0)))  # fmt: skip
    tree = {"base": base, "lora": lora_lib.abstract_adapters(base, spec)}
    tree = {"policy": tree} if head == "policy_value" else tree
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), tree)
    loaded = ckpt_lib.load_params(run_dir, target, step, ema)
    lora = (loaded["policy"] if head == "policy_value" else loaded)["lora"]
    return save_adapter(cfg, lora, spec, path, base_model=_base_model(run_dir, meta),
                        dtype=dtype, overwrite=overwrite, arch=meta.get("hf_arch"))  # fmt: skip


def _base_model(run_dir: str, meta: dict) -> str:
    """The HF checkpoint whose weights a LoRA run's adapters apply to, or "" (with a warning)
    when no HF checkpoint holds them.

    A LoRA run's base is exactly what its `init_from` loaded: an "hf:DIR" checkpoint, or a
    flaxlm run's params (a LoRA run's merged). That is an HF checkpoint only for an imported
    run (its own `hf_source`: import-adapter) or an init_from that is a plain `hf import`. Any
    run that trained in between — full weights or LoRA, whose adapters init_from merges — left
    weights no HF directory holds: naming the HF checkpoint further up would pair the adapter
    with another model (PEFT would load it without a word). base_model_name_or_path is then
    left unset (a flaxlm run directory is nothing PEFT or transformers can load) and the
    warning says which run to export whole as the base."""
    import warnings

    from flaxlm.train import checkpoint as ckpt_lib

    if meta.get("hf_source"):
        return _text_only_base(run_dir, meta["hf_source"])
    src = (meta.get("config") or {}).get("init_from") or ""
    if src.startswith("hf:"):
        return _text_only_base(run_dir, os.path.abspath(src[3:]))
    if not src:
        return ""  # trained from scratch: its base is the random init, nothing to name
    why = f"init_from={src} is not a run directory (it may be relative to another cwd)"
    if os.path.isdir(os.path.join(src, "checkpoints")):
        src_meta = ckpt_lib.read_meta(src)[1]
        if src_meta.get("hf_source") and not (src_meta.get("lora") or {}).get("rank"):
            # a plain `hf import`: its weights are the HF dir's
            return _text_only_base(run_dir, src_meta["hf_source"])
        why = (f"init_from={src} is a trained flaxlm run ({src_meta.get('task', '?')}), "
               "whose weights no HF checkpoint holds")  # fmt: skip
    warnings.warn(
        f"PEFT export of {run_dir}: its adapters apply to the weights of its init_from, and "
        f"{why}; base_model_name_or_path is left unset. Export the base whole first "
        f"(python -m flaxlm.models.hf export {src} BASE_DIR) and load the adapter onto BASE_DIR",
        stacklevel=2,
    )
    return ""


def _text_only_base(run_dir: str, hf_dir: str) -> str:
    """`hf_dir`, unless it is an image-text checkpoint (hf_arch.MULTIMODAL: Gemma 3 4B-27B):
    the adapter names the text model's modules (model.layers.N...), which such a checkpoint
    holds under its language model, and its vision tower has q_proj/v_proj of its own, so
    PEFT would attach the adapter to none of the tuned modules (or to the wrong ones) without a
    word. Then "" with a warning naming the text-only base to export."""
    import warnings

    try:
        model_type = load_hf_json(hf_dir).get("model_type")
    except (OSError, ValueError, HFError):  # moved or unreadable: named as recorded
        return hf_dir
    if model_type not in MULTIMODAL:
        return hf_dir
    warnings.warn(
        f"PEFT export of {run_dir}: its base {hf_dir} is an image-text checkpoint "
        f"({model_type}), whose text model's modules PEFT would not find under the adapter's "
        f"names; base_model_name_or_path is left unset. Load the adapter onto the text model "
        f"alone: python -m flaxlm.models.hf import {hf_dir} RUN0, then python -m "
        f"flaxlm.models.hf export RUN0 BASE_DIR ({MULTIMODAL[model_type][0]})",
        stacklevel=3,
    )
    return ""


def import_adapter_to_run(hf_dir: str, adapter_dir: str, run_dir: str) -> str:
    """Writes an HF base checkpoint plus a PEFT adapter as a flaxlm LoRA run (step 0): its
    checkpoint holds {"base", "lora"} and its meta the LoRA spec, so `generate`, evaluation and
    `init_from` read the adapted model (merged), and export --adapter gives the adapter back."""
    from flaxlm.models import hf
    from flaxlm.train.checkpoint import Checkpointer

    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        raise HFError(f"import: {run_dir} already holds checkpoints; import into a new directory")
    cfg, params = hf.load_pretrained(hf_dir)
    spec, lora = load_adapter(adapter_dir, cfg)
    meta = {
        "model_config": cfg.to_dict(), "task": "hf_import", "head": "lm",
        "lora": spec.to_dict(), "hf_source": os.path.abspath(hf_dir),
        "hf_arch": hf.text_config(hf.load_hf_json(hf_dir))["model_type"],
        "peft_source": os.path.abspath(adapter_dir),
    }  # fmt: skip
    if tok_file := hf.tokenizer_file(hf_dir):  # (a flaxlm export's: its tokenizer.model)
        hf.load_tokenizer(tok_file, cfg.vocab_size)
        os.makedirs(run_dir, exist_ok=True)
        hf.copy_tokenizer(hf_dir, run_dir)
        meta["tokenizer"] = os.path.join(os.path.abspath(run_dir), os.path.basename(tok_file))
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(0, {"params": {"base": params, "lora": lora}}, meta=meta)
    ckpt.close()
    return run_dir
