"""Runs task specs against one model: the library behind `python -m flaxlm.evaluation`.

cfg, params, meta = load_model("runs/pt")
ev = Evaluator(cfg, params, Tokenizer.load(meta["tokenizer"]))
for spec in resolve_tasks(["mc_facts_heldout", "ppl_heldout_text"], world_dir="runs/world"):
    print(spec.name, ev.run(spec, limit=100)["metrics"])
"""

from __future__ import annotations

import time

import numpy as np

from flaxlm.evaluation import generate_tasks, loglik
from flaxlm.evaluation.prompts import (
    chat_messages,
    check_prompts,
    choice_text,
    continuation_text,
    encode_prompt,
    plain_prompt,
    select_shots,
)
from flaxlm.evaluation.tasks import Example, TaskSpec, read_examples


def prompt_room(spec: TaskSpec, max_seq_len: int) -> int:
    """Prompt tokens a generation task leaves within `max_seq_len`; ValueError when a budget
    leaves the prompt a token or two (answers to a prompt cut down to BOS)."""
    room = max_seq_len - spec.max_new_tokens
    if room < 2:
        raise ValueError(
            f"task {spec.name!r}: max_new_tokens={spec.max_new_tokens} leaves no room "
            f"for the prompt within the model's max_seq_len={max_seq_len}; "
            "lower max_new_tokens"
        )
    return room


def check_task(spec: TaskSpec, examples: list[Example], pool: list[Example],
               max_seq_len: int) -> None:  # fmt: skip
    """Raises now (ValueError / KeyError naming file:line or the task) what `Evaluator.run`
    would raise only when it reaches this task, after earlier tasks ran: a template a row
    lacks a field for, too few shots, an empty choice (prompts.check_prompts), a generation
    budget without room for the prompt, a perplexity stride wider than its window, or texts
    that are all empty."""
    check_prompts(spec, examples, pool)
    if spec.type == "generation":
        prompt_room(spec, max_seq_len)
    if spec.type == "perplexity":
        window = min(spec.max_len or max_seq_len, max_seq_len)  # as loglik.perplexity cuts it
        if spec.stride > window:
            raise ValueError(
                f"task {spec.name!r} ({spec.file}): stride={spec.stride} is wider than the "
                f"window max_len={window} (the model's max_seq_len is {max_seq_len}); tokens "
                "between windows would go unscored"
            )
        if not spec.add_eos and not any(ex.fields["text"] for ex in examples):
            raise ValueError(f"task {spec.name!r} ({spec.file}): every text is empty: no token "
                             "to score")  # fmt: skip


def _fewshot_pool(spec: TaskSpec, examples: list[Example], limit: int | None) -> list[Example]:
    """The rows shots are drawn from: the task's own rows when it has no `fewshot_file` and was
    read whole (the same rows: read again, a 50k-item task was parsed and held twice), else
    `read_examples(spec, fewshot=True)`."""
    if not spec.num_fewshot:
        return []
    if not spec.fewshot_file and limit is None:
        return examples
    return read_examples(spec, fewshot=True)


def group_results(results: dict) -> dict:
    """Averages over the tasks of each group their specs name (`TaskSpec.group`), from
    {task: Evaluator.run result}: {group: {"type": "group", "tasks", "n", "metrics"}}. A metric
    every member reports is averaged weighted by the members' example counts (the micro
    average: MMLU's "mmlu" as lm-eval-harness >= 0.4 reports it, weight_by_size), and also
    unweighted as `<metric>_macro` (the mean over subjects, as the MMLU paper's tables)."""
    members: dict[str, list[str]] = {}
    for name, r in results.items():
        for g in r.get("spec", {}).get("group", ()):
            members.setdefault(g, []).append(name)
    out = {}
    for g, names in members.items():
        rs = [results[n] for n in names]
        common = set.intersection(*(set(r["metrics"]) for r in rs)) - {"n", "truncated"}
        n = sum(r["n"] for r in rs)
        metrics: dict[str, float] = {}
        for m in sorted(common):
            vals = [r["metrics"][m] for r in rs]
            if not all(isinstance(v, float) for v in vals):
                continue
            metrics[m] = sum(v * r["n"] for v, r in zip(vals, rs)) / max(n, 1)
            metrics[f"{m}_macro"] = float(np.mean(vals))
        out[g] = {"type": "group", "tasks": names, "n": n, "metrics": metrics}
    return out


class _ContextOnce:
    """A tokenizer for one question's choices whose `encode` keeps each text's ids:
    `loglik.split_continuation` encodes the question's context once per choice, the same text
    each time. Cached ids are returned as a copy (the caller owns its list, as with the
    tokenizer's own)."""

    def __init__(self, tok):
        self._tok, self._ids = tok, {}

    def encode(self, text: str, **kw) -> list[int]:
        if kw:
            return self._tok.encode(text, **kw)
        if text not in self._ids:
            self._ids[text] = self._tok.encode(text)
        return list(self._ids[text])

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _compact_ids(reqs: list[tuple[list[int], list[int]]]) -> list[tuple]:
    """One question's (context, continuation) ids as int32 arrays until they are scored: a
    choice's context is the longest choice context's array, or a view of its start (the choices
    of a question share their context, usually the same ids; a token that merges across the
    boundary makes a choice's context a shorter prefix). As Python int lists each context was
    held once per choice at ~36 bytes a token (a 50k-question 5-shot task held gigabytes).
    Ids that do not fit an int32 (or are no integers) are left as they are, for the scorer to
    refuse with its own message."""
    arrays = [np.asarray(ids) for pair in reqs for ids in pair]
    if not all(a.ndim == 1 and a.dtype.kind in "iu" and a.size for a in arrays) or any(
        a.min() < 0 or a.max() > np.iinfo(np.int32).max for a in arrays
    ):
        return reqs
    conts = [a.astype(np.int32) for a in arrays[1::2]]
    base = max(arrays[0::2], key=len).astype(np.int32)
    out = []
    for ctx, cont in zip(arrays[0::2], conts):
        n = len(ctx)
        if n <= len(base) and np.array_equal(base[:n], ctx):
            out.append((base if n == len(base) else base[:n], cont))
        else:
            out.append((ctx.astype(np.int32), cont))
    return out


class Evaluator:
    """One model + tokenizer; `run(spec)` evaluates a task.

    Args:
      cfg, params: the model.
      tok: a data/tokenizer.py Tokenizer (or a models/hf_tokenizer.py HFTokenizer) whose ids
        fit the model's vocabulary.
      batch_tokens: tokens per log-likelihood forward batch.
      generate_fn: overrides the decoder (generate_tasks.GenerateFn); built lazily otherwise.
      bos: prepend the document prefix to every plain-text sequence: BOS, as training
        documents start; EOS for a tokenizer without BOS (prompts.prefix_ids).
      gen_batch_size: prompts per generation batch.
      seed: the decoder's RNG seed (greedy decoding does not use it).
      mesh, rules: score and decode under this mesh with these logical rules, params sharded
        by them (`load_model(run, mesh=, rules=)`); several processes each run the same tasks
        and get the same results (flaxlm/cli_mesh.py).
    """

    def __init__(
        self,
        cfg,
        params,
        tok,
        *,
        batch_tokens: int = 8192,
        generate_fn: generate_tasks.GenerateFn | None = None,
        bos: bool = True,
        gen_batch_size: int = 32,
        seed: int = 0,
        mesh=None,
        rules=None,
    ):
        tok.check_fits(cfg.vocab_size)
        self.cfg, self.params, self.tok = cfg, params, tok
        self.mesh, self.rules = mesh, rules
        self.scorer = loglik.LoglikScorer(cfg, params, batch_tokens=batch_tokens,
                                          pad_id=tok.pad_id, mesh=mesh, rules=rules)  # fmt: skip
        self.bos = bos
        # Generation stops at EOS, flaxlm's end of turn, and an HF tokenizer's own stop ids
        # (generation_config.json: Llama 3's <|eot_id|>, Qwen2's <|im_end|>).
        specials = [i for k, i in tok.special_ids().items() if k in ("eos", "<|end|>")]
        stops = [*specials, *getattr(tok, "stop_ids", ())]
        self.stop_tokens = tuple(dict.fromkeys(i for i in stops if i >= 0))
        self._generate_fn, self._gen_batch, self._seed = generate_fn, gen_batch_size, seed
        self._template = None  # chat-mode multiple choice's (`_chat_choices`), made once

    @property
    def generate_fn(self) -> generate_tasks.GenerateFn:
        if self._generate_fn is None:
            self._generate_fn = generate_tasks.make_generate_fn(
                self.cfg,
                self.params,
                batch_size=self._gen_batch,
                seed=self._seed,
                stop_tokens=self.stop_tokens,
                pad_id=self.tok.pad_id,
                tok=self.tok,
                mesh=self.mesh,
                rules=self.rules,
            )
        return self._generate_fn

    def run(self, spec: TaskSpec, limit: int | None = None) -> dict:
        """{"metrics", "samples", "n", "seconds", "spec"} of one task (first `limit` rows)."""
        t0 = time.perf_counter()
        examples = read_examples(spec, limit=limit)
        pool = _fewshot_pool(spec, examples, limit)
        if spec.type == "perplexity":
            texts = [ex.fields["text"] for ex in examples]
            try:
                metrics = loglik.perplexity(self.scorer, self.tok, texts, max_len=spec.max_len,
                                            stride=spec.stride, bos=self.bos,
                                            eos=spec.add_eos)  # fmt: skip
            except ValueError as e:
                raise ValueError(f"task {spec.name!r} ({spec.file}): {e}") from None
            return self._result(spec, examples, metrics, [], t0)
        if spec.type == "multiple_choice" and not spec.chat:
            # Plain multiple choice scores `split_continuation`'s ids of the prompt text: the
            # prompt's own ids (encode_prompt) were never used, one more encoding of every
            # few-shot context (of 50k questions) for nothing.
            prompts = [(plain_prompt(spec, ex, select_shots(spec, ex, pool)), None)
                       for ex in examples]  # fmt: skip
        elif spec.type == "multiple_choice":  # (chat: only the readable text is used)
            prompts = [(encode_prompt(spec, ex, select_shots(spec, ex, pool), self.tok,
                                      bos=self.bos)[0], None) for ex in examples]  # fmt: skip
        else:
            prompts = [encode_prompt(spec, ex, select_shots(spec, ex, pool), self.tok,
                                     bos=self.bos) for ex in examples]  # fmt: skip
        if spec.type == "multiple_choice":
            choices, requests = [], []
            for ex, (text, _) in zip(examples, prompts):
                # `split_continuation` encodes the context alone for each choice: the same text
                # c times per question; encoded once (`_ContextOnce`)
                tok = _ContextOnce(self.tok)
                # plain mode: after the prompt text, joined by the spec's target_delimiter
                chs = [choice_text(spec, ex.fields, i, "" if spec.chat else text)
                       for i in range(len(ex.fields["choices"]))]  # fmt: skip
                pairs = [(text, c) for c in chs]
                if spec.continuation_template:  # each choice completes the context; the
                    # same continuation is scored after each (WinoGrande): its text stands in
                    # for the choice (acc_norm's length: acc_norm == acc)
                    pairs = [(text + c, continuation_text(spec, ex.fields, text + c))
                             for c in chs]  # fmt: skip
                    chs = [cont for _, cont in pairs]
                if spec.chat:  # the reply's ids where the chat template puts them
                    chs = [c.strip() for c in chs]
                    reqs = self._chat_choices(spec, ex, pool, chs)
                else:
                    try:
                        reqs = [loglik.split_continuation(tok, ctx, c, bos=self.bos)
                                for ctx, c in pairs]  # fmt: skip
                    except ValueError as e:
                        raise ValueError(f"{ex.source}: task {spec.name!r}: {e}") from None
                for i, (ctx, cont) in enumerate(reqs):
                    if not cont or not ctx:
                        raise ValueError(
                            f"{ex.source}: task {spec.name!r}: choice {i} ({chs[i]!r}) gives "
                            f"{'no tokens to score' if not cont else 'an empty context'}"
                        )
                requests.append(_compact_ids(reqs))
                choices.append(chs)
            answers = [ex.fields["answer"] for ex in examples]
            metrics, samples = loglik.multiple_choice(self.scorer, requests, choices, answers)
            for s, ex, (text, _) in zip(samples, examples, prompts):
                s.update(source=ex.source, prompt=text)
        else:
            room = prompt_room(spec, self.cfg.max_seq_len)  # prompt + answer fit the model
            metrics, samples = generate_tasks.generation(
                spec,
                examples,
                prompts,
                self.generate_fn,
                self.tok,
                max_prompt_len=room,
                stop_tokens=self.stop_tokens,
            )
        return self._result(spec, examples, metrics, samples, t0)

    def _chat_choices(self, spec: TaskSpec, ex: Example, pool: list[Example],
                      choices: list[str]) -> list[tuple[list[int], list[int]]]:  # fmt: skip
        """(context, continuation) ids of each chat-mode choice: the conversation with the choice
        as the assistant's reply, rendered as SFT renders it (evaluation/chat_answer.py), split
        at the end of the generation prompt; the continuation stops before the closing stop id
        (an answer encoded alone differs with many Jinja templates: "▁Paris" for "Paris")."""
        from flaxlm.data.formats import training_template
        from flaxlm.evaluation.chat_answer import render_answer

        if self._template is None:
            self._template = training_template(self.tok)
        msgs = chat_messages(spec, ex, select_shots(spec, ex, pool))
        reqs = []
        for i, choice in enumerate(choices):
            try:
                r = render_answer(self._template, msgs, choice)
            except ValueError as e:  # FormatError, TemplateError, HFError (a failed template)
                why = getattr(e, "reason", type(e).__name__)
                raise ValueError(
                    f"{ex.source}: task {spec.name!r}: choice {i} ({choice!r}) cannot be scored "
                    f"as the chat template renders it ({why}): {e}"
                ) from None
            reqs.append(([int(x) for x in r.ids[: r.start]],
                         [int(x) for x in r.ids[r.start : r.stop]]))  # fmt: skip
        return reqs

    @staticmethod
    def _result(spec, examples, metrics, samples, t0) -> dict:
        return {
            "type": spec.type,
            "n": len(examples),
            "metrics": metrics,
            "samples": samples,
            "seconds": time.perf_counter() - t0,
            "spec": spec.to_dict(),
        }
