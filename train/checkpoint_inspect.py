"""CheckpointError, and what inspects a step directory without restoring it.

Why a step did not restore, in one line (`_describe`: the exception, its root cause, a missing
item, an unparsable JSON file or one this user may not read: `permission_denied`), which
top-level keys its saved state and params hold (`saved_state_keys`: whether a step has an EMA;
`saved_param_keys`: a LoRA, PPO or reward-model run's nesting), and which steps a
reader could take instead (`_require_step`, `_other_steps_hint`). Separate because both the
resuming Checkpointer (train/checkpointer.py) and the readers of another run's checkpoint
(train/checkpoint_read.py) name the step and the cause the same way.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be read; the message names the directory and the cause."""


def _one_line(e: BaseException, limit: int = 800) -> str:
    # TensorStore errors append dumps of the array's spec: cut them.
    text = str(e).split("See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _describe(e: BaseException, step_dir: str) -> str:
    """One line on why `step_dir` did not restore: the exception, its root cause (TensorStore's
    names the array and the file), and a file of the step that is missing or not JSON."""
    root, seen = e, {id(e)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    out = _one_line(e)
    if root is not e:
        out += f" (caused by {_one_line(root)})"
    bad = _bad_file(step_dir)
    return f"{out}; {bad}" if bad else out


def _bad_file(step_dir: str) -> str | None:
    """A missing item directory or an unparsable JSON file of a step, or a file or directory
    of it this user may not read (`permission_denied`), if there is one."""
    denied = permission_denied(step_dir)
    if denied:
        return f"permission denied: {denied}"
    for item in ("state", "data", "meta"):
        if not os.path.isdir(os.path.join(step_dir, item)):
            return f"missing: {os.path.join(step_dir, item)}"
    for name in ("state/_METADATA", "data/metadata", "meta/metadata"):
        path = os.path.join(step_dir, name)
        try:
            with open(path) as f:
                json.load(f)
        except FileNotFoundError:
            continue  # orbax versions differ in which files they write
        except PermissionError:
            return f"permission denied: {path}"
        except (OSError, ValueError):
            return f"not readable JSON: {path}"
    return None


def permission_denied(step_dir: str, error: BaseException | None = None) -> str | None:
    """The first file or directory of a step that this user may not read (EACCES: the step may
    well be intact), or None: the path of a PermissionError in `error`'s chain, else the first
    directory of the step that cannot be listed or file that cannot be opened (nothing is read;
    a step has a few dozen files)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, PermissionError):
            return str(error.filename or step_dir)
        error = error.__cause__ or error.__context__
    todo = [step_dir]
    while todo:
        directory = todo.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name, reverse=True)
        except PermissionError:
            return directory
        except OSError:  # missing: the other checks name it
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                elif entry.is_file():
                    open(entry.path, "rb").close()
            except PermissionError:
                return entry.path
            except OSError:
                continue
    return None


def saved_state_keys(step_dir: str) -> set[str] | None:
    """The top-level keys of a step's saved state ("params", "opt_state", "ema", ...), from its
    tree metadata (no array is read); None when that cannot be read: then the restore itself
    fails or succeeds as it did before EMAs existed (its error names the cause)."""
    tree = _saved_tree(step_dir)
    return None if tree is None else set(tree)


def saved_param_keys(step_dir: str) -> set[str] | None:
    """The top-level keys of a step's saved params ("embed", ... for a plain LM; "base" and
    "lora" for a LoRA run; "policy" and "value" for PPO; "transformer" and "head" for a reward
    model), from its tree metadata; None when that cannot be read."""
    tree = _saved_tree(step_dir)
    params = tree.get("params") if isinstance(tree, dict) else None
    return set(params) if isinstance(params, dict) else None


def _saved_tree(step_dir: str):
    """The tree metadata of a step's state item (nested dicts; no array is read), or None."""
    from etils import epath

    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(step_dir) / "state").tree
    except Exception:  # orbax raises many types; a missing or truncated file among them
        return None
    finally:
        handler.close()


def _other_steps_hint(mgr, directory: str, step: int) -> str:
    """Where to go when `step` is unreadable: the other steps there and how to read one."""
    try:
        others = [s for s in sorted(mgr.all_steps()) if s != step]
    except Exception:  # the hint must not hide the error it explains
        others = []
    if not others:
        return f" No other step under {directory}."
    return (
        f" Other steps under {directory}: {others}; read one with --step N (eval, generate, "
        f"HF export) or step=N, or move {directory}/{step} aside (init_from reads the latest)."
    )


def _require_step(mgr, directory: str, step: int) -> None:
    """A requested step (--step N) that is not there is named with the steps that are (an
    unfinished `<step>.orbax-checkpoint-tmp` is not one), not reported as a corrupt step."""
    steps = sorted(mgr.all_steps())
    if step not in steps:
        mgr.close()
        raise CheckpointError(
            f"cannot read checkpoint {directory}/{step}: FileNotFoundError: there is no step "
            f"{step}; steps there: {steps or 'none'}"
        )
