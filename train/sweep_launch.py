"""Launch files for a sweep on a cluster: written (and printed) by train/sweep.py, never run.

    ROOT/launch/slurm_array.sh      one SLURM array job task per run (submit it with sbatch
                                    from anywhere: it runs in the directory it was written from)
    ROOT/launch/tpu_pod.sh          one `gcloud compute tpus tpu-vm ssh --worker=all` line per run
    ROOT/launch/host-<i>.sh         multi-node GPU without torchrun: one line per run for host i,
                                    with --coordinator/--num_processes/--process_id

Every trainer gets `--distributed` (or the explicit coordinator flags), so
`jax.distributed.initialize()` connects the processes of a run. Only runs that are not finished
are listed; the SLURM script also skips a run whose DONE marker appeared since, and marks a run
DONE only when its final checkpoint exists (a preempted trainer exits cleanly too). On pods and
multi-node clusters ROOT must be a folder every host sees at the same path: a shared filesystem,
or a bucket mounted on every host (gcsfuse); a bucket's URL (gs://...) is refused, since the
sweep and the trainers write local paths (sweep_plan.check_local_workdir). The pod and
multi-host scripts `cd` to --repo_dir (the hosts' flaxlm checkout): they name the run
directories by their absolute paths, a config file inside the local checkout relative to its root
(the same file in the hosts' checkout) and any other config file by its absolute path (which must
then be on shared storage too); the SLURM script runs where it was written (`--chdir`).

Under SLURM, `jax.distributed.initialize()` gives each task one GPU (the task's SLURM_LOCALID), so
the SLURM script starts one task per GPU (`--ntasks-per-node=--gpus_per_node`); the pod and
multi-host scripts start one process per host, which drives all of that host's accelerators.
The launch files name `--python` (default `python`): pass the venv's interpreter
(`--python /path/to/.venv/bin/python`) unless the hosts' `python` is the one with flaxlm.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shlex
from collections.abc import Sequence

from flaxlm.train.sweep import is_done
from flaxlm.train.sweep_plan import checkout_root, portable_config, train_command


def _trainer(config_arg: str, run, python: str) -> str:
    return shlex.join(train_command(config_arg, run, python))


def _host_paths(config_arg: str, runs: Sequence) -> tuple[str, list]:
    """The config file (its ":args" kept) and the runs' directories as the pod and host
    scripts name them, after their `cd` to --repo_dir: a config file inside the local flaxlm
    checkout relative to the checkout's root, so it names the same file of the hosts' checkout
    at --repo_dir (the local checkout's absolute path is no path there); a config file outside
    it, and the run directories, absolute, so a path typed relative to the sweep's directory
    does not name another file (or train the run under the repo, where the sweep never looks).
    The hosts must see those absolute paths (shared storage, as for ROOT)."""
    runs = [dataclasses.replace(r, workdir=os.path.abspath(r.workdir),
                                overrides={k: _absolute_paths(v) for k, v in r.overrides.items()})
            for r in runs]  # fmt: skip
    return portable_config(config_arg, checkout_root()), runs


def _sweep_modules() -> str:
    """PYTHONPATH with the sweep's directory after the hosts' own entries: a reward or task
    module there (`grpo.rewards=my_rewards:numeric`) imports after the `cd` to the checkout."""
    return f"PYTHONPATH=${{PYTHONPATH:+$PYTHONPATH:}}{shlex.quote(os.getcwd())}"


def _absolute_paths(value):
    """An override value with each part that names an existing file or directory relative to
    the sweep's directory made absolute (`init_from=runs/sft`, `hf:DIR`, `data.train=a.jsonl,
    b.jsonl`): after the scripts' `cd` to the checkout, the relative path named another file
    (a `runs/sft` there silently became the init_from) or none. Other values are unchanged."""
    if not isinstance(value, str) or not value:
        return value

    def part(p: str) -> str:
        prefix = "hf:" if p.startswith("hf:") else ""
        path = p[len(prefix) :]
        if (
            path
            and not os.path.isabs(path)
            and (os.path.exists(path) or (glob.has_magic(path) and glob.glob(path, recursive=True)))
        ):
            return prefix + os.path.abspath(path)
        return p

    return ",".join(part(p) for p in value.split(","))


def slurm_script(config_arg: str, runs: Sequence, root: str, *, python: str = "python",
                 nodes: int = 1, gpus_per_node: int = 8, parallel: int = 1,
                 extra: str = "") -> str:  # fmt: skip
    """A SLURM array script: array task i trains runs[i] with `srun ... --distributed` on `nodes`
    nodes, one process per GPU (jax's SLURM detection gives each process the GPU of its
    SLURM_LOCALID, so one process per node would use one GPU of each node). It runs in the
    directory it was written from (`--chdir`), where relative config and run paths point."""
    name = os.path.basename(os.path.normpath(root)) or "sweep"
    limit = f"%{parallel}" if parallel > 1 else ""
    cwd = os.getcwd()
    out = "slurm-%A_%a.out"  # %A: the array job's id, %a: the task's index
    lines = [
        "#!/bin/bash",
        f"# {len(runs)} runs of {config_arg}, one array task each (written by flaxlm.train.sweep)",
        # sbatch splits #SBATCH lines at spaces and cuts them at '#', honouring shell quotes
        f"#SBATCH --job-name={shlex.quote(name)}",
        f"#SBATCH --array=0-{len(runs) - 1}{limit}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --chdir={shlex.quote(cwd)}",
        f"#SBATCH --output={shlex.quote(os.path.join(os.path.abspath(root), 'launch', out))}",
        "#SBATCH --requeue",
        *[f"#SBATCH {opt.strip()}" for opt in extra.split(";") if opt.strip()],
        "set -euo pipefail",
        "case $SLURM_ARRAY_TASK_ID in",
    ]
    for i, run in enumerate(runs):
        cmd = _trainer(config_arg, run, python) + " --distributed"
        steps = run.total_steps if run.total_steps is not None else ""
        lines.append(f"  {i}) DIR={shlex.quote(run.workdir)}; STEPS={steps}; CMD=({cmd}) ;;")
    lines += [
        '  *) echo "no run for array index $SLURM_ARRAY_TASK_ID"; exit 1 ;;',
        "esac",
        '[ -f "$DIR/DONE" ] && { echo "$DIR finished"; exit 0; }',
        'srun "${CMD[@]}"',
        'if [ -n "$STEPS" ] && [ -d "$DIR/checkpoints/$STEPS" ]; then touch "$DIR/DONE"; fi',
    ]
    return "\n".join(lines) + "\n"


def pod_script(config_arg: str, runs: Sequence, *, python: str = "python",
               tpu_name: str = "$TPU_NAME", zone: str = "$ZONE",
               repo_dir: str = "~/flaxlm") -> str:  # fmt: skip
    """One gcloud line per run: the same trainer command on every worker of a TPU pod; runs
    follow each other. Config and run paths as `_host_paths` writes them."""
    config_arg, runs = _host_paths(config_arg, runs)
    lines = [
        "#!/bin/bash",
        f"# {len(runs)} runs of {config_arg} on TPU pod {tpu_name}, one after another",
        "set -euo pipefail",
    ]
    for run in runs:
        remote = (
            f"cd {repo_dir} && {_sweep_modules()} {_trainer(config_arg, run, python)} --distributed"
        )
        lines.append(
            f"gcloud compute tpus tpu-vm ssh {tpu_name} --zone={zone} --worker=all "
            f"--command={shlex.quote(remote)}"
        )
    return "\n".join(lines) + "\n"


def host_script(config_arg: str, runs: Sequence, host: int, n_hosts: int, *,
                python: str = "python", coordinator: str = "$HOST0:1234",
                repo_dir: str = "~/flaxlm") -> str:  # fmt: skip
    """Host `host`'s lines of a multi-node run without torchrun: the same command on every
    host, differing only in --process_id; start all hosts' scripts together. Config and run
    paths as `_host_paths` writes them."""
    config_arg, runs = _host_paths(config_arg, runs)
    lines = [
        "#!/bin/bash",
        f"# host {host} of {n_hosts}: {len(runs)} runs of {config_arg}, one after another",
        "set -euo pipefail",
        f"cd {repo_dir}",
        f"export {_sweep_modules()}",
    ]
    for run in runs:
        lines.append(
            f"{_trainer(config_arg, run, python)} --coordinator={coordinator} "
            f"--num_processes={n_hosts} --process_id={host}"
        )
    return "\n".join(lines) + "\n"


def _check_no_branch_waits(todo: Sequence) -> None:
    """The pod and host scripts train their runs one after another, a source (added first)
    before its branches; a SLURM array's tasks start in any order and one cannot wait for
    another's checkpoint. A branch whose source is in the same array is refused, naming the two
    launches that work."""
    names = {r.name: r.index for r in todo}
    waiting = [r for r in todo if r.branch_of is not None and r.branch_of[0] in names]
    if waiting:
        later = ",".join(str(r.index) for r in waiting)
        first = ",".join(str(r.index) for r in todo if r not in waiting)
        raise ValueError(
            f"slurm: runs {later} branch from runs of the same array, whose tasks cannot wait "
            f"for each other; launch --only {first} first, then --only {later} once those "
            "finished (or --launch pod / multihost, which train the runs in order)"
        )


def write_launch_files(kind: str, config_arg: str, runs: Sequence, root: str, args) -> list[str]:
    """Writes the launch files of `kind` (slurm | pod | multihost | print = all) for the runs
    that are not finished; returns their paths."""
    todo = [r for r in runs if not is_done(r)]
    if len(todo) < len(runs):
        print(f"[sweep] {len(runs) - len(todo)} finished runs left out of the launch files")
    out_dir = os.path.join(root, "launch")
    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, str] = {}
    if not todo:
        return []
    if kind in ("slurm", "print"):
        _check_no_branch_waits(todo)
        files["slurm_array.sh"] = slurm_script(
            config_arg, todo, root, python=args.python, nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, parallel=args.parallel, extra=args.slurm_extra,
        )  # fmt: skip
    if kind in ("pod", "print"):
        files["tpu_pod.sh"] = pod_script(
            config_arg, todo, python=args.python, tpu_name=args.tpu_name, zone=args.zone,
            repo_dir=args.repo_dir,
        )  # fmt: skip
    if kind in ("multihost", "print"):
        n = max(args.nodes, 1)
        for h in range(n):
            files[f"host-{h}.sh"] = host_script(
                config_arg, todo, h, n, python=args.python, coordinator=args.coordinator,
                repo_dir=args.repo_dir,
            )  # fmt: skip
    paths = []
    for fname, text in files.items():
        path = os.path.join(out_dir, fname)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        paths.append(path)
    return paths
