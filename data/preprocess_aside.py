"""``preprocess --overwrite`` without losing the earlier run if the new one does not finish.

The earlier run's outputs (``text/``, ``tokens/``, the reports, its tokenizer) are renamed into
a hidden ``OUTPUT/.previous-run-PID/`` (renames within one directory: no copy, nothing half
moved), the new run writes, and only when it has written its ``report.json`` is the set-aside
run deleted. A new run that fails (bad input found part way, an empty result, Ctrl-C) puts the
earlier one back. One that is killed (SIGKILL, a lost machine) leaves it set aside, and the next
preprocess into the same directory puts it back before anything else, unless the killed run
had finished (its ``report.json`` written), in which case the set-aside copy is stale and is
deleted. Before this, ``--overwrite`` deleted the earlier output first: a run stopped part way
left neither.
"""

from __future__ import annotations

import logging
import os
import shutil

logger = logging.getLogger(__name__)

PREFIX = ".previous-run-"
# What a preprocess run writes into its output directory (module docstring of preprocess.py).
# The tokenizer files: a trained or given SentencePiece model, or an HF tokenizer.json with the
# settings files beside it (models/hf_tokenizer.py `copy_tokenizer`).
TOKENIZER_OUTPUTS = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
                     "additional_chat_templates")  # fmt: skip
OUTPUTS = ("text", "tokens", "report.json", "report.md", *TOKENIZER_OUTPUTS)


def set_aside(output: str, keep=()) -> str:
    """Moves the earlier run's outputs under ``output`` into ``output/.previous-run-PID/`` and
    returns that directory. ``keep``: real paths left in place (the tokenizer files the new run
    tokenizes with: the same files, read again when the ids' meta is written)."""
    keep = {keep} if isinstance(keep, str) else set(keep or ())
    aside = os.path.join(output, f"{PREFIX}{os.getpid()}")
    os.makedirs(aside)
    for name in OUTPUTS:
        path = os.path.join(output, name)
        if os.path.lexists(path) and os.path.realpath(path) not in keep:
            os.rename(path, os.path.join(aside, name))
    return aside


def put_back(output: str, aside: str) -> None:
    """Replaces whatever a run that did not finish wrote under ``output`` with the earlier run
    in ``aside``, and removes ``aside``."""
    moved = set(os.listdir(aside))
    set_aside_at = os.path.getmtime(aside)  # the last rename into it
    for name in OUTPUTS:  # the unfinished run's own outputs: partial shards, a new tokenizer
        path = os.path.join(output, name)
        if not os.path.lexists(path):
            continue
        # A tokenizer file left in place is one the new run tokenized with (``keep``): the
        # earlier run's, unless the new run wrote it after the set-aside.
        if (name in moved or name not in TOKENIZER_OUTPUTS
                or os.path.getmtime(path) >= set_aside_at):  # fmt: skip
            _remove(path)
    for name in moved:
        os.rename(os.path.join(aside, name), os.path.join(output, name))
    os.rmdir(aside)


def discard(aside: str) -> None:
    """The new run finished: the earlier one is no longer needed."""
    shutil.rmtree(aside, ignore_errors=True)


def recover(output: str) -> None:
    """Called before a run into ``output``: mends what a killed ``--overwrite`` left (see the
    module docstring). Each action is logged."""
    if not os.path.isdir(output):
        return
    asides = [os.path.join(output, d) for d in os.listdir(output) if d.startswith(PREFIX)]
    finished = os.path.isfile(os.path.join(output, "report.json"))
    for aside in sorted(asides, key=os.path.getmtime, reverse=True):  # the newest first
        if finished or not os.path.isdir(aside):
            logger.warning("preprocess: removing %s, an earlier run set aside by an "
                           "--overwrite run that finished", aside)  # fmt: skip
            _remove(aside)
            continue
        logger.warning("preprocess: putting back the earlier run set aside in %s: the "
                       "--overwrite run that replaced it was interrupted", aside)  # fmt: skip
        put_back(output, aside)
        finished = True  # any other set-aside copy is older than the run now back in place


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
