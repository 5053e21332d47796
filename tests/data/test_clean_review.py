"""Cleaning review: email scan time on apostrophe runs, code lines kept by line cleaning,
'00'-prefixed international numbers, zero-padded IPv4 octets and full-width PII redacted."""

import time

import pytest

from flaxlm.data import clean


@pytest.mark.parametrize("unit", ["a'", "x’", "'", "a''", "é+'"])
def test_email_scan_is_linear_on_runs_of_apostrophes(unit):
    # Each character after an apostrophe started a run, and each start scanned the rest of the
    # run for an '@': 100 KB of "a'a'a'..." before an address took 83 s (quadratic).
    text = unit * (40_000 // len(unit)) + "@example.com and the rest of the page"
    t0 = time.perf_counter()
    clean.redact_pii(text)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "text,redacted",
    [
        ("Write to patrick.o'neill@example.ie today.", "Write to <EMAIL> today."),
        ("Write to 'bob@example.com' today.", "Write to '<EMAIL>' today."),
        ("Write to ’bob@example.com’ today.", "Write to ’<EMAIL>’ today."),
        ("l'adresse bob@example.fr marche", "l'adresse <EMAIL> marche"),
        ("it's d'arcy@example.com", "it's <EMAIL>"),
        ("zhangsan@qq.com", "<EMAIL>"),
    ],
)
def test_emails_with_apostrophes_still_redacted(text, redacted):
    assert clean.redact_pii(text)[0] == redacted


def test_repl_prompts_and_tilde_fences_are_not_separator_lines():
    # Python's empty prompt lines (">>>", "...") and markdown's "~~~" code fences are code: as
    # "one symbol three times" they were stripped, 4 of the 8 lines of this tutorial snippet.
    tutorial = (
        "Loop in the interpreter:\n"
        ">>> for i in range(2):\n...     print(i)\n...\n0\n1\n>>>\n"
        "~~~python\nprint('hi')\n~~~"
    )
    assert clean.strip_boilerplate(tutorial) == (tutorial, 0, 0.0)
    # Real separators still go.
    story = "The fisherman rowed out before dawn and came back with a boat full of silver fish."
    assert clean.strip_boilerplate(f"{story}\n* * *\n-----\n{story}")[1] == 2


@pytest.mark.parametrize(
    "number",
    ["0044 20 7946 0958", "001 415 555 2671", "0033 1 23 45 67 89", "0049 30 1234567",
     "0041 (0)44 668 18 00", "0091 98765 43210"],
)  # fmt: skip
def test_international_numbers_with_00_prefix_are_phones(number):
    # "+44 20 7946 0958" was redacted and "0044 20 7946 0958" (the same number with the
    # international call prefix written out, as much of Europe does) was not.
    assert clean.redact_pii(f"Call {number} today.")[0] == "Call <PHONE> today."


@pytest.mark.parametrize(
    "text",
    ["GTIN 00012345678905", "order 0012345", "0.05 0.10 0.15", "score 00 12 34",
     "ISBN 978-3-16-148410-0", "1999 2000", "since 2001 and 2002"],
)  # fmt: skip
def test_00_prefix_is_no_phone_without_a_number_after_it(text):
    assert clean.redact_pii(text)[1].get("PHONE", 0) == 0


@pytest.mark.parametrize("ip", ["192.168.001.001", "010.000.000.001", "008.008.008.008"])
def test_zero_padded_ipv4_octets(ip):
    # Zero-padded octets (logs, router pages) left the address in the text: "1?\d?\d" took
    # "01" but not "001".
    assert clean.redact_pii(f"from {ip} at noon")[0] == "from <IP> at noon"


def test_00_prefix_needs_a_separator_after_the_country_code():
    # UPC/EAN codes of US products are 13 digits from "00" ("0012000161155"): one run, not a
    # phone; written out, the international prefix is followed by a grouped number.
    for code in ["0012000161155", "0012345678905", "ratio 1:0012345678", "pi 3.0012345678"]:
        assert clean.redact_pii(code)[1].get("PHONE", 0) == 0, code


@pytest.mark.parametrize(
    "text,redacted",
    [
        ("電話：０３－１２３４－５６７８まで", "電話：<PHONE>まで"),
        ("电话１３８１２３４５６７８，谢谢", "电话<PHONE>，谢谢"),
        ("电话：＋８６ １３８１２３４５６７８", "电话：<PHONE>"),
        ("メール：ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ", "メール：<EMAIL>"),
        ("ＩＰ：１９２．１６８．１．１です", "ＩＰ：<IP>です"),
        ("カード４１１１１１１１１１１１１１１１", "カード<CARD>"),
        ("身份证１１０１０５１９４９１２３１００２Ｘ。", "身份证<ID>。"),
    ],
)
def test_full_width_pii_is_redacted_and_the_rest_kept_as_written(text, redacted):
    # Japanese and Chinese pages write numbers and addresses in full-width forms (U+FF01-FF5E),
    # which NFC keeps: 6 of these 7 were left whole (the patterns' '+', '@', '.', '-' and
    # leading digits are ASCII). The text around a match keeps its full-width forms.
    assert clean.redact_pii(text)[0] == redacted


def test_full_width_text_without_pii_is_unchanged():
    for text in [
        "２０２３年１０月１５日",
        "価格は１，２３４円（税込）",
        "〒１００－０００１ 東京都",
    ]:
        assert clean.redact_pii(text) == (text, {}), text
