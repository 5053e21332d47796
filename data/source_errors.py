"""The bad-input policy every source reader shares: ``DataError`` and ``BadInputLog``.

Bad input (malformed JSON, invalid UTF-8, a missing or non-string text field, an empty document)
is never dropped silently. In lenient mode (the default) it is counted per reason in a
``BadInputLog`` with a few ``file:line`` examples for the report; with ``strict=True`` the first
bad record raises ``DataError`` naming ``file:line``. Input that cannot be read at all (a corrupt
compressed stream, an unreadable parquet or ArrayRecord file) is a ``DataError`` in either mode.
Records that are not documents at all (a WARC file's requests, metadata and non-HTML responses)
are counted apart, per kind, in ``skipped``: not bad input, and never raised on.

Separate from the readers because everything that reads data imports it: the path rules and
codecs (data/source_paths.py, data/source_codecs.py), the readers, and the chat/preference
records (data/chat_records.py, through ``flaxlm.data.sources``); it imports none of them.
"""

from __future__ import annotations

import dataclasses

MAX_EXAMPLES = 5  # bad-input examples kept per reason for the report


class DataError(ValueError):
    """Bad input; the message starts with ``file:line``, or the config key that holds it."""


@dataclasses.dataclass
class BadInputLog:
    """Counts bad records per reason; raises on the first one when ``strict``."""

    strict: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # Records read that are not documents, per kind: a WARC file's requests, metadata, redirects,
    # non-HTML responses (data/source_warc.py). Not bad input: not in ``total``, never raised on.
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, loc: str, detail: str = "") -> None:
        msg = f"{loc}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(msg)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(msg)

    def skip(self, kind: str) -> None:
        """Counts a record that is not a document (``skipped``)."""
        self.skipped[kind] = self.skipped.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """The report's bad-input counts and examples, and ``skipped`` when a record was."""
        out = {"counts": dict(self.counts), "examples": dict(self.examples)}
        return {**out, "skipped": dict(self.skipped)} if self.skipped else out
