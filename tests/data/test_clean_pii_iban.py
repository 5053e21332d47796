"""IBAN redaction (data/clean_pii.py): bank account numbers of every registry country, printed
whole or in groups of four, against check digits computed here from the standard's formula;
a mistyped one, another country's length, spacing not in fours and lookalike codes are left
(the numeric pass may still read their digits as a phone or card, as before)."""

import random
import string

import pytest

from flaxlm.data.clean_pii import _IBAN_LENGTHS, redact_pii


def _check_digits(country: str, bban: str) -> str:
    """ISO 13616: 98 − (BBAN + country + "00", letters as 10..35) mod 97, two digits."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(digits) % 97:02d}"


def _iban(country: str, rng: random.Random) -> str:
    n = _IBAN_LENGTHS[country] - 4
    bban = "".join(rng.choice(string.digits + string.ascii_uppercase) for _ in range(n))
    return country + _check_digits(country, bban) + bban


def _in_fours(code: str) -> str:
    return " ".join(code[i : i + 4] for i in range(0, len(code), 4))


@pytest.mark.parametrize(
    "iban",
    ["DE89370400440532013000", "GB29NWBK60161331926819", "FR1420041010050500013M02606",
     "NL91ABNA0417164300", "BE68539007547034", "CH9300762011623852957",
     "ES9121000418450200051332", "IT60X0542811101000000123456", "NO9386011117947",
     "PL61109010140000071219812874"],
)  # fmt: skip
def test_published_example_ibans_are_redacted_whole_and_in_fours(iban):
    assert _check_digits(iban[:2], iban[4:]) == iban[2:4]  # (the examples are valid)
    for printed in (iban, _in_fours(iban)):
        text, counts = redact_pii(f"Please pay to {printed}, thanks.")
        assert text == "Please pay to <IBAN>, thanks." and counts == {"IBAN": 1}, printed


def test_every_registry_country_with_random_accounts():
    rng = random.Random(0)
    for country in sorted(_IBAN_LENGTHS):
        for _ in range(3):
            iban = _iban(country, rng)
            for printed in (iban, _in_fours(iban)):
                text, counts = redact_pii(f"IBAN: {printed} (EUR)")
                assert text == "IBAN: <IBAN> (EUR)", (country, printed, text)
                assert counts["IBAN"] == 1


def test_a_mistyped_iban_is_not_one():
    """mod-97 catches every single-character substitution: no mistyped IBAN is redacted as
    one (its digits may still be a card or a phone to the numeric patterns)."""
    rng = random.Random(1)
    for country in ("DE", "GB", "FR", "NL", "IT"):
        iban = _iban(country, rng)
        for pos in range(4, len(iban)):
            alphabet = string.digits if iban[pos].isdigit() else string.ascii_uppercase
            wrong = iban[:pos] + rng.choice(alphabet.replace(iban[pos], "")) + iban[pos + 1 :]
            text, _ = redact_pii(f"to {wrong} now")
            assert "<IBAN>" not in text, (iban, wrong)


def test_lookalikes_are_left():
    rng = random.Random(2)
    de = _iban("DE", rng)
    cases = [
        de + "7",  # one character too many for Germany
        de[:-1],  # one too few
        de[:2] + de[2:4] + " " + de[4:7] + " " + de[7:],  # spaced, not in fours
        "XX" + de[2:],  # no such country
        "ISO 8601 and AB12 3456 7890 1234",
        "part no. DE12A and SKU GB99",
    ]
    for text in cases:
        assert "<IBAN>" not in redact_pii(text)[0], text
    # inside a word or an identifier: not an account
    assert "<IBAN>" not in redact_pii(f"x{de}")[0] and "<IBAN>" not in redact_pii(f"_{de}")[0]


def test_an_iban_before_its_numbers_are_read_as_phones():
    """IBANs are looked for before the numbers in them (German ones hold "0044 ..." groups,
    a call prefix to the phone pattern). Before, this account was left whole, as was every
    IBAN above: no pattern read it."""
    text, counts = redact_pii("IBAN DE89 3704 0044 0532 0130 00, call +44 20 7946 0958")
    assert text == "IBAN <IBAN>, call <PHONE>" and counts == {"IBAN": 1, "PHONE": 1}
