"""train/curves.py: a run's final loss curve and the segments a rollback or resume superseded,
built here through train/metrics.py's own MetricWriter, checked by value (the lines drawn, not
pixels)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from flaxlm.train import curves  # noqa: E402
from flaxlm.train.metrics import MetricWriter  # noqa: E402


def _write(w, steps, base):
    for s in steps:
        w.write(s, {"loss": base + s})


@pytest.fixture
def run(tmp_path):
    """Steps 1-6 (loss 10+s), a rollback at 6 to checkpoint 3, steps 4-8 (loss 20+s) with an
    eval at 4, a resume from checkpoint 6, steps 7-8 (loss 30+s)."""
    w = MetricWriter(str(tmp_path), tensorboard=False)
    _write(w, range(1, 7), 10)
    w.rolled_back(6, 3, "loss spike")
    _write(w, range(4, 9), 20)
    w.write(4, {"eval/nll": 2.5})
    w.close()
    w = MetricWriter(str(tmp_path), resume_step=6, tensorboard=False)
    _write(w, (7, 8), 30)
    w.close()
    return str(tmp_path)


def test_loss_curves_are_the_final_run_and_one_segment_per_event(run):
    c = curves.loss_curves(run)
    assert c["train"] == [(1, 11), (2, 12), (3, 13), (4, 24), (5, 25), (6, 26), (7, 37), (8, 38)]
    assert c["eval"] == [(4, 2.5)]
    segs = [(s["event"], s["steps"], s["values"]) for s in c["superseded"]]
    assert segs == [("rollback", [4, 5, 6], [14, 15, 16]), ("resume", [7, 8], [27, 28])]
    assert c["superseded"][0]["reason"] == "loss spike"


def _lines(ax):
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()), ln.get_alpha())
            for ln in ax.get_lines()}  # fmt: skip


def test_plot_loss_overlays_superseded_segments_faint_and_labelled(run):
    fig, ax = plt.subplots()
    drawn = curves.plot_loss(ax, run)  # default: overlaid
    lines = _lines(ax)
    assert lines["train loss"][:2] == ([1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 24, 25, 26, 37, 38])
    assert lines["held-out nll"][:2] == ([4], [2.5])
    assert lines["superseded: rollback, steps 4–6"][:2] == ([4, 5, 6], [14, 15, 16])
    assert lines["superseded: resume, steps 7–8"][:2] == ([7, 8], [27, 28])
    assert all(lines[k][2] < 1 for k in lines if k.startswith("superseded"))  # faint
    assert lines["train loss"][2] is None  # the final curve fully opaque
    assert len(drawn["superseded"]) == 2
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)
    plt.close(fig)

    fig, ax = plt.subplots()
    drawn = curves.plot_loss(ax, run, superseded=False)
    assert sorted(_lines(ax)) == ["held-out nll", "train loss"] and drawn["superseded"] == []
    plt.close(fig)


def test_a_run_never_rolled_back_plots_only_its_curve(tmp_path):
    w = MetricWriter(str(tmp_path), tensorboard=False)
    _write(w, (1, 2), 10)
    w.close()
    fig, ax = plt.subplots()
    drawn = curves.plot_loss(ax, str(tmp_path))
    assert list(_lines(ax)) == ["train loss"] and drawn["superseded"] == []
    plt.close(fig)


def test_superseded_lines_without_a_step_are_skipped_and_a_step_again_starts_a_segment(tmp_path):
    """Lines of one event are one segment while their steps increase: a step seen again
    (steps 5, 6, 6) starts another; a line with a loss but no integer step is left out."""
    import json

    tag = {"event": "restart", "time": "t0", "reason": "r"}
    lines = [{"step": 5, "loss": 1.0}, {"step": 6, "loss": 2.0}, {"loss": 9.0},
             {"step": "7", "loss": 9.0}, {"step": 6, "loss": 3.0}]  # fmt: skip
    with open(tmp_path / "metrics.superseded.jsonl", "w") as f:
        for ln in lines:
            f.write(json.dumps({**ln, "superseded": tag}) + "\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    c = curves.loss_curves(str(tmp_path))
    assert [(s["steps"], s["values"]) for s in c["superseded"]] == [([5, 6], [1.0, 2.0]),
                                                                   ([6], [3.0])]  # fmt: skip
