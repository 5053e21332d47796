"""Best-of-N selection: each prompt's best sample as SFT data, its best and worst as a DPO pair.

The selection step of rejection-sampling fine-tuning (RAFT, expert iteration, STaR, Llama 2's
rejection-sampling stage) and of iterative / self-rewarding DPO: sample K responses per prompt
from the policy, score them with a reward model or a verifier, keep the best to fine-tune on,
or the best and the worst as a preference pair. Sampling (`flaxlm.generate --num_samples K
--json`) and scoring (evaluation/winrate.py's reward-model scorer, GRPO's reward functions)
exist; this module picks and writes:

    python -m flaxlm.generate runs/sft --prompts_file p.txt --chat --json \\
        --num_samples 8 --temperature 0.8 > samples.jsonl
    python -m flaxlm.evaluation.best_of_n --reward_model runs/rm samples.jsonl \\
        --sft_out best.jsonl --pairs_out pairs.jsonl --min_margin 0.5

or, on checkable tasks (math, code, anything with a reference answer or a rule), by verifiable
rewards instead of a reward model:

    python -m flaxlm.generate runs/sft --prompts_file rl_prompts.jsonl --chat --json \\
        --num_samples 8 --temperature 0.8 > samples.jsonl
    python -m flaxlm.evaluation.best_of_n --rewards exact_match,format:0.1 samples.jsonl \\
        --sft_out best.jsonl --min_reward 1.0

or by a process reward model (configs/prm.py), each completion's steps verified one by one
(with the default separator a completion's non-blank lines are its steps):

    python -m flaxlm.evaluation.best_of_n --prm runs/prm --prm_aggregate min samples.jsonl \\
        --sft_out best.jsonl

Scorers (exactly one): --reward_model RUN, a reward-model run (winrate's scorer: prompt +
completion rendered with the chat template); --prm RUN, a process reward model run
(alignment/prm.py; evaluation/prm_scorer.py): each completion is split into steps at the run's
own `prm.step_separator` (its training meta; blank pieces are no steps), each step gets its
probability of being right, and the sample scores their --prm_aggregate (min, the default:
its worst step, Lightman et al.; prod, last or mean; a run trained on final steps only,
`prm.train_on="last"`, defaults to last), in [0, 1], a blank completion 0; or
--rewards SPEC, GRPO's `grpo.rewards` syntax
(alignment/grpo_rewards.py `parse_rewards`: "exact_match", "format", "judge", "math_verify",
"code_tests", a registered name or "module:function", each with an optional ":weight"; "rm" is
--reward_model's; code_tests run their programs under --code_limits, e.g. timeout=20,
alignment/verify_code.py's Limits), each sample scored Σ weight·fn(meta, completion) (plus
`prompt=`, its turns, for a function that takes it) by GRPO's own `call_reward_fns`, in float32
as its rollouts are (`code_tests` runs several samples at once). `meta` is the line's "meta"
object: what generate --json copies from each record of a .jsonl --prompts_file of RL prompts
({"prompt", "meta": {"answer": ...}}, the GRPO prompt format); a line without one is judged with
{} (enough for "format"). A function that raises or returns no finite number is an error naming
file:line (GRPO drops such a sample; here it would silently lose, or never win, its prompt) and,
when the line has no "meta", saying so. A blank completion is not judged: it scores
--empty_reward (default −1, GRPO's rollout.empty_reward), as GRPO scores an empty response.

Input: one or more completion files (generate --json lines, or any jsonl of {"prompt",
"completion"}), read and checked by winrate's reader (a bad line is an error naming file:line).
Every line whose prompt is the same conversation is a sample of one prompt, whichever file it
is in (several files: samples of several models or temperatures for the same prompts; a text
prompt and the same lone user turn as a list of messages are one prompt). Prompts are kept in
the order they first appear, samples in input order (files as given, then lines).

Selection per prompt, among its usable samples (a blank completion is scored and counted in the
mean, but is never written: SFT and DPO's readers refuse an empty assistant turn; a sample
generate cut at --max_new_tokens, "stopped": false, may be a pair's rejected side but not the
best, unless --keep_truncated: SFT on it would teach the end of turn after half an answer;
"only_truncated" counts prompts that had no other):
  best    the highest score; a tie goes to the first in input order, so a rerun writes the same
  SFT     {"messages": prompt turns + the best as the assistant turn}, what SFT reads; skipped
          ("below_min_reward") when the best scores below --min_reward
  pair    {"prompt", "chosen": best, "rejected": worst, "margin": best − worst}, what DPO and
          reward training read. The worst is the lowest-scoring sample whose text (less
          surrounding whitespace) differs from the best's (the first of equals): identical
          texts never make a pair. Skipped: "one_sample" (fewer than two usable samples),
          "identical" (every sample says what the best says), "tie" (margin 0: no preference to
          learn, whatever --min_margin), "below_min_margin".
DPO ignores "margin"; reward training subtracts it (configs/reward.py loss.use_margin): it is
in this reward model's units, so turn use_margin off, or rescale, to train another one on them.

Printed: the scorer, prompts, samples, the mean reward of every sample, the mean of each
prompt's best, the best-of-N gain (mean over prompts of best − the prompt's mean: what picking
the best bought; mean best − mean reward when every prompt has as many samples), what was
written and what was skipped, by reason. --out also writes that and every line's score and
every prompt's outcome. Outputs are written whole (a temporary file renamed into place: an
interrupted run leaves no half file) and never over an input.

From Python, any reward (`ScoreFn`, prompts and responses -> floats: a reward model, the
built-in world's judge over your prompts' answers, a verifier) selects with `best_of_n`; so
does a rewards spec or `parse_rewards`' list [(name, fn, weight)], judged with each line's meta.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from flaxlm.evaluation.cli_types import int_at_least
from flaxlm.evaluation.prm_scorer import (
    AGGREGATES,
    completion_scorer,
    default_aggregate,
    prm_scorer_from_flag,
)
from flaxlm.evaluation.winrate import (
    ScoreFn,
    prompt_key,
    read_completion_records,
    reward_scorer_from_flag,
    score_file,
)

Rewards = list[tuple[str, Callable | None, float]]  # grpo_rewards.parse_rewards' [(name, fn, w)]
EMPTY_REWARD = -1.0  # a blank completion's score with --rewards: GRPO's rollout.empty_reward

SFT_SKIPS = ("no_usable_sample", "only_truncated", "below_min_reward")
PAIR_SKIPS = ("no_usable_sample", "only_truncated", "one_sample", "identical", "tie",
              "below_min_margin")  # fmt: skip


@dataclass(frozen=True)
class Sample:
    """One line of a completion file: where it is, its prompt as given and as checked turns."""

    path: str
    line: int
    prompt: str | list
    turns: list[dict]
    completion: str
    stopped: bool | None = None  # generate --json's "stopped": False = cut at max_new_tokens
    meta: dict | None = None  # the line's "meta" object (reward functions judge by it); None: none

    @property
    def loc(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def usable(self) -> bool:
        return bool(self.completion.strip())


@dataclass
class Selection:
    """What `select` chose: the SFT records and pairs to write, the summary, and per line
    ({"file", "line", "prompt" (index), "score"}) and per prompt (its outcome) details."""

    sft: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    lines: list[dict] = field(default_factory=list)
    prompts: list[dict] = field(default_factory=list)


def read_samples(paths: Sequence[str]) -> list[Sample]:
    """Every line of the completion files, in input order. A line winrate's reader refuses, or
    whose prompt SFT/DPO's readers would refuse (a blank text or turn), or whose "meta" is not
    a JSON object (null is none), is a ValueError naming file:line; so is a file named twice
    (its samples would count twice)."""
    from flaxlm.data.chat_records import (
        FormatError,
        fields_config,
        has,
        prompt_messages,
        record_meta,
    )

    if not paths:
        raise ValueError("no completion files")
    fields, seen, out = fields_config(), {}, []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{path}: named twice (as {seen[real]})")
        seen[real] = path
        for line, prompt, completion, stopped, rec in read_completion_records(path):
            try:  # record=True checks: a written record must read back in SFT and DPO
                turns = prompt_messages(prompt, fields)
            except FormatError as e:
                raise ValueError(f"{path}:{line}: unusable prompt ({e})") from None
            try:
                meta = record_meta(rec, fields) if has(rec, fields.meta) else None
            except FormatError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
            out.append(Sample(path, line, prompt, turns, completion, stopped, meta))
    return out


def score_samples(score: ScoreFn, samples: Sequence[Sample]) -> list[float]:
    """`score` of every sample, one call per file (a response the scorer cannot take names its
    file, as winrate's do); a non-finite score is a ValueError naming file:line (a NaN would
    never be the best nor the worst, and would make every mean NaN)."""
    by_file: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_file.setdefault(s.path, []).append(i)
    scores = [0.0] * len(samples)
    for path, idx in by_file.items():
        got = score_file(score, path, [samples[i].prompt for i in idx],
                         [samples[i].completion for i in idx])  # fmt: skip
        for i, x in zip(idx, got, strict=True):
            scores[i] = x
    return _finite(samples, scores)


def _finite(samples: Sequence[Sample], scores: list[float]) -> list[float]:
    for s, x in zip(samples, scores, strict=True):
        if not math.isfinite(x):
            raise ValueError(f"{s.loc}: score {x} is not finite")
    return scores


def reward_fn_scores(rewards: Rewards, samples: Sequence[Sample], *,
                     empty_reward: float = EMPTY_REWARD) -> list[float]:  # fmt: skip
    """Each sample's Σ weight·fn(meta, completion) over `rewards` (`parse_rewards`' list), as
    GRPO's rollouts sum it (alignment/rl_rollout.py `call_reward_fns`: `prompt=` the sample's
    turns for a function that takes it; float32). `meta`: the line's, {} where it has none. A
    blank completion is not judged and scores `empty_reward`, as GRPO's empty response. A
    function that raises or returns no finite number, or a non-finite sum, is a ValueError
    naming the sample's file:line (and the missing "meta", where the line has none)."""
    from flaxlm.alignment.rl_rollout import call_reward_fns

    if not rewards:
        raise ValueError("no reward functions")
    if any(fn is None for _, fn, _ in rewards):
        raise ValueError("'rm' names the reward model of GRPO's reward_from: score with a "
                         "reward-model run (--reward_model) instead")  # fmt: skip
    if not math.isfinite(empty_reward):
        raise ValueError(f"empty_reward must be finite, got {empty_reward}")
    judged = [s for s in samples if s.usable]
    got, ok, errors = call_reward_fns(
        [fn for _, fn, _ in rewards], [w for _, _, w in rewards],
        [{} if s.meta is None else s.meta for s in judged], [s.completion for s in judged],
        [s.turns for s in judged],
    )  # fmt: skip
    bad = [s for s, good in zip(judged, ok, strict=True) if not good]
    if bad:  # (one error per failed sample, in sample order: the first is bad[0]'s)
        why = errors[0] if errors else "no reward"
        if bad[0].meta is None:
            why += ('; the line has no "meta" (generate --json copies it from each record of a '
                    '.jsonl --prompts_file of {"prompt", "meta"} records)')  # fmt: skip
        raise ValueError(f"{bad[0].loc}: {why}")
    # each float32 sum as the shortest decimal that is it (1.1, not 1.100000023841858): the
    # same order, ties and thresholds, and margins and means without float32's digits
    it = iter(float(str(x)) for x in np.asarray(got, np.float32))
    return _finite(samples, [next(it) if s.usable else float(empty_reward) for s in samples])


def _scores(score, samples: Sequence[Sample], empty_reward: float) -> list[float]:
    """`best_of_n`'s scores: a ScoreFn's (`score_samples`), or a rewards spec's / list's."""
    if isinstance(score, str):
        from flaxlm.alignment.grpo_rewards import parse_rewards

        score = parse_rewards(score, "rewards")
    if isinstance(score, list):
        return reward_fn_scores(score, samples, empty_reward=empty_reward)
    return score_samples(score, samples)


def _pair_prompt(s: Sample):
    # a text prompt stays the text (one user turn to DPO's reader); messages are written checked
    return s.prompt if isinstance(s.prompt, str) else s.turns


def select(samples: Sequence[Sample], scores: Sequence[float], *, min_reward: float | None = None,
           min_margin: float = 0.0, keep_truncated: bool = False) -> Selection:  # fmt: skip
    """Each prompt's best (SFT) and (best, worst) pair (see the module docstring), with the
    counts of what was skipped and why. `min_reward` None: every best is kept.
    `keep_truncated`: a sample generate cut at max_new_tokens ("stopped": false) may be the
    best too (by default it may only be a pair's rejected side)."""
    if len(samples) != len(scores):
        raise ValueError(f"select: {len(scores)} scores for {len(samples)} samples")
    if not (min_margin >= 0 and math.isfinite(min_margin)):
        raise ValueError(f"min_margin must be >= 0 and finite, got {min_margin}")
    if min_reward is not None and not math.isfinite(min_reward):
        raise ValueError(f"min_reward must be finite, got {min_reward}")
    groups: dict[int, list[int]] = {}
    sel = Selection()
    index: dict[str, int] = {}  # prompt -> its index, in first-seen order
    for i, s in enumerate(samples):  # lines in input order, each naming its prompt's index
        g = index.setdefault(prompt_key(s.turns), len(index))
        groups.setdefault(g, []).append(i)
        sel.lines.append({"file": s.path, "line": s.line, "prompt": g, "score": scores[i]})
    sft_skip, pair_skip = Counter(), Counter()
    bests, gains = [], []
    for members in groups.values():
        mean = sum(scores[i] for i in members) / len(members)
        info = {"prompt": samples[members[0]].prompt, "samples": len(members), "mean": mean}
        sel.prompts.append(info)
        usable = [i for i in members if samples[i].usable]
        if not usable:
            info["sft"] = info["pair"] = "no_usable_sample"
            sft_skip["no_usable_sample"] += 1
            pair_skip["no_usable_sample"] += 1
            continue
        # A sample cut at max_new_tokens is no answer to train on: SFT would learn the end of
        # turn after half a sentence. It may still lose a pair (rambling to the limit is bad).
        eligible = [i for i in usable if keep_truncated or samples[i].stopped is not False]
        if not eligible:
            info["sft"] = info["pair"] = "only_truncated"
            sft_skip["only_truncated"] += 1
            pair_skip["only_truncated"] += 1
            continue
        b = eligible[0]
        for i in eligible[1:]:  # strictly greater: a tie stays with the first in input order
            if scores[i] > scores[b]:
                b = i
        best = samples[b]
        bests.append(scores[b])
        gains.append(scores[b] - mean)
        info.update(best=best.loc, best_score=scores[b])
        if min_reward is not None and scores[b] < min_reward:
            info["sft"] = "below_min_reward"
            sft_skip["below_min_reward"] += 1
        else:
            info["sft"] = "written"
            answer = {"role": "assistant", "content": best.completion}
            sel.sft.append({"messages": [*best.turns, answer]})
        text = best.completion.strip()
        others = [i for i in usable if samples[i].completion.strip() != text]
        if len(usable) < 2:
            why = "one_sample"
        elif not others:
            why = "identical"
        else:
            w = others[0]
            for i in others[1:]:  # strictly lower: the first of equally bad ones
                if scores[i] < scores[w]:
                    w = i
            margin = scores[b] - scores[w]
            info.update(worst=samples[w].loc, worst_score=scores[w], margin=margin)
            why = "tie" if margin <= 0 else "below_min_margin" if margin < min_margin else ""
            if not why:
                why = "written"
                sel.pairs.append({"prompt": _pair_prompt(best), "chosen": best.completion,
                                  "rejected": samples[w].completion, "margin": margin})  # fmt: skip
        info["pair"] = why
        if why != "written":
            pair_skip[why] += 1
    n = len(samples)
    sel.summary = {
        "files": list(dict.fromkeys(s.path for s in samples)),
        "prompts": len(groups),
        "samples": n,
        "blank_samples": sum(not s.usable for s in samples),
        "truncated_samples": sum(s.stopped is False for s in samples),
        "mean_reward": sum(scores) / n if n else None,
        "mean_best_reward": sum(bests) / len(bests) if bests else None,
        "best_of_n_gain": sum(gains) / len(gains) if gains else None,
        "sft_written": len(sel.sft),
        "sft_skipped": {k: sft_skip[k] for k in SFT_SKIPS},
        "pairs_written": len(sel.pairs),
        "pairs_skipped": {k: pair_skip[k] for k in PAIR_SKIPS},
        "min_reward": min_reward,
        "min_margin": min_margin,
        "keep_truncated": keep_truncated,
    }
    return sel


def best_of_n(score: ScoreFn | str | Rewards, paths: Sequence[str], *,
              min_reward: float | None = None, min_margin: float = 0.0,
              keep_truncated: bool = False,
              empty_reward: float = EMPTY_REWARD) -> Selection:  # fmt: skip
    """Reads the completion files, scores every line with `score` and selects (`select`).
    `score`: a ScoreFn, or reward functions judged by each line's meta (`reward_fn_scores`):
    a `grpo.rewards`-style spec ("exact_match,format:0.1") or `parse_rewards`' list."""
    samples = read_samples(paths)
    return select(samples, _scores(score, samples, empty_reward), min_reward=min_reward,
                  min_margin=min_margin, keep_truncated=keep_truncated)  # fmt: skip


def write_atomic(path: str, text: str) -> None:
    """`text` at `path`, renamed into place whole: a kill or a full disk mid-write leaves the
    previous file (or none), never half of one, and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")  # fmt: skip
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": never clobbers a file of that name
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def check_outputs(outputs: dict[str, str], inputs: Sequence[str]) -> None:
    """Before anything is scored: no output is an input, a directory, or another output (the
    last written would silently replace the first). SystemExit naming the flag."""
    ins = {os.path.realpath(p): p for p in inputs}
    taken: dict[str, str] = {}
    for flag, path in outputs.items():
        real = os.path.realpath(path)
        if real in ins or any(os.path.exists(path) and os.path.exists(p)
                              and os.path.samefile(path, p) for p in inputs):  # fmt: skip
            raise SystemExit(f"{flag} {path}: is an input file; refusing to overwrite it")
        if os.path.isdir(path):
            raise SystemExit(f"{flag} {path}: is a directory")
        if real in taken:
            raise SystemExit(f"{flag} {path}: also given to {taken[real]}")
        taken[real] = flag


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_text(s: dict, sft_out: str = "", pairs_out: str = "") -> str:
    """The printed summary: the scorer (`s["scorer"]`, where given) and the best-of-N gain,
    then what was written and skipped."""
    skipped = lambda d: ", ".join(f"{n} {k}" for k, n in d.items() if n) or "none"  # noqa: E731
    gain = "n/a" if s["best_of_n_gain"] is None else f"{s['best_of_n_gain']:+.4f}"
    by = f" scored by {s['scorer']}" if s.get("scorer") else ""
    lines = [f"best-of-N{by}: {s['samples']} samples of {s['prompts']} prompts "
             f"({s['blank_samples']} blank, {s['truncated_samples']} cut at max_new_tokens); "
             f"mean reward {_fmt(s['mean_reward'])}, mean best "
             f"{_fmt(s['mean_best_reward'])} (gain {gain} per prompt)"]  # fmt: skip
    for what, out, key in (("SFT records", sft_out, "sft"), ("pairs", pairs_out, "pairs")):
        dest = f" written to {out}" if out else " selected, not written"
        lines.append(f"{what}: {s[key + '_written']}{dest}; skipped: "
                     f"{skipped(s[key + '_skipped'])}")  # fmt: skip
    return "\n".join(lines)


def _with_code_limits(p: argparse.ArgumentParser, rewards: Rewards, text: str):
    """(`rewards` with code_tests / code_tests_partial running under the Limits `text` sets,
    those settings as a dict): --code_limits; a bad value, or no code reward to bind them to,
    is a usage error."""
    from flaxlm.alignment import verify_code

    try:
        settings = verify_code.parse_limits(text, "--code_limits")
    except ValueError as e:
        p.error(str(e))
    code = (verify_code.code_tests, verify_code.code_tests_partial)
    if not any(fn in code for _, fn, _ in rewards):
        p.error("--code_limits: no code_tests or code_tests_partial among --rewards")
    limits = verify_code.limits_from_config(settings, "--code_limits")
    return [(name, verify_code.with_limits(fn, limits), w) for name, fn, w in rewards], settings


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m flaxlm.evaluation.best_of_n",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("files", nargs="+", help="completion files (generate --json lines); lines "
                   "with the same prompt are one prompt's samples, across files")  # fmt: skip
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--reward_model", help="score with this reward-model run")
    scorer.add_argument("--prm", help="score with this process-reward-model run: completions "
                        "split into steps at its step separator, the step probabilities "
                        "aggregated by --prm_aggregate")  # fmt: skip
    scorer.add_argument("--rewards", help="score with GRPO's reward functions, judged by each "
                        "line's meta: grpo.rewards' syntax, e.g. exact_match,format:0.1 or "
                        "my_rewards:numeric:0.5")  # fmt: skip
    p.add_argument("--prm_aggregate", choices=AGGREGATES, default=None, help="with --prm: a "
                   "sample's score from its step probabilities (default min; last for a run "
                   "trained with prm.train_on=last)")  # fmt: skip
    p.add_argument("--empty_reward", type=float, default=None, help="with --rewards: the score "
                   f"of a blank completion, never judged (default {EMPTY_REWARD:g}, GRPO's "
                   "rollout.empty_reward)")  # fmt: skip
    p.add_argument("--code_limits", default=None, help="with --rewards code_tests(_partial): "
                   "verify_code's Limits for the programs, e.g. timeout=20,memory_mb=4096 "
                   "(default: Limits' defaults, as grpo.code_limits')")  # fmt: skip
    p.add_argument("--sft_out", default="", help="write each prompt's best as SFT records here")
    p.add_argument("--pairs_out", default="", help="write (best, worst) DPO pairs here")
    p.add_argument("--min_margin", type=float, default=0.0,
                   help="skip pairs whose reward margin is below this (0 never pairs)")  # fmt: skip
    p.add_argument("--min_reward", type=float, default=None,
                   help="skip SFT records whose best reward is below this")  # fmt: skip
    p.add_argument("--keep_truncated", action="store_true", help="let a sample cut at "
                   "max_new_tokens (\"stopped\": false) be the best too; by default it may only "
                   "be a pair's rejected side")  # fmt: skip
    p.add_argument("--batch", "--batch_size", dest="batch", type=int_at_least(1), default=16,
                   help="rows per reward-model call (--reward_model, --prm)")  # fmt: skip
    p.add_argument("--out", default="", help="also write the summary, per-line scores and "
                   "per-prompt outcomes here (JSON)")  # fmt: skip
    args = p.parse_args(argv)
    if not (args.sft_out or args.pairs_out):
        p.error("nothing to write: give --sft_out and/or --pairs_out")
    if not (args.min_margin >= 0 and math.isfinite(args.min_margin)):
        p.error(f"--min_margin must be >= 0 and finite, got {args.min_margin}")
    if args.min_reward is not None and not math.isfinite(args.min_reward):
        p.error(f"--min_reward must be finite, got {args.min_reward}")
    rewards = None
    if args.prm_aggregate is not None and args.prm is None:
        p.error("--prm_aggregate needs --prm")
    if args.rewards is not None:
        from flaxlm.alignment.grpo_rewards import REWARD_MODEL, parse_rewards

        try:  # an unknown name, an unimportable function, a bad weight: a usage error
            rewards = parse_rewards(args.rewards, "--rewards")
        except ValueError as e:
            p.error(str(e))
        if any(fn is None for _, fn, _ in rewards):
            p.error(f"--rewards: {REWARD_MODEL!r} is GRPO's reward model (reward_from); score "
                    "with a reward-model run by --reward_model instead")  # fmt: skip
        code_limits = None
        if args.code_limits is not None:
            rewards, code_limits = _with_code_limits(p, rewards, args.code_limits)
        empty = EMPTY_REWARD if args.empty_reward is None else args.empty_reward
        if not math.isfinite(empty):
            p.error(f"--empty_reward must be finite, got {empty}")
        spec = ",".join(f"{name}:{w:g}" for name, _, w in rewards)
        about = {"scorer": f"rewards {spec}", "rewards": spec, "empty_reward": empty}
        if code_limits is not None:
            about["code_limits"] = code_limits
    elif args.empty_reward is not None:
        p.error("--empty_reward needs --rewards (a reward model scores blank completions)")
    elif args.code_limits is not None:
        p.error("--code_limits needs --rewards with code_tests or code_tests_partial")
    elif args.prm is not None:  # (the aggregate's default is the run's: set once it loads)
        about = {"prm": args.prm}
    else:
        about = {"scorer": f"reward model {args.reward_model}", "reward_model": args.reward_model}
    outputs = {flag: path for flag, path in (("--sft_out", args.sft_out),
               ("--pairs_out", args.pairs_out), ("--out", args.out)) if path}  # fmt: skip
    check_outputs(outputs, args.files)
    try:  # every line checked before the reward model loads
        samples = read_samples(args.files)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    try:
        if args.prm is not None:
            prm = prm_scorer_from_flag(args.prm, args.batch)
            agg = args.prm_aggregate or default_aggregate(prm)
            about = {
                "scorer": f"process reward model {args.prm} ({agg} over steps)",
                "prm": args.prm,
                "prm_aggregate": agg,
                "step_separator": prm.separator,
            }
            scores = score_samples(completion_scorer(prm, about["prm_aggregate"]), samples)
        elif rewards is None:
            score = reward_scorer_from_flag(args.reward_model, args.batch)
            scores = score_samples(score, samples)
        else:
            scores = reward_fn_scores(rewards, samples, empty_reward=about["empty_reward"])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sel = select(samples, scores, min_reward=args.min_reward, min_margin=args.min_margin,
                 keep_truncated=args.keep_truncated)  # fmt: skip
    res = {**sel.summary, **about, "sft_out": args.sft_out, "pairs_out": args.pairs_out}
    if args.sft_out:
        write_atomic(args.sft_out, jsonl(sel.sft))
    if args.pairs_out:
        write_atomic(args.pairs_out, jsonl(sel.pairs))
    if args.out:
        out = {**res, "prompt_outcomes": sel.prompts, "scores": sel.lines}
        write_atomic(args.out, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(summary_text(res, args.sft_out, args.pairs_out))
    return res


if __name__ == "__main__":
    main()
