"""What every filtering stage of preprocess counts, kept one way: documents seen, removed per
reason, and a few examples of each reason for the report (``Cleaner``, ``Deduper`` and
``QualityFilter`` report in this shape, and data/beam.py merges them by it)."""

from __future__ import annotations

REMOVED_EXAMPLES = 3  # removed-document examples kept per reason


def count_removed(removed: dict, examples: dict, reason: str, example: str) -> None:
    """Counts one removed document under `reason`; keeps `example` while the reason has fewer
    than ``REMOVED_EXAMPLES``."""
    removed[reason] = removed.get(reason, 0) + 1
    shown = examples.setdefault(reason, [])
    if len(shown) < REMOVED_EXAMPLES:
        shown.append(example)


def stage_report(seen: int, removed: dict, examples: dict) -> dict:
    """The keys every stage's report starts with: in, out, removed, examples."""
    return {
        "in": seen,
        "out": seen - sum(removed.values()),
        "removed": dict(removed),
        "examples": examples,
    }
