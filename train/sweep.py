"""Sweeps: expand a config's `sweep(add, arg)` into named runs; train them here or print launch
lines for a cluster; collect their final metrics into one table.

    python -m flaxlm.train.sweep --config configs/pretrain.py:variant=tiny --workdir runs/sw \
        [--parallel 2] [--launch local|slurm|pod|multihost|print] [--only 0,3] [--config.a.b=v]
        [--gpus auto --gpus_per_run 1]   # local on a GPU host: each trainer its own GPU(s)

Every run is `ROOT/run-<k=v,...>`: its sweep() overrides sorted by key, so a run keeps its
directory when runs are added to the sweep (a directory of the older `run-<index>-<k=v,...>`
names is found by its overrides and kept: sweep_plan.resolve_name). It is trained by
`python -m flaxlm.train.main --config FILE:ARG --workdir RUN --config.k=v ...`.
`ROOT/sweep.json` indexes the runs with their overrides, sizes (N, D, FLOPs) and commands.

Re-running the same command skips finished runs (a `DONE` marker, written once the trainer
exited cleanly and reached `total_steps` or the end of its finite data, or a checkpoint at
`total_steps`) and resumes the others: the trainer restarts from the run's latest checkpoint by
itself. A started run whose config arg or overrides changed since stops the sweep
(sweep_plan.write_index): resuming it would mix two runs. While a run trains its directory holds
`RUNNING` (the trainer's pid), so a second sweep never trains the same run twice; a run that
failed holds `FAILED` (its exit code and step) until it is started again, for the run table to
say why the run has no row.
Trainers are started in their own session with SIGTERM as their parent-death signal (which the
trainer sets itself: `sweep_plan.exit_with_sweep`): when the sweep is interrupted (Ctrl-C,
SIGTERM, even SIGKILL) each running trainer saves a checkpoint and stops. After the runs,
`ROOT/runs.csv` and `ROOT/runs.json` hold the run table (train/sweep_table).
Cluster launch files are written by train/sweep_launch and never executed here.

A run of the sweep may branch from another (`branch_from=handle.at(STEP)`, train/sweep_plan.py):
a local sweep starts it once the source's checkpoint STEP exists, and reports it `blocked` when
nothing left to run could write it (its source failed, or is not among `--only`'s runs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from flaxlm.train.code_version import code_commit
from flaxlm.train.metrics import data_end_step
from flaxlm.train.sweep_devices import GPUSlots, nvidia_smi_gpus, visible_gpus
from flaxlm.train.sweep_plan import (  # noqa: F401 (the public names of the sweep API)
    SWEEP_PID_ENV,
    Run,
    check_local_workdir,
    expand,
    format_value,
    legacy_run_name,
    load_config_module,
    plan,
    resolve_name,
    run_info,
    run_name,
    set_dotted,
    train_command,
    write_index,
)

# --------------------------------------------------------------------------------------------
# Finished / running state of a run directory


def final_checkpoint(run_dir: str, total_steps: int | None) -> bool:
    if total_steps is None:
        return False
    return os.path.isdir(os.path.join(run_dir, "checkpoints", str(total_steps)))


def _logged_step(run_dir: str) -> int:
    """Highest step in the run's metrics.jsonl (0 when none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    best = 0
    if os.path.exists(path):
        # errors="replace": a corrupt byte spoils its line only (it fails to parse below)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    best = max(best, int(json.loads(line).get("step", 0)))
                except (json.JSONDecodeError, TypeError, ValueError):
                    continue  # a line cut short by a kill
    return best


def is_done(run: Run) -> bool:
    return os.path.exists(os.path.join(run.workdir, "DONE")) or final_checkpoint(
        run.workdir, run.total_steps
    )


def branch_ready(run: Run) -> bool:
    """Whether a run can start now: a branch of another run of the sweep (sweep_plan's
    `branch_from=handle.at(STEP)`) once that run's checkpoint STEP exists (orbax renames a step
    into place when it is complete) or once it was seeded (it resumes from its own steps)."""
    if run.branch_of is None:
        return True
    source, step = run.branch_of
    seeded = os.path.join(run.workdir, "branch.json")  # train/branch.BRANCH_FILE (it imports jax)
    return os.path.exists(seeded) or os.path.isdir(
        os.path.join(os.path.dirname(run.workdir), source, "checkpoints", str(step))
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_trainer(pid: int) -> bool:
    """Whether `pid` runs flaxlm.train.main. After a reboot (a crashed sweep host) a RUNNING
    file's pid can belong to an unrelated process, which would make its run "busy" forever.
    Without /proc (macOS) every live pid counts."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"flaxlm.train.main" in f.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # no procfs: cannot tell, assume it is ours
    except OSError:
        return True


def _running_pid(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "RUNNING")) as f:
            pid = int(f.read().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _alive(pid) and _is_trainer(pid) else None


def _wait_for_stale(run: Run, timeout: float) -> bool:
    """Waits for a trainer of an interrupted sweep (still saving its checkpoint) to exit."""
    pid = _running_pid(run.workdir)
    if pid is None:
        return True
    _say(f"{run.name}: waiting for pid {pid} (an earlier trainer of this run) to stop")
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not _alive(pid)


def _say(msg: str):
    print(f"[sweep] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Local execution


def run_env(parallel: int, cache_dir: str) -> dict:
    """Environment of local trainers: a shared persistent compilation cache (runs of one size
    compile the same init, and a resumed run its own steps) and, with several trainers at
    once, one compute thread each so they do not fight over the cores."""
    env = dict(os.environ)
    if cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
        # Under load even "quick" compiles take seconds; cache them all.
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if parallel > 1:
        flags = env.get("XLA_FLAGS", "")
        if "multi_thread_eigen" not in flags:
            flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = flags.strip()
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_local(
    config_arg: str,
    runs: Sequence[Run],
    *,
    parallel: int = 1,
    cache_dir: str = "",
    stale_timeout: float = 120.0,
    gpus: Sequence[str] = (),
    gpus_per_run: int = 1,
) -> dict[str, str]:
    """Trains the runs that are not finished, `parallel` at a time; returns name -> status
    (done | skipped | failed | busy | blocked | interrupted). A branch waits for its source's
    checkpoint (`branch_ready`); one whose source never writes it is blocked. With `gpus`, each
    trainer sees only its own `gpus_per_run` of them (CUDA_VISIBLE_DEVICES;
    train/sweep_devices.py), and at most as many run at once as there are such slices."""
    slots = GPUSlots(gpus, gpus_per_run) if gpus else None
    if slots is not None and parallel > slots.size:
        _say(f"--parallel {parallel}: {slots.size} at once ({len(gpus)} GPUs, {gpus_per_run} each)")
        parallel = slots.size
    elif slots is None and parallel > 1 and len(nvidia_smi_gpus()) > 0:
        _say(f"warning: {parallel} trainers at once will each see every GPU (and preallocate "
             "75% of each one's memory); --gpus auto gives each its own")  # fmt: skip
    status: dict[str, str] = {}
    pending = []
    for r in runs:
        if is_done(r):
            status[r.name] = "skipped"
            _say(f"skip {r.name} (finished)")
        else:
            pending.append(r)
    env = run_env(parallel, cache_dir)
    active: dict[str, tuple[subprocess.Popen, Run, float, tuple[str, ...]]] = {}
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        for proc, *_ in active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and returns

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending or active) and stop["signal"] is None:
            while pending and len(active) < parallel and stop["signal"] is None:
                ready = [r for r in pending if branch_ready(r)]
                if not ready:
                    break  # branches whose sources have not reached their step yet
                r = ready[0]
                pending.remove(r)
                if not _wait_for_stale(r, stale_timeout):
                    status[r.name] = "busy"
                    _say(f"{r.name}: another trainer still runs in it; not started")
                    continue
                own = slots.take() if slots is not None else ()
                own_env = {**env, "CUDA_VISIBLE_DEVICES": ",".join(own)} if own else env
                active[r.name] = (_start(config_arg, r, own_env), r, time.monotonic(), own)
                on = f" on GPU {','.join(own)}" if own else ""
                _say(f"start {r.name} ({len(status) + len(active)}/{len(runs)}){on}")
            if pending and not active and not any(branch_ready(r) for r in pending):
                for r in pending:  # nothing runs that could still write their sources' steps
                    status[r.name] = "blocked"
                    source, step = r.branch_of
                    why = status.get(source, "not in this sweep's runs (--only)")
                    _say(f"BLOCKED {r.name}: it branches from {source} at step {step}, which "
                         f"has no checkpoint there ({source}: {why})")  # fmt: skip
                pending = []
            time.sleep(0.2)
            for name, (proc, r, t0, own) in list(active.items()):
                if proc.poll() is not None:
                    del active[name]
                    if own:
                        slots.give(own)
                    # A trainer still starting up when the sweep was interrupted dies of the
                    # forwarded SIGTERM (rc=-15) before its handler is set: interrupted too.
                    status[name] = _finish(r, proc.returncode, time.monotonic() - t0,
                                           interrupted=stop["signal"] is not None)  # fmt: skip
        for name, (proc, r, t0, _) in active.items():  # interrupted: let trainers save and stop
            proc.wait()
            status[name] = _finish(r, proc.returncode, time.monotonic() - t0, interrupted=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        raise KeyboardInterrupt(f"sweep interrupted by signal {stop['signal']}")
    return status


def _start(config_arg: str, run: Run, env: dict) -> subprocess.Popen:
    os.makedirs(run.workdir, exist_ok=True)
    _remove(os.path.join(run.workdir, FAILED_FILE))  # this attempt replaces the record
    log = open(os.path.join(run.workdir, "train.log"), "a")  # noqa: SIM115 (child owns it)
    log.write(
        f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(config_arg, run))}\n"
    )
    log.flush()
    proc = subprocess.Popen(
        train_command(config_arg, run),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**env, SWEEP_PID_ENV: str(os.getpid())},  # SIGTERM when the sweep dies
        start_new_session=True,  # Ctrl-C reaches the sweep only; it forwards SIGTERM
    )
    log.close()
    with open(os.path.join(run.workdir, "RUNNING"), "w") as f:
        f.write(f"{proc.pid}\n")
    return proc


# Written by `_finish` for a failed run (rc, step): the run table says why the run has no row.
FAILED_FILE = "FAILED"


def _remove(path: str):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _finish(run: Run, returncode: int, seconds: float, interrupted: bool = False) -> str:
    _remove(os.path.join(run.workdir, "RUNNING"))
    step = _logged_step(run.workdir)
    reached = run.total_steps is None or step >= run.total_steps
    data_end = data_end_step(run.workdir)  # finite data ended first: stopping was the end
    # A run that logged no step trained nothing: never DONE (total_steps=0, or data that was
    # empty), unless its final checkpoint says otherwise.
    trained = step > 0 or bool(run.total_steps and final_checkpoint(run.workdir, run.total_steps))
    ended = reached or final_checkpoint(run.workdir, run.total_steps) or data_end is not None
    if returncode == 0 and trained and ended:
        # the code that finished it (the trainer runs from this checkout): sweep_table says
        # when a sweep's runs trained under different commits
        done = {"seconds": round(seconds, 1), "step": step, "time": time.time(), **code_commit()}
        if data_end is not None and not reached:
            done["data_end"] = data_end
        with open(os.path.join(run.workdir, "DONE"), "w") as f:
            json.dump(done, f)
        _remove(os.path.join(run.workdir, FAILED_FILE))
        early = (
            f" (its data ended at step {data_end} of {run.total_steps})"
            if "data_end" in done
            else ""
        )
        _say(f"done {run.name} in {seconds:.1f}s{early}")
        return "done"
    if interrupted:
        _say(f"interrupted {run.name} at step {step}; re-run the sweep to resume it")
        return "interrupted"
    why = f"rc={returncode}" if returncode else f"stopped at step {step} of {run.total_steps}"
    _say(f"FAILED {run.name} ({why}, {seconds:.1f}s); see {run.workdir}/train.log")
    with open(os.path.join(run.workdir, FAILED_FILE), "w") as f:
        json.dump({"rc": returncode, "step": step, "total_steps": run.total_steps,
                   "seconds": round(seconds, 1), "time": time.time()}, f)  # fmt: skip
    return "failed"


# --------------------------------------------------------------------------------------------
# Command line


def _parse_only(text: str) -> list[int] | None:
    """`--only 0,3` as run indices (None: every run)."""
    if not text:
        return None
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"--only {text!r}: expected comma-separated run indices") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flaxlm.train.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", required=True, help="config file with sweep(): FILE.py[:ARG]")
    p.add_argument("--workdir", required=True, help="sweep root; one directory per run")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="local trainers at once (slurm: array tasks at once)",
    )
    p.add_argument(
        "--gpus",
        default="",
        help="local: GPUs to split between the trainers ('auto' or '0,1,...'; each "
        "sees only its own, CUDA_VISIBLE_DEVICES); '' = every trainer sees all",
    )
    p.add_argument("--gpus_per_run", type=int, default=1, help="local, with --gpus: GPUs per run")
    p.add_argument("--launch", default="local",
                   choices=("local", "slurm", "pod", "multihost", "print"),
                   help="local: train here; slurm/pod/multihost: write that launch file; "
                   "print: write and print all three (nothing is executed)")  # fmt: skip
    p.add_argument("--only", default="", help="comma-separated run indices (default: all)")
    p.add_argument("--no_table", action="store_true", help="do not write runs.csv/runs.json")
    p.add_argument(
        "--cache_dir",
        default=None,
        help="persistent JAX compilation cache (default ROOT/.jax_cache; '' = none)",
    )
    p.add_argument("--python", default="python", help="interpreter named in launch files")
    p.add_argument("--nodes", type=int, default=1, help="slurm/multihost: hosts per run")
    p.add_argument(
        "--gpus_per_node", type=int, default=8, help="slurm: GPUs per node, one task (process) each"
    )
    p.add_argument("--slurm_extra", default="", help="slurm: extra '#SBATCH' options, ';'-sep.")
    p.add_argument("--tpu_name", default="$TPU_NAME", help="pod: TPU VM name")
    p.add_argument("--zone", default="$ZONE", help="pod: zone")
    p.add_argument("--repo_dir", default="~/flaxlm", help="pod/multihost: checkout on the hosts")
    p.add_argument("--coordinator", default="$HOST0:1234", help="multihost: host:port of host 0")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = _parser()
    args, rest = p.parse_known_args(argv)
    extra = []
    for item in rest:
        if not item.startswith("--config."):
            p.error(f"unrecognised argument {item!r} (overrides are --config.key=value)")
        extra.append(item[len("--config.") :])
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    root = args.workdir
    try:
        check_local_workdir(root)  # before anything is made: gs://b/sw became ./gs:/b/sw
        only = _parse_only(args.only)
        runs = plan(args.config, root, extra=extra, only=only)
        write_index(root, args.config, runs, extra)
    except (KeyError, ValueError, IndexError, FileNotFoundError) as e:
        # Bad input (a misspelt key or config arg, --only out of range, a changed setting):
        # the message names it; a traceback would bury it.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        _parser().error(msg)
    _say(f"{len(runs)} runs under {root} (index: {os.path.join(root, 'sweep.json')})")
    if args.launch != "local":
        from flaxlm.train import sweep_launch

        try:
            paths = sweep_launch.write_launch_files(args.launch, args.config, runs, root, args)
        except ValueError as e:  # a branch that a SLURM array cannot order after its source
            _parser().error(str(e))
        for path in paths:
            if args.launch == "print":
                with open(path) as f:
                    print(f"# ---- {path}\n{f.read()}")
            else:
                _say(f"wrote {path}")
        return 0
    cache = os.path.join(root, ".jax_cache") if args.cache_dir is None else args.cache_dir
    t0 = time.monotonic()
    try:
        gpus = visible_gpus(args.gpus)
        GPUSlots(gpus, args.gpus_per_run) if gpus else None  # refuses a bad split up front
    except ValueError as e:
        _parser().error(str(e))
    status = run_local(args.config, runs, parallel=max(1, args.parallel), cache_dir=cache,
                       gpus=gpus, gpus_per_run=args.gpus_per_run)  # fmt: skip
    _say(f"{sum(s in ('done', 'skipped') for s in status.values())}/{len(runs)} runs finished "
         f"({time.monotonic() - t0:.0f}s)")  # fmt: skip
    if not args.no_table:
        from flaxlm.train import sweep_table

        rows, missing = sweep_table.collect_all(root)
        csv_path, _ = sweep_table.write_table(rows, root)
        _say(f"run table: {csv_path} ({len(rows)} finished runs)")
        for m in missing:
            _say(f"  no row for {m['name']}: {m['why']}")
        if mixed := sweep_table.code_warning(rows):
            _say(f"  WARNING: {mixed}")
    return 1 if any(s in ("failed", "busy", "blocked") for s in status.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        _say(str(e) or "interrupted")
        sys.exit(130)
