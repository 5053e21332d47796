"""A preference record's `prompt` next to full chosen/rejected conversations that repeat it
(the HuggingFaceH4/ultrafeedback_binarized layout), and a blank prompt."""

import json

import pytest

from flaxlm.data import formats as F
from flaxlm.data.tokenizer import train as train_tokenizer

WORDS = "compute two and six the answer is eight nine please briefly".split()


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "answer briefly"}


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 300))


def _ids(rows):
    return [[ids.tolist() for ids, _ in (p["chosen"], p["rejected"])] for p in rows]


def test_a_prompt_repeated_in_the_conversations_is_rendered_once(template):
    """Was: the user turn twice in every pair (DPO, reward model, KTO), silently."""
    bare = {"chosen": [u("compute two and six"), a("the answer is eight")],
            "rejected": [u("compute two and six"), a("the answer is nine")]}  # fmt: skip
    texts = {"prompt": "compute two and six", "chosen": "the answer is eight",
             "rejected": "the answer is nine"}  # fmt: skip
    uf = {"prompt": "compute two and six", **bare}
    one_side = {**texts, "chosen": bare["chosen"]}  # only one side repeats it
    sys_bare = {k: [SYSTEM, *v] for k, v in bare.items()}
    sys_uf = {"prompt": [SYSTEM, u("compute two and six")], **sys_bare}
    report = F.DataReport(strict=True)
    recs = [(r, str(i)) for i, r in enumerate([bare, texts, uf, one_side, sys_bare, sys_uf])]
    rows = F.render_preferences(recs, template, 64, report=report)
    ids = _ids(rows)
    assert ids[0] == ids[1] == ids[2] == ids[3] and ids[4] == ids[5] and ids[0] != ids[4]
    assert rows[2]["prompt"] == [u("compute two and six")]
    kto = F.render_unpaired(recs[:3], template, 64, report=report)
    assert [ex["ids"].tolist() for ex in kto[4:6]] == [ex["ids"].tolist() for ex in kto[:2]]
    assert [ex["split"] for ex in kto[4:6]] == [ex["split"] for ex in kto[:2]]
    # An export's trailing newline on the prompt (not on the conversation's turn) is the same
    # prompt: stripped like the others, and the record's prompt renders as given.
    nl = [({**uf, "prompt": "compute two and six\n"}, "nl"),
          ({**texts, "prompt": "compute two and six\n"}, "nl_texts")]  # fmt: skip
    nl_rows = F.render_preferences(nl, template, 64, report=report)
    assert len(nl_rows) == 2 and _ids(nl_rows)[0] == _ids(nl_rows)[1]


def test_a_conversation_that_is_not_the_prompts_is_bad_input(tmp_path, template):
    rows = [
        {"prompt": "compute two and six", "chosen": [u("compute six"), a("the answer is eight")],
         "rejected": "the answer is nine"},
        {"prompt": "compute two and six", "chosen": "the answer is eight",
         "rejected": [SYSTEM, u("compute two and six"), a("the answer is nine")]},
        {"prompt": "compute two and six", "chosen": [u("compute two and six")],
         "rejected": "the answer is nine"},
    ]  # fmt: skip
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = F.DataReport()
    assert F.render_preferences(F.read_records(str(path), report), template, 64,
                                report=report) == []  # fmt: skip
    bad = report.to_dict()["bad_input"]
    assert bad["counts"] == {"prompt_mismatch": 2, "no_assistant_turn": 1}
    assert bad["examples"]["prompt_mismatch"][0].startswith(f"{path}:1: prompt_mismatch (chosen")
    assert bad["examples"]["prompt_mismatch"][1].startswith(f"{path}:2: prompt_mismatch (rejected")


def test_a_blank_prompt_is_empty_not_missing(template):
    report = F.DataReport()
    recs = [({"prompt": "", "chosen": "eight", "rejected": "nine"}, "p:1"),
            ({"prompt": " ", "chosen": "eight", "rejected": "nine"}, "p:2")]  # fmt: skip
    assert F.render_preferences(recs, template, 64, report=report) == []
    assert report.to_dict()["bad_input"]["counts"] == {"empty": 2}


def _parts(rec):
    return F.preference_parts(rec, F.fields_config())


def _reason(rec):
    with pytest.raises(F.FormatError) as e:
        _parts(rec)
    return e.value.reason, str(e.value)


def test_a_blank_prompt_next_to_two_conversations_is_an_absent_one():
    """Was: 'empty' / 'bad_messages' for exports that write "" or [] where a pair has no
    separate prompt (these trained, on the common prefix, before prompts were checked)."""
    convs = {"chosen": [SYSTEM, u("compute two and six"), a("the answer is eight")],
             "rejected": [SYSTEM, u("compute two and six"), a("the answer is nine")]}  # fmt: skip
    for blank in ("", " ", []):
        assert _parts({"prompt": blank, **convs}) == _parts(convs)
        # next to an answer text the prompt is needed: blank is bad input, as before
        one_text = {**convs, "rejected": "the answer is nine", "prompt": blank}
        assert _reason(one_text)[0] == "empty"


def test_a_system_turn_before_the_repeated_prompt_joins_it():
    """prompt "Q" with chosen/rejected [system, user Q, assistant]: was prompt_mismatch."""
    q = "compute two and six"
    convs = {k: [SYSTEM, u(q), a(f"the answer is {n}")]
             for k, n in (("chosen", "eight"), ("rejected", "nine"))}  # fmt: skip
    prompt, chosen, rejected, _ = _parts({"prompt": q, **convs})
    assert (prompt, chosen, rejected) == ([SYSTEM, u(q)], [a("the answer is eight")],
                                          [a("the answer is nine")])  # fmt: skip
    assert _parts({"prompt": q, **convs}) == _parts(convs) == _parts({"prompt": [u(q)], **convs})
    # the two sides must agree on it
    other = {"role": "system", "content": "answer at length"}
    differ = {"prompt": q, **convs, "rejected": [other, u(q), a("the answer is nine")]}
    assert _reason(differ) == ("prompt_mismatch", "rejected has a system turn before the prompt "
                               "that chosen does not share")  # fmt: skip
    one = {"prompt": q, **convs, "rejected": [u(q), a("the answer is nine")]}
    assert _reason(one)[0] == "prompt_mismatch" and str(_reason(one)[1]).startswith("chosen")
