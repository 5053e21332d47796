"""metrics.jsonl reading: a run killed mid-write still reads (notebooks, sweep tables)."""

import json

from flaxlm.train.metrics import read_metrics


def test_read_metrics_skips_a_line_cut_short_by_a_kill(tmp_path):
    recs = [{"step": 10, "loss": 3.0}, {"step": 10, "eval/nll": 2.9}]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 20, "lo'  # SIGKILL mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(str(tmp_path)) == recs
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == recs
