"""Argument types shared by the evaluation CLIs: a bad value is argparse's usage error naming
the flag (exit 2), not a traceback or a run that quietly does nothing."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int, note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= `low`; `note` is added to the message (e.g. what to do
    instead)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n}: must be >= {low}{note}")
        return n

    return parse
