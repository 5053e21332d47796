"""maj@k for k < num_samples (`maj_at_k`, --maj_at_k): the expected majority-vote hit over the
k-subsets of the n samples, against enumerating them; the generation path (maj@1 the mean hit,
maj@n the majority of all n, math answers grouped as they compare); the spec's and the flag's
checks; the command line end to end."""

import itertools
import json
import math
import os
import random
from fractions import Fraction

import pytest

from flaxlm.alignment import verify_math as V
from flaxlm.evaluation import generate_tasks as G
from flaxlm.evaluation.__main__ import main
from flaxlm.evaluation.tasks import Example, TaskSpec, world_tasks


def enumerated(votes, hits, k, same=str.__eq__) -> Fraction:
    """maj@k by definition: the mean over every k-subset (in sample order) of the hit of the
    first sample giving its majority answer (0 when none of it votes)."""
    total, count = Fraction(0), 0
    for subset in itertools.combinations(range(len(votes)), k):
        first = V.majority_sample([votes[i] for i in subset], same)
        total += 0 if first is None else Fraction(hits[subset[first]])
        count += 1
    return total / count


def patterns():
    """Vote patterns of n <= 7 samples: every pattern over {None, a, b, c} for n <= 4, random
    ones (more answers, more ties) for n = 5..7; hits per sample (a class may mix them)."""
    rng = random.Random(0)
    for n in range(1, 5):
        for votes in itertools.product([None, "a", "b", "c"], repeat=n):
            yield list(votes), [float(v == "a") for v in votes]
    for n in range(5, 8):
        for _ in range(60):
            answers = ["a", "b", "c", "d", "e"][: rng.randint(1, 5)]
            votes = [rng.choice(answers) if rng.random() < 0.8 else None for _ in range(n)]
            hits = [float(v is not None and rng.random() < 0.5) for v in votes]
            yield votes, hits


def test_expected_majority_is_the_mean_over_every_k_subset():
    """Every n <= 7, every k <= n: the exact computation against enumeration (exact
    fractions), ties to the answer a subset gives first and no-answer samples included."""
    spec = TaskSpec("t", "generation", "f", temperature=1.0, num_samples=7)
    checked = 0
    for votes, hits in patterns():
        n = len(votes)
        classes = G.vote_classes(votes)
        assert classes is not None  # (string equality: always classes)
        for k in range(1, n + 1):
            want = float(enumerated(votes, hits, k))
            assert G.expected_majority(classes, hits, k) == pytest.approx(want, abs=1e-12)
            got, estimated = G.majority_at_k(spec, votes, hits, [k])[k]
            assert got == pytest.approx(want, abs=1e-12) and not estimated, (votes, hits, k)
            checked += 1
    assert checked > 1000
    # Ties: 2 votes each; a pair keeps its order, so (b, a) goes to b
    assert G.expected_majority([0, 1, 1, 0], [1, 0, 0, 1], 2) == pytest.approx(3 / 6)
    assert G.expected_majority([None, None], [0, 0], 1) == 0.0  # nobody votes: 0, as majority()
    with pytest.raises(ValueError, match="maj@3 of 2 samples"):
        G.expected_majority([0, 0], [1, 1], 3)


def test_expected_majority_for_many_samples():
    """n = 64: maj@1 the mean hit, maj@k rising with k when the right answer leads; n = 1200
    (C(1200, 7)'s weights past the plain binomials) with two answers and odd k: no ties, so
    maj@k is the hypergeometric chance of more right votes than wrong."""
    rng = random.Random(1)
    votes = [0 if rng.random() < 0.5 else rng.randint(1, 6) for _ in range(64)]
    hits = [float(v == 0) for v in votes]
    got = [G.expected_majority(votes, hits, k) for k in (1, 2, 4, 8, 16, 32, 63)]
    assert got[0] == pytest.approx(sum(hits) / 64)
    assert all(0 <= a <= b <= 1 for a, b in zip(got, got[1:]))
    votes = [i % 3 and 1 for i in range(1200)]  # 800 right (1), 400 wrong (0)
    want = sum(math.comb(800, h) * math.comb(400, 7 - h) for h in range(4, 8))
    want /= math.comb(1200, 7)
    assert G.expected_majority(votes, [float(v) for v in votes], 7) == pytest.approx(want)


def _bytes_tok():
    class Bytes:
        bos_id, eos_id, vocab_size = -1, 256, 257

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode()

    return Bytes()


def _run(spec, texts, gold):
    fake = lambda ids, n, temperature=0.0: [list(t.encode()) for t in texts]  # noqa: E731
    ex = Example({"prompt": "q", "answer": gold, "meta": {}}, "f:1", 0)
    return G.generation(spec, [ex], [("q", [1])], fake, _bytes_tok(), max_prompt_len=10)


def test_maj_at_1_is_the_mean_hit_and_maj_at_n_the_majority():
    texts = ["Lyon", "paris", "Lyon", "", "PARIS.", "nice"]  # "" states no answer
    spec = TaskSpec("em", "generation", "f", temperature=1.0, num_samples=6,
                    maj_at_k=[1, 3, 6, 3])  # fmt: skip
    assert spec.maj_at_k == (1, 3, 6)  # (sorted, once each)
    metrics, samples = _run(spec, texts, "Paris")
    scores = samples[0]["scores"]
    assert scores["maj@1"] == scores["exact_match"] == 2 / 6
    votes = [G._vote(spec, t) for t in texts]
    hits = [float(v == "paris") for v in votes]
    assert scores["maj@6"] == G.majority(spec, votes, hits) == 0.0  # lyon 2, paris 2: lyon
    assert scores["maj@3"] == pytest.approx(float(enumerated(votes, hits, 3))) == 0.4  # 8/20
    assert metrics["maj@3"] == scores["maj@3"] and "maj@3_estimated" not in metrics
    assert list(scores) == ["exact_match", "pass@6", "maj@1", "maj@3", "maj@6"]
    # num_samples = 1: maj@1 asked for is the sample's own hit
    one = spec.replace(num_samples=1, temperature=0.0, maj_at_k=[1])
    assert _run(one, ["paris"], "Paris")[1][0]["scores"]["maj@1"] == 1.0
    assert "maj@1" not in _run(one.replace(maj_at_k=()), ["paris"], "Paris")[1][0]["scores"]


def test_math_answers_written_differently_vote_together_in_maj_at_k():
    """Math answers vote as they compare: "1/2", "0.5" and "\\frac{1}{2}" are one answer of 3
    votes against "3"'s 2, so maj@3 is the share of 3-subsets holding 2 of them or more (7 of
    10), not 0.4 as strings would vote."""
    boxed = ["3", "1/2", "0.5", "3", "\\frac{1}{2}"]
    spec = TaskSpec("m", "generation", "f", scoring="math", temperature=1.0, num_samples=5,
                    maj_at_k=[1, 3])  # fmt: skip
    _, samples = _run(spec, [f"so \\boxed{{{b}}}" for b in boxed], "\\frac12")
    scores = samples[0]["scores"]
    assert scores["maj@3"] == pytest.approx(0.7) and scores["maj@5"] == 1.0
    assert scores["maj@1"] == scores["exact_match"] == 0.6
    hits = [float(b != "3") for b in boxed]
    assert enumerated(boxed, hits, 3, V.answers_equal) == Fraction(7, 10)
    assert enumerated(boxed, hits, 3) == Fraction(4, 10)  # (as strings)


def test_votes_that_form_no_classes_are_enumerated_or_estimated(monkeypatch):
    """math_rel_tol chains 1.00 ~ 1.01 ~ 1.02 (but 1.00 !~ 1.02): how a subset groups its votes
    depends on its first ones, so there are no classes to count with; maj@k is then the mean
    over every k-subset, or (past MAJ_ENUMERATE of them) a seeded estimate, flagged."""
    spec = TaskSpec("m", "generation", "f", scoring="math", math_rel_tol=0.015,
                    temperature=1.0, num_samples=4)  # fmt: skip
    same = G._same(spec)
    votes, hits = ["1.00", "1.01", "1.02", "1.02"], [0.0, 1.0, 0.0, 0.0]
    assert G.vote_classes(votes, same) is None
    want = enumerated(votes, hits, 3, same)
    assert want == Fraction(1, 4)  # (the classes of all 4 samples would say 0)
    assert G.majority_at_k(spec, votes, hits, [3]) == {3: (0.25, False)}
    assert G.vote_classes(["1.00", "1.01", "5"], same) == [0, 0, 1]  # (a consistent pair)
    votes = ["1.00", "1.01", "1.02", None] * 5
    hits = [float(v == "1.01") for v in votes]
    want = float(enumerated(votes, hits, 4, same))
    monkeypatch.setattr(G, "MAJ_ENUMERATE", 100)  # C(20, 4) = 4845 subsets: drawn
    got = G.majority_at_k(spec, votes, hits, [1, 4, 20], seed=7)
    assert got[4][1] and got[4][0] == pytest.approx(want, abs=0.05)
    assert got[4] == G.majority_at_k(spec, votes, hits, [4], seed=7)[4]  # (seeded)
    assert got[1] == (0.25, False) and not got[20][1]  # (k = 1 and k = n need no subsets)
    spec = spec.replace(num_samples=20, maj_at_k=[4])
    metrics, samples = _run(spec, [f"\\boxed{{{v}}}" if v else "?" for v in votes], "7")
    assert metrics["maj@4_estimated"] == 1.0 and "maj@20_estimated" not in metrics


def test_maj_at_k_is_checked_naming_the_key(world_dir):
    gen = TaskSpec("t", "generation", "f", temperature=1.0, num_samples=4)
    for bad, why in [((5,), r"task 't': maj_at_k=\[5\] needs a generation task with "
                            r"num_samples >= 5 \(it has 4\)"),
                     ((0,), r"task 't': maj_at_k must hold positive integers"),
                     ((True,), "maj_at_k must hold positive integers")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            gen.replace(maj_at_k=bad)
    with pytest.raises(ValueError, match=r"maj_at_k=\[1\] needs a generation task"):
        TaskSpec("mc", "multiple_choice", "f", maj_at_k=[1])
    judge = world_tasks(world_dir)["gen_facts_train"].replace(temperature=1.0, num_samples=2)
    for spec in (judge, gen.replace(scoring="code")):  # their samples state no answer
        with pytest.raises(ValueError, match=rf"task '{spec.name}': maj_at_k is for scorings "
                                             rf"whose samples state an answer .*not "
                                             rf"'{spec.scoring}'"):  # fmt: skip
            spec.replace(maj_at_k=[2])
    with pytest.raises(ValueError, match=r"s\.json\[0\]: maj_at_k=\['2'\] must be of type tuple"):
        TaskSpec.from_dict({"name": "t", "type": "generation", "file": "f", "maj_at_k": ["2"]},
                           where="s.json[0]")  # fmt: skip
    spec = TaskSpec.from_dict({"name": "t", "type": "generation", "file": "f",
                               "scoring": "math", "temperature": 1.0, "num_samples": 4,
                               "maj_at_k": [2, 1]})  # fmt: skip
    assert spec.maj_at_k == (1, 2) and spec.to_dict()["maj_at_k"] == [1, 2]
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def _voting_spec(world_dir, tmp_path):
    """The world's gen_facts_train rows as an exact-match task (it is judge-scored)."""
    with open(os.path.join(world_dir, "manifest.json"), encoding="utf-8") as f:
        file = json.load(f)["eval_tasks"]["gen_facts_train"]["file"]
    path = tmp_path / "em.json"
    path.write_text(json.dumps({"name": "gen_em", "type": "generation",
                                "file": os.path.join(world_dir, file),
                                "template": "Question: {prompt}\nAnswer:", "stop": ["\n"],
                                "max_new_tokens": 8}))  # fmt: skip
    return str(path)


def test_cli_maj_at_k_end_to_end(run_dir, world_dir, tok_path, tmp_path, capsys):
    """--maj_at_k reaches the generation tasks that vote (not the judge-scored one): their
    metrics, samples' scores, the table and the spec the results record carry each maj@k."""
    em = _voting_spec(world_dir, tmp_path)
    out = tmp_path / "res.json"
    argv = ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path,
            "--tasks", f"gen_facts_train,{em}", "--limit", "3", "--samples", "--out", str(out),
            "--temperature", "1.0", "--num_samples", "4", "--maj_at_k", "1,2"]  # fmt: skip
    main(argv)
    table = capsys.readouterr().out
    res = json.loads(out.read_text())["tasks"]
    gen = res["gen_em"]
    assert gen["spec"]["maj_at_k"] == [1, 2] and gen["spec"]["num_samples"] == 4
    assert {"maj@1", "maj@2", "maj@4"} <= set(gen["metrics"])
    assert gen["metrics"]["maj@1"] == pytest.approx(gen["metrics"]["exact_match"])
    for s in gen["samples"]:
        assert {"maj@1", "maj@2", "maj@4"} <= set(s["scores"])
    assert "maj@2" in table and "maj@1" in table
    judged = res["gen_facts_train"]
    assert judged["spec"]["maj_at_k"] == [] and not any("maj@" in m for m in judged["metrics"])


def test_cli_maj_at_k_errors_name_the_flag(run_dir, world_dir, tok_path, tmp_path, capsys):
    base = ["--checkpoint", run_dir, "--world", world_dir, "--tokenizer", tok_path]
    for value, why in (("0", "'0': expected k values >= 1"), ("x", "'x': expected k values")):
        with pytest.raises(SystemExit) as e:
            main([*base, "--tasks", "gen_facts_train", "--maj_at_k", value])
        assert e.value.code == 2 and f"--maj_at_k: {why}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^--maj_at_k 1: none of the tasks votes for an answer"):
        main([*base, "--tasks", "gen_facts_train,mc_facts_heldout", "--maj_at_k", "1"])
    em = _voting_spec(world_dir, tmp_path)
    with pytest.raises(SystemExit, match=r"task 'gen_em': maj_at_k=\[1, 10\] needs a generation "
                                         r"task with num_samples >= 10 \(it has 2\) "
                                         r"\(--maj_at_k 1,10\)$"):  # fmt: skip
        main([*base, "--tasks", f"gen_facts_train,{em}", "--temperature", "1",
              "--num_samples", "2", "--maj_at_k", "1,10"])  # fmt: skip
