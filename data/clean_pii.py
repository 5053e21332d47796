"""PII redaction: emails, phone numbers, IP addresses, card, bank account and ID numbers →
placeholders.

``redact_pii(text)`` replaces each match by ``<EMAIL>``, ``<PHONE>``, ``<IP>``, ``<CARD>``,
``<IBAN>`` or ``<ID>`` and counts them per kind.

Phone numbers redacted: Chinese mobiles (bare or with 86 / +86 / 0086), North American numbers
("(415) 555-2671", "1-800-555-1234"), any number in international form ('+' or '00', then 8 to 15
digits in any grouping: "+44 20 7946 0958", "0044 20 7946 0958"), and other 2-4 + 3-4 + 3-4
digit groups ("020 7946 0958", "030 12345678", "06-12345678", "601 234 567"). Digit groups are
ambiguous: "12 345 678" and "12.345.678" (thousands separators) and three 4-digit years in a row
("1999 2000 2001") are redacted as phones. An extension after a number ("555-123-4567x89", "...
ext. 89") is redacted with it, and so is a trunk prefix or an area code in parentheses after the
country code ("+41 (0)44 668 18 00", "+7 (495) 123-45-67").
National numbers in the other groupings, without '+', are redacted only after a phone word:
French pairs ("06 12 34 56 78", "01.23.45.67.89"), "07700 900123", "612 34 56 78",
"91 123 45 67", "070-123 45 67", "08-123 456 78", "030/12345678", "8 (495) 123-45-67",
"044 668 18 00", "0612345678" (a run of 7 to 13 digits in groups, single spaces, no-break
spaces, '.', '-' or '/' between them), when "tel", "Tél.", "phone", "call", "mobile", "Telefon",
"Handy", "teléfono", "móvil", "cellulare", "telefone", "telefoon", "mobil", "телефон", "тел.",
"电话", "手机", "fax" ... (``_PHONE_WORDS``) is in the 40 characters before the number with at
most three words between ("Tél. : 06 12 34 56 78", "Call us on 07700 900123",
"Телефон: 8 (495) 123-45-67", "电话：06 12 34 56 78"). The numbers after such a one with only a
separator or a short word between are redacted too ("Tel. 06 12 34 56 78 / 01 23 45 67 89",
"... ou ...", "Tel. +33 1 23 45 67 89, 06 12 34 56 78"). No such grouping is redacted on its
shape alone: "01 02 03 04 05" is a list, and France's 0X XX XX XX XX, the most distinctive of
them, is also the shape of numbered lists, of one list of five random two-digit numbers in 11
and of 65% of lottery draws (five of 1-49, sorted and zero-padded: the lowest is 09 or less), so
it waits for a phone word too. After a phone word, dates ("12 03 2024"), years, opening hours
("9.00-17.30"), thousands-separated numbers ("1 234 567") and lists with two one-digit groups or
more stay. Still not redacted: these groupings with no phone word in the window
("Numéro : 06 12 34 56 78", "06 12 34 56 78 (portable)", "Contact : ...", one-letter labels
"T: ...", "M: ..."), numbers of more than 13 digits or with spaces around a separator
("030 / 1234567"), and pairs that run into more pairs ("Tel. 06 12 34 56 78 01 23 45 67 89": one
run of 20 digits). Counts after a phone word are redacted ("mobile users: 12 34 56 78"), as the
numeric patterns already take some ("12 345 678").
IPv4 addresses are four dotted numbers of 0-255 (zero-padded too: "010.000.000.001"), unless a
version or section word comes right before ("version 1.2.3.4", "v1.2.3.4", "Chapter 10.1.1.1",
"§ 4.1.2.3"); otherwise a four-part version is ambiguous and redacted ("Python 3.12.0.1" →
"Python <IP>"). IPv6 addresses with "::" are checked against slices and names
(``_plausible_ipv6``).
Card numbers are 13-19 digits (single spaces or dashes between them) that pass the Luhn check
and do not start with 1 or 9 (millisecond timestamps, ISBN-13s: one in ten passes Luhn); in a
longer run that fails it, a prefix ending at a separator that passes is the card ("4111 1111
1111 1111 123": a CVV after it, "<CARD> 123").
IBANs (bank accounts: "DE89 3704 0044 0532 0130 00", "GB29NWBK60161331926819") are a country
code of the IBAN registry, the length that country's IBANs have, printed whole or in groups of
four, and pass the ISO 7064 mod-97 check (one random string in 97 does); they are found before
the numbers inside them are read as phones or cards ("0044 0532 0130": a call prefix).
Order matters: longer number patterns first, so a card number is not read as a phone.
Full-width forms (Japanese and Chinese pages: "０３－１２３４－５６７８",
"ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ") are matched as their ASCII letters where the text has a
full-width digit or '@'.
"""

from __future__ import annotations

import re
from collections import Counter

from flaxlm.data.clean_text import _CJK

_NB = r"(?<![\dA-Za-z])"  # "not inside a number/word"; \b fails next to CJK (also \w)
_NA = r"(?![\dA-Za-z])"
# A phone's extension ("555-123-4567x89", "... ext. 89", "..., extension 12"), redacted with it: the
# letter after the number failed the pattern's end, and "555-123-4567x89" was not redacted at all.
_EXT = r"(?:,?[ ]?(?:[xX]|[eE]xt\.?|[eE]xtension)[ ]?\d{1,6})?"
_NUMERIC = [  # (kind, pattern), tried in this order at each position
    # Octets zero-padded too ("192.168.001.001": "1?\d?\d" took "01", not "001", and logs and
    # router pages that pad left the address in the text).
    (
        "IP",
        r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|[01]?\d?\d)\.){3}"
        r"(?:25[0-5]|2[0-4]\d|[01]?\d?\d)(?!\d|\.\d)",
    ),
    # Chinese resident ID: 6-digit region, birth date, 3 digits, check digit or X.
    (
        "ID",
        _NB
        + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
        + _NA,
    ),
    # Kept only if Luhn-valid; a Luhn-invalid run is searched again with the patterns after it
    # (a Chinese mobile written "86 138 1234 5678" is 13 digits, as long as a short card number).
    # Not starting with 1 or 9 (ISO 7812 major industry: airlines, national use; no payment
    # network issues those): one in ten 13-digit millisecond timestamps (1.7e12) and ISBN-13s
    # (978/979...) passes the Luhn check by chance and was redacted as a card.
    ("CARD", _NB + r"[02-8](?:[ -]?\d){12,18}" + _NA),
    ("ID", _NB + r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _NA),  # US SSN
    ("PHONE", _NB + r"(?:(?:\+|00)?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + _NA),  # Chinese mobile
    # Other phones; not part of a longer digit-group run (e.g. a Luhn-invalid 16-digit number).
    # "1-800-555-1234" / "1 415 555 2671": North American numbers with the trunk prefix 1.
    (
        "PHONE",
        r"(?<![\dA-Za-z+])(?<!\d[ .-])"
        r"(?:\+\d{1,3}[ .-]?|1[ .-](?=\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}))?"
        r"(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}"
        + _EXT
        + r"(?![\dA-Za-z]|[ .-]\d)",
    ),
    # International numbers in any grouping ("+33 1 23 45 67 89", "+91 98765 43210"): a '+', then
    # 8 to 15 digits (E.164's limit) with single separators. The trunk prefix may follow the
    # country code in parentheses ("+41 (0)44 668 18 00"), and so may the area code ("+7 (495)
    # 123-45-67", "+55 (11) 91234-5678"; 6-13 digits after it): they stopped the match, and
    # "+44 (0)20 7946 0958" became "+44 (0)<PHONE>" (the country code left in the text), and the
    # bracketed area codes of Russia, Brazil, Ukraine or Turkey left the whole number.
    # The international call prefix written out ("0044 20 7946 0958", "001 415 555 2671") is a
    # '+' too: such numbers were left whole. With a separator after the country code (product
    # codes "0012345678905" are one run), and not after a digit and a separator or a decimal
    # point ("3.0012345678" is a number).
    (
        "PHONE",
        r"(?<![\dA-Za-z+])(?:\+|(?<!\d[ .,-])00(?=[1-9]\d{0,2}[ .(-]))"
        r"(?:[1-9]\d{0,2}[ .-]?\(\d{1,4}\)[ .-]?\d(?:[ .-]?\d){5,12}"
        r"|[1-9](?:[ .-]?\d){7,14})" + _EXT + r"(?![\dA-Za-z]|[ .-]\d)",
    ),
]
_CARD_AT = next(i for i, (k, _) in enumerate(_NUMERIC) if k == "CARD")
# Emails: local part and domain labels in letters of any script ("müller@firma.de",
# "josé.garcía@example.es", "john@münchen.de"). With ASCII-only classes the match started after
# the last accented letter ("josé.garcí<EMAIL>", the start of the address left in the text) or
# found no domain. The lookbehind starts a match where the run of local-part characters starts
# (combining accents U+0300-036F count: NFD text), never inside it; one class there, so the scan
# tries each word once. CJK is not part of an address: in Chinese text nothing separates it from
# the words before it ("我的邮箱是zhangsan@qq.com"; redact_pii keeps the run's text up to its last
# CJK character), and a CJK top-level domain would take in the words after it. An apostrophe
# inside the local part is part of it ("patrick.o'neill@..."; it left "patrick.o'" in the
# text), a quote before or after the address is not. A match never starts right after a
# character and an apostrophe (inside "o'neill"), and the second lookahead asks for the local
# part's own form before an '@', so it stops at a doubled apostrophe: with one lookahead for
# any run of local-part characters and apostrophes up to an '@', each character after an
# apostrophe was a start that scanned the rest of the run, and 100 KB of "a'a'a'..." before an
# address took 83 s (quadratic). The first lookahead (a run, then '@' or an apostrophe) turns
# most words away cheaply: without it the pass took 2.3x as long.
_EMAIL_CH = "\\w.%+\u0300-\u036f-"
_EMAIL_LABEL = rf"(?:[^\W_{_CJK}]|[\u0300-\u036f-])+"
_EMAIL_LOCAL = rf"[{_EMAIL_CH}]+(?:['\u2019][{_EMAIL_CH}]+)*"
_EMAIL = (
    rf"(?<![{_EMAIL_CH}])(?<![{_EMAIL_CH}]['\u2019])(?=[{_EMAIL_CH}]*[@'\u2019])"
    rf"(?={_EMAIL_LOCAL}@){_EMAIL_LOCAL}"
    rf"@{_EMAIL_LABEL}"
    rf"(?:\.{_EMAIL_LABEL})*"
    rf"\.[^\W\d_{_CJK}]{{2,}}"
)
_CJK_PREFIX_RE = re.compile(rf".*[{_CJK}]")  # an EMAIL match's text up to its last CJK character
# An IPv4 address as the last 32 bits of an IPv6 one ("::ffff:192.168.1.1", "64:ff9b::1.2.3.4").
_V4 = r"(?:(?:25[0-5]|2[0-4]\d|[01]?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|[01]?\d?\d)"
# National numbers without a '+' in the groupings the patterns above leave ("06 12 34 56 78",
# "07700 900123", "612 34 56 78", "070-123 45 67", "8 (495) 123-45-67", "030/12345678"): a
# whole run of digit groups, one separator between two (space, no-break spaces, '.', '-', '/';
# a bracketed group too), from where the run starts (not after a digit, a letter, '+', ')' or
# a digit and a separator; not inside a bracketed group) to where it ends (no digit, letter,
# decimal part or further group after it), 7 digits or more. Redacted only after a phone word
# (``_national_phone``): on its own such a run is as often a list, a score or a count. Its own
# pass after the numeric one, so nothing that pass redacts changes, and its '<PHONE>'
# placeholders may stand between a phone word and a national number ("Tel. +33 1 23 45 67 89 /
# 06 12 34 56 78"). Linear: a separator between two groups, so a run matches in one way, and
# no run is scanned from inside (the lookbehinds; "(123) (123) ..." scanned to its end from
# every group was quadratic). The start is a character class with the lookbehinds after it, so
# the engine looks for that class quickly.
_NAT_SEP = "[ .\\-/\u00a0\u202f]"
_NAT_6 = rf"(?:\)?{_NAT_SEP}?\(?\d){{6}}"  # six more digits of the run
_NAT_START = (
    r"[\d(](?<![\dA-Za-z+)].)(?<![\d)][ .,\-/\u00a0\u202f].)"  # where a run starts
    r"(?<![\d)][ .\-/\u00a0\u202f]\(\d)"  # (not inside one: "... (495)", "(123) (456)")
    rf"(?=(?<=\()\d{_NAT_6}|(?<=\d){_NAT_6})"  # 7 digits or more
)
_NATIONAL = _NAT_START + (
    r"(?:(?<=\d)\d*|(?<=\()\d{1,5}\))"  # the first group
    rf"(?:{_NAT_SEP}(?:\d+|\(\d{{1,5}}\))|(?<=\))\d+)*"  # the others
    rf"(?![\dA-Za-z]|,\d|{_NAT_SEP}\(?\d)"  # where it ends
)

# One pass per family (a pass costs ~40 us per KB): named groups say which pattern matched.
_PII = [
    (
        "@",
        re.compile(f"(?P<EMAIL>{_EMAIL})"),
    ),
    (
        "::",
        # IPv6: all 8 groups, or "::" standing for zeros in the middle ("2001:db8::1"), at the
        # start ("::1") or at the end ("fe80::"). Not a lone "::" and not "std::vector" (a group
        # must be hex digits, bounded by non-word characters). A "::" match is then checked by
        # _plausible_ipv6 (slices "a[1::2]" and names "ee::ff" match the pattern too).
        # The forms ending in an IPv4 address come first: "::ffff:192.168.1.1" matched as
        # "::ffff:192" and became "<IP>.168.1.1"; a match may not end before ".<digit>" now.
        re.compile(
            rf"(?P<IP>(?<![:\w])(?:(?:[0-9A-Fa-f]{{1,4}}:){{6}}{_V4}"
            rf"|::(?:[0-9A-Fa-f]{{1,4}}:){{0,5}}{_V4}"
            rf"|(?:[0-9A-Fa-f]{{1,4}}:){{1,5}}:(?:[0-9A-Fa-f]{{1,4}}:){{0,4}}{_V4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}"
            r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}"
            r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:)(?![:\w]|\.\d))"
        ),
    ),
    # IBANs, before the numbers: their digit groups read as phones and cards. A candidate is
    # two capitals, two check digits and up to 30 more letters or digits (single spaces
    # between): `_iban_end` cuts it to its country's length and checks it.
    ("IBAN", re.compile(r"(?<![\dA-Za-z_])(?P<IBAN>[A-Z]{2}\d{2}(?:[ ]?[A-Z\d]){11,30})")),
    # The leading lookahead lets the engine skip positions that cannot start a number quickly.
    (
        "00",
        re.compile(
            "(?=[\\d+(])(?:"
            + "|".join(f"(?P<{k}{i}>{p})" for i, (k, p) in enumerate(_NUMERIC))
            # Where no pattern matches, an empty match where a national number may start (7
            # digits or more from there): it only tells redact_pii to run the "NAT" pass.
            + f"|(?P<NAT>(?={_NAT_START}))"
            + ")"
        ),
    ),
    # National numbers, redacted after a phone word only (``_national_phone``). Run only when
    # the numeric pass matched something: if it matched nothing, this pattern matches nothing
    # either (the numeric pass's last alternative is where this one starts, in a lookahead), and
    # a pass over every digit of a page is a fifth of redact_pii's time on ordinary English.
    ("NAT", re.compile(f"(?P<PHONE>{_NATIONAL})")),
]


# The numeric patterns after CARD, for the span of a Luhn-invalid CARD match.
_AFTER_CARD = re.compile(
    "|".join(f"(?P<{k}{i}>{p})" for i, (k, p) in enumerate(_NUMERIC) if i > _CARD_AT)
)
# Every numeric pattern needs two digits with at most one separator between them: "8.8.8.8"
# (one-digit octets) has no two adjacent digits, and r"\d\d" here skipped it.
_DIGITS_RE = re.compile(r"\d[ .-]?\d")
_IPV6_RE = dict(_PII)["::"]
_NUMBERS_RE = dict(_PII)["00"]
_NATIONAL_RE = dict(_PII)["NAT"]
# Each country's IBAN length (the SWIFT IBAN registry): a candidate is cut to it, and a country
# not here is no IBAN.
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
# The last label of an EMAIL match that makes it a file name, not an address ("logo@2x.png",
# "node@latest.tgz"): common extensions that are no top-level domain (.zip, .mov, .md, .py, .pl,
# .sh are domains, and addresses there are left to the pattern).
_FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif webp svg ico bmp tif tiff avif heic pdf tgz gz bz2 xz zst tar rar 7z js "
    "mjs cjs ts tsx jsx css scss less html htm xhtml json jsonl xml txt csv tsv yaml yml toml "
    "ini cfg conf lock log bak tmp mp3 mp4 m4a wav ogg webm mkv avi woff woff2 ttf otf eot map "
    "exe dll whl jar apk dmg iso deb rpm msi bin dat".split()
)


# The words before a dotted quad that make it a version or section number, not an address
# ("version 1.2.3.4", "v1.2.3.4", "Chapter 10.1.1.1", "§ 4.1.2.3"). Without one, a quad of
# valid octets is an address: "Python 3.12.0.1" is redacted, the text does not say which.
_NOT_IPV4_BEFORE_RE = re.compile(
    r"(?:\b(?:versions?|ver|v|releases?|rel|build|revision|rev|chapters?|chap|ch|sections?|sec|"
    r"clauses?|articles?|art|paragraphs?|para|appendix|figures?|fig|tables?|steps?|rules?|"
    r"editions?)\.?|§)\s?$",
    re.IGNORECASE,
)


# Phone words: a national number (``_NATIONAL``) is redacted when one comes shortly before it.
# Words that name a phone, a fax or calling, in the languages the cleaner keeps (en de fr es it
# pt nl sv pl ru uk, zh), with their usual abbreviations and, in the inflected languages, any
# ending: "tel", "Tel.", "tél", "Tlf.", "Tfno.", "telephone", "téléphone", "Telefon",
# "telefoon", "teléfono", "telefone", "telefonu", "телефона", "phone", "fax", "Handy",
# "mobile", "portable", "fixe", "móvil", "fijo", "cellulare", "telemóvel", "mobiel", "gsm",
# "komórka", "моб.", "call", "ring", "appelez", "composez", "llame", "chiamate", "ligue", "bel",
# "zadzwoń", "звоните", "дзвоніть", "电话", "手机". A label on a contact line or the verb
# before a number to call: such a word before 7-13 digits in groups is, nearly always, before a
# phone number. Left out on purpose: words as often before other numbers ("number", "no.",
# "nr", "Nummer", "numéro", "contact", "ref"), one-letter labels ("T:", "M:", "F:"; "p. 06 12"
# is a page) and "ph" (pH 7), "called" ("so-called"). A word ends at a letter boundary:
# "iPhone", "microphone" and "telephoto" are none, nor "<PHONE>" (a placeholder).
_PHONE_WORDS = (
    # en
    "phones?", "(?:cell|mobile|smart)phones?", "cell(?:ular)?", "mobiles?", "call(?:ing)?",
    "ring", "landline", "hotline", "helpline", "sms", "whats ?app",
    # telephone / téléphone / Telefon / telefoon / teléfono / telefono / telefone / telefonu;
    # fax / Telefax / faks; télécopie
    "t[eé]l", "telf", "tlf", "tfno", "tlfno", r"t[eé]l[eé](?:ph|f)o?on[^\W\d_]*",
    "(?:tele)?fa(?:x|ks)", "t[eé]l[eé]copie",
    # de
    "handy(?:nummer|nr)?", "mobil(?:nummer|nr|telefon|funk)?", "festnetz", "rufnummer", "fon",
    # fr
    "portable", "fixe", "appel(?:ez|er)", "composez",
    # es, it, pt
    "m[oó]vil(?:es)?", "fijo", "celular", "cel", "cellulare", "ll[aá]m(?:e|enos|ar|ada|anos)",
    "chiam(?:a|aci|ate|ateci|are)", "telem[oó]vel", "ligue", "ligar",
    # nl, sv, pl
    "mobiele?", "gsm", "bel(?:len)?", r"kom[oó]rk[^\W\d_]*", r"zadzwo[nń][^\W\d_]*",
    # ru, uk
    "тел", r"(?:за)?телефон[^\W\d_]*", "моб", r"мобил[^\W\d_]*", r"мобіл[^\W\d_]*",
    r"сотов[^\W\d_]*", "факс", r"(?:по)?звон[^\W\d_]*", r"дзвон[^\W\d_]*",
)  # fmt: skip
_PHONE_WORDS_CJK = ("电话", "電話", "手机", "手機", "座机", "座機", "传真", "傳真")
# The window before a national number: a phone word, then up to three words (letters, or a
# '<PHONE>' placeholder: "Tel. +33 1 23 45 67 89 / 06 12 34 56 78") with up to four other
# characters between them (":", " (mobile) : ", line breaks, "-"), no digit, and all of it in
# the 40 characters before the number ("Tel. : 06 ...", "Call us on 07700 900123", "Téléphone
# portable : 06 ...", "Tel.-Nr.: 030/12345678", "电话号码：06 ..."). Searched with endpos at the
# number ('$' is there) in those 40 characters only: a bounded cost per candidate.
_NAT_GAP_WORD = r"(?:[^\W\d_]+|<PHONE>)"
_PHONE_WORD_BEFORE_RE = re.compile(
    r"(?:(?<![^\W\d_])(?<!<)(?=[^\W\d_])(?:" + "|".join(_PHONE_WORDS) + r")(?![^\W\d_])"
    r"|" + "|".join(_PHONE_WORDS_CJK) + r")"
    rf"\.?[^\w<]{{0,4}}(?:{_NAT_GAP_WORD}(?:[^\w<]{{1,4}}{_NAT_GAP_WORD}){{0,2}}[^\w<]{{0,4}})?$",
    re.IGNORECASE,
)
_NAT_WINDOW = 40
# Between two national numbers after one phone word: separators and at most one short word
# ("06 12 34 56 78 / 01 23 45 67 89", "..., ...", "... ou ...", "... oder ...", "... или ...").
_NAT_JOIN_RE = re.compile(r"[^\w<]{0,4}(?:[^\W\d_]{1,6}[^\w<]{1,4})?")
# Runs the national pattern takes that are no phone even after a phone word: dates ("12 03
# 2024", "2024-03-12", "12/03/2024"), years ("2023 2024", "1990-2000"), opening hours
# ("9.00-17.30"), numbers with thousands separators ("1 234 567", "1.299.000": a first group
# of 1-3 digits not starting with 0, then groups of 3; such mobiles, "601 234 567", are
# redacted by the numeric pass before) and lists with two one-digit groups or more ("1 2 3 4 5
# 6 7"; a phone number has one at most: "8 (495) ...", "0 800 ...").
_NOT_NATIONAL_RE = re.compile(
    r"(?:0?[1-9]|[12]\d|3[01])(\D)(?:0?[1-9]|1[0-2])\1(?:19|20)\d\d"
    r"|(?:19|20)\d\d(\D)(?:0?[1-9]|1[0-2])\2(?:0?[1-9]|[12]\d|3[01])"
    r"|(?:(?:19|20)\d\d\D)+(?:19|20)\d\d"
    r"|\d{1,2}\.\d\d[-/]\d{1,2}\.\d\d"
    r"|[1-9]\d{0,2}(\D)\d{3}(?:\3\d{3})+"
    r"|(?:.*?(?<!\d)\d(?!\d)){2}.*"
)


def _national_phone(m: re.Match, prev_end: int) -> bool:
    """Whether a ``_NATIONAL`` match is a phone number: 7 to 13 digits (national numbers with
    their trunk prefix), not a date, year list, time range, thousands-separated number or list
    of one-digit groups (``_NOT_NATIONAL_RE``), and a phone word in the window before it
    (``_PHONE_WORD_BEFORE_RE``), or only a separator and a short word between it and the
    national number before it (``prev_end``: where that one ended; several numbers after one
    phone word)."""
    run, start = m.group(), m.start()
    if not 7 <= sum(c.isdigit() for c in run) <= 13 or _NOT_NATIONAL_RE.fullmatch(run):
        return False
    if 0 <= prev_end <= start and _NAT_JOIN_RE.fullmatch(m.string, prev_end, start):
        return True
    return _PHONE_WORD_BEFORE_RE.search(m.string, max(0, start - _NAT_WINDOW), start) is not None


def _plausible_ipv6(addr: str, before: str = "", after: str = "") -> bool:
    """Whether an IPv6 match with "::" is an address rather than code or a name.

    ``before``/``after``: the characters around the match. Two colons inside a subscript, "["
    right after a name or a closing bracket and "]" right after the match, are a slice
    ("a[1024::4]", "t[2048::]"); a bracketed address in a URL ("http://[2001:db8::1]:80")
    follows no name.
    Leading "::": two groups or more ("::ffff:a00:1"), or loopback "::1"; one group is a Python
    slice ("a[::2]"). Otherwise a decimal digit somewhere (not "ee::ff", "def::abc", "bad::")
    and a first group of 4 hex digits from 0x2000 up ("fe80::1", "2001:db8::"; addresses in use
    are from 2000::/3 or fc00::/7 up), or three groups or more ("1080::8:800:200c:417a"); not
    the slice "a[1::2]" nor "1::" nor "1024::4".
    """
    if "::" not in addr or "." in addr:
        return True  # all eight groups, or an IPv4 tail (no slice or name has one)
    slice_ = addr.count(":") == 2 and before[-1:] == "[" and after[:1] == "]"  # start:stop:step
    if slice_ and re.match(r"[\w)\]]", before[-2:-1]):
        return False
    groups = [g for g in addr.split(":") if g]
    if addr.startswith("::"):
        return len(groups) >= 2 or groups == ["1"]
    return any(c.isdigit() for c in addr) and (
        (len(groups[0]) == 4 and int(groups[0], 16) >= 0x2000) or len(groups) >= 3
    )


# How cards are printed (Visa/Mastercard/Discover 4-4-4-4, Amex 4-6-5, Diners 4-6-4): the only
# groupings a card followed by its CVV or expiry is looked for in (`_card_before_cvv`).
_CARD_GROUPINGS = ((4, 4, 4, 4), (4, 6, 5), (4, 6, 4))


def _card_before_cvv(run: str, after: str) -> int | None:
    """Where the card ends in a CARD match that is a card followed by its CVV or expiry
    ("4111 1111 1111 1111 123", "4111-1111-1111-1111 12/25"), the whole run failing the Luhn
    check: the groups before the last are printed as a card is, and the last is a CVV (3 or 4
    digits) or an expiry's month (2 digits, "/" after the match). Else None. Narrow on purpose:
    any prefix of 13+ digits passes Luhn one time in ten, so trying every one redacted rows of
    scores, lottery draws and sudoku lines as cards."""
    groups = list(re.finditer(r"\d+", run))
    if len(groups) < 2:
        return None
    lengths = tuple(len(g.group()) for g in groups[:-1])
    tail = len(groups[-1].group())
    if lengths in _CARD_GROUPINGS and (tail in (3, 4) or (tail == 2 and after[:1] == "/")):
        return groups[-2].end()
    return None


def _iban_end(run: str, after: str) -> int | None:
    """Where the IBAN ends in an IBAN candidate `run` (`after`: the text after it), or None
    when it holds none: its country's length of letters and digits, printed whole or in
    groups of four (the last shorter), not followed by a letter or digit of the same group,
    and the mod-97 check of ISO 7064 equal to 1 (the first four moved to the end, letters as
    10..35)."""
    length = _IBAN_LENGTHS.get(run[:2])
    if length is None:
        return None
    chars, end = 0, len(run)
    for i, ch in enumerate(run):
        chars += ch != " "
        if chars == length:
            end = i + 1
            break
    else:
        return None  # shorter than its country's IBANs
    tail = run[end:] + after
    if tail[:1].isalnum():
        return None  # longer than its country's IBANs: another code
    groups = run[:end].split(" ")
    if len(groups) > 1 and any(len(g) != 4 for g in groups[:-1]):
        return None  # spaced, but not in fours: an IBAN is printed whole or in fours
    code = run[:end].replace(" ", "")
    number = int("".join(str(int(c, 36)) for c in code[4:] + code[:4]))
    return end if number % 97 == 1 else None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_pii(text: str) -> tuple[str, Counter]:
    """Replaces PII with ``<KIND>`` placeholders; returns the text and counts per kind."""
    counts: Counter = Counter()
    numbers_matched = False  # whether the numeric pass matched anything (then: the "NAT" pass)
    nat_end = -1  # where the last national number redacted ended (``_national_phone``)

    def sub(m):
        nonlocal nat_end, numbers_matched
        kind = m.lastgroup.rstrip("0123456789")
        if m.re is _NUMBERS_RE:
            numbers_matched = True
            if kind == "NAT":
                return ""  # (an empty match: the text stays as it is)
        if m.re is _NATIONAL_RE:
            if not _national_phone(m, nat_end):
                return m.group()
            nat_end = m.end()
        if m.re is _IPV6_RE:
            before, after = m.string[max(0, m.start() - 2) : m.start()], m.string[m.end() :][:1]
            if not _plausible_ipv6(m.group(), before, after):
                return m.group()
        if kind == "IP" and m.re is not _IPV6_RE:
            if _NOT_IPV4_BEFORE_RE.search(m.string, max(0, m.start() - 16), m.start()):
                return m.group()
        if kind == "EMAIL":
            if m.group().rpartition(".")[2].lower() in _FILE_EXTENSIONS:
                return m.group()
            prefix = _CJK_PREFIX_RE.match(m.group())  # text before the address (CJK)
            if prefix is not None:
                if m.group()[prefix.end()] == "@":
                    return m.group()  # an all-CJK local part ("张三@example.com"): not matched
                counts[kind] += 1
                return f"{prefix.group()}<{kind}>"
        if kind == "IBAN":
            end = _iban_end(m.group(), m.string[m.end() :][:1])
            if end is None:
                return m.group()  # (its numbers are read by the numeric pass next)
            counts[kind] += 1
            return f"<{kind}>{m.group()[end:]}"
        if kind == "CARD" and not _luhn_ok(re.sub(r"\D", "", m.group())):
            # A card number followed by its CVV or expiry ("4111 1111 1111 1111 123", "... 12/25")
            # is one longer digit run that fails the check: the card as printed is tried.
            end = _card_before_cvv(m.group(), m.string[m.end() :])
            if end is not None and _luhn_ok(re.sub(r"\D", "", m.group()[:end])):
                counts[kind] += 1
                return f"<{kind}>{m.group()[end:]}"
            # Not a card: the span may still hold a phone or ID number. Searched in the whole
            # text (pos/endpos), so lookbehinds see what precedes the span.
            out, last = [], m.start()
            for m2 in _AFTER_CARD.finditer(m.string, m.start(), m.end()):
                out += [m.string[last : m2.start()], sub(m2)]
                last = m2.end()
            return "".join(out) + m.string[last : m.end()]
        counts[kind] += 1
        return f"<{kind}>"

    # Full-width forms are matched as their ASCII letters (one character each, so positions
    # agree), where a full-width digit or '@' is in the text (most Chinese text has full-width
    # punctuation only); the text keeps them where nothing is redacted (``_sub_folded``).
    seen = None
    if _FULL_WIDTH_PII_RE.search(text):  # (per run: str.translate took 3x as long on Chinese)
        seen = _FULL_WIDTH_RE.sub(lambda m: m.group().translate(_FULL_WIDTH), text)
    for guard, rx in _PII:
        t = text if seen is None else seen
        # Cheap guards: no '@' → no email; IPv6 needs "::" or 6 colons (7 without an IPv4 tail);
        # numbers two digits.
        if guard == "@" and "@" not in t:
            continue
        if guard == "::" and "::" not in t and t.count(":") < 6:
            continue
        if guard in ("00", "IBAN") and _DIGITS_RE.search(t) is None:
            continue
        if guard == "NAT" and not numbers_matched:
            continue
        if seen is None:
            text = rx.sub(sub, text)
        else:
            text, seen = _sub_folded(rx, sub, text, seen)
    return text, counts


# Full-width ASCII variants U+FF01-FF5E and the ideographic space U+3000, which NFC keeps:
# Japanese and Chinese pages write phone numbers, addresses and card numbers in them
# ("０３－１２３４－５６７８", "ｂｏｂ＠ｅｘａｍｐｌｅ．ｃｏｍ"), and the patterns' '+', '@', '.',
# '-' and leading digits are ASCII, so 6 of 7 such numbers and addresses were left whole.
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}
_FULL_WIDTH_RE = re.compile("[\uff01-\uff5e\u3000]+")
_FULL_WIDTH_PII_RE = re.compile("[\uff10-\uff19\uff20]")  # full-width digits, '@'


def _sub_folded(rx: re.Pattern, sub, text: str, seen: str) -> tuple[str, str]:
    """``rx.sub(sub, seen)`` with the text between and inside unredacted matches taken from
    ``text`` (``seen``: its full-width forms in ASCII); returns both forms of the result. Text
    a redacting match keeps next to its placeholder ("<CARD> 123") is in ASCII."""
    out, out_seen, last = [], [], 0
    for m in rx.finditer(seen):
        rep = sub(m)
        keep = rep == m.group()
        out += [text[last : m.start()], text[m.start() : m.end()] if keep else rep]
        out_seen += [seen[last : m.start()], rep]
        last = m.end()
    return "".join(out) + text[last:], "".join(out_seen) + seen[last:]
