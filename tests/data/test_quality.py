"""Reference-model perplexity filtering (data/quality.py): each document's perplexity equals the
one computed here from the model's logits, the thresholds drop what they say (strictly), the
preprocess report accounts for every document and shows the distribution, and bad settings are
refused naming the key before anything is written."""

import json
import math

import jax
import numpy as np
import pytest

from flaxlm.configs import pretrain as pretrain_config
from flaxlm.data import preprocess, quality
from flaxlm.evaluation.prompts import prefix_ids
from flaxlm.models.transformer import Transformer
from flaxlm.train import pretrain

SENTENCES = [
    "Kavo lives in Brel and works as a baker.",
    "The river flows past the old mill every spring.",
    "Mira keeps three goats and a small garden behind the house.",
]
GIBBERISH = "qzx vbn wqp lkj mnb zzq xkc pqw jhg fds " * 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny model trained on the built-in world (its tokenizer beside it)."""
    run = tmp_path_factory.mktemp("ref")
    c = pretrain_config.get_config("variant=tiny,runlocal=True")
    with c.unlocked():
        c.progress_bar = False
        c.total_steps, c.eval_every, c.ckpt_every, c.log_every = 20, 0, 20, 20
    pretrain.run(c, str(run))
    return str(run), quality.load_reference(str(run))


def _cfg(run, **kw):
    c = quality.quality_config()
    c.model = run
    for k, v in kw.items():
        c[k] = v
    return c


def _ppl_by_hand(ref, text, max_tokens):
    cfg, params, tok = ref
    seq = (prefix_ids(tok) + tok.encode(text))[:max_tokens]
    logits = Transformer(cfg).apply({"params": params}, np.asarray([seq[:-1]], np.int32))
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), -1)
    nll = -np.mean([logp[i, t] for i, t in enumerate(seq[1:])])
    return math.exp(nll)


def test_each_perplexity_is_the_models_over_the_documents_start(reference):
    run, ref = reference
    f = quality.QualityFilter(_cfg(run, max_tokens=24), ref)
    texts = [" ".join(SENTENCES), GIBBERISH, SENTENCES[0] * 5]
    got = f.perplexities(texts)
    for text, p in zip(texts, got):
        assert p == pytest.approx(_ppl_by_hand(ref, text, 24), rel=1e-4)
    assert got[0] < got[1]  # the world's text is likelier than letters at random
    assert np.isnan(f.perplexities([""])[0])  # BOS alone: nothing to predict
    # max_tokens past the model's context: its context (+1 for the first target), never a row
    # cut from the left
    ctx = ref[0].max_seq_len
    long = quality.QualityFilter(_cfg(run, max_tokens=4 * ctx), ref)
    text = " ".join(SENTENCES * 40)
    assert long.perplexities([text])[0] == pytest.approx(_ppl_by_hand(ref, text, ctx + 1), rel=1e-4)


def test_thresholds_drop_strictly_and_count_by_reason(reference):
    run, ref = reference
    texts = [" ".join(SENTENCES), GIBBERISH, " ".join(SENTENCES[::-1]), ""]
    ppl = quality.QualityFilter(_cfg(run), ref).perplexities(texts)
    # max_ppl at the world text's own perplexity: it passes (equal), the gibberish does not
    f = quality.QualityFilter(_cfg(run, max_ppl=float(max(ppl[0], ppl[2]))), ref)
    keep = f.keep_batch(texts, ["a:1", "a:2", "a:3", "a:4"])
    assert keep == [True, False, True, True]  # the empty one is unscored, and kept
    rep = f.report()
    assert rep["removed"] == {"perplexity_high": 1} and rep["in"] == 4 and rep["out"] == 3
    assert rep["unscored"] == 1 and rep["examples"]["perplexity_high"][0].startswith("a:2: ppl")
    low = quality.QualityFilter(_cfg(run, min_ppl=float(min(ppl[0], ppl[2])) + 1e-3), ref)
    assert low.keep_batch(texts[:3], ["b:1", "b:2", "b:3"]).count(False) == 1
    assert low.removed == {"perplexity_low": 1}


def test_histogram_percentiles_are_within_a_bin_of_numpy():
    rng = np.random.default_rng(0)
    ppl = np.exp(rng.normal(3.0, 1.0, 5000))
    h, other = quality.Histogram(), quality.Histogram()
    h.add(ppl[:2000])
    other.add(ppl[2000:])
    h.merge(other)
    for q, v in h.percentiles().items():
        want = np.percentile(ppl, int(q[1:]))
        assert v == pytest.approx(want, rel=0.05), q


def test_preprocess_filters_reports_and_accounts_for_every_document(reference, tmp_path):
    run, ref = reference
    rows = [" ".join(SENTENCES) + f" Entry {i}." for i in range(6)]
    rows += [GIBBERISH + str(i) for i in range(3)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    ppl = quality.QualityFilter(_cfg(run), ref).perplexities(rows)
    cut = float((ppl[:6].max() + ppl[6:].min()) / 2)
    assert ppl[:6].max() < cut < ppl[6:].min()
    out = tmp_path / "out"
    report = preprocess.main(["--input", str(src), "--output", str(out),
                              "--config.do_clean=False", "--config.dedup.near=False",
                              f"--config.quality.model={run}",
                              f"--config.quality.max_ppl={cut}"])  # fmt: skip
    assert report["documents_out"] == 6 and report["removed"] == {"perplexity_high": 3}
    stage = next(s for s in report["stages"] if s["stage"] == "quality")
    assert (stage["in"], stage["out"], stage["unscored"]) == (9, 6, 0)
    assert set(stage["perplexity"]) == {"p5", "p25", "p50", "p75", "p95"}
    assert [s["stage"] for s in report["stages"]] == ["read", "clean", "dedup", "quality",
                                                      "tokenize"]  # fmt: skip
    md = (out / "report.md").read_text()
    assert f"Perplexity under {run}" in md and "perplexity_high: 3" in md


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.quality.max_ppl=-1", r"quality.max_ppl=-1.0: a perplexity >= 0"),
        ("--config.quality.max_ppl=50", r"max_ppl / min_ppl are set but quality.model is empty"),
        ("--config.quality.model=/nonexistent/run", r"quality.model='/nonexistent/run': no such"),
        ("--config.quality.max_tokens=1", r"quality.max_tokens=1: an integer >= 2"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, override, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": GIBBERISH}) + "\n")
    with pytest.raises(SystemExit, match=message):
        preprocess.main(["--input", str(src), "--output", str(tmp_path / "out"), override])
    assert not (tmp_path / "out").exists()


def test_min_not_below_max_and_beam_are_refused(reference, tmp_path):
    run, _ = reference
    with pytest.raises(ValueError, match=r"min_ppl=9.0 >= quality.max_ppl=9.0"):
        quality.check_config(_cfg(run, min_ppl=9.0, max_ppl=9.0))
    beam = pytest.importorskip("flaxlm.data.beam")
    cfg = preprocess.preprocess_config()
    cfg.quality.model = run
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": GIBBERISH}) + "\n")
    with pytest.raises(ValueError, match=r"runs in the preprocess CLI .*not on Beam"):
        beam.check_settings([str(src)], cfg)


def _mixed_rows(n=9):
    """Documents of spread-out perplexities: fluent ones, gibberish, and halves of each."""
    rows = []
    for i in range(n):
        fluent, junk = " ".join(SENTENCES) + f" Entry {i}.", GIBBERISH + str(i)
        rows.append([fluent, junk, fluent[: 40 + 7 * i] + " " + junk[: 30 + 5 * i]][i % 3])
    return rows


def test_percentile_thresholds_hold_documents_back_until_calibrated(reference):
    run, ref = reference
    rows = _mixed_rows(9)
    ppl = quality.QualityFilter(_cfg(run), ref).perplexities(rows)
    assert len(set(ppl.round(6))) == 9  # (distinct, so the percentiles cut where they say)
    f = quality.QualityFilter(
        _cfg(run, max_ppl_percentile=60.0, min_ppl_percentile=20.0, calibration_docs=5), ref
    )
    items = [(t, f"in:{i + 1}", i) for i, t in enumerate(rows)]
    assert f.push(items[:3]) == []  # 3 scored < 5: held back
    released = f.push(items[3:6])  # 6 scored: the thresholds come from these six
    hi, lo = np.percentile(ppl[:6], 60), np.percentile(ppl[:6], 20)
    assert (f.max_ppl, f.min_ppl) == pytest.approx((hi, lo), rel=1e-9)
    assert released == [i for i in range(6) if lo <= ppl[i] <= hi]  # in order, held ones first
    assert f.push(items[6:]) == [i for i in range(6, 9) if lo <= ppl[i] <= hi]  # judged at once
    assert f.flush() == []
    rep = f.report()
    high, low = int((ppl > hi).sum()), int((ppl < lo).sum())
    assert rep["removed"] == {"perplexity_high": high, "perplexity_low": low}
    assert rep["thresholds"]["calibrated_on"] == 6 and rep["in"] == 9
    with pytest.raises(RuntimeError, match="push"):
        quality.QualityFilter(_cfg(run, max_ppl_percentile=50.0), ref).keep_batch(rows, rows)


def test_preprocess_with_a_percentile_calibrates_on_a_small_corpus_at_the_end(reference, tmp_path):
    """Fewer documents than calibration_docs: calibrated on all of them when the input ends,
    and the kept ones written in input order."""
    run, ref = reference
    rows = _mixed_rows(9)
    ppl = quality.QualityFilter(_cfg(run), ref).perplexities(rows)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out = tmp_path / "out"
    args = ["--config.do_clean=False", "--config.dedup.near=False", "--config.batch_docs=2",
            f"--config.quality.model={run}", "--config.quality.max_ppl_percentile=50"]  # fmt: skip
    report = preprocess.main(["--input", str(src), "--output", str(out), *args])
    median = np.median(ppl)
    assert report["documents_out"] == int((ppl <= median).sum()) == 5
    from flaxlm.data import sources

    kept = [d.text for d in sources.iter_documents(str(out / "text"))]
    assert kept == [t for t, p in zip(rows, ppl) if p <= median]
    md = (out / "report.md").read_text()
    assert "Thresholds from the percentiles of the first 9 documents scored: max_ppl" in md
    assert "(p50)" in md


@pytest.mark.parametrize("kw, message", [
    (dict(max_ppl=50.0, max_ppl_percentile=70.0), "max_ppl_percentile are both set"),
    (dict(max_ppl_percentile=100.0), r"max_ppl_percentile=100.0: a percentile in \[0, 100\)"),
    (dict(max_ppl_percentile=30.0, min_ppl_percentile=30.0), "min_ppl_percentile=30.0 >= "),
    (dict(max_ppl_percentile=30.0, calibration_docs=0), "calibration_docs=0: an integer >= 1"),
])  # fmt: skip
def test_bad_percentile_settings_are_refused(reference, kw, message):
    with pytest.raises(ValueError, match=message):
        quality.check_config(_cfg(reference[0], **kw))


def test_an_hf_checkpoint_is_a_reference_too(reference, tmp_path):
    """The same model exported to HF scores the same (its tokenizer travels with it)."""
    from flaxlm.models import hf

    run, ref = reference
    out = str(tmp_path / "hf")
    hf.export_run(run, out)
    texts = [" ".join(SENTENCES), GIBBERISH]
    want = quality.QualityFilter(_cfg(run), ref).perplexities(texts)
    got = quality.QualityFilter(_cfg(f"hf:{out}")).perplexities(texts)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("mesh,sharding,devices", [("data=-1", "fsdp", 8),
                                                   ("data=2,fsdp=4", "fsdp", 8),
                                                   ("tensor=2", "fsdp_tp", 2)])  # fmt: skip
def test_a_mesh_scores_as_one_device(reference, mesh, sharding, devices):
    """Every device scoring its rows (data), the weights split over devices (fsdp, tensor):
    the same perplexities as on one device."""
    run, ref = reference
    texts = [" ".join(SENTENCES), GIBBERISH, SENTENCES[1], "x"]
    want = quality.QualityFilter(_cfg(run), ref).perplexities(texts)
    f = quality.QualityFilter(_cfg(run, mesh=mesh, sharding=sharding))
    assert f.scorer.mesh.size == devices
    np.testing.assert_allclose(f.perplexities(texts), want, rtol=1e-5)


def test_a_bad_mesh_is_refused_naming_the_keys():
    c = quality.quality_config()
    c.mesh = "dta=2"
    with pytest.raises(ValueError, match=r"quality.mesh='dta=2', quality.sharding='fsdp': 'dta=2'"):
        quality.check_config(c)
    c.mesh, c.sharding = "data=-1", "zero"
    with pytest.raises(ValueError, match=r"quality.sharding='zero': .*unknown sharding preset"):
        quality.check_config(c)
