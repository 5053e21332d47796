"""scaling_report on a sweep some of whose planned runs have no row (crashed, cut short, never
started): the report names each and why, `--require_all` refuses to fit, and a one-variable law
whose exponent ran to its bound is a warning. A --target_json that is not JSON names its file."""

import json
import os
import re

import numpy as np
import pytest

from flaxlm.evaluation.scaling import MAX_EXPONENT
from flaxlm.evaluation.scaling_report import main as report_main

LAW = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
STEPS = (1000, 2000, 4000, 8000)


def _fake_sweep(root) -> list[str]:
    """A finished 4 N x 4 D sweep (sweep.json + metrics.jsonl + DONE) whose held-out loss is
    the law exactly; returns the run names in sweep order."""
    law = lambda n, d: LAW["E"] + LAW["A"] * n ** -LAW["alpha"] + LAW["B"] * d ** -LAW["beta"]
    runs = []
    for n in np.geomspace(1e7, 1e9, 4).astype(int).tolist():
        for steps in STEPS:
            d = steps * 512 * 1024
            name = f"run-n={n},total_steps={steps}"
            info = dict(total_steps=steps, n_params=n, n_params_nonembed=n, tokens=d)
            runs.append(dict(index=len(runs), name=name, overrides={"n": n, "total_steps": steps},
                             total_steps=steps, info=info))  # fmt: skip
            os.makedirs(root / name)
            loss = law(n, d)
            (root / name / "metrics.jsonl").write_text(
                json.dumps({"step": steps // 2, "loss": loss + 0.5}) + "\n"
                + json.dumps({"step": steps, "loss": loss, "eval/nll": loss}) + "\n"
            )  # fmt: skip
            (root / name / "DONE").write_text("{}")
    (root / "sweep.json").write_text(json.dumps({"config": "fake.py", "runs": runs}))
    return [r["name"] for r in runs]


def test_runs_without_a_row_are_named_and_require_all_refuses(tmp_path, capsys):
    """3 of 16 runs crashed half-way (no DONE, metrics stop at half their steps): the report
    fitted the other 13 with `warnings: []`, and L(D) put its exponent at the bound (10)."""
    root = tmp_path / "sw"
    names = _fake_sweep(root)
    # the longest runs of all but the second-smallest size: L(D)'s best loss at the largest D
    # is then a small model's, well above the law
    cut = [n for n in names if n.endswith("total_steps=8000") and "n=46415888," not in n]
    for name in cut:
        os.remove(root / name / "DONE")
        lines = (root / name / "metrics.jsonl").read_text().splitlines(keepends=True)
        (root / name / "metrics.jsonl").write_text(lines[0])
    out = tmp_path / "fit"
    report = report_main([str(root), "--n_boot", "0", "--out", str(out)])
    assert report["n_runs"] == 13
    assert [m["name"] for m in report["missing_runs"]] == cut
    assert all(m["status"] == "unfinished" for m in report["missing_runs"])
    for name in cut:
        (line,) = [w for w in report["warnings"] if name in w]
        assert "step 4000 of 8000" in line
    saved = json.load(open(out / "scaling_report.json"))
    assert saved["warnings"] == report["warnings"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in cut)
    # the one-variable law fitted on what is left: its exponent at the bound is a warning
    law_d = report["power_laws"]["D"]
    assert law_d["alpha"] >= MAX_EXPONENT * (1 - 1e-6)
    assert any(w.startswith("L(D): alpha") and "bound" in w for w in report["warnings"])

    with pytest.raises(SystemExit) as e:
        report_main([str(root), "--n_boot", "0", "--out", str(out), "--require_all"])
    assert "3 of 16 planned runs" in str(e.value) and all(n in str(e.value) for n in cut)
    # the whole sweep: nothing missing, nothing at a bound, and --require_all fits
    full = tmp_path / "full"
    _fake_sweep(full)
    report = report_main([str(full), "--n_boot", "0", "--out", str(out), "--require_all"])
    assert report["n_runs"] == 16 and report["missing_runs"] == []
    assert not any("not in the fit" in w or "bound" in w for w in report["warnings"])


def test_a_target_json_that_is_not_json_names_its_file(tmp_path):
    root = tmp_path / "sw"
    _fake_sweep(root)
    bad = tmp_path / "target.json"
    bad.write_text('{"tokens": \n')  # cut short
    with pytest.raises(SystemExit, match=re.escape(f"scaling_report: {bad}:2: invalid JSON")):
        report_main([str(root), "--n_boot", "0", "--target_json", str(bad)])


@pytest.mark.parametrize("field, value, why", [
    ("n_params_nonembed", "4e8x", "'n_params_nonembed' = '4e8x' is not a finite positive number"),
    ("n_params_nonembed", -4e8, "'n_params_nonembed' = -400000000.0 is not a finite positive"),
    ("tokens", None, "'tokens' = None is not a finite positive number"),
    ("heldout_loss", "n/a", "'heldout_loss' = 'n/a' is not a finite positive number"),
])  # fmt: skip
def test_a_target_value_that_is_no_positive_number_names_its_key(tmp_path, field, value, why):
    """(float()'s bare 'could not convert' without file or key; a negative N predicted NaN)"""
    root = tmp_path / "sw"
    _fake_sweep(root)
    target = {"n_params_nonembed": 4e8, "tokens": 1e10, field: value}
    (tmp_path / "t.json").write_text(json.dumps(target))
    with pytest.raises(SystemExit, match=re.escape(f"scaling_report: target: {why}")):
        report_main([str(root), "--n_boot", "0", "--target_json", str(tmp_path / "t.json")])
