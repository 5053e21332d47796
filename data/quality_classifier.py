"""A trained quality classifier: a linear model on hashed word uni- and bigrams that tells
reference text from web text, and keeps the documents it scores highest.

DCLM (Li et al. 2024) compared the quality filters of open corpora and found one best of all: a
fastText classifier on word bigrams trained to tell instruction data and ELI5 answers
(positives) from random web pages (negatives), keeping the top 10 % of the pool by its score
(FineWeb-Edu's filter is the same idea with an embedding model's regression head, at far more
cost). This module is that classifier in numpy:

* features: the words cleaning counts (``clean_text._WORD_RE``: a CJK character is a word, so
  Chinese needs no segmenter and its character bigrams act as words), lowercased, of the text
  after ``normalize_text``; each uni- and bigram hashed into ``buckets`` (words by crc32 as
  dedup hashes them, n-grams combined and mixed by splitmix64: the same buckets in every
  process and on every machine, which Python's salted ``hash`` is not). A document is its
  n-gram counts scaled to unit L2 norm, so a long page and a short one weigh alike.
* model: logistic regression, a weight per bucket and a bias; a document's score is the
  probability of "positive". Trained by minibatch SGD with fastText's schedule (the learning
  rate falls linearly to 0), L2 regularisation applied exactly to every weight at each step
  (through one scale factor for the whole vector, so a step costs only its documents' n-grams:
  Bottou's trick for sparse SGD), the two classes weighted to count alike. Seeded: the same
  inputs and seed give the same file, byte for byte.
* held out: a stratified ``heldout`` fraction of each class, never trained on; the file records
  its accuracy, AUC and precision among the 10 % it scores highest.
* file: one .npz (``weights`` float32, ``bias``, ``config``: a JSON string with the format,
  version, feature settings, label names, training settings and statistics, and the sha256 of
  the documents of each side). ``load_classifier`` checks every part: a file that is not one is
  a ``ClassifierError`` naming the file and the key.

Cleaning applies it (data/clean.py, ``clean.classifier`` and ``clean.classifier_min_score``) to
each document its heuristics keep, on the text they judged (after line cleaning, before PII
redaction); the report gives the scores' percentiles to choose the threshold from (DCLM's top
10 %: the p90). Training reads its inputs with data/source_readers.py (every format preprocess
reads); memory holds the features, about 8 bytes per distinct n-gram of each document.

    python -m flaxlm.data.quality_classifier train --positive 'good/*.jsonl' \\
        --negative 'web/*.jsonl' --out clf.npz [--max_docs 100000] [--epochs 5]
    python -m flaxlm.data.quality_classifier score clf.npz 'docs/*.jsonl' --out scores.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
import zipfile
import zlib

import numpy as np

from flaxlm.data.clean_text import _WORD_RE, normalize_text
from flaxlm.data.dedup import _MIX, _mix64, _word_hashes
from flaxlm.data.quality import Histogram
from flaxlm.data.source_errors import BadInputLog
from flaxlm.data.source_readers import check_txt_mode, iter_documents

FORMAT = "flaxlm-quality-classifier"
VERSION = 1
HASH = "crc32-splitmix64"  # the feature hashing the file's weights belong to
NORM = "l2"
LABELS = ("negative", "positive")  # the score is the probability of the second
DEFAULT_BUCKETS = 1 << 20  # fastText's default bucket count is 2M; 1M float32 is 4 MB
MAX_BUCKETS = 1 << 28  # (bucket ids are int32; 1 GB of weights)
MAX_NGRAMS = 3
# Added to an n-gram's combined hash before mixing, one per n: a unigram and a bigram whose
# combined values happened to be equal still land in unrelated buckets.
_ORDER_SALT = 0x5851F42D4C957F2D
_SALTS = [np.uint64(n * _ORDER_SALT % (1 << 64)) for n in range(MAX_NGRAMS + 1)]
PERCENTILES = (1, 10, 25, 50, 75, 90, 99)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same model, the same file bytes


class ClassifierError(ValueError):
    """A classifier file that is not one (the message names the file and the key), or a
    training run that cannot be done as asked."""


# ---------------------------------------------------------------------------------------------
# Features


def tokens(text: str, lowercase: bool = True) -> list[str]:
    """The words of (normalized) ``text`` as the cleaning filters split them, lowercased."""
    return _WORD_RE.findall(text.lower() if lowercase else text)


def ngram_hashes(words: list[str], ngrams: int = 2) -> np.ndarray:
    """uint64 hashes of every 1..``ngrams``-gram of ``words``, in order (unigrams first)."""
    h = np.fromiter(_word_hashes(words), np.uint64, len(words))
    parts = []
    for n in range(1, ngrams + 1):
        m = len(h) - n + 1
        if m <= 0:
            break
        g = h[:m]
        for k in range(1, n):  # polynomial combination, as dedup's shingles
            g = g * _MIX + h[k : k + m]
        parts.append(g + _SALTS[n])
    return _mix64(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def doc_features(words: list[str], buckets: int, ngrams: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids, sorted and distinct, int32; their n-gram counts scaled to unit L2 norm,
    float64) of one document's words. No words: two empty arrays."""
    ids = ngram_hashes(words, ngrams) % np.uint64(buckets)
    idx, counts = np.unique(ids, return_counts=True)
    counts = counts.astype(np.float64)
    norm = math.sqrt(float(np.dot(counts, counts))) if len(counts) else 1.0
    return idx.astype(np.int32), counts / norm


def _sigmoid(z):
    """1 / (1 + e^-z) without overflow for either sign."""
    z = np.asarray(z, np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


# ---------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass(eq=False)
class Classifier:
    """A trained model: ``score(text)`` is the probability that the text is of the positive
    kind (the reference text it was trained on)."""

    weights: np.ndarray  # float32, one per bucket
    bias: float
    config: dict  # what the file's "config" holds
    path: str = ""  # the file it was loaded from
    sha256: str = ""  # of that file's bytes

    @property
    def buckets(self) -> int:
        return int(self.config["buckets"])

    @property
    def ngrams(self) -> int:
        return int(self.config["ngrams"])

    @property
    def lowercase(self) -> bool:
        return bool(self.config["lowercase"])

    def words(self, text: str) -> list[str]:
        """The words this model reads in ``text`` (normalized as cleaning normalizes it)."""
        return tokens(normalize_text(text), self.lowercase)

    def logit_words(self, words: list[str]) -> float:
        idx, val = doc_features(words, self.buckets, self.ngrams)
        return self.bias + float(np.dot(self.weights[idx].astype(np.float64), val))

    def score_words(self, words: list[str]) -> float:
        """The score of a document of these words (``words``: as ``words`` gives them)."""
        return float(_sigmoid(self.logit_words(words)))

    def score(self, text: str) -> float:
        return self.score_words(self.words(text))


def _check_file_config(cfg, where: str) -> None:
    """Refuses a "config" that this version cannot read the weights by."""
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise ClassifierError(f"{where}: format {got!r}, not {FORMAT!r}")
    version = cfg.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool) and 1 <= version):
        raise ClassifierError(f"{where}: version {version!r}: an integer >= 1 expected")
    if version > VERSION:
        raise ClassifierError(
            f"{where}: version {version} is newer than this flaxlm reads ({VERSION}); update it"
        )
    checks = {
        "buckets": lambda v: _is_count(v) and 2 <= v <= MAX_BUCKETS,
        "ngrams": lambda v: _is_count(v) and 1 <= v <= MAX_NGRAMS,
        "lowercase": lambda v: isinstance(v, bool),
        "hash": lambda v: v == HASH,
        "normalize": lambda v: v == NORM,
        "labels": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_str, v)),
    }
    for field, ok in checks.items():
        if field not in cfg or not ok(cfg[field]):
            raise ClassifierError(f"{where}: {field}={cfg.get(field)!r} is not a valid setting")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _member(npz, key: str, path: str) -> np.ndarray:
    """Array ``key`` of the loaded .npz; missing or unreadable: an error naming both."""
    if key not in npz.files:
        raise ClassifierError(
            f"{path}: key {key!r} missing (the file holds {sorted(npz.files)}): not a flaxlm "
            "quality classifier (python -m flaxlm.data.quality_classifier train writes one)"
        )
    try:
        return npz[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ClassifierError(f"{path}: key {key!r} cannot be read ({e})") from None


def _parse(data: bytes, path: str) -> tuple[np.ndarray, float, dict]:
    """(weights, bias, config) of a classifier file's bytes, every part checked."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ClassifierError(f"{path}: not a quality classifier .npz ({e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ClassifierError(f"{path}: one .npy array, not a quality classifier .npz")
    raw = _member(npz, "config", path)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ClassifierError(f"{path}: key 'config' is not a JSON string ({raw.dtype})")
    try:
        cfg = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise ClassifierError(f"{path}: key 'config' is not JSON ({e})") from None
    _check_file_config(cfg, f"{path}: key 'config'")
    weights = _member(npz, "weights", path)
    if weights.dtype != np.float32 or weights.shape != (cfg["buckets"],):
        raise ClassifierError(
            f"{path}: key 'weights' is {weights.dtype} {weights.shape}, not float32 "
            f"({cfg['buckets']},) as config's buckets says"
        )
    if not np.isfinite(weights).all():
        raise ClassifierError(f"{path}: key 'weights' holds non-finite values")
    bias = _member(npz, "bias", path)
    if bias.shape != () or bias.dtype.kind != "f" or not np.isfinite(bias):
        raise ClassifierError(f"{path}: key 'bias' is not one finite number ({bias!r})")
    return weights, float(bias), cfg


def load_classifier(path: str) -> Classifier:
    """The classifier in ``path``, checked (``ClassifierError`` naming the file and key; a file
    that cannot be opened: the ``OSError``). Read once per process and file content (cached by
    path, size and mtime): cleaning calls this for every document."""
    path = os.path.expanduser(path)
    st = os.stat(path)
    return _load(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(path: str, size: int, mtime_ns: int) -> Classifier:
    with open(path, "rb") as f:
        data = f.read()
    weights, bias, cfg = _parse(data, path)
    return Classifier(weights, bias, cfg, path, hashlib.sha256(data).hexdigest())


def save_classifier(clf: Classifier, path: str) -> None:
    """Writes ``clf`` to ``path`` (an .npz; written aside and renamed, so a reader never sees
    half a file). Zip member dates are fixed: the same model gives the same bytes."""
    arrays = {
        "weights": np.asarray(clf.weights, np.float32),
        "bias": np.array(clf.bias, np.float64),
        "config": np.array(json.dumps(clf.config, sort_keys=True, ensure_ascii=False)),
    }
    tmp = f"{path}.tmp-{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class Examples:
    """Documents as sparse rows (CSR: row i's bucket ids are ``indices[indptr[i]:indptr[i+1]]``,
    its values likewise in ``values``) and their labels (1: positive)."""

    indptr: np.ndarray  # int64, rows + 1
    indices: np.ndarray  # int32
    values: np.ndarray  # float32
    labels: np.ndarray  # int8

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in ``rows`` of each entry, bucket ids, values) of the rows' entries."""
        starts = self.indptr[rows]
        lens = self.indptr[rows + 1] - starts
        seg = np.repeat(np.arange(len(rows)), lens)
        ends = np.cumsum(lens)
        pos = np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lens), lens)
        return seg, self.indices[pos], self.values[pos]


@dataclasses.dataclass
class Side:
    """The documents read for one label: their features and a digest of their text.

    ``seen`` counts every document the inputs held; the features are of all of them or, with
    a ``max_docs`` sample, of the sampled ones in read order."""

    idx: list = dataclasses.field(default_factory=list)
    val: list = dataclasses.field(default_factory=list)
    sha: object = dataclasses.field(default_factory=hashlib.sha256)
    log: BadInputLog = dataclasses.field(default_factory=BadInputLog)
    seen: int = 0


def _features(text: str, buckets: int, ngrams: int, lowercase: bool) -> tuple:
    idx, val = doc_features(tokens(normalize_text(text), lowercase), buckets, ngrams)
    return idx, val.astype(np.float32)


def read_side(patterns, *, buckets: int, ngrams: int, lowercase: bool, field: str = "text",
              txt_mode: str = "file", max_docs: int = 0, seed: tuple = (0,)) -> Side:  # fmt: skip
    """The documents of ``patterns`` as features: all of them (``max_docs`` 0), or a uniform
    random sample of ``max_docs`` of them drawn with ``seed``, kept in read order.

    The sample is a reservoir (Vitter's algorithm R) over the whole stream, not its first
    ``max_docs``: inputs are often sorted by source or date, and the head of the files would
    train the classifier on one of them. Only documents the reservoir takes are featurised
    (about ``max_docs`` × (1 + ln(n / max_docs)) of the n read)."""
    side = Side()
    rng = np.random.default_rng(seed)
    slots: list = []  # (read position, sha256 of the text, idx, val), a slot per kept document
    for i, d in enumerate(iter_documents(patterns, text_field=field, txt_mode=txt_mode,
                                         log=side.log)):  # fmt: skip
        side.seen = i + 1
        if not max_docs or i < max_docs:
            slots.append(None)
            j = i
        else:
            j = int(rng.integers(0, i + 1))
            if j >= max_docs:
                continue
        data = d.text.encode("utf-8")
        digest = hashlib.sha256(len(data).to_bytes(8, "little") + data).digest()
        slots[j] = (i, digest, *_features(d.text, buckets, ngrams, lowercase))
    for _, digest, idx, val in sorted(slots, key=lambda slot: slot[0]):
        side.sha.update(digest)
        side.idx.append(idx)
        side.val.append(val)
    return side


def stack(pos: Side, neg: Side) -> Examples:
    """Both sides as one set of rows, positives first."""
    parts_i, parts_v = pos.idx + neg.idx, pos.val + neg.val
    lens = np.fromiter((len(p) for p in parts_i), np.int64, len(parts_i))
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)
    labels = np.r_[np.ones(len(pos.idx), np.int8), np.zeros(len(neg.idx), np.int8)]
    return Examples(indptr, cat(parts_i, np.int32), cat(parts_v, np.float32), labels)


def split_heldout(labels: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows), sorted: ``round(frac × n)`` of each class held out, at
    random, but at least one of each class left to train on."""
    rng = np.random.default_rng([seed, 1])  # (a stream apart from the training order's)
    train, held = [], []
    for c in (1, 0):
        rows = np.flatnonzero(labels == c)
        k = min(int(round(frac * len(rows))), len(rows) - 1) if len(rows) else 0
        perm = rng.permutation(rows)
        held.append(perm[:k])
        train.append(perm[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


@dataclasses.dataclass
class FitSettings:
    epochs: int = 5
    lr: float = 0.5  # per document (a batch's step is the sum of its documents' gradients)
    l2: float = 1e-6  # λ of the mean loss + λ/2 ||w||²
    batch: int = 32
    seed: int = 0


def fit(X: Examples, rows: np.ndarray, buckets: int, s: FitSettings) -> tuple:
    """(weights float64, bias, per-epoch weighted training loss) of logistic regression on
    ``rows`` of ``X`` (module docstring: SGD, linear decay, exact L2, balanced classes)."""
    y = X.labels[rows].astype(np.float64)
    n, n_pos = len(rows), int(y.sum())
    if n_pos == 0 or n_pos == n:
        raise ClassifierError("training needs documents of both classes")
    # each class's documents weigh n / (2 × its count): the two classes count alike
    weight = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    rng = np.random.default_rng([s.seed, 0])
    v = np.zeros(buckets, np.float64)  # the weights are scale × v
    scale, bias = 1.0, 0.0
    steps, t = s.epochs * math.ceil(n / s.batch), 0
    losses = []
    for _ in range(s.epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, s.batch):
            batch = order[start : start + s.batch]
            seg, idx, val = X.gather(rows[batch])
            z = scale * np.bincount(seg, v[idx] * val, minlength=len(batch)) + bias
            yb, wb = y[batch], weight[batch]
            total += float(np.dot(wb, np.logaddexp(0, z) - yb * z))
            g = wb * (_sigmoid(z) - yb)  # d loss / d z of each document
            eta = s.lr * (1 - t / steps)
            t += 1
            # L2 on every weight: w ← (1 − η λ B) w, through the common scale
            scale *= 1 - eta * s.l2 * len(batch)
            np.add.at(v, idx, -(eta / scale) * g[seg] * val)
            bias -= eta * float(g.mean())  # (in every document: a step per batch, not per document)
            if scale < 1e-6:  # fold the scale in before v grows large
                v *= scale
                scale = 1.0
        losses.append(total / n)
    return v * scale, bias, losses


def logits(X: Examples, rows: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    seg, idx, val = X.gather(rows)
    w = weights[idx].astype(np.float64)
    return np.bincount(seg, w * val.astype(np.float64), minlength=len(rows)) + bias


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half: the Mann-Whitney statistic); None without
    both classes."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return None
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties averaged
    ranks = mean_rank[inv]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(scores: np.ndarray, labels: np.ndarray, top: float = 0.1) -> dict:
    """Held-out accuracy (score ≥ 0.5 is positive), AUC, and the share of positives among the
    ``top`` fraction scored highest (ties: read order), next to their share of all."""
    n = len(scores)
    if not n:
        return {"documents": 0}
    k = max(1, math.ceil(top * n))
    best = np.argsort(-scores, kind="stable")[:k]
    a = auc(scores, labels)
    return {
        "documents": n,
        "positives": int(labels.sum()),
        "accuracy": round(float(np.mean((scores >= 0.5) == (labels == 1))), 4),
        "auc": None if a is None else round(a, 4),
        "precision_at_10pct": round(float(labels[best].mean()), 4),
        "positive_share": round(float(labels.mean()), 4),
    }


def train_classifier(positive, negative, *, buckets: int = DEFAULT_BUCKETS, ngrams: int = 2,
                     lowercase: bool = True, field: str = "text", txt_mode: str = "file",
                     max_docs: int = 0, heldout: float = 0.1,
                     fit_settings: FitSettings | None = None):  # fmt: skip
    """(the classifier, a summary: held-out metrics, documents, seconds) trained on the
    documents of ``positive`` against those of ``negative`` (patterns as preprocess's --input)."""
    s = fit_settings or FitSettings()
    check_training(buckets=buckets, ngrams=ngrams, heldout=heldout, max_docs=max_docs, s=s)
    t0 = time.time()
    feats = dict(buckets=buckets, ngrams=ngrams, lowercase=lowercase)
    read = dict(field=field, txt_mode=check_txt_mode(txt_mode, "--txt_mode"), max_docs=max_docs)
    # each side's sample its own stream, apart from the held-out split's and training's
    pos = read_side(positive, **feats, **read, seed=(s.seed, 2, 1))
    neg = read_side(negative, **feats, **read, seed=(s.seed, 2, 0))
    for name, side, pats in (("--positive", pos, positive), ("--negative", neg, negative)):
        if not side.idx:
            raise ClassifierError(f"{name}: no documents read from {pats} ({side.log.to_dict()})")
    X = stack(pos, neg)
    train_rows, held_rows = split_heldout(X.labels, heldout, s.seed)
    t_read = time.time() - t0
    w, bias, losses = fit(X, train_rows, buckets, s)
    w32 = w.astype(np.float32)  # (held-out metrics of the weights as saved)
    held = metrics(_sigmoid(logits(X, held_rows, w32, bias)), X.labels[held_rows])
    config = {
        "format": FORMAT, "version": VERSION, "hash": HASH, "normalize": NORM,
        "labels": list(LABELS), **feats,
        "training": {
            "positive": _side_record(positive, pos, X.labels[train_rows] == 1),
            "negative": _side_record(negative, neg, X.labels[train_rows] == 0),
            "field": field, "max_docs": max_docs, "heldout": heldout,
            **dataclasses.asdict(s),
            "train_loss": [round(x, 5) for x in losses],
            "heldout_metrics": held,
            "nonzero_weights": int(np.count_nonzero(w32)),
        },
    }  # fmt: skip
    clf = Classifier(w32, bias, config)
    summary = {"heldout": held, "train_documents": len(train_rows),
               "read_seconds": round(t_read, 2),
               "train_seconds": round(time.time() - t0 - t_read, 2)}  # fmt: skip
    return clf, summary


def _side_record(patterns, side: Side, trained: np.ndarray) -> dict:
    return {
        "patterns": [patterns] if isinstance(patterns, str) else list(patterns),
        "documents": len(side.idx),
        "read": side.seen,
        "trained_on": int(trained.sum()),
        # over the sha256 of each document's text (its UTF-8 length, 8 bytes little-endian,
        # then the bytes), in read order
        "sha256": side.sha.hexdigest(),
        "skipped": side.log.to_dict()["counts"] if side.log.total else {},
    }


def check_training(*, buckets, ngrams, heldout, max_docs, s: FitSettings) -> None:
    """Refuses, naming the option, a setting training cannot mean."""
    bad = []
    if not (_is_count(buckets) and 2 <= buckets <= MAX_BUCKETS):
        bad.append(f"--buckets={buckets!r}: an integer in [2, {MAX_BUCKETS}] expected")
    if not (_is_count(ngrams) and 1 <= ngrams <= MAX_NGRAMS):
        bad.append(f"--ngrams={ngrams!r}: 1 to {MAX_NGRAMS} expected")
    if not (isinstance(heldout, (int, float)) and 0 <= heldout <= 0.5):
        bad.append(f"--heldout={heldout!r}: a fraction in [0, 0.5] expected")
    if not (_is_count(max_docs) and max_docs >= 0):
        bad.append(f"--max_docs={max_docs!r}: an integer >= 0 expected (0: all)")
    if not (_is_count(s.epochs) and s.epochs >= 1):
        bad.append(f"--epochs={s.epochs!r}: an integer >= 1 expected")
    if not (_is_count(s.seed) and s.seed >= 0):
        bad.append(f"--seed={s.seed!r}: an integer >= 0 expected")
    if not (_is_count(s.batch) and s.batch >= 1):
        bad.append(f"--batch={s.batch!r}: an integer >= 1 expected")
    if not (math.isfinite(s.lr) and s.lr > 0):
        bad.append(f"--lr={s.lr!r}: a positive number expected")
    if not (math.isfinite(s.l2) and s.l2 >= 0):
        bad.append(f"--l2={s.l2!r}: a number >= 0 expected")
    elif s.lr * s.l2 * s.batch >= 0.5:  # the decay factor per step would flip or stall
        bad.append(f"--l2={s.l2}: lr × l2 × batch must stay below 0.5")
    if bad:
        raise ClassifierError("; ".join(bad))


# ---------------------------------------------------------------------------------------------
# The report's score distribution (cleaning)


class ScoreHistogram(Histogram):
    """Classifier scores binned by their log-odds (1/100 wide, from −12 to 12: probabilities
    1e-5 to 1 − 1e-5 in fine steps at both ends, where a logistic model's scores crowd).
    Mergeable like quality.Histogram; ``sparse`` / ``from_sparse``: the non-empty bins as a
    {bin: count} dict, which Beam's stats records add up key by key."""

    LO, HI, PER_UNIT, DIGITS = -12.0, 12.0, 100, 6

    @staticmethod
    def _to_scale(values: np.ndarray) -> np.ndarray:
        p = np.clip(values, 1e-300, 1 - 1e-16)
        return np.log(p) - np.log1p(-p)

    @staticmethod
    def _from_scale(x: float) -> float:
        return float(_sigmoid(x))

    def sparse(self) -> dict[str, int]:
        return {str(i): int(self.counts[i]) for i in np.flatnonzero(self.counts)}

    @classmethod
    def from_sparse(cls, bins: dict) -> ScoreHistogram:
        h = cls()
        for i, count in bins.items():
            h.counts[int(i)] += int(count)
        return h


def classifier_report(path: str, min_score: float, hist: ScoreHistogram) -> dict:
    """The clean stage report's "classifier" section: which classifier (path, sha256), the
    threshold (None: report only), how many documents it scored and their scores'
    percentiles."""
    return {
        "path": path,
        "sha256": load_classifier(path).sha256,
        "min_score": min_score or None,
        "scored": int(hist.counts.sum()),
        "score_percentiles": hist.percentiles(PERCENTILES),
    }


def report_lines(section: dict, dropped: int) -> list[str]:
    """report.md's lines for the clean stage's "classifier" section."""
    dist = ", ".join(f"{k} {v:g}" for k, v in section["score_percentiles"].items()) or "-"
    lines = [f"Quality classifier {section['path']} (sha256 {section['sha256'][:12]}) scored "
             f"the {section['scored']} documents the cleaning heuristics kept: {dist}"]  # fmt: skip
    if section["min_score"] is not None:
        lines.append(f"clean.classifier_min_score={section['min_score']:g} dropped {dropped} "
                     "scored below it (classifier_low)")  # fmt: skip
    elif (p90 := section["score_percentiles"].get("p90")) is not None:
        lines.append(f"Report only (no clean.classifier_min_score): "
                     f"--config.clean.classifier_min_score={p90:g} keeps about the top 10 % "
                     "(DCLM's cut), to the histogram's bin")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------
# CLI


def _open(path: str) -> Classifier:
    try:
        return load_classifier(path)
    except OSError as e:
        raise SystemExit(f"cannot read classifier {path!r} ({e.strerror or e})") from None
    except ClassifierError as e:
        raise SystemExit(str(e)) from None


def train_main(args) -> dict:
    s = FitSettings(epochs=args.epochs, lr=args.lr, l2=args.l2, batch=args.batch, seed=args.seed)
    try:
        clf, summary = train_classifier(
            args.positive, args.negative, buckets=args.buckets, ngrams=args.ngrams,
            lowercase=not args.keep_case, field=args.field, txt_mode=args.txt_mode,
            max_docs=args.max_docs, heldout=args.heldout, fit_settings=s,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:  # an unmatched pattern, a setting (one line)
        raise SystemExit(str(e)) from None
    save_classifier(clf, args.out)
    summary = {"out": args.out, "sha256": load_classifier(args.out).sha256, **summary}
    if args.metrics:
        with open(args.metrics, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


def score_main(args) -> dict:
    clf = _open(args.classifier)
    log = BadInputLog()
    scores = []
    t0 = time.time()
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    try:
        mode = check_txt_mode(args.txt_mode, "--txt_mode")
        for d in iter_documents(args.inputs, text_field=args.field, txt_mode=mode, log=log):
            scores.append(clf.score(d.text))
            if out is not None:
                out.write(json.dumps({"loc": d.loc, "score": round(scores[-1], 6)}) + "\n")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    finally:
        if out is not None:
            out.close()
    seconds = time.time() - t0
    arr = np.asarray(scores)
    summary = {
        "classifier": args.classifier,
        "sha256": clf.sha256,
        "documents": len(scores),
        "skipped": log.to_dict()["counts"],
        # exact (numpy's linear interpolation): every score is at hand here
        "score_percentiles": _exact_percentiles(arr),
        "seconds": round(seconds, 3),
        "docs_per_second": round(len(scores) / seconds, 1) if seconds > 0 else None,
    }
    print(json.dumps(summary, indent=1))
    return summary


def _exact_percentiles(scores: np.ndarray) -> dict[str, float]:
    if not len(scores):
        return {}
    return {f"p{q}": round(float(np.percentile(scores, q)), 6) for q in PERCENTILES}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on positive (reference) and negative (web) text")
    t.add_argument("--positive", nargs="+", required=True, help="files, globs or directories")
    t.add_argument("--negative", nargs="+", required=True, help="files, globs or directories")
    t.add_argument("--out", required=True, help="the classifier file (.npz) to write")
    t.add_argument("--metrics", help="also write the held-out metrics (json) here")
    t.add_argument(
        "--max_docs",
        type=int,
        default=0,
        help="per side, a seeded uniform sample of N documents (0: all)",
    )
    t.add_argument("--epochs", type=int, default=FitSettings.epochs)
    t.add_argument("--lr", type=float, default=FitSettings.lr)
    t.add_argument("--l2", type=float, default=FitSettings.l2)
    t.add_argument("--batch", type=int, default=FitSettings.batch)
    t.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS)
    t.add_argument("--ngrams", type=int, default=2, help="word n-grams up to this n")
    t.add_argument("--keep_case", action="store_true", help="do not lowercase the words")
    t.add_argument("--heldout", type=float, default=0.1, help="fraction held out per class")
    t.add_argument("--seed", type=int, default=0)
    for p in (t, s := sub.add_parser("score", help="score documents; percentiles of the scores")):
        p.add_argument("--field", default="text", help="jsonl/parquet/Arrow text field")
        p.add_argument("--txt_mode", default="file", help="plain text: file | line | blank")
    s.add_argument("classifier", help="a classifier file (.npz) train wrote")
    s.add_argument("inputs", nargs="+", help="files, globs or directories")
    s.add_argument("--out", help="write {loc, score} jsonl here")
    args = ap.parse_args(argv)
    return train_main(args) if args.command == "train" else score_main(args)


if __name__ == "__main__":
    main()
