"""Sweep planning: a config's `sweep(add, arg)` expanded into named runs with their overrides,
sizes (N, D, FLOPs) and trainer commands, and the ROOT/sweep.json index (train/sweep.py runs them);
and the trainer's side of a local sweep (`exit_with_sweep`: it ends with the sweep).

A run may branch from another run of the same sweep (train/branch.py): `add()` returns a handle,
and a later run's `branch_from=handle.at(STEP)` starts it from that run's training state at STEP
(WSD cooldowns of one long run; configs/scaling.py:cooldowns=True):

    def sweep(add, arg=None):
        long = add(**{"total_steps": 1200, "opt.schedule": "wsd", "ckpt_every": 240,
                      "keep_ckpts": 0})
        add(**{"total_steps": 600, "opt.schedule": "wsd", "branch_from": long.at(480)})

The branch's override is recorded as `<source run name>@STEP` (relative to the sweep's root, so
a moved sweep is the same sweep) and reaches its trainer as the source's directory@STEP. The
source must save that step and keep it (`ckpt_every` dividing it, `keep_ckpts=0`): checked here,
before anything trains. A local sweep starts a branch once the source's checkpoint exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import re
import sys
from collections.abc import Sequence

from flaxlm.train.code_version import code_commit

MAX_NAME = 160  # characters of the k=v part of a run name before it is shortened with a hash
# Config keys that change how a run is carried out but not what it trains: a resumed run
# (train/loop_resume.py) and a resubmitted sweep (`_check_same_runs`) take a new value as no
# change (a job's time limit, the tqdm bar; grain's read threads and read-ahead, which hand the
# documents over in order whatever their values, and whether changed data files stop a resume:
# a sweep resubmitted on a machine with more cores). Kept here, free of jax, for both to import.
ORDER_NEUTRAL_DATA_KEYS = ("data.read_threads", "data.prefetch", "data.on_changed_sources")
RESULT_NEUTRAL_KEYS = ("max_runtime_minutes", "progress_bar", *ORDER_NEUTRAL_DATA_KEYS)


@dataclasses.dataclass
class Run:
    """One run of a sweep: its position, overrides and directory, plus what its config implies."""

    index: int
    name: str
    overrides: dict  # dotted config key -> value (the sweep's dict plus command-line overrides)
    workdir: str
    total_steps: int | None = None
    info: dict = dataclasses.field(default_factory=dict)  # sizes from the effective config
    # A run branched from another run of the sweep: (the source's run name, the step)
    branch_of: tuple[str, int] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Config files, overrides and names


def checkout_root() -> str | None:
    """The local flaxlm checkout: the folder holding the `configs/` folder that setup.py's
    package_dir maps to `flaxlm.configs` (None when that is not found)."""
    spec = importlib.util.find_spec("flaxlm.configs")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.dirname(os.path.realpath(locations[0])) if locations else None


def portable_config(config_arg: str, checkout: str | None = None) -> str:
    """`config_arg` with its file named the same wherever the checkout lies: a file inside the
    flaxlm checkout (`checkout`, default `checkout_root()`) relative to the checkout's root, any
    other file by its absolute path; the ":args" part as written. How a study records its
    config (scaling_workflow: a study moved, or a checkout moved, is the same study), and how
    the pod and host scripts name it after their `cd` to the hosts' checkout (sweep_launch).
    `resolve_config` finds the file again."""
    path, sep, arg = config_arg.partition(":")
    path = os.path.expanduser(path)
    checkout = checkout_root() if checkout is None else checkout
    real = os.path.realpath(path)
    if checkout and os.path.commonpath([checkout, real]) == checkout:
        return os.path.relpath(real, checkout) + sep + arg
    return os.path.abspath(path) + sep + arg


def resolve_config(config_arg: str) -> str:
    """`config_arg` with its file by its absolute path: a relative path as usual against the
    working directory or, where no such file is, against the flaxlm checkout's root (how
    `portable_config` records a file of the checkout, which a study re-run from another
    directory, or after the checkout moved, must still find). The ":args" part as written."""
    path, sep, arg = config_arg.partition(":")
    path = os.path.expanduser(path)
    checkout = checkout_root()
    if not os.path.isabs(path) and not os.path.exists(path) and checkout:
        if os.path.isfile(os.path.join(checkout, path)):
            path = os.path.join(checkout, path)
    return os.path.abspath(path) + sep + arg


# "gs://bucket/x", "s3://...", "file:///...": a URL, which os.makedirs takes for a local folder
_URL = re.compile(r"^[A-Za-z][\w+.-]*://")


def check_local_workdir(path: str, flag: str = "--workdir") -> None:
    """Refuses a URL as a sweep's (or study's) root: every folder of a sweep is made and read
    through local paths, by the sweep and by its trainers, so `gs://b/sw` became ./gs:/b/sw
    here (and a different local folder on every host of a pod). Refuses a path that is a file,
    or lies under one, too: os.makedirs and the metrics readers raised FileExistsError or
    NotADirectoryError from deep inside the sweep."""
    if _URL.match(path):
        raise ValueError(f"{flag} {path}: a URL, not a folder; the sweep and its trainers "
                         "write local paths only. Mount the bucket (e.g. gcsfuse) or use a "
                         f"shared filesystem, and pass the mounted path as {flag}")  # fmt: skip
    # The path itself, or its nearest existing ancestor: the folder it would be made in.
    full = existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.exists(existing) and not os.path.isdir(existing):
        what = "a file" if existing == full else f"under {existing}, a file"
        raise ValueError(f"{flag} {path}: {what}, not a directory; pass a folder (or a path to "
                         "make one at) instead")  # fmt: skip


def load_config_module(config_arg: str):
    """(module, arg) for "path/to/file.py:arg"; the module is imported from its path."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no config file {path!r}")
    name = "flaxlm_sweep_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, (arg or None)


def plain(value):
    """`value` with numpy scalars (np.float64 from np.geomspace, np.int64 from np.arange) as the
    Python numbers they hold, inside tuples and lists too. Under numpy 2 their repr is
    `np.float64(0.001)`, which a run's name and the trainer's `--config.opt.lr=` got, and
    json cannot write an np.int64 into sweep.json."""
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # np.generic or a 0-d array
    return value


def format_value(value) -> str:
    """A value as `--config.k=v` expects it (and as it appears in run names)."""
    value = plain(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest repr that round-trips: 0.001, 1e-05, 3.0
    if isinstance(value, (list, tuple)):
        # Strings quoted: the trainer reads a tuple as a Python literal, "(a,b)" is one string.
        items = [repr(v) if isinstance(v, str) else format_value(v) for v in value]
        return "(" + ",".join(items) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def _body(overrides: dict) -> tuple[str, str]:
    """(raw, safe): the overrides sorted by key as `k=v,...`, and that with the characters a
    directory name cannot hold replaced by "_"."""
    raw = ",".join(f"{k}={format_value(v)}" for k, v in sorted(overrides.items()))
    return raw, "".join(c if c.isalnum() or c in "._-=,+()" else "_" for c in raw)


def run_name(overrides: dict) -> str:
    """`run-model.d_model=128,opt.lr=0.001`: the overrides sorted by key (`run` for none).

    The name is the run's key: a run with the same overrides keeps its directory when runs are
    added to or removed from the sweep (names used to start with the run's index, so one more
    budget renamed every later run and trained it again). A body whose characters were replaced
    (`data.sources=a/b` and `a_b`) or that is too long ends with a hash of the exact overrides."""
    raw, safe = _body(overrides)
    if safe != raw or len(safe) > MAX_NAME:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        safe = safe[: MAX_NAME - 9] + "-" + digest
    return "run" + (f"-{safe}" if safe else "")


def legacy_run_name(index: int, overrides: dict) -> str:
    """The name the same run had before names dropped the index: `run-003-k=v,...`."""
    _, body = _body(overrides)
    if len(body) > MAX_NAME:
        digest = hashlib.sha1(body.encode()).hexdigest()[:8]
        body = body[: MAX_NAME - 9] + "-" + digest
    return f"run-{index:03d}" + (f"-{body}" if body else "")


_LEGACY = re.compile(r"run-\d{3,}(?:-(?P<body>.*=.*))?")


def _legacy_dirs(root: str) -> dict[str, list[str]]:
    """{body: [directory names]} of the run directories under `root` named the old way
    (`run-<index>-<body>`, `run-<index>` for no overrides)."""
    out: dict[str, list[str]] = {}
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            m = _LEGACY.fullmatch(entry)
            if m and os.path.isdir(os.path.join(root, entry)):
                out.setdefault(m.group("body") or "", []).append(entry)
    return out


def resolve_name(root: str, overrides: dict, legacy: dict[str, list[str]] | None = None) -> str:
    """The directory name of the run with these sweep overrides under `root`: `run_name`, or
    the directory an older sweep made for the same overrides (`run-<index>-...`, whatever its
    index was), so that a sweep started before the names changed resumes without retraining.
    Of several such directories, a finished one (DONE) first."""
    name = run_name(overrides)
    if os.path.exists(os.path.join(root, name)):
        return name
    legacy = _legacy_dirs(root) if legacy is None else legacy
    body = legacy_run_name(0, overrides)[len("run-000-") :]
    found = legacy.get(body, [])
    if not found:
        return name
    done = [d for d in found if os.path.exists(os.path.join(root, d, "DONE"))]
    return (done or found)[0]


def _convert(text: str, like):
    """A command-line string typed like the config field it overrides, read as the trainer's
    flags (ml_collections' config_flags) read it, so a sweep takes the overrides train/main.py
    takes: a tuple field as a Python literal (`(1.0,2.0)`; a lone value is a 1-tuple)."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, tuple):
        from ml_collections.config_flags.tuple_parser import TupleParser

        return TupleParser().parse(text)  # the trainer's own parser of tuple fields
    if not isinstance(like, str):
        # config_flags defines no flag for a None or list field: every trainer would fail
        raise ValueError(f"the trainer's --config flags cannot set a {type(like).__name__} field")
    return text


class OverrideError(TypeError, ValueError):
    """A value a config key cannot take. A TypeError, as ConfigDict's own, and a ValueError, so
    that the sweep's command line reports it as bad input rather than a traceback."""


def set_dotted(config, key: str, value, *, from_string: bool = False):
    """Sets `config.a.b = value` on a locked ConfigDict; an unknown key names itself and the
    closest existing one, a value of the wrong type names the key."""
    from ml_collections import ConfigDict

    from flaxlm.configs.common import did_you_mean

    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        # "opt.lr.x" walks into a float: say so rather than "float is not iterable"
        if not isinstance(node, ConfigDict):
            raise KeyError(f"override {key!r}: {prefix[:-1]!r} is a value, not a section")
        if part not in node:
            hint = did_you_mean(part, node, prefix)
            raise KeyError(f"override {key!r}: config has no key {prefix + part!r}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    if isinstance(node[last], ConfigDict) and not isinstance(value, (dict, ConfigDict)):
        # `--config.opt=3`: ConfigDict's "3 ... cannot be casted to ConfigDict" names no key
        raise KeyError(f"override {key}={value!r}: {key!r} is a section, not a value (set its "
                       f"keys: --config.{key}.<key>=...)")  # fmt: skip
    if from_string:
        try:
            value = _convert(value, node[last])
        except ValueError as e:
            raise ValueError(f"override {key}={value!r}: {e}") from None
    try:
        node[last] = value
    except TypeError as e:  # ConfigDict's "Could not override field 'lr'" omits the path
        raise OverrideError(f"override {key}={value!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class BranchPoint:
    """`handle.at(step)`: run number `source` (in add() order) of one sweep, at its checkpoint
    `step`; the value of a later run's `branch_from`."""

    source: int
    step: int
    # which expansion made it (a handle of another sweep() call is refused); no part of the
    # value, so two expansions of one sweep compare (and print) alike
    sweep_id: int = dataclasses.field(compare=False, repr=False)


class AddedRun:
    """What sweep()'s add() returns: a handle on that run for later runs to branch from."""

    def __init__(self, index: int, sweep_id: int):
        self.index, self._sweep_id = index, sweep_id

    def at(self, step: int) -> BranchPoint:
        """This run's training state at checkpoint `step` (a later run's `branch_from`)."""
        if isinstance(step, bool) or not isinstance(plain(step), int) or plain(step) < 1:
            raise ValueError(f"sweep(): run {self.index}.at({step!r}): expected a step >= 1")
        return BranchPoint(self.index, plain(step), self._sweep_id)


def expand(module, arg: str | None) -> list[dict]:
    """The override dicts of `module.sweep(add, arg)`, in the order they were added (a
    `branch_from` given as `handle.at(step)` stays a BranchPoint: `resolve_branches`)."""
    if not hasattr(module, "sweep"):
        raise ValueError(f"{module.__file__} defines no sweep(add, arg): not a sweep config")
    where, out = module.__file__, []
    sweep_id = id(out)
    shape = 'sweep() must be `def sweep(add, arg=None)` calling `add(**{"key": value})`'

    def add(*args, **kw):
        if args:  # add({"k": v}): the lambda's "takes 0 positional arguments" named no file
            raise ValueError(f"{where}: sweep() called add() with {len(args)} positional "
                             f"argument(s); {shape}")  # fmt: skip
        for k, v in kw.items():
            if v is None:  # the trainer's --config.k=None is a string; run_info crashed on it
                raise ValueError(f"{where}: sweep() added {k}=None; a sweep value cannot be "
                                 "None (leave the key out to keep the config's value)")  # fmt: skip
            if isinstance(v, BranchPoint) and k != "branch_from":
                raise ValueError(f"{where}: sweep() run {len(out)} gave {k}=<run {v.source}>"
                                 f".at({v.step}); a run handle's .at() is a branch_from "
                                 "value")  # fmt: skip
            if isinstance(v, BranchPoint) and v.sweep_id != sweep_id:
                raise ValueError(f"{where}: sweep() run {len(out)}'s branch_from is a handle "
                                 "of another sweep() call")  # fmt: skip
            if isinstance(v, AddedRun):
                raise ValueError(f"{where}: sweep() run {len(out)} gave {k}=<run {v.index}>; "
                                 f"branch from a step of it: {k}=handle.at(STEP)")  # fmt: skip
        out.append({k: v if isinstance(v, BranchPoint) else plain(v) for k, v in kw.items()})
        return AddedRun(len(out) - 1, sweep_id)

    try:  # `def sweep(add):` and the like: a traceback naming no file
        inspect.signature(module.sweep).bind(add, arg)
    except TypeError as e:
        raise ValueError(f"{where}: calling sweep(add, arg) failed ({e}); {shape}") from None
    except ValueError:  # (a builtin or C callable without a signature: calling it will say)
        pass
    # A TypeError raised inside the body is the body's own error: its traceback says where
    # (it used to be reported as a sweep of the wrong shape).
    module.sweep(add, arg)
    if not out:
        raise ValueError(f"{module.__file__}: sweep() added no runs")
    return out


def resolve_branches(sweeps: Sequence[dict], root: str, legacy: dict | None = None
                     ) -> tuple[list[dict], list[str], list[tuple[str, int] | None]]:  # fmt: skip
    """(overrides, names, branch_of) of the expanded runs: a BranchPoint `branch_from` becomes
    `<source name>@<step>` (names are computed in add() order, so a source, added before its
    branches, is named first)."""
    legacy = _legacy_dirs(root) if legacy is None else legacy
    out, names, branch_of = [], [], []
    for ov in sweeps:
        point = ov.get("branch_from")
        if isinstance(point, BranchPoint):
            source = names[point.source]
            ov = {**ov, "branch_from": f"{source}@{point.step}"}
            branch_of.append((source, point.step))
        else:
            branch_of.append(None)
        out.append(ov)
        names.append(resolve_name(root, ov, legacy))
    return out, names, branch_of


def check_branch_sources(runs: Sequence[Run], configs: Sequence) -> None:
    """Each in-sweep branch point is a checkpoint its source writes and keeps: a step within
    its `total_steps`, a multiple of its `ckpt_every` (or its last step), `keep_ckpts=0` (it
    would delete the step before the branch starts). An error names both runs and the key."""
    by_name = {r.name: (r, c) for r, c in zip(runs, configs)}
    for r in runs:
        if r.branch_of is None:
            continue
        source, step = r.branch_of
        src, config = by_name[source]
        where = f"run {r.index} ({r.name}) branches from run {src.index} ({source}) at step {step}"
        total = int(config.total_steps)
        if step > total:
            raise ValueError(f"{where}, but that run trains {total} steps (total_steps)")
        every, keep = int(config.ckpt_every), int(config.keep_ckpts)
        if step != total and (every <= 0 or step % every):
            raise ValueError(f"{where}, but that run saves checkpoints every {every} steps "
                             f"(ckpt_every): give it a ckpt_every that divides {step}")  # fmt: skip
        if keep != 0:
            raise ValueError(f"{where}, but that run keeps only its newest {keep} "
                             "checkpoints (keep_ckpts) and may delete it first: give it "
                             "keep_ckpts=0")  # fmt: skip


def run_info(config) -> dict:
    """Sizes implied by an effective config: params N, tokens D = steps x batch x seq_len, and
    compute (6 N_nonembed D and the exact count flops_per_token x D, DESIGN.md convention)."""
    info: dict = {}
    if "total_steps" in config:
        info["total_steps"] = int(config.total_steps)
    if "model" not in config or not all(k in config for k in ("batch_size", "seq_len")):
        return info
    from flaxlm.configs.common import to_model_config

    cfg = to_model_config(config.model)
    counts = cfg.param_counts()
    tokens = int(config.total_steps) * int(config.batch_size) * int(config.seq_len)
    fpt = cfg.flops_per_token(int(config.seq_len))
    info.update(
        batch_size=int(config.batch_size),
        seq_len=int(config.seq_len),
        n_params=counts["total"],
        n_params_nonembed=counts["non_embedding"],
        n_params_embed=counts["embedding"],
        n_params_matmul=counts["matmul"],
        tokens=tokens,
        c_6nd=6.0 * counts["non_embedding"] * tokens,
        flops_per_token=fpt,
        flops=fpt * tokens,
        flops_causal=cfg.flops_per_token(int(config.seq_len), causal=True) * tokens,
    )
    return info


def plan(
    config_arg: str,
    root: str,
    *,
    extra: Sequence[str] = (),
    only: Sequence[int] | None = None,
) -> list[Run]:
    """Expands the sweep of `config_arg` under `root` (every run's config is built, so a bad
    override fails here, naming the key). `extra`: "k=v" overrides applied to every run."""
    module, arg = load_config_module(config_arg)
    base = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config.{item}: expected --config.key=value")
        base[key] = value
    sweeps = expand(module, arg)
    swept = sorted({k for ov in sweeps for k in ov} & set(base))
    if swept:  # every run would get the same value while its name still shows the swept one
        raise ValueError(
            f"--config.{swept[0]} is varied by {module.__file__}'s sweep(); a command-line "
            "override would give every run the same value (edit sweep() instead)"
        )
    runs, configs, seen, names = [], [], {}, {}
    sweeps, all_names, branch_of = resolve_branches(sweeps, root)
    # A branch's source is planned too (its checkpoint settings are checked), listed only when
    # asked for.
    sources = {branch_of[j][0] for j in (only or ()) if 0 <= j < len(sweeps) and branch_of[j]}
    for i, ov in enumerate(sweeps):
        if only is not None and i not in only and all_names[i] not in sources:
            continue
        config = module.get_config(arg)
        for k, v in ov.items():
            set_dotted(config, k, v)
        for k, v in base.items():
            set_dotted(config, k, v, from_string=True)
        overrides = {**ov, **{k: config_value(config, k) for k in base}}
        # Names come from the sweep alone (the CLI extras apply to all), not from the run's
        # position: adding a budget keeps the other runs' directories.
        name = all_names[i]
        # Two runs that build the same config would train the same model twice.
        fingerprint = json.dumps(config.to_dict(), sort_keys=True, default=repr)
        if fingerprint in seen:
            raise ValueError(f"sweep(): runs {seen[fingerprint]} and {i} ({name}) have the "
                             "same config")  # fmt: skip
        seen[fingerprint] = f"{i} ({name})"
        if name in names:  # a hash collision of two different override sets
            raise ValueError(f"sweep(): runs {names[name]} and {i} have the same name {name}")
        names[name] = i
        if "total_steps" in config and not int(config.total_steps) >= 1:
            where = "--config.total_steps" if "total_steps" in base else "sweep()"
            raise ValueError(f"run {i} ({name}): total_steps={config.total_steps!r} must be >= 1 "
                             f"(set by {where}); a run of no steps trains nothing")  # fmt: skip
        info = run_info(config)
        runs.append(Run(i, name, overrides, os.path.join(root, name), info.get("total_steps"),
                        info, branch_of[i]))  # fmt: skip
        configs.append(config)
    check_branch_sources(runs, configs)
    if only is not None:
        runs = [r for r in runs if r.index in only]
        missing = sorted(set(only) - {r.index for r in runs})
        if missing:
            raise IndexError(f"--only {missing}: the sweep has runs 0..{len(sweeps) - 1}")
    return runs


def config_value(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def train_command(config_arg: str, run: Run, python: str = "") -> list[str]:
    """argv of the trainer for one run."""
    cmd = [python or sys.executable, "-m", "flaxlm.train.main", "--config", config_arg]
    cmd += ["--workdir", run.workdir]
    for k, v in run.overrides.items():
        if k == "branch_from" and run.branch_of is not None:
            # recorded relative to the sweep's root; the trainer gets the source's directory
            v = os.path.join(os.path.dirname(run.workdir), v)
        cmd.append(f"--config.{k}={format_value(v)}")
    return cmd


# Set by train/sweep.py in a trainer's environment: the sweep's pid (`exit_with_sweep`).
SWEEP_PID_ENV = "FLAXLM_SWEEP_PID"


def exit_with_sweep() -> None:
    """Called first thing by a trainer (train/main.py). When a sweep started it (`SWEEP_PID_ENV`
    holds the sweep's pid), it gets SIGTERM once the sweep dies (Linux's PR_SET_PDEATHSIG), and
    saves and stops as when preempted; if the sweep died before that was set, it exits now.

    Set here, after exec, and not in a Popen `preexec_fn`: that runs between fork and exec in
    a copy of the sweep's process, which is multithreaded once jax is loaded (a notebook's,
    the tests'), and a child can deadlock there on a lock another thread held. The variable is
    removed so that the trainer's own children do not take it for theirs."""
    value = os.environ.pop(SWEEP_PID_ENV, None)
    if value is None or not sys.platform.startswith("linux"):
        return
    try:
        pid = int(value)
    except ValueError:
        raise SystemExit(f"flaxlm.train.main: {SWEEP_PID_ENV}={value!r} is not a process id (a "
                         "sweep sets it to its own pid; unset it otherwise)") from None  # fmt: skip
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl here: the trainer outlives a dead sweep
        return
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != pid:  # the sweep died before: no signal will come
        raise SystemExit(f"flaxlm.train.main: the sweep (pid {pid}) that started this trainer "
                         "has exited; not training")  # fmt: skip


def sweep_names(config_arg: str, root: str) -> set[str]:
    """Directory names of every run the sweep of `config_arg` has now (all indices; no config
    is built)."""
    module, arg = load_config_module(config_arg)
    return set(resolve_branches(expand(module, arg), root)[1])


def read_index(path: str) -> dict:
    """A sweep's index (ROOT/sweep.json). A file that is not one (cut short by a full disk or a
    killed copy, not UTF-8, no "runs" list) is a ValueError naming it, with the line."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); not a sweep index (move it "
                         "aside and re-run the sweep to write it again)") from None  # fmt: skip
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); not a sweep index") from None
    if not isinstance(index, dict) or not isinstance(index.get("runs"), list):
        raise ValueError(f"{path}: not a sweep index (expected {{'runs': [...], ...}})")
    return index


def write_index(root: str, config_arg: str, runs: Sequence[Run], extra: Sequence[str], *,
                recorded: str | None = None) -> str:  # fmt: skip
    """ROOT/sweep.json: the config, the common overrides and every run of the sweep planned so
    far: `runs` merged with earlier `--only` subsets of the same sweep. An earlier entry whose
    run the sweep no longer has (a run dropped from sweep(), or listed under a name of the old
    `run-<index>-` scheme beside the one that is kept) is left out, so the run table lists each
    current run once.

    `recorded`: the config arg to record and hold later sweeps to, when the trainers' own
    (`config_arg`, in the runs' commands) names paths that move with the study (scaling_workflow
    records its held-out file relative to its root). An index that recorded the trainers'
    config arg itself (written before the caller passed `recorded`) is the same sweep."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "sweep.json")
    record = config_arg if recorded is None else recorded
    known = {}
    if os.path.exists(path):
        old = as_recorded(read_index(path), config_arg, recorded)
        if _same_config_arg(old.get("config"), record):
            current = sweep_names(config_arg, root)
            known = {r["name"]: r for r in old.get("runs", []) if r.get("name") in current}
        _check_same_runs(old, record, runs)
    for r in runs:
        known[r.name] = {**r.to_dict(), "command": train_command(config_arg, r, "python")}
    index = {
        "config": record,
        **code_commit(),  # the code that planned it (each run's DONE names the code that ran it)
        "extra_overrides": list(extra),
        "runs": sorted(known.values(), key=lambda r: r["index"]),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, path)
    return path


def as_recorded(old: dict, config_arg: str, recorded: str | None) -> dict:
    """`old` (sweep.json, or a record like it) with a config arg that is the trainers'
    `config_arg` itself, as it was recorded before its caller recorded `recorded` instead, taken
    for `recorded`: the same sweep, where it was started (its absolute paths still hold)."""
    if recorded is not None and _same_config_arg(old.get("config"), config_arg):
        return {**old, "config": recorded}
    return old


def _same_config_arg(a: str | None, b: str) -> bool:
    """FILE:ARG strings that name the same file and args (`./configs/x.py:b=1,a=2` is
    `configs/x.py:a=2,b=1`; a file of the checkout as `portable_config` records it is that
    file), or the same file with args its own parser reads alike (`:runlocal` is
    `:runlocal=True`): the same base config and the same sweep()."""
    if a is None:
        return False
    a, b = resolve_config(a), resolve_config(b)
    norm = lambda s: (os.path.realpath(s.partition(":")[0]), sorted(s.partition(":")[2].split(",")))
    if norm(a) == norm(b):
        return True
    if norm(a)[0] != norm(b)[0]:
        return False
    try:
        module, arg_b = load_config_module(b)
        arg_a = a.partition(":")[2] or None
        dump = lambda arg: json.dumps(  # noqa: E731
            [module.get_config(arg).to_dict(), expand(module, arg)], sort_keys=True, default=repr
        )
        return dump(arg_a) == dump(arg_b)
    except (KeyError, ValueError, TypeError, AttributeError, FileNotFoundError):
        return False  # an arg the file no longer reads: not the same


def _check_same_runs(old: dict, config_arg: str, runs: Sequence[Run]):
    """Stops a sweep whose run directories were started with other settings: names come from
    the sweep's own overrides only, so a different config arg (`:variant=`) or command-line
    override (`--config.total_steps=`) would skip those runs as finished, or resume their
    checkpoints with the new settings (two runs mixed). `RESULT_NEUTRAL_KEYS` (a resubmitted
    job's `max_runtime_minutes`) may change."""
    before = {r["name"]: r for r in old.get("runs", [])}
    for r in runs:
        prev = before.get(r.name)
        if prev is None or not os.path.isdir(r.workdir) or not os.listdir(r.workdir):
            continue  # never started: nothing to mix
        now = json.loads(json.dumps(r.overrides))  # tuples as lists, as the index stores them
        if not _same_config_arg(old.get("config"), config_arg) or _results_keys(
            prev.get("overrides")
        ) != _results_keys(now):
            raise ValueError(
                f"{r.workdir} was started by a sweep with --config {old.get('config')} and "
                f"overrides {prev.get('overrides')}; now: --config {config_arg}, {now}. Use "
                "another --workdir, or delete that run directory to retrain it"
            )


def _results_keys(overrides) -> dict | None:
    """`overrides` without `RESULT_NEUTRAL_KEYS`: the ones that decide a run's results."""
    if not isinstance(overrides, dict):
        return overrides
    return {k: v for k, v in overrides.items() if k not in RESULT_NEUTRAL_KEYS}
