"""Chat templates that rewrite history, and what a preference pair trains.

Reasoning models' templates (Qwen3, DeepSeek-R1) render an answer's reasoning only while it is
the latest answer: once a later user turn follows, the earlier answer is shown without it. The
text of a whole multi-turn conversation then does not continue the text of its first turns, so
an SFT conversation trains one assistant turn per example (`render_sft`), each in the context
the model sees when it generates that turn.

References are written here by hand, not derived from the code under test: REASONING is a
template written for this test with that behaviour (not a copy of any model's), the expected
texts are string literals, and the tokenizer maps every byte to its own id (no merges), so the
trained ids decode to exactly the trained text. FLAXLM_HF_LIVE=1 (with .venv-hf) re-checks
that transformers' apply_chat_template renders the same texts.
"""

import os

import numpy as np
import pytest

from flaxlm.data import formats as F

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731

# The latest answers (after the last user turn) show their reasoning in a <think> block (empty
# when there is none); earlier answers show only what follows their </think>.
REASONING = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set parts = m.content.split('</think>') %}"
    "{%- set answer = parts[-1].lstrip('\\n') %}"
    "{%- set thought = parts[0].replace('<think>', '').strip('\\n') if parts | length > 1 "
    "else '' %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought + '\\n</think>\\n\\n' + answer }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + answer }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONV = [U("2+2?"), A("<think>add them</think>4"), U("and 3+3?"), A("6")]
TURN1 = (
    "<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n"
)
TURN2 = (
    "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n6"
    "<|im_end|>\n"
)  # the first answer without its reasoning, the second with its (empty) think block


@pytest.fixture
def reasoning(tmp_path, byte_chat_tokenizer):
    from flaxlm.models.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "tok"), REASONING))
    return tok, F.training_template(tok)


def _text(tok, ids) -> str:
    return tok.tok.decode([int(i) for i in ids], skip_special_tokens=False)  # specials shown


def _trained_text(tok, ids, mask) -> str:
    return _text(tok, [i for i, m in zip(ids, mask) if m])


def test_history_rewriting_template_trains_one_turn_per_example(reasoning):
    tok, t = reasoning
    assert t.text(CONV[:2], False) == TURN1 and t.text(CONV, False) == TURN2
    assert not TURN2.startswith(TURN1)  # the template rewrites the first answer
    report = F.DataReport()
    first, second = F.render_sft([({"messages": CONV}, "c:1")], t, 512, report=report)
    cases = ((first, TURN1, 2, "<think>\nadd them\n</think>\n\n4<|im_end|>"),
             (second, TURN2, 4, "<think>\n\n</think>\n\n6<|im_end|>"))  # fmt: skip
    for ex, text, n, trained in cases:
        ids = tok.encode(text)  # the whole text: its final "\n" is the one untrained close id
        assert ex["ids"].tolist() == ids and ex["messages"] == CONV[:n] and ex["loc"] == "c:1"
        assert _trained_text(tok, ex["ids"], ex["mask"]) == trained
        # exactly one stretch of targets: the last answer, from after the generation prompt
        start = len(tok.encode(t.text(CONV[: n - 1], True)))
        assert np.flatnonzero(ex["mask"]).tolist() == list(range(start, len(ids) - 1))
    d = report.to_dict()
    assert (d["records"], d["used"], d["dropped"], d["split_by_turn"]) == (0, 1, 0, 1)
    assert d["split_examples"][0].startswith("c:1: 2 examples, one per assistant turn")
    assert d["loss_tokens"] == int(first["mask"][1:].sum() + second["mask"][1:].sum())
    # A single answer needs no split and is not reported as one.
    report = F.DataReport()
    (only,) = F.render_sft([({"messages": CONV[:2]}, "c:2")], t, 512, report=report)
    assert only["ids"].tolist() == first["ids"].tolist() and "split_by_turn" not in report.to_dict()


def test_consecutive_assistant_turns_are_one_example(reasoning):
    """A run of assistant turns with no user turn between them is generated after the same
    user turn: it is one example, every turn of the run trained in it (each with its reasoning,
    as the latest answers are shown), not one example per turn repeating the earlier ones as
    context."""
    tok, t = reasoning
    conv = [U("2+2?"), A("<think>add them</think>4"), A("so 4"), U("and 3+3?"), A("6")]
    assert t.text(conv[:3], False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nso 4<|im_end|>\n"
    )
    report = F.DataReport()
    out = F.render_sft([({"messages": conv}, "c:1")], t, 512, report=report)
    assert [ex["messages"] for ex in out] == [conv[:3], conv]
    assert _trained_text(tok, out[0]["ids"], out[0]["mask"]) == (
        "<think>\nadd them\n</think>\n\n4<|im_end|><think>\n\n</think>\n\nso 4<|im_end|>"
    )
    assert _trained_text(tok, out[1]["ids"], out[1]["mask"]) == "<think>\n\n</think>\n\n6<|im_end|>"
    assert report.to_dict()["split_examples"][0].startswith("c:1: 2 examples")


def test_split_examples_truncate_and_pack_on_their_own(reasoning):
    tok, t = reasoning
    long = [U("x" * 40), A("<think>y</think>z"), U("and 3+3?"), A("6")]
    full = F.render_sft([({"messages": long}, "c:1")], t, 512)
    budget = len(full[1]["ids"]) - 1 - 10  # the second example needs 10 ids cut, the first none
    report = F.DataReport()
    cut = F.render_sft([({"messages": long}, "c:1")], t, budget, report=report)
    assert cut[0]["ids"].tolist() == full[0]["ids"].tolist()
    assert len(cut[1]["ids"]) - 1 == budget and report.truncated == 1
    assert _trained_text(tok, cut[1]["ids"], cut[1]["mask"]) == _trained_text(
        tok, full[1]["ids"], full[1]["mask"])  # fmt: skip
    batches = F.SFTBatches(cut, seq_len=budget, batch=2, pad_id=0, shuffle=False, num_epochs=1)
    b = next(batches)
    assert int(b["loss_mask"].sum()) == sum(int(ex["mask"][1:].sum()) for ex in cut)


def test_preference_pair_with_history_trains_only_its_responses(reasoning):
    """A pair whose prompt holds an earlier answer (with reasoning) renders through the
    rewriting template (it was an error: the prompt's answer cannot be located), and only the
    two responses are trained."""
    tok, t = reasoning
    rec = {"prompt": CONV[:3], "chosen": "6", "rejected": "7"}
    (pair,) = F.render_preferences([(rec, "p:1")], t, 512)
    for side, answer in (("chosen", "6"), ("rejected", "7")):
        ids, mask = pair[side]
        assert _text(tok, ids) == TURN2.replace("6<|im_end|>", answer + "<|im_end|>")
        assert _trained_text(tok, ids, mask) == f"<think>\n\n</think>\n\n{answer}<|im_end|>"


def test_preference_pair_with_history_in_flaxlms_template_trains_only_its_responses():
    """flaxlm's own template: an answer inside the shared prompt trained on both sides (it was)
    cancels in DPO's sums but not in SimPO/ORPO's per-token means or the SFT term."""
    from flaxlm.data import synthetic
    from flaxlm.data.tokenizer import train as train_tokenizer

    world = synthetic.build_world("small", seed=0)
    tok = train_tokenizer([d["text"] for d in world.pretrain[:300]], 512)
    t = F.ChatTemplate(tok)
    prompt = [U("What is 2 plus 3?"), A("The answer is 5."), U("Where does Kavo live?")]
    rec = {"prompt": prompt, "chosen": "In Brel.", "rejected": "No idea at all."}
    (pair,) = F.render_preferences([(rec, "p:1")], t, 128)
    for side in ("chosen", "rejected"):
        ids, mask = pair[side]
        want = tok.encode(rec[side], bos=False, eos=False) + [t.end_id]
        assert [int(i) for i, m in zip(ids, mask) if m] == want
        full, full_mask = F.render_chat(prompt + [A(rec[side])], t)
        assert ids.tolist() == full.tolist() and full_mask.sum() > mask.sum()


LIVE = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(json.loads(sys.argv[1]))
conv = json.loads(sys.argv[2])
print(json.dumps([tok.apply_chat_template(conv[:n], tokenize=False) for n in (2, 4)]))
"""


def test_live_transformers_renders_the_same_texts(tmp_path, hf_live, byte_chat_tokenizer):
    d = byte_chat_tokenizer(str(tmp_path / "live"), REASONING)
    assert hf_live(LIVE, d, CONV) == [TURN1, TURN2]


# Qwen3-style switch: with enable_thinking false the generation prompt opens with an empty
# think block, so it is prompt (not trained) and generation starts after it.
THINKING = REASONING.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}",
)


@pytest.fixture
def thinking(tmp_path, byte_chat_tokenizer):
    """(tokenizer dir, tokenizer) with the THINKING template."""
    from flaxlm.models.hf_tokenizer import load_tokenizer

    d = byte_chat_tokenizer(str(tmp_path / "think"), THINKING)
    return d, load_tokenizer(d)


def test_template_kwargs_render_train_and_name_the_template(thinking):
    from flaxlm.models.hf_tokenizer import set_template_kwargs

    _, tok = thinking
    conv = [U("and 3+3?"), A("6")]
    plain = F.training_template(tok)
    (ex,) = F.render_sft([({"messages": conv}, "c:1")], plain, 512)
    assert _trained_text(tok, ex["ids"], ex["mask"]) == "<think>\n\n</think>\n\n6<|im_end|>"
    set_template_kwargs(tok, '{"enable_thinking": false}')
    off = F.training_template(tok)
    assert off.name != plain.name  # the data report tells the two renderings apart
    (ex,) = F.render_sft([({"messages": conv}, "c:1")], off, 512)
    assert _trained_text(tok, ex["ids"], ex["mask"]) == "6<|im_end|>"  # the block is prompt
    prompt, _ = F.generation_prompt(conv[:1], tok)
    assert _text(tok, prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ex["ids"][: len(prompt)].tolist() == prompt


def test_reasoning_data_with_thinking_off_is_an_error_that_says_why(thinking):
    """enable_thinking=false pre-fills an empty think block: an answer with reasoning cannot
    follow it, and the error points at the template variables."""
    from flaxlm.models.hf_tokenizer import set_template_kwargs

    _, tok = thinking
    set_template_kwargs(tok, '{"enable_thinking": false}')
    with pytest.raises(F.TemplateError, match=r"^c:1: .*not prefix-stable.*with "
                       r"chat_template_kwargs \{'enable_thinking': False\}"):  # fmt: skip
        F.render_sft([({"messages": CONV[:2]}, "c:1")], F.training_template(tok), 512)


def test_set_template_kwargs_checks_what_it_is_given(tmp_path, thinking, byte_chat_tokenizer):
    from flaxlm.models.hf_tokenizer import HFError, load_tokenizer, set_template_kwargs

    _, tok = thinking
    with pytest.raises(HFError, match=r"data.chat_template_kwargs='\{bad' is not valid JSON"):
        set_template_kwargs(tok, "{bad", None, "data.chat_template_kwargs")
    with pytest.raises(HFError, match=r"--x=\['a'\]: expected a JSON object"):
        set_template_kwargs(tok, '["a"]', None, "--x")
    with pytest.raises(HFError, match=r"\['messages'\] are set by the renderer"):
        set_template_kwargs(tok, '{"messages": []}')
    assert set_template_kwargs(tok, '{"a": 1}', {"a": 2}).template_kwargs == {"a": 1}
    assert set_template_kwargs(tok, "", {"a": 2}).template_kwargs == {"a": 2}  # inherited
    no_template = load_tokenizer(byte_chat_tokenizer(str(tmp_path / "none"), ""))
    assert set_template_kwargs(no_template, None, {"a": 2}).template_kwargs == {}  # ignored
    with pytest.raises(HFError, match="--x: tokenizer .* has no Jinja chat template"):
        set_template_kwargs(no_template, '{"a": 1}', None, "--x")


def test_the_compiled_template_follows_the_template_text(thinking):
    _, tok = thinking
    assert tok.render_chat_text(CONV[:2], False) == TURN1
    tok.chat_template = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert tok.render_chat_text(CONV[:2], False) == "[2+2?][<think>add them</think>4]"


def test_stages_record_template_kwargs_and_generation_renders_with_them(tmp_path, thinking):
    """data.chat_template_kwargs reaches the tokenizer, the checkpoint meta records it, and
    `generate` / the next stage (init_from) render with it unless told otherwise."""
    import jax

    from flaxlm import generate as cli
    from flaxlm.alignment import common
    from flaxlm.configs import sft as sft_config
    from flaxlm.models.config import get_variant
    from flaxlm.train.checkpoint import Checkpointer
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    tok_dir, _ = thinking
    config = sft_config.get_config("variant=tiny")
    config.data.tokenizer = os.path.join(tok_dir, "tokenizer.json")
    config.data.chat_template_kwargs = '{"enable_thinking": false}'
    tok = common.resolve_tokenizer(config, {})
    assert tok.template_kwargs == {"enable_thinking": False}
    run = str(tmp_path / "run")
    meta = common.tokenizer_meta(tok, run)
    assert meta["chat_template_kwargs"] == {"enable_thinking": False}
    assert os.path.exists(meta["tokenizer"]) and meta["tokenizer"].startswith(run)
    # the next stage, started from this run, inherits them; its own setting wins
    config.data.tokenizer, config.data.chat_template_kwargs = "", ""
    assert common.resolve_tokenizer(config, meta).template_kwargs == {"enable_thinking": False}
    config.data.chat_template_kwargs = '{"enable_thinking": true}'
    assert common.resolve_tokenizer(config, meta).template_kwargs == {"enable_thinking": True}
    # generate: a run saved with this meta renders its chat prompts the same way
    cfg = get_variant("tiny", vocab_size=272, n_layers=1, max_seq_len=64)
    abstract = unbox(jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    ck = Checkpointer(run, keep=1, async_save=False)
    ck.save(1, {"params": params}, {}, {"model_config": cfg.to_dict(), "head": "lm", **meta})
    ck.close()
    _, _, loaded = cli.load(run)
    assert loaded.template_kwargs == {"enable_thinking": False}
    ids, _ = cli.encode_prompts(loaded, ["and 3+3?"], chat=True)
    assert _text(loaded, ids[0]).endswith("<think>\n\n</think>\n\n")
    assert cli.load(run, template_kwargs="{}")[2].template_kwargs == {}
    with pytest.raises(SystemExit, match="--chat_template_kwargs"):
        cli.load(run, template_kwargs="[1]")
