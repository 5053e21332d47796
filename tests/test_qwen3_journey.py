"""A user's journey with a Qwen3-style reasoning model, end to end through the public entry
points: an HF checkpoint (per-head q/k norms, YaRN) with a reasoning + tool-use chat template →
LoRA SFT from `init_from=hf:DIR` on multi-turn conversations with reasoning and a tool call,
with `enable_thinking` off → the data report → `generate --chat` rendering as training did →
the adapters exported in PEFT's format, which load back into a flaxlm run with the same
logits (and, with FLAXLM_HF_LIVE=1, onto transformers through PEFT).
"""

import json
import os

import jax
import numpy as np
import pytest

from flaxlm.models import hf, peft
from flaxlm.models.config import ModelConfig

# Latest answers show their reasoning; earlier ones only their answer (as Qwen3's template);
# tools in a system turn, calls as <call>…</call>; enable_thinking=false pre-fills an empty
# think block after the generation prompt.
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set c = m.content if m.content is string else '' %}"
    "{%- set parts = c.split('</think>') %}"
    "{%- set answer = parts[-1].lstrip('\\n') %}"
    "{%- set thought = parts[0].replace('<think>', '').strip('\\n') if parts | length > 1 "
    "else '' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + thought + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- answer }}"
    "{%- if m.tool_calls is defined %}{%- for t in m.tool_calls %}"
    "{{- '<call>' + (t.function | tojson) + '</call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<result>' + m.content + '</result><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}


def _records():
    rng = np.random.default_rng(0)
    out = []
    for i in range(24):
        a, b = (int(x) for x in rng.integers(0, 9, 2))
        conv = [{"role": "user", "content": f"{a}+{b}?"},
                {"role": "assistant", "content": str(a + b)},  # no reasoning: thinking off
                {"role": "user", "content": "and doubled?"},
                {"role": "assistant", "content": str(2 * (a + b))}]  # fmt: skip
        rec = {"messages": conv}
        if i % 3 == 0:  # a tool call and its result before the final answer
            rec = {"tools": TOOLS, "messages": conv[:3] + [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": str(2 * (a + b)), "name": "add"},
                conv[3]]}  # fmt: skip
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def journey(tmp_path_factory, byte_chat_tokenizer):
    from flaxlm.alignment import sft
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override
    from flaxlm.train.pretrain import model_fns
    from flaxlm.train.state import unbox

    root = tmp_path_factory.mktemp("qwen3")
    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=64, max_seq_len=512, qk_norm="head", rope_theta=1e6,
                      rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=128,
                      init_std=0.2)  # fmt: skip
    params = unbox(model_fns(cfg)[0](jax.random.PRNGKey(0)))
    base = str(root / "base")
    hf.save_pretrained(cfg, params, base, arch="qwen3")
    byte_chat_tokenizer(base, TEMPLATE)  # tokenizer.json + tokenizer_config.json beside it
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    c = sft_config.get_config("variant=tiny,runlocal=True,lora=4")
    c = override(c, {
        "init_from": f"hf:{base}", "data.train": str(data), "data.eval": "",
        "data.chat_template_kwargs": '{"enable_thinking": false}', "eval_gen.sets": "",
        "seq_len": 256, "batch_size": 8, "total_steps": 3, "eval_every": 3, "ckpt_every": 3,
        "log_every": 1, "progress_bar": False, "eval_at_start": False, "opt.warmup_steps": 1,
        "lora.targets": "attn/(q|k|v|o)$|mlp/(gate|up|down)$",
    })  # fmt: skip
    run = str(root / "sft")
    sft.run(c, run)
    return root, base, run, cfg


def test_training_split_turns_and_recorded_the_template_variables(journey):
    from flaxlm.train.checkpoint import read_meta

    _, _, run, _ = journey
    meta = read_meta(run)[1]
    assert meta["chat_template_kwargs"] == {"enable_thinking": False}
    assert meta["lora"]["rank"] == 4 and meta["model_config"]["qk_norm"] == "head"
    report = meta["data_report"]["train"]
    assert report["records"] == 24 and report["used"] == 24 and report["dropped"] == 0
    # each first answer renders with an empty think block as the latest answer and without
    # one as an earlier answer: one example per answer
    assert report["split_by_turn"] == 24
    assert report["chat_template"].startswith("jinja:")


def test_generate_renders_the_chat_prompt_as_training_did(journey, capsys):
    from flaxlm import generate as cli

    _, _, run, _ = journey
    _, _, tok = cli.load(run)
    ids, _ = cli.encode_prompts(tok, ["3+4?"], chat=True)
    text = tok.tok.decode(ids[0], skip_special_tokens=False)
    head = "<|im_start|>user\n3+4?<|im_end|>\n<|im_start|>assistant\n"
    assert text == head + "<think>\n\n</think>\n\n"  # thinking off, as in training
    cli.main([run, "--prompt", "3+4?", "--chat", "--max_new_tokens", "4", "--json",
              "--temperature", "0.7", "--min_p", "0.1"])  # fmt: skip
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt"] == "3+4?" and 1 <= rec["n_tokens"] <= 4


def test_adapters_round_trip_through_peft(journey, tmp_path, hf_live_optional):
    from flaxlm.train.checkpoint import load_model

    _, base, run, cfg = journey
    adapter = str(tmp_path / "adapter")
    hf.main(["export", run, adapter, "--adapter"])
    conf = json.loads(open(os.path.join(adapter, peft.CONFIG)).read())
    assert conf["base_model_name_or_path"] == os.path.abspath(base) and conf["r"] == 4
    back = str(tmp_path / "back")
    hf.main(["import-adapter", base, adapter, back])
    tokens = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
    _, trained, _ = load_model(run)
    _, reloaded, _ = load_model(back)
    want = np.asarray(hf.forward(cfg, trained, tokens))
    np.testing.assert_allclose(np.asarray(hf.forward(cfg, reloaded, tokens)), want, atol=1e-5)
    _, base_params = hf.load_pretrained(base)
    assert np.abs(np.asarray(hf.forward(cfg, base_params, tokens)) - want).max() > 1e-4
    if hf_live_optional is not None:  # transformers + PEFT on the exported adapter
        live = np.asarray(hf_live_optional(LIVE, base, adapter, tokens.tolist()))
        np.testing.assert_allclose(live, want, atol=1e-4)


LIVE = """
import json, sys
import torch, transformers, peft
base, adapter, tokens = (json.loads(a) for a in sys.argv[1:4])
model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
model = peft.PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.as_tensor(tokens)).logits.float().numpy().tolist()))
"""


@pytest.fixture
def hf_live_optional(request):
    """The hf_live runner when live checks are on, else None (the rest of the test runs)."""
    if os.environ.get("FLAXLM_HF_LIVE") != "1":
        return None
    return request.getfixturevalue("hf_live")


def test_evaluation_renders_with_the_run_s_template_variables(journey, tmp_path):
    """A chat generation task on the run: prompts through the template with thinking off (as
    trained), scored after the reasoning marker; --chat_template_kwargs overrides the run's."""
    from flaxlm.evaluation.__main__ import main

    _, _, run, _ = journey
    (tmp_path / "g.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}?", "answer": str(2 * a)}) + "\n" for a in range(3))
    )
    (tmp_path / "spec.json").write_text(json.dumps(
        [{"name": "sums", "type": "generation", "file": "g.jsonl", "chat": True,
          "max_new_tokens": 4, "stop": []}]))  # fmt: skip
    args = ["--checkpoint", run, "--tasks", str(tmp_path / "spec.json"), "--samples",
            "--chat", "on", "--reasoning_end", "</think>"]  # fmt: skip
    off = main(args)["tasks"]["sums"]
    assert all(s["prompt"].endswith("<think>\n\n</think>\n\n") for s in off["samples"])
    assert off["spec"]["reasoning_end"] == "</think>" and "reasoning_unfinished" in off["metrics"]
    on = main(args + ["--chat_template_kwargs", "{}"])["tasks"]["sums"]
    assert all(s["prompt"].endswith("<|im_start|>assistant\n") for s in on["samples"])
