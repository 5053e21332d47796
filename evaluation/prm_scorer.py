"""Scoring with a process reward model (alignment/prm.py): each step's probability of being
right, and one score per solution aggregated from them — for best-of-N reranking
(`python -m flaxlm.evaluation.best_of_n --prm RUN`) or for guiding a search.

    score = prm_scorer("runs/prm")
    score(["Add 1, 2 and 3."], [["1 + 2 = 3", "3 + 3 = 6"]])   # [[p0, p1]]: σ(logit) per step
    aggregate([0.9, 0.2], "min")                                  # 0.2

A solution is rendered exactly as training rendered it (data/stepwise.py `render_steps`: the
prompt turns, then the steps each followed by the run's `prm.step_separator`, read from its
checkpoint meta) and step i's probability is σ of the logit at its separator's last token.
Attention is causal, so a step's probability never depends on the steps after it: a partial
solution's steps score as they do in the whole one. A row longer than the model's max_seq_len
is cut from the left of the prompt (its BOS kept) as the reward scorer cuts; steps that do not
fit even so are a ValueError naming the solution.

Aggregation (`AGGREGATES`), the solution's score from its step probabilities p_1..p_n:
  min   min p_i — a solution is as good as its worst step (Lightman et al. 2023; the default)
  prod  Π p_i — the probability that every step is right, were they independent
  last  p_n — the final step's, which under "every step from the first error on is wrong"
        labels (Math-Shepherd) already judges the whole solution
  mean  the mean of the p_i
A completion (text) is split into steps at every separator; blank pieces (a trailing separator,
a blank line) are no steps. A completion with no step (a blank one) scores 0, below any solution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

AGGREGATES = ("min", "prod", "last", "mean")


def aggregate(probs: Sequence[float], how: str = "min") -> float:
    """A solution's score from its step probabilities (module docstring); 0.0 with no step."""
    if how not in AGGREGATES:
        raise ValueError(f"aggregate={how!r}; expected one of {AGGREGATES}")
    p = np.asarray(probs, np.float64)
    if p.size == 0:
        return 0.0
    return float({"min": np.min, "prod": np.prod, "last": lambda x: x[-1],
                  "mean": np.mean}[how](p))  # fmt: skip


def split_steps(completion: str, separator: str) -> list[str]:
    """A completion's steps: its pieces between separators, blank ones dropped."""
    return [s for s in completion.split(separator) if s.strip()]


class PRMScorer:
    """`(prompts, step lists) -> per-step probabilities` of a PRM's params (see the module
    docstring); `separator` is the run's `prm.step_separator`. Rows are right-padded to a
    power of two, `batch_size` per call."""

    def __init__(self, cfg, params, tok, separator: str, *, batch_size: int = 16,
                 train_on: str = "all"):  # fmt: skip
        from flaxlm.data.formats import training_template
        from flaxlm.models.heads import scalar_model_fns

        self.cfg, self.params, self.tok = cfg, params, tok
        self.separator, self.batch_size = separator, batch_size
        self.train_on = train_on  # the run's prm.train_on: which steps its head learned
        self.template = training_template(tok)  # the template the PRM was trained with
        _, apply = scalar_model_fns(cfg)
        self._fn = jax.jit(lambda p, t, s: apply(p, t, None, s))

    def _row(self, i: int, prompt, steps) -> tuple[np.ndarray, np.ndarray]:
        from flaxlm.data.chat_records import _messages, fields_config
        from flaxlm.data.stepwise import render_steps

        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        for j, s in enumerate(steps):
            if not isinstance(s, str) or not s.strip() or self.separator in s:
                raise ValueError(f"solution {i}: step {j} is blank, not a string or holds the "
                                 f"step separator {self.separator!r}")  # fmt: skip
        try:
            turns = _messages(msgs, fields_config(), "prompt")
            r = render_steps(turns, steps, self.template, self.separator)
        except ValueError as e:  # FormatError, TemplateError, HFError (a failed template)
            why = getattr(e, "reason", type(e).__name__)
            raise ValueError(f"solution {i}: cannot be rendered with the chat template "
                             f"({why}): {e}") from None  # fmt: skip
        over = len(r.ids) - self.cfg.max_seq_len
        if over <= 0:
            return r.ids, r.pos
        if over > r.keep - r.head:
            raise ValueError(f"solution {i}: its steps alone exceed max_seq_len "
                             f"{self.cfg.max_seq_len}")  # fmt: skip
        keep = np.r_[np.arange(r.head), np.arange(r.head + over, len(r.ids))]
        return r.ids[keep], r.pos - over

    def __call__(self, prompts: Sequence, step_lists: Sequence[Sequence[str]]) -> list[list[float]]:
        if len(prompts) != len(step_lists):
            raise ValueError(f"{len(prompts)} prompts but {len(step_lists)} step lists")
        out: list[list[float]] = [[] for _ in prompts]
        rows = [(i, *self._row(i, p, s)) for i, (p, s) in enumerate(zip(prompts, step_lists))
                if len(s)]  # fmt: skip
        b = self.batch_size
        for k in range(0, len(rows), b):
            chunk = rows[k : k + b]
            T = min(1 << (max(len(ids) for _, ids, _ in chunk) - 1).bit_length(),
                    self.cfg.max_seq_len)  # fmt: skip
            tokens = np.full((b, T), self.tok.pad_id, np.int32)
            seg = np.zeros((b, T), np.int32)
            for j, (_, ids, _) in enumerate(chunk):
                tokens[j, : len(ids)], seg[j, : len(ids)] = ids, 1
            logits = np.asarray(jax.device_get(self._fn(self.params, tokens, seg)), np.float64)
            for j, (i, _, pos) in enumerate(chunk):
                # σ(x) = (1 + tanh(x / 2)) / 2: no overflow for any logit
                out[i] = [float(x) for x in 0.5 * (1.0 + np.tanh(0.5 * logits[j, pos]))]
        return out

    def solution_scores(self, prompts: Sequence, completions: Sequence[str],
                        how: str = "min") -> list[float]:  # fmt: skip
        """One score per completion text: split into steps (`split_steps`), aggregated."""
        aggregate([], how)  # (an unknown aggregation fails before anything is scored)
        steps = [split_steps(c, self.separator) for c in completions]
        return [aggregate(p, how) for p in self(prompts, steps)]


def prm_scorer(run_dir: str, tok=None, *, batch_size: int = 16) -> PRMScorer:
    """The `PRMScorer` of a PRM run, on one device; `tok` defaults to the run's own tokenizer
    (its checkpoint meta), the separator is the one it trained with."""
    from flaxlm.evaluation.winrate import load_scalar_run
    from flaxlm.train.checkpoint import CheckpointError, read_meta

    meta = read_meta(run_dir)[1]
    if meta.get("head") != "scalar" or not isinstance(meta.get("prm"), dict):
        raise CheckpointError(f"{run_dir}: not a process-reward-model run (configs/prm.py; "
                              f"head {meta.get('head')!r})")  # fmt: skip
    cfg, params, tok = load_scalar_run(run_dir, meta, tok)
    return PRMScorer(
        cfg,
        params,
        tok,
        meta["prm"]["step_separator"],
        batch_size=batch_size,
        train_on=meta["prm"].get("train_on", "all"),
    )  # (runs before the key: all)


def default_aggregate(scorer: PRMScorer) -> str:
    """How a solution's step scores combine when the caller does not say: "min" (its weakest
    step) for a PRM trained on every step, "last" for one trained on final steps only
    (`prm.train_on="last"`: an outcome model, whose earlier steps' scores were never
    trained)."""
    return "last" if scorer.train_on == "last" else "min"


def completion_scorer(scorer: PRMScorer, how: str = "min") -> Callable:
    """A winrate/best_of_n ScoreFn (prompts, completion texts -> floats) over a PRM."""
    aggregate([], how)
    return lambda prompts, completions: scorer.solution_scores(prompts, completions, how)


def prm_scorer_from_flag(run_dir: str, batch_size: int, flag: str = "--prm") -> PRMScorer:
    """`prm_scorer` of a CLI flag's run: a directory that is not a run, not a PRM run, with no
    checkpoint or a missing tokenizer is one line naming the flag (SystemExit)."""
    from flaxlm.evaluation.winrate import scorer_from_flag

    return scorer_from_flag(prm_scorer, run_dir, batch_size, flag)
