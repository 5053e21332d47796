"""The checkpoints `python -m flaxlm.train.merge` reads: which, whether they can be merged, and
their params one group of tensors at a time.

`resolve` turns `RUN[@STEP]` and `hf:DIR` arguments (and `--last N`) into `Source`s, each one
step of one run with its meta, or one Hugging Face checkpoint directory with the meta its import
(`python -m flaxlm.models.hf import`) would write: the model config flaxlm derives from its
config.json, its tokenizer (the directory's tokenizer files), its architecture; the same
spelling `init_from=hf:DIR` uses. `check_compatible` refuses, naming the input and the key,
tensor or file, inputs that are not the same model (model config but its execution-only keys and
the storage dtype `param_dtype`, the saved tensors' shapes) or not the same tokenizer (the
vocabulary file's bytes: a run's tokenizer.model against an HF directory's tokenizer.model,
tokenizer.json against tokenizer.json), and kinds of run the merge does not take (a reward
model); `read` gives a group of an input's language-model tensors: a plain run's params, a LoRA
run's base with its adapters merged in, a PPO run's policy (its critic left out), each as
alignment/common.py `load_lm_params` reads them, an HF checkpoint's from its safetensors shards,
but for a subset of the tensors (`load_params`' partial read; hf_weights
`read_params(only=...)`, which reads only those tensors' data from the memory-mapped shards), so
that no whole model of an input is ever in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax

from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.checkpoint_compat import EXECUTION_ONLY_MODEL_KEYS, _normal_model_config

HF_PREFIX = "hf:"  # an HF checkpoint directory, as init_from=hf:DIR names one


class MergeError(ValueError):
    """Inputs or arguments that cannot be merged; the message names the run, key or file."""


@dataclasses.dataclass(frozen=True)
class Source:
    run: str  # absolute run directory (an HF input: its checkpoint directory)
    step: int | None  # None for an HF input (one set of weights)
    ema: bool  # its EMA weights rather than its params
    meta: dict
    hf: bool = False  # an HF checkpoint directory (`hf_source`), not a flaxlm run

    @property
    def label(self) -> str:
        return f"{HF_PREFIX}{self.run}" if self.hf else f"{self.run}@{self.step}"

    @property
    def lora(self):
        from flaxlm.models import lora as lora_lib

        spec = self.meta.get("lora") or {}
        return lora_lib.LoraSpec(**spec) if spec.get("rank") else None

    @property
    def policy(self) -> bool:  # a PPO run: {"policy": LM, "value": critic}
        return self.meta.get("head") == "policy_value"

    def record(self) -> dict:
        """What the merged run's meta says of this input (an HF input's run: "hf:DIR")."""
        if self.hf:
            return {"run": self.label, "step": None, "ema": False, "task": self.meta["task"],
                    "read": "hf safetensors"}  # fmt: skip
        kind = "ppo policy" if self.policy else "lm"
        return {"run": self.run, "step": self.step, "ema": self.ema,
                "task": self.meta.get("task"), "read": kind + (" (LoRA merged)" if self.lora
                                                               else "")}  # fmt: skip


def parse(text: str) -> tuple[str, int | None]:
    """'RUN@STEP' -> (RUN, STEP); 'RUN' -> (RUN, None). Only digits after the last '@' make a
    step, so a path holding '@' elsewhere stays a path."""
    run, at, step = text.rpartition("@")
    if at and run and step.isdigit():
        return run, int(step)
    return text, None


def source(text: str, step: int | None, ema: bool) -> Source:
    """The Source of run `text` at `step` (None: its latest), its meta read (no array)."""
    run = os.path.abspath(text)
    try:
        step, meta = ckpt_lib.read_meta(run, step)
    except ckpt_lib.CheckpointError as e:
        if _looks_hf(run):  # (read_meta's hint names load_pretrained and import, not hf:)
            raise MergeError(f"{text}: a Hugging Face checkpoint directory (config.json, "
                             f"*.safetensors), not a flaxlm run: give it as "
                             f"{HF_PREFIX}{text}") from None  # fmt: skip
        raise MergeError(f"{text}: {e}") from None
    src = Source(run, step, ema, meta)
    if meta.get("head") == "scalar":
        raise MergeError(f"{src.label}: a reward-model run (scalar head); merging reward models "
                         "is not supported, only language models (plain, LoRA, a PPO "
                         "run's policy)")  # fmt: skip
    if "model_config" not in meta:
        raise MergeError(f"{src.label}: its meta has no model_config (task "
                         f"{meta.get('task')!r}); not a language-model run")  # fmt: skip
    if ema:
        keys = ckpt_lib.saved_state_keys(os.path.join(run, "checkpoints", str(step)))
        if keys is not None and "ema" not in keys:
            raise MergeError(f"{src.label}: --ema, but this step holds no EMA of the weights (its "
                             "run trained with ema.decay=0, or it is an import); leave --ema "
                             "out to merge its params")  # fmt: skip
    return src


def _looks_hf(path: str) -> bool:
    """Whether `path` is laid out as an HF checkpoint directory (config.json and safetensors)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith((".safetensors", ".safetensors.index.json")) for f in os.listdir(path)
    )


def hf_source(text: str, ema: bool) -> Source:
    """The Source of `text` = "hf:DIR": the meta `python -m flaxlm.models.hf import` would
    write for DIR (model config from config.json, tokenizer, architecture), so that the checks
    and the merged run's meta treat it as its import; no tensor read. A missing directory, one
    that is not an HF checkpoint (no config.json, no safetensors), an architecture flaxlm does
    not build, a tokenizer that does not fit the model, or `ema`: a MergeError naming `text`."""
    from flaxlm.models import hf_weights
    from flaxlm.models.hf import load_config, load_hf_json, load_tokenizer, text_config
    from flaxlm.models.hf_tokenizer import HFError, tokenizer_file

    path = os.path.abspath(os.path.expanduser(text[len(HF_PREFIX) :]))
    if ema:
        raise MergeError(f"{text}: --ema, but an HF checkpoint holds no EMA of the weights; "
                         "leave --ema out, or merge it as --base")  # fmt: skip
    if not os.path.isdir(path):
        raise MergeError(f"{text}: no such directory ({path})")
    try:
        cfg = load_config(path)  # (an unsupported model_type: an HFError naming config.json)
        hf_weights._shard_files(path)  # weights there (their tensors: `_check_shapes`)
        tok = tokenizer_file(path)
        if tok:  # the merged run may copy it: one that does not fit fails here, as on import
            load_tokenizer(tok, cfg.vocab_size)
        arch = text_config(load_hf_json(path))["model_type"]
    except HFError as e:
        raise MergeError(f"{text}: {e}") from None
    # task "hf_import": what merging its import would record (evaluation's --chat auto, ...)
    meta = {"model_config": cfg.to_dict(), "task": "hf_import", "head": "lm", "lora": {},
            "hf_source": path, "hf_arch": arch, "tokenizer": path if tok else ""}  # fmt: skip
    return Source(path, None, False, meta, hf=True)


def argument(text: str, ema: bool) -> Source:
    """The Source of one RUN[@STEP] or hf:DIR argument (an input, or --base)."""
    if text.startswith(HF_PREFIX):
        return hf_source(text, ema)
    return source(*parse(text), ema)


def resolve(args: list[str], last: int | None, ema: bool) -> list[Source]:
    """The Sources of the RUN[@STEP] and hf:DIR arguments: with `last`, each RUN's `last`
    newest steps (newest first); a RUN@STEP or an hf:DIR with `last` is an error, as is an input
    given twice."""
    out = []
    for text in args:
        if last is None:
            out.append(argument(text, ema))
            continue
        if text.startswith(HF_PREFIX):
            raise MergeError(f"{text}: --last {last} takes a run's newest steps; an HF checkpoint "
                             "has one set of weights (merge HF inputs without --last)")  # fmt: skip
        run, step = parse(text)
        if step is not None:
            raise MergeError(f"{text}: --last {last} takes a run's newest steps; give RUN, not "
                             "RUN@STEP")  # fmt: skip
        steps = ckpt_lib.run_steps(run)
        if len(steps) < last:
            raise MergeError(f"{run}: --last {last}, but it has {len(steps)} checkpoint step(s): "
                             f"{sorted(steps) or 'none'}")  # fmt: skip
        out += [source(run, s, ema) for s in steps[:last]]
    seen: set[str] = set()
    for s in out:
        if s.label in seen:
            raise MergeError(f"{s.label} is given twice; weigh an input with --weights instead")
        seen.add(s.label)
    return out


# Model config keys merged inputs may differ in: how a model runs, and the dtype its weights are
# stored in (a float32 fine-tune of a bfloat16 or float16 HF checkpoint merged with it as --base;
# `read_target` then reads every input in float32).
MERGE_NEUTRAL_KEYS = EXECUTION_ONLY_MODEL_KEYS | {"param_dtype"}


def _model(meta: dict) -> dict:
    cfg = json.loads(json.dumps(_normal_model_config(meta["model_config"])))
    return {k: v for k, v in cfg.items() if k not in MERGE_NEUTRAL_KEYS}


def param_dtype(src: Source) -> str:
    return str(src.meta["model_config"].get("param_dtype", "float32"))


def read_target(sources: list[Source], target):
    """The tree the inputs' tensors are read into: `target` (the first input's dtypes) when
    every input stores its params in that dtype, else `target` with its floating leaves in
    float32, so that no input is rounded to a narrower dtype before the (float32) merge; the
    result is cast to the first input's dtype at the end, as always."""
    if len({param_dtype(s) for s in sources}) == 1:
        return target

    def widen(s):
        if not jax.numpy.issubdtype(s.dtype, jax.numpy.floating):
            return s
        return jax.ShapeDtypeStruct(s.shape, jax.numpy.float32, sharding=s.sharding)

    return jax.tree.map(widen, target)


def tokenizer_digest(src: Source) -> tuple[str, str | None]:
    """(the tokenizer file the meta names, the sha256 of its bytes), ("", None) for none."""
    from flaxlm.models.hf_tokenizer import tokenizer_file

    path = src.meta.get("tokenizer") or ""
    if not path:
        return "", None
    file = (tokenizer_file(path) or path) if os.path.isdir(path) else path
    try:
        with open(file, "rb") as f:
            return file, hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise MergeError(f"{src.label}: cannot read its tokenizer {file}: {e}") from None


def check_compatible(sources: list[Source], target) -> None:
    """Refuses inputs that are not one model with one tokenizer, naming the run and the model
    config key (both values), the tensor (both shapes) or the tokenizer files. `target`: the
    first input's parameter shapes."""
    first = sources[0]
    want, (want_tok, want_hash) = _model(first.meta), tokenizer_digest(first)
    for src in sources[1:]:
        got = _model(src.meta)
        diff = [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
        if diff:
            lines = "".join(f"\n  model_config.{k}: {got.get(k, '<absent>')!r} there, "
                            f"{want.get(k, '<absent>')!r} in {first.label}"
                            for k in diff)  # fmt: skip
            raise MergeError(
                f"{src.label} is another model than {first.label}:{lines}\nOnly the execution "
                f"keys ({', '.join(sorted(EXECUTION_ONLY_MODEL_KEYS))}) and param_dtype may "
                "differ."
            )
        tok, digest = tokenizer_digest(src)
        if digest != want_hash:
            raise MergeError(
                f"{src.label} has another tokenizer than {first.label}: "
                f"{tok or 'none'} there, {want_tok or 'none'} in {first.label}"
                + (" (their bytes differ)" if tok and want_tok else "")
            )
    for src in sources:
        _check_shapes(src, target)


def _check_shapes(src: Source, target) -> None:
    """The saved language-model tensors of `src` against `target`'s shapes (tree metadata: no
    array read); unknown metadata is left to the read to report."""
    if src.hf:
        _read_hf(src, set(), target)  # every tensor checked from the headers; none read
        return
    tree = ckpt_lib._saved_tree(os.path.join(src.run, "checkpoints", str(src.step)))
    params = tree.get("params") if isinstance(tree, dict) else None
    if not isinstance(params, dict):
        return
    if src.policy:
        params = params.get("policy") or {}
    if src.lora:
        params = params.get("base") or {}
    for path, want in flat(target).items():
        node = params
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        name = "/".join(path)
        if node is None:
            raise MergeError(f"{src.label}: has no tensor {name}, which its model config "
                             "gives")  # fmt: skip
        shape = getattr(node, "shape", None)
        if shape is not None and tuple(shape) != tuple(want.shape):
            raise MergeError(f"{src.label}: tensor {name} has shape {tuple(shape)}; the model "
                             f"config gives {tuple(want.shape)}")  # fmt: skip


def flat(tree) -> dict[tuple, object]:
    """{(key, ...): leaf} of a nested dict of arrays."""
    return {tuple(str(getattr(k, "key", k)) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def nest(items) -> dict:
    """The nested dict of `items` ((key, ...), leaf)."""
    out: dict = {}
    for path, x in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = x
    return out


def _read_hf(src: Source, only: set[tuple], target) -> dict[tuple, jax.Array]:
    """{path: array} of the params `only` of the HF input `src`, read from its safetensors
    shards (the others checked from the headers), in `target`'s dtypes and shardings; an
    unreadable or mismatched tensor is a MergeError naming the input and the tensor."""
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.hf import load_hf_json
    from flaxlm.models.hf_tokenizer import HFError
    from flaxlm.models.hf_weights import read_params

    want = flat(target)
    cfg = ModelConfig.from_dict(src.meta["model_config"])
    try:  # (its model_type, not text_config's: a multimodal checkpoint's text-model prefix)
        arch = load_hf_json(src.run).get("model_type")
        got = read_params(src.run, cfg, arch, only=only, place=lambda p: want[p].sharding)
    except HFError as e:
        raise MergeError(f"{src.label}: {e}") from None
    return {p: x if x.dtype == want[p].dtype else x.astype(want[p].dtype)
            for p, x in flat(got).items()}  # fmt: skip


def read(src: Source, sub, full) -> dict[tuple, jax.Array]:
    """{path: array} of `src`'s language-model tensors for the subtree `sub` of the model's
    target `full` (ShapeDtypeStructs with shardings), in the target's dtype and shardings."""
    from flaxlm.alignment.common import replicated_like
    from flaxlm.models import lora as lora_lib

    if src.hf:
        return _read_hf(src, set(flat(sub)), full)
    tree, spec = sub, src.lora
    if spec is not None:  # the adapters of the kernels of `sub` (none: its base alone)
        keep = set(flat(sub))
        adapters = [(p, x) for p, x in flat(lora_lib.abstract_adapters(full, spec)).items()
                    if p[:-1] in keep]  # fmt: skip
        tree = {"base": sub}
        if adapters:
            tree["lora"] = replicated_like(nest(adapters), sub)
    if src.policy:
        tree = {"policy": tree}
    got = ckpt_lib.load_params(src.run, tree, src.step, ema=src.ema, key=f"merge {src.label}")
    if src.policy:
        got = got["policy"]
    if spec is not None:
        got = lora_lib.merge(got, spec) if "lora" in got else got["base"]
    return flat(got)
