"""Reward-model win rate: how often model A's responses out-score model B's (or references).

`score(prompts, responses) -> list[float]` is any reward function — a trained reward model
(models/heads.py) wrapped to take text, or the built-in world's judge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
