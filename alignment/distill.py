"""Knowledge distillation: a student learns a frozen teacher's next-token distributions — on SFT
chats, on pretraining text, or on its own samples — through the shared step and loop.

    python -m flaxlm.train.main --config configs/distill.py:runlocal=True \
        --config.distill.teacher=runs/sft --workdir runs/distill

The student is `init_from` (a smaller pretrained or SFT run, LoRA or not) or, without one, a
fresh `config.model`, which then takes the teacher's tokenizer and vocab_size (unless
`--config.model.vocab_size` is given: `fresh_student_vocab`). The teacher (`distill.teacher`:
a flaxlm run or "hf:DIR", its EMA weights with `distill.teacher_ema`) is read straight into
the training shardings in `distill.teacher_dtype` and runs forward inside the jitted step, on
the same packed rows (`loop.Task.frozen`: its weights are an argument of the step, never
constants of the program). No (B, T, V) teacher logits cross the host.

Per answer token (the SFT `loss_mask`), with p_T = softmax(teacher logits / τ) and
p_S = softmax(student logits / τ) (`token_divergence`, `distill.divergence`):

    forward_kl   KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)    Hinton et al. 2015; mean-seeking
    reverse_kl   KL(p_S ‖ p_T)                                   MiniLLM; mode-seeking
    jsd          β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M),            GKD's generalised JSD(β)
                 M = β·p_T + (1 − β)·p_S

and the loss is  α·CE + (1 − α)·τ²·D  averaged over the answer tokens: α = `distill.ce_weight`
mixes in the data's own next-token cross-entropy (at temperature 1), and τ² keeps the
gradient's scale as τ changes (the divergence's gradient in the logits scales as 1/τ²: an
explicit 1/τ times a difference of softened distributions that itself shrinks as 1/τ). The
student and the teacher may pad their vocabularies differently (Qwen2.5's padded vocabulary
differs between model sizes): p_T is then over the ids both have (which must hold the whole
tokenizer), p_S over all the student's ids, and the student's mass m on ids past the teacher's
adds −log(1 − m) to D (`token_sums`: forward KL over the student's full vocabulary), so a
student with the larger vocabulary learns to leave its extra ids empty.
With `loss.chunk_tokens` > 0 both models' logits exist one piece of the sequence at a time
(train/losses.py `chunked_sums`). A mixture-of-experts student (n_experts > 0) adds
pretraining's router losses of its forward pass, `loss.moe_aux` × load balance + `loss.moe_z` ×
router z-loss (train/losses.py `router_coefs`), and logs `moe/*` (a frozen teacher needs none).

Pretraining text (`configs/distill.py:text=True`: the `data` section is pretraining's, data/
pipeline.py — packed, mixed, resumable grain batches of `data.sources`, or the built-in corpus):
the divergence on every token of the packed documents, as Gemma 2/3 and Llama 3.2's small
models were pretrained; held-out on `data.eval_sources` (pretraining's `text_eval_batches`),
with `perplexity`; no generation eval.

On-policy (`distill.on_policy`, GKD with λ = 1; `configs/distill.py:on_policy=True`): the rows
are the student's own responses to `data.train`'s prompts instead of the data's answers — each
`rollout.batch` prompts sampled by the live student in one decoder call (alignment/rl_rollout.py
`RolloutSource`, the RL tasks' machinery: prompt cursor, minibatches, rollout-boundary
checkpoints, multi-host), then `rollout.epochs` passes in minibatches, the divergence taken on
the response tokens. No reward, no advantage: the teacher judges every token of every sample
with its whole distribution. What it fixes: trained only on the data's answers, the student
never sees the prefixes it produces itself, and errors compound once it samples (exposure bias);
on its own samples the teacher corrects exactly those. Per rollout `rollout/response_len`,
`rollout/stopped`, `rollout/gen_s` ride along in the metrics. GKD's mix
(`distill.on_policy_fraction` λ < 1, `data.train` chats): each rollout is the student's samples
with probability λ, else the data's answers to the same prompts (`rollout/on_policy` 1 or 0).

Metrics (training and held-out): `kd` (the divergence, nats), `nll` and `accuracy` (the
student's cross-entropy and top-1 accuracy on the data's answers), `teacher_nll` (the teacher's,
the floor `nll` is pulled towards), `agreement` (the share of answer tokens where the student's
and the teacher's top-1 tokens agree). Evaluation adds SFT's greedy generation accuracy on
`eval_gen.sets`, and the teacher's own once (`teacher/<set>/...`, with `distill.eval_teacher`):
the mark the student is measured against. MFU counts the teacher's forward (2 FLOPs per
parameter and token) with the student's training.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from flaxlm.alignment import common, rl_common, rl_eval, sft
from flaxlm.alignment.rl_rollout import RolloutSource, passthrough_stats, sample_stats
from flaxlm.data import formats as F
from flaxlm.data.chat_batches import order_seed
from flaxlm.data.source_errors import DataError
from flaxlm.models import lora as lora_lib
from flaxlm.models.sharding import (
    check_batch_divides,
    logical_axis_rules,
    make_mesh,
    shard_batch,
    use_mesh,
)
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import loop, pretrain
from flaxlm.train.losses import (
    add_router_losses,
    chunked_sums,
    router_coefs,
    router_forward,
    token_logprobs,
)
from flaxlm.train.pretrain import model_fns
from flaxlm.train.step import jit_eval_step

log = logging.getLogger("flaxlm")

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# The sums a piece of the sequence contributes: divergence, student NLL, student top-1 hits,
# top-1 agreements, teacher NLL (each over answer tokens).
SUMS = ("kd", "nll", "accuracy", "agreement", "teacher_nll")


def _kl(log_p, log_q):
    """Σ_v p (log p − log q) over the last axis."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_divergence(student_logits, teacher_logits, kind: str = "forward_kl",
                     temperature: float = 1.0, beta: float = 0.5):  # fmt: skip
    """Per-token divergence (..., V) × 2 -> (...) float32 between the teacher's and the student's
    distributions at `temperature` (module docstring; `beta` is JSD's β, the teacher's weight in
    the mixture M)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        return _kl(s, t)
    if kind == "jsd":
        m = jnp.logaddexp(jnp.log(beta) + t, jnp.log1p(-beta) + s)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    raise ValueError(f"distill.divergence={kind!r}; expected one of {DIVERGENCES}")


def token_sums(student_logits, teacher_logits, targets, mask, d):
    """(len(SUMS),) float32: the divergence and the other metrics summed over answer tokens.

    The teacher's distribution is over the ids both models have (V = the smaller vocabulary:
    a teacher padded past the student's is cut there and renormalised; both hold the whole
    tokenizer, checked at build). The student's is over its FULL vocabulary: the divergence is
    taken between the teacher and the student renormalised over the V shared ids, plus
    −log(1 − m) for the student's mass m on its ids past V (0 when it has none). For forward KL
    that sum is exactly KL(p_T ‖ p_S) with p_S normalised over all the student's ids; it is what
    pushes a larger-vocabulary student's extra ids (which no teacher probability names) down.
    Cut before the softmax, they were never trained and a fresh student kept most of its mass
    there."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    V = min(vs, vt)
    s, t = student_logits[..., :V], teacher_logits[..., :V]
    m = mask.astype(jnp.float32)
    div = token_divergence(s, t, d.divergence, d.temperature, d.jsd_beta)
    if vs > V:  # −log(1 − m) = log Σ_all e^{z/τ} − log Σ_{<V} e^{z/τ}, at the divergence's τ
        z = student_logits.astype(jnp.float32) / d.temperature
        div = div + jax.nn.logsumexp(z, axis=-1) - jax.nn.logsumexp(z[..., :V], axis=-1)
    # the student's top-1 over all its ids: one past the teacher's is a miss, not skipped
    top_s, top_t = jnp.argmax(student_logits, axis=-1), jnp.argmax(t, axis=-1)
    cols = (
        div,
        -token_logprobs(student_logits, targets),  # (over the student's full vocabulary)
        (top_s == targets).astype(jnp.float32),
        (top_s == top_t).astype(jnp.float32),
        -token_logprobs(teacher_logits, targets),
    )
    return jnp.stack([jnp.sum(c * m) for c in cols])


def loss_and_metrics(sums, weight, d):
    """(loss, metrics) from the summed columns: α·CE + (1 − α)·τ²·D per answer token."""
    means = {k: v / jnp.maximum(weight, 1.0) for k, v in zip(SUMS, sums)}
    a, tau = d.ce_weight, d.temperature
    loss = a * means["nll"] + (1.0 - a) * tau * tau * means["kd"]
    return loss, {**means, "weight": weight}


def distill_loss_fn(student_apply, teacher_apply, d, chunk: int = 0, prepare=None,
                    router: tuple | None = None):  # fmt: skip
    """The loop's loss `(params, batch, rng, teacher) -> (loss, metrics)` over packed SFT rows;
    `teacher` are the frozen teacher's weights (`Task.frozen`), `prepare` maps the student's
    train params to its model's (LoRA merge), `chunk` = `loss.chunk_tokens`. `router`
    (train/losses.py `router_coefs`: a mixture-of-experts student) adds the router losses of
    the student's forward pass and logs `moe/*`; the frozen teacher needs none."""

    def loss_fn(params, batch, rng, teacher):
        del rng
        p = prepare(params) if prepare else params
        args = (batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        targets, mask = batch["targets"], batch["loss_mask"]
        weight = jnp.sum(mask.astype(jnp.float32))
        if not chunk:
            t = jax.lax.stop_gradient(teacher_apply(teacher, *args))
            logits, stats = router_forward(student_apply, router, p, *args)
            out = loss_and_metrics(token_sums(logits, t, targets, mask, d), weight, d)
            return add_router_losses(*out, stats, router)
        (hs, _), stats = router_forward(student_apply, router, p, *args, method="backbone")
        ht, _ = teacher_apply(teacher, *args, method="backbone")
        ht = jax.lax.stop_gradient(ht)

        def piece(h_s, h_t, tg, m):
            logits_s = student_apply(p, h_s, method="logits")
            logits_t = jax.lax.stop_gradient(teacher_apply(teacher, h_t, method="logits"))
            return token_sums(logits_s, logits_t, tg, m, d)

        sums = chunked_sums(piece, (hs, ht, targets, mask), chunk, len(SUMS))
        return add_router_losses(*loss_and_metrics(sums, weight, d), stats, router)

    return loss_fn


def on_policy_loss_fn(loss_fn):
    """The distillation loss over rollout minibatches, their statistics passed through."""

    def wrapped(params, batch, rng, teacher):
        loss, metrics = loss_fn(params, batch, rng, teacher)
        return loss, {**metrics, **passthrough_stats(batch)}

    return wrapped


class StudentRollouts(RolloutSource):
    """On-policy distillation's batch source: each rollout is `rollout.batch` prompts answered
    by the live student (one sample each); its rows' loss mask covers the responses.

    GKD's mix (`answers` given, `fraction` λ < 1): a rollout is the student's samples with
    probability λ — drawn per rollout from (seed, rollout count), so a resumed run makes the
    same choices — and otherwise the data's own answers to the same prompts, one conversation
    per row (`answers[i]` is prompt i's rendered SFT example). `rollout/on_policy` says which."""

    def __init__(self, *args, answers=None, fraction: float = 1.0, **kw):
        super().__init__(*args, **kw)
        self.answers, self.fraction = answers, fraction

    def on_policy_now(self) -> bool:
        if self.fraction >= 1.0:
            return True
        draw = np.random.default_rng([order_seed(self.config.seed), 7, self.iteration]).random()
        return bool(draw < self.fraction)

    def make_rollout(self, params, rng):
        idx = self.cursor.take(self.config.rollout.batch)
        if not self.on_policy_now():
            return self.data_rows(idx)
        s = self.sample(self.decoding_params(params), idx, rng)
        stats = sample_stats(s, np.ones(len(s["lengths"]), bool))
        stats.pop("bad_reward")  # (no reward here)
        if self.answers is not None:
            stats["on_policy"] = 1.0
        return s["rows"], stats

    def data_rows(self, idx):
        """The data's answers to prompts `idx`, one conversation per row, with the statistics
        a sampled rollout has (response length = the answer's trained tokens)."""
        rows = F.empty_rows(len(idx), self.config.seq_len, max(self.template.tok.pad_id, 0))
        for r, i in enumerate(idx):
            F.place(rows, r, 0, 1, self.answers[i]["ids"], self.answers[i]["mask"])
        length = float(np.mean([self.answers[i]["mask"].sum() for i in idx]))
        stats = {"response_len": length, "stopped": 1.0, "nonstop": 0.0, "empty": 0.0,
                 "gen_s": 0.0, "on_policy": 0.0}  # fmt: skip
        return rows, stats


def prompts_of(examples: list[dict], config, template) -> list[dict]:
    """Generation prompts (as `rl_common.load_prompts` gives them) of rendered SFT examples:
    each conversation up to its last answer, cut from the left to `rollout.max_prompt_len`."""
    out = []
    for ex in examples:
        ids, _ = F.render_prompt(ex["messages"], template, config.rollout.max_prompt_len)
        out.append({"ids": ids, "meta": ex.get("meta", {}), "loc": ex.get("loc"),
                    "messages": list(ex["messages"][:-1])})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Checks, evaluation and task


def check_config(d) -> None:
    """Errors naming the `distill` key whose value cannot work."""
    if not d.teacher:
        raise ValueError("distill: set --config.distill.teacher=RUN_DIR (or hf:DIR), the teacher")
    if d.divergence not in DIVERGENCES:
        raise ValueError(f"distill.divergence={d.divergence!r}; expected one of {DIVERGENCES}")
    if not d.temperature > 0:
        raise ValueError(f"distill.temperature={d.temperature!r} must be > 0")
    if d.divergence == "jsd" and not 0.0 < d.jsd_beta < 1.0:
        raise ValueError(f"distill.jsd_beta={d.jsd_beta!r} must be in (0, 1) (the limits are "
                         "distill.divergence=forward_kl and reverse_kl)")  # fmt: skip
    if not 0.0 <= d.ce_weight <= 1.0:
        raise ValueError(f"distill.ce_weight={d.ce_weight!r} must be in [0, 1]")
    fraction = d.get("on_policy_fraction", 1.0)  # (configs older than the key: 1)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"distill.on_policy_fraction={fraction!r} must be in (0, 1] (0: "
                         "turn distill.on_policy off)")  # fmt: skip
    if fraction < 1.0 and not d.on_policy:
        raise ValueError(f"distill.on_policy_fraction={fraction!r} needs distill.on_policy")


def check_same_tokenizer(tok, teacher: str) -> None:
    """The student's tokenizer must be the teacher's: the same ids for the same text, or the
    distributions compared token by token mean different pieces. An error names both."""
    common.check_same_tokenizer(
        tok, teacher, "distill.teacher", "Distil into a student with the teacher's tokenizer "
        "(without init_from a fresh student takes it)"
    )  # fmt: skip


def check_vocab(tok, cfg, teacher_cfg, teacher: str) -> None:
    """Both embedding tables must hold every tokenizer id (their padding may differ)."""
    for who, c in (("student", cfg), (f"teacher {teacher}", teacher_cfg)):
        if tok.vocab_size > c.vocab_size:
            raise ValueError(
                f"distill: the {who}'s vocab_size {c.vocab_size} is smaller than the "
                f"tokenizer's {tok.vocab_size} pieces ({getattr(tok, 'name', '?')})"
            )


def make_eval_fn(config, mesh, cfg, loss_fn, teacher, teacher_gen, template, host_batches, sets,
                 spec, perplexity: bool = False):  # fmt: skip
    """params -> held-out distillation metrics (over every process's target tokens of
    `host_batches`, this process's rows) and greedy generation metrics per set; the teacher's
    generation metrics once, first. `perplexity`: also exp(nll), the student's (text). Each
    batch runs in `opt.grad_accum` micro-batches, as the train step splits it (train/step.py
    `eval_step`: the student's and the teacher's logits of one micro-batch at a time), the
    teacher an argument of the program as in the train step."""
    batches = [shard_batch(b, mesh) for b in host_batches]
    fn = jit_eval_step(loss_fn, config.opt.grad_accum, frozen=True)
    rules = logical_axis_rules(config.sharding)
    teacher_marks = {}

    def generation(params, prefix: str, model_cfg) -> dict:
        out = {}
        for name, examples in sets.items():
            res = sft.generation_eval(model_cfg, params, examples, template, config.eval_gen,
                                      mesh, rules)  # fmt: skip
            out.update({f"{prefix}{name}/{k}": v for k, v in res.items()})
        return out

    def eval_fn(params):
        sums, weight = collections.Counter(), 0.0
        for b in batches:
            with use_mesh(mesh, rules):
                m = jax.device_get(fn(params, b, teacher))
            w = float(m["weight"])
            weight += w
            for k in ("loss", *SUMS):
                sums[k] += w * float(m[k])
        out = {k: v / max(weight, 1.0) for k, v in sums.items()}
        if perplexity and batches:
            out["perplexity"] = float(np.exp(min(out["nll"], 50.0)))
        if teacher_gen is not None and not teacher_marks:
            teacher_marks.update(generation(teacher, "teacher/", teacher_gen))
        out.update(teacher_marks)
        out.update(generation(lora_lib.merge(params, spec) if spec else params, "", cfg))
        return out

    return eval_fn


def teacher_vocab_size(teacher: str) -> int | None:
    """The teacher's vocab_size (its run's model_config, or HF config.json); None when its
    checkpoint records none (`rl_common.frozen_lm` then names the problem)."""
    meta = common.source_meta(teacher)
    if meta.get("model_config"):
        return int(meta["model_config"]["vocab_size"])
    if teacher.startswith(common.HF_PREFIX):
        from flaxlm.models import hf

        return int(hf.load_config(teacher[len(common.HF_PREFIX) :]).vocab_size)
    return None


def fresh_student_vocab(config) -> None:
    """A fresh student (no init_from) takes the teacher's vocab_size unless this run sets
    `model.vocab_size` (`model_keys_set`: given on the command line, or not the config's
    default). The default (the built-in tokenizer's 2048 for tiny/mini/small) says nothing of
    the teacher's tokenizer: a larger one left the student ids no token is, a smaller one did
    not hold the tokenizer. Set in the config, so the run's recorded config says it."""
    from flaxlm.configs.common import model_keys_set

    if config.init_from or "vocab_size" in model_keys_set(config):
        return
    vocab = teacher_vocab_size(config.distill.teacher)
    if vocab and vocab != config.model.vocab_size:
        log.info("distill: a fresh student takes the teacher's vocab_size %d (not the config's "
                 "%d; --config.model.vocab_size sets another)", vocab,
                 config.model.vocab_size)  # fmt: skip
        config.model.vocab_size = vocab


def _text_tokenizer_path(config, init_meta: dict) -> str:
    """The text's tokenizer: `data.tokenizer`, else init_from's, else the teacher's. None of
    them (a teacher trained on synthetic data records none) is a DataError naming the key to
    set — the trainer's one-line input error (train/main.py), not a traceback — raised before
    the teacher loads."""
    teacher = config.distill.teacher
    # (an "hf:DIR" init_from has no run meta: its own tokenizer is the directory's; skipping it
    # took the teacher's, and compared the teacher's with itself)
    hf_dir = config.init_from.startswith(common.HF_PREFIX)
    own = common.source_tokenizer_path(config.init_from) if hf_dir else init_meta.get("tokenizer")
    path = config.data.tokenizer or own or common.source_tokenizer_path(teacher)
    if not path:
        sources = f"distill.teacher={teacher}" + (
            f" nor init_from={config.init_from}" if config.init_from else ""
        )
        raise DataError(
            f"distill: no tokenizer for the text: set --config.data.tokenizer (the teacher's "
            f"tokenizer.model); data.tokenizer is empty and {sources} records none"
        )
    return path


def _text_source(config, mesh):
    """(tokenizer, ModelConfig) of a student trained on pretraining text: `data.tokenizer`,
    else init_from's, else the teacher's; init_from's architecture, else `config.model` with
    the teacher's vocab_size (`fresh_student_vocab`)."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    d = config.distill
    check_batch_divides(config.batch_size, mesh)
    loop.init_from_ema(config)
    meta = common.source_meta(config.init_from)
    tok = load_tokenizer(os.path.expanduser(_text_tokenizer_path(config, meta)))
    fresh_student_vocab(config)
    cfg = common.resolve_model_config(config, meta)
    tok.check_fits(cfg.vocab_size)
    check_same_tokenizer(tok, d.teacher)
    return tok, cfg


def _student_source(config, mesh):
    """(tokenizer, ModelConfig, template) of the student. A fresh student (no init_from) takes
    the teacher's tokenizer unless `data.tokenizer` names one, and its vocab_size
    (`fresh_student_vocab`)."""
    d = config.distill
    if not config.init_from and not config.data.tokenizer:
        path = common.source_tokenizer_path(d.teacher)
        if path:
            log.info("distill: a fresh student takes the teacher's tokenizer %s", path)
            config.data.tokenizer = path  # (recorded with the run's config)
    fresh_student_vocab(config)
    tok, cfg, template = common.resolve_source(config, mesh)
    check_same_tokenizer(tok, d.teacher)
    return tok, cfg, template


def _mix_needs_chats(fraction: float) -> str:
    """Why GKD's mix found nothing to train on: its rollouts that are not the student's are the
    data's answers, so prompts alone (on_policy=True's default data.train, the built-in RL
    prompts, or a GRPO prompt file) are all dropped for lacking one."""
    return (f": distill.on_policy_fraction={fraction} < 1 also trains on the data's answers, so "
            "data.train must hold chats with completions ({\"messages\"} ending with an "
            "assistant turn, or {\"prompt\", \"completion\"}), not prompts alone")  # fmt: skip


def _chat_data(config, mesh, rules, tok, cfg, template, spec, workdir):
    """(train batches, held-out host batches, generation eval sets, data report) on chats: the
    SFT conversations' answers, or on-policy the student's own answers to the data's prompts
    (rollouts)."""
    report, eval_report = F.DataReport(config.data.strict), F.DataReport(config.data.strict)
    on_policy = config.distill.on_policy
    mixed = on_policy and config.distill.get("on_policy_fraction", 1.0) < 1.0
    # prompts (on-policy) | chats (off-policy, and GKD's mix: their prompts and answers)
    if on_policy and not mixed:
        train = rl_common.load_prompts(config.data.train, config, template, report)
    else:  # (compact off-policy: only packed into rows; the mix renders prompts from messages)
        train = sft.load_examples(config.data.train, config, template, report, compact=not mixed)
    if not train:
        why = _mix_needs_chats(config.distill.on_policy_fraction) if mixed else ""
        raise common.no_usable(config, "examples", report, why)
    heldout = []
    if config.data.eval:
        heldout = sft.load_examples(config.data.eval, config, template, eval_report, compact=True)
    # (their drops and cuts counted in a section of their own, before the report is written)
    gen_report = F.DataReport(config.data.strict)
    sets = sft.gen_sets(config, template, gen_report) if config.eval_every else {}
    data_report = {"train": report.to_dict(), "eval": eval_report.to_dict(),
                   **rl_eval.gen_report_section(gen_report)}  # fmt: skip
    common.write_report(workdir, data_report)
    if on_policy:
        prompts = prompts_of(train, config, template) if mixed else train
        batches = StudentRollouts(config, mesh, rules, prompts, cfg=cfg, template=template,
                                  spec=spec, answers=train if mixed else None,
                                  fraction=config.distill.get("on_policy_fraction", 1.0),
                                  )  # fmt: skip
    else:
        batches = F.SFTBatches(
            train, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
            pad_id=tok.pad_id, seed=config.seed, shuffle=config.data.shuffle,
            process_index=jax.process_index(), process_count=jax.process_count(),
            **common.train_source_check(config),
        )  # fmt: skip
    host = []
    if heldout and config.eval_every:
        host = sft.loss_eval_batches(heldout, config, tok.pad_id)
    return batches, host, sets, data_report


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The distillation Task (module docstring); writes data_report.json into `workdir`."""
    d = config.distill
    check_config(d)
    # The teacher's step: the one this run started with, also on a resume (a missing teacher
    # is named here, before the student's tokenizer is looked for in it)
    pins = rl_common.FrozenSources(workdir, {"distill.teacher": d.teacher})
    text = config.data.get("kind") == "text"  # pretraining's data section
    if text and d.on_policy:
        raise ValueError("distill.on_policy needs prompts, not pretraining text (data.kind)")
    if d.teacher_ema:  # (a run without an EMA is named with the key, before anything loads)
        ckpt_lib.check_ema_source(d.teacher, "distill.teacher_ema", "distill.teacher")
    if text:
        (tok, cfg), template = _text_source(config, mesh), None
    else:
        tok, cfg, template = _student_source(config, mesh)
    teacher_vocab = teacher_vocab_size(d.teacher)
    if d.on_policy and teacher_vocab and cfg.vocab_size > teacher_vocab:
        # the student samples from all its ids; those past the teacher's have no teacher
        # probability (NaN losses from the first rollout)
        raise ValueError(
            f"distill.on_policy: the student's vocab_size {cfg.vocab_size} is larger than "
            f"distill.teacher's {teacher_vocab}, so its samples would hold ids the teacher "
            f"cannot score; set model.vocab_size <= {teacher_vocab} or train off-policy"
        )
    rules = logical_axis_rules(config.sharding)
    teacher_cfg, teacher_apply, teacher = rl_common.frozen_lm(
        d.teacher, mesh, rules, d.teacher_dtype, d.teacher_ema, key="distill.teacher_dtype",
        source_key="distill.teacher", step=pins.step("distill.teacher"),
    )  # fmt: skip
    check_vocab(tok, cfg, teacher_cfg, d.teacher)
    init_params, apply = model_fns(cfg)
    spec, init_params, prepare = lora_lib.for_training(init_params, config.lora)
    router = router_coefs(config.loss, cfg.n_experts > 0)  # (None: a dense student)
    loss_fn = distill_loss_fn(apply, teacher_apply, d, config.loss.chunk_tokens, prepare, router)
    if text:  # packed documents: every token counts
        batches = pretrain.make_batches(config, seed=config.seed, tokenizer=tok,
                                        vocab_size=cfg.vocab_size)  # fmt: skip
        host = pretrain.text_eval_batches(config, tok) if config.eval_every else []
        data_report, sets = {}, {}
    else:
        batches, host, sets, data_report = _chat_data(config, mesh, rules, tok, cfg, template,
                                                      spec, workdir)  # fmt: skip
    if d.on_policy:
        loss_fn = on_policy_loss_fn(loss_fn)
    eval_fn = None
    if config.eval_every and (host or sets):
        teacher_gen = teacher_cfg if d.eval_teacher and sets else None
        eval_fn = make_eval_fn(config, mesh, cfg, loss_fn, teacher, teacher_gen, template, host,
                               sets, spec, perplexity=text)  # fmt: skip
    task = common.supervised_task(
        "distill", "lm", config, cfg, spec, tok, workdir, data_report,
        init_params=init_params, loss_fn=loss_fn, train_batches=batches, eval_fn=eval_fn,
    )  # fmt: skip
    forward = teacher_cfg.flops_per_token(config.seq_len) / 3  # (the training count is 6N)
    forward_causal = teacher_cfg.flops_per_token(config.seq_len, causal=True) / 3
    return dataclasses.replace(
        task, frozen=teacher, before_step=batches.before_step if d.on_policy else None,
        flops_per_token=task.flops_per_token + forward,
        flops_per_token_causal=task.flops_per_token_causal + forward_causal,
        model_meta={**task.model_meta, "teacher": d.teacher, **pins.meta()},
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
