"""Which flaxlm code ran: the git commit of this checkout, recorded with what it produces
(checkpoint meta, a sweep's index and each run's DONE marker). The version number stays 0.1.0
while the code changes daily, so the commit is what tells two runs' code apart."""

from __future__ import annotations

import functools
import os
import subprocess


@functools.lru_cache(maxsize=1)
def code_commit() -> dict:
    """{"flaxlm_commit": the git commit of the flaxlm checkout this process runs ("+dirty" with
    uncommitted changes)}, or {} outside a git checkout: which code trained a checkpoint (the
    version number stays 0.1.0 while the code changes daily; a resume across an upgrade says so)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True,
                                timeout=10, check=True)  # fmt: skip
        commit = run(["git", "rev-parse", "--short=12", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"flaxlm_commit": commit + ("+dirty" if dirty else "")} if commit else {}


def mixed_commits(commits: dict[str, str | None]) -> str | None:
    """A warning when `commits` ({run label: flaxlm_commit or None}) name more than one commit:
    the runs of one table trained under different code (a changed schedule or default moves
    the loss: a scaling fit across them mixes that change with the scaling). Runs with no
    recorded commit (finished before commits were recorded) are not counted; None otherwise."""
    by_commit: dict[str, list[str]] = {}
    for label, commit in commits.items():
        if commit:
            by_commit.setdefault(commit, []).append(label)
    if len(by_commit) < 2:
        return None

    def runs(labels: list[str]) -> str:
        shown = ", ".join(labels[:3]) + (", ..." if len(labels) > 3 else "")
        return f"{len(labels)} run{'s' * (len(labels) > 1)}: {shown}"

    parts = "; ".join(f"{c} ({runs(labels)})" for c, labels in sorted(by_commit.items()))
    return (f"the runs trained under {len(by_commit)} flaxlm commits: {parts}. A change of "
            "code between them (a schedule, a default) is mixed into their differences: rerun "
            "the runs of the older commits to compare like with like")  # fmt: skip
