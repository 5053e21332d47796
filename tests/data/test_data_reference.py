"""The data stage checked against references computed here, independently of the code under test.

Gopher n-gram repetition against a Counter-based implementation (and across hash seeds); PII
redaction of international phone formats, span by span; decontamination and MinHash shingles
under Unicode forms; the LSH S-curve against 1 - (1 - s^r)^b on shingle sets of known Jaccard;
the LSH banding against a brute-force search; tokenizer training on long CJK lines; the
preprocess accounting against a count of the input; resuming the loader at every batch.
"""

import collections
import json
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from flaxlm.data import clean, dedup, pipeline, preprocess
from flaxlm.data import tokenizer as T

# ---------------------------------------------------------------------------------------------
# Gopher n-gram repetition.


def ref_ngram_fracs(words, top_ns, dup_ns):
    """Gopher's rules spelled out: top n-gram = Counter.most_common (ties: first to occur)."""
    total = max(1, sum(map(len, words)))
    tops, dups = [], []
    for n in top_ns:
        grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        best = grams.most_common(1)
        k = best[0][1] if best else 0
        tops.append(sum(map(len, best[0][0])) * k / total if k > 1 else 0.0)
    for n in dup_ns:
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        c = collections.Counter(grams)
        covered = [False] * len(words)
        for i, g in enumerate(grams):
            if c[g] > 1:
                covered[i : i + n] = [True] * n
        dups.append(sum(len(w) for w, cv in zip(words, covered) if cv) / total)
    return tops, dups


def test_ngram_repetition_matches_a_counter_reference_including_ties():
    # Small vocabularies make ties for the most frequent n-gram common; a tie was broken by the
    # order of Python's (per-process salted) hash, so the fraction was that of an arbitrary one.
    rng = np.random.default_rng(0)
    vocab = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "ggggggg", "hhhhhhhh"]
    for top_ns, dup_ns in (((2, 3, 4), tuple(range(5, 11))), ((2, 3, 4, 5, 6), (5, 6, 7))):
        for _ in range(400):
            words = [str(w) for w in rng.choice(vocab[: rng.integers(1, 9)], rng.integers(0, 40))]
            got = clean._ngram_fracs(words, top_ns, dup_ns)
            exp = ref_ngram_fracs(words, top_ns, dup_ns)
            assert len(got[0]) == len(top_ns) and len(got[1]) == len(dup_ns), (words, got)
            np.testing.assert_allclose(got[0], exp[0], err_msg=str(words))
            np.testing.assert_allclose(got[1], exp[1], err_msg=str(words))


TIE_DOC = (
    "The river runs past the old mill and into the valley, where farmers have grown wheat for "
    "centuries. In spring the water rises with snow from the mountains, and the village gathers "
    "to watch the first boats of the season. Children learn to swim in the shallow bend below the "
    "bridge, and their grandparents remember when the mill still turned. "
    + " ".join(
        f"extraordinarily unquestionable {w} is it {w}{i}"
        for i, w in enumerate(["north", "south", "east", "west"])
    )
)

SEED_SCRIPT = """
import sys
from flaxlm.data import clean
s = clean.DocStats(clean.normalize_text(sys.argv[1]))
print(clean.first_failure(s, clean.clean_config()))
"""


def test_cleaning_decision_does_not_depend_on_the_hash_seed(tmp_path):
    # Two bigrams occur 4 times each: "extraordinarily unquestionable" (first, 30 characters)
    # and "is it". Which one is "the most frequent" decided keep/drop, and it followed the hash
    # seed: preprocess workers (spawned processes) or Beam workers disagreed with each other.
    words = clean.DocStats(TIE_DOC).words
    tops, _ = ref_ngram_fracs(words, (2, 3, 4), ())
    assert tops[0] > 0.20  # the reference: over Gopher's 0.20 for bigrams → "repetition"
    script = tmp_path / "seed.py"
    script.write_text(SEED_SCRIPT)
    got = {}
    for seed in ("0", "1", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, str(script), TIE_DOC],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        got[seed] = out.stdout.strip()
    assert set(got.values()) == {"repetition"}, got


# ---------------------------------------------------------------------------------------------
# PII.


def luhn(digits: str) -> bool:
    s = [int(c) for c in digits[::-1]]
    return (sum(s[0::2]) + sum(sum(divmod(2 * d, 10)) for d in s[1::2])) % 10 == 0


def test_chinese_mobile_with_country_code_is_not_hidden_by_the_card_pattern():
    # "86 138 1234 5678" has 13 digits: the card pattern matched first and, Luhn-invalid, was
    # left as it was, so the phone pattern (which allows the 86 prefix) never saw it.
    rng = np.random.default_rng(1)
    for i in range(150):
        num = "1" + str(rng.integers(3, 10)) + "".join(map(str, rng.integers(0, 10, 9)))
        prefix = ("86 ", "86-", "0086 ", "+86 ")[i % 4]
        body = (f"{num[:3]} {num[3:7]} {num[7:]}", num, f"{num[:3]}-{num[3:7]}-{num[7:]}")[i % 3]
        out, counts = clean.redact_pii(f"请拨打{prefix}{body}联系。")
        digits = "".join(c for c in prefix + body if c.isdigit())
        # A Luhn-valid 13+ digit run without '+' is a card number as far as anyone can tell.
        kind = "CARD" if prefix[0] != "+" and luhn(digits) else "PHONE"
        assert (out, dict(counts)) == (f"请拨打<{kind}>联系。", {kind: 1}), (prefix + body, out)


@pytest.mark.parametrize(
    "number",
    [
        "1-800-555-1234",  # North American, trunk prefix
        "1 415 555 2671",
        "1 (415) 555-2671",
        "+33 1 23 45 67 89",  # French, pairs
        "+91 98765 43210",  # Indian, 5+5
        "+49 30 12345678",
        "+44 20 7946 0958",
        "+1 (415) 555-2671",
        "(415) 555-2671",
    ],
)
def test_phone_formats_are_redacted_exactly(number):
    text = f"For bookings call {number}, or write."
    out, counts = clean.redact_pii(text)
    assert (out, dict(counts)) == ("For bookings call <PHONE>, or write.", {"PHONE": 1})


@pytest.mark.parametrize(
    "text",
    [
        "Version 10.0.19041 shipped on 2023-10-15 (15.10.2023, 10/15/2023) at 10:30:45.",
        "ISBN 978-3-16-148410-0, order 1234567890123, timestamp 1700000000000 ms.",
        "The score went +5 then +12.5% and +1234567 views, page 1 of 12.",
        "Card-like 4111 1111 1111 1112 fails the Luhn check.",
        "In 1999 1 200 people came; section 1.2.3 and rule 12-34.",
    ],
)
def test_ordinary_numbers_are_not_pii(text):
    assert clean.redact_pii(text) == (text, collections.Counter())


# ---------------------------------------------------------------------------------------------
# Decontamination and near-duplicate shingles under Unicode forms.

QUESTION = (
    "Quel écrivain français a publié à Paris en mille huit cent soixante deux le célèbre roman "
    "où Jean Valjean évolue"
)


def ref_words(text):
    """The documented matching form: NFKC, case-folded, invisible characters gone."""
    t = unicodedata.normalize("NFKC", text).casefold().replace("\u200b", "")
    return t.split()


def ref_shared_ngrams(a, b, n=13):
    wa, wb = ref_words(a), ref_words(b)
    ga = {tuple(wa[i : i + n]) for i in range(len(wa) - n + 1)}
    return len(ga & {tuple(wb[i : i + n]) for i in range(len(wb) - n + 1)})


@pytest.mark.parametrize(
    "form",
    [
        lambda q: unicodedata.normalize("NFD", q),  # e.g. text exported from macOS
        lambda q: q.upper(),
        # Words 7..12 are in every 13-gram of the 20-word item.
        lambda q: q.replace("mille", "ｍｉｌｌｅ"),  # full-width letters
        lambda q: q.replace("soixante", "soi\u200bxante"),  # a zero-width space
    ],
    ids=["nfd", "upper", "fullwidth", "zwsp"],
)
def test_eval_item_in_another_unicode_form_is_still_caught(form):
    # Eval files are read raw; training text has been through the Cleaner (NFC, controls
    # removed). An NFD eval item shared no 13-gram with its own NFC copy.
    train = "Voici une longue note de lecture. " + QUESTION + " et la suite du texte continue ici."
    train = clean.normalize_text(train)  # what the Deduper sees in preprocess
    near_miss = clean.normalize_text(" ".join(QUESTION.split()[8:]) + " et rien d'autre ici.")
    eval_item = form(QUESTION)
    assert ref_shared_ngrams(eval_item, train) > 0 and ref_shared_ngrams(eval_item, near_miss) == 0
    cfg = dedup.dedup_config()
    cfg.near = cfg.exact = False
    d = dedup.Deduper(cfg, eval_texts=[eval_item])
    assert d.keep_batch([train, near_miss]) == [False, True]


def test_near_duplicate_in_nfd_is_caught():
    rng = np.random.default_rng(2)
    vocab = ["été", "élève", "façade", "déjà", "crème", "naïve", "noël", "garçon", "où", "là"]
    vocab += [f"mot{i}" for i in range(300)]
    words = [str(w) for w in rng.choice(vocab, 300)]
    a = " ".join(words)
    w = list(words)
    w[100], w[101] = w[101], w[100]
    b = unicodedata.normalize("NFD", " ".join(w))  # one swap, then another Unicode form

    def jac(x, y, n=5):
        gx, gy = ref_words(x), ref_words(y)
        sx = {tuple(gx[i : i + n]) for i in range(len(gx) - n + 1)}
        sy = {tuple(gy[i : i + n]) for i in range(len(gy) - n + 1)}
        return len(sx & sy) / len(sx | sy)

    assert jac(a, b) > 0.95  # dropped with probability > 0.99 at the default banding
    cfg = dedup.dedup_config()
    cfg.exact = False
    assert dedup.Deduper(cfg).keep_batch([a, b]) == [True, False]


# ---------------------------------------------------------------------------------------------
# MinHash + LSH against theory.


def test_lsh_drop_probability_follows_the_s_curve():
    """Pairs of shingle sets with an exact Jaccard s: the fraction sharing a band key is
    1 - (1 - s^r)^b and the signature agreement estimates s, within sampling error."""
    d = dedup.Deduper()
    b, r = d.bands, d.rows
    rng = np.random.default_rng(3)
    union, pairs = 100, 800
    for s in (0.6, 0.7, 0.8, 0.9):
        k = int(round(s * union))
        sets = []
        for _ in range(pairs):
            v = rng.choice(2**62, union, replace=False).astype(np.uint64)  # distinct shingles
            half = k + (union - k) // 2
            sets += [np.unique(v[:half]), np.unique(np.concatenate([v[:k], v[half:]]))]
        sig = d.hasher.signatures(sets)
        keys = dedup.band_keys(sig, b, r)
        cand = (keys[0::2] == keys[1::2]).any(1).mean()
        p = 1 - (1 - s**r) ** b
        assert abs(cand - p) < 4 * np.sqrt(p * (1 - p) / pairs) + 0.005, (s, cand, p)
        agree = (sig[0::2] == sig[1::2]).mean()
        assert abs(agree - s) < 4 * np.sqrt(s * (1 - s) / (pairs * d.cfg.num_perm)), (s, agree)


def test_optimal_bands_is_the_brute_force_optimum():
    # The docstring promises the minimum over bands*rows <= num_perm; only rows = num_perm //
    # bands was searched, which gave 9x14 (not 9x13) for the default 0.8 / 128.
    from scipy.integrate import quad

    def area(t, b, r):
        fp = quad(lambda s: 1 - (1 - s**r) ** b, 0, t)[0]
        return fp + quad(lambda s: (1 - s**r) ** b, t, 1)[0]

    for t, perms in ((0.8, 128), (0.8, 64), (0.85, 64), (0.5, 128), (0.9, 128)):
        pairs = [(b, r) for b in range(1, perms + 1) for r in range(1, perms // b + 1)]
        best = min(pairs, key=lambda br: area(t, *br))
        assert dedup.optimal_bands(t, perms) == best, (t, perms)


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def test_long_cjk_lines_are_cut_not_dropped_from_tokenizer_training():
    # SentencePiece's max_sentence_length counts bytes and skips longer sentences; lines were
    # cut at that many *characters*, so every long Chinese line (3 bytes a character) vanished
    # from training and Chinese came out as byte pieces only.
    rng = np.random.default_rng(4)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 40)]
    zh = ["".join(rng.choice(han, 150)) for _ in range(150)]  # 150 characters, 450 bytes
    tok = T.train(["the river runs past the mill"] * 30 + zh, 500, max_sentence_length=300)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode(zh[0])]
    assert not any(p.startswith("<0x") for p in pieces), pieces[:8]
    assert tok.decode(tok.encode(zh[0])) == zh[0]


# ---------------------------------------------------------------------------------------------
# Preprocess accounting.


def en_doc(rng, n=80):
    """Random words that pass the default cleaning filters (stop words every 6th word)."""
    stop = ["the", "of", "and", "to", "that", "with"]
    ws = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 8)))
        for _ in range(n)
    ]
    ws[::6] = [stop[j % 6] for j in range(len(ws[::6]))]
    return " ".join(ws) + "."


def test_preprocess_accounting_counts_documents_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    rows = [json.dumps({"text": en_doc(rng)}) for _ in range(12)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows + ["{broken"]) + "\n")
    cfg = preprocess.preprocess_config()
    rep = preprocess.run([str(path)], str(tmp_path / "ok"), cfg)
    assert rep["documents_in"] == 13  # lines in the file: the reference
    assert rep["documents_out"] + sum(rep["removed"].values()) == 13

    class Lossy(clean.Cleaner):  # a stage that loses a document without counting it
        def clean(self, text, loc="", url=None):
            out = super().clean(text, loc, url)
            return (None, None) if loc.endswith(":3") else out

    monkeypatch.setattr(preprocess, "Cleaner", Lossy)
    with pytest.raises(AssertionError, match="does not add up"):
        preprocess.run([str(path)], str(tmp_path / "lossy"), cfg)


# ---------------------------------------------------------------------------------------------
# Loader: resume at every batch boundary.


@pytest.mark.parametrize("mode", ["split", "pad"])
def test_resume_at_every_batch_equals_the_uninterrupted_stream(tmp_path, mode):
    rng = np.random.default_rng(6)
    words = "the river runs past old mill into green valley".split()
    docs = [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(40)]
    tok_path = str(tmp_path / "tok.model")
    T.train(docs * 3, 400, model_path=tok_path)
    paths = []
    for name, part in (("a", docs[:25]), ("b", docs[25:])):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        paths.append(str(p))
    cfg = pipeline.data_config()
    cfg.sources, cfg.tokenizer, cfg.num_epochs = f"{paths[0]}:2,{paths[1]}:1", tok_path, 2
    cfg.pack_mode, cfg.read_threads, cfg.prefetch = mode, 1, 4

    def make():
        return pipeline.make_pretrain_iterator(
            cfg, seq_len=16, global_batch=4, seed=3, process_index=1, process_count=2
        )

    ref, states, batches = make(), [], []
    while True:
        states.append(json.loads(json.dumps(ref.get_state())))
        try:
            batches.append(next(ref))
        except StopIteration:
            break
    assert len(batches) > 10
    for k, st in enumerate(states):
        it = make()
        it.set_state(st)
        rest = list(it)
        assert len(rest) == len(batches) - k, k
        for x, y in zip(rest[:3], batches[k:]):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"resume at {k}: {key}")


def test_eval_item_with_pii_is_caught_in_a_redacted_training_document(tmp_path):
    # Training text is PII-redacted before dedup; eval text was not, so the copy of an eval item
    # holding an IP address and a phone number ("... <IP> ... <PHONE> ...") shared no 13-gram.
    rng = np.random.default_rng(7)
    item = (
        "Which service listens on the host at 192.168.10.20 port eighty when the admin calls "
        "+1 415 555 2671 for help today"
    )
    assert len(item.split()) == 21  # every 13-gram spans the IP or the phone number
    near_miss = " ".join(item.split()[:12])  # 12 words: shares no 13-gram
    docs = [
        en_doc(rng) + " " + item + " " + en_doc(rng),
        en_doc(rng) + " " + near_miss,
        en_doc(rng),
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": item}) + "\n")
    cfg = preprocess.preprocess_config()
    cfg.dedup.decontam_paths = str(tmp_path / "eval.jsonl")
    rep = preprocess.run([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), cfg)
    assert rep["stages"][1]["pii_redacted"] == {"IP": 2, "PHONE": 1}
    # The reference: the eval item is in document 0 and only there.
    assert rep["removed"] == {"contaminated": 1} and rep["documents_out"] == 2, rep["removed"]
