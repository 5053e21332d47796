"""The win-rate command line: two completion files scored by a reward-model run."""

import json

import jax
import numpy as np
import pytest

from flaxlm.evaluation import winrate
from flaxlm.models.config import get_variant
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train.checkpoint import Checkpointer, CheckpointError
from flaxlm.train.state import unbox

PROMPTS = ["where does Kavo live", "the city of Brel", "is 42 a number", "say yes or no"]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, chat_tokenizer):
    """A reward-model run with random weights and its own SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("rm")
    tok_path, tok = chat_tokenizer
    cfg = get_variant("tiny", vocab_size=512, n_layers=1)
    params = unbox(scalar_model_fns(cfg)[0](jax.random.PRNGKey(0)))
    meta = {"model_config": cfg.to_dict(), "tokenizer": tok_path,
            "head": "scalar", "lora": {}}  # fmt: skip
    ck = Checkpointer(str(root / "run"), keep=1, async_save=False)
    ck.save(1, {"params": params}, {}, meta)
    ck.wait()
    ck.close()
    return str(root / "run"), tok


def _write(path, completions, prompts=PROMPTS):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in zip(prompts, completions)))  # fmt: skip
    return str(path)


def test_win_rate_of_two_completion_files(rm_run, tmp_path, capsys):
    run, tok = rm_run
    a = ["Kavo lives in Brel", "yes", "42 is a number", "no"]
    b = ["no", "the city", "a", "yes or no"]
    out = tmp_path / "res.json"
    res = winrate.main([_write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b),
                        "--reward_model", run, "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    score = winrate.load_reward_scorer(run)  # the run's own tokenizer, from its meta
    sa, sb = np.asarray(score(PROMPTS, a)), np.asarray(score(PROMPTS, b))
    np.testing.assert_allclose(saved["scores_a"], sa, rtol=1e-6)
    np.testing.assert_allclose(saved["scores_b"], sb, rtol=1e-6)
    assert len(set(np.round(sa, 6))) > 1  # the reward model's scores, not a constant
    want = (np.sum(sa > sb) + 0.5 * np.sum(sa == sb)) / len(PROMPTS)
    assert res["win_rate"] == pytest.approx(want) and res["n"] == 4
    assert res["ci95_low"] <= res["win_rate"] <= res["ci95_high"]
    assert "win rate of" in capsys.readouterr().out
    # A file against itself: all ties, a degenerate interval.
    same = winrate.main([str(tmp_path / "a.jsonl")] * 2 + ["--reward_model", run])
    assert (same["win_rate"], same["ties"], same["ci95_low"], same["ci95_high"]) == (
        0.5, 4, 0.5, 0.5,
    )  # fmt: skip


def test_bad_completion_files_and_runs_are_named(rm_run, tmp_path, capsys):
    run, _ = rm_run
    a = _write(tmp_path / "a.jsonl", ["x"] * 4)
    swapped = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
    with pytest.raises(SystemExit, match="completion 2: the prompts differ"):
        winrate.main([a, _write(tmp_path / "b.jsonl", ["x"] * 4, swapped), "--reward_model", run])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": 1}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a"):
        winrate.main([a, str(tmp_path / "bad.jsonl"), "--reward_model", run])
    for batch in ("0", "-1"):  # 0 was range()'s traceback; -1 scored nothing, then "no prompts"
        with pytest.raises(SystemExit) as e:
            winrate.main([a, a, "--reward_model", run, "--batch", batch])
        assert e.value.code == 2 and f"--batch: {batch}: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has 4 completions"):
        winrate.main([a, _write(tmp_path / "c.jsonl", ["x"] * 3), "--reward_model", run])
    with pytest.raises(SystemExit, match="not a run directory"):
        winrate.main([a, a, "--reward_model", str(tmp_path)])
    lm = tmp_path / "lm"
    ck = Checkpointer(str(lm), keep=1, async_save=False)  # a run whose meta says head "lm"
    ck.save(1, {"params": {}}, {}, {"head": "lm"})
    ck.wait()
    with pytest.raises(CheckpointError, match="not a reward-model run"):
        winrate.load_reward_scorer(str(lm))
    # ... which the command line printed as a traceback: now a one-line error naming the flag
    with pytest.raises(SystemExit, match=r"^--reward_model .*lm: .*not a reward-model run"):
        winrate.main([a, a, "--reward_model", str(lm)])


def test_samples_of_one_prompt_are_resampled_together(rm_run, tmp_path, capsys):
    """`generate --num_samples K --json` writes K lines per prompt; the bootstrap resampled
    lines, so K correlated samples counted as K prompts: the interval was ~sqrt(K) too narrow
    and n counted lines. Now the prompts are resampled, each with all its samples."""
    run, _ = rm_run
    rng = np.random.default_rng(0)
    margins = rng.normal(0.1, 1.0, 20)
    per_prompt = winrate.bootstrap_interval(margins)
    lines = winrate.bootstrap_interval(np.repeat(margins, 4))  # what it was
    grouped = winrate.bootstrap_interval(np.repeat(margins, 4), groups=np.repeat(np.arange(20), 4))
    assert grouped == per_prompt  # equal-size groups of equal margins: the per-prompt draw
    assert lines[1] - lines[0] < 0.7 * (per_prompt[1] - per_prompt[0])

    # The command line: K = 2 samples ("sample" 0, 1) of each of the 4 prompts.
    def write(path, completions):
        recs = [{"prompt": PROMPTS[i // 2], "completion": c, "sample": i % 2}
                for i, c in enumerate(completions)]  # fmt: skip
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(path)

    a = write(tmp_path / "a.jsonl", ["yes", "Kavo lives in Brel", "a", "no", "42", "b", "c", "d"])
    b = write(tmp_path / "b.jsonl", ["no", "the city", "yes or no", "a", "b", "x", "no", "e"])
    res = winrate.main([a, b, "--reward_model", run, "--out", str(tmp_path / "r.json")])
    assert (res["n"], res["prompts"]) == (8, 4)
    assert "of 8 samples of 4 prompts" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    d = np.asarray(saved["scores_a"]) - np.asarray(saved["scores_b"])
    want = winrate.bootstrap_interval(d, groups=[p for p in PROMPTS for _ in range(2)])
    assert (res["ci95_low"], res["ci95_high"]) == want
