"""Process reward model (alignment/prm.py, data/stepwise.py, evaluation/prm_scorer.py): the
label positions are the separators (decoded), with flaxlm's template and a Jinja one, and
truncation drops the cut steps' labels; the loss equals a float64 numpy BCE; a tiny PRM learns
the running-sum chains (held-out step accuracy well above the majority label); best-of-N with
--prm picks the all-right sample, each aggregation checked by hand; bad records name file:line
and bad settings their key; one step logs the same on a 1-device and an 8-device mesh."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import common, prm
from flaxlm.configs import prm as prm_config
from flaxlm.data import formats as F
from flaxlm.data import stepwise as SW
from flaxlm.data.sources import DataError
from flaxlm.data.synthetic_steps import chain_records
from flaxlm.evaluation import best_of_n as bon
from flaxlm.evaluation import prm_scorer as PS
from flaxlm.models.sharding import make_mesh
from flaxlm.train import loop
from flaxlm.train.checkpoint import read_meta
from flaxlm.train.metrics import read_metrics
from flaxlm.train.step import finish_metrics
from tests.alignment import rl_helpers as H

STEPS = ["1 + 1 = 2", "2 + 0 = 2", "2 + 1 = 4"]
RECORD = {"prompt": "Add 1, 1, 0 and 1.", "steps": STEPS, "labels": [True, 1, 0]}


@pytest.fixture(scope="module")
def template(cache_dir):
    c = ml_collections.ConfigDict({"data": common.data_config("", ""), "init_from": ""})
    c.data.world, c.data.builtin_vocab_size, c.data.cache_dir = "small", H.VOCAB, str(cache_dir)
    return F.training_template(common.resolve_tokenizer(c, {}))


def _render(template, recs, seq_len=64, **kw):
    report = SW.StepReport()
    out = SW.render_stepwise([(r, f"f.jsonl:{i + 1}") for i, r in enumerate(recs)], template,
                             seq_len, report=report, **kw)  # fmt: skip
    return out, report


def _chunks(tok, ids, pos, start):
    """The text of each step's ids: from after the previous label (or `start`) to its label."""
    bounds = [start, *(int(p) + 1 for p in pos)]
    return [tok.decode(ids[a:b]) for a, b in zip(bounds, bounds[1:])]


# ---------------------------------------------------------------------------------------------
# Label positions and truncation


def test_labels_sit_on_the_separators_and_truncation_drops_cut_steps(template):
    tok = template.tok
    (ex,), report = _render(template, [RECORD])
    ids, pos = ex["ids"], ex["pos"]
    start = int(np.flatnonzero(ids == template.headers["assistant"][0])[-1]) + 1
    assert [tok.decode([ids[p]]) for p in pos] == ["\n"] * 3  # the separator's token
    assert _chunks(tok, ids, pos, start) == [s + "\n" for s in STEPS]  # each step, then it
    assert ex["labels"].tolist() == [1, 1, 0] and ids[-1] == template.end_id
    assert report.steps == 3 and report.positive == 2 and report.steps_cut == 0
    # TRL's layout renders the same example
    trl = {"prompt": RECORD["prompt"], "completions": STEPS, "labels": [1, 1, 0]}
    (same,), _ = _render(template, [trl])
    assert np.array_equal(same["ids"], ids) and np.array_equal(same["pos"], pos)
    # the batch row: the ids themselves (no shift), labels exactly at those positions
    b = next(iter(SW.StepBatches([ex], seq_len=64, batch=2, pad_id=0, shuffle=False, num_epochs=1)))
    assert np.array_equal(b["tokens"][0, : len(ids)], ids) and b["valid"].tolist() == [1, 0]
    assert np.flatnonzero(b["step_mask"][0]).tolist() == pos.tolist()
    assert b["step_labels"][0, pos].tolist() == [1, 1, 0] and not b["step_mask"][1].any()
    # the final step (prm.train_on="last"): the last label position, kept whole
    assert ex["final"] and np.flatnonzero(b["final_step"][0]).tolist() == [pos[-1]]
    assert not b["final_step"][1].any()

    # Room for two steps: the third is cut with its label; the rest is the full render's prefix.
    (cut,), report = _render(template, [RECORD], seq_len=int(pos[1]) + 1)
    assert cut["pos"].tolist() == pos[:2].tolist() and cut["labels"].tolist() == [1, 1]
    # ... its last kept step is not the solution's outcome: no final step to train "last" on
    b = next(iter(SW.StepBatches([cut], seq_len=64, batch=1, pad_id=0, shuffle=False,
                                 num_epochs=1)))  # fmt: skip
    assert not cut["final"] and b["step_mask"].sum() == 2 and not b["final_step"].any()
    assert np.array_equal(cut["ids"], ids[: pos[1] + 1])
    assert (report.steps_cut, report.truncated, report.steps) == (1, 1, 2)
    assert report.to_dict()["steps_cut_examples"] == [
        "f.jsonl:1: the last 1 of 3 steps cut (their labels dropped)"
    ]
    # One token short of the first step: the prompt loses its oldest token (BOS kept) and only
    # the first step, still labelled at its separator, is kept.
    (left,), report = _render(template, [RECORD], seq_len=int(pos[0]))
    assert len(left["ids"]) == pos[0] and left["ids"][0] == template.prefix[0]
    assert left["pos"].tolist() == [pos[0] - 1] and tok.decode([left["ids"][-1]]) == "\n"
    assert np.array_equal(left["ids"][1:], ids[2 : pos[0] + 1])
    assert (report.steps_cut, report.truncated) == (2, 1)
    assert "1 prompt tokens cut from the left" in report.truncated_examples[0]
    # overlength=drop: nothing is cut, the example is dropped
    out, report = _render(template, [RECORD], seq_len=int(pos[1]) + 1, overlength="drop")
    assert out == [] and report.log.counts == {"too_long": 1}


CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("trim", [False, True])
def test_jinja_template_labels_the_separators_or_the_stop_id_when_it_trims(
        trim, tmp_path, byte_chat_tokenizer):  # fmt: skip
    """A Jinja template's text is tokenized once: the label is the token ending the separator.
    One that trims the answer (Llama 3's `| trim`) loses the final separator: that step is
    read at the turn's stop id, as at scoring time."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    body = "(message.content | trim)" if trim else "message.content"
    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "t"), CHATML.replace(
        "message.content", body)))  # fmt: skip
    t = F.training_template(tok)
    (ex,), _ = _render(t, [RECORD], seq_len=256)
    ids, pos = ex["ids"], ex["pos"]
    stop = tok.encode("<|im_end|>")[0]
    assert ids[-1] == stop
    text = [tok.decode([ids[p]]) for p in pos]
    start = len(tok.encode(t.text([{"role": "user", "content": RECORD["prompt"]}], True)))
    if trim:
        assert text[:2] == ["\n", "\n"] and pos[2] == len(ids) - 1
        assert _chunks(tok, ids, pos[:2], start) == [s + "\n" for s in STEPS[:2]]
    else:
        assert text == ["\n"] * 3 and _chunks(tok, ids, pos, start) == [s + "\n" for s in STEPS]
        assert pos[2] == len(ids) - 2  # the final separator, then <|im_end|>


# ---------------------------------------------------------------------------------------------
# The loss


def _bce_reference(x, y, m):
    """−[y log σ(x) + (1 − y) log(1 − σ(x))] averaged over the labelled positions, term by term
    in float64 with math's own log and exp (log σ(x) = −log(1 + e^−x), stable both ways)."""
    total, n = 0.0, 0
    for xi, yi, mi in zip(x.ravel().astype(float), y.ravel(), m.ravel()):
        if mi:
            log_p = -np.logaddexp(0.0, -xi)
            log_q = -np.logaddexp(0.0, xi)
            total -= yi * log_p + (1 - yi) * log_q
            n += 1
    return total / n


def test_loss_equals_a_float64_numpy_bce_over_the_labelled_steps():
    rng = np.random.default_rng(0)
    B, T = 6, 12
    logits = (3.0 * rng.standard_normal((B, T))).astype(np.float32)
    logits[0, 2] = 60.0  # saturated: its term must stay finite
    logits[1, 3] = -60.0
    labels = rng.integers(0, 2, (B, T)).astype(np.float32)
    labels[0, 2], labels[1, 3] = 0.0, 1.0
    mask = (rng.random((B, T)) < 0.4).astype(np.float32)
    mask[4] = 0.0  # a row with no labelled step
    valid = np.array([1, 1, 1, 1, 1, 0], np.float32)  # row 5: padding (its mask ignored)
    mask[:2, [2, 3]] = 1.0
    mask[5, :4] = 1.0
    batch = {"tokens": np.zeros((B, T), np.int32), "positions": np.zeros((B, T), np.int32),
             "segment_ids": np.ones((B, T), np.int32), "step_labels": labels,
             "step_mask": mask, "valid": valid}  # fmt: skip
    table = lambda params, tokens, positions, segment_ids: params["x"]  # noqa: E731
    loss, metrics = prm.prm_loss_fn(table)({"x": logits}, batch, None)
    metrics = finish_metrics(metrics)
    m = mask * valid[:, None]
    np.testing.assert_allclose(float(loss), _bce_reference(logits, labels, m), rtol=1e-5)
    assert np.isfinite(float(loss)) and float(metrics["weight"]) == m.sum()
    rows = [r for r in range(B) if m[r].any()]
    right = [(logits[r][m[r] > 0] > 0) == (labels[r][m[r] > 0] > 0.5) for r in rows]
    want_acc = np.concatenate(right).mean()
    np.testing.assert_allclose(float(metrics["step_accuracy"]), want_acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["label_mean"]), labels[m > 0].mean(), rtol=1e-6)

    def first_wrong(v):
        return next((i for i, ok in enumerate(v) if not ok), len(v))

    sol = first = 0
    for r in rows:
        y, p = labels[r][m[r] > 0] > 0.5, logits[r][m[r] > 0] > 0
        sol += y.all() == p.all()
        first += first_wrong(y) == first_wrong(p)
    np.testing.assert_allclose(float(metrics["solution_accuracy"]), sol / len(rows), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["first_error_accuracy"]), first / len(rows),
                               rtol=1e-6)  # fmt: skip
    assert 0 < sol < len(rows) and 0 < first < len(rows)  # the data tells right from wrong
    # the held-out (host) metrics agree with the step's
    host = prm.np_step_metrics(logits, labels, m)
    np.testing.assert_allclose(host["loss"], _bce_reference(logits, labels, m), rtol=1e-12)
    for k in ("step_accuracy", "solution_accuracy", "first_error_accuracy", "label_mean"):
        np.testing.assert_allclose(host[k], float(metrics[k]), rtol=1e-6, err_msg=k)
    p = labels[m > 0].mean()
    assert host["majority_accuracy"] == max(p, 1 - p) and host["steps"] == m.sum()


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("prm_runs")), cache_dir)


def _chains(path, n, seed, split):
    """Running-sum chains of 3-4 numbers in {0, 1}, "sum" and "carry" errors, half of the
    solutions wrong: what a tiny model learns within a couple of hundred steps."""
    recs = chain_records(n, seed=seed, split=split, max_operand=1)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(path), recs


@pytest.fixture(scope="module")
def trained(runs, cache_dir, tmp_path_factory):
    """(workdir, summary, held-out records) of a 200-step PRM run from the random SFT run."""
    root = tmp_path_factory.mktemp("prm_trained")
    train, _ = _chains(root / "train.jsonl", 1000, 1, "train")
    heldout, recs = _chains(root / "heldout.jsonl", 200, 2, "heldout")
    c = H.tiny(prm_config, cache_dir, **{
        "init_from": runs[0], "data.train": train, "data.eval": heldout, "seq_len": 64,
        "batch_size": 32, "total_steps": 200, "eval_every": 200, "log_every": 100,
        "ckpt_every": 200, "opt.lr": 3e-3, "opt.warmup_steps": 10, "opt.schedule": "constant",
    })  # fmt: skip
    workdir = str(root / "prm")
    _, summary = prm.run(c, workdir)
    return workdir, summary, recs


def test_a_tiny_prm_learns_which_steps_are_right(trained):
    workdir, summary, _ = trained
    ev = summary["eval"]
    # With half of the chains wrong the commoner label at every step position is "right", so
    # neither the majority label nor the position beats majority_accuracy; checking each step
    # alone reaches ~0.82 on this set, only seeing earlier errors too reaches 1.
    assert 0.6 < ev["eval/majority_accuracy"] < 0.75
    assert ev["eval/step_accuracy"] > ev["eval/majority_accuracy"] + 0.15, ev
    assert ev["eval/first_error_accuracy"] > 0.6, ev
    report = json.load(open(os.path.join(workdir, "data_report.json")))
    assert report["eval"]["used"] == 200 and report["train"]["steps"] > 2000
    _, meta = read_meta(workdir)
    assert meta["head"] == "scalar" and meta["prm"] == {"step_separator": "\n", "train_on": "all"}
    assert PS.prm_scorer(workdir).train_on == "all"


def test_scorer_probabilities_are_causal_and_best_of_n_picks_the_right_solution(
        trained, tmp_path, capsys):  # fmt: skip
    workdir, _, recs = trained
    score = PS.prm_scorer(workdir)
    rec = next(r for r in recs if len(r["steps"]) == 3)
    whole = score([rec["prompt"]], [rec["steps"]])[0]
    part = score([rec["prompt"]], [rec["steps"][:2]])[0]
    np.testing.assert_allclose(part, whole[:2], rtol=1e-5)  # a step never sees the next one
    # Three samples per held-out prompt: all right, a wrong sum, a wrong carry (one each).
    samples, want = [], {}
    for terms in {tuple(r["meta"]["terms"]) for r in recs if len(r["meta"]["terms"]) == 4}:
        prompt = f"Add {terms[0]}, {terms[1]}, {terms[2]} and {terms[3]}."
        total, right = terms[0], []
        for b in terms[1:]:
            right.append(f"{total} + {b} = {total + b}")
            total += b
        wrong_sum = right[:1] + [right[1][:-1] + str(int(right[1][-1]) + 1)]
        wrong_carry = [f"{terms[0] + 1} + {terms[1]} = {terms[0] + 1 + terms[1]}"]
        for steps in (wrong_sum, right, wrong_carry):
            samples.append({"prompt": prompt, "completion": "\n".join(steps)})
        want[prompt] = "\n".join(right)
    path = str(tmp_path / "samples.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    out = str(tmp_path / "best.jsonl")
    res = bon.main([path, "--prm", workdir, "--sft_out", out, "--out", str(tmp_path / "o.json")])
    assert res["prm_aggregate"] == "min" and res["step_separator"] == "\n"
    best = {r["messages"][0]["content"]: r["messages"][1]["content"]
            for r in map(json.loads, open(out))}  # fmt: skip
    assert len(want) >= 3 and best == want
    assert "process reward model" in capsys.readouterr().out
    # ... and as an outcome reward model it is refused (its head never read an answer's end)
    with pytest.raises(SystemExit, match="a process reward model"):
        bon.main([path, "--reward_model", workdir, "--sft_out", out])


class _HandSet(PS.PRMScorer):
    """A PRM whose step probabilities are set by hand: step text -> probability."""

    def __init__(self, table, train_on="all"):
        self.separator, self.table, self.train_on = "\n", table, train_on

    def __call__(self, prompts, step_lists):
        return [[self.table[s] for s in steps] for steps in step_lists]


def test_each_aggregation_scores_and_picks_as_computed_by_hand(tmp_path, monkeypatch):
    table = {"a1": 0.9, "a2": 0.9, "a3": 0.1, "b1": 0.6, "b2": 0.6, "b3": 0.6}
    # A: one bad step among good ones; B: three middling steps; C: blank, no step.
    samples = [
        {"prompt": "q", "completion": "a1\na2\n\na3\n"},
        {"prompt": "q", "completion": "b1\nb2\nb3"},
        {"prompt": "q", "completion": " "},
    ]
    want = {"min": (0.1, 0.6), "prod": (0.9 * 0.9 * 0.1, 0.6**3), "last": (0.1, 0.6),
            "mean": ((0.9 + 0.9 + 0.1) / 3, 0.6)}  # fmt: skip
    path = str(tmp_path / "s.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    monkeypatch.setattr(bon, "prm_scorer_from_flag", lambda run, batch: _HandSet(table))
    for how, (a, b) in want.items():
        assert PS.aggregate([0.9, 0.9, 0.1], how) == pytest.approx(a)
        flags = [] if how == "min" else ["--prm_aggregate", how]
        out, full = str(tmp_path / f"{how}.jsonl"), str(tmp_path / f"{how}.json")
        bon.main([path, "--prm", "runs/x", *flags, "--sft_out", out, "--out", full])
        scores = [x["score"] for x in json.load(open(full))["scores"]]
        np.testing.assert_allclose(scores, [a, b, 0.0], rtol=1e-12, err_msg=how)
        best = json.loads(open(out).read())["messages"][1]["content"]
        assert best == samples[0 if a > b else 1]["completion"], how  # mean picks A, others B
    # A run trained on final steps only (prm.train_on=last) is read at the last step unless
    # the flag says otherwise
    monkeypatch.setattr(bon, "prm_scorer_from_flag",
                        lambda run, batch: _HandSet(table, train_on="last"))  # fmt: skip
    res = bon.main([path, "--prm", "runs/x", "--sft_out", out, "--out", full])
    assert res["prm_aggregate"] == "last" and "(last over steps)" in res["scorer"]
    res = bon.main(
        [path, "--prm", "runs/x", "--prm_aggregate", "min", "--sft_out", out, "--out", full]
    )
    assert res["prm_aggregate"] == "min"
    assert PS.aggregate([], "min") == 0.0
    with pytest.raises(ValueError, match="aggregate='max'"):
        PS.aggregate([0.5], "max")


# ---------------------------------------------------------------------------------------------
# Bad input and settings


BAD = [
    ({"prompt": "q", "steps": ["a", "b"], "labels": [1]}, "label_count"),
    ({"prompt": "q", "steps": ["a"], "labels": [1, 0]}, "label_count"),
    ({"prompt": "q", "steps": ["a"], "labels": [1.5]}, "bad_label"),
    ({"prompt": "q", "steps": ["a"], "labels": [-0.25]}, "bad_label"),
    ({"prompt": "q", "steps": ["a"], "labels": [float("nan")]}, "bad_label"),
    ({"prompt": "q", "steps": ["a"], "labels": ["1"]}, "bad_label"),
    ({"prompt": "q", "steps": ["a"], "labels": [2]}, "bad_label"),
    ({"prompt": "q", "steps": ["a", "  "], "labels": [1, 1]}, "empty_step"),
    ({"prompt": "q", "steps": [], "labels": []}, "no_steps"),
    ({"prompt": "q", "labels": [1]}, "no_steps"),
    ({"prompt": "q", "steps": "a", "labels": [1]}, "bad_steps"),
    ({"prompt": "q", "steps": ["a\nb"], "labels": [1]}, "separator_in_step"),
    ({"prompt": "q", "steps": ["a"], "completions": ["a"], "labels": [1]}, "ambiguous_record"),
    ({"prompt": "q", "steps": ["a"]}, "missing_field"),
    ({"prompt": " ", "steps": ["a"], "labels": [1]}, "empty"),
]


def test_bad_records_name_their_file_and_line(template, tmp_path):
    path = tmp_path / "steps.jsonl"
    good = {"prompt": "q", "steps": ["a", "b"], "labels": [True, False]}
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in BAD) + json.dumps(good) + "\n")
    report = SW.StepReport()
    out = SW.render_stepwise(F.read_records(str(path), report), template, 64, report=report)
    assert len(out) == 1 and out[0]["labels"].tolist() == [1, 0]
    for i, (_, reason) in enumerate(BAD):
        assert f"{path}:{i + 1}: {reason}" in " ".join(report.log.examples[reason]), reason
    assert report.log.total == len(BAD)
    for i, (rec, reason) in enumerate(BAD):  # strict: the first bad record stops, named
        one = tmp_path / f"one{i}.jsonl"
        one.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(DataError, match=f"one{i}.jsonl:2: {reason}"):
            SW.render_stepwise(F.read_records(str(one), SW.StepReport(strict=True)), template,
                               64, report=SW.StepReport(strict=True))  # fmt: skip


@pytest.mark.parametrize("key, value, match", [
    ("prm.step_separator", "", "prm.step_separator=''"),
    ("data.overlength", "truncate_right", "data.overlength='truncate_right'"),
])  # fmt: skip
def test_bad_settings_name_their_key_before_anything_loads(key, value, match, cache_dir,
                                                          monkeypatch):  # fmt: skip
    def no_load(*a, **k):
        raise AssertionError("loaded before the settings were checked")

    monkeypatch.setattr(common, "resolve_source", no_load)
    c = H.tiny(prm_config, cache_dir, **{key: value})
    with pytest.raises(ValueError, match=match):
        prm.build_task(c, make_mesh({"data": -1}))


def test_best_of_n_prm_flags_and_runs_are_checked(runs, tmp_path, capsys):
    path = str(tmp_path / "s.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    args = [path, "--sft_out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit) as e:
        bon.main([*args, "--reward_model", runs[1], "--prm_aggregate", "min"])
    assert e.value.code == 2 and "--prm_aggregate needs --prm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bon.main([*args, "--prm", runs[0], "--prm_aggregate", "max"])
    assert e.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"--prm {runs[1]}: .*not a process-reward-model run"):
        bon.main([*args, "--prm", runs[1]])  # an outcome reward model
    with pytest.raises(SystemExit, match="--prm nowhere: not a run directory"):
        bon.main([*args, "--prm", "nowhere"])


# ---------------------------------------------------------------------------------------------
# Meshes


def test_one_step_logs_the_same_on_one_device_and_on_eight(runs, cache_dir, tmp_path):
    logged = {}
    for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        c = H.tiny(prm_config, cache_dir, **{
            "init_from": runs[0], "seq_len": 64, "batch_size": 8, "total_steps": 1,
            "log_every": 1, "eval_every": 0, "ckpt_every": 0, "data.eval": "",
            "mesh.data": len(devices),
        })  # fmt: skip
        mesh = make_mesh(dict(c.mesh), devices=devices)
        workdir = str(tmp_path / name)
        loop.run(c, workdir, prm.build_task(c, mesh, workdir), mesh=mesh)
        (rec,) = [r for r in read_metrics(workdir) if "loss" in r]
        logged[name] = rec
    keys = ("loss", "step_accuracy", "label_mean", "solution_accuracy", "first_error_accuracy",
            "weight", "grad_norm")  # fmt: skip
    assert len(jax.devices()) == 8 and logged["one"]["weight"] > 8
    for k in keys:
        np.testing.assert_allclose(logged["eight"][k], logged["one"][k], rtol=2e-5, err_msg=k)
