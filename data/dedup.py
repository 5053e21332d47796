"""Deduplication: exact (normalized-text hash), near-duplicate (MinHash + LSH), decontamination.

Rules, chosen so that one machine (``Deduper``, streaming) and many (``flaxlm.data.beam``,
group-by-key) keep exactly the same documents:

* exact: documents with the same normalized text (``normalize``: invisible characters removed,
  NFKC, case-folded, whitespace runs collapsed) form a cluster; the earliest (smallest
  ``Document.key``) survives.
* near: a document is a near-duplicate when one of its LSH band keys was produced by an earlier
  document (earlier among those that reached this stage, kept or not). With the banding chosen
  for the Jaccard threshold, a shared band key means "estimated Jaccard above the threshold" with
  the probability of the LSH S-curve; the tests measure the resulting precision and recall.
  ``threshold`` is where that curve rises, not a hard cut (signatures are never compared with
  it; the tables hold band keys only): with the defaults (0.8, 128 permutations → 9 bands × 13
  rows) a later document at Jaccard s is dropped with probability 1 - (1 - s^13)^9: 0.08 at 0.7,
  0.40 at 0.8, 0.69 at 0.85, 0.93 at 0.9, 0.998 at 0.95 (half-way at 0.82). Clusters are
  transitive: with A ~ B and B ~ C, C is dropped (by way of B) even when A and C are not similar.
  Documents without words (possible only without the Cleaner) share one signature, so all but
  the first of them are near duplicates.
* decontamination: a document sharing any ``decontam_ngram``-gram (13 words by default; CJK
  characters count as words) with the evaluation sets is dropped or flagged. An evaluation text
  or a document shorter than ``decontam_ngram`` words has no such n-gram and never matches: the
  report's ``decontam`` entry counts such eval texts, and a warning is logged when there are any.
  Words keep their attached punctuation ("paris," is not "paris"), as in the cleaning filters;
  n-grams run across line and paragraph breaks, but never across two eval items (a plain-text
  eval file holds one per line: ``decontam_txt_mode``). Eval texts may come in named sets
  (``decontam_benchmarks``: one per benchmark, data/benchmark_texts.py, and "decontam_paths"
  for the files): the report's ``decontam.sets`` then counts the documents each set matched
  (dropped, or flagged and kept), with the location and a shared n-gram of a few.

Both MinHash shingles and decontamination n-grams are made of ``match_words``: control and
invisible characters removed (``clean_text.remove_controls``: zero-width and format characters,
soft hyphens, variation selectors; the controls that separate text, such as form feed, become
whitespace), NFKC, case-folded, so text that differs only in Unicode form (NFC vs NFD,
full-width letters), case or invisible characters gives the same words.

Shingles are word n-grams (CJK characters are words), hashed deterministically (crc32 per word,
combined polynomially in uint64), so signatures agree across processes and machines. MinHash
uses multiply-shift hashing over numpy arrays (``method="numpy"``); ``method="datasketch"`` runs
the datasketch library instead. bench/data_throughput.py measures both (numbers in
bench/RESULTS.md); numpy is the default because it was the faster.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import unicodedata
import zlib
from collections import Counter

import ml_collections
import numpy as np

from flaxlm.data.clean_text import _WORD_RE, remove_controls
from flaxlm.data.source_readers import check_txt_mode
from flaxlm.data.stage_counts import REMOVED_EXAMPLES, count_removed, stage_report

logger = logging.getLogger("flaxlm")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier for polynomial combination


def dedup_config() -> ml_collections.ConfigDict:
    """Default deduplication settings (a ``dedup`` config section)."""
    c = ml_collections.ConfigDict()
    c.exact = True  # drop documents whose normalized text was seen before
    c.near = True  # drop near-duplicates (MinHash + LSH)
    c.ngram = 5  # shingle size in words (CJK: characters)
    c.num_perm = 128  # MinHash permutations (signature length)
    c.threshold = 0.8  # Jaccard where the LSH S-curve rises (module docstring: not a hard cut)
    c.bands = 0  # LSH bands; 0 = pick bands/rows minimising FP+FN area for `threshold`
    c.seed = 0  # seed of the MinHash permutations (same seed → same signatures everywhere)
    c.method = "numpy"  # "numpy" (vectorised multiply-shift) or "datasketch"
    c.decontam_paths = ""  # comma-separated eval files (jsonl/txt/parquet) to decontaminate against
    c.decontam_field = "text"  # text field of jsonl/parquet eval files
    # comma-separated PRESET:DIR (evaluation/benchmarks.py: mmlu:~/datasets/mmlu, gsm8k:DIR,
    # humaneval:DIR, ...): each benchmark's evaluated examples are eval items, beside (or
    # instead of) decontam_paths; the report counts the documents each matched
    c.decontam_benchmarks = ""
    # Plain-text eval files: one item per "line" (an eval set's usual layout), per
    # "blank"-separated block, or the whole "file" as one item. Items are what the report counts
    # (and warns of when shorter than decontam_ngram); n-grams never run across two items.
    c.decontam_txt_mode = "line"
    c.decontam_ngram = 13  # shared n-gram length (words; CJK characters) that flags a document
    c.decontam_mode = "drop"  # "drop" the document, or "flag" it (counted, kept)
    return c


def normalize(text: str) -> str:
    """What "the same text" means for exact dedup: control and invisible characters removed (as
    ``match_words`` and ``clean.normalize_text`` remove them), NFKC, case-folded, whitespace
    runs collapsed to one space. Without the removal, a copy with a zero-width space was not an
    exact duplicate when the Cleaner did not run first (``do_clean=False``), only a near one.
    """
    # Removed before NFKC (as in ``clean.normalize_text``): NFKC turns the Hangul filler U+3164
    # into U+1160, and a removed character between a letter and its accent kept them apart.
    return " ".join(_fold(text).split())


def _fold(text: str) -> str:
    """Unicode's NFKC_Casefold, less its removal of default-ignorables (``remove_controls`` does
    that): NFKC, case-folded, NFKC again — ``casefold`` decomposes a few letters (Greek ΐ, ΰ
    and their kin) that the upper-case text gives composed, so one NFKC left them unequal."""
    folded = unicodedata.normalize("NFKC", remove_controls(text)).casefold()
    return folded if folded.isascii() else unicodedata.normalize("NFKC", folded)


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=12).digest()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash over all 64 bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_WORD_HASH: dict[str, int] = {}  # crc32 per word; word frequencies are Zipfian, so this hits


def _word_hashes(words: list[str]) -> list[int]:
    if len(_WORD_HASH) > 4_000_000:  # bound the cache (~400 MB at most)
        _WORD_HASH.clear()
    hs = list(map(_WORD_HASH.get, words))  # C-level loop; misses come back as None
    if None in hs:
        for k, h in enumerate(hs):
            if h is None:
                hs[k] = _WORD_HASH[words[k]] = zlib.crc32(words[k].encode())
    return hs


def match_words(text: str) -> list[str]:
    """The words MinHash shingles and decontamination n-grams are made of.

    Control and invisible characters removed (what ``clean.normalize_text`` removes), NFKC,
    case-folded (``_fold``), then split like the cleaning filters (CJK characters one word
    each). Both sides of a comparison go through this, so an eval item or a copy in NFD,
    full-width letters or another case still matches (e.g. the Deduper used without the
    Cleaner, or ``do_clean=False``).
    """
    return _WORD_RE.findall(_fold(text))


def shingles(text: str, n: int) -> np.ndarray:
    """Deterministic uint64 hashes of the word n-grams of ``text`` (unique, sorted).

    Words are ``match_words(text)``. Shorter texts give one shingle of all their words; an empty
    text gives none.
    """
    return _hash_ngrams(match_words(text), n)


def _hash_ngrams(words: list[str], n: int) -> np.ndarray:
    return np.unique(_ngram_hashes(words, n))


def _ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """The hash of each word n-gram, in text order (the k-th starts at word k); fewer than
    ``n`` words give one hash of them all, none give none."""
    if not words:
        return np.zeros(0, np.uint64)
    h = np.array(_word_hashes(words), np.uint64)
    m = max(1, len(h) - n + 1)
    g = h[:m].copy()
    for k in range(1, min(n, len(h))):
        g = g * _MIX + h[k : k + m]
    with np.errstate(over="ignore"):
        return _mix64(g)


@functools.lru_cache(maxsize=32)
def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising false-positive + false-negative area.

    P(candidate | Jaccard s) = 1 - (1 - s^rows)^bands; FP area is its integral below the threshold,
    FN area the integral of its complement above it (equal weights). Every (bands, rows) pair is
    searched, not only rows = num_perm // bands (datasketch's search): fewer rows than fit can be
    better (0.8 with 128 permutations: 9 x 13, not 9 x 14).
    """
    lo, hi = np.linspace(0, threshold, 1001), np.linspace(threshold, 1, 1001)
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


class MinHasher:
    """MinHash signatures (uint32[num_perm]) by multiply-shift hashing, vectorised over docs."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)

    def signatures(self, shingle_sets: list[np.ndarray], chunk: int = 1 << 22) -> np.ndarray:
        """(N, num_perm) uint32; a document without shingles gets all-0xFFFFFFFF."""
        out = np.full((len(shingle_sets), self.num_perm), np.uint32(0xFFFFFFFF), np.uint32)
        i = 0
        while i < len(shingle_sets):  # groups of documents with ~chunk (perm, shingle) cells
            j, cells = i, 0
            while j < len(shingle_sets) and (
                j == i or cells + len(shingle_sets[j]) * self.num_perm <= chunk
            ):
                cells += len(shingle_sets[j]) * self.num_perm
                j += 1
            lens = np.array([len(s) for s in shingle_sets[i:j]])
            nz = np.flatnonzero(lens)
            if len(nz):
                x = np.concatenate([shingle_sets[i + k] for k in nz])
                # (P, S) layout: reducing along the contiguous axis is ~5x faster than (S, P).
                hv = np.multiply.outer(self.a, x)  # uint64, wraps mod 2^64
                hv += self.b[:, None]
                hv >>= np.uint64(32)  # multiply-shift: keep the high 32 bits
                starts = np.concatenate([[0], np.cumsum(lens[nz])[:-1]])
                out[i + nz] = np.minimum.reduceat(hv, starts, axis=1).T
            i = j
        return out


def datasketch_signatures(texts: list[str], n: int, num_perm: int, seed: int = 0) -> np.ndarray:
    """The same shingles fed to datasketch's MinHash (sha1 per shingle); for comparison."""
    from datasketch import MinHash

    out = np.empty((len(texts), num_perm), np.uint32)
    for i, t in enumerate(texts):
        words = match_words(t)
        grams = {" ".join(words[k : k + n]).encode() for k in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(list(grams))
        out[i] = m.hashvalues.astype(np.uint32)
    return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: hash of each band's rows, salted with the band index."""
    n = sigs.shape[0]
    x = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros((n, bands), np.uint64) + np.arange(bands, dtype=np.uint64)
        for r in range(rows):
            h = h * _MIX + x[:, :, r]
        return _mix64(h)


class Decontaminator:
    """Flags documents sharing an ``n``-gram with evaluation texts.

    ``summary()`` says what the eval set gave (texts, distinct n-grams, texts too short to have
    one) and ``warn()`` logs the texts that can never match: an eval set of short items (10-word
    questions against 13-grams) otherwise decontaminated nothing without a word.

    An eval text is a string, or a tuple of forms of one item (``preprocess.load_eval_texts``:
    with and without the lines line cleaning strips): the item's n-grams are those of all its
    forms, and it is too short when none has one.

    ``eval_texts`` is a list (one eval set), or {name: list} of named sets (a benchmark each,
    ``preprocess.load_eval_sets``): then ``matches`` says which sets a text overlaps, and
    ``summary`` gives each set's counts. One table of all the n-grams answers ``hits`` (every
    document); each set's own table is searched only for a document that hits."""

    def __init__(self, eval_texts, n: int = 13, ngram_key: str = "dedup.decontam_ngram",
                 cleaned: bool = True):  # fmt: skip
        # (what the warnings say: the setting to lower; whether the texts went through the
        # cleaning preprocess gives documents, whose report.md counts the short ones)
        self.n, self.ngram_key, self.cleaned = n, ngram_key, cleaned
        self.named = isinstance(eval_texts, dict)
        named = eval_texts if self.named else {"": eval_texts}
        self.sets = {name: _EvalSet(items, n) for name, items in named.items()}
        tables = [s.table for s in self.sets.values()]
        self.table = tables[0] if len(tables) == 1 else np.unique(np.concatenate(
            [np.zeros(0, np.uint64), *tables]))  # fmt: skip
        self.eval_texts = sum(s.eval_texts for s in self.sets.values())
        self.too_short = sum(s.too_short for s in self.sets.values())

    def summary(self, found: dict | None = None) -> dict:
        """The report's ``decontam`` entry (its ``dedup`` stage; Beam's the same). Named sets
        add ``sets``: each one's counts, and from ``found`` (what ``add_found`` summed) the
        documents it matched and a few examples."""
        out = {
            "eval_texts": self.eval_texts,
            "ngrams": int(len(self.table)),
            "too_short": self.too_short,
            "ngram": self.n,
        }
        if self.named:
            found = found or {}
            out["sets"] = {
                name: {**s.summary(), "documents": found.get(name, {}).get("documents", 0),
                       "examples": found.get(name, {}).get("examples", [])}
                for name, s in self.sets.items()
            }  # fmt: skip
        return out

    def warn(self) -> None:
        """Logs eval texts shorter than ``n`` words as the caller cleaned them (they never
        match; the rule is kept), and an eval set that gives no n-gram at all (decontamination
        then matches nothing); each named set's on its own."""
        if not self.named:
            _warn_short("dedup.decontam_paths", self.eval_texts, len(self.table), self.too_short,
                        self.n, self.ngram_key, self.cleaned)  # fmt: skip
            return
        for name, s in self.sets.items():
            _warn_short(f"decontamination against {name}", s.eval_texts, len(s.table),
                        s.too_short, self.n, self.ngram_key, self.cleaned)  # fmt: skip

    def hits(self, text: str) -> int:
        if not len(self.table):
            return 0
        return int(np.count_nonzero(_in_sorted(self.table, _ngrams_exact(text, self.n))))

    def matches(self, text: str) -> dict[str, str]:
        """{set name ("" for an unnamed set): the first n-gram of ``text`` it holds, as
        ``match_words`` spells it} for each set ``text`` shares an n-gram with."""
        words = match_words(text)
        if not len(self.table) or len(words) < self.n:
            return {}
        grams = _ngram_hashes(words, self.n)
        out = {}
        for name, s in self.sets.items():
            hit = _in_sorted(s.table, grams) if len(s.table) else ()
            if np.any(hit):
                k = int(np.argmax(hit))
                out[name] = " ".join(words[k : k + self.n])
        return out

    def found(self, loc: str, text: str) -> dict:
        """What one matched document adds to the named sets' counts (``add_found``):
        {set: {"documents": 1, "examples": ["loc: 'shared n-gram'"]}}; {} when unnamed."""
        if not self.named:
            return {}
        return {name: {"documents": 1, "examples": [f"{loc}: {gram!r}"]}
                for name, gram in self.matches(text).items()}  # fmt: skip


def add_found(total: dict, found: dict) -> None:
    """Adds ``Decontaminator.found``'s counts into ``total`` (examples capped as removed
    documents' are: ``REMOVED_EXAMPLES`` per set)."""
    for name, f in found.items():
        t = total.setdefault(name, {"documents": 0, "examples": []})
        t["documents"] += f["documents"]
        t["examples"] += f["examples"][: max(0, REMOVED_EXAMPLES - len(t["examples"]))]


class _EvalSet:
    """One eval set's sorted table of distinct n-grams and its counts."""

    def __init__(self, items, n: int):
        grams = [_item_ngrams(t, n) for t in items]
        self.table = np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)
        self.eval_texts = len(grams)
        self.too_short = sum(1 for g in grams if not len(g))  # fewer than n words: no n-gram

    def summary(self) -> dict:
        return {"eval_texts": self.eval_texts, "ngrams": int(len(self.table)),
                "too_short": self.too_short}  # fmt: skip


def _in_sorted(table: np.ndarray, grams: np.ndarray) -> np.ndarray:
    """Which of ``grams`` the sorted, non-empty ``table`` holds.

    A binary search per n-gram in the sorted table (np.unique made it): np.isin concatenated
    and sorted the whole eval table at every document, O(T log T) per document for T eval
    n-grams — quadratic when a large eval set meets a large corpus (16k documents against 1.6k
    eval items: 126 s, now 3 s)."""
    at = np.minimum(np.searchsorted(table, grams), len(table) - 1)
    return table[at] == grams


def _warn_short(what: str, texts: int, ngrams: int, short: int, n: int, key: str,
                cleaned: bool) -> None:  # fmt: skip
    """``Decontaminator.warn``'s messages for one eval set, named by ``what``."""
    after, report = (" after cleaning", "report.md") if cleaned else ("", "the report")
    if not texts:
        logger.warning("%s: no eval text (every record empty): decontamination matches nothing",
                       what)  # fmt: skip
    elif not ngrams:
        logger.warning(
            "%s: the %d eval text(s) give no %d-word n-gram (each is shorter than %s=%d words%s): "
            "decontamination matches nothing; lower %s to check them",
            what, texts, n, key, n, after, key,
        )  # fmt: skip
    elif short:
        logger.warning(
            "%s: %d of the %d eval text(s) are shorter than %s=%d words%s (no n-gram) and can "
            "never match (%s counts them); lower %s to check them",
            what, short, texts, key, n, after, report, key,
        )  # fmt: skip


def _item_ngrams(item, n: int) -> np.ndarray:
    """The n-grams of an eval text, or the union of those of its forms (a tuple)."""
    if isinstance(item, str):
        return _ngrams_exact(item, n)
    return np.unique(np.concatenate([np.zeros(0, np.uint64), *(_ngrams_exact(t, n) for t in item)]))


def _ngrams_exact(text: str, n: int) -> np.ndarray:
    """Only full n-grams (unlike ``shingles``, a text shorter than n gives none)."""
    words = match_words(text)
    if len(words) < n:
        return np.zeros(0, np.uint64)
    return _hash_ngrams(words, n)


class KeySet:
    """A growing set of fixed-size keys (uint64 band keys, 12-byte exact keys) in sorted numpy runs.

    Costs the key's size per distinct key (a Python ``set`` of ints or bytes costs ~70-90 bytes per
    entry); runs are merged like a binary counter, so a batch is looked up in O(log n) runs and
    the largest merge briefly holds ~2x the keys.
    """

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, self.dtype)
        order = np.argsort(keys.ravel())  # sorted queries walk each run in order (cache-friendly)
        q = keys.ravel()[order]
        hit = np.zeros(len(q), bool)
        for run in self._runs:
            hit |= run[np.minimum(np.searchsorted(run, q), len(run) - 1)] == q
        out = np.empty(len(q), bool)
        out[order] = hit
        return out.reshape(keys.shape)

    def add(self, keys: np.ndarray, present: np.ndarray | None = None) -> None:
        """Adds ``keys``; ``present`` (``contains(keys)``, if the caller has it) saves a lookup."""
        keys = np.asarray(keys, self.dtype)
        present = self.contains(keys) if present is None else present
        run = np.unique(keys[~np.asarray(present, bool)])  # each key is stored once
        while self._runs and len(self._runs[-1]) <= len(run):
            run = np.concatenate([self._runs.pop(), run])
            run.sort(kind="stable")  # timsort: a linear merge of the two sorted halves
            keep = np.empty(len(run), bool)
            keep[0] = True
            np.not_equal(run[1:], run[:-1], out=keep[1:])
            run = run[keep]
        if len(run):
            self._runs.append(run)


def _seen_in_earlier_row(keys: np.ndarray) -> np.ndarray:
    """(N, K) keys → (N,) bool: row i shares a key with some row j < i."""
    n, k = keys.shape
    _, first, inv = np.unique(keys.ravel(), return_index=True, return_inverse=True)
    row = np.repeat(np.arange(n), k)
    return (row[first][inv.ravel()] < row).reshape(n, k).any(1)


class Deduper:
    """Streaming dedup for one machine: ``keep(text)`` → bool; counts per reason.

    Memory grows with the number of documents, never with their text: ``KeySet`` tables of
    12 bytes per exact key and 8 bytes per LSH band key (``bands`` = 9 by default), ~90 bytes per
    document in all (~180 during the largest merge); ``table_bytes()`` reports it. For corpora
    beyond one machine use ``flaxlm.data.beam``, which applies the same rules with group-by-key.
    """

    def __init__(self, cfg: ml_collections.ConfigDict | None = None, eval_texts=None):
        self.cfg = cfg = cfg if cfg is not None else dedup_config()
        self.bands, self.rows = lsh_params(cfg)
        self.hasher = MinHasher(cfg.num_perm, cfg.seed)
        # None: no decontamination. A list, even an empty one (eval files of empty records),
        # decontaminates, and its summary and warnings say what the eval set gave.
        self.decontam = None
        self.eval_texts = eval_texts  # (as given: Beam ships them to its workers)
        self.decontam_found: dict = {}  # named eval sets: documents each matched (add_found)
        if eval_texts is not None:
            self.decontam = Decontaminator(eval_texts, cfg.decontam_ngram)
            self.decontam.warn()
        self._exact = KeySet("S12")
        self._bands = KeySet(np.uint64)
        self.seen = 0
        self.removed: Counter = Counter()
        self.flagged = 0
        self.examples: dict[str, list[str]] = {}

    def signatures(self, texts: list[str]) -> np.ndarray:
        if self.cfg.method == "datasketch":
            return datasketch_signatures(texts, self.cfg.ngram, self.cfg.num_perm, self.cfg.seed)
        if self.cfg.method != "numpy":
            raise ValueError(f"dedup.method must be numpy|datasketch, got {self.cfg.method!r}")
        return self.hasher.signatures([shingles(t, self.cfg.ngram) for t in texts])

    def keep_batch(self, texts: list[str], locs: list[str] | None = None) -> list[bool]:
        """Decisions for documents in order (batched so MinHash is vectorised over them)."""
        locs = locs or [""] * len(texts)
        out = [True] * len(texts)
        survivors, flagged = [], []
        exact_dup = np.zeros(len(texts), bool)
        if self.cfg.exact and texts:  # seen in an earlier batch, or earlier in this one
            keys = np.array([exact_key(t) for t in texts], "S12")
            present = self._exact.contains(keys)
            exact_dup = present | _seen_in_earlier_row(keys[:, None])
            self._exact.add(keys, present)
        for i, t in enumerate(texts):
            self.seen += 1
            reason = "exact_duplicate" if exact_dup[i] else None
            if reason is None and self.decontam is not None and self.decontam.hits(t):
                if self.cfg.decontam_mode == "drop":
                    reason = "contaminated"
                    add_found(self.decontam_found, self.decontam.found(locs[i], t))
                else:
                    flagged.append(i)
            if reason is None:
                survivors.append(i)
            else:
                self._drop(reason, locs[i], t)
                out[i] = False
        if self.cfg.near and survivors:
            keys = band_keys(self.signatures([texts[i] for i in survivors]), self.bands, self.rows)
            # A band key produced by an earlier document: of an earlier batch, or of this one.
            present = self._bands.contains(keys)
            dup = present.any(1) | _seen_in_earlier_row(keys)
            self._bands.add(keys, present)
            for i in np.flatnonzero(dup):
                self._drop("near_duplicate", locs[survivors[i]], texts[survivors[i]])
                out[survivors[i]] = False
        # Counted once the near stage has run: "flagged" documents are the kept ones (a flagged
        # near-duplicate of an earlier document is dropped as that, and not counted here).
        self.flagged += sum(out[i] for i in flagged)
        for i in (i for i in flagged if out[i]):  # (the sets' counts too)
            add_found(self.decontam_found, self.decontam.found(locs[i], texts[i]))
        return out

    def table_bytes(self) -> int:
        """Bytes held by the exact and LSH tables (what grows with the corpus)."""
        return self._exact.nbytes + self._bands.nbytes

    def _drop(self, reason: str, loc: str, text: str) -> None:
        count_removed(self.removed, self.examples, reason, f"{loc}: {text[:200]!r}")

    def report(self) -> dict:
        out = {
            **stage_report(self.seen, self.removed, self.examples),
            "flagged_contaminated": self.flagged,
            "lsh": {"bands": self.bands, "rows": self.rows, "threshold": self.cfg.threshold},
        }
        if self.decontam is not None:
            out["decontam"] = self.decontam.summary(self.decontam_found)
        return out


def lsh_params(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(bands, rows): ``cfg.bands`` with ``num_perm // bands`` rows, or ``optimal_bands``."""
    check_config(cfg)
    if cfg.bands:
        return cfg.bands, cfg.num_perm // cfg.bands
    return optimal_bands(cfg.threshold, cfg.num_perm)


def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Errors naming the key for settings that would silently do something else: more bands
    than permutations (0 rows: every band key equal, every document after the first a "near
    duplicate"), a misspelt ``decontam_mode`` (anything but "drop" only flagged) or
    ``decontam_txt_mode``."""
    if not (isinstance(cfg.num_perm, int) and cfg.num_perm >= 1):
        raise ValueError(f"dedup.num_perm must be an integer >= 1, got {cfg.num_perm!r}")
    if not 0 <= cfg.bands <= cfg.num_perm:
        raise ValueError(f"dedup.bands must be in [0, num_perm={cfg.num_perm}], got {cfg.bands}")
    if not 0 < cfg.threshold < 1:
        raise ValueError(f"dedup.threshold must be in (0, 1), got {cfg.threshold}")
    for key in ("ngram", "decontam_ngram"):
        if cfg[key] < 1:
            raise ValueError(f"dedup.{key} must be >= 1, got {cfg[key]}")
    check_txt_mode(cfg.decontam_txt_mode, "dedup.decontam_txt_mode")
    if cfg.decontam_mode not in ("drop", "flag"):
        raise ValueError(f"dedup.decontam_mode must be drop|flag, got {cfg.decontam_mode!r}")
    if cfg.method not in ("numpy", "datasketch"):
        raise ValueError(f"dedup.method must be numpy|datasketch, got {cfg.method!r}")
