"""Tests of the built-in world (data/synthetic*.py): determinism, split hygiene, judge, preference
pairs, noise ground truth, task formats and the file round trip."""

import collections
import json
import re

import pytest

from flaxlm.data import synthetic as S
from flaxlm.data.synthetic_judge import judge_parts
from flaxlm.data.synthetic_noise import jaccard


@pytest.fixture(scope="module")
def world():
    return S.build_world("small", seed=0)


@pytest.fixture(scope="module")
def demo():
    return S.build_world("demo", seed=0)


def _chat_text(rows):
    return json.dumps(rows, ensure_ascii=False)


def test_same_seed_same_world_other_seed_other_world(world):
    again = S.build_world("small", seed=0)
    assert again == world
    other = S.build_world("small", seed=1)
    assert other.pretrain != world.pretrain
    assert other.sft_train != world.sft_train
    assert [e.name for e in other.entities] != [e.name for e in world.entities]


def test_overrides_change_sizes():
    w = S.build_world("small", seed=0, n_entities=16, n_sft_train=10)
    assert len(w.entities) == 16 and len(w.sft_train) == 10
    with pytest.raises(TypeError):
        S.build_world("small", no_such_field=1)
    with pytest.raises(ValueError, match="unknown world preset 'huge'"):
        S.build_world("huge")


def test_heldout_entities_only_in_pretraining(demo):
    held = demo.heldout_entities
    assert len(held) == demo.config.n_heldout_entities and held
    trained_on = _chat_text(
        demo.sft_train + demo.sft_heldout + demo.preferences + demo.preferences_heldout
        + demo.rl_prompts
    )  # fmt: skip
    clean = [d["text"] for d, lab in zip(demo.pretrain, demo.pretrain_labels) if not lab["noise"]]
    for e in held:
        word = re.compile(rf"\b{e.name}\b")
        assert not word.search(trained_on), e.name
        docs = [t for t in clean if word.search(t)]
        assert len(docs) >= demo.config.bios_per_entity
        # Every attribute of a held-out person is stated in clean pretraining text.
        for attr in S.ATTRIBUTES:
            assert any(re.search(rf"\b{re.escape(e.value(attr))}\b", t) for t in docs), attr
    # ... and they are exactly the people the held-out questions ask about.
    asked = {r["meta"]["entity"] for r in demo.heldout_facts}
    assert asked == {e.name for e in held}
    assert {r["meta"]["entity"] for r in demo.eval_tasks["gen_facts_heldout"]} == asked


def test_sft_heldout_items_disjoint_from_sft_train(demo):
    def keys(rows):
        out = set()
        for r in rows:
            m = r["meta"]
            out.add(
                (m["task"], m.get("entity"), m.get("attribute"), m.get("op"), m.get("a"),
                 m.get("b"), m.get("word"))
            )  # fmt: skip
        return out

    # All questions (including earlier turns) of the training conversations.
    train = keys(demo.sft_train)
    heldout = keys(demo.sft_heldout)
    assert heldout and not train & heldout
    held_words = {m[-1] for m in heldout if m[-1]}
    assert not any(re.search(rf"\b{' '.join(w)}\b", _chat_text(demo.sft_train)) for w in held_words)


def test_sft_format(demo):
    roles = collections.Counter()
    n_multiturn = n_system = 0
    noise = collections.Counter()
    for row in demo.sft_train:
        msgs = row["messages"]
        assert msgs[-1]["role"] == "assistant" and msgs[-2]["role"] == "user"
        kind = row["meta"].get("noise")
        noise[kind] += 1
        score = S.judge(row["meta"], msgs[-1]["content"])
        if kind is None:
            assert msgs[-1]["content"] == S.format_answer(row["meta"]["answer"])
            assert score == pytest.approx(1.0)
        else:  # noisy demonstrations: the right answer, but rambling or rude: judged worse
            assert row["meta"]["answer"] in msgs[-1]["content"]
            assert score < 0.9 and (kind != "unsafe" or score < 0)
        roles.update(m["role"] for m in msgs)
        n_system += msgs[0]["role"] == "system"
        n_multiturn += sum(m["role"] == "user" for m in msgs) > 1
    assert set(roles) == {"system", "user", "assistant"}
    assert 0.1 < n_system / len(demo.sft_train) < 0.3
    assert 0.1 < n_multiturn / len(demo.sft_train) < 0.3
    frac = (noise["rambling"] + noise["unsafe"]) / len(demo.sft_train)
    assert abs(frac - demo.config.sft_noise_frac) < 0.03 and noise["rambling"] and noise["unsafe"]
    tasks = collections.Counter(r["meta"]["task"] for r in demo.sft_train)
    assert set(tasks) == {"attribute", "arithmetic", "reverse", "sort"}


@pytest.mark.parametrize(
    "meta,correct,wrong",
    [
        ({"task": "attribute", "attribute": "city", "answer": "Lima"}, "Lima", "Oslo"),
        ({"task": "attribute", "attribute": "age", "answer": "34"}, "34", "43"),
        ({"task": "attribute", "attribute": "pet", "answer": "cat"}, "a cat", "dog"),
        ({"task": "arithmetic", "a": 17, "b": 25, "answer": "42"}, "42", "41"),
        ({"task": "reverse", "word": "lamp", "answer": "p m a l"}, "p m a l", "l a m p"),
        ({"task": "sort", "word": "lamp", "answer": "a l m p"}, "almp", "a m l p"),
    ],
)
def test_judge_ranks_correct_over_wrong_over_unsafe(meta, correct, wrong):
    good = S.judge(meta, f"The answer is {correct}.")
    bad = S.judge(meta, f"The answer is {wrong}.")
    unsafe_right = S.judge(meta, f"The answer is {correct}, you idiot.")
    unsafe_wrong = S.judge(meta, f"Shut up. The answer is {wrong}.")
    rambling = S.judge(
        meta,
        f"Well, I thought about it for a long time and I am still not sure, but maybe it is "
        f"{correct}, though you should really ask someone else about it.",
    )
    assert good == pytest.approx(1.0)
    assert good > rambling > unsafe_right
    assert good > bad > unsafe_right > unsafe_wrong
    assert S.is_correct(meta, f"The answer is {correct}.")
    assert S.is_correct(meta, f"the answer is {correct}")  # lenient about case and full stop
    assert not S.is_correct(meta, f"The answer is {wrong}.")
    # Two different answers are not a correct answer (no hedging for reward).
    assert not S.is_correct(meta, f"The answer is {correct}. The answer is {wrong}.")


def test_judge_details():
    meta = {"task": "attribute", "attribute": "city", "answer": "Lima"}
    # Loose credit only when the right value is the only one named.
    assert judge_parts(meta, "Lima, I think.")["correct"] == 0.5
    assert judge_parts(meta, "Lima or Oslo or Rome.")["correct"] == 0.0
    assert not S.is_correct(meta, "The answer is Lima or Oslo.")
    sums = {"task": "arithmetic", "a": 17, "b": 25, "answer": "42"}
    assert not S.is_correct(sums, "The answer is 42 or 41.")
    assert S.is_correct({"task": "attribute", "attribute": "age", "answer": "34"},
                        "The answer is 34 years old.")  # fmt: skip
    long = "The answer is Lima. " + "Blah " * 40
    assert judge_parts(meta, long)["length_penalty"] == pytest.approx(0.3)
    assert S.judge(meta, long) < S.judge(meta, "The answer is Lima.")
    assert S.judge(meta, "") == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        S.judge({"task": "poetry", "answer": "x"}, "x")


def test_judge_length_penalty_starts_past_15_words_and_operands_are_no_rivals():
    """The docstring's rules at their edges: 0.02 per word *beyond* 15 (15 words free, the
    16th costs 0.02), an arithmetic question's operands are no rival answers for loose credit,
    and a marked meta of a task the world does not have is no world question."""
    from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK, is_world_meta

    meta = {"task": "attribute", "attribute": "city", "answer": "Lima"}
    for n_words, penalty in [(15, 0.0), (16, 0.02), (17, 0.04)]:
        response = "The answer is Lima. " + "x " * (n_words - 4)
        assert len(response.split()) == n_words
        assert judge_parts(meta, response)["length_penalty"] == pytest.approx(penalty)
    sums = {"task": "arithmetic", "a": 17, "b": 25, "answer": "42"}
    assert judge_parts(sums, "17 plus 25 makes 42")["correct"] == 0.5  # the operands are named
    assert judge_parts(sums, "17 plus 25 makes 42 or 41")["correct"] == 0.0
    marked = {WORLD_KEY: WORLD_MARK, "answer": "x"}
    assert is_world_meta({**marked, "task": "sort"})
    assert not is_world_meta({**marked, "task": "poetry"})


def test_preference_pairs_ordered_by_judge(demo):
    kinds = collections.Counter()
    for pair in demo.preferences + demo.preferences_heldout:
        assert pair["prompt"][-1]["role"] == "user"
        assert S.judge(pair["meta"], pair["chosen"]) > S.judge(pair["meta"], pair["rejected"])
        kinds[pair["meta"]["pair"]] += 1
    assert set(kinds) == {"correct_vs_wrong", "formed_vs_rambling", "safe_vs_unsafe"}
    assert len(demo.preferences) == demo.config.n_preferences
    for row in demo.rl_prompts:
        assert row["prompt"][-1]["role"] == "user" and row["meta"]["answer"]


def _luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()][::-1]
    total = sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits))
    return total % 10 == 0


def test_noise_ground_truth(world):
    texts = {d["id"]: d["text"] for d in world.pretrain}
    labels = world.pretrain_labels
    assert [r["id"] for r in labels] == [d["id"] for d in world.pretrain]
    counts = collections.Counter(r["noise"] for r in labels if r["noise"])
    assert set(counts) == set(S.NOISE_KINDS)
    assert dict(counts) == world.manifest()["noise"]
    n_clean_docs = sum(r["content"] not in ("junk", "toxic") for r in labels) - (
        counts["exact_duplicate"] + counts["near_duplicate"]
    )
    assert counts["pii"] == round(world.config.frac_pii * n_clean_docs)
    for r in labels:
        text = texts[r["id"]]
        if r["noise"] == "exact_duplicate":
            assert text == texts[r["source_id"]] and r["source_id"] != r["id"]
        elif r["noise"] == "near_duplicate":
            src = texts[r["source_id"]]
            assert text != src
            assert jaccard(text, src) == pytest.approx(r["jaccard"], abs=1e-4)
            assert r["jaccard"] >= world.config.near_dup_min_jaccard
        elif r["noise"] == "pii":
            assert r["pii"] and all(item["value"] in text for item in r["pii"])
            for item in r["pii"]:
                if item["type"] == "card":
                    assert _luhn_ok(item["value"])
        elif r["noise"] == "junk_lines":
            assert all(line in text.split("\n") for line in r["lines"])
        elif r["noise"] == "toxic":
            assert all(re.search(rf"\b{w}\b", text) for w in r["words"])
        else:
            assert r["noise"] in (None, "junk_doc")
    # The only duplicates are the labelled ones: clean documents are pairwise far apart.
    kept = [texts[r["id"]] for r in labels if r["noise"] in (None, "pii", "junk_lines")]
    assert len(set(kept)) == len(kept)
    long = [t for t in kept if len(t.split()) >= 20]
    worst = max(jaccard(a, b) for i, a in enumerate(long) for b in long[i + 1 :])
    assert worst < world.config.near_dup_min_jaccard
    # Clean documents carry no PII-looking strings or unsafe words.
    for r in labels:
        if r["noise"] is None:
            assert "@" not in texts[r["id"]]
            assert not S.judge_parts({"task": "sort", "answer": "x"}, texts[r["id"]])["unsafe"]


def test_corpus_contents(demo):
    content = collections.Counter(r["content"] for r in demo.pretrain_labels)
    assert {"bio", "story", "zh", "arith", "string"} <= set(content)
    zh = [d["text"] for d, r in zip(demo.pretrain, demo.pretrain_labels) if r["content"] == "zh"]
    assert all(re.search(r"[\u4e00-\u9fff]", t) for t in zh)
    text = "\n".join(d["text"] for d in demo.pretrain)
    assert re.search(r"\b7 plus 5 (is|equals) 12\.", text)
    assert "The word lamp is spelled l a m p." in text or "lamp reversed is p m a l" in text
    # Held-out text is new text, not copies of the corpus.
    assert len(demo.heldout_text) == demo.config.n_heldout_text
    assert not {d["text"] for d in demo.heldout_text} & {d["text"] for d in demo.pretrain}
    m = demo.manifest()
    assert m["entities"] == {"train": 36, "heldout": 12}
    assert 1000 < m["counts"]["pretrain"] < 5000


def test_eval_tasks(demo):
    names = {"gen_facts_heldout", "gen_facts_train", "gen_instructions_heldout",
             "mc_facts_heldout", "mc_facts_train", "mc_arithmetic"}  # fmt: skip
    assert set(demo.eval_tasks) == names
    by_name = {e.name: e for e in demo.entities}
    for name, rows in demo.eval_tasks.items():
        assert rows, name
        for row in rows:
            if name.startswith("gen_"):
                assert S.judge(row["meta"], S.format_answer(row["answer"])) == pytest.approx(1.0)
            else:
                assert len(row["choices"]) == demo.config.n_mc_choices
                assert len(set(row["choices"])) == len(row["choices"])
                assert all(c.startswith(" ") for c in row["choices"])
                gold = row["choices"][row["answer"]].strip()
                if "entity" in row["meta"]:
                    e = by_name[row["meta"]["entity"]]
                    assert gold == e.value(row["meta"]["attribute"])
                    assert re.search(rf"\b{e.name}\b", row["context"])
                else:
                    m = row["meta"]
                    expect = m["a"] + m["b"] if m["op"] == "plus" else m["a"] - m["b"]
                    assert int(gold) == expect
    ho = {r["meta"]["entity"] for r in demo.eval_tasks["mc_facts_heldout"]}
    assert ho == {e.name for e in demo.heldout_entities}


def test_files_round_trip(world, tmp_path):
    written = S.write_world(str(tmp_path), "small", seed=0)
    assert written == world
    loaded = S.load_world(str(tmp_path))
    assert loaded == world
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for name, n in manifest["counts"].items():
        rows = S.read_jsonl(str(tmp_path / f"{name}.jsonl"))
        assert len(rows) == n
    assert all("text" in r for r in S.read_jsonl(str(tmp_path / "pretrain.jsonl")))
    for info in manifest["eval_tasks"].values():
        assert len(S.read_jsonl(str(tmp_path / info["file"]))) == info["count"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        S.read_jsonl(str(tmp_path / "bad.jsonl"))
