"""Task accuracy across a sweep ("emergence" view): evaluate every run's final checkpoint on
multiple-choice tasks, and plot accuracy against compute next to the held-out loss.

    scores = evaluate_run(run_dir, world_dir, ["mc_facts_train", "mc_arithmetic"])  # tasks.json
    plot_emergence(rows, "emergence.png", tasks=["mc_facts_train", "mc_arithmetic"])

Accuracy is the evaluation harness's log-likelihood multiple choice (evaluation/harness.py,
`acc`: the choice with the highest summed log-probability as a continuation of the prompt) on the
built-in world's task files (data/synthetic.py writes eval/mc_*.jsonl). Results go to
`RUN/tasks.json`, which the sweep's run table reads as `task/<task>/<metric>` columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from flaxlm.train.sweep_table import TASKS_FILE

TASKS_SOURCE_FILE = "tasks.source.json"  # {step, limit} the cached tasks.json was computed at

DEFAULT_TASKS = ("mc_facts_train", "mc_facts_heldout", "mc_arithmetic")


def ensure_world(world_dir: str, heldout_docs: int = 0, preset: str = "demo", seed: int = 0):
    """Writes the built-in world (the one train/pretrain.py trains on) once; returns its dir.

    `heldout_docs` > 0 asks for that many held-out documents instead of the preset's 100 (the
    first 100 are the same; the world's corpus and tasks come from other random streams and do
    not change); 0 takes the world as it is. A world already written with another count gets
    its held-out file (and manifest) written again with the count asked for: the world is
    generated again, deterministically, in half a second, and everything else in it is checked
    to be unchanged (it used to keep its count silently: 100 documents where 1000 were asked).
    A world an older generator wrote (`synthetic.refresh_world`) is written again first."""
    from flaxlm.data import synthetic

    manifest_path = os.path.join(world_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        extra = {"n_heldout_text": heldout_docs} if heldout_docs else {}
        synthetic.write_world(world_dir, preset, seed, **extra)
        return world_dir
    synthetic.refresh_world(world_dir)  # (logged; the held-out check below compares formats)
    with open(manifest_path) as f:
        manifest = json.load(f)
    have = manifest.get("config", {}).get("n_heldout_text")
    if heldout_docs and have != heldout_docs:
        _rewrite_heldout(world_dir, manifest, heldout_docs)
    return world_dir


def _rewrite_heldout(world_dir: str, manifest: dict, heldout_docs: int) -> None:
    """Writes WORLD/heldout_text.jsonl with `heldout_docs` documents and the manifest to match,
    after checking that the world regenerated from the manifest's preset config and seed is the
    one on disk in everything but that count."""
    from flaxlm.data import synthetic

    cfg = dict(manifest["config"])
    cfg["task_weights"] = tuple(tuple(kw) for kw in cfg["task_weights"])
    have, cfg["n_heldout_text"] = cfg["n_heldout_text"], heldout_docs
    world = synthetic.build_world(synthetic.WorldConfig(**cfg), manifest["seed"])
    new = world.manifest()

    def rest(m: dict) -> dict:  # the manifest less the held-out count (JSON types)
        m = json.loads(json.dumps(m))
        del m["config"]["n_heldout_text"], m["counts"]["heldout_text"]
        return m

    if rest(manifest) != rest(new):
        raise ValueError(
            f"{world_dir}: has {have} held-out documents, {heldout_docs} were asked for, and "
            "regenerating it from its manifest gives another world; use another directory"
        )
    for name, text in (
        ("heldout_text.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in world.heldout_text)),
        ("manifest.json", json.dumps(new, indent=1, ensure_ascii=False)),
    ):  # fmt: skip
        path = os.path.join(world_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def evaluate_run(
    run_dir: str,
    world_dir: str,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    overwrite: bool = False,
) -> dict:
    """{task: metrics} of the run's latest checkpoint, cached in RUN/tasks.json.

    The cache is used only for the checkpoint step and `limit` it was computed with (recorded
    beside it in RUN/tasks.source.json): a run trained further since is evaluated again.
    """
    from flaxlm.train.checkpoint import load_model, read_meta

    path = os.path.join(run_dir, TASKS_FILE)
    source_path = os.path.join(run_dir, TASKS_SOURCE_FILE)
    step = read_meta(run_dir)[0]
    source = {"step": int(step), "limit": limit}
    if os.path.exists(path) and os.path.exists(source_path) and not overwrite:
        with open(path) as f:
            done = json.load(f)
        with open(source_path) as f:
            cached_source = json.load(f)
        if cached_source == source and all(t in done for t in tasks):
            return done
    from flaxlm.data.tokenizer import Tokenizer
    from flaxlm.evaluation.harness import Evaluator
    from flaxlm.evaluation.tasks import resolve_tasks

    cfg, params, meta = load_model(run_dir, step)
    tok_path = meta.get("tokenizer", "")
    if not os.path.exists(tok_path):  # the run directory moved since training
        tok_path = os.path.join(run_dir, "tokenizer.model")
    ev = Evaluator(cfg, params, Tokenizer.load(tok_path))
    out = {}
    for spec in resolve_tasks(list(tasks), world_dir):
        out[spec.name] = ev.run(spec, limit=limit)["metrics"]
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    with open(source_path, "w") as f:
        json.dump(source, f)
    return out


def chance_level(world_dir: str, task: str) -> float | None:
    """1 / number of choices of the task's first example (None if unreadable)."""
    try:
        from flaxlm.evaluation.tasks import resolve_tasks

        (spec,) = resolve_tasks([task], world_dir)
        with open(spec.file) as f:
            first = json.loads(f.readline())
        return 1.0 / len(first["choices"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        return None


def plot_emergence(
    rows: Sequence[dict],
    path: str,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    metric: str = "acc",
    compute_key: str = "flops",
    target: dict | None = None,
    chance: dict | None = None,
) -> str:
    """Held-out loss and task accuracy against training compute, one line per model size.

    Args:
      rows: run-table rows (train/sweep_table) with `n_params_nonembed`, `compute_key`,
        `heldout_loss` and `task/<task>/<metric>`.
      path: PNG to write.
      target: an extra row (the predicted bigger model), drawn as a star.
      chance: {task: chance accuracy}, drawn dashed.
    """
    runs = list(rows) + ([target] if target else [])
    sizes = sorted({float(r["n_params_nonembed"]) for r in runs})
    norm = LogNorm(min(sizes), max(sizes) * 1.0001)
    cmap = matplotlib.colormaps["viridis"]
    panels = [("heldout_loss", "held-out loss (nats/token)")]
    panels += [(f"task/{t}/{metric}", f"{t} {metric}") for t in tasks]
    fig = Figure(figsize=(4.2 * len(panels), 3.8))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for n in sizes:
            pts = sorted(
                (float(r[compute_key]), float(r[key]))
                for r in rows
                if float(r["n_params_nonembed"]) == n and r.get(key) not in (None, "")
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=cmap(norm(n)), ms=4, lw=1, label=f"N={n:.3g}")
        if target and target.get(key) not in (None, ""):
            ax.scatter([float(target[compute_key])], [float(target[key])], marker="*", s=160,
                       color=cmap(norm(float(target["n_params_nonembed"]))), edgecolor="k",
                       zorder=4, label="bigger model")  # fmt: skip
        task = key.split("/")[1] if key.startswith("task/") else None
        if task and chance and chance.get(task):
            ax.axhline(chance[task], color="0.5", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over < 1 decade
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("loss and task accuracy vs compute across the sweep", fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def accuracy_table(rows: Sequence[dict], tasks: Sequence[str], metric: str = "acc") -> list:
    """[(name, N, flops, acc per task...)] sorted by compute, for the report."""
    out = []
    for r in sorted(rows, key=lambda r: float(r["flops"])):
        accs = [r.get(f"task/{t}/{metric}") for t in tasks]
        out.append((r["name"], float(r["n_params_nonembed"]), float(r["flops"]), *accs))
    return out


def _finite(xs) -> np.ndarray:
    return np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
