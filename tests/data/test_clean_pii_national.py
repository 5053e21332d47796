"""National phone numbers without '+' (data/clean_pii.py): redacted after a phone word in the
languages the cleaner keeps, left alone without one (lists, scores, dates, prices, pages), and
never on their shape alone; the window the word must be in, several numbers after one word,
full-width digits and the groupings the numeric patterns redacted before (still redacted)."""

import pytest

from flaxlm.data.clean_pii import redact_pii

# (text with a phone word, redacted, the same number with a neutral word instead)
WITH_A_PHONE_WORD = [
    # fr: pairs, with spaces, dots and no-break spaces; a CJK text with a French number
    ("Tél. : 06 12 34 56 78, le soir.", "Tél. : <PHONE>, le soir.",
     "Code : 06 12 34 56 78, le soir."),
    ("Téléphone fixe : 01.23.45.67.89", "Téléphone fixe : <PHONE>",
     "Référence interne : 01.23.45.67.89"),
    ("Portable\u00a0: 06\u00a012\u00a034\u00a056\u00a078", "Portable\u00a0: <PHONE>",
     "Dossier\u00a0: 06\u00a012\u00a034\u00a056\u00a078"),
    ("Appelez le 0612345678 !", "Appelez le <PHONE> !", "Le lot 0612345678 !"),
    # en (UK): mobile 5 + 6, landline 5 + 6
    ("Call us on 07700 900123 today.", "Call us on <PHONE> today.",
     "Order ref 07700 900123 today."),
    ("Tel 01632 960123 (office)", "Tel <PHONE> (office)", "Box 01632 960123 (office)"),
    # es: mobile 3-2-2-2, Madrid 2-3-2-2
    ("Llámenos al 612 34 56 78.", "Llámenos al <PHONE>.", "Resultados del 612 34 56 78."),
    ("Teléfono: 91 123 45 67", "Teléfono: <PHONE>", "Sorteo: 91 123 45 67"),
    # sv
    ("Ring oss på 070-123 45 67.", "Ring oss på <PHONE>.", "Lottnummer 070-123 45 67."),
    ("Telefon: 08-123 456 78", "Telefon: <PHONE>", "Artikel: 08-123 456 78"),
    # de: area code and number separated by '/'
    ("Tel.: 030/12345678", "Tel.: <PHONE>", "Az.: 030/12345678"),
    ("Handy: 0171/1234567", "Handy: <PHONE>", "Akte: 0171/1234567"),
    # it: 4-2-2-2
    ("Telefono: 0471 12 34 56", "Telefono: <PHONE>", "Protocollo: 0471 12 34 56"),
    # nl: pairs
    ("Mobiel: 06 12 34 56 78", "Mobiel: <PHONE>", "Uitslag: 06 12 34 56 78"),
    # pl: Warsaw 2-3-2-2
    ("tel. 22 123 45 67", "tel. <PHONE>", "nr 22 123 45 67"),
    # pt: freephone 3-2-2-2
    ("Ligue para o 800 20 30 40.", "Ligue para o <PHONE>.", "Veja o 800 20 30 40."),
    # ru: trunk 8 and the area code in brackets; mobile with dashes
    ("Телефон: 8 (495) 123-45-67", "Телефон: <PHONE>", "Артикул: 8 (495) 123-45-67"),
    ("тел. 8 912 345-67-89", "тел. <PHONE>", "код 8 912 345-67-89"),
    # uk
    ("Телефонуйте: 067 123 45 67", "Телефонуйте: <PHONE>", "Рахунок: 067 123 45 67"),
    ("Дзвоніть (044) 123-45-67", "Дзвоніть <PHONE>", "Код (044) 123-45-67"),
    # Switzerland, in German
    ("Tel. 044 668 18 00", "Tel. <PHONE>", "Los 044 668 18 00"),
    # zh: no space after the word
    ("电话：06 12 34 56 78", "电话：<PHONE>", "编号：06 12 34 56 78"),
    ("联系手机06 12 34 56 78", "联系手机<PHONE>", "比分是06 12 34 56 78"),
]  # fmt: skip


@pytest.mark.parametrize("text,redacted,neutral", WITH_A_PHONE_WORD)
def test_a_national_number_after_a_phone_word_is_redacted(text, redacted, neutral):
    assert redact_pii(text) == (redacted, {"PHONE": 1})
    # Without the phone word the digits are left: the grouping alone says nothing.
    assert redact_pii(neutral) == (neutral, {})


@pytest.mark.parametrize(
    "text",
    ["Les scores : 01 02 03 04 05", "Tirage du loto : 05 12 23 34 45", "Né le 12 03 2024",
     "Prix : 1 234 567 €", "voir page 06 12", "Résultats 06 12 34 56 78 et 01 23 45 67 89",
     "Ziehung: 06.12.34.56.78", "Scores 070-123 45 67 and 612 34 56 78"],
)  # fmt: skip
def test_lists_scores_dates_prices_and_pages_are_no_phones(text):
    # "01 02 03 04 05" is France's 0X XX XX XX XX exactly, and so are most sorted draws: no
    # grouping is redacted on its shape alone.
    assert redact_pii(text) == (text, {})


@pytest.mark.parametrize(
    "text",
    ["Rappel : appelez-nous le 12 03 2024 à 10 h", "Tel. 12.03.2024", "Call on 2023-03-12",
     "Mobile 2023 2024 season", "Phone sales: 1 234 567 units", "Telefon 1.299.000 Stück",
     "Call lines open 9.00-17.30", "Call of Duty 2 3 4 5 6 7 8", "Tel 123456",
     "Tel 12345678901234", "Tel. 06 12 34 56 78 01 23 45 67 89", "Telefon 1.299,00 EUR"],
)  # fmt: skip
def test_after_a_phone_word_dates_years_counts_and_lists_stay(text):
    """Dates, year lists, thousands-separated counts, opening hours, lists of one-digit
    groups, fewer than 7 or more than 13 digits, two numbers run into one and decimals."""
    assert redact_pii(text) == (text, {})


@pytest.mark.parametrize(
    "text,redacted",
    [
        # Up to three words between the word and the number, and within 40 characters.
        ("Call us on weekdays 07700 900123", "Call us on weekdays <PHONE>"),
        ("Call us on all weekdays 07700 900123", "Call us on all weekdays 07700 900123"),
        ("Téléphone portable professionnel : 06 12 34 56 78",
         "Téléphone portable professionnel : <PHONE>"),
        ("Telefonnummer der Geschäftsstellenleitung: 030/12345678",
         "Telefonnummer der Geschäftsstellenleitung: 030/12345678"),
        ("Téléphone : voir la liste affichée à l'accueil, 06 12 34 56 78",
         "Téléphone : voir la liste affichée à l'accueil, 06 12 34 56 78"),
        # On the next line of a contact block.
        ("Telefon:\n070-123 45 67", "Telefon:\n<PHONE>"),
        # A phone word is a whole word; a placeholder is none.
        ("iPhone 06 12 34 56 78", "iPhone 06 12 34 56 78"),
        ("microphone 06 12 34 56 78", "microphone 06 12 34 56 78"),
        ("+44 20 7946 0958 and 01 02 03 04 05", "<PHONE> and 01 02 03 04 05"),
        # A phone word after the number does not count.
        ("06 12 34 56 78 (portable)", "06 12 34 56 78 (portable)"),
    ],
)  # fmt: skip
def test_the_window_before_the_number(text, redacted):
    out, counts = redact_pii(text)
    assert out == redacted
    assert counts == ({"PHONE": redacted.count("<PHONE>")} if "<" in redacted else {})


@pytest.mark.parametrize(
    "text,redacted",
    [
        ("Tel. 06 12 34 56 78 / 01 23 45 67 89", "Tel. <PHONE> / <PHONE>"),
        ("Tél. 06 12 34 56 78 ou 01 23 45 67 89 (fixe)", "Tél. <PHONE> ou <PHONE> (fixe)"),
        ("Telefon: 030/12345678, 0171/1234567 oder 040/7654321",
         "Telefon: <PHONE>, <PHONE> oder <PHONE>"),
        # After an international number (redacted by the numeric pass), in one list.
        ("Tel. +33 1 23 45 67 89, 06 12 34 56 78", "Tel. <PHONE>, <PHONE>"),
        # A sentence between: the list has ended.
        ("Tél. 06 12 34 56 78. Les résultats du tirage : 01 02 03 04 05",
         "Tél. <PHONE>. Les résultats du tirage : 01 02 03 04 05"),
    ],
)  # fmt: skip
def test_several_numbers_after_one_phone_word(text, redacted):
    assert redact_pii(text) == (redacted, {"PHONE": redacted.count("<PHONE>")})


@pytest.mark.parametrize(
    "text,redacted",
    [
        ("電話：０６ １２ ３４ ５６ ７８まで", "電話：<PHONE>まで"),
        ("ＴＥＬ ０６ １２ ３４ ５６ ７８", "ＴＥＬ <PHONE>"),
        ("得分：０１ ０２ ０３ ０４ ０５", "得分：０１ ０２ ０３ ０４ ０５"),
    ],
)
def test_full_width_digits_and_words(text, redacted):
    out, counts = redact_pii(text)
    assert out == redacted
    assert counts == ({"PHONE": 1} if "<PHONE>" in redacted else {})


@pytest.mark.parametrize(
    "number",
    ["020 7946 0958", "030 12345678", "0171 1234567", "06 1234 5678", "06-12345678",
     "020 123 4567", "601 234 567", "(030) 1234567", "912 345 678"],
)  # fmt: skip
def test_groupings_the_numeric_patterns_take_stay_redacted_without_a_word(number):
    # UK, German, Italian, Dutch, Polish, Portuguese numbers in 2-4 + 3-4 + 3-4 digit groups
    # were redacted before the phone-word rule, with or without a word, and still are.
    for text in (f"Notes: {number}.", f"Tel. {number}."):
        out, counts = redact_pii(text)
        assert out == text.replace(number, "<PHONE>") and counts == {"PHONE": 1}, text


def test_other_pii_next_to_a_national_number():
    text = "Tél. 06 12 34 56 78, mail jean@exemple.fr, IBAN FR1420041010050500013M02606, 2024."
    assert redact_pii(text) == (
        "Tél. <PHONE>, mail <EMAIL>, IBAN <IBAN>, 2024.",
        {"PHONE": 1, "EMAIL": 1, "IBAN": 1},
    )
