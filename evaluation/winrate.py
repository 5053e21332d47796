"""Reward-model win rate: how often model A's responses out-score model B's (or references).

`score(prompts, responses) -> list[float]` is any reward function: a trained reward model
(`reward_model_scorer` wraps models/heads.py's ScalarHeadModel to take text) or the built-in
world's judge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

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
    diff = [a - b for a, b in zip(sa, sb)]
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

    A prompt is a user turn (text) or a list of messages; prompt + response are rendered with
    the chat template (data/formats.py) and the reward is read at the response's closing
    `<|end|>`, where the reward model was trained to put it. Rows are right-padded to a power of
    two (sequences longer than max_seq_len keep their end).
    """
    from flaxlm.data.formats import ChatTemplate, render_chat
    from flaxlm.models.heads import scalar_model_fns, sequence_values

    template = ChatTemplate(tok)
    _, apply = scalar_model_fns(cfg)
    fn = jax.jit(lambda p, t, s: sequence_values(apply(p, t, None, s), s))

    def score(prompts, responses) -> list[float]:
        rows = []
        for p, r in zip(prompts, responses, strict=True):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            ids, _ = render_chat(msgs, template, add_generation_prompt=True)
            rows.append((list(ids) + template.encode(r) + [template.end_id])[-cfg.max_seq_len :])
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
