"""Which language a document is in, from its function words (``identify``), and the stop-word
lists the quality rule reads per language (``STOP_WORDS``).

Cleaning keeps the languages ``clean.languages`` names and checks each document against its
own language's stop words (Gopher's rule, Rae et al. 2021: a document with fewer than two of
a handful of the commonest words is not prose). Before this module every Latin-script document
was judged by the English list, so French, German or Spanish text was dropped as "stop_words"
whatever its quality, and ``min_stop_words=0`` was the only way to keep it (with every
gibberish page beside it).

Identification counts, for each language written in the document's script, how many of its
words are among that language's commonest function words (``PROFILES``: about forty each;
articles, prepositions, pronouns, auxiliaries). The language with the most such words wins
when at least ``MIN_DISTINCT`` different ones occur; a tie, or no language with that many,
is "und" (undetermined). Function words are what distinguishes a language in a few dozen
words of any topic, and needs no model or download; it is not a statistical classifier:
languages without a profile (Finnish, Czech, Danish ...) come out "und" or as their nearest
profiled neighbour (Danish as Swedish), and a page mixing two languages gets the one it uses
more. Han text is "zh", kana "ja", hangul "ko"; other scripts (greek, arabic, devanagari) are
named by their script.

The profiles share words where languages do ("de" is French, Spanish, Portuguese and Dutch;
"in" English, German, Italian and Dutch), listed for every language where the word is common,
so a shared word never tips the count; tests/data/test_clean_lang.py holds paragraphs in every
language and the confusable pairs (Spanish/Portuguese/Italian, Dutch/German, Russian/
Ukrainian).
"""

from __future__ import annotations

import re
from collections import Counter

# The commonest function words of each language, by script. Lower case; words as letter runs
# (an apostrophe splits "l'homme" into "l", "homme"). Written for this module.
PROFILES: dict[str, dict[str, frozenset[str]]] = {
    "latin": {
        "en": frozenset(
            "the of and to in a is that for it as was with be by on not he this are or his from "
            "at which but have an they you were her she there been their has would will we can "
            "who its had what when more about into also than them i".split()
        ),
        "de": frozenset(
            "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als "
            "auch es an werden aus er hat dass sie nach wird bei einer um am sind noch wie "
            "einem über einen so zum war haben nur oder aber vor zur bis durch".split()
        ),
        "fr": frozenset(
            "de la le et les des en un du une que est pour qui dans a par plus pas au sur ne se "
            "il sont ce avec elle ou mais nous vous on leur cette été aux son sa ses comme tout "
            "lui fait être".split()
        ),
        "es": frozenset(
            "de la que el en y los del se las por un para con no una su al lo como más pero sus "
            "le ya este porque esta entre cuando muy sin sobre también me hasta hay donde desde "
            "todo nos es son fue ha a".split()
        ),
        "it": frozenset(
            "di e il la che è per un in non una del le si da sono lo della con al nel ma come "
            "anche alla più gli dei questo delle ha se ci era tra essere loro nella stato dal "
            "degli ne mi suo sua i a".split()
        ),
        "pt": frozenset(
            "de a o que e do da em um para é com não uma os no se na por mais as dos como mas "
            "foi ao ele das tem à seu sua ou ser quando muito há nos já está eu também pelo "
            "pela até isso ela entre sem".split()
        ),
        "nl": frozenset(
            "de van een het en in is dat op te zijn met voor niet aan er die als ook bij door "
            "om maar dan werd wordt of uit nog naar over hij zich tot was kan deze heeft hebben "
            "wel meer geen ze haar".split()
        ),
        "sv": frozenset(
            "och i att det som en på är av för med till den har de inte om ett han men var jag "
            "sig från vi så kan man när år sin ska hade vid eller efter upp nu alla under mot "
            "då hon".split()
        ),
        "pl": frozenset(
            "i w z na się nie do to że jest o a jak po co tak za od ale jego przez tym są być "
            "jako dla który było już może tylko ich czy też jej go przy tego które jednak lub "
            "tej bardzo gdy".split()
        ),
    },
    "cyrillic": {
        "ru": frozenset(
            "и в не на что с по как он это из а к но у за от то она так его же для о все было "
            "вы бы только я мы ещё уже или был её при мне если до они когда".split()
        ),
        "uk": frozenset(
            "і в на що не з у до та як це й за від по але ти його для він я є ми ж вона так чи "
            "бути які також або ще вже мене їх при коли".split()
        ),
    },
}
# The script's language where it has one; scripts in neither table are named by themselves.
SCRIPT_LANGUAGE = {"han": "zh", "kana": "ja", "hangul": "ko"}
UNDETERMINED = "und"  # (ISO 639-2's code for it)
MIN_DISTINCT = 2  # different profile words a language needs to be named

# The stop-word rule's lists (clean_config().min_stop_words distinct ones, else "stop_words"):
# Gopher's eight English words, and eight of the commonest words of each other language.
STOP_WORDS = {
    "en": frozenset({"the", "be", "to", "of", "and", "that", "have", "with"}),
    "de": frozenset({"der", "die", "und", "das", "ist", "zu", "mit", "den"}),
    "fr": frozenset({"le", "la", "les", "et", "est", "que", "des", "pour"}),
    "es": frozenset({"el", "la", "los", "que", "y", "es", "por", "con"}),
    "it": frozenset({"il", "la", "che", "e", "è", "per", "di", "non"}),
    "pt": frozenset({"o", "os", "que", "e", "é", "do", "com", "não"}),
    "nl": frozenset({"de", "het", "een", "en", "van", "is", "dat", "niet"}),
    "sv": frozenset({"och", "att", "det", "som", "är", "på", "av", "för"}),
    "pl": frozenset({"i", "w", "z", "się", "nie", "na", "jest", "że"}),
    "ru": frozenset({"и", "в", "не", "на", "что", "с", "это", "как"}),
    "uk": frozenset({"і", "в", "не", "на", "що", "з", "це", "як"}),
    "zh": frozenset("的了是在和有不这也就都我他们"),
}
# Undetermined text of a script is held to this language's list (Latin: English, as before
# languages were told apart, so text no profile recognises still needs Gopher's words).
UNDETERMINED_RULE = {"latin": "en"}

_LETTERS_RE = re.compile(r"[^\W\d_]+")


def known_languages(scripts) -> list[str]:
    """Every name ``DocStats.language`` can give: the profiled languages, the CJK scripts'
    languages and the other scripts' own names (``scripts``: every script clean knows)."""
    names = {code for table in PROFILES.values() for code in table}
    names |= set(SCRIPT_LANGUAGE.values())
    names |= {s for s in scripts if s not in PROFILES and s not in SCRIPT_LANGUAGE}
    return sorted(names | {UNDETERMINED})


def identify(text: str, script: str) -> str:
    """The language of `text` among `script`'s profiles (see the module docstring), "und"
    when none has MIN_DISTINCT words in it or the top two tie; for a script without profiles,
    its language (``SCRIPT_LANGUAGE``) or its own name."""
    table = PROFILES.get(script)
    if table is None:
        return SCRIPT_LANGUAGE.get(script, script)
    counts = Counter(_LETTERS_RE.findall(text.lower()))
    scores = []
    for code, words in table.items():
        present = [w for w in words if w in counts]
        if len(present) >= MIN_DISTINCT:
            scores.append((sum(counts[w] for w in present), len(present), code))
    if not scores:
        return UNDETERMINED
    scores.sort(reverse=True)
    if len(scores) > 1 and scores[0][:2] == scores[1][:2]:
        return UNDETERMINED
    return scores[0][2]


def stop_words_for(language: str, script: str) -> frozenset[str] | None:
    """The stop-word rule's list for a document of `language` in `script` (None: no rule)."""
    if language == UNDETERMINED:
        language = UNDETERMINED_RULE.get(script, UNDETERMINED)
    return STOP_WORDS.get(language)
