"""Preference records that parse but carry no usable preference are counted, not trained on."""

import json

import pytest

from flaxlm.data import formats as F
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import train as train_tokenizer

WORDS = "the river and mountain have a forest of tall trees that grow with light".split()


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 320))


def test_identical_pairs_and_non_finite_margins_are_bad_input(tmp_path, template):
    rows = [
        {"prompt": "the river", "chosen": "a forest", "rejected": "tall trees"},
        {"prompt": "the river", "chosen": "a forest", "rejected": "a forest"},
        '{"prompt": "the river", "chosen": "a forest", "rejected": "light", "margin": NaN}',
        {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    ]  # fmt: skip
    path = tmp_path / "pref.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    report = F.DataReport()
    pairs = F.render_preferences(F.read_records(str(path), report), template, 64, report=report)
    assert [p["loc"] for p in pairs] == [f"{path}:1"]
    bad = report.to_dict()["bad_input"]
    assert bad["counts"] == {"identical_pair": 2, "bad_margin": 1}
    assert bad["examples"]["bad_margin"] == [f"{path}:3: bad_margin (margin=nan is not finite)"]
    strict = F.DataReport(strict=True)
    with pytest.raises(DataError, match=r"pref\.jsonl:2: identical_pair"):
        F.render_preferences(F.read_records(str(path), strict), template, 64, report=strict)
