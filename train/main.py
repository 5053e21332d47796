"""Command line: run any task from a config file.

    python -m flaxlm.train.main --config configs/pretrain.py:variant=tiny,runlocal=True \
        --workdir runs/pt [--config.opt.lr=1e-3 ...]

Re-running the same command resumes from the latest checkpoint in --workdir. Multi-host: launch
one process per host with the same command; with --distributed, `jax.distributed.initialize()`
connects them (it detects SLURM and TPU pods; under SLURM it gives each task the one GPU of its
SLURM_LOCALID, so there launch one task per GPU). Or pass --coordinator/--num_processes/
--process_id: one process per host with all its GPUs, even inside a SLURM allocation (and on CPU,
where tests do this with gloo collectives).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from flaxlm.train.sweep_plan import exit_with_sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path.py:arg).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORD = flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process).")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", 0, "This process's index.")

# task name → module with `run(config, workdir)`
TASKS = {
    "pretrain": "flaxlm.train.pretrain",
    "sft": "flaxlm.alignment.sft",
    "reward": "flaxlm.alignment.reward",
    "prm": "flaxlm.alignment.prm",
    "dpo": "flaxlm.alignment.dpo",
    "kto": "flaxlm.alignment.kto",
    "distill": "flaxlm.alignment.distill",
    "ppo": "flaxlm.alignment.ppo",
    "grpo": "flaxlm.alignment.grpo",
    "online_dpo": "flaxlm.alignment.online_dpo",
}


def init_distributed(
    coordinator: str = "", num_processes: int = 1, process_id: int = 0, auto: bool = False
):
    """Connects the processes of a multi-host run (no-op for a single process)."""
    import jax

    if coordinator:
        # CPU processes need a collectives implementation to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # "deactivate": explicit flags mean one process per host driving all its GPUs. Without
        # it jax still reads a SLURM allocation's SLURM_LOCALID (the flags leave
        # local_device_ids unset) and shows each process only that one GPU.
        jax.distributed.initialize(
            coordinator, num_processes, process_id, cluster_detection_method="deactivate"
        )
    elif auto:
        jax.distributed.initialize()
    elif num_processes != 1 or process_id != 0:
        # Without a coordinator each host would train alone into the same workdir.
        raise app.UsageError(
            f"--num_processes={num_processes} --process_id={process_id} need --coordinator "
            "host:port (or --distributed on SLURM / TPU pods)"
        )


def parsed_config(config_flag=None):
    """The --config ConfigDict, with the `--config.model.X` flags given recorded in its
    `model_keys_given` (configs/common.py `model_keys_set`): over an init_from source they
    apply even when equal to the variant's default, which a diff against it cannot tell."""
    from flaxlm.configs.common import note_model_keys_given

    config_flag = config_flag if config_flag is not None else flags.FLAGS["config"]
    config = config_flag.value
    note_model_keys_given(config, config_flags.get_override_values(config_flag))
    return config


def _config_flags(argv) -> tuple[str | None, dict]:
    """The `--config` argument and the `--config.KEY` overrides in argv: KEY -> (the value
    after "=", else None; the next argument, else None) — a bare `--config.KEY` is a boolean
    flag set to True when KEY is a boolean, else takes the next argument as its value.

    The next argument is a value unless it starts with "--" (another flag): absl takes it
    whatever it is, so `--config.seed -1` sets seed to -1. Refusing every "-" left seed with
    no value, blamed in place of a misspelt flag after it."""
    config_arg, overrides = None, {}
    args = list(argv[1:])
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        if name in ("--config", "-config"):
            config_arg = value if eq else following
        elif name.startswith(("--config.", "-config.")):
            overrides[name.split("config.", 1)[1]] = (value if eq else None, following)
    return config_arg, overrides


def _field(config, key: str):
    """The value at dotted `key` of `config`, or None where it has none."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def bad_override(argv) -> str | None:
    """What is wrong with the first `--config.KEY` flag that the config file's config has no
    KEY for (or whose value KEY cannot take), as the sweeps and `override()` say it: the dotted
    key and the closest existing one. None when none is (or the config cannot be loaded)."""
    from flaxlm.train.sweep_plan import load_config_module, set_dotted

    config_arg, overrides = _config_flags(argv)
    if not config_arg or not overrides:
        return None
    try:
        module, arg = load_config_module(config_arg)
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception:  # (a config that does not load: absl's own error says why)
        return None
    for key, (value, following) in overrides.items():
        if value is None:
            if isinstance(_field(config, key), bool):
                continue  # a bare boolean flag: True
            value = following if following is not None else ""
        try:
            set_dotted(config, key, value, from_string=True)
        except (KeyError, TypeError, ValueError) as e:
            why = str(e.args[0] if e.args else e).removeprefix(f"override {key!r}: ")
            return f"--config.{key}: {why}"
    return None


def _parse_flags(argv):
    """absl's flag parsing, where a misspelt `--config.KEY` ended in ml_collections' traceback
    naming only the leaf (`'d_modle' ... Did you mean "d_model"`), or for a key of a section
    another task's config has, just `AttributeError: "'sources'"`: now one line naming the
    flag, the dotted key and the closest one (as the sweeps and configs/common.py `override`)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        why = bad_override(argv)
        if why is None and isinstance(e, KeyError) and str(e.args[0] if e.args else "").startswith(
                "config arg:"):  # fmt: skip
            # configs/common.py `parse_arg` / `lookup` on the part after "file.py:" (a misspelt
            # name, an unknown variant): its message names the key and the known ones
            why = f"--config: {e.args[0]}"
        if why is None:
            raise
        sys.exit(f"FATAL Flags parsing error: {why}")  # (absl's own words for a bad flag)


def _input_errors() -> tuple[type, ...]:
    """The errors that are about the user's input (data files, templates, an HF checkpoint, a
    mesh, a checkpoint directory, a reward function that fails on every sample), each naming the
    file, key or line: the message is the answer, a traceback into the reader only hides it."""
    from flaxlm.alignment.rl_rollout import RewardError
    from flaxlm.data.chat_template import TemplateError
    from flaxlm.data.source_errors import DataError
    from flaxlm.models.hf_tokenizer import HFError
    from flaxlm.train.checkpoint_inspect import CheckpointError
    from flaxlm.train.checkpoint_read import MeshError

    return DataError, TemplateError, HFError, MeshError, CheckpointError, RewardError


TRACEBACK_ENV = "FLAXLM_TRACEBACK"  # set (to anything but "" or 0): a ValueError's traceback


def run_task(module: str, config, workdir: str):
    """`module.run(config, workdir)`; bad input stops with one line naming the error's kind and
    what it names (a DataError at resume, "data.train changed since the checkpoint ...", was a
    traceback through the batch iterator). So does any other ValueError — how the trainers
    refuse a config value, each naming its key ("config: batch_size=0 must be ...",
    "distill.temperature=0 must be > 0"): hundreds of checks, whose tracebacks only buried the
    line that says what to change. FLAXLM_TRACEBACK=1 re-raises it, traceback and all (a
    ValueError from a bug, not from the config)."""
    errors = _input_errors()
    try:
        if "sharding" in config:  # before a task writes anything (SFT's data report did)
            from flaxlm.models.sharding import logical_axis_rules

            logical_axis_rules(config.sharding)
        return importlib.import_module(module).run(config, workdir)
    except errors as e:
        sys.exit(f"{type(e).__name__}: {e}")
    except FileNotFoundError as e:  # a data path that matches nothing: one line naming its key
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        keys = keys_naming(config, getattr(e, "filename", None) or _quoted(str(e)))
        where = f" ({', '.join(keys)})" if keys else ""
        sys.exit(f"{type(e).__name__}: {e}{where}")
    except ValueError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        sys.exit(f"{type(e).__name__}: {e}\n({TRACEBACK_ENV}=1 shows where it was raised)")


def _quoted(message: str) -> str | None:
    """The first 'quoted' part of an error message (`expand_paths`: "no files match 'x'")."""
    parts = message.split("'")
    return parts[1] if len(parts) >= 3 else None


def keys_naming(config, path: str | None) -> list[str]:
    """The dotted config keys whose string value names `path` (one of its comma-separated
    parts): which setting a missing file came from."""
    if not path:
        return []
    found = []

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if hasattr(v, "items"):
                walk(v, key + ".")
            elif isinstance(v, str) and path in (p.strip() for p in v.split(",")):
                found.append(key)

    walk(config, "")
    return found


def main(argv):
    del argv
    exit_with_sweep()  # a sweep's trainer: SIGTERM when the sweep dies
    logging.getLogger("flaxlm").setLevel(logging.INFO)
    from flaxlm.train.checkpoint import quiet_orbax_logs

    quiet_orbax_logs()
    init_distributed(_COORD.value, _NPROC.value, _PID.value, _DISTRIBUTED.value)
    config = parsed_config()
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    module = TASKS.get(config.task)
    if module is None:
        raise app.UsageError(f"config.task={config.task!r}; known tasks: {sorted(TASKS)}")
    _, summary = run_task(module, config, _WORKDIR.value)
    keys = ("step", "train", "eval", "preempted", "stop_reason", "data_exhausted")
    import jax  # (initialised above)

    if jax.process_index() == 0:  # once per job, as the metrics are written
        print({k: v for k, v in summary.items() if k in keys})


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
