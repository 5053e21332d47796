"""`generate --chat --system ... --json` into `evaluation.winrate`: the reward model scores the
conversation that was answered, system turn included."""

import json

import jax
import pytest

from flaxlm import generate as gen_cli
from flaxlm.evaluation import chat_answer, winrate
from flaxlm.models.config import get_variant
from flaxlm.models.heads import scalar_model_fns
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

CFG = get_variant("tiny", vocab_size=512, n_layers=1, max_seq_len=64)
TEXTS = ["where does Kavo live", "the city of 42"]
SYSTEM = "say yes or no"


def _save(path, init, meta):
    ck = Checkpointer(str(path), keep=1, async_save=False)
    params = unbox(init(jax.random.PRNGKey(0)))
    ck.save(1, {"params": params}, {}, {"model_config": CFG.to_dict(), "lora": {}, **meta})
    ck.close()
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_tokenizer):
    """(language-model run, reward-model run, tokenizer): random weights, one chat tokenizer."""
    tok_path, tok = chat_tokenizer
    root = tmp_path_factory.mktemp("gen_winrate")
    meta = {"tokenizer": tok_path}
    lm = _save(root / "lm", model_fns(CFG)[0], {**meta, "head": "lm", "task": "sft"})
    rm = _save(root / "rm", scalar_model_fns(CFG)[0], {**meta, "head": "scalar"})
    return lm, rm, tok


def _generate(lm, tmp_path, capsys, *extra) -> str:
    args = [lm, "--chat", "--prompt", TEXTS[0], "--prompt", TEXTS[1], "--max_new_tokens", "3",
            "--json", *extra]  # fmt: skip
    gen_cli.main(args)
    path = tmp_path / "c.jsonl"
    path.write_text(capsys.readouterr().out)
    return str(path)


def test_winrate_scores_the_conversation_generate_answered(runs, tmp_path, capsys, monkeypatch):
    """With --system, "prompt" was the bare user text: winrate rendered it as a lone user turn
    and scored a conversation without the system message. It is now the messages generate
    rendered, so the reward model's input starts with exactly the tokens that were answered."""
    lm, rm, tok = runs
    path = _generate(lm, tmp_path, capsys, "--system", SYSTEM)
    recs = [json.loads(line) for line in open(path)]
    assert [r["prompt"] for r in recs] == [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in TEXTS
    ]
    rendered = []
    render = chat_answer.render_answer

    def spy(template, msgs, response, **kw):
        out = render(template, msgs, response, **kw)
        rendered.append((msgs, response, [int(i) for i in out.ids]))
        return out

    monkeypatch.setattr(chat_answer, "render_answer", spy)
    res = winrate.main([path, path, "--reward_model", rm, "--out", str(tmp_path / "w.json")])
    assert res["n"] == 2 and res["prompts"] == 2
    answered, _ = gen_cli.encode_prompts(tok, TEXTS, True, SYSTEM)  # the ids generate decoded
    assert len(rendered) == 4  # each file's two lines
    for (msgs, response, ids), rec, prompt_ids in zip(rendered, recs * 2, answered * 2):
        assert msgs == rec["prompt"] and response == rec["completion"]
        assert ids[: len(prompt_ids)] == prompt_ids
    # and the scores are those of the conversation with its system turn, not without it
    score = winrate.load_reward_scorer(rm)
    with_system = score([r["prompt"] for r in recs], [r["completion"] for r in recs])
    without = score(TEXTS, [r["completion"] for r in recs])
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["scores_a"] == pytest.approx(with_system) and with_system != without


def test_without_system_the_prompt_stays_the_text(runs, tmp_path, capsys):
    """No --system: "prompt" is the user text as before (existing consumers read a string)."""
    lm, _, _ = runs
    recs = [json.loads(line) for line in open(_generate(lm, tmp_path, capsys))]
    assert [r["prompt"] for r in recs] == TEXTS
