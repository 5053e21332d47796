"""The checkpoints `python -m flaxlm.train.merge` reads: which, whether they can be merged, and
their params one group of tensors at a time.

`resolve` turns `RUN[@STEP]` arguments (and `--last N`) into `Source`s, each one step of one
run with its meta; `check_compatible` refuses, naming the run and the key, tensor or file,
inputs that are not the same model (model config but its execution-only keys, the saved
tensors' shapes) or not the same tokenizer (the vocabulary file's bytes), and kinds of run the
merge does not take (a reward model); `read` gives a group of an input's language-model
tensors: a plain run's params, a LoRA run's base with its adapters merged in, a PPO run's
policy (its critic left out), each as alignment/common.py `load_lm_params` reads them, but for
a subset of the tensors (`load_params`' partial read), so that no whole model of an input is
ever in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax

from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.checkpoint_compat import EXECUTION_ONLY_MODEL_KEYS, _normal_model_config


class MergeError(ValueError):
    """Inputs or arguments that cannot be merged; the message names the run, key or file."""


@dataclasses.dataclass(frozen=True)
class Source:
    run: str  # absolute run directory
    step: int
    ema: bool  # its EMA weights rather than its params
    meta: dict

    @property
    def label(self) -> str:
        return f"{self.run}@{self.step}"

    @property
    def lora(self):
        from flaxlm.models import lora as lora_lib

        spec = self.meta.get("lora") or {}
        return lora_lib.LoraSpec(**spec) if spec.get("rank") else None

    @property
    def policy(self) -> bool:  # a PPO run: {"policy": LM, "value": critic}
        return self.meta.get("head") == "policy_value"

    def record(self) -> dict:
        """What the merged run's meta says of this input."""
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


def resolve(args: list[str], last: int | None, ema: bool) -> list[Source]:
    """The Sources of the RUN[@STEP] arguments: with `last`, each RUN's `last` newest steps
    (newest first); a RUN@STEP and `last` together is an error, as is an input given twice."""
    out = []
    for text in args:
        run, step = parse(text)
        if last is None:
            out.append(source(run, step, ema))
            continue
        if step is not None:
            raise MergeError(f"{text}: --last {last} takes a run's newest steps; give RUN, not "
                             "RUN@STEP")  # fmt: skip
        steps = ckpt_lib.run_steps(run)
        if len(steps) < last:
            raise MergeError(f"{run}: --last {last}, but it has {len(steps)} checkpoint step(s): "
                             f"{sorted(steps) or 'none'}")  # fmt: skip
        out += [source(run, s, ema) for s in steps[:last]]
    seen: dict[tuple, str] = {}
    for s in out:
        if (s.run, s.step) in seen:
            raise MergeError(f"{s.label} is given twice; weigh an input with --weights instead")
        seen[(s.run, s.step)] = s.label
    return out


def _model(meta: dict) -> dict:
    cfg = json.loads(json.dumps(_normal_model_config(meta["model_config"])))
    return {k: v for k, v in cfg.items() if k not in EXECUTION_ONLY_MODEL_KEYS}


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
                f"keys ({', '.join(sorted(EXECUTION_ONLY_MODEL_KEYS))}) may differ."
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


def read(src: Source, sub, full) -> dict[tuple, jax.Array]:
    """{path: array} of `src`'s language-model tensors for the subtree `sub` of the model's
    target `full` (ShapeDtypeStructs with shardings), in the target's dtype and shardings."""
    from flaxlm.alignment.common import replicated_like
    from flaxlm.models import lora as lora_lib

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
