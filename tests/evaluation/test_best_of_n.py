"""Best-of-N selection (evaluation/best_of_n.py): each prompt's best sample as an SFT record,
its (best, worst) as a DPO pair. The selection is checked against a hand-computed argmax with a
cheap injected scorer; the written files are read back by SFT's and DPO's own loaders; one
command-line run scores with a (random-weight) reward-model run."""

import json
import os
import sys

import numpy as np
import pytest

from flaxlm.data.chat_records import DataReport
from flaxlm.evaluation import best_of_n as bon
from flaxlm.evaluation import winrate
from tests.evaluation.test_winrate_cli import rm_run  # noqa: F401  (module-scoped fixture)

SYSTEM = [{"role": "system", "content": "say yes or no"}]


def _write(path, recs) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _table(scores: dict):
    """A ScoreFn reading each response's score from `scores` (text -> float)."""
    return lambda prompts, responses: [scores[r] for r in responses]


def test_best_and_worst_match_a_hand_argmax(tmp_path):
    """Integer scores, so ties are common: numpy's argmax / argmin (the first of equals) is the
    independent reference for the best, the worst, the margin and every skip count."""
    rng = np.random.default_rng(3)
    P, K, min_reward, min_margin = 40, 5, 2.0, 2.0
    S = rng.integers(0, 4, (P, K)).astype(float)
    S[0] = 1.0  # all equal: a tie pair
    texts = [[f"answer {k} to question {i}" for k in range(K)] for i in range(P)]
    prompts = [f"question {i}" for i in range(P)]
    recs = [{"prompt": prompts[i], "completion": texts[i][k], "sample": k}
            for i in range(P) for k in range(K)]  # fmt: skip
    path = _write(tmp_path / "s.jsonl", recs)
    table = {texts[i][k]: S[i, k] for i in range(P) for k in range(K)}
    sel = bon.best_of_n(_table(table), [path], min_reward=min_reward, min_margin=min_margin)

    b, w = S.argmax(1), S.argmin(1)
    margin = S.max(1) - S.min(1)
    # the data exercises the tie rule: a prompt whose top score is shared by later samples
    assert any((S[i] == S[i].max()).sum() > 1 for i in range(P) if b[i] < K - 1)
    want_sft = [texts[i][b[i]] for i in range(P) if S[i, b[i]] >= min_reward]
    assert [r["messages"] for r in sel.sft] == [
        [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": texts[i][b[i]]}]
        for i in range(P) if S[i, b[i]] >= min_reward
    ]  # fmt: skip
    assert len(want_sft) == sel.summary["sft_written"]
    keep = [i for i in range(P) if margin[i] > 0 and margin[i] >= min_margin]
    assert sel.pairs == [
        {"prompt": prompts[i], "chosen": texts[i][b[i]], "rejected": texts[i][w[i]],
         "margin": margin[i]} for i in keep
    ]  # fmt: skip
    s = sel.summary
    counts = (s["sft_skipped"]["below_min_reward"], s["pairs_skipped"]["tie"],
              s["pairs_skipped"]["below_min_margin"])  # fmt: skip
    want = ((S.max(1) < min_reward).sum(), (margin == 0).sum(),
            ((margin > 0) & (margin < min_margin)).sum())  # fmt: skip
    assert counts == want and all(want)  # each reason occurs, so each count is tested
    assert s["pairs_written"] == len(keep) == P - want[1] - want[2]
    assert (s["prompts"], s["samples"], s["blank_samples"]) == (P, P * K, 0)
    assert s["mean_reward"] == pytest.approx(S.mean())
    assert s["mean_best_reward"] == pytest.approx(S.max(1).mean())
    assert s["best_of_n_gain"] == pytest.approx((S.max(1) - S.mean(1)).mean())
    # per line: every line's score, by file:line, grouped by prompt
    assert [(x["line"], x["prompt"], x["score"]) for x in sel.lines] == [
        (i * K + k + 1, i, S[i, k]) for i in range(P) for k in range(K)
    ]


def test_files_merge_per_prompt_and_ties_go_to_the_first_in_input_order(tmp_path):
    """Several files: all lines of a prompt are its samples, prompts in first-seen order,
    samples in file order then line order; equal scores go to the first of them."""
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p1", "completion": "x"},
                                      {"prompt": "q", "completion": "y"},
                                      {"prompt": "q", "completion": "x1"}])  # fmt: skip
    b = _write(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "z"},
                                      {"prompt": "q", "completion": "w"},
                                      {"prompt": "r", "completion": "v"},
                                      {"prompt": "q", "completion": "u"}])  # fmt: skip
    score = _table({"x": 0.5, "y": 3.0, "x1": 1.0, "z": 3.0, "w": -1.0, "v": 2.0, "u": -1.0})
    sel = bon.best_of_n(score, [a, b])
    best = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in sel.sft}
    assert list(best) == ["p1", "q", "r"]  # first-seen order; q's samples from both files
    assert best["q"] == "y" and sel.pairs == [
        {"prompt": "q", "chosen": "y", "rejected": "w", "margin": 4.0}  # w: the first -1.0
    ]
    assert sel.prompts[1]["best"] == f"{a}:2" and sel.prompts[1]["worst"] == f"{b}:2"
    assert sel.summary["pairs_skipped"]["one_sample"] == 2  # p1 and r: SFT but no pair
    assert (sel.summary["prompts"], sel.summary["samples"]) == (3, 7)
    # every line in input order, naming its prompt
    assert [(x["file"], x["line"], x["prompt"]) for x in sel.lines] == [
        (a, 1, 0), (a, 2, 1), (a, 3, 1), (b, 1, 1), (b, 2, 1), (b, 3, 2), (b, 4, 1)
    ]  # fmt: skip
    # the other file order: b's z is now first among the 3.0s
    swapped = bon.best_of_n(score, [b, a])
    assert [r["messages"][1]["content"] for r in swapped.sft] == ["z", "v", "x"]
    assert swapped.pairs[0]["chosen"] == "z" and swapped.pairs[0]["rejected"] == "w"


def test_identical_texts_blank_samples_and_thresholds(tmp_path):
    rows = [("A", "same"), ("A", "same "), ("A", "same"),  # one text three times
            ("B", "good"), ("B", "good"), ("B", "bad"),  # the worse "good" is not the worst
            ("C", ""), ("C", "ok"),  # a blank best-scoring sample
            ("D", "  "), ("D", "")]  # fmt: skip
    path = _write(tmp_path / "s.jsonl", [{"prompt": p, "completion": c} for p, c in rows])
    samples = bon.read_samples([path])
    scores = [1.0, 0.5, 0.2, 2.0, 0.1, 1.0, 5.0, 1.0, 9.0, 9.0]
    sel = bon.select(samples, scores)
    assert [r["messages"][1]["content"] for r in sel.sft] == ["same", "good", "ok"]
    assert sel.pairs == [{"prompt": "B", "chosen": "good", "rejected": "bad", "margin": 1.0}]
    assert [p["pair"] for p in sel.prompts] == ["identical", "written", "one_sample",
                                                "no_usable_sample"]  # fmt: skip
    s = sel.summary
    assert s["blank_samples"] == 3 and s["sft_skipped"]["no_usable_sample"] == 1
    assert s["mean_best_reward"] == pytest.approx((1.0 + 2.0 + 1.0) / 3)
    assert sel.prompts[2]["mean"] == 3.0  # the blank's score counts in the prompt's mean
    # thresholds at the boundary: equal to --min_reward / --min_margin is kept
    edge = bon.select(samples, scores, min_reward=2.0, min_margin=1.0)
    assert [r["messages"][1]["content"] for r in edge.sft] == ["good"]
    assert edge.summary["sft_skipped"] == {"no_usable_sample": 1, "only_truncated": 0,
                                           "below_min_reward": 2}  # fmt: skip
    assert len(edge.pairs) == 1
    over = bon.select(samples, scores, min_margin=1.5)
    assert over.pairs == [] and over.summary["pairs_skipped"]["below_min_margin"] == 1
    with pytest.raises(ValueError, match="min_margin"):
        bon.select(samples, scores, min_margin=-1.0)


def test_a_sample_cut_at_max_new_tokens_is_never_the_best(tmp_path):
    """generate --json's "stopped": false (cut at max_new_tokens) may lose a pair, not win
    one nor become SFT data; --keep_truncated lets it."""
    rows = [("A", "a long answer that was cu", False, 9.0), ("A", "short.", True, 2.0),
            ("A", "meh", None, 1.0),  # (no "stopped" field: a finished answer)
            ("B", "cut off", False, 5.0), ("B", "also cut", False, 3.0)]  # fmt: skip
    recs = [{"prompt": p, "completion": c, **({} if st is None else {"stopped": st})}
            for p, c, st, _ in rows]  # fmt: skip
    samples = bon.read_samples([_write(tmp_path / "s.jsonl", recs)])
    assert [x.stopped for x in samples] == [False, True, None, False, False]
    scores = [r[3] for r in rows]
    sel = bon.select(samples, scores)
    assert [r["messages"][1]["content"] for r in sel.sft] == ["short."]
    assert sel.pairs == [{"prompt": "A", "chosen": "short.", "rejected": "meh", "margin": 1.0}]
    assert [p["sft"] for p in sel.prompts] == ["written", "only_truncated"]
    assert sel.summary["truncated_samples"] == 3
    assert sel.summary["pairs_skipped"]["only_truncated"] == 1
    kept = bon.select(samples, scores, keep_truncated=True)
    assert [r["messages"][1]["content"] for r in kept.sft] == ["a long answer that was cu",
                                                               "cut off"]  # fmt: skip
    assert kept.pairs[0]["rejected"] == "meh" and kept.pairs[1]["margin"] == 2.0
    # a truncated sample can be the rejected side: the worst here is the cut one
    worse = bon.select(samples, [1.0, 2.0, 1.5, 0.0, 0.0])
    assert worse.pairs[0] == {"prompt": "A", "chosen": "short.",
                              "rejected": "a long answer that was cu", "margin": 1.0}  # fmt: skip


def test_written_records_read_back_by_sft_and_dpo_loaders(tmp_path, chat_tokenizer):
    """The SFT and pair files load through SFT's `load_examples` and DPO's `load_pairs` with a
    strict report (any record refused would raise), list-of-messages prompts round-tripped."""
    from flaxlm.alignment.reward import load_pairs
    from flaxlm.alignment.sft import load_examples
    from flaxlm.configs import dpo, sft
    from flaxlm.data.chat_template import training_template

    multi = [*SYSTEM, {"role": "user", "content": "where does Kavo live"},
             {"role": "assistant", "content": "in Brel"},
             {"role": "user", "content": "is 42 a number"}]  # fmt: skip
    kavo = [*SYSTEM, {"role": "user", "content": "Kavo"}]
    recs = [{"prompt": "the city of Brel", "completion": "yes"},
            {"prompt": [{"role": "user", "content": "the city of Brel"}], "completion": "no"},
            {"prompt": multi, "completion": "a number"},
            {"prompt": multi, "completion": "no"},
            {"prompt": kavo, "completion": "yes"},
            {"prompt": kavo, "completion": "say no"}]  # fmt: skip
    path = _write(tmp_path / "s.jsonl", recs)
    score = _table({"yes": 1.0, "no": 0.0, "a number": 2.0, "say no": 0.5})
    sel = bon.best_of_n(score, [path])
    # the text prompt and the same lone user turn as a list are one prompt
    assert sel.summary["prompts"] == 3 and len(sel.pairs) == 3
    user = {"role": "user", "content": "the city of Brel"}
    want_sft = [[user, {"role": "assistant", "content": "yes"}],
                [*multi, {"role": "assistant", "content": "a number"}],
                [*kavo, {"role": "assistant", "content": "yes"}]]  # fmt: skip
    assert [r["messages"] for r in sel.sft] == want_sft
    assert [p["prompt"] for p in sel.pairs] == ["the city of Brel", multi, kavo]
    sft_path, pairs_path = str(tmp_path / "sft.jsonl"), str(tmp_path / "pairs.jsonl")
    bon.write_atomic(sft_path, bon.jsonl(sel.sft))
    bon.write_atomic(pairs_path, bon.jsonl(sel.pairs))

    template = training_template(chat_tokenizer[1])
    report = DataReport(strict=True)
    examples = load_examples(sft_path, sft.get_config(""), template, report)
    assert report.used == 3 and report.log.total == 0
    assert [e["messages"] for e in examples] == want_sft
    report = DataReport(strict=True)
    pairs = load_pairs(pairs_path, dpo.get_config(""), template, report)
    assert report.used == 3 and report.log.total == 0
    want = [([user], 1.0), (multi, 2.0), (kavo, 0.5)]
    assert [(p["prompt"], p["margin"]) for p in pairs] == want


def test_bad_input_names_its_line(tmp_path):
    good = _write(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not a"):
        bon.read_samples([good, str(bad)])
    blank = _write(tmp_path / "blank.jsonl", [{"prompt": "p", "completion": "c"},
                                              {"prompt": "  ", "completion": "c"}])  # fmt: skip
    with pytest.raises(ValueError, match=r"blank.jsonl:2: unusable prompt"):
        bon.read_samples([blank])
    with pytest.raises(ValueError, match="named twice"):
        bon.read_samples([good, good])
    two = _write(tmp_path / "two.jsonl", [{"prompt": "p", "completion": "c"}] * 2)
    with pytest.raises(ValueError, match=r"two.jsonl:2: score nan is not finite"):
        bon.best_of_n(lambda p, r: [1.0, float("nan")], [two])


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "best.jsonl"
    out.write_text("old\n")

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(bon.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        bon.write_atomic(str(out), "new\n" * 1000)
    assert out.read_text() == "old\n" and os.listdir(tmp_path) == ["best.jsonl"]
    monkeypatch.undo()
    bon.write_atomic(str(out), "new\n")
    assert out.read_text() == "new\n" and os.listdir(tmp_path) == ["best.jsonl"]


def test_command_line_with_a_reward_model_run(rm_run, tmp_path, capsys):  # noqa: F811
    """generate --json --num_samples lines of two files, scored by a reward-model run: the best
    and worst are those of the run's own scores, and the outputs are whole files."""
    run, _ = rm_run
    prompts = ["where does Kavo live", "is 42 a number",
               [*SYSTEM, {"role": "user", "content": "the city"}]]  # fmt: skip
    answers = [["Kavo lives in Brel", "no", "the city of Brel"], ["yes", "42", "a number"],
               ["no", "yes", "say yes or no"]]  # fmt: skip
    recs = [{"prompt": p, "completion": c, "n_tokens": 3, "stopped": True, "sample": k}
            for p, cs in zip(prompts, answers) for k, c in enumerate(cs)]  # fmt: skip
    a = _write(tmp_path / "a.jsonl", recs)
    b = _write(tmp_path / "b.jsonl", [{"prompt": p, "completion": "Brel"} for p in prompts])
    sft_out, pairs_out, out = (str(tmp_path / n) for n in ("sft.jsonl", "pairs.jsonl", "r.json"))
    argv = [a, b, "--reward_model", run, "--sft_out", sft_out, "--pairs_out", pairs_out,
            "--out", out, "--batch_size", "4"]  # fmt: skip
    res = bon.main(argv)
    printed = capsys.readouterr().out
    assert "12 samples of 3 prompts" in printed and "mean best" in printed
    saved = json.loads(open(out).read())
    S = np.array([x["score"] for x in saved["scores"]])
    # the scores are the reward model's (file a's 9 lines then b's 3)
    score = winrate.load_reward_scorer(run)
    lines = recs + [{"prompt": p, "completion": "Brel"} for p in prompts]
    direct = score([r["prompt"] for r in lines], [r["completion"] for r in lines])
    np.testing.assert_allclose(S, direct, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(S, 5))) > 3
    by_prompt = [[*S[3 * i : 3 * i + 3], S[9 + i]] for i in range(3)]  # samples in input order
    texts = [[*answers[i], "Brel"] for i in range(3)]
    sft = [json.loads(line) for line in open(sft_out)]
    assert [r["messages"][-1]["content"] for r in sft] == [
        texts[i][int(np.argmax(by_prompt[i]))] for i in range(3)
    ]
    pairs = [json.loads(line) for line in open(pairs_out)]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (texts[i][int(np.argmax(by_prompt[i]))], texts[i][int(np.argmin(by_prompt[i]))])
        for i in range(3)
    ]
    assert [p["margin"] for p in pairs] == pytest.approx([np.ptp(x) for x in by_prompt])
    assert res["pairs_written"] == saved["pairs_written"] == 3
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl", "pairs.jsonl", "r.json",
                                            "sft.jsonl"]  # fmt: skip
    # a rerun writes the same bytes
    before = open(sft_out).read(), open(pairs_out).read()
    bon.main(argv)
    assert (open(sft_out).read(), open(pairs_out).read()) == before

    # an output that is an input is refused before anything is written
    with pytest.raises(SystemExit, match="is an input file"):
        bon.main([a, b, "--reward_model", run, "--sft_out", str(tmp_path / "." / "b.jsonl")])
    assert open(b).read().count("Brel") == 3
    with pytest.raises(SystemExit, match="also given to --sft_out"):
        bon.main([a, "--reward_model", run, "--sft_out", sft_out, "--pairs_out", sft_out])
    with pytest.raises(SystemExit) as e:  # nothing to write: a usage error
        bon.main([a, "--reward_model", run])
    assert e.value.code == 2 and "--sft_out" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a run directory"):
        bon.main([a, "--reward_model", str(tmp_path), "--sft_out", str(tmp_path / "x.jsonl")])
    assert not os.path.exists(tmp_path / "x.jsonl")


# ---------------------------------------------------------------------------------------------
# Verifiable rewards (--rewards: GRPO's reward functions, judged by each line's meta)

MY_REWARDS = '''
def numeric(meta, response, prompt):
    """1 when the response ends in the number meta["answer"] ends in; -2 when the prompt (its
    turns, passed as GRPO passes them) has a system turn."""
    if prompt[0]["role"] == "system":
        return -2.0
    last = lambda text: (text.replace(".", " ").split() or [""])[-1]  # noqa: E731
    return float(last(response) == last(str(meta["answer"])))
'''


def _sample(prompt, completion, answer=None, **extra):
    meta = {} if answer is None else {"meta": {"answer": answer, "source": "hand"}}
    return {"prompt": prompt, "completion": completion, **meta, **extra}


def test_rewards_exact_match_keeps_a_correct_answer(tmp_path, capsys):
    """--rewards exact_match against each line's meta.answer: the best is the correct sample
    wherever it is among the K; --min_reward 1.0 writes no record for a prompt with none; a
    blank completion is not judged and scores --empty_reward; the summary names the scorer."""
    rows = [("2+2?", "5", "4"), ("2+2?", "4", "4"), ("2+2?", " 4 ", "4"),  # correct, stripped
            ("3*3?", "6", "9"), ("3*3?", "", "9"), ("3*3?", "8", "9"),  # none correct
            ("1+0?", "", "1"), ("1+0?", "1", "1")]  # fmt: skip
    path = _write(tmp_path / "s.jsonl", [_sample(p, c, a) for p, c, a in rows])
    sft, pairs, out = (str(tmp_path / n) for n in ("sft.jsonl", "pairs.jsonl", "r.json"))
    res = bon.main(["--rewards", "exact_match", path, "--sft_out", sft, "--pairs_out", pairs,
                    "--min_reward", "1.0", "--out", out, "--empty_reward", "-3"])  # fmt: skip
    assert "scored by rewards exact_match:1" in capsys.readouterr().out
    best = [json.loads(line)["messages"] for line in open(sft)]
    assert best == [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                    for q, a in (("2+2?", "4"), ("1+0?", "1"))]  # fmt: skip
    saved = json.loads(open(out).read())
    assert [x["score"] for x in saved["scores"]] == [0.0, 1.0, 1.0, 0.0, -3.0, 0.0, -3.0, 1.0]
    assert saved["sft_skipped"]["below_min_reward"] == 1
    assert (saved["scorer"], saved["rewards"], saved["empty_reward"]) == (
        "rewards exact_match:1", "exact_match:1", -3.0)  # fmt: skip
    assert "reward_model" not in saved
    # 1+0?: the blank is no sample to pair with; 3*3?: every usable sample scores 0, a tie
    assert [(p["chosen"], p["rejected"]) for p in map(json.loads, open(pairs))] == [("4", "5")]
    assert res["pairs_skipped"]["one_sample"] == 1 and res["pairs_skipped"]["tie"] == 1


def test_reward_weights_combine_as_grpo_sums_them(tmp_path, monkeypatch):
    """exact_match,format:0.1,bon_rewards:numeric:0.5 (a user's function, given the prompt's
    turns): each score is the hand-computed Σ weight·value; with the built-in world's format
    ("The answer is X.") only some responses are well formed."""
    (tmp_path / "bon_rewards.py").write_text(MY_REWARDS)  # (not GRPO tests' my_rewards)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "bon_rewards", None)  # so that it is gone afterwards,
    del sys.modules["bon_rewards"]  # and imported from tmp_path now
    sys_q = [*SYSTEM, {"role": "user", "content": "7-2?"}]
    rows = [("7+2?", "The answer is 9.", "The answer is 9."),  # exact, format, numeric
            ("7+2?", "9", "The answer is 9."),  # numeric only (not the answer's text)
            ("7+2?", "The answer is 8.", "The answer is 9."),  # format only
            ("5+5?", "10", "10"),  # exact, numeric
            (sys_q, "The answer is 5.", "5"),  # format, numeric: -2 (a system turn)
            ]  # fmt: skip
    path = _write(tmp_path / "s.jsonl", [_sample(p, c, a) for p, c, a in rows])
    want = [1 + 0.1 + 0.5, 0.5, 0.1, 1 + 0.5, 0.1 - 1.0]
    sel = bon.best_of_n("exact_match,format:0.1,bon_rewards:numeric:0.5", [path])
    assert [x["score"] for x in sel.lines] == pytest.approx(want, rel=1e-6)
    assert [r["messages"][-1]["content"] for r in sel.sft] == ["The answer is 9.", "10",
                                                               "The answer is 5."]  # fmt: skip
    assert sel.pairs[0]["margin"] == pytest.approx(1.6 - 0.1, rel=1e-6)
    # the parsed list selects the same; a weight of 0 drops a function's say
    from flaxlm.alignment.grpo_rewards import parse_rewards

    same = bon.best_of_n(parse_rewards("exact_match,format:0.1,bon_rewards:numeric:0.5"), [path])
    assert same.lines == sel.lines
    zero = bon.best_of_n("exact_match:0,format:2", [path])
    assert [x["score"] for x in zero.lines] == [2.0, 0.0, 2.0, 0.0, 2.0]


def test_rewards_without_meta_or_with_a_bad_one_name_the_line(tmp_path):
    recs = [_sample("2+2?", "4", "4"), _sample("2+2?", "5")]  # line 2: no meta
    path = _write(tmp_path / "s.jsonl", recs)
    with pytest.raises(SystemExit) as e:
        bon.main(["--rewards", "exact_match", path, "--sft_out", str(tmp_path / "o.jsonl")])
    msg = str(e.value.code)
    assert msg.startswith(f"{path}:2: reward exact_match raised KeyError") and "meta.answer" in msg
    assert 'the line has no "meta"' in msg and ".jsonl --prompts_file" in msg
    assert not os.path.exists(tmp_path / "o.jsonl")
    # format needs no meta: the same file scores
    assert bon.best_of_n("format", [path]).summary["samples"] == 2
    bad = _write(tmp_path / "bad.jsonl", [recs[0], {**recs[0], "meta": "4"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: meta='4' is not a JSON object"):
        bon.read_samples([bad])


@pytest.mark.parametrize("flags, message", [
    ([], "one of the arguments --reward_model --prm --rewards is required"),
    (["--rewards", "exact_match", "--reward_model", "runs/rm"], "not allowed with argument"),
    (["--rewards", "exact_match,rm:0.5"], "--rewards: 'rm' is GRPO's reward model"),
    (["--rewards", "exact_matc"], "--rewards: unknown reward 'exact_matc'"),
    (["--rewards", "format:x:y"], "--rewards: bad weight"),
    (["--reward_model", "runs/rm", "--empty_reward", "0"], "--empty_reward needs --rewards"),
    (["--reward_model", "runs/rm", "--code_limits", "timeout=9"], "--code_limits needs --rewards"),
    (["--rewards", "exact_match", "--code_limits", "timeout=9"],
     "--code_limits: no code_tests or code_tests_partial among --rewards"),
    (["--rewards", "code_tests", "--code_limits", "timeout=0"],
     "--code_limits.timeout=0: expected a positive number of seconds"),
])  # fmt: skip
def test_exactly_one_scorer_is_a_usage_error_otherwise(flags, message, tmp_path, capsys):
    path = _write(tmp_path / "s.jsonl", [_sample("p", "c", "c")])
    with pytest.raises(SystemExit) as e:
        bon.main([path, "--sft_out", str(tmp_path / "o.jsonl"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_code_limits_bind_the_code_rewards(tmp_path):
    """--code_limits: the code_tests programs run under those Limits (a solution that writes a
    file outside its run directory scores 0 under the default guard, 1 with writes_outside);
    the summary records them."""
    out = tmp_path / "written.txt"
    program = f"open({str(out)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b\n"
    solution = f"```python\n{program}```"
    meta = {"tests": ["assert add(2, 3) == 5"]}
    rows = [{"prompt": "add?", "completion": c, "meta": meta} for c in ("no code", solution)]
    path = _write(tmp_path / "s.jsonl", rows)
    sft = str(tmp_path / "sft.jsonl")
    res = bon.main(["--rewards", "code_tests", path, "--sft_out", sft, "--min_reward", "1"])
    assert res["sft_written"] == 0 and not out.exists()  # (refused: the program failed)
    res = bon.main(["--rewards", "code_tests", path, "--sft_out", sft, "--min_reward", "1",
                    "--code_limits", "writes_outside=true,timeout=10"])  # fmt: skip
    assert res["sft_written"] == 1 and out.read_text() == "x"
    assert res["code_limits"] == {"writes_outside": True, "timeout": 10}
