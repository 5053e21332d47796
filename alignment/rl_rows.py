"""The row layout of a rollout (see alignment/rl_rollout.py's docstring): cutting rows to the
narrowest of a few widths before the forward (`rollout.trim_buckets`), padding per-token results
back to seq_len, and placing per-response-token values at their row positions.

Re-exported by flaxlm.alignment.rl_rollout, where its callers find these names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def row_buckets(seq_len: int, n: int) -> list[int]:
    """The widths rollout rows are cut to (`rollout.trim_buckets` = n): seq_len·k/n for k = 1
    .. n, rounded up to multiples of 8; n <= 1: seq_len alone (no trimming)."""
    widths = {seq_len}
    for k in range(1, max(n, 1)):
        w = -(-seq_len * k // n)
        widths.add(min(seq_len, w + -w % 8))
    return sorted(widths)


def trim_rows(rows: dict, seq_len: int, buckets: Sequence[int], width: int | None = None) -> dict:
    """`rows` with every (B, seq_len, ...) array cut to `width`, by default the narrowest bucket
    that holds every row's real tokens (`trimmed_width`): what follows is padding (segment id
    0, loss mask 0), which causal attention and every masked loss ignore, so the forward and
    the loss are the same on fewer columns. TRL pads each batch to its longest row; here a
    handful of widths (`row_buckets`) bounds the programs compiled."""
    width = trimmed_width(rows, buckets) if width is None else width
    if width >= seq_len:
        return rows
    cut = lambda v: v[:, :width] if np.ndim(v) >= 2 and np.shape(v)[1] == seq_len else v  # noqa: E731
    return {k: cut(v) for k, v in rows.items()}


def trimmed_width(rows: dict, buckets: Sequence[int]) -> int:
    """The narrowest of `buckets` that holds every row's real tokens (a nonzero `segment_ids`
    / `*_segment_ids`)."""
    used = 0
    for k, v in rows.items():
        if k == "segment_ids" or k.endswith("_segment_ids"):
            cols = np.flatnonzero(np.asarray(v).any(axis=0))
            used = max(used, int(cols[-1]) + 1 if len(cols) else 0)
    return next(b for b in buckets if b >= used)


def pad_columns(x, width: int, seq_len: int):
    """A per-token (B, width, ...) result of rows cut to `width` padded back to (B, seq_len,
    ...) with zeros; anything else (or nothing cut) as it is."""
    if width >= seq_len or np.ndim(x) < 2 or np.shape(x)[1] != width:
        return x
    pad = [(0, 0), (0, seq_len - width)] + [(0, 0)] * (np.ndim(x) - 2)
    return np.pad(np.asarray(x), pad)


def response_to_rows(x_BN, prompt_lens, seq_len: int) -> np.ndarray:
    """(B, N) per-response-token values → the (B, T) row layout (0 elsewhere)."""
    B, N = x_BN.shape
    out = np.zeros((B, seq_len), np.float32)
    for b in range(B):
        start = int(prompt_lens[b]) - 1
        n = min(N, seq_len - start)
        out[b, start : start + n] = x_BN[b, :n]
    return out
