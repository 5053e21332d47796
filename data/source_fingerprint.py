"""What each pretraining source held when a data state was saved, to catch it changing by resume.

The pretraining iterator's position (data/packing.py) is a document index into each source's
shuffled documents, and the shuffle depends on how many there are: a file added under a glob,
or one edited, truncated or appended to between a save and the resume, makes the saved index
mean other documents, so the resumed run silently trained some documents again and skipped
others. ``fingerprint`` records, per source, the files its pattern matched (their count, total
bytes and a digest of their names and sizes) and its document count; the iterator's state
carries it (``get_state``'s ``"sources"``) and ``check`` compares it with the data found on
resume. The SFT, preference and unpaired batches (data/chat_batches.py), whose position is an
index into a shuffle of every example, keep the same records for the files their examples were
read from (``check``'s ``key``: data.train).

A change is an error by default (``data.on_changed_sources="error"``), naming the source and
what changed: a resumed run that does not continue its data is a different experiment, and a
researcher should decide that, not find it in the curves. ``"warn"`` resumes anyway at the saved
index, with a warning. A change to the ``data.sources`` patterns themselves (another mixture) is
not checked here: the trainer reports that config change loudly (train/loop_resume.py). Cheap by
design: no file is read for it, so an edit that keeps a file's size and document count is not
seen (the names and sizes of every file, and the document count, are). A state saved before
this field existed resumes unchecked (logged).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence

from flaxlm.data.source_errors import DataError
from flaxlm.data.source_paths import expand_paths

POLICIES = ("error", "warn")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _place(pattern: str) -> str:
    """A short digest of where ``pattern`` points (relative or absolute, "~" alike): a state
    stays a position, not a copy of the config, and a changed pattern is told apart."""
    return _digest(os.path.realpath(os.path.expanduser(pattern)) if pattern else "")


def _written(pattern: str) -> str:
    """A short digest of ``pattern`` as the config writes it ("~" expanded): the same source
    when where it resolves to moved (a "current" symlink repointed at a new data version, a
    relative path resumed from another directory), which `_place` alone called another."""
    return _digest(os.path.expanduser(pattern) if pattern else "")


def fingerprint(pattern: str, docs: int, builtin: Sequence[str] | None = None) -> dict:
    """One source's record: ``at`` (a digest of where the configured pattern resolves to),
    ``as`` (of the pattern as written), its matched ``files``,
    their total ``bytes``, its ``docs`` (documents after bad records were skipped) and ``sha``,
    a digest of the files' names and sizes in reading order (the built-in corpus: of its text).
    ``pattern`` itself is kept out of the state (``check`` names this run's)."""
    h = hashlib.sha256()
    files, size = 0, 0
    if builtin is not None:
        for doc in builtin:
            h.update(doc.encode("utf-8", "surrogatepass") + b"\x00")
    else:
        paths = expand_paths(pattern)
        sizes = [os.path.getsize(p) for p in paths]
        for p, n in zip(paths, sizes):  # names, not directories: a moved corpus is no change
            h.update(f"{os.path.basename(p)}\t{n}\n".encode())
        files, size = len(paths), sum(sizes)
    return {"at": _place(pattern), "as": _written(pattern), "files": files, "bytes": size,
            "docs": docs, "sha": h.hexdigest()[:12], "pattern": pattern}  # fmt: skip


def record(fp: dict) -> dict:
    """What the state keeps of a ``fingerprint`` (all but the pattern)."""
    return {k: v for k, v in fp.items() if k != "pattern"}


def _differences(old: dict, new: dict) -> list[str]:
    out = [f"{what} {old.get(k)} -> {new[k]}" for k, what in
           (("files", "files"), ("bytes", "bytes"), ("docs", "documents"))
           if old.get(k) != new[k]]  # fmt: skip
    if not out and old.get("sha") != new["sha"]:
        out.append("file names or sizes differ (same totals)")
    return out


def valid_policy(policy) -> str:
    """`policy` (data.on_changed_sources), checked as a data source is built: a DataError
    naming the key (one line from the trainer), not a surprise at the first resume."""
    if policy not in POLICIES:
        raise DataError(f"data.on_changed_sources must be one of {POLICIES}, got {policy!r}")
    return policy


def check(
    saved: list[dict] | None,
    current: list[dict],
    policy: str,
    what: str,
    key: str = "data.sources",
) -> None:
    """Compares the records a state was saved with (``saved``; None: an older state) with
    this run's fingerprints (``current``); on a difference raises a ``DataError``
    (``policy="error"``) or logs a warning (``"warn"``) naming each changed source. Sources
    whose configured pattern changed, or a changed number of sources, are the config's change,
    not checked here. ``key``: the config key the sources come from, for the message (the chat
    and preference batches' ``data.train``, data/chat_batches.py)."""
    valid_policy(policy)
    if saved is None:
        logging.info("%s: the data state records no source fingerprints (saved by an older "
                     "version): changes to the files since are not checked", what)  # fmt: skip
        return
    if not isinstance(saved, list) or len(saved) != len(current):
        return
    changed, recount = [], False
    for old, new in zip(saved, current):
        # Another source only when both where it points and how it is written changed (a
        # state from before "as" was recorded: where it points)
        if not isinstance(old, dict) or (old.get("at") != new["at"]
                                         and old.get("as") != new["as"]):  # fmt: skip
            continue
        diff = _differences(old, new)
        if diff:
            changed.append(f"{new['pattern'] or '<built-in>'}: {', '.join(diff)}")
            recount = recount or old.get("docs") != new["docs"]
    if not changed:
        return
    why = (
        "the saved position is an index into the old documents' order (shuffled by their "
        "count, epochs of their length), so resuming there would train some documents again "
        "and skip others"
        if recount
        else "the document count is the same, so the order is kept, but what some of the "
        "documents hold is not what the checkpoint's run was reading"
    )
    msg = (
        f"{what}: {key} changed since the checkpoint's data state was saved ("
        + "; ".join(changed)
        + f"): {why}"
    )
    if policy == "error":
        raise DataError(
            msg + ". Restore the files, start a new run (another workdir), or resume anyway at "
            "the saved position with --config.data.on_changed_sources=warn"
        )
    logging.warning("%s (resuming anyway: data.on_changed_sources=warn)", msg)


def with_records(state: dict, current: list[dict] | None) -> dict:
    """A data state with what each source held when its items were read (``"sources"``: the
    same on every process, so recorded once beside the processes' positions); `state` itself
    when there is nothing to record. The batch iterators' get_state (data/packing.py,
    data/chat_batches.py) and the RL prompt cursor's (alignment/rl_rollout.py)."""
    if current is None:
        return state
    return {**state, "sources": [record(f) for f in current]}


def checked_state(state: dict, current: list[dict] | None, policy: str, what: str,
                  key: str = "data.sources") -> dict:  # fmt: skip
    """`state` without its ``"sources"``, after `check`ing them against `current` (when this
    run has fingerprints): a set_state's first step, before the positions are read."""
    state = dict(state)
    saved = state.pop("sources", None)
    if current is not None:
        check(saved, current, policy, what, key)
    return state
