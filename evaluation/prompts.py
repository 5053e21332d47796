"""Prompt construction for evaluation tasks: few-shot selection, templates, chat rendering.

Shots are drawn per evaluated example from a `random.Random` seeded by (fewshot_seed, task name,
example index) (`fewshot_sampler` "first_n": the pool's first usable rows, in order), so a
prompt depends only on the task spec and the example — not on batch order, `--limit` or other
tasks. A shot is never the evaluated row itself (same file) nor any row whose prompt text equals
the evaluated one (a duplicate in a separate train file).

Plain mode (a base model):
    description + shot_1 + sep + ... + shot_k + sep + prompt
where a shot is its prompt followed by its target (generation: `target_template`; multiple
choice: its correct choice, after `target_delimiter` as every scored choice: `delimit`; with a
`continuation_template`, the choice glued to the prompt and the continuation after it). Chat
mode (an instruction-tuned model): shots become earlier user/assistant turns, rendered by the
chat template of data/formats.py (token ids, BOS included), and the prompt ends where the
assistant's reply starts.

Plain-mode ids start with the document prefix (`prefix_ids`): BOS, as every training document
starts; for a tokenizer without BOS (Qwen2's), EOS, which separates such a model's pretraining
documents (lm-eval-harness's prefix token); none if it has neither.
"""

from __future__ import annotations

import contextlib
import itertools
import random

from flaxlm.evaluation.tasks import LETTERS, Example, TaskSpec


def prefix_ids(tok) -> list[int]:
    """The ids a document starts after: [BOS], else [EOS] for a tokenizer without BOS, else []
    (never a negative id: a missing special token is -1, which would index the embedding)."""
    for i in (tok.bos_id, tok.eos_id):
        if i is not None and i >= 0:
            return [int(i)]
    return []


def render(template: str, fields: dict, spec: TaskSpec, **extra) -> str:
    """`template` filled from the canonical fields (and, for multiple choice, `choices_block`:
    "A. x\\nB. y ..."); an unknown placeholder is an error naming the task."""
    values = dict(fields)
    if "choices" in fields:
        values["choices_block"] = "\n".join(
            f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(fields["choices"])
        )
    values.update(extra)
    try:
        return template.format_map(values)
    except (KeyError, IndexError) as e:
        raise KeyError(
            f"task {spec.name!r}: template {template!r} uses {e}, which is not one of "
            f"{sorted(values)}"
        ) from None
    except (ValueError, AttributeError, TypeError) as e:  # "Single '{' encountered", ...
        raise ValueError(f"task {spec.name!r}: bad template {template!r}: {e}") from None


def check_prompts(spec: TaskSpec, examples: list[Example], pool: list[Example]) -> None:
    """Builds every prompt text the task will build (each example with its shots; multiple
    choice: each choice), so a template placeholder a later row lacks, a few-shot pool smaller
    than num_fewshot or an empty choice fails before any task runs rather than when this one is
    reached. Raises ValueError / KeyError whose message starts with the row's file:line."""
    if spec.type == "perplexity":
        return
    template = spec.user_template if spec.chat else spec.prompt_template
    checked: set[str] = set()
    for ex in examples:
        with _row(ex):
            shots = select_shots(spec, ex, pool)
        for s in shots:  # a bad shot row names its own line
            if s.source not in checked:
                checked.add(s.source)
                with _row(s):
                    prompt = render(template, s.fields, spec)
                    target_text(spec, s.fields, "" if spec.chat else prompt)
        with _row(ex):
            if spec.chat:
                chat_messages(spec, ex, shots)
            context = "" if spec.chat else plain_prompt(spec, ex, shots)
            if spec.code_prefix:
                render(spec.code_prefix, ex.fields, spec)
            if spec.type != "multiple_choice":
                continue
            for i in range(len(ex.fields["choices"])):
                c = choice_text(spec, ex.fields, i, context)
                if spec.continuation_template:  # the fixed text after the choice is scored
                    c = continuation_text(spec, ex.fields, context + c)
                # (whitespace alone too: in plain mode " " scored as the bare space piece,
                # length 0 for acc_norm, and could win every metric)
                if not c.strip():
                    raise ValueError(f"task {spec.name!r}: choice {i} ({c!r}) is empty: no "
                                     "tokens to score")  # fmt: skip


@contextlib.contextmanager
def _row(ex: Example):
    """Re-raises a KeyError / ValueError with the row's file:line in front."""
    try:
        yield
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        raise type(e)(f"{ex.source}: {msg}") from None


def delimit(spec: TaskSpec, context: str, continuation: str) -> str:
    """`continuation` as it follows `context`: `target_delimiter` first, unless the context
    ends or the continuation starts with whitespace, or either is empty."""
    if (spec.target_delimiter and context and continuation and not context[-1].isspace()
            and not continuation[0].isspace()):  # fmt: skip
        return spec.target_delimiter + continuation
    return continuation


def choice_text(spec: TaskSpec, fields: dict, i: int, context: str = "") -> str:
    """The continuation scored for choice i; after `context` (the prompt text, plain mode)
    with the spec's target_delimiter (`delimit`). With a `continuation_template` the choice
    completes the context instead: appended as is (WinoGrande's "... because the" + "trophy")."""
    text = render(
        spec.choice_template, fields, spec, choice=fields["choices"][i], letter=LETTERS[i], index=i
    )
    return text if spec.continuation_template else delimit(spec, context, text)


def continuation_text(spec: TaskSpec, fields: dict, context: str) -> str:
    """`continuation_template`'s text as scored after `context` (the prompt and a choice),
    joined by the target_delimiter: lm-eval-harness's multiple-input continuation."""
    return delimit(spec, context, render(spec.continuation_template, fields, spec))


def target_text(spec: TaskSpec, fields: dict, context: str = "") -> str:
    """What follows a shot's prompt (`context`): its correct choice (and the continuation after
    it, with a `continuation_template`) or its answer."""
    if spec.type == "multiple_choice":
        choice = choice_text(spec, fields, fields["answer"], context)
        if spec.continuation_template:
            return choice + continuation_text(spec, fields, context + choice)
        return choice
    return render(spec.target_template, fields, spec)


def _question(spec: TaskSpec, fields: dict) -> str:
    return fields["context"] if spec.type == "multiple_choice" else fields["prompt"]


def select_shots(
    spec: TaskSpec, example: Example, pool: list[Example], k: int | None = None
) -> list[Example]:
    """`k` (default `spec.num_fewshot`) shots for `example`, drawn deterministically from `pool`.

    When the pool is the task's own file (`spec.fewshot_file` empty) the example's own row is
    excluded by index; rows with the same question text are excluded in either case.
    """
    k = spec.num_fewshot if k is None else k
    if k == 0:
        return []
    rng = random.Random(f"{spec.fewshot_seed}:{spec.name}:{example.index}")
    same_file = not spec.fewshot_file
    question = _question(spec, example.fields)

    def ok(i: int) -> bool:
        if same_file and i == example.index:
            return False
        return _question(spec, pool[i].fields) != question

    if spec.fewshot_sampler == "first_n":  # the pool's first usable rows, in file order
        picked = list(itertools.islice((i for i in range(len(pool)) if ok(i)), k))
    else:  # draw a few more than k and filter: cheap for large pools, exact for small ones
        first = rng.sample(range(len(pool)), min(len(pool), k + 4))
        picked = [i for i in first if ok(i)][:k]
    if len(picked) < k:
        rest = [i for i in range(len(pool)) if ok(i) and i not in picked]
        rng.shuffle(rest)
        picked += rest[: k - len(picked)]
    if len(picked) < k:
        raise ValueError(
            f"task {spec.name!r}: wants {k} shots but the few-shot pool "
            f"{spec.fewshot_file or spec.file} has only {len(picked)} usable rows"
        )
    return [pool[i] for i in picked]


def plain_prompt(spec: TaskSpec, example: Example, shots: list[Example]) -> str:
    """Plain-mode text the model continues: description, shots with their targets, then the
    example's prompt (for multiple choice, the context every choice is scored after)."""
    parts = []
    for s in shots:
        prompt = render(spec.prompt_template, s.fields, spec)
        parts.append(prompt + target_text(spec, s.fields, prompt))
    parts.append(render(spec.prompt_template, example.fields, spec))
    return spec.description + spec.fewshot_separator.join(parts)


def chat_messages(spec: TaskSpec, example: Example, shots: list[Example]) -> list[dict]:
    """Chat-mode conversation: description as the system turn, each shot a user turn answered
    by its target, then the example's user turn (the assistant's reply is what is scored)."""
    messages = []
    if spec.description.strip():
        messages.append({"role": "system", "content": spec.description.strip()})
    for s in shots:
        messages.append({"role": "user", "content": render(spec.user_template, s.fields, spec)})
        messages.append({"role": "assistant", "content": target_text(spec, s.fields).strip()})
    messages.append({"role": "user", "content": render(spec.user_template, example.fields, spec)})
    return messages


def encode_prompt(
    spec: TaskSpec, example: Example, shots: list[Example], tok, *, bos: bool = True
) -> tuple[str, list[int]]:
    """(readable prompt, prompt ids). Plain mode: `prefix_ids` (BOS) + the encoded text. Chat
    mode: the conversation through the tokenizer's own Jinja chat template when it has one (an
    imported HF instruct model's tokenizer_config.json: what that model was tuned on; the
    readable prompt is then that template's text, variables included), else data/formats.py's
    chat template, ending at the assistant header."""
    if not spec.chat:
        text = plain_prompt(spec, example, shots)
        return text, (prefix_ids(tok) if bos else []) + tok.encode(text)
    from flaxlm.data.formats import generation_prompt

    msgs = chat_messages(spec, example, shots)
    if getattr(tok, "chat_template", ""):
        text = tok.render_chat_text(msgs, add_generation_prompt=True)
    else:
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in msgs) + "<|assistant|>"
    return text, generation_prompt(msgs, tok)[0]
