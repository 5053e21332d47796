"""Document cleaning: quality filters, a word-list filter and PII redaction.

``Cleaner(clean_config())`` runs a fixed chain of filters over each document; the first filter that
rejects a document names the reason, is counted, and keeps a few examples for the report. Surviving
documents have PII replaced by placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``,
``<IBAN>``, ``<ID>``). Thresholds follow the Gopher rules (Rae et al. 2021, appendix A)
unless a comment says otherwise.

Thresholds are strict: "above"/"below" a threshold fails, a statistic equal to it passes (a page
with exactly 30% duplicated lines passes ``max_dup_line_frac=0.3``); tests/data/test_prep_audit.py
recomputes every statistic from these definitions. The word list ("toxic") matches whole words
of spaced scripts, so benign words containing an entry are not hits, and CJK entries as
substrings, with '!' exceptions for benign words that contain one (``load_word_list``).

Text without spaces (Chinese, Japanese, Korean) is handled by counting each CJK character as one
word, so word counts and thresholds (``min_words``) count characters there. A word of these
scripts is one to two characters, so the n-gram repetition rules (Gopher's n words) are applied
to n-grams of round(n × ``cjk_chars_per_word``) characters where the dominant script is CJK:
measured on single characters, ordinary repeated terms (国务院, 委员会) took a passage of the
Chinese constitution over the 5-gram limit that its English translation passed.
Mean word length is measured on non-CJK words only (a CJK "word" is one character by construction).
The language check is a script check (Han, Latin, Cyrillic, ...: the script with the most words,
each word counted for the script of most of its letters), then the language its function words
name (``clean_lang``: English, German, French, Spanish, Italian, Portuguese, Dutch, Swedish,
Polish, Russian, Ukrainian; Han text Chinese), kept when ``languages`` lists it, and Gopher's
stop-word rule with that language's own list. Latin text no profile recognises ("und") is held
to the English list, as all Latin text was before languages were told apart. The report counts
the kept documents per language.

A document whose URL (preprocess's ``url_field``) is under a domain of ``blocked_domains`` is
dropped before anything else ("blocked_domain"; ``clean_url``: the domain blocklists RefinedWeb
and FineWeb start with).

A trained quality classifier (``clean.classifier``: a file ``python -m
flaxlm.data.quality_classifier train`` wrote; DCLM's fastText filter) scores each document the
heuristics keep, last, on the text they judged; one scoring below ``classifier_min_score`` is
dropped ("classifier_low"; a score equal to it passes). Without a threshold every document is
scored and kept, and the report gives the scores' percentiles to choose one from.

Line cleaning (``strip_boilerplate``) removes web boilerplate lines by phrase ("This site uses
cookies", "Subscribe to our newsletter", a line that is only "Read more"), never by a single word
("cookie", "javascript"), and prose-like phrases ("privacy policy") only on short lines.

The parts live in their own modules, all re-exported here: ``clean_text`` (normalization, words,
scripts), ``clean_stats`` (``DocStats``), ``clean_wordlist`` (the word-list filter), ``clean_pii``
(redaction; which phones, cards and IDs it redacts), ``clean_boilerplate`` (line cleaning) and
``clean_url`` (the domain blocklist).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import ml_collections

from flaxlm.config_values import is_real
from flaxlm.data.clean_boilerplate import _is_boilerplate, strip_boilerplate  # noqa: F401
from flaxlm.data.clean_lang import (  # noqa: F401
    STOP_WORDS,
    UNDETERMINED,
    identify,
    known_languages,
    stop_words_for,
)
from flaxlm.data.clean_pii import _luhn_ok, _plausible_ipv6, redact_pii  # noqa: F401
from flaxlm.data.clean_stats import DocStats, _dup_frac, _ngram_fracs, _word_script  # noqa: F401
from flaxlm.data.clean_text import (  # noqa: F401
    _ALPHA_RE,
    _CJK,
    _CJK_RE,
    _CONTROL_RE,
    _SCRIPTS,
    _WORD_RE,
    count_words,
    normalize_text,
)
from flaxlm.data.clean_url import host_of, load_domain_list
from flaxlm.data.clean_wordlist import RESOURCES, WordList, load_word_list, toxic_hits  # noqa: F401
from flaxlm.data.quality_classifier import ScoreHistogram, classifier_report, load_classifier
from flaxlm.data.stage_counts import REMOVED_EXAMPLES, count_removed, stage_report

MAX_EXAMPLES = REMOVED_EXAMPLES  # removed-document examples kept per reason (200 characters)
_BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*", "·", "–")
_ELLIPSES = ("...", "…", "。。。")


def clean_config() -> ml_collections.ConfigDict:
    """Default cleaning thresholds (a ``clean`` config section)."""
    c = ml_collections.ConfigDict()
    c.min_words = 50  # fewer words (CJK: characters) → "too_short"
    c.max_words = 100_000  # more words → "too_long"
    c.min_mean_word_len = 3.0  # mean length of non-CJK words below → "mean_word_len"
    c.max_mean_word_len = 10.0  # ... or above
    c.max_symbol_ratio = 0.1  # ('#' + ellipses) per word above → "symbol_ratio"
    c.max_bullet_lines = 0.9  # fraction of lines starting with a bullet above → "bullet_lines"
    c.max_ellipsis_lines = 0.3  # fraction of lines ending in an ellipsis above → "ellipsis_lines"
    c.max_dup_line_frac = 0.3  # fraction of duplicated lines above → "repetition"
    c.max_dup_para_frac = 0.3  # fraction of duplicated paragraphs above → "repetition"
    c.max_dup_line_char_frac = 0.2  # characters in duplicated lines above → "repetition"
    c.max_dup_para_char_frac = 0.2  # characters in duplicated paragraphs above → "repetition"
    # Characters covered by the most frequent n-gram (ties: the one occurring first), for
    # n = 2, 3, 4 (Gopher: .20 .18 .16).
    c.max_top_ngram_char_frac = (0.20, 0.18, 0.16)
    # Characters covered by any repeated n-gram, for n = 5..10 (Gopher: .15 down to .10).
    c.max_dup_ngram_char_frac = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    # Where the dominant script is han, kana or hangul, the n-gram rules above read n words as
    # round(n × this) characters (a Chinese word is about 1.5 characters); 1 = one per character.
    c.cjk_chars_per_word = 1.5
    c.min_alpha_words = 0.8  # fraction of words with a letter (CJK counts) below → "alpha_ratio"
    # Distinct stop words of the document's language (clean_lang.STOP_WORDS) below →
    # "stop_words"; Latin text of no recognised language ("und") is held to the English list.
    c.min_stop_words = 2
    c.scripts = ("latin", "han")  # dominant script must be one of these → else "script"
    # The languages kept (clean_lang: en de fr es it pt nl sv pl ru uk, zh ja ko, or a script's
    # name for greek / arabic / devanagari text); a document identified as another → "language".
    # () keeps every language. Undetermined text ("und") is left to the stop-word rule.
    c.languages = ("en", "zh")
    c.toxic_lists = "default"  # comma-separated word-list files ("default" = the bundled ones)
    c.max_toxic_hits = 0  # word-list hits above → "toxic"
    c.redact_pii = True  # replace emails, phones, IPs, card, IBAN, ID numbers by placeholders
    # C4-style line cleaning before the filters: drop web boilerplate lines (cookie banners,
    # "click here", navigation bars) and lines made only of symbols.
    c.strip_boilerplate_lines = True
    c.max_boilerplate_char_frac = 0.5  # stripped lines held more of the text → "boilerplate"
    # Comma-separated domain blocklists (one domain a line, subdomains included: UT1's lists);
    # a document whose URL (preprocess's url_field) is on one → "blocked_domain" (clean_url)
    c.blocked_domains = ""
    # A quality classifier (.npz from `python -m flaxlm.data.quality_classifier train`) scoring
    # each document the filters above keep; "" = none. Scores below classifier_min_score →
    # "classifier_low"; 0 = no threshold: every document scored and kept, and the report gives
    # the score percentiles (p90 keeps about the top 10 %, DCLM's cut)
    c.classifier = ""
    c.classifier_min_score = 0.0
    return c


_CJK_SCRIPTS = ("han", "kana", "hangul")  # scripts whose characters are words (_WORD_RE)


def first_failure(s: DocStats, c: ml_collections.ConfigDict) -> str | None:
    """The reason the first failing filter gives, or None if the document passes all."""
    n = len(s.words)
    if n < max(c.min_words, 1):  # a document without words is too short even at min_words=0
        return "too_short"
    if n > c.max_words:
        return "too_long"
    if c.scripts and s.script not in c.scripts:
        return "script"
    if c.languages and s.language != UNDETERMINED and s.language not in c.languages:
        return "language"
    spaced = [w for w in s.words if not _CJK_RE.match(w)]
    if spaced and len(spaced) >= 0.5 * n:  # mostly spaced text: word length is meaningful
        mean = sum(map(len, spaced)) / len(spaced)
        if not c.min_mean_word_len <= mean <= c.max_mean_word_len:
            return "mean_word_len"
    symbols = s.text.count("#") + sum(s.text.count(e) for e in _ELLIPSES)
    if symbols / n > c.max_symbol_ratio:
        return "symbol_ratio"
    if s.lines:
        if sum(ln.startswith(_BULLETS) for ln in s.lines) / len(s.lines) > c.max_bullet_lines:
            return "bullet_lines"
        if sum(ln.endswith(_ELLIPSES) for ln in s.lines) / len(s.lines) > c.max_ellipsis_lines:
            return "ellipsis_lines"
    line_frac, line_chars = _dup_frac(s.lines)
    para_frac, para_chars = _dup_frac(s.paragraphs)
    if (
        line_frac > c.max_dup_line_frac
        or para_frac > c.max_dup_para_frac
        or line_chars > c.max_dup_line_char_frac
        or para_chars > c.max_dup_para_char_frac
    ):
        return "repetition"
    per_word = c.cjk_chars_per_word if s.script in _CJK_SCRIPTS else 1
    top_ns = [int(n * per_word + 0.5) for n in range(2, 2 + len(c.max_top_ngram_char_frac))]
    dup_ns = [int(n * per_word + 0.5) for n in range(5, 5 + len(c.max_dup_ngram_char_frac))]
    tops, dups = _ngram_fracs(s.words, tuple(top_ns), tuple(dup_ns))
    if any(f > t for f, t in zip(tops, c.max_top_ngram_char_frac)) or any(
        f > t for f, t in zip(dups, c.max_dup_ngram_char_frac)
    ):
        return "repetition"
    if sum(1 for w in s.words if _ALPHA_RE.search(w)) / n < c.min_alpha_words:
        return "alpha_ratio"
    stops = stop_words_for(s.language, s.script)
    if stops is not None and len(stops.intersection(s.words)) < c.min_stop_words:
        return "stop_words"
    if c.toxic_lists and toxic_hits(s.text, c.toxic_lists) > c.max_toxic_hits:
        return "toxic"
    return None


@dataclasses.dataclass
class Cleaner:
    """Applies the filter chain and redaction; counts and keeps examples per reason.

    ``__call__(text)`` returns the cleaned text, or None (the reason is counted in ``removed``).
    Counters can be merged across workers with ``merge``.
    """

    cfg: ml_collections.ConfigDict = dataclasses.field(default_factory=clean_config)
    seen: int = 0
    removed: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)
    pii: Counter = dataclasses.field(default_factory=Counter)
    lines_stripped: int = 0  # boilerplate / symbol-only lines removed from kept and dropped docs
    languages: Counter = dataclasses.field(default_factory=Counter)  # of the kept documents
    urls: Counter = dataclasses.field(default_factory=Counter)  # "checked" / "no_url"
    # with clean.classifier: the scores of the documents it scored (kept or dropped)
    scores: ScoreHistogram | None = None

    def __post_init__(self):
        # A misspelt script ("cyrilic") dropped every document of that script as "script".
        unknown = sorted(set(self.cfg.scripts) - set(_SCRIPTS))
        if unknown:
            raise ValueError(f"clean.scripts: unknown {unknown} (known: {sorted(_SCRIPTS)})")
        languages = self.cfg.languages
        if isinstance(languages, str):  # "fr" is not ("f", "r")
            raise ValueError(
                f"clean.languages={languages!r}: a tuple of language names expected, e.g. "
                f"('en', 'fr')"
            )
        known = known_languages(_SCRIPTS)
        unknown = sorted(set(languages) - set(known) | ({UNDETERMINED} & set(languages)))
        if unknown:
            # A misspelt code ("ge" for German) would drop every document of that language.
            raise ValueError(
                f"clean.languages: unknown {unknown} (known: {sorted(set(known) - {UNDETERMINED})};"
                f" undetermined text is judged by the stop-word rule, min_stop_words)"
            )
        per_word = self.cfg.cjk_chars_per_word
        if not is_real(per_word) or per_word < 1:
            # (below 1, two rules' n-grams could round to one size)
            raise ValueError(f"clean.cjk_chars_per_word={per_word!r}: a number >= 1 expected")
        self._check_classifier()
        if self.cfg.classifier and self.scores is None:
            self.scores = ScoreHistogram()

    def _check_classifier(self) -> None:
        """Refuses a classifier setting it cannot mean (the file itself is read, and checked,
        at the first document that reaches it; preprocess.check_settings reads it first)."""
        path, least = self.cfg.classifier, self.cfg.classifier_min_score
        if not isinstance(path, str):
            raise ValueError(f"clean.classifier={path!r}: a file path expected")
        if not (is_real(least) and math.isfinite(least) and 0 <= least <= 1):
            raise ValueError(
                f"clean.classifier_min_score={least!r}: a score in [0, 1] expected (0: no "
                "threshold, every document scored and kept)"
            )
        if least and not path:
            raise ValueError(
                f"clean.classifier_min_score={least} is set but clean.classifier is empty: "
                "name the classifier file (python -m flaxlm.data.quality_classifier train)"
            )

    def __call__(self, text: str, loc: str = "", url: str | None = None) -> str | None:
        return self.clean(text, loc, url)[0]

    def clean(self, text: str, loc: str = "", url: str | None = None
              ) -> tuple[str | None, str | None]:  # fmt: skip
        """(the cleaned text, its language as ``DocStats.language`` names it: "en", "zh",
        "und", ...), or (None, None) when the document is removed. The language is the one the
        filters judged the text by, before PII redaction (preprocess's ``split_languages``
        shards by it). ``url``: the document's URL, checked against ``blocked_domains`` first
        (no URL: not checked, counted in ``urls["no_url"]``)."""
        self.seen += 1
        if self.cfg.blocked_domains:
            host = host_of(url) if url else None
            self.urls["checked" if host else "no_url"] += 1
            if host and load_domain_list(self.cfg.blocked_domains).blocks(host):
                self._remove("blocked_domain", f"{loc}: {url}" if loc else url)
                return None, None
        text = original = normalize_text(text)
        reason = None
        if self.cfg.strip_boilerplate_lines:
            text, n_removed, char_frac = strip_boilerplate(text)
            self.lines_stripped += n_removed
            if char_frac > self.cfg.max_boilerplate_char_frac:
                reason = "boilerplate"
        stats = DocStats(text)
        reason = reason or first_failure(stats, self.cfg)
        if reason is not None:
            shown = original if reason == "boilerplate" else text
            self._remove(reason, f"{loc}: {shown[:200]!r}" if loc else repr(shown[:200]))
            return None, None
        if self.cfg.classifier and not self._classifier_keeps(stats, loc):
            return None, None
        self.languages[stats.language] += 1
        if self.cfg.redact_pii:
            text, counts = redact_pii(text)
            self.pii.update(counts)
        return text, stats.language

    def _classifier_keeps(self, stats: DocStats, loc: str) -> bool:
        """Scores the text the filters judged (the words they split, when the classifier
        lowercases as they do); counts and keeps an example of one below the threshold."""
        clf = load_classifier(self.cfg.classifier)  # (cached: a stat per document)
        words = stats.words if clf.lowercase else clf.words(stats.text)
        score = clf.score_words(words)
        self.scores.add([score])
        if score >= self.cfg.classifier_min_score:
            return True
        shown = f"score {score:.4f}: {stats.text[:200]!r}"
        self._remove("classifier_low", f"{loc}: {shown}" if loc else shown)
        return False

    def _remove(self, reason: str, example: str) -> None:
        count_removed(self.removed, self.examples, reason, example)

    def merge(self, other: Cleaner) -> None:
        self.seen += other.seen
        self.removed.update(other.removed)
        self.pii.update(other.pii)
        self.lines_stripped += other.lines_stripped
        self.languages.update(other.languages)
        self.urls.update(other.urls)
        if other.scores is not None:
            if self.scores is None:
                self.scores = ScoreHistogram()
            self.scores.merge(other.scores)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: MAX_EXAMPLES - len(self.examples[k])])

    def report(self) -> dict:
        return {
            **stage_report(self.seen, self.removed, self.examples),
            "pii_redacted": dict(self.pii),
            "boilerplate_lines_stripped": self.lines_stripped,
            "languages": dict(self.languages),
            # with blocked_domains: documents whose URL was checked / that had none
            **({"urls": dict(self.urls)} if self.cfg.blocked_domains else {}),
            # with clean.classifier: which one, the threshold, the scores' percentiles
            **({"classifier": self.classifier_section()} if self.cfg.classifier else {}),
        }

    def classifier_section(self, scores: ScoreHistogram | None = None) -> dict:
        """The report's "classifier" section, of ``scores`` (default: this cleaner's)."""
        hist = scores if scores is not None else self.scores
        hist = hist if hist is not None else ScoreHistogram()
        return classifier_report(self.cfg.classifier, self.cfg.classifier_min_score, hist)
