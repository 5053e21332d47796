"""Generation tasks: generate greedily from each prompt and score the text.

Scoring (`TaskSpec.scoring`):
    exact_match  the response (cut at the first stop string) equals the gold answer after
                 normalisation (`normalize`: none | basic | number)
    regex        `answer_regex` extracts the answer from the response (group 1, or the whole
                 match; the first or last match per `regex_select`), then exact match
    judge        the built-in world's rule-based judge, `judge(meta, response)`; also reports
                 `correct` (the judge's strict correctness)

Prompts come from prompts.encode_prompt (zero- or k-shot, plain or chat). The model is reached
through a `GenerateFn`, `(prompt_ids, max_new_tokens) -> new ids per prompt`;
`make_generate_fn` builds one over `flaxlm.models.decode.generate`, and tests pass a fake to
check the scoring path on its own.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import jax
import numpy as np

from flaxlm.evaluation.tasks import Example, TaskSpec

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]

_PUNCT = re.escape(string.punctuation)


def normalize_answer(text: str, mode: str = "basic") -> str:
    """none: as is; basic: lower case, single spaces, no outer punctuation; number: digits
    without thousands separators or currency, integral floats as integers ("1,000.0" → "1000")."""
    if mode == "none":
        return text
    if mode == "number":
        num = re.sub(r"[,$\s]", "", text).rstrip(".")
        try:
            x = float(num)
        except ValueError:
            return normalize_answer(text, "basic")
        return str(int(x)) if x.is_integer() else repr(x)
    text = " ".join(text.lower().split())
    return re.sub(rf"^[{_PUNCT}\s]+|[{_PUNCT}\s]+$", "", text)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        i = text.find(s) if s else -1
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def extract_answer(text: str, pattern: str, select: str = "first") -> str | None:
    """Group 1 (or the whole match) of the first/last match of `pattern`, or None."""
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[0] if select == "first" else matches[-1]
    return m.group(1) if m.groups() else m.group(0)


def score_response(spec: TaskSpec, fields: dict, response: str) -> dict[str, float]:
    """Metrics of one response (already cut at the stop strings) to one example."""
    gold = normalize_answer(fields["answer"], spec.normalize)
    if spec.scoring == "exact_match":
        return {"exact_match": float(normalize_answer(response, spec.normalize) == gold)}
    if spec.scoring == "regex":
        got = extract_answer(response, spec.answer_regex, spec.regex_select)
        hit = got is not None and normalize_answer(got, spec.normalize) == gold
        return {"exact_match": float(hit), "extracted": float(got is not None)}
    from flaxlm.data.synthetic_judge import is_correct, judge

    meta = fields["meta"]
    return {"judge": float(judge(meta, response)), "correct": float(is_correct(meta, response))}


def make_generate_fn(
    cfg, params, *, batch_size: int = 32, seed: int = 0, stop_tokens=(), pad_id: int = 0
) -> GenerateFn:
    """A GenerateFn over `flaxlm.models.decode.generate` (greedy), in batches of prompts sorted
    by length so each batch pads little."""
    from flaxlm.models.decode import generate

    def fn(prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list[list[int]] = [[] for _ in prompt_ids]
        pos = 0
        while pos < len(order):
            # Batches of batch_size, the tail padded to a power of two (by repeating its last
            # prompt) so a task compiles a couple of batch shapes, not one per remainder.
            idx = order[pos : pos + batch_size]
            pos += len(idx)
            rows = [prompt_ids[i] for i in idx]
            rows += [rows[-1]] * (min(batch_size, 1 << (len(rows) - 1).bit_length()) - len(rows))
            res = generate(
                cfg,
                params,
                rows,
                max_new_tokens=max_new_tokens,
                rng=jax.random.PRNGKey(seed),
                temperature=0.0,
                stop_tokens=tuple(stop_tokens),
                pad_id=pad_id,
            )
            toks, lengths = jax.device_get((res.tokens, res.lengths))
            for r, i in enumerate(idx):
                out[i] = [int(t) for t in np.asarray(toks[r])[: int(lengths[r])]]
        return out

    return fn


def generation(
    spec: TaskSpec,
    examples: list[Example],
    prompts: list[tuple[str, list[int]]],
    generate_fn: GenerateFn,
    tok,
    *,
    max_prompt_len: int,
    stop_tokens: Sequence[int] = (),
):
    """Runs a generation task.

    Args:
      examples: the evaluated rows; prompts: (readable text, ids) of each one's prompt
        (prompts.encode_prompt).
      max_prompt_len: longer prompts keep their first token (BOS) and their last tokens.
      stop_tokens: ids that end a response (EOS, the chat end token; also any id the tokenizer
        does not have); the text after them is dropped before the stop strings apply.
    Returns:
      (metrics, samples): mean of each score plus n; per example prompt, response, answer and
      scores.
    """
    ids = [p if len(p) <= max_prompt_len else p[:1] + p[len(p) - max_prompt_len + 1 :]
           for _, p in prompts]  # fmt: skip
    outs = generate_fn(ids, spec.max_new_tokens)
    samples, sums = [], {}
    for ex, (prompt, _), new in zip(examples, prompts, outs, strict=True):
        for j, t in enumerate(new):
            # A model's vocabulary may be larger than its tokenizer's; an id past the tokenizer
            # (never seen in training, so only from an undertrained model) ends the response.
            if t in stop_tokens or not 0 <= t < tok.vocab_size:
                new = new[:j]
                break
        response = truncate_at_stop(tok.decode(new), spec.stop).strip()
        scores = score_response(spec, ex.fields, response)
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + v
        samples.append({"source": ex.source, "prompt": prompt, "response": response,
                        "answer": ex.fields["answer"], "scores": scores})  # fmt: skip
    metrics = {k: v / max(len(samples), 1) for k, v in sums.items()}
    metrics["n"] = len(samples)
    return metrics, samples
