"""Supervised fine-tuning: next-token loss on assistant tokens only, through the shared loop.

    python -m flaxlm.train.main --config configs/sft.py:runlocal=True \
        --config.init_from=runs/pt --workdir runs/sft

The loss is pretraining's (`train/pretrain.py` `lm_loss`); SFT differs only in its data: chat
conversations rendered with the template of `data/formats.py`, whose `loss_mask` covers the
assistant's answers (and their `<|end|>`), packed into rows without cross-example attention.

Start: `init_from` = a flaxlm run (pretraining, or an earlier SFT, LoRA or not) or "hf:DIR" (an
imported HF checkpoint); the architecture and tokenizer come from that source (`config.model`
is only used for a fresh model). With `lora.rank > 0` only adapters train (models/lora.py).

Evaluation (every `eval_every` steps, and at step 0 for the starting model's baseline):
  * `loss`/`nll`/`accuracy`: held-out answer-token loss on `data.eval`;
  * `<set>/accuracy`, `<set>/judge`, `<set>/stopped`: greedy generation on each `eval_gen.sets`
    record's prompt, scored by the built-in world's judge when the record is the world's (its
    meta carries the world's mark: exact match of "The answer is X."), else by exact match with
    the reference answer (a conversation's last assistant turn, or a prompt record's
    meta.answer: the RL stages' sets read the same, `rl_eval.heldout_sets`); `stopped` is the
    fraction of answers that ended with `<|end|>` within `max_new_tokens`. Dropped records, and
    prompts cut to `max_prompt_len` (default seq_len − max_new_tokens), are counted in the data
    report's `eval_gen` section; a set with no usable record is an error.
"""

from __future__ import annotations

import collections

import jax
import ml_collections
import numpy as np

from flaxlm.alignment import common
from flaxlm.data import formats as F
from flaxlm.models import lora as lora_lib
from flaxlm.models.sharding import logical_axis_rules, make_mesh, same_batch_count, shard_batch
from flaxlm.train import loop
from flaxlm.train.pretrain import lm_loss, model_fns
from flaxlm.train.step import jit_eval_step


def eval_gen_config(sets: str, seq_len=None) -> ml_collections.ConfigDict:
    """The `eval_gen` section: generation-based accuracy. `seq_len` (the config's
    `get_ref("seq_len")`): `max_prompt_len` follows seq_len − max_new_tokens, so a prompt and
    its answer fit a training row, also when either is set on the command line; else 256."""
    c = ml_collections.ConfigDict()
    # Comma-separated record sources (as data.train) whose last assistant turn is the reference
    # answer, or prompt records with meta.answer; "" = none. The built-in ones are scored by the
    # world's judge, others by exact match.
    c.sets = sets
    c.examples = 200  # conversations per set (the first ones, a fixed subset)
    c.max_new_tokens = 24  # answer budget; longer answers are cut (see the `stopped` metric)
    c.batch = 64  # prompts per generate call
    # prompts are cut from the left (BOS kept) beyond this, counted in the data report
    c.max_prompt_len = 256 if seq_len is None else seq_len - c.get_ref("max_new_tokens")
    return c


# ---------------------------------------------------------------------------------------------
# Evaluation


def score(meta: dict, response: str, reference: str) -> tuple[float, float]:
    """(exact-match correctness, judge score) of a response; the world's judge when the record
    is the built-in world's (its meta carries the world's mark, `synthetic_judge.is_world_meta`),
    else exact match with the reference (judge = correctness) — your own meta may name any task,
    one of the world's names ("sort") too."""
    from flaxlm.data.synthetic_judge import is_world_meta

    if is_world_meta(meta) and "answer" in meta:
        from flaxlm.data import synthetic

        return float(synthetic.is_correct(meta, response)), float(synthetic.judge(meta, response))
    ok = float(response.strip() == reference.strip())
    return ok, ok


def generate_answers(cfg, params, prompts, template, *, max_new_tokens, batch, mesh=None,
                     rules=None) -> tuple[list[str], list[bool]]:  # fmt: skip
    """Greedy answers (decoded, stop token removed) and whether each one stopped."""
    from flaxlm.models.decode import generate

    stops = set(template.stop_tokens)
    texts, stopped = [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        out = generate(
            cfg, params, chunk + [chunk[-1]] * (batch - len(chunk)),  # fixed shape: 1 compile
            max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(0), temperature=0.0,
            stop_tokens=template.stop_tokens, pad_id=max(template.tok.pad_id, 0),
            mesh=mesh, rules=rules,
        )  # fmt: skip
        toks, lengths = jax.device_get((out.tokens, out.lengths))
        for row, n in zip(toks[: len(chunk)], lengths[: len(chunk)]):
            ids = [int(t) for t in row[:n]]
            ended = bool(ids) and ids[-1] in stops
            texts.append(template.tok.decode(ids[:-1] if ended else ids))
            stopped.append(ended)
    return texts, stopped


def generation_eval(cfg, params, examples, template, gen_cfg, mesh=None, rules=None) -> dict:
    """Accuracy, mean judge score, stop rate (and accuracy per world task) on `examples`
    ({"ids" (the rendered prompt), "meta", "answer"}: `gen_sets`)."""
    prompts = [ex["ids"] for ex in examples]
    refs = [ex["answer"] for ex in examples]
    texts, stopped = generate_answers(
        cfg, params, prompts, template, max_new_tokens=gen_cfg.max_new_tokens,
        batch=gen_cfg.batch, mesh=mesh, rules=rules,
    )  # fmt: skip
    by_task = collections.defaultdict(list)
    acc, jud = [], []
    for ex, text, ref in zip(examples, texts, refs):
        ok, j = score(ex["meta"], text, ref)
        acc.append(ok)
        jud.append(j)
        if ex["meta"].get("task"):
            by_task[ex["meta"]["task"]].append(ok)
    out = {"accuracy": np.mean(acc), "judge": np.mean(jud), "stopped": np.mean(stopped)}
    out.update({f"acc_{t}": np.mean(v) for t, v in sorted(by_task.items())})
    return {k: float(v) for k, v in out.items()}


def loss_eval_batches(examples, config, pad_id) -> list[dict]:
    """Held-out examples packed into global batches (this process's rows), one pass; as many
    batches on every process (empty ones fill a process whose share packs into fewer)."""
    it = F.SFTBatches(
        examples, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=pad_id, shuffle=False, num_epochs=1, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip
    return same_batch_count(list(it), it.blank)


def make_eval_fn(config, mesh, cfg, loss_fn, template, heldout, gen_sets, spec):
    """params -> held-out loss metrics (none without held-out examples: `data.eval` unset, or
    every record of it dropped) and generation metrics per set. Each batch runs in
    `opt.grad_accum` micro-batches, as the train step splits it (train/step.py `eval_step`):
    one pass over the whole batch could run out of memory where training fits."""
    pad_id = template.tok.pad_id
    # (SFTBatches of no examples is an error: loss metrics only when there are some)
    batches = [shard_batch(b, mesh) for b in loss_eval_batches(heldout, config, pad_id)
               ] if heldout else []  # fmt: skip
    step = jit_eval_step(loss_fn, config.opt.grad_accum)
    rules = logical_axis_rules(config.sharding)

    def eval_fn(params):
        out, sums, weight = {}, collections.Counter(), 0.0
        # every batch dispatched before the one fetch: the device runs them back to back
        for m in jax.device_get([step(params, b) for b in batches]):
            w = float(m["weight"])
            weight += w
            for k in ("loss", "nll", "accuracy"):
                sums[k] += w * float(m[k])
        out.update({k: v / max(weight, 1.0) for k, v in sums.items()})
        plain = lora_lib.merge(params, spec) if spec else params
        for name, examples in gen_sets.items():
            res = generation_eval(cfg, plain, examples, template, config.eval_gen, mesh, rules)
            out.update({f"{name}/{k}": v for k, v in res.items()})
        return out

    return eval_fn


# ---------------------------------------------------------------------------------------------
# Task


def load_examples(spec: str, config, template, report: F.DataReport, *,
                  compact: bool = False) -> list[dict]:  # fmt: skip
    """Rendered SFT examples of `spec`'s records. `compact` (SFT's own training and held-out
    examples, which are only packed into rows): {"ids", "mask", "loc"} each, without the
    record's messages, meta and tools (`render_sft`); distill's GKD mix renders prompts from
    the messages, so the default keeps them."""
    d = config.data
    recs = common.iter_records(spec, d, report)
    return F.render_sft(recs, template, config.seq_len, fields=d.fields,
                        overlength=d.overlength, report=report, compact=compact)  # fmt: skip


def gen_sets(config, template, report: F.DataReport) -> dict[str, list[dict]]:
    """{set name: examples} for generation eval: the RL stages' reader (conversations or
    prompt records with meta.answer; unique names; an empty set is an error), its drops and
    prompt cuts counted in `report` (the data report's eval_gen section) instead of vanishing."""
    from flaxlm.alignment import rl_eval  # (rl_eval imports rl_common, which imports this module)

    return rl_eval.heldout_sets(config, template, [], report)


def build_task(config, mesh, workdir: str | None = None) -> loop.Task:
    """The SFT Task (see the module docstring); writes data_report.json into `workdir`."""
    tok, cfg, template = common.resolve_source(config, mesh)
    report = F.DataReport(strict=config.data.strict)
    # (compact: only packed into rows; generation eval reads its prompts itself, `gen_sets`)
    train = load_examples(config.data.train, config, template, report, compact=True)
    if not train:
        raise common.no_usable(config, "examples", report)
    eval_report = F.DataReport(strict=config.data.strict)
    heldout = []
    if config.data.eval:
        heldout = load_examples(config.data.eval, config, template, eval_report, compact=True)
    # the generation sets' drops and cuts in a section of their own (a file that is both
    # data.eval and a set is read by both: one report would count its records twice)
    gen_report = F.DataReport(strict=config.data.strict)
    sets = gen_sets(config, template, gen_report) if config.eval_every else {}
    from flaxlm.alignment import rl_eval  # (as in gen_sets)

    data_report = {"train": report.to_dict(), "eval": eval_report.to_dict(),
                   **rl_eval.gen_report_section(gen_report)}  # fmt: skip
    common.write_report(workdir, data_report)

    init_params, apply = model_fns(cfg)
    spec, init_params, prepare = lora_lib.for_training(init_params, config.lora)
    loss_fn = lm_loss(apply, config.loss, prepare, moe=cfg.n_experts > 0)
    batches = F.SFTBatches(
        train, seq_len=config.seq_len, batch=config.batch_size // jax.process_count(),
        pad_id=tok.pad_id, seed=config.seed, shuffle=config.data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(),
        **common.train_source_check(config),
    )  # fmt: skip
    eval_fn = None
    if config.eval_every and (heldout or sets):
        eval_fn = make_eval_fn(config, mesh, cfg, loss_fn, template, heldout, sets, spec)
    return common.supervised_task(
        "sft", "lm", config, cfg, spec, tok, workdir, data_report,
        init_params=init_params, loss_fn=loss_fn, train_batches=batches, eval_fn=eval_fn,
    )  # fmt: skip


def run(config, workdir: str):
    mesh = make_mesh(dict(config.mesh))
    return loop.run(config, workdir, build_task(config, mesh, workdir), mesh=mesh)
