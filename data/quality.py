"""Reference-model perplexity filtering: drop documents a trusted language model finds
improbable (CCNet, Wenzek et al. 2020; "Perplexed by Perplexity", Ankner et al. 2024).

The heuristics of data/clean.py judge the surface of a page (length, repetition, symbols, stop
words); they pass fluent-looking junk and spam that a language model trained on text you trust
(a small flaxlm run on curated data, or any HF checkpoint) scores as unlike it. `QualityFilter`
scores each document that survived cleaning and dedup by that model's perplexity over its first
`max_tokens` tokens (BOS, then the document encoded as pretraining encodes it) and drops one

  * above `max_ppl` as "perplexity_high" (unlike the reference text), or
  * below `min_ppl` as "perplexity_low" (repeated or templated text a model predicts too well),

strictly (a document at a threshold passes, as cleaning's thresholds). A threshold may be a
percentile instead (`max_ppl_percentile=70`: CCNet's head and middle; `min_ppl_percentile`):
the first `calibration_docs` documents scored are held back, the thresholds set to those
percentiles of their perplexities, and then they and every later document are judged by them
(`push` / `flush`), in one pass and in input order. The sample is the input's start, so a
corpus sorted by source or date should be shuffled first, or given absolute thresholds.

All off by default with `model` unset; with a model and no threshold every document is scored
and kept, and the report gives the perplexity distribution to choose thresholds from
(percentiles from a log-spaced histogram: 50 bins a decade, so within about 5 % of the exact
value, and mergeable).

A document of fewer than two tokens (BOS and one more) has no prediction to score: it is kept
and counted as "unscored". The model runs on the default JAX device (a GPU when there is one),
`batch_tokens` tokens a forward pass (evaluation/loglik.py `LoglikScorer`), or over `mesh`:
every device of the host scoring its share of each batch's rows (`data=-1`), or a model too
big for one device split over several (`fsdp=-1`). It runs in the streaming preprocess CLI;
Beam refuses it (data/beam.py).
"""

from __future__ import annotations

import math
import os

import ml_collections
import numpy as np

from flaxlm.config_values import is_int, is_real
from flaxlm.data.stage_counts import count_removed, stage_report

# Perplexity histogram: log10(ppl) from 0 to 7 (1 to 10 million) in 50 bins a decade; beyond
# either end counts in the end bins.
_BINS_PER_DECADE, _DECADES = 50, 7
PERCENTILES = (5, 25, 50, 75, 95)
HF_PREFIX = "hf:"


def quality_config() -> ml_collections.ConfigDict:
    """Defaults of the `quality` section of preprocess: off (no model)."""
    c = ml_collections.ConfigDict()
    c.model = ""  # a flaxlm run directory or hf:DIR; "" = no perplexity filter
    c.max_ppl = 0.0  # perplexity above → "perplexity_high" (0 = no upper limit)
    c.min_ppl = 0.0  # perplexity below → "perplexity_low" (0 = no lower limit)
    # Thresholds as percentiles instead (0 = off; not with max_ppl / min_ppl on the same side):
    # above the max_ppl_percentile-th percentile of the first calibration_docs documents scored
    # → "perplexity_high" (70: keep CCNet's head and middle), below min_ppl_percentile-th → low
    c.max_ppl_percentile = 0.0
    c.min_ppl_percentile = 0.0
    c.calibration_docs = 2000  # documents scored (and held back) before those thresholds are set
    c.max_tokens = 512  # tokens of each document scored (its start; BOS included)
    c.batch_tokens = 16384  # tokens per forward pass
    # Devices to score on: "" one; "data=-1" every device, each scoring its share of a batch's
    # rows; "fsdp=-1" a model too big for one device, split along its embedding (flaxlm/
    # cli_mesh.py's --mesh, with `sharding` its logical-rules preset: dp | fsdp | fsdp_tp)
    c.mesh = ""
    c.sharding = "fsdp"
    return c


def check_config(c) -> None:
    """Refuses, naming the key, a setting the filter cannot mean, before anything is read."""
    for key in ("max_ppl", "min_ppl"):
        value = c[key]
        if not (is_real(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"quality.{key}={value!r}: a perplexity >= 0 expected (0: no limit)")
    for key in ("max_ppl_percentile", "min_ppl_percentile"):
        value = c[key]
        if not (is_real(value) and 0 <= value < 100):
            raise ValueError(f"quality.{key}={value!r}: a percentile in [0, 100) expected (0: off)")
    for absolute, pct in (("max_ppl", "max_ppl_percentile"), ("min_ppl", "min_ppl_percentile")):
        if c[absolute] and c[pct]:
            raise ValueError(f"quality.{absolute} and quality.{pct} are both set: one threshold "
                             "a side, a perplexity or a percentile")  # fmt: skip
    if c.max_ppl_percentile and c.min_ppl_percentile and (
            c.min_ppl_percentile >= c.max_ppl_percentile):  # fmt: skip
        raise ValueError(
            f"quality.min_ppl_percentile={c.min_ppl_percentile} >= quality.max_ppl_percentile="
            f"{c.max_ppl_percentile}: no document could pass"
        )
    if not (is_int(c.calibration_docs) and c.calibration_docs >= 1):
        raise ValueError(
            f"quality.calibration_docs={c.calibration_docs!r}: an integer >= 1 expected"
        )
    if c.max_ppl and c.min_ppl and c.min_ppl >= c.max_ppl:
        raise ValueError(
            f"quality.min_ppl={c.min_ppl} >= quality.max_ppl={c.max_ppl}: no document could pass"
        )
    for key, least in (("max_tokens", 2), ("batch_tokens", 16)):
        if not (is_int(c[key]) and c[key] >= least):
            raise ValueError(f"quality.{key}={c[key]!r}: an integer >= {least} expected")
    if c.mesh:
        _mesh(c)  # (a bad axis or size: named now, before the first pass)
    if (c.max_ppl or c.min_ppl or c.max_ppl_percentile or c.min_ppl_percentile) and not c.model:
        raise ValueError("quality.max_ppl / min_ppl are set but quality.model is empty")
    if c.model:
        path = c.model[len(HF_PREFIX) :] if c.model.startswith(HF_PREFIX) else c.model
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"quality.model={c.model!r}: no such directory")


def _mesh(c):
    """(mesh, rules) of `quality.mesh` / `quality.sharding`; (None, None) for one device."""
    if not c.mesh:
        return None, None
    from flaxlm.cli_mesh import build_mesh

    try:
        return build_mesh(c.mesh, c.sharding)
    except (ValueError, KeyError) as e:
        why = str(e.args[0] if e.args else e).replace("--mesh ", "")
        raise ValueError(
            f"quality.mesh={c.mesh!r}, quality.sharding={c.sharding!r}: {why}"
        ) from None


def load_reference(source: str, mesh=None, rules=None):
    """(ModelConfig, params, tokenizer) of a flaxlm run directory or "hf:DIR" (or an HF
    directory named plainly), read as `python -m flaxlm.generate` reads a model (params placed
    by `mesh` / `rules` when given); one that cannot be read is a SystemExit naming the file."""
    from flaxlm.generate import load

    path = source[len(HF_PREFIX) :] if source.startswith(HF_PREFIX) else source
    return load(os.path.expanduser(path), mesh=mesh, rules=rules)


class Histogram:
    """Counts of log10(perplexity) in fixed bins: percentiles without keeping every score, and
    mergeable across workers (the counts add).

    The measure is a scale: values map to it (``_to_scale``) and bin middles back
    (``_from_scale``), bins ``PER_UNIT`` a unit from ``LO`` to ``HI`` (values beyond either end
    count in the end bins), percentiles rounded to ``DIGITS``; a subclass changes these to bin
    another score (data/quality_classifier.py: a classifier's probabilities by their log-odds).
    """

    LO, HI, PER_UNIT, DIGITS = 0.0, float(_DECADES), _BINS_PER_DECADE, 2

    def __init__(self, counts=None):
        n = round((self.HI - self.LO) * self.PER_UNIT)
        self.counts = np.zeros(n, np.int64) if counts is None else np.asarray(counts, np.int64)

    @staticmethod
    def _to_scale(values: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(values, 1.0))

    @staticmethod
    def _from_scale(x: float) -> float:
        return 10**x

    def add(self, values) -> None:
        scaled = self._to_scale(np.asarray(values, np.float64))
        idx = np.floor((scaled - self.LO) * self.PER_UNIT).astype(np.int64)
        np.add.at(self.counts, np.clip(idx, 0, len(self.counts) - 1), 1)

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts

    def percentiles(self, qs=PERCENTILES) -> dict[str, float]:
        """{"p50": ...}: each the middle (on the scale) of the bin the q-th percentile falls in."""
        total = int(self.counts.sum())
        if not total:
            return {}
        cum = np.cumsum(self.counts)
        out = {}
        for q in qs:
            b = int(np.searchsorted(cum, q / 100 * total, side="left"))
            middle = self.LO + (b + 0.5) / self.PER_UNIT
            out[f"p{q}"] = round(float(self._from_scale(middle)), self.DIGITS)
        return out


class QualityFilter:
    """Scores and filters batches of documents (see the module docstring); counts like
    data/clean.py's Cleaner (`removed`, `examples`, `report`)."""

    def __init__(self, cfg, reference=None):
        from flaxlm.data.tokenizer import text_encoder
        from flaxlm.evaluation.loglik import LoglikScorer

        check_config(cfg)
        self.cfg = cfg
        mesh, rules = _mesh(cfg)
        self.model_cfg, params, self.tok = reference or load_reference(cfg.model, mesh, rules)
        self.encoder = text_encoder(self.tok)  # a special token's string in a page stays text
        self.scorer = LoglikScorer(
            self.model_cfg,
            params,
            max_len=cfg.max_tokens,
            batch_tokens=cfg.batch_tokens,
            pad_id=self.tok.pad_id,
            mesh=mesh,
            rules=rules,
        )
        self.seen, self.unscored = 0, 0
        self.removed: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.hist = Histogram()
        # The thresholds in force; with percentiles, None until calibrated (`push`)
        self.max_ppl, self.min_ppl = cfg.max_ppl, cfg.min_ppl
        self.calibrating = bool(cfg.max_ppl_percentile or cfg.min_ppl_percentile)
        self.pending: list = []  # (text, loc, payload, ppl) held back while calibrating
        self.calibrated_on = 0  # documents the percentiles were taken over

    def perplexities(self, texts: list[str]) -> np.ndarray:
        """Each text's perplexity over its first max_tokens tokens; nan for one too short."""
        from flaxlm.evaluation.prompts import prefix_ids

        head = prefix_ids(self.tok)
        # (a model whose context is shorter than max_tokens: its context, never cut rows)
        limit = min(self.cfg.max_tokens, self.scorer.max_len + 1)
        out = np.full(len(texts), np.nan)
        requests, where = [], []
        for i, ids in enumerate(self.encoder.encode_batch(texts)):
            seq = (head + list(ids))[:limit]
            if len(seq) >= 2:
                requests.append((seq[:1], seq[1:]))
                where.append(i)
        for i, s in zip(where, self.scorer.score(requests) if requests else []):
            out[i] = math.exp(-s.logprob / s.n_tokens)
        return out

    def _score(self, texts: list[str]) -> np.ndarray:
        ppl = self.perplexities(texts)
        scored = ~np.isnan(ppl)
        self.seen += len(texts)
        self.unscored += int((~scored).sum())
        self.hist.add(ppl[scored])
        return ppl

    def _passes(self, text: str, loc: str, p: float) -> bool:
        """Whether a document of perplexity `p` passes the thresholds in force; counts it
        by reason when not."""
        reason = None
        if not np.isnan(p):
            if self.max_ppl and p > self.max_ppl:
                reason = "perplexity_high"
            elif self.min_ppl and p < self.min_ppl:
                reason = "perplexity_low"
        if reason is not None:
            example = f"{loc}: ppl {p:.1f}: {text[:200]!r}"
            count_removed(self.removed, self.examples, reason, example)
        return reason is None

    def keep_batch(self, texts: list[str], locs: list[str]) -> list[bool]:
        """Which of `texts` pass; counts the others by reason. Thresholds given as perplexities
        only (percentiles hold documents back until calibrated: `push`)."""
        if self.calibrating:
            raise RuntimeError("percentile thresholds: documents go through push() and flush()")
        return [self._passes(t, loc, p) for t, loc, p in zip(texts, locs, self._score(texts))]

    def push(self, items: list[tuple[str, str, object]]) -> list:
        """The payloads of (text, loc, payload) `items` that pass, in order. With percentile
        thresholds, documents are held back until ``calibration_docs`` have been scored, the
        thresholds are set from those documents' perplexities (exact percentiles, numpy's
        linear interpolation), and the held documents are judged and released, in order, with
        the ones that completed the sample. ``flush`` releases what is still held at the end
        (a corpus smaller than the sample: calibrated on all of it)."""
        if not items:
            return []
        ppl = self._score([t for t, _, _ in items])
        if not self.calibrating:
            return [x for (t, loc, x), p in zip(items, ppl) if self._passes(t, loc, p)]
        self.pending += [(t, loc, x, p) for (t, loc, x), p in zip(items, ppl)]
        if sum(not np.isnan(p) for *_, p in self.pending) < self.cfg.calibration_docs:
            return []
        return self.flush()

    def flush(self) -> list:
        """Sets the percentile thresholds (when still calibrating) and releases the held
        documents that pass."""
        if not self.calibrating:
            return []
        scores = np.array([p for *_, p in self.pending if not np.isnan(p)])
        self.calibrated_on = len(scores)
        if len(scores):
            if self.cfg.max_ppl_percentile:
                self.max_ppl = float(np.percentile(scores, self.cfg.max_ppl_percentile))
            if self.cfg.min_ppl_percentile:
                self.min_ppl = float(np.percentile(scores, self.cfg.min_ppl_percentile))
        self.calibrating = False
        held, self.pending = self.pending, []
        return [x for t, loc, x, p in held if self._passes(t, loc, p)]

    def report(self) -> dict:
        return {
            **stage_report(self.seen, self.removed, self.examples),
            "model": self.cfg.model,
            "max_tokens": self.cfg.max_tokens,
            "unscored": self.unscored,
            "perplexity": self.hist.percentiles(),
            # the thresholds applied (percentiles: set from the first `calibrated_on` scored)
            "thresholds": {
                "max_ppl": self.max_ppl or None,
                "min_ppl": self.min_ppl or None,
                **(
                    {
                        "calibrated_on": self.calibrated_on,
                        "max_ppl_percentile": self.cfg.max_ppl_percentile or None,
                        "min_ppl_percentile": self.cfg.min_ppl_percentile or None,
                    }
                    if self.calibrated_on
                    else {}
                ),
            },
        }
