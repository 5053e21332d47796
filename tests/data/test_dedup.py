"""Exact and near-duplicate removal (precision/recall on edited copies) and decontamination."""

import numpy as np
import pytest

from flaxlm.data import dedup

RNG = np.random.default_rng(0)
VOCAB = [f"w{i}" for i in range(3000)]
ZIPF = 1 / np.arange(1, len(VOCAB) + 1) ** 0.8
ZIPF /= ZIPF.sum()


def random_doc(rng, n):
    return list(rng.choice(VOCAB, n, p=ZIPF))


def edit(rng, words, kind):
    w = list(words)
    if kind == "swap":  # swap a few adjacent pairs
        for i in rng.integers(0, len(w) - 1, 2):
            w[i], w[i + 1] = w[i + 1], w[i]
    elif kind == "insert":
        for i in rng.integers(0, len(w), 2):
            w.insert(i, str(rng.choice(VOCAB)))
    elif kind == "truncate":
        w = w[: int(len(w) * 0.95)]
    elif kind == "heavy":  # a different document sharing its first half: not a duplicate
        w = w[: len(w) // 2] + random_doc(rng, len(w) // 2)
    return w


def jaccard(a, b, n=5):
    sa, sb = set(dedup.shingles(a, n).tolist()), set(dedup.shingles(b, n).tolist())
    return len(sa & sb) / len(sa | sb)


def make_set(rng, n_base=150, length=300):
    """Base documents followed by edited copies; truth = Jaccard to an earlier doc >= 0.8."""
    bases = [random_doc(rng, length) for _ in range(n_base)]
    docs, origin = [" ".join(b) for b in bases], list(range(n_base))
    for i, b in enumerate(bases):
        for kind in ("swap", "insert", "truncate", "heavy"):
            docs.append(" ".join(edit(rng, b, kind)))
            origin.append(i)
    truth = [False] * n_base
    for k in range(n_base, len(docs)):
        truth.append(jaccard(docs[k], docs[origin[k]]) >= 0.8)
    return docs, np.array(truth)


def test_near_dup_precision_recall():
    docs, truth = make_set(np.random.default_rng(1))
    cfg = dedup.dedup_config()
    cfg.exact = False
    d = dedup.Deduper(cfg)
    keep = np.array(d.keep_batch(docs))
    flagged = ~keep
    tp = int((flagged & truth).sum())
    precision = tp / max(1, flagged.sum())
    recall = tp / truth.sum()
    assert truth.sum() > 300 and (~truth[150:]).sum() >= 150  # both kinds present
    print(f"near-dup precision {precision:.3f} recall {recall:.3f} on {len(docs)} docs")
    assert precision >= 0.97, precision
    assert recall >= 0.95, recall
    assert keep[:150].all()  # the originals (earliest in each cluster) survive
    assert d.report()["removed"] == {"near_duplicate": int(flagged.sum())}


def test_near_dup_chinese_characters_are_shingle_units():
    rng = np.random.default_rng(2)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 800)]  # Han characters
    base = "".join(rng.choice(chars, 400))
    near = base[:200] + "的" + base[200:380]  # one insertion + truncation
    other = "".join(rng.choice(chars, 400))
    d = dedup.Deduper()
    assert d.keep_batch([base, near, other]) == [True, False, True]


def test_exact_dedup_normalizes_and_keeps_first():
    d = dedup.Deduper()
    docs = ["Hello   World\nagain", "hello world again", "ＨＥＬＬＯ world again", "other text"]
    assert d.keep_batch(docs, [f"f:{i}" for i in range(4)]) == [True, False, False, True]
    rep = d.report()
    assert rep["removed"] == {"exact_duplicate": 2}
    assert rep["in"] == rep["out"] + 2 and rep["examples"]["exact_duplicate"][0].startswith("f:1:")


def test_survivor_is_deterministic_across_batches():
    docs, _ = make_set(np.random.default_rng(3), n_base=30)
    whole = dedup.Deduper().keep_batch(docs)
    d = dedup.Deduper()
    pieces = [k for i in range(0, len(docs), 7) for k in d.keep_batch(docs[i : i + 7])]
    assert pieces == whole


def test_optimal_bands_put_the_s_curve_at_the_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = dedup.optimal_bands(t, 128)
        assert b * r <= 128
        midpoint = (1 / b) ** (1 / r)  # where P(candidate) rises through ~1/2
        assert abs(midpoint - t) < 0.08, (t, b, r, midpoint)


@pytest.mark.parametrize("method", ["numpy", "datasketch"])
def test_signatures_estimate_jaccard(method):
    rng = np.random.default_rng(4)
    a = random_doc(rng, 400)
    pairs = [(a, a[:300]), (a, a[:200] + random_doc(rng, 200)), (a, random_doc(rng, 400))]
    for x, y in pairs:
        tx, ty = " ".join(x), " ".join(y)
        if method == "numpy":
            h = dedup.MinHasher(256, seed=0)
            s = h.signatures([dedup.shingles(tx, 5), dedup.shingles(ty, 5)])
        else:
            s = dedup.datasketch_signatures([tx, ty], 5, 256)
        assert abs((s[0] == s[1]).mean() - jaccard(tx, ty)) < 0.08


def test_signatures_are_deterministic_and_batch_independent():
    texts = [" ".join(random_doc(RNG, n)) for n in (1, 3, 50, 400)] + [""]
    h = dedup.MinHasher(64, seed=7)
    sets = [dedup.shingles(t, 5) for t in texts]
    together = h.signatures(sets, chunk=64 * 10)  # forces several groups
    alone = np.concatenate([dedup.MinHasher(64, seed=7).signatures([s]) for s in sets])
    np.testing.assert_array_equal(together, alone)
    assert (together[-1] == 0xFFFFFFFF).all()  # empty document


def test_decontamination_drop_and_flag():
    question = (
        "what is the capital city of the small northern country that borders the sea and "
        "the mountains"
    )
    train = [
        "notes: " + question + " and more words follow here",  # shares 13+ words → contaminated
        " ".join(question.split()[:12]) + " unrelated tail words here now",  # only 12 → clean
        "完全无关的中文文本" * 5,
    ]
    cfg = dedup.dedup_config()
    cfg.near = False
    d = dedup.Deduper(cfg, eval_texts=[question, "今天北京的天气非常好我们一起去公园散步吧"])
    assert d.keep_batch(train) == [False, True, True]
    assert d.report()["removed"] == {"contaminated": 1}
    zh = dedup.Deduper(cfg, eval_texts=["今天北京的天气非常好我们一起去公园散步吧"])
    assert zh.keep_batch(["他说今天北京的天气非常好我们一起去公园散步吧。"]) == [False]
    cfg.decontam_mode = "flag"
    f = dedup.Deduper(cfg, eval_texts=[question])
    assert f.keep_batch(train) == [True, True, True] and f.report()["flagged_contaminated"] == 1


def test_flagged_count_is_of_the_kept_documents():
    """decontam_mode="flag" counts the flagged documents the output holds: a flagged document
    later dropped as a near duplicate was counted too ("kept: 2" of one document out)."""
    question = "the quick brown fox jumps over the lazy dog"
    base = " ".join(f"filler{k}" for k in range(40)) + " "
    cfg = dedup.dedup_config()
    cfg.decontam_mode, cfg.decontam_ngram = "flag", 5
    d = dedup.Deduper(cfg, eval_texts=[question])
    assert d.keep_batch([base + question, base + question.replace("dog", "cat")]) == [True, False]
    assert d.report()["flagged_contaminated"] == 1 and d.report()["removed"] == {
        "near_duplicate": 1}  # fmt: skip
    # Across batches too: the second batch's flagged near duplicate is not counted.
    assert d.keep_batch([base + question.replace("dog", "cow")]) == [False]
    assert d.report()["flagged_contaminated"] == 1


def test_case_folding_leaves_no_decomposed_letters():
    """casefold() decomposes Greek ΐ, ΰ (and kin); the upper-case text gave them composed, so
    text differing only in case was neither an exact nor a word-level match."""
    a = "Το προΐόν ΐ και ΰ ῒ ΐ ῗ ῢ ΰ ῧ"
    assert dedup.exact_key(a) == dedup.exact_key(a.upper()) == dedup.exact_key(a.lower())
    assert dedup.match_words(a) == dedup.match_words(a.upper())


def _reference_keep(d, texts):
    """The rule spelled out with Python sets, one document at a time (the previous tables)."""
    exact, bands, out = set(), set(), []
    for t in texts:
        k = dedup.exact_key(t)
        if k in exact:
            out.append(False)
        else:
            row = dedup.band_keys(d.signatures([t]), d.bands, d.rows)[0].tolist()
            out.append(not any(x in bands for x in row))
            bands.update(row)
        exact.add(k)
    return out


def test_compact_tables_keep_the_same_documents_in_8_bytes_per_band_key():
    # Dups within a batch, across batches, of dropped documents; the tables were Python sets
    # (~870 bytes per document measured at 400k documents), now sorted numpy runs.
    rng = np.random.default_rng(3)
    bases = [" ".join(random_doc(rng, 200)) for _ in range(120)]
    texts = []
    for _ in range(600):
        b = bases[int(rng.integers(len(bases)))]
        r = rng.random()
        texts.append(
            b
            if r < 0.3
            else b.upper()
            if r < 0.4
            else " ".join(edit(rng, b.split(), "swap"))
            if r < 0.7
            else " ".join(random_doc(rng, 60))
        )
    d = dedup.Deduper()
    got = []
    for i in range(0, len(texts), 37):  # batch edges fall everywhere
        got += d.keep_batch(texts[i : i + 37])
    assert got == _reference_keep(d, texts)
    assert d.removed["exact_duplicate"] > 100 and d.removed["near_duplicate"] > 50, d.removed
    assert d.table_bytes() == 12 * len(d._exact) + 8 * len(d._bands)
    assert len(d._exact) <= len(texts) and len(d._bands) <= d.bands * len(texts)
    ks, perm = dedup.KeySet(np.uint64), rng.permutation(1000).astype(np.uint64)
    for c in range(50):  # every key once, plus repeats of keys already stored
        ks.add(np.concatenate([perm[20 * c : 20 * c + 20], perm[: 20 * c + 1][-15:]]))
    assert len(ks) == 1000 and ks.nbytes == 8000 and len(ks._runs) <= 10
    assert ks.contains(np.arange(1002, dtype=np.uint64)).tolist() == [True] * 1000 + [False] * 2


def test_equal_rows_in_different_bands_make_different_keys():
    """All bands' keys go into one key set: without the band index in the hash, document A's
    band 0 and document B's band 1 holding the same rows would make B A's near-duplicate
    (dropping the salt survived the suite). Keys equal exactly when (band, rows) are equal."""
    from flaxlm.data.dedup import band_keys

    rows = np.array([1, 2, 3], np.uint32)
    a = np.concatenate([rows, [7, 8, 9]]).astype(np.uint32)
    b = np.concatenate([[4, 5, 6], rows]).astype(np.uint32)
    keys = band_keys(np.stack([a, b, a]), bands=2, rows=3)
    assert not np.intersect1d(keys[0], keys[1]).size
    np.testing.assert_array_equal(keys[0], keys[2])
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 3, (40, 6)).astype(np.uint32)  # many equal bands, by chance
    keys = band_keys(sigs, bands=2, rows=3)
    ref = [(j, tuple(s[3 * j : 3 * j + 3])) for s in sigs for j in range(2)]
    flat = keys.reshape(-1)
    for i in range(len(ref)):
        for k in range(len(ref)):
            assert (flat[i] == flat[k]) == (ref[i] == ref[k])
