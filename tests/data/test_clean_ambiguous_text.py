"""Cleaning on text that looks like something else: PII next to other numbers, code and tables
among boilerplate lines, separating controls, word-list words with combining marks or
look-alike letters, and eval items whose lines the line cleaner would strip."""

import json
import logging
import unicodedata

import pytest

from flaxlm.data import clean, dedup, preprocess

EN = (
    "The river runs past the old mill and into the valley, where farmers have grown wheat for "
    "centuries. In spring the water rises with snow from the mountains, and the village gathers "
    "to watch the first boats of the season."
)


@pytest.mark.parametrize(
    "text,redacted",
    [
        # A card followed by its CVV or expiry: the whole digit run failed the Luhn check.
        ("Card 4111 1111 1111 1111 123 ok", "Card <CARD> 123 ok"),
        ("Card 4111-1111-1111-1111 12/25 ok", "Card <CARD> 12/25 ok"),
        ("Card 5555 5555 5555 4444 1234.", "Card <CARD> 1234."),  # 20 digits: the regex's own
        # backtracking ends the match at the 16th (so this one was redacted before too)
        # A trunk "(0)" after the country code stopped the match (or left "+44 (0)").
        ("Tel. +41 (0)44 668 18 00", "Tel. <PHONE>"),
        ("Tel +33 (0)1 23 45 67 89", "Tel <PHONE>"),
        ("Tel. +44 (0)20 7946 0958.", "Tel. <PHONE>."),
        # A bracketed area code after the country code: the whole number was left.
        ("Tel. +7 (495) 123-45-67.", "Tel. <PHONE>."),
        ("Tel +55 (11) 91234-5678 or +380 (44) 123-45-67", "Tel <PHONE> or <PHONE>"),
        ("Tel +90 (212) 123 45 67, +1 (415) 555 26 71", "Tel <PHONE>, <PHONE>"),
        # Bracketed IPv6 addresses in URLs are still addresses.
        ("open http://[2001:db8::1]:8080/ now", "open http://[<IP>]:8080/ now"),
        ("peer [fe80::1] up", "peer [<IP>] up"),
    ],
)
def test_pii_next_to_other_numbers(text, redacted):
    out, counts = clean.redact_pii(text)
    assert out == redacted
    assert sum(counts.values()) == redacted.count("<")


@pytest.mark.parametrize(
    "text",
    [
        # Slices with a 4-digit start: "1024::4" looked like an address.
        "b = a[1024::4]",
        "x = arr[1000::10]",
        "y = t[2048::]",
        "z = m[0][4096::2]",
        "route 1024::4",  # first group below 0x2000: no address in use starts there
        # A four-part version or section number after the word that says so.
        "Chapter 10.1.1.1 section",
        "release v1.2.3.4 is out",
        "see § 4.1.2.3 and version 2.0.0.1",
    ],
)
def test_slices_and_version_numbers_are_not_addresses(text):
    assert clean.redact_pii(text) == (text, {})


def test_a_card_prefix_must_end_at_a_separator_and_pass_the_check():
    # Without a separator the 19 digits are one number; a prefix failing Luhn is no card either.
    run = "4111111111111111123"
    assert not clean._luhn_ok(run)
    assert clean.redact_pii(f"id {run} x")[1].get("CARD", 0) == 0
    bad = "4111 1111 1111 1112 123"
    assert not any(clean._luhn_ok(bad.replace(" ", "")[:k]) for k in (16, 19))
    assert clean.redact_pii(f"order {bad}")[1].get("CARD", 0) == 0


def test_separator_lines_go_but_code_tables_and_emoji_stay():
    story = "The fisherman rowed out before dawn and came back with a boat full of silver fish."
    code = "function f() {\n  return g(() => {\n    x();\n  });\n}"
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    keep = [code, table, "Party time!\n🎉🎉🎉", 'def f():\n    """\n    Doc.\n    """']
    for text in keep:
        assert clean.strip_boilerplate(text) == (text, 0, 0.0), text
    seps = ["-----", "=====", "* * *", "***", "_____", "────────", "##########"]
    page = "\n".join([story, *seps])
    assert clean.strip_boilerplate(page)[:2] == (story, len(seps))


def test_prose_naming_javascript_or_login_is_not_boilerplate():
    prose = [
        "If JavaScript is disabled in the browser, the form falls back to a plain POST request "
        "and the server renders the confirmation page itself, so nothing breaks for those users.",
        "Students must log in to the portal before the exam starts.",
        "New members can sign up for free at the front desk of any branch library.",
    ]
    for line in prose:
        assert clean.strip_boilerplate(line)[1] == 0, line
    story = "The fisherman rowed out before dawn and came back with a boat full of silver fish."
    nav = ["Log in to comment", "Sign up for free", "Home » Log in", "Search | Log in | Sign up"]
    assert clean.strip_boilerplate("\n".join([story, *nav]))[:2] == (story, len(nav))


@pytest.mark.parametrize(
    "sep,line_break",
    [("\x0b", True), ("\x0c", True), ("\x1c", True), ("\x1e", True), ("\x85", True),
     ("\u2028", True), ("\u2029", True), ("\x1f", False)],
)  # fmt: skip
def test_separating_controls_become_whitespace_not_glue(sep, line_break):
    text = f"page one ends here{sep}Page two"
    assert clean.normalize_text(text) == "page one ends here" + ("\n" if line_break else " ") + (
        "Page two"
    )
    assert dedup.match_words(text) == ["page", "one", "ends", "here", "page", "two"]
    assert dedup.exact_key(text) == dedup.exact_key("page one ends here Page two")


def test_word_list_words_keep_their_combining_marks(tmp_path):
    hi = tmp_path / "hi.txt"
    hi.write_text("मार\n", encoding="utf-8")
    # Vowel signs are part of the word: मार is not inside बीमारी ("illness") or कुमार (a name).
    assert unicodedata.category("ी") == "Mc"
    assert clean.toxic_hits("बीमारी फैल रही है", str(hi)) == 0
    assert clean.toxic_hits("कुमार आया", str(hi)) == 0
    assert clean.toxic_hits("उसने मार खाई", str(hi)) == 1
    # Arabic vowel marks are optional: the vowelled spelling matches the bare entry, and back.
    ar = tmp_path / "ar.txt"
    ar.write_text("كلب\n", encoding="utf-8")
    assert clean.toxic_hits("أنت كَلْب", str(ar)) == 1
    ar.write_text("كَلْب\n", encoding="utf-8")
    assert clean.toxic_hits("أنت كلب", str(ar)) == 1


def test_word_list_matches_look_alike_letters(tmp_path):
    for text in ("You ＩＤＩＯＴ", "You 𝐢𝐝𝐢𝐨𝐭", "You 𝕀𝔻𝕀𝕆𝕋"):
        assert clean.toxic_hits(clean.normalize_text(text)) == 1, text
    # Entries are compared in the same form: a full-width entry matches plain text.
    wl = tmp_path / "list.txt"
    wl.write_text("ＳＴＵＰＩＤ ＦＯＯＬ\n", encoding="utf-8")
    assert clean.toxic_hits("what a Stupid fool", str(wl)) == 1


def test_decontamination_keeps_eval_items_the_line_cleaner_would_empty(tmp_path, caplog):
    """A one-line eval question naming a "privacy policy" was stripped as a footer line and gave
    no n-gram, while the training document quoting it inside a paragraph kept it."""
    q = (
        "Which company quietly rewrote its privacy policy in 2018 after regulators in Brussels "
        "opened a formal investigation?"
    )
    # Each half is shorter than 13 words; the training copy lost the footer line between them.
    part1 = "Name the port town whose harbour froze solid during"
    part2 = "the long winter that ended a century of herring trade"
    item2 = f"{part1}\nPrivacy Policy\n{part2}"
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"text": t}) + "\n" for t in (q, item2)))
    cfg = preprocess.preprocess_config()
    cfg.dedup.decontam_paths = str(ev)
    cleaner = clean.Cleaner(cfg.clean)
    doc1 = cleaner(f"{EN}\n\nQuiz of the week: {q} The answer was the social network.")
    doc2 = cleaner(f"{EN}\n\n{item2}")
    assert q in doc1 and f"{part1}\n{part2}" in doc2
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        d = dedup.Decontaminator(preprocess.load_eval_texts(cfg), cfg.dedup.decontam_ngram)
        d.warn()
    assert d.summary()["too_short"] == 0 and "decontam" not in caplog.text
    assert d.hits(doc1) > 0 and d.hits(doc2) > 0 and d.hits(EN) == 0
    # An item that is short once cleaned: the warning says so.
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        dedup.Decontaminator(["Name the river", q], 13).warn()
    assert "shorter than dedup.decontam_ngram=13 words after cleaning" in caplog.text


def test_rows_of_numbers_are_no_card_followed_by_a_cvv():
    """The CVV rule tries only the card as printed (4-4-4-4, 4-6-5, 4-6-4, then a 3-4 digit CVV
    or an expiry): trying every 13+ digit prefix at a separator redacted scores, draws and
    sudoku lines, one prefix in ten passing Luhn by chance."""
    rows = [
        "Scores 23 45 67 12 89 34 56 78 90 today",
        "lottery 2 3 4 5 6 7 8 9 2 3 4 5 6 7 8 9 2",
        "5 3 4 6 7 8 9 1 2 6 7 2 1 9 5 3 4 8 1 9 8 3 4 2 5 6 7",
    ]
    for text in rows:
        assert clean.redact_pii(text) == (text, {}), text
    assert clean.redact_pii("Amex 3782 822463 10005 1234 x")[0] == "Amex <CARD> 1234 x"


@pytest.mark.parametrize(
    "text,redacted",
    [
        # A card followed by a 2-digit group is a card and its expiry only with a '/' after:
        # a row of numbers ending in a score stays (the Luhn-valid prefix is chance).
        ("4111 1111 1111 1111 12 ok", "4111 1111 1111 1111 12 ok"),
        # The lowest first group of an address in use, 2000::/3.
        ("server 2000::1 down", "server <IP> down"),
        # All six leading groups and an IPv4 tail: six colons, no "::".
        ("addr 0:0:0:0:0:ffff:192.168.1.1 x", "addr <IP> x"),
    ],
)
def test_pii_at_the_edges_of_the_card_and_ipv6_rules(text, redacted):
    assert clean.redact_pii(text)[0] == redacted


def test_line_cleaning_at_its_word_limits_and_on_unstripped_lines():
    """A footer phrase on a line of exactly 20 words goes (<= 20 is short); a '|'-separated
    line with a log-in link is navigation only up to 20 words; a separator line is one symbol
    three times or more, with leading spaces too; two symbols are no separator."""
    twenty = " ".join(["word"] * 18) + " privacy policy"
    assert clean.strip_boilerplate(f"intro\n{twenty}\nmore")[0] == "intro\nmore"
    prose = " ".join(["students"] * 22) + " | log in to the portal"
    assert clean.strip_boilerplate(f"intro\n{prose}\nmore")[0] == f"intro\n{prose}\nmore"
    out, removed, _ = clean.strip_boilerplate("intro\n   * * *\n  -----  \nmore")
    assert (out, removed) == ("intro\nmore", 2)
    assert clean.strip_boilerplate("intro\n--\nmore")[0] == "intro\n--\nmore"


def test_windows_line_ends_become_one_newline():
    assert clean.normalize_text("first\r\nsecond\rthird") == "first\nsecond\nthird"
