"""Reward-model win rate: how often model A's responses out-score model B's (or references).

`score(prompts, responses) -> list[float]` is any reward function: a trained reward model
(`reward_model_scorer` wraps models/heads.py's ScalarHeadModel to take text; `load_reward_scorer`
loads a reward-model run) or the built-in world's judge.

Command line, on two completion files (`python -m flaxlm.generate MODEL --chat --json`'s output,
or any jsonl of {"prompt", "completion"}) with the same prompts in the same order:

    python -m flaxlm.generate runs/dpo --prompts_file p.txt --chat --json > dpo.jsonl
    python -m flaxlm.generate runs/sft --prompts_file p.txt --chat --json > sft.jsonl
    python -m flaxlm.evaluation.winrate --reward_model runs/rm dpo.jsonl sft.jsonl

prints the win rate of A (first file) over B with a bootstrap 95% interval over prompts, the
wins, losses and ties and both mean rewards (`--out FILE` also writes them and per-line scores
as JSON). Prompts are user turns (or lists of messages); prompt + completion is rendered with the
chat template as reward training renders a pair's side (evaluation/chat_answer.py).
Lines with the same prompt are samples of one prompt (`generate --num_samples K --json` writes K
lines per prompt, "sample" 0..K-1): the win rate counts every line (pair of responses), the
interval resamples prompts with all their samples (K correlated samples are not K prompts: the
interval would be about sqrt(K) too narrow), and `prompts` says how many there were.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from flaxlm.evaluation.cli_types import int_at_least

ScoreFn = Callable[[Sequence, Sequence[str]], Sequence[float]]


def win_rate(
    score: ScoreFn,
    prompts: Sequence,
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    tie_margin: float = 0.0,
) -> dict[str, float]:
    """Win rate of A over B on the same prompts; a tie (|a − b| <= tie_margin) counts half.

    win_rate = (wins + ties / 2) / n: the probability that A beats B on a random prompt with ties
    split evenly (AlpacaEval's convention), so identical models score 0.5. A non-finite score is
    an error naming the prompt (a NaN would otherwise count as a tie: NaN > x and NaN < x are
    both false).

    Returns win_rate, wins, losses, ties, n, mean_a, mean_b, mean_margin (a − b).
    """
    n = len(prompts)
    if not n == len(responses_a) == len(responses_b):
        raise ValueError(
            f"win_rate: {n} prompts but {len(responses_a)} A and {len(responses_b)} B responses"
        )
    if n == 0:
        raise ValueError("win_rate: no prompts")
    sa = [float(x) for x in score(prompts, responses_a)]
    sb = [float(x) for x in score(prompts, responses_b)]
    if len(sa) != n or len(sb) != n:
        raise ValueError(f"win_rate: score returned {len(sa)}/{len(sb)} values for {n} prompts")
    return win_rate_from_scores(sa, sb, tie_margin=tie_margin)


def win_rate_from_scores(sa: Sequence[float], sb: Sequence[float], *,
                         tie_margin: float = 0.0) -> dict[str, float]:  # fmt: skip
    """`win_rate`'s figures from the two responses' scores per prompt."""
    if not tie_margin >= 0:  # a negative margin made a prompt both a win and a loss
        raise ValueError(f"win_rate: tie_margin must be >= 0, got {tie_margin}")
    n = len(sa)
    if n == 0:
        raise ValueError("win_rate: no prompts")
    for side, scores in (("A", sa), ("B", sb)):
        bad = [i for i, x in enumerate(scores) if not np.isfinite(x)]
        if bad:
            raise ValueError(f"win_rate: {side}'s score of prompt {bad[0]} is {scores[bad[0]]} "
                             f"({len(bad)} non-finite scores)")  # fmt: skip
    diff = [a - b for a, b in zip(sa, sb, strict=True)]
    wins = sum(d > tie_margin for d in diff)
    losses = sum(d < -tie_margin for d in diff)
    ties = n - wins - losses
    return {
        "win_rate": (wins + 0.5 * ties) / n,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "n": n,
        "mean_a": sum(sa) / n,
        "mean_b": sum(sb) / n,
        "mean_margin": sum(diff) / n,
    }


def reward_model_scorer(cfg, params, tok, *, batch_size: int = 16) -> ScoreFn:
    """A ScoreFn over a reward model (ScalarHeadModel params, as alignment/reward.py trains).

    A prompt is a user turn (text) or a list of messages; prompt + response is rendered as
    reward training renders a pair's side (evaluation/chat_answer.py: with a Jinja chat template
    the whole conversation tokenized once) and the reward is read at the response's closing stop
    id (`<|end|>`), where the reward model was trained to put it. Rows are right-padded to a
    power of two; a row longer than max_seq_len is cut as training cuts it (the prompt from the
    left, its BOS kept). A prompt + response that cannot be rendered is a ValueError naming its
    index.
    """
    from flaxlm.data.formats import training_template
    from flaxlm.evaluation.chat_answer import render_answer
    from flaxlm.models.heads import scalar_model_fns, sequence_values

    template = training_template(tok)  # the template the reward model was trained with
    _, apply = scalar_model_fns(cfg)
    fn = jax.jit(lambda p, t, s: sequence_values(apply(p, t, None, s), s))

    def row(i: int, p, r: str) -> list[int]:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        try:
            ids = render_answer(template, msgs, r, max_len=cfg.max_seq_len).ids
        except ValueError as e:  # FormatError, TemplateError, HFError (a failed template)
            why = getattr(e, "reason", type(e).__name__)
            raise ValueError(f"response {i}: cannot be rendered with the chat template "
                             f"({why}): {e}") from None  # fmt: skip
        return [int(x) for x in ids[:-1]]  # a training row's inputs: the last is the stop id

    def score(prompts, responses) -> list[float]:
        rows = [row(i, p, r) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        out: list[float] = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            T = min(1 << (max(map(len, chunk)) - 1).bit_length(), cfg.max_seq_len)
            tokens = np.full((batch_size, T), tok.pad_id, np.int32)
            seg = np.zeros((batch_size, T), np.int32)
            for j, ids in enumerate(chunk):
                tokens[j, : len(ids)], seg[j, : len(ids)] = ids, 1
            out += [float(x) for x in jax.device_get(fn(params, tokens, seg))[: len(chunk)]]
        return out

    return score


def load_scalar_run(run_dir: str, meta: dict, tok=None):
    """(ModelConfig, params, tokenizer) of a scalar-head run (a reward model or a PRM) whose
    checkpoint `meta` the caller has checked, on one device; `tok` defaults to the run's own
    tokenizer with its chat-template variables, so texts render as the run trained on them."""
    from flaxlm.alignment.rl_common import load_scalar_params
    from flaxlm.models.config import ModelConfig
    from flaxlm.models.heads import scalar_model_fns
    from flaxlm.models.hf_tokenizer import load_tokenizer, set_template_kwargs
    from flaxlm.train.state import unbox

    cfg = ModelConfig.from_dict(meta["model_config"])
    if tok is None:
        tok = load_tokenizer(meta.get("tokenizer", ""), cfg.vocab_size)
        set_template_kwargs(tok, None, meta.get("chat_template_kwargs"))
    init, _ = scalar_model_fns(cfg)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
        unbox(jax.eval_shape(init, jax.random.PRNGKey(0))),
    )
    return cfg, load_scalar_params(run_dir, target), tok


def load_reward_scorer(run_dir: str, tok=None, *, batch_size: int = 16) -> ScoreFn:
    """`reward_model_scorer` of a reward-model run (alignment/reward.py), on one device; `tok`
    defaults to the run's own tokenizer (its checkpoint meta)."""
    from flaxlm.train.checkpoint import CheckpointError, read_meta

    meta = read_meta(run_dir)[1]
    if meta.get("head") != "scalar":
        raise CheckpointError(f"{run_dir}: not a reward-model run (head {meta.get('head')!r})")
    if meta.get("prm"):  # its head was trained at step separators, not at an answer's end
        raise CheckpointError(f"{run_dir}: a process reward model (scores steps, not whole "
                              "answers): best_of_n --prm scores with it")  # fmt: skip
    cfg, params, tok = load_scalar_run(run_dir, meta, tok)
    return reward_model_scorer(cfg, params, tok, batch_size=batch_size)


def bootstrap_interval(
    margins: Sequence[float], tie_margin: float = 0.0, n_boot: int = 2000, seed: int = 0,
    groups: Sequence | None = None,
) -> tuple[float, float]:  # fmt: skip
    """95% percentile interval of the win rate (over every margin), resampling prompts with
    replacement. `groups`: the prompt of each margin (any hashable), so the samples of one
    prompt are drawn together (a cluster bootstrap); None: each margin is a prompt of its own."""
    d = np.asarray(margins, np.float64)
    outcome = np.where(d > tie_margin, 1.0, np.where(d < -tie_margin, 0.0, 0.5))
    if groups is None:
        sums, counts = outcome, np.ones_like(outcome)
    else:
        if len(groups) != len(d):
            raise ValueError(f"bootstrap_interval: {len(groups)} groups for {len(d)} margins")
        ids = {}
        gid = np.array([ids.setdefault(g, len(ids)) for g in groups], np.int64)
        sums = np.bincount(gid, weights=outcome, minlength=len(ids))
        counts = np.bincount(gid, minlength=len(ids)).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    rates = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))


def prompt_key(prompt) -> str:
    """A hashable key of a prompt (a user turn's text or a list of messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def read_completions(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) of each line of a completion file; bad lines name file:line."""
    return [(prompt, completion) for _, prompt, completion, _ in read_completion_lines(path)]


def read_completion_lines(path: str) -> list[tuple[int, str | list, str, bool | None]]:
    """(line number, prompt, completion, stopped) of each non-blank line of a completion file
    (`read_completion_records` without the record); bad lines name file:line. `stopped`:
    generate --json's field (False: cut at --max_new_tokens), None where a line has none."""
    return [r[:4] for r in read_completion_records(path)]


class CompletionLine(NamedTuple):
    """One line of a completion file, as `read_completion_records` checked it."""

    line: int  # 1-based, counting blank lines
    prompt: str | list
    completion: str
    stopped: bool | None  # generate --json's "stopped"; None where the line has none
    record: dict  # the whole JSON object, e.g. for its "meta" (left unchecked here)


def read_completion_records(path: str) -> list[CompletionLine]:
    """Each non-blank line of a completion file (what evaluation/best_of_n.py reports its scores
    by, and where it finds each sample's "meta"); bad lines name file:line. Only the prompt and
    the completion are checked: fields a reader of the file uses besides them are its to check."""
    from flaxlm.data.chat_records import FormatError, _messages, fields_config

    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt, completion = rec["prompt"], rec["completion"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{path}:{lineno}: not a {{"prompt", "completion"}} JSON object ({e!r})'
                ) from None
            # Checked here: a null completion, a numeric prompt or bad messages (an unknown
            # role, no content, an assistant turn last) failed inside the reward model's
            # rendering, after the model loaded, naming no line.
            if not isinstance(completion, str):
                raise ValueError(f"{path}:{lineno}: completion must be a string, got "
                                 f"{type(completion).__name__}")  # fmt: skip
            if not isinstance(prompt, (str, list)):
                raise ValueError(f"{path}:{lineno}: prompt must be a string or a list of "
                                 "{role, content} messages")  # fmt: skip
            if isinstance(prompt, list):  # checked before the reward model loads, by line
                try:
                    msgs = _messages(prompt, fields_config(), "prompt")
                    if msgs[-1]["role"] == "assistant":
                        raise FormatError("bad_messages", "the last message is an assistant "
                                          "turn: nothing for the completion to answer")  # fmt: skip
                except FormatError as e:
                    raise ValueError(f"{path}:{lineno}: prompt must be a string or a list of "
                                     f"{{role, content}} messages ({e})") from None  # fmt: skip
            stopped = rec.get("stopped")
            stopped = stopped if isinstance(stopped, bool) else None
            out.append(CompletionLine(lineno, prompt, completion, stopped, rec))
    if not out:
        raise ValueError(f"{path}: no completions")
    return out


def score_file(score: ScoreFn, path: str, prompts: Sequence,
               completions: Sequence[str]) -> list[float]:  # fmt: skip
    """`score` of a completion file's lines as floats; a response the scorer cannot take (the
    chat template cannot render it) is a ValueError naming the file and the response's index."""
    try:
        out = [float(x) for x in score(prompts, completions)]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if len(out) != len(completions):
        raise ValueError(f"{path}: the scorer returned {len(out)} values for "
                         f"{len(completions)} completions")  # fmt: skip
    return out


def scorer_from_flag(load, run_dir: str, batch_size: int, flag: str):
    """`load(run_dir, batch_size=)` of a CLI flag's run: a directory that is not a run, not of
    the kind `load` reads, with no checkpoint or a missing tokenizer is one line naming the
    flag (SystemExit), not a traceback."""
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        raise SystemExit(f"{flag} {run_dir}: not a run directory")
    from flaxlm.models.hf_tokenizer import HFError
    from flaxlm.train.checkpoint import CheckpointError

    try:
        return load(run_dir, batch_size=batch_size)
    except (CheckpointError, HFError, OSError) as e:
        raise SystemExit(f"{flag} {run_dir}: {e}") from None


def reward_scorer_from_flag(run_dir: str, batch_size: int) -> ScoreFn:
    """`load_reward_scorer` of a --reward_model flag's run (`scorer_from_flag`)."""
    return scorer_from_flag(load_reward_scorer, run_dir, batch_size, "--reward_model")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.winrate",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("a", help="completion file of model A (jsonl: prompt, completion)")
    p.add_argument("b", help="completion file of model B, the same prompts in the same order")
    p.add_argument("--reward_model", required=True, help="reward-model run directory")
    p.add_argument("--tie_margin", type=float, default=0.0, help="|a - b| <= this is a tie")
    p.add_argument("--batch", type=int_at_least(1), default=16, help="rows per reward-model call")
    p.add_argument("--out", default="", help="also write the result (and per-prompt scores) here")
    args = p.parse_args(argv)
    if not args.tie_margin >= 0:
        raise SystemExit(f"--tie_margin must be >= 0, got {args.tie_margin}")
    try:
        a, b = read_completions(args.a), read_completions(args.b)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if len(a) != len(b):
        raise SystemExit(f"{args.a} has {len(a)} completions, {args.b} has {len(b)}")
    for i, ((pa, _), (pb, _)) in enumerate(zip(a, b), 1):
        if pa != pb:
            raise SystemExit(f"completion {i}: the prompts differ ({pa!r} vs {pb!r})")
    score = reward_scorer_from_flag(args.reward_model, args.batch)
    prompts = [x[0] for x in a]
    try:  # a response the chat template cannot render: one line naming file and index
        sa, sb = [score_file(score, path, prompts, [x[1] for x in lines])
                  for path, lines in ((args.a, a), (args.b, b))]  # fmt: skip
    except ValueError as e:
        raise SystemExit(str(e)) from None
    res = win_rate_from_scores(sa, sb, tie_margin=args.tie_margin)
    groups = [prompt_key(x) for x in prompts]
    lo, hi = bootstrap_interval([x - y for x, y in zip(sa, sb)], args.tie_margin, groups=groups)
    res.update(ci95_low=lo, ci95_high=hi, prompts=len(set(groups)), a=args.a, b=args.b,
               reward_model=args.reward_model)  # fmt: skip
    per = "" if res["prompts"] == res["n"] else f" samples of {res['prompts']} prompts"
    print(f"win rate of {args.a} over {args.b}: {res['win_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f} "
          f"over prompts; {res['wins']} wins, {res['losses']} losses, {res['ties']} ties of "
          f"{res['n']}{per}); mean reward {res['mean_a']:.4f} vs {res['mean_b']:.4f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**res, "scores_a": sa, "scores_b": sb}, f, indent=1)
    return res


if __name__ == "__main__":
    main()
