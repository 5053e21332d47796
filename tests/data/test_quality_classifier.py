"""The trained quality classifier (data/quality_classifier.py) and its cleaning filter: it tells
the built-in world's text from the same words shuffled (only bigrams can), trains the same
bytes from the same seed, its features are the ones a plain re-implementation of the hashing
gives, its file round-trips and a bad one is named with its key, and cleaning drops exactly the
documents scored below the threshold, counts them, and reports the scores' distribution."""

import json
import math
import random
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest

from flaxlm.data import clean, preprocess, synthetic
from flaxlm.data import quality_classifier as qc

BUCKETS = 1 << 16
M64 = (1 << 64) - 1


def salad(text: str, rng: random.Random) -> str:
    """The text's words in random order: the same unigrams, other bigrams."""
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """English world text (biographies and stories) and word salad of other such texts, as
    training files; a held-back set of both to clean; a classifier trained on the files."""
    d = tmp_path_factory.mktemp("qc")
    w = synthetic.build_world("demo", seed=0)
    english = [r["text"] for r, lab in zip(w.pretrain, w.pretrain_labels)
               if lab["content"] in ("bio", "story") and lab["noise"] is None]  # fmt: skip
    rng = random.Random(0)
    pos, neg = english[:300], [salad(t, rng) for t in english[300:600]]
    # documents to clean, never trained on: texts and their salads the heuristics both keep
    heuristics = clean.Cleaner(_clean_cfg(""))
    pairs = ((t, salad(t, rng)) for t in english[600:700])
    pairs = [p for p in pairs if all(heuristics.clean(x)[0] is not None for x in p)]
    docs = [x for p in pairs[:30] for x in p]
    paths = {"pos": _jsonl(d / "pos.jsonl", pos), "neg": _jsonl(d / "neg.jsonl", neg)}
    clf, summary = qc.train_classifier(paths["pos"], paths["neg"], buckets=BUCKETS, heldout=0.2)
    path = str(d / "clf.npz")
    qc.save_classifier(clf, path)
    return {"dir": d, "paths": paths, "clf_path": path, "summary": summary, "docs": docs}


# ---------------------------------------------------------------------------------------------
# A plain re-implementation of the features and the score (the file format's definition)


def _mix(x: int) -> int:  # splitmix64's finaliser
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def plain_features(words, buckets):
    """{bucket: value}: uni- and bigrams of crc32 word hashes, combined h1 × golden + h2, salted
    n × 0x5851F42D4C957F2D, mixed, modulo buckets; counts over their L2 norm."""
    h = [zlib.crc32(w.encode()) for w in words]
    salt = 0x5851F42D4C957F2D
    grams = [_mix((a + salt) & M64) for a in h]
    grams += [_mix((a * 0x9E3779B97F4A7C15 + b + 2 * salt) & M64) for a, b in zip(h, h[1:])]
    counts = Counter(g % buckets for g in grams)
    norm = math.sqrt(sum(c * c for c in counts.values()))
    return {b: c / norm for b, c in counts.items()}


def plain_score(path, text):
    """The score from the file's raw arrays and ``plain_features`` (cleaning's words: the
    normalized text lowercased, split as the filters split it)."""
    with np.load(path) as z:
        w, bias = z["weights"], float(z["bias"])
    words = clean._WORD_RE.findall(clean.normalize_text(text).lower())
    logit = bias + sum(float(w[b]) * v for b, v in plain_features(words, len(w)).items())
    return 1 / (1 + math.exp(-logit))


def test_words_are_the_cleaning_filters_lowercased():
    assert qc.tokens("Hello, World! 你好。Ok") == ["hello,", "world!", "你", "好", "ok"]
    assert qc.tokens("Hello World", lowercase=False) == ["Hello", "World"]


@pytest.mark.parametrize("text", [
    "The river runs past the old mill, and the mill runs past the river.",
    "她住在北京，是一名老师。 She lives in Beijing.",
    "one",
    "",
    "Ünïcödé WORDS words Words words",
])  # fmt: skip
def test_features_match_a_plain_reimplementation(text):
    words = qc.tokens(text)
    idx, val = qc.doc_features(words, BUCKETS)
    want = plain_features(words, BUCKETS)
    assert idx.dtype == np.int32 and list(idx) == sorted(want)
    assert val == pytest.approx([want[b] for b in sorted(want)], rel=1e-12)
    if words:
        assert float(np.dot(val, val)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Training


def test_bigrams_separate_world_text_from_its_words_shuffled(world):
    held = world["summary"]["heldout"]
    assert held["documents"] == 120 and held["positives"] == 60
    assert held["auc"] > 0.95 and held["accuracy"] > 0.9 and held["precision_at_10pct"] == 1.0
    clf = qc.load_classifier(world["clf_path"])
    assert clf.config["training"]["heldout_metrics"] == held  # recorded in the file
    assert clf.config["training"]["positive"]["documents"] == 300
    # unigrams alone see the same words on both sides: no better than chance
    uni, summary = qc.train_classifier(world["paths"]["pos"], world["paths"]["neg"],
                                       buckets=BUCKETS, ngrams=1, heldout=0.2)  # fmt: skip
    assert summary["heldout"]["auc"] < 0.75


def test_training_is_deterministic(world, tmp_path):
    def train(seed, name):
        clf, _ = qc.train_classifier(world["paths"]["pos"], world["paths"]["neg"],
                                     buckets=BUCKETS, max_docs=100,
                                     fit_settings=qc.FitSettings(seed=seed))  # fmt: skip
        qc.save_classifier(clf, str(tmp_path / name))
        return clf

    a, b, c = train(1, "a.npz"), train(1, "b.npz"), train(2, "c.npz")
    assert a.weights.tobytes() == b.weights.tobytes() and a.bias == b.bias
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert a.weights.tobytes() != c.weights.tobytes()  # another seed: another order, split
    assert a.config["training"]["positive"]["documents"] == 100  # max_docs per side


def test_the_cli_trains_and_scores(world, tmp_path, capsys):
    pos, neg = world["paths"]["pos"], world["paths"]["neg"]
    out, metrics = str(tmp_path / "clf.npz"), tmp_path / "m.json"
    summary = qc.main(["train", "--positive", pos, "--negative", neg, "--out", out,
                       "--buckets", str(BUCKETS), "--epochs", "2", "--metrics", str(metrics),
                       "--max_docs", "50"])  # fmt: skip
    assert json.loads(metrics.read_text()) == summary
    assert summary["heldout"]["documents"] == 10 and summary["sha256"] == (
        qc.load_classifier(out).sha256
    )
    docs = _jsonl(tmp_path / "docs.jsonl", world["docs"])
    scored = qc.main(["score", out, docs, "--out", str(tmp_path / "s.jsonl")])
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert scored["documents"] == len(rows) == len(world["docs"])
    assert rows[0]["loc"].endswith("docs.jsonl:1")
    clf = qc.load_classifier(out)
    assert [r["score"] for r in rows] == [round(clf.score(t), 6) for t in world["docs"]]
    want = np.percentile([clf.score(t) for t in world["docs"]], 90)
    assert scored["score_percentiles"]["p90"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(SystemExit, match="--positive: no documents read"):
        qc.main(["train", "--positive", _jsonl(tmp_path / "e.jsonl", []), "--negative", neg,
                 "--out", str(tmp_path / "x.npz")])  # fmt: skip
    with pytest.raises(SystemExit, match=r"--heldout=0.9: a fraction"):
        qc.main(["train", "--positive", pos, "--negative", neg, "--out", out, "--heldout", "0.9"])


# ---------------------------------------------------------------------------------------------
# The file


def test_save_load_round_trip(world, tmp_path):
    clf = qc.load_classifier(world["clf_path"])
    copy = str(tmp_path / "copy.npz")
    qc.save_classifier(clf, copy)
    back = qc.load_classifier(copy)
    assert back.weights.dtype == np.float32 and back.weights.tobytes() == clf.weights.tobytes()
    assert back.bias == clf.bias and back.config == clf.config
    assert back.sha256 == clf.sha256  # the same bytes
    text = world["docs"][0]
    assert back.score(text) == clf.score(text) == pytest.approx(plain_score(copy, text), 1e-9)


def _rewrite(src, dst, **change):
    """A copy of classifier file ``src`` with arrays replaced (None: left out)."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return str(dst)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _config_with(src, **fields):
    with np.load(src) as z:
        cfg = json.loads(str(z["config"]))
    return np.array(json.dumps({**cfg, **fields}))


def test_a_bad_file_is_named_with_its_key(world, tmp_path):
    src = world["clf_path"]
    weights = qc.load_classifier(src).weights
    bad = {
        "garbage": (lambda p: _write(p, b"not a classifier"), "not a quality"),
        "truncated": (lambda p: _write(p, open(src, "rb").read()[:300]), "npz"),
        "no_weights": (lambda p: _rewrite(src, p, weights=None), "key 'weights' missing"),
        "f64": (lambda p: _rewrite(src, p, weights=weights.astype(np.float64)),
                "key 'weights' is float64"),
        "short": (lambda p: _rewrite(src, p, weights=weights[:10]), r"key 'weights' .*\(10,\)"),
        "nan": (lambda p: _rewrite(src, p, weights=np.full_like(weights, np.nan)),
                "key 'weights' holds non-finite"),
        "bias": (lambda p: _rewrite(src, p, bias=np.array([1.0, 2.0])), "key 'bias'"),
        "json": (lambda p: _rewrite(src, p, config=np.array("{oops")), "key 'config' is not JSON"),
        "format": (lambda p: _rewrite(src, p, config=_config_with(src, format="x")),
                   "key 'config': format 'x'"),
        "newer": (lambda p: _rewrite(src, p, config=_config_with(src, version=99)),
                  "key 'config': version 99 is newer"),
        "hash": (lambda p: _rewrite(src, p, config=_config_with(src, hash="md5")),
                 "key 'config': hash='md5'"),
    }  # fmt: skip
    for name, (make, says) in bad.items():
        path = make(tmp_path / f"{name}.npz")
        with pytest.raises(qc.ClassifierError, match=says) as e:
            qc.load_classifier(path)
        assert path in str(e.value), name
    npy = tmp_path / "one.npy"
    np.save(npy, weights)
    with pytest.raises(qc.ClassifierError, match="one .npy array"):
        qc.load_classifier(str(npy))
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(qc.ClassifierError, match="key 'config' missing"):
        qc.load_classifier(str(tmp_path / "empty.npz"))
    with pytest.raises(FileNotFoundError):
        qc.load_classifier(str(tmp_path / "none.npz"))


# ---------------------------------------------------------------------------------------------
# Cleaning


def _clean_cfg(path, min_score=0.0):
    c = clean.clean_config()
    c.min_words = 10  # (the world's documents are short)
    c.classifier, c.classifier_min_score = path, min_score
    return c


def test_cleaner_drops_exactly_the_documents_below_the_threshold(world):
    path, docs = world["clf_path"], world["docs"]
    scores = np.array([plain_score(path, t) for t in docs])
    assert len(set(scores)) == len(docs)
    order = np.sort(scores)
    cut = float((order[24] + order[25]) / 2)  # between two documents' scores
    c = clean.Cleaner(_clean_cfg(path, cut))
    kept = [c.clean(t, f"d:{i}")[0] is not None for i, t in enumerate(docs)]
    assert kept == list(scores >= cut) and sum(kept) == len(docs) - 25
    assert c.removed == {"classifier_low": 25}
    assert c.examples["classifier_low"][0].startswith("d:")
    # counted for the report: every document the heuristics kept was scored
    section = c.report()["classifier"]
    assert section["scored"] == len(docs) and section["min_score"] == cut
    assert section["sha256"] == qc.load_classifier(path).sha256
    # a document scored exactly at the threshold passes
    at = qc.load_classifier(path).score(docs[3])
    exact = clean.Cleaner(_clean_cfg(path, at))
    assert exact.clean(docs[3])[0] is not None and exact.removed == {}


def test_scores_merge_across_workers_and_percentiles_are_within_a_bin(world):
    path, docs = world["clf_path"], world["docs"]
    whole, a, b = (clean.Cleaner(_clean_cfg(path)) for _ in range(3))
    for i, t in enumerate(docs):
        whole.clean(t)
        (a if i % 2 else b).clean(t)
    a.merge(b)
    assert a.report()["classifier"] == whole.report()["classifier"]
    assert a.removed == {} and a.report()["out"] == len(docs)  # no threshold: all kept
    scores = [plain_score(path, t) for t in docs]
    logit = lambda p: math.log(p / (1 - p))
    for q, v in whole.report()["classifier"]["score_percentiles"].items():
        want = float(np.percentile(scores, int(q[1:]), method="inverted_cdf"))
        assert abs(logit(v) - logit(want)) <= 0.01, q  # within one bin of the log-odds
    # Beam's bundles carry the bins as a dict; the same histogram back
    bins = qc.ScoreHistogram.from_sparse(whole.scores.sparse())
    assert (bins.counts == whole.scores.counts).all()


def test_preprocess_reports_the_scores_and_drops_below_the_threshold(world, tmp_path):
    path, docs = world["clf_path"], world["docs"]
    src = _jsonl(tmp_path / "in.jsonl", docs)
    base = ["--input", src, "--config.dedup.near=False", "--config.clean.min_words=10",
            f"--config.clean.classifier={path}"]  # fmt: skip
    report = preprocess.main([*base, "--output", str(tmp_path / "all")])
    assert report["documents_out"] == len(docs) and report["removed"] == {}
    section = report["stages"][1]["classifier"]
    assert section["min_score"] is None and section["scored"] == len(docs)
    assert section["path"] == path and section["sha256"] == qc.load_classifier(path).sha256
    md = (tmp_path / "all" / "report.md").read_text()
    p90 = section["score_percentiles"]["p90"]
    assert f"--config.clean.classifier_min_score={p90:g} keeps about the top 10 %" in md
    # the p90 as the threshold: about the top 10 % kept (to the bin)
    scores = np.array([plain_score(path, t) for t in docs])
    report = preprocess.main([*base, "--output", str(tmp_path / "top"),
                              f"--config.clean.classifier_min_score={p90}"])  # fmt: skip
    dropped = int((scores < p90).sum())
    assert report["removed"] == {"classifier_low": dropped} and 50 <= dropped <= 56
    assert report["documents_out"] == len(docs) - dropped
    md = (tmp_path / "top" / "report.md").read_text()
    assert f"classifier_min_score={p90:g} dropped {dropped}" in md


@pytest.mark.parametrize("override, says", [
    ("clean.classifier=/nonexistent/clf.npz", r"^clean.classifier: cannot read '/nonexist"),
    ("clean.classifier={garbage}", r"^clean.classifier: .*garbage.npz: not a quality"),
    ("clean.classifier_min_score=0.5", "classifier_min_score=0.5 is set but clean.classifier is"),
    ("clean.classifier_min_score=1e999", r"classifier_min_score=inf: a score in \[0, 1\]"),
    ("clean.classifier_min_score=-0.1", r"classifier_min_score=-0.1: a score in \[0, 1\]"),
])  # fmt: skip
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, override, says):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 no zip")
    src = _jsonl(tmp_path / "in.jsonl", ["some text " * 20])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=says):
        preprocess.main(["--input", src, "--output", str(out),
                         "--config." + override.format(garbage=garbage)])  # fmt: skip
    assert not out.exists()
    cfg = clean.clean_config()
    cfg.classifier_min_score = float("nan")
    with pytest.raises(ValueError, match="clean.classifier_min_score=nan"):
        clean.Cleaner(cfg)


def test_beam_reports_what_the_cli_reports(world, tmp_path):
    beam = pytest.importorskip("flaxlm.data.beam")
    path, docs = world["clf_path"], world["docs"]
    src = _jsonl(tmp_path / "in.jsonl", docs)
    cut = float(np.median([plain_score(path, t) for t in docs]))
    over = [
        "--config.dedup.near=False",
        "--config.clean.min_words=10",
        f"--config.clean.classifier={path}",
        f"--config.clean.classifier_min_score={cut}",
    ]
    ref = preprocess.main(["--input", src, "--output", str(tmp_path / "cli"), *over])
    got = beam.main(["--input", src, "--output", str(tmp_path / "beam"), *over,
                     "--num_shards=1", "--runner=DirectRunner"])  # fmt: skip
    assert got["removed"] == ref["removed"] == {"classifier_low": len(docs) // 2}
    assert got["stages"][1]["classifier"] == ref["stages"][1]["classifier"]
    # bundles' bins add up as the workers' histograms do
    halves = [clean.Cleaner(_clean_cfg(path)) for _ in range(2)]
    for i, t in enumerate(docs):
        halves[i % 2].clean(t)
    merged = beam.merge_stats(
        {"bins": halves[0].scores.sparse()}, {"bins": halves[1].scores.sparse()}
    )
    halves[0].merge(halves[1])
    assert qc.ScoreHistogram.from_sparse(merged["bins"]).counts.tolist() == (
        halves[0].scores.counts.tolist()
    )


def test_max_docs_is_a_seeded_uniform_sample_of_the_whole_stream(tmp_path):
    n, k = 40, 10
    texts = [f"document number{i} of the stream" for i in range(n)]
    path = _jsonl(tmp_path / "d.jsonl", texts)
    feats = dict(buckets=BUCKETS, ngrams=1, lowercase=True)
    position = {qc._features(t, **feats)[0].tobytes(): i for i, t in enumerate(texts)}

    def sample(seed):
        side = qc.read_side(path, **feats, max_docs=k, seed=(seed,))
        assert side.seen == n and len(side.idx) == len(side.val) == k
        return [position[idx.tobytes()] for idx in side.idx]

    first = sample(0)
    assert first == sorted(first) and max(first) >= k  # read order, and not the head
    assert sample(0) == first and sample(1) != first  # seeded
    # the digest is over the sampled documents' digests, in read order
    side = qc.read_side(path, **feats, max_docs=k, seed=(0,))
    want = qc.hashlib.sha256()
    for i in first:
        data = texts[i].encode()
        want.update(qc.hashlib.sha256(len(data).to_bytes(8, "little") + data).digest())
    assert side.sha.hexdigest() == want.hexdigest()
    # every position is taken with probability k / n: 400 samples, 100 expected each (sd 8.7)
    counts = Counter(i for seed in range(400) for i in sample(seed))
    assert set(counts) == set(range(n)) and max(abs(c - 100) for c in counts.values()) < 40
    # max_docs 0 (or at least n): every document, in read order
    for m in (0, n, n + 5):
        side = qc.read_side(path, **feats, max_docs=m)
        assert [position[idx.tobytes()] for idx in side.idx] == list(range(n))


def test_the_file_records_how_many_documents_each_side_read(world):
    clf, _ = qc.train_classifier(world["paths"]["pos"], world["paths"]["neg"], buckets=BUCKETS,
                                 max_docs=100, fit_settings=qc.FitSettings(epochs=1))  # fmt: skip
    for side in ("positive", "negative"):
        rec = clf.config["training"][side]
        assert rec["documents"] == 100 and rec["read"] == 300
