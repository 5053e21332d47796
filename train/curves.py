"""A run's loss curves from its metric files, for notebooks (notebooks/inspect.ipynb).

`metrics.jsonl` holds the run as it finally went; a rollback, resume or restart moved the lines
of the steps it trained again to `metrics.superseded.jsonl` (train/metrics.py). `loss_curves`
returns both: the final curve, and one segment per superseding event (the steps it moved, in
the order the events happened). `plot_loss` draws them, the superseded segments faint and
labelled by event and steps, by default: they exist only after a rollback, resume or restart,
which is exactly when the final curve alone hides what happened (the loss spike a rollback
undid, the steps a restart threw away); a run without them plots as before.
"""

from __future__ import annotations

from flaxlm.train.metrics import read_metrics, read_superseded


def _points(recs, key):
    return [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]


def loss_curves(workdir: str, key: str = "loss", eval_key: str = "eval/nll") -> dict:
    """{"train": [(step, value)], "eval": [(step, value)], "superseded": [segment]} of a run.

    A segment is {"event", "reason", "time", "steps", "values"}: the `key` values of the lines
    one rollback/resume/restart moved aside (consecutive lines with the same tag, steps
    increasing), oldest event first; segments without a `key` value are left out."""
    recs = read_metrics(workdir)
    segments, tag, last = [], None, None
    for r in read_superseded(workdir):
        t = r.get("superseded") or {}
        t = (t.get("event", "?"), t.get("time", ""), t.get("reason", ""))
        step = r.get("step")
        if not isinstance(r.get(key), (int, float)) or not isinstance(step, int):
            continue  # an eval line, or a line cut short by a kill ({"unparsed": ...})
        if t != tag or last is None or step <= last:
            segments.append({"event": t[0], "time": t[1], "reason": t[2], "steps": [],
                             "values": []})  # fmt: skip
        segments[-1]["steps"].append(step)
        segments[-1]["values"].append(r[key])
        tag, last = t, step
    return {"train": _points(recs, key), "eval": _points(recs, eval_key), "superseded": segments}


def plot_loss(ax, workdir: str, superseded: bool = True, key: str = "loss") -> dict:
    """Plots the run's train loss and held-out NLL on the matplotlib axes `ax`.

    Args:
      superseded: overlay the superseded segments (faint, each labelled with its event and
        steps). A run without metrics.superseded.jsonl has none: only its curve is drawn.

    Returns:
      `loss_curves` of the run, with "superseded" the segments drawn ([] when off)."""
    curves = loss_curves(workdir, key)
    if not superseded:
        curves["superseded"] = []
    if curves["train"]:
        ax.plot(*zip(*curves["train"]), color="C0", label="train loss")
    if curves["eval"]:
        ax.plot(*zip(*curves["eval"]), "o-", color="C1", label="held-out nll")
    for i, seg in enumerate(curves["superseded"]):
        label = f"superseded: {seg['event']}, steps {seg['steps'][0]}–{seg['steps'][-1]}"
        ax.plot(seg["steps"], seg["values"], color=f"C{2 + i % 8}", alpha=0.35, lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token")
    ax.legend(fontsize=7)
    return curves
