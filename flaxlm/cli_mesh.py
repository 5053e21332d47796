"""The sharding flags of the inference command lines (`python -m flaxlm.generate`, `python -m
flaxlm.evaluation`): a model too big for one device is split over several, or several hosts.

    --mesh fsdp=-1                     every local device, weights split along `embed` (ZeRO-3)
    --mesh tensor=8 --sharding fsdp_tp  heads and MLP split over 8 devices (Megatron style)
    --mesh data=2,fsdp=4               two data-parallel groups of four
    --coordinator HOST:PORT --num_processes N --process_id I   (or --distributed on SLURM / TPU
                                       pods): one process per host, the same command on each

Axes and presets are training's (models/sharding.py): `--mesh` names sizes of data | fsdp |
context | tensor, -1 taking the devices left over; `--sharding` is the logical-rules preset
(dp | fsdp | fsdp_tp); a mesh of fewer devices than the machine has (no -1) takes the first
ones. Without `--mesh` the model sits on one device — with several processes, the mesh is
`data=-1` over all of them instead. With several processes every process reads the same inputs,
the work is split over all devices, and every process gets the whole result (models/decode.py,
"Several processes"); only process 0 prints and writes files (`is_writer`).
"""

from __future__ import annotations

import argparse
import math


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sharding over several devices or hosts (flaxlm/cli_mesh.py)")
    g.add_argument("--mesh", default="",
                   help="axis sizes to split the model over, e.g. fsdp=-1 or data=2,tensor=4 "
                   "(-1: the devices left over; default: one device)")  # fmt: skip
    g.add_argument("--sharding", default="fsdp", choices=("dp", "fsdp", "fsdp_tp"),
                   help="logical-rules preset for --mesh (as in training)")  # fmt: skip
    g.add_argument("--coordinator", default="", help="HOST:PORT of process 0 (multi-host)")
    g.add_argument("--num_processes", type=int, default=1, help="processes (with --coordinator)")
    g.add_argument("--process_id", type=int, default=0, help="this process (with --coordinator)")
    g.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() from the environment (SLURM, TPU "
                   "pods)")  # fmt: skip


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1' -> {"data": 2, "fsdp": -1}; ValueError naming --mesh otherwise."""
    from flaxlm.models.sharding import MESH_AXES

    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, eq, size = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS in {MESH_AXES}")
        if name in out:  # a typo for another axis, not an override: say so rather than guess
            raise ValueError(f"--mesh {text!r}: axis {name} is given twice")
        try:
            out[name] = int(size)
        except ValueError:
            msg = f"--mesh {text!r}: size {size!r} of {name} is not an integer"
            raise ValueError(msg) from None
        if out[name] == 0 or out[name] < -1:
            raise ValueError(f"--mesh {text!r}: {name}={out[name]}; sizes are >= 1 or -1")
    if not out:
        raise ValueError(f"--mesh {text!r}: name at least one axis, e.g. fsdp=-1")
    return out


def setup_mesh(p: argparse.ArgumentParser, args):
    """Connects the processes (if asked), then (mesh, rules) from the flags — (None, None) for
    one device. Bad flags are usage errors (exit 2) naming the flag."""
    from flaxlm.train.main import init_distributed

    if (args.num_processes != 1 or args.process_id != 0) and not args.coordinator:
        p.error("--num_processes / --process_id need --coordinator HOST:PORT")
    init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed)

    import jax

    text = args.mesh or ("data=-1" if jax.process_count() > 1 else "")
    if not text:
        return None, None
    try:
        return build_mesh(text, args.sharding)
    except (ValueError, KeyError) as e:
        p.error(f"{e.args[0] if e.args else e} (--mesh {text})")


def build_mesh(text: str, sharding: str):
    """(mesh, rules) of a `--mesh` text and a `--sharding` preset: a mesh of fewer devices than
    the machine has (no -1, one process) takes its first ones. ValueError / KeyError naming
    what is wrong."""
    import jax

    from flaxlm.models.sharding import logical_axis_rules, make_mesh

    shape = parse_mesh(text)
    devices = jax.devices()
    n = math.prod(shape.values())
    if -1 not in shape.values() and n < len(devices) and jax.process_count() == 1:
        devices = devices[:n]  # a mesh smaller than the machine: its first n devices
    return make_mesh(shape, devices), logical_axis_rules(sharding)


def is_writer() -> bool:
    """Whether this process prints results and writes files: process 0 (the only one alone)."""
    import jax

    return jax.process_index() == 0
