"""What the alignment tasks beyond SFT/RM share (PPO, GRPO, DPO): the `rollout` config section,
RL prompts, frozen reference / reward models placed like the trained params, and a held-out
evaluation by greedy generation.

Prompts (`load_prompts`): records with a `prompt` (text or messages) and an optional `meta`
(the built-in world's judge needs it), rendered with the chat template up to the assistant
header. Bad input: prompts longer than `rollout.max_prompt_len` tokens follow `data.overlength`
— truncate_left (oldest tokens cut, BOS and the generation header kept; counted in the data
report) or drop (counted); malformed records are dropped and counted (strict mode raises with
file:line).

Frozen models (`frozen_lm`, `frozen_scalar`): loaded from a run directory (LoRA adapters merged),
sharded with the training run's logical rules, optionally in bfloat16 or with int8 projection
weights (`rollout.frozen_dtype`, DPO/KTO `ref_dtype`, distillation's `teacher_dtype`): they are
never differentiated, so lower precision costs little and halves or quarters their memory. With
`ema=True` they are the run's EMA weights: the reference of a run started with `init_from_ema`
(it is the policy the run starts from), the reward model with `reward_from_ema`
(`reward_from_ema` below).

Held-out evaluation (`make_policy_eval`): greedy (and optionally sampled) answers to held-out
prompts, scored by the built-in world's judge (exact match of "The answer is X.") when the
records carry its meta, and by a reward model when one is given. The RL tasks can hold out
whole questions of their own prompt set (`rollout.heldout_prompts`, `split_prompts`: every
paraphrase of a held-out question stays out of training), and any evaluation example asking a
training question is removed (counted), so the metric is never measured on trained questions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxlm.alignment import common
from flaxlm.alignment.sft import eval_gen_config
from flaxlm.data import formats as F
from flaxlm.data.synthetic_judge import TASKS
from flaxlm.models import lora as lora_lib
from flaxlm.models import quant
from flaxlm.models.config import ModelConfig
from flaxlm.models.decode import generate, prompt_keys
from flaxlm.models.heads import scalar_model_fns, sequence_values
from flaxlm.models.sharding import fetch, global_batch, use_mesh
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import param_shardings


def size_rollout_rows(c: ml_collections.ConfigDict, seq_cap: int) -> None:
    """Sets the prompt and response caps within `seq_cap` (64 and 32 tokens at most: the
    built-in world's questions and answers) and `seq_len` to their sum. A rollout row holds one
    prompt and its response, so a wider row would be pure padding in every score and train pass
    (80-90% of the compute at 512-1024). Raising a cap on the command line needs seq_len raised
    with it (the rollout checks)."""
    c.rollout.max_prompt_len = min(64, seq_cap // 2)
    c.rollout.max_new_tokens = min(32, seq_cap - c.rollout.max_prompt_len)
    c.seq_len = c.rollout.max_prompt_len + c.rollout.max_new_tokens


def rollout_config(batch: int, max_new_tokens: int = 24) -> ml_collections.ConfigDict:
    """The `rollout` section shared by PPO and GRPO."""
    c = ml_collections.ConfigDict()
    c.batch = batch  # sequences generated per rollout (GRPO: prompts × group size)
    c.epochs = 1  # passes over each rollout, in minibatches of `batch_size` rows
    c.max_prompt_len = 64  # prompts beyond this are cut from the left or dropped (data.overlength)
    c.max_new_tokens = max_new_tokens  # response budget (the decode loop's bound)
    c.temperature = 1.0  # sampling T; RL logprobs are of softmax(logits / T) too (0: greedy, at 1)
    c.top_k = 0  # 0 = off
    c.top_p = 1.0  # 1 = off
    c.min_p = 0.0  # drop tokens below min_p × the most likely one's probability; 0 = off
    c.check_every = 1  # test "all responses stopped" every this many tokens (GPU: a host read each)
    # strings that also end a response once its text holds one, e.g. ("</answer>",): inside
    # the decode loop (models/stop_strings.py); the string stays in the text rewards judge
    c.stop_strings = ()
    # auto | xla | pallas: each decode step's attention as one Pallas kernel ("auto": on CUDA
    # GPUs, where it is faster; XLA's elsewhere — models/decode.py `generate`)
    c.decode_attention = "auto"
    # auto | xla | cublas: the decoder's matmuls on GPUs ("auto": cuBLAS calls with q|k|v and
    # gate|up concatenated once per rollout, on CUDA GPUs for float weights — 11% faster per
    # 1.1B step on the H200; XLA's Triton gemms otherwise — models/decode.py `generate`)
    c.decode_gemm = "auto"
    # xla | pallas | pallas:BN:BK:W:S: each decode step's silu(gate)·up as one Pallas kernel
    # (models/decode_mlp.py; GPUs) — and xla | fold: the pre-norms folded into the projections,
    # divided out inside the attention and gate|up kernels (5 kernels per layer instead of 8
    # with both). Candidates measured on the H200 before they become defaults (bench/RESULTS.md)
    c.decode_mlp = "xla"
    c.decode_norm = "xla"
    # KV cache dtype of the decoder: "" = the model's compute dtype; "int8" stores keys and
    # values as int8 with a scale per token and head (53% of bf16's bytes at head dim 64: longer
    # responses or more rows in the same memory; the decoder's logprobs then drift from the
    # trainer's, logged as rollout/logprob_gap)
    c.cache_dtype = ""
    c.empty_reward = -1.0  # reward of an empty response (the stop token alone)
    c.nonstop_penalty = 0.0  # subtracted from responses that hit max_new_tokens without stopping
    c.heldout_prompts = 0  # prompts of data.train kept out of training, evaluated as rl_heldout
    # dtype of the frozen reference / reward models: bfloat16 halves their bytes; int8 keeps
    # their projection matrices in int8 (bf16 compute, models/quant.py): a quarter of float32
    c.frozen_dtype = "float32"
    # scoring and training see rows cut to the narrowest of seq_len·k/4 (k = 1..4) that holds
    # the rollout's (minibatch's) tokens: less padding computed, 4 programs at most; 1 = off
    c.trim_buckets = 4
    return c


def rl_run_config(c: ml_collections.ConfigDict, lr: float, runlocal: bool) -> None:
    """What the RL configs (PPO, GRPO, online DPO) share after their own sections: held-out
    greedy and sampled accuracy (`eval_gen`, the world's held-out questions, prompts cut as
    the rollouts' — `eval_gen.max_prompt_len` follows `rollout.max_prompt_len` unless set
    itself; `rollout.heldout_prompts` RL prompts kept out), a constant learning rate after a
    short warmup with Adam's β2 = 0.999 and no weight decay, and the evaluation / checkpoint
    cadence."""
    c.eval_gen = eval_gen_config("builtin:sft_heldout")  # held-out greedy accuracy
    # Follows rollout.max_prompt_len, also when that is set on the command line (identity(): a
    # reference of its own, so setting eval_gen.max_prompt_len leaves the rollout's alone).
    c.eval_gen.max_prompt_len = c.rollout.get_ref("max_prompt_len").identity()
    c.eval_gen.sample_temperature = 1.0  # also report the accuracy of samples (0: off)
    c.eval_gen.samples = 1  # ...this many per prompt
    c.rollout.heldout_prompts = 0 if runlocal else 200  # evaluated as eval/rl_heldout/...
    c.opt.lr = lr
    c.opt.schedule = "constant"
    c.opt.warmup_steps = max(c.total_steps // 20, 1)
    c.opt.weight_decay = 0.0
    c.opt.b2 = 0.999
    c.eval_every = c.total_steps // 2 if runlocal else 64
    c.ckpt_every = c.total_steps if runlocal else 256
    c.log_every = 4
    if runlocal:
        c.eval_gen.examples = 32
        c.eval_gen.batch = 32
        c.eval_gen.max_new_tokens = 16


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(spec: str, config, template, report: F.DataReport) -> list[dict]:
    """Rendered generation prompts {"ids", "meta", "loc", "messages" (the prompt as chat turns)}
    of every record in `spec`."""
    d, fields = config.data, config.data.fields
    max_len = config.rollout.max_prompt_len
    out = []
    for obj, loc in common.records(spec, d, report):
        try:
            if not isinstance(obj, dict):
                raise F.FormatError("bad_record", "record is not a JSON object")
            # (a null prompt is none: a parquet row of a file that mixes both forms)
            key = fields.prompt if F.has(obj, fields.prompt) else fields.messages
            prompt = F.prompt_messages(obj.get(key), fields)
            tools = F.record_tools(obj, fields)
            meta = F.record_meta(obj, fields)
            with F.naming_record(loc):
                full, _ = F.render_prompt(prompt, template, 1 << 30, tools=tools)
                if len(full) > max_len and d.overlength == "drop":
                    raise F.FormatError("too_long", f"{len(full)} prompt tokens > {max_len}")
                ids, cut = F.render_prompt(prompt, template, max_len, tools=tools)
        except F.FormatError as e:
            report.bad(e.reason, loc, str(e))
            continue
        if cut:
            report.truncation(loc, cut)
        report.used += 1
        report.tokens += len(ids)
        out.append({"ids": np.asarray(ids, np.int32), "meta": meta, "loc": loc,
                    "messages": prompt})  # fmt: skip
    return out


class PromptCursor:
    """Prompt indices in a per-epoch shuffled order; state is (epoch, position). The same on
    every process: a rollout is drawn whole by each (alignment/rl_rollout.py)."""

    def __init__(self, n: int, seed: int):
        self.idx = np.arange(n)
        if not n:
            raise ValueError("no prompts")
        self.seed, self.epoch, self.pos = seed, 0, 0

    def _order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.idx)

    def take(self, k: int) -> list[int]:
        out, order = [], self._order()
        while len(out) < k:
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            out.append(int(order[self.pos]))
            self.pos += 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, st: dict) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])


# ---------------------------------------------------------------------------------------------
# Frozen models (reference policy, reward model)


def _placed_target(init_params, mesh, rules):
    """ShapeDtypeStructs of `init_params`'s (unboxed) params with the training shardings: a
    frozen model is read straight into them, each device (of each process) reading its part."""
    abstract, shardings = param_shardings(init_params, jax.random.PRNGKey(0), mesh, rules)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )


def _cast(params, dtype: str):
    """Floating params cast to `dtype`, each keeping its sharding (one jitted call)."""
    dt = jnp.dtype(dtype)
    cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def reward_from_ema(config) -> bool:
    """Whether the reward model (`reward_from`: PPO's scorer and critic start, GRPO's and
    online DPO's "rm") is that run's EMA weights (`reward_from_ema`) instead of its params.
    Checked when set, before anything is loaded: an unset `reward_from` or a run saved without
    an EMA is an error naming the key and the run."""
    if not config.get("reward_from_ema", False):  # (configs older than the key: params)
        return False
    ckpt_lib.check_ema_source(config.get("reward_from", ""), "reward_from_ema", "reward_from")
    return True


FROZEN_DTYPES = ("float32", "bfloat16", "int8")


def _check_frozen_dtype(dtype: str, key: str) -> None:
    if dtype not in FROZEN_DTYPES:
        raise ValueError(f"{key}={dtype!r}; expected one of {FROZEN_DTYPES}")


def _frozen(cfg: ModelConfig, params, dtype: str):
    """(cfg, params) of a frozen model kept in `dtype`: float32 or bfloat16 cast; "int8":
    bfloat16 compute with int8 projection weights and a scale per output channel
    (models/quant.py, as int8 decoding): a quarter of float32's bytes for the matrices, each
    matmul's output scaled (no dequantized copy)."""
    compute = "bfloat16" if dtype == "int8" else dtype
    if dtype == "int8":  # from the stored weights, then the rest cast (as int8 decoding does)
        params = jax.jit(quant.quantize_params)(params)
    return cfg.replace(dtype=compute, param_dtype=compute), _cast(params, compute)


def frozen_lm(source: str, mesh, rules, dtype: str = "float32", ema: bool = False,
              key: str = "frozen dtype"):  # fmt: skip
    """(cfg, apply, params) of a language model run (plain or LoRA-merged) or "hf:DIR", frozen,
    placed with the training rules; kept and computed in `dtype` (`_frozen`; `key`: the
    config key that set it, for errors). `ema`: the run's EMA weights (an HF source, or a run
    without them, is an error)."""
    meta = common.source_meta(source)
    if meta.get("model_config"):
        cfg = ModelConfig.from_dict(meta["model_config"])
    elif source.startswith(common.HF_PREFIX):
        from flaxlm.models import hf

        cfg = hf.load_config(source[len(common.HF_PREFIX) :])
    else:
        raise ValueError(f"{source}: no model_config in its checkpoint meta")
    _check_frozen_dtype(dtype, key)  # (before anything is loaded)
    init, _ = model_fns(cfg)
    params = common.load_lm_params(source, _placed_target(init, mesh, rules), ema=ema)
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, model_fns(cfg)[1], params


def load_scalar_params(run_dir: str, target, ema: bool = False):
    """A scalar-head run's {"transformer", "head"} params (LoRA adapters merged) like `target`
    (`ema`: its EMA weights)."""
    step, meta = ckpt_lib.read_meta(run_dir)  # the params below come from this step
    if meta.get("head") != "scalar":
        raise ValueError(f"{run_dir}: not a reward-model run (meta head={meta.get('head')!r})")
    spec = lora_lib.LoraSpec(**meta["lora"]) if meta.get("lora", {}).get("rank") else None
    if spec is None:
        return ckpt_lib.load_params(run_dir, target, step, ema)
    adapters = common.replicated_like(lora_lib.abstract_adapters(target, spec), target)
    both = ckpt_lib.load_params(run_dir, {"base": target, "lora": adapters}, step, ema)
    return lora_lib.merge(both, spec)


def frozen_scalar(run_dir: str, mesh, rules, dtype: str = "float32", ema: bool = False,
                  key: str = "frozen dtype"):  # fmt: skip
    """(cfg, apply, params) of a reward-model run, frozen (see `frozen_lm`; `ema`: its EMA
    weights). The scalar head stays in the compute dtype with "int8"."""
    _check_frozen_dtype(dtype, key)
    cfg = ModelConfig.from_dict(ckpt_lib.read_meta(run_dir)[1]["model_config"])
    init, _ = scalar_model_fns(cfg)
    params = load_scalar_params(run_dir, _placed_target(init, mesh, rules), ema)
    cfg, params = _frozen(cfg, params, dtype)
    return cfg, scalar_model_fns(cfg)[1], params


# ---------------------------------------------------------------------------------------------
# Rows of prompt + response, decoding


def rollout_rows(prompts: Sequence[np.ndarray], tokens, lengths, seq_len: int, pad_id: int,
                 width_name: str = "seq_len"):  # fmt: skip
    """Rows of prompts + their generated tokens (B, N): `tokens` = prompt + response,
    right-padded to `seq_len`; `loss_mask` marks the targets that are response tokens (see
    alignment/rl_rollout.py). `width_name`: what set `seq_len`, for the error."""
    B = len(prompts)
    out = F.empty_rows(B, seq_len, pad_id)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        ids = np.concatenate([p, tokens[b, :n]])
        L = len(ids)
        if L > seq_len:
            raise ValueError(f"rollout row {b}: {len(p)} prompt + {n} response tokens = {L} > "
                             f"the row width {seq_len} ({width_name})")  # fmt: skip
        out["tokens"][b, :L] = ids
        out["targets"][b, : L - 1] = ids[1:]
        out["segment_ids"][b, :L] = 1
        out["positions"][b, :L] = np.arange(L)
        out["loss_mask"][b, len(p) - 1 : L - 1] = 1.0
    return out


def stop_string_tuple(value, key: str = "rollout.stop_strings") -> tuple:
    """`rollout.stop_strings` as a tuple of non-empty strings (one string is a 1-tuple)."""
    strings = (value,) if isinstance(value, str) else tuple(value or ())
    if any(not isinstance(x, str) or not x for x in strings):
        raise ValueError(f"{key}={strings!r}: non-empty strings expected")
    return strings


def decode_responses(tok, tokens, lengths, stop_tokens, stop_strings=()
                     ) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """Response texts (stop token removed) and whether each row stopped: at a stop token, or
    holding one of `stop_strings` (kept in the text)."""
    stops, texts, stopped = set(stop_tokens), [], []
    for row, n in zip(tokens, lengths):
        ids = [int(t) for t in row[:n]]
        ended = bool(ids) and ids[-1] in stops
        texts.append(tok.decode(ids[:-1] if ended else ids))
        stopped.append(ended or any(s in texts[-1] for s in stop_strings))
    return texts, np.asarray(stopped, bool)


def reward_scorer(rm_apply):
    """jit (rm params, rows) -> (B,) reward-model score at each row's last real token."""

    def score(params, rows):
        values = rm_apply(params, rows["tokens"], rows["positions"], rows["segment_ids"])
        return sequence_values(values, rows["segment_ids"])

    return jax.jit(score)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


def question_key(prompt: dict) -> str:
    """Prompts with equal built-in-world `meta` ask the same question (the world's meta names
    the task, the entity or word and the answer: paraphrases share it); any other prompt is the
    question of its ids — your own meta may hold just the reference answer, which different
    questions share ("2 plus 5" and "3 plus 4")."""
    meta = prompt.get("meta") or {}
    if meta.get("task") in TASKS:
        return json.dumps(meta, sort_keys=True)
    return " ".join(map(str, prompt["ids"].tolist()))


def split_prompts(prompts: list[dict], n_heldout: int, seed: int):
    """(train, held-out) prompts: whole questions (`question_key`), drawn with a fixed seed,
    are held out until at least `n_heldout` prompts are, so no paraphrase of a held-out question
    is ever trained on."""
    if n_heldout <= 0:
        return prompts, []
    if n_heldout >= len(prompts):
        raise ValueError(f"rollout.heldout_prompts={n_heldout} >= {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(question_key(p), []).append(i)
    keys = sorted(groups)
    held: set[int] = set()
    for k in np.random.default_rng([seed, 7]).permutation(len(keys)):
        if len(held) >= n_heldout:
            break
        held.update(groups[keys[k]])
    train = [p for i, p in enumerate(prompts) if i not in held]
    return train, [prompts[i] for i in sorted(held)]


def training_prompts(config, template):
    """(train prompts, held-out prompts, data report) of an RL run: `data.train` loaded and
    checked, and `rollout.heldout_prompts` whole questions set aside (`split_prompts`)."""
    report = F.DataReport(strict=config.data.strict)
    prompts = load_prompts(config.data.train, config, template, report)
    prompts, held = split_prompts(prompts, config.rollout.heldout_prompts, config.seed)
    if not prompts:
        raise ValueError(f"data.train={config.data.train!r}: no usable prompts")
    return prompts, held, report


def policy_eval_and_report(config, cfg, template, prompts, held, report, mesh, rules, workdir,
                           rm=None):  # fmt: skip
    """(eval_fn(policy params) or None, data report) of an RL run: the `eval_gen` sets plus the
    held-out RL prompts and as many training prompts (a fixed sample, for comparison); the
    report (prompts kept/dropped, eval sets) is also written to the workdir."""
    eval_report = F.DataReport(strict=config.data.strict)
    eval_fn = None
    if config.eval_every and (config.eval_gen.sets or held):
        extra = {"rl_heldout": held, "rl_train": prompts[: len(held)]} if held else None
        sets = heldout_sets(config, template, prompts, eval_report, extra)
        eval_fn = make_policy_eval(cfg, template, sets, config.eval_gen, mesh, rules, rm=rm,
                                   stop_strings=config.rollout.get("stop_strings", ()))  # fmt: skip
    data_report = {
        "prompts": {**report.to_dict(), "train_prompts": len(prompts), "heldout": len(held)},
        "eval": eval_report.to_dict(),
    }
    common.write_report(workdir, data_report)
    return eval_fn, data_report


def heldout_sets(config, template, train_prompts, report: F.DataReport, extra=None) -> dict:
    """{set name: examples {"ids", "meta", "answer", "loc"}}, the first `eval_gen.examples` of
    each of `extra` ({name: prompts}, e.g. the held-out RL prompts) and the first
    `eval_gen.examples` usable records of every source in `eval_gen.sets` (named by
    `common.eval_set_names`): conversations — `messages`, or `prompt` + `completion` — whose
    last assistant turn is the reference answer, or prompt records, whose meta["answer"] is.
    Every stage's generation eval reads its sets here (SFT and distillation too). Bad records
    are counted in `report` by reason with file:line; so are examples asking a training
    question (`question_key`; "eval_dropped_trained_question"). A set left with no example is
    an error naming it (its metrics would be NaN or missing)."""
    gen, fields = config.eval_gen, config.data.fields
    seen = {question_key(p) for p in train_prompts}
    out = {name: [{"ids": p["ids"], "meta": p["meta"], "answer": str(p["meta"].get("answer", "")),
                   "loc": p.get("loc", "")} for p in prompts[: gen.examples]]
           for name, prompts in (extra or {}).items()}  # fmt: skip
    parts = [p for p in (q.strip() for q in gen.sets.split(",")) if p]
    taken = {name: f"the {name} prompts of rollout.heldout_prompts" for name in out}
    for name, part in zip(common.eval_set_names(parts, taken), parts):
        kept, dropped = [], {}  # (dropped: reason -> [count, first file:line])
        for obj, loc in common.records(part, config.data, report):
            if len(kept) == gen.examples:
                break
            bad = None
            try:
                if not isinstance(obj, dict):
                    raise F.FormatError("bad_record", "record is not a JSON object")
                meta = F.record_meta(obj, fields)
                if F.has(obj, fields.messages) or F.has(obj, fields.completion):  # a chat
                    msgs = F.sft_messages(obj, fields)
                    last = msgs[-1]
                    answer = (last["content"] or "") if last["role"] == "assistant" else ""
                else:
                    msgs = F.prompt_messages(obj.get(fields.prompt), fields)
                    answer = str(meta.get("answer", ""))
                with F.naming_record(loc):
                    ids, _ = F.render_prompt(msgs, template, gen.max_prompt_len,
                                             tools=F.record_tools(obj, fields))  # fmt: skip
            except F.FormatError as e:
                bad = (e.reason, str(e))
            except (TypeError, KeyError) as e:
                bad = ("bad_record", f"{type(e).__name__}: {e}")
            else:
                ex = {"ids": np.asarray(ids, np.int32), "meta": meta, "answer": answer,
                      "loc": loc}  # fmt: skip
                if question_key(ex) in seen:
                    bad = ("eval_dropped_trained_question", "asked in training")
            if bad:
                report.bad(bad[0], loc, bad[1])
                dropped.setdefault(bad[0], [0, f"{loc}: {bad[1]}"])[0] += 1
                continue
            kept.append(ex)
            report.used += 1
        if not kept:
            what = ", ".join(f"{n} {r} (e.g. {e})" for r, (n, e) in dropped.items())
            raise ValueError(f"eval_gen.sets: {part} has no usable example (dropped: "
                             f"{what or 'none, it holds no records'}); fix it or leave it out "
                             "of eval_gen.sets")  # fmt: skip
        no_ref = sum(not ex["answer"].strip() for ex in kept)
        if no_ref:
            common.log.warning(
                "eval_gen.sets %s: %d of %d examples have no reference answer (no completion "
                "or meta.answer): their accuracy is 0", part, no_ref, len(kept),
            )  # fmt: skip
        out[name] = kept
    return out


def make_policy_eval(cfg, template, sets: dict, gen_cfg, mesh, rules, rm=None, stop_strings=()):
    """policy params -> {"<set>/accuracy", "/judge", "/stopped", "/response_len"
    [, "/rm_score"]} from greedy answers (one decoder call per `gen_cfg.batch` prompts), and
    with `gen_cfg.sample_temperature` > 0 also "<set>/sampled_accuracy": `gen_cfg.samples`
    samples per prompt at that temperature (sample k of example j from fold_in(fold_in(
    PRNGKey(1), j), k), whatever `gen_cfg.batch`; what on-policy RL optimises), each prompt
    prefilled once for its samples (`generate(..., num_samples=)`, `gen_cfg.batch` //
    samples prompts per call). `stop_strings` (the rollouts' `rollout.stop_strings`) end
    answers as they end rollouts."""
    from flaxlm.alignment import sft
    from flaxlm.models.stop_strings import StopStrings

    strings = stop_string_tuple(stop_strings)
    tables = StopStrings.build(template.tok, strings, cfg.vocab_size) if strings else None

    score = reward_scorer(rm[1]) if rm is not None else None
    # The reward model's rows hold the longest prompt of the sets and a whole answer: one
    # width (one compile). Not eval_gen.max_prompt_len: the held-out RL prompts are cut to
    # rollout.max_prompt_len when loaded, which may be longer.
    longest = max((len(ex["ids"]) for exs in sets.values() for ex in exs), default=0)
    width = longest + gen_cfg.max_new_tokens
    width_name = f"longest held-out prompt {longest} + eval_gen.max_new_tokens"
    pad_id = max(template.tok.pad_id, 0)
    temp = float(gen_cfg.get("sample_temperature", 0.0))
    n_samples = int(gen_cfg.get("samples", 1))

    def run_set(policy, examples) -> dict:
        acc, jud, stopped, lens, scores, sampled = [], [], [], [], [], []
        bs = gen_cfg.batch
        for i in range(0, len(examples), bs):
            chunk = examples[i : i + bs]
            prompts = [ex["ids"] for ex in chunk]
            prompts += [prompts[-1]] * (bs - len(prompts))  # one shape: one compile
            out = jax.device_get(generate(
                cfg, policy, prompts, max_new_tokens=gen_cfg.max_new_tokens,
                rng=jax.random.PRNGKey(0), temperature=0.0, stop_tokens=template.stop_tokens,
                pad_id=pad_id, mesh=mesh, rules=rules, stop_strings=tables,
            ))  # fmt: skip
            texts, stop = decode_responses(template.tok, out.tokens, out.lengths,
                                           template.stop_tokens, strings)  # fmt: skip
            if score is not None:
                rows = rollout_rows(prompts, out.tokens, out.lengths, width, pad_id,
                                    width_name)  # fmt: skip
                with use_mesh(mesh, rules):
                    s = fetch(score(rm[2], global_batch(rows, mesh)))
                scores += list(s[: len(chunk)])
            for ex, text in zip(chunk, texts):
                ok, j = sft.score(ex["meta"], text, ex["answer"])
                acc.append(ok)
                jud.append(j)
            stopped += list(stop[: len(chunk)])
            lens += list(out.lengths[: len(chunk)])
            per = max(1, bs // n_samples)  # prompts per sampling call: ~bs rows
            for s in range(0, len(chunk) if temp > 0 else 0, per):
                part = chunk[s : s + per]
                ids = [ex["ids"] for ex in part]
                ids += [ids[-1]] * (per - len(ids))  # one shape: one compile
                out = jax.device_get(generate(
                    cfg, policy, ids, max_new_tokens=gen_cfg.max_new_tokens,
                    rng=prompt_keys(jax.random.PRNGKey(1), range(i + s, i + s + per)),
                    temperature=temp, stop_tokens=template.stop_tokens, pad_id=pad_id,
                    mesh=mesh, rules=rules, stop_strings=tables, num_samples=n_samples,
                ))  # fmt: skip
                texts, _ = decode_responses(template.tok, out.tokens, out.lengths,
                                            template.stop_tokens)  # fmt: skip
                sampled += [sft.score(ex["meta"], texts[r * n_samples + g], ex["answer"])[0]
                            for r, ex in enumerate(part) for g in range(n_samples)]  # fmt: skip
        res = {"accuracy": np.mean(acc), "judge": np.mean(jud), "stopped": np.mean(stopped),
               "response_len": np.mean(lens)}  # fmt: skip
        if scores:
            res["rm_score"] = np.mean(scores)
        if sampled:
            res["sampled_accuracy"] = np.mean(sampled)
        return {k: float(v) for k, v in res.items()}

    def eval_fn(policy) -> dict:
        out = {}
        for name, examples in sets.items():
            if examples:
                out.update({f"{name}/{k}": v for k, v in run_set(policy, examples).items()})
        return out

    return eval_fn
