"""SFT: the loss sees answers only, packed examples stay apart, and the task runs in the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.alignment import common
from flaxlm.data import formats as F
from flaxlm.data import synthetic
from flaxlm.data.tokenizer import train as train_tokenizer
from flaxlm.models import lora as lora_lib
from flaxlm.models.config import get_variant
from flaxlm.train.checkpoint import Checkpointer, read_meta
from flaxlm.train.losses import lm_loss_fn, token_logprobs
from flaxlm.train.metrics import read_metrics
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Where does Kavo live?"},
    {"role": "assistant", "content": "The answer is Paris."},
]


@pytest.fixture(scope="module")
def setup():
    world = synthetic.build_world("small", seed=0)
    tok = train_tokenizer([d["text"] for d in world.pretrain], 512)
    cfg = get_variant("tiny", vocab_size=512)
    init, apply = model_fns(cfg)
    abstract = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # numpy init: a jitted flax init compiles for ~10 s on CPU
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: np.ones(s.shape, s.dtype) if p[-1].key == "scale"
        else (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
        abstract,
    )  # fmt: skip
    return F.ChatTemplate(tok), jax.jit(apply), params


def _batch(examples, seq_len=96):
    return next(F.SFTBatches(examples, seq_len=seq_len, batch=1, pad_id=0, shuffle=False))


def test_prompt_targets_do_not_change_the_loss(setup):
    template, apply, params = setup
    ids, mask = F.render_chat(CONVERSATION, template)
    batch = _batch([{"ids": ids, "mask": mask}])
    loss_fn = jax.jit(lm_loss_fn(apply))
    base, metrics = loss_fn(params, batch, None)
    prompt = np.flatnonzero((batch["segment_ids"][0] > 0) & (batch["loss_mask"][0] == 0))
    answer = np.flatnonzero(batch["loss_mask"][0] > 0)
    assert len(prompt) > 20 and len(answer) >= 2 * 5 and metrics["weight"] == len(answer)
    # Every user/system/role-token target replaced by another token: the loss is unchanged.
    changed = {k: v.copy() for k, v in batch.items()}
    changed["targets"][0, prompt] = (changed["targets"][0, prompt] + 7) % 512
    same, _ = loss_fn(params, changed, None)
    assert float(same) == float(base)
    # One answer target replaced: the loss moves (the test can fail).
    moved = {k: v.copy() for k, v in batch.items()}
    moved["targets"][0, answer[0]] = (moved["targets"][0, answer[0]] + 7) % 512
    assert float(loss_fn(params, moved, None)[0]) != float(base)


def test_packed_examples_score_as_if_alone(setup):
    template, apply, params = setup
    convs = [CONVERSATION[:3], CONVERSATION[3:], [CONVERSATION[1], CONVERSATION[2]]]
    examples = [dict(zip(("ids", "mask"), F.render_chat(c, template))) for c in convs]
    packed = _batch(examples, seq_len=128)
    assert list(np.unique(packed["segment_ids"][0])) == [0, 1, 2, 3]
    lp = token_logprobs(
        apply(params, packed["tokens"], packed["positions"], packed["segment_ids"]),
        packed["targets"],
    )[0]
    for seg, ex in enumerate(examples, 1):
        alone = _batch([ex], seq_len=128)
        lp_alone = token_logprobs(
            apply(params, alone["tokens"], alone["positions"], alone["segment_ids"]),
            alone["targets"],
        )[0]
        n = len(ex["ids"]) - 1
        np.testing.assert_allclose(lp[packed["segment_ids"][0] == seg], lp_alone[:n], atol=1e-5)


def test_sft_smoke_run_in_the_loop(sft_run):
    workdir, summary = sft_run
    assert summary["step"] == 6 and np.isfinite(summary["train"]["loss"])
    ev = summary["eval"]
    for key in ("nll", "accuracy", "sft_heldout/accuracy", "sft_heldout/judge",
                "sft_heldout/stopped"):  # fmt: skip
        assert f"eval/{key}" in ev, key
    assert any("eval/nll" in r for r in read_metrics(workdir))
    report = json.load(open(os.path.join(workdir, "data_report.json")))
    assert report["train"]["used"] + report["train"]["dropped"] == report["train"]["records"]
    _, meta = read_meta(workdir)
    assert meta["task"] == "sft" and meta["head"] == "lm" and not meta["lora"]
    assert os.path.exists(meta["tokenizer"]) and meta["data_report"] == report
    # A plain SFT checkpoint loads as a policy.
    cfg, params, _ = common.load_policy(workdir)
    assert cfg.vocab_size == 512 and "lm_head" in params


def test_lora_checkpoint_loads_merged(tmp_path, setup):
    template, apply, _ = setup
    cfg = get_variant("tiny", vocab_size=512)
    spec = lora_lib.LoraSpec(rank=2, targets="attn/(q|v)")
    init, _ = model_fns(cfg)
    _, _, base = setup
    params = {"base": base, "lora": lora_lib.abstract_adapters(base, spec)}
    params["lora"] = jax.tree.map(lambda s: np.full(s.shape, 0.05, s.dtype), params["lora"])
    ck = Checkpointer(str(tmp_path), async_save=False)
    meta = {"model_config": cfg.to_dict(), "head": "lm", "lora": spec.to_dict()}
    ck.save(1, {"params": params}, {}, meta)
    ck.close()
    _, loaded, _ = common.load_policy(str(tmp_path))
    tokens = jnp.asarray(F.render_chat(CONVERSATION, template)[0][None, :-1])
    want = jax.jit(lora_lib.lora_apply(model_fns(cfg)[1], spec))(params, tokens)
    np.testing.assert_allclose(apply(loaded, tokens), want, atol=1e-5)


def test_hf_checkpoint_loads_into_lm_and_lora_reward_trees():
    from flaxlm.models import hf
    from flaxlm.models.heads import scalar_model_fns

    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "llama")
    cfg, want = hf.load_pretrained(path)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(init):
        abstract = unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract
        )

    got = common.load_lm_params("hf:" + path, target(model_fns(cfg)[0]))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # A reward model with LoRA: the backbone lands in base/transformer (no lm_head); the head
    # and the adapters keep their fresh values.
    spec = lora_lib.LoraSpec(rank=2, train_extra="^head/")
    init = lora_lib.with_lora(scalar_model_fns(cfg)[0], spec)
    fresh = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), target(init))
    load, transform = common.init_hooks("scalar", spec)
    params = transform(load("hf:" + path, target(init)), fresh)
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    backbone = params["base"]["transformer"]
    jax.tree.map(np.testing.assert_array_equal, backbone, {k: v for k, v in want.items()
                                                          if k != "lm_head"})  # fmt: skip
    assert params["lora"] is fresh["lora"] and params["base"]["head"] is fresh["base"]["head"]


def test_own_data_warns_about_builtin_eval_and_a_foreign_tokenizer(tmp_path, caplog):
    """Setting data.train to your own file left data.eval and eval_gen.sets on the built-in
    world (the config defaults), and data.tokenizer could differ from init_from's: both ran
    silently; both now log a warning naming the keys / files."""
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override

    c = sft_config.get_config("runlocal=True")
    assert common.warn_builtin_eval(c) == []  # all built-in: nothing to say
    override(c, {"data.train": "mine.jsonl"})
    with caplog.at_level("WARNING", logger="flaxlm"):
        assert common.warn_builtin_eval(c) == ["data.eval", "eval_gen.sets"]
    assert "--config.data.eval, --config.eval_gen.sets" in caplog.text
    override(c, {"data.eval": "mine_heldout.jsonl", "eval_gen.sets": ""})
    assert common.warn_builtin_eval(c) == []
    override(c, {"data.train": "builtin:sft_train,mine.jsonl", "data.eval": "builtin:sft_heldout"})
    assert common.warn_builtin_eval(c) == []  # mixing in the world: its eval is meaningful

    texts = [f"the {w} river flows past mill {i}" for i, w in enumerate(["old", "cold"] * 40)]
    a, b = str(tmp_path / "a.model"), str(tmp_path / "b.model")
    train_tokenizer(texts, 300, model_path=a)
    train_tokenizer(texts + ["zebra quartz jumps"] * 20, 300, model_path=b)
    caplog.clear()
    with caplog.at_level("WARNING", logger="flaxlm"):
        override(c, {"data.tokenizer": a, "init_from": "runs/pt"})
        common.resolve_tokenizer(c, {"tokenizer": a})  # the same file: silent
        assert caplog.text == ""
        common.resolve_tokenizer(c, {"tokenizer": b})
    assert "is not the tokenizer init_from=runs/pt was trained with" in caplog.text


def test_sizes_from_another_variant_than_init_from_are_warned(caplog):
    """configs/sft.py without :variant= takes tiny's sizes even for a 125m init_from: warned,
    naming the variant of init_from's shape; the matching variant is silent."""
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override
    from flaxlm.models.config import get_variant

    c = override(sft_config.get_config(""), {"init_from": "runs/pt"})
    with caplog.at_level("WARNING", logger="flaxlm"):
        msg = common.warn_sizes_from_another_variant(c, get_variant("125m"))
    assert "pass :variant=125m" in msg and "seq_len=128" in msg and msg in caplog.text
    c = override(sft_config.get_config("variant=125m"), {"init_from": "runs/pt"})
    assert common.warn_sizes_from_another_variant(c, get_variant("125m")) is None
    odd = get_variant("125m", n_layers=5)
    assert "set them for it" in common.warn_sizes_from_another_variant(c, odd)
    c = sft_config.get_config("")  # no init_from: the variant is the architecture
    assert common.warn_sizes_from_another_variant(c, get_variant("125m")) is None


def test_init_from_takes_the_execution_and_context_keys_the_config_sets(sft_run, sft_cfg, caplog):
    """A stage started from init_from used to drop every --config.model.* key (remat_policy,
    dtype, attention_impl, rope_scaling ...) silently: it trained the source's model as it was,
    while its checkpoint's config said otherwise. Now the keys the config sets apply over the
    source's architecture, each logged, and the checkpoint meta's model_config is the model
    that trains; the loop records them in events.jsonl (what `init_from_model_changed` holds)."""
    from flaxlm.alignment import sft
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train import loop

    src, _ = sft_run
    source = read_meta(src)[1]["model_config"]
    assert source["remat_policy"] == "none" and source["rope_scaling"] == "none"
    set_keys = {
        "remat_policy": "full",
        "dtype": "bfloat16",
        "attention_impl": "flash",
        "rope_scaling": "linear",
        "rope_scaling_factor": 4.0,
        "max_seq_len": 1024,
        "param_dtype": "bfloat16",  # a new run may store its weights otherwise (7B on one GPU)
    }
    c = sft_cfg(init_from=src, **{f"model.{k}": v for k, v in set_keys.items()})
    assert common.model_keys_set(c) == {"vocab_size": 512, **set_keys}  # (512: conftest's)
    with caplog.at_level("INFO", logger="flaxlm"):
        task = sft.build_task(c, make_mesh({"data": -1}))
    trained = json.loads(json.dumps(task.model_meta["model_config"]))  # (as the meta holds it)
    assert {k: trained[k] for k in set_keys} == set_keys
    assert {k: v for k, v in trained.items() if k not in set_keys} == {
        k: v for k, v in source.items() if k not in set_keys
    }  # the rest is the source's architecture
    for key, value in set_keys.items():
        assert f"init_from={src}: model.{key}={value!r} from this run's config" in caplog.text
    changes = loop._init_from_model_changes(c, task)
    assert changes == {k: (source[k], v) for k, v in set_keys.items()}


def test_init_from_refuses_set_keys_that_change_what_the_weights_compute(sft_cfg):
    """A set key that changes the source's shapes or function is an error naming each key and
    both values (it used to be dropped silently); one set to the source's own value, and the
    model section the config's variant brings (not set by anyone), are not."""
    from flaxlm.configs import dpo as dpo_config
    from flaxlm.configs.common import override
    from flaxlm.models import hf

    meta = {"model_config": get_variant("tiny", vocab_size=512).to_dict()}
    c = sft_cfg(
        init_from="runs/pt",
        **{
            "model.d_model": 128,
            "model.mlp_activation": "gelu",
            "model.norm_eps": 1e-6,
            "model.remat_policy": "full",
        },
    )
    with pytest.raises(ValueError) as e:
        common.resolve_model_config(c, meta)
    msg = str(e.value)
    assert "model.d_model: init_from=runs/pt has 64, this run 128" in msg
    assert "model.mlp_activation: init_from=runs/pt has 'silu', this run 'gelu'" in msg
    assert "model.norm_eps: init_from=runs/pt has 1e-05, this run 1e-06" in msg
    assert "remat_policy: init_from" not in msg  # (an execution key: free)
    same = sft_cfg(init_from="runs/pt", **{"model.d_model": 64, "model.remat_policy": "full"})
    assert common.resolve_model_config(same, meta).remat_policy == "full"
    # dpo.py:variant=125m's own model section (another shape, vocab 32000): nothing set
    big = override(dpo_config.get_config("variant=125m"), {"init_from": "runs/pt"})
    assert common.model_keys_set(big) == {}
    assert common.resolve_model_config(big, meta) == get_variant("tiny", vocab_size=512)
    # An HF source: the same rules over its config.json.
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "llama")
    hf_cfg = hf.load_config(path)
    c = override(dpo_config.get_config("runlocal=True"),
                 {"init_from": f"hf:{path}", "model.rope_theta": 5e5})  # fmt: skip
    assert common.resolve_model_config(c, {}) == hf_cfg.replace(rope_theta=5e5)
    override(c, {"model.n_layers": 3})
    with pytest.raises(ValueError, match=rf"model.n_layers: init_from=hf:{path} has 2, this "
                                         "run 3"):  # fmt: skip
        common.resolve_model_config(c, {})


def test_rope_scaling_turned_on_over_init_from_takes_its_context(sft_cfg, caplog):
    """YaRN or Llama 3 scaling turned on over an unscaled source, without
    model.rope_original_max_len, used to keep ModelConfig's default 8192 silently, though the
    source was trained at 256 tokens (Llama 3's extension then nearly none): the original
    context is now the source's max_seq_len, logged; one set larger than that is warned of."""
    meta = {"model_config": get_variant("tiny", vocab_size=512).to_dict()}  # max_seq_len 256
    longer = {"model.max_seq_len": 1024, "model.rope_scaling_factor": 4.0}
    for scaling in ("yarn", "llama3"):
        c = sft_cfg(init_from="runs/pt", **longer, **{"model.rope_scaling": scaling})
        with caplog.at_level("INFO", logger="flaxlm"):
            cfg = common.resolve_model_config(c, meta)
        assert (cfg.rope_scaling, cfg.rope_original_max_len) == (scaling, 256)
        assert "model.rope_original_max_len (unset, 8192) is taken as 256" in caplog.text
    caplog.clear()
    c = sft_cfg(init_from="runs/pt", **longer, **{"model.rope_scaling": "yarn",
                                                  "model.rope_original_max_len": 128})  # fmt: skip
    with caplog.at_level("INFO", logger="flaxlm"):
        assert common.resolve_model_config(c, meta).rope_original_max_len == 128  # (set: kept)
    logged = caplog.text.replace("model.rope_original_max_len=128 from this run's config", "")
    assert "rope_original_max_len" not in logged  # (only the set key's own line)
    c = sft_cfg(init_from="runs/pt", **longer, **{"model.rope_scaling": "yarn",
                                                  "model.rope_original_max_len": 2048})  # fmt: skip
    with caplog.at_level("WARNING", logger="flaxlm"):
        assert common.resolve_model_config(c, meta).rope_original_max_len == 2048
    assert "model.rope_original_max_len=2048 is more than the max_seq_len 256" in caplog.text
    # A source scaled already, or linear scaling (no original context), keep what they had.
    scaled = {"model_config": get_variant("tiny", vocab_size=512, rope_scaling="yarn",
                                          rope_scaling_factor=2.0).to_dict()}  # fmt: skip
    c = sft_cfg(init_from="runs/pt", **longer, **{"model.rope_scaling": "yarn"})
    assert common.resolve_model_config(c, scaled).rope_original_max_len == 8192
    c = sft_cfg(init_from="runs/pt", **longer, **{"model.rope_scaling": "linear"})
    assert common.resolve_model_config(c, meta).rope_original_max_len == 8192


def test_score_own_meta_with_a_task_is_exact_match():
    """eval_gen scoring: the world's judge only for the world's (marked) records; a user's meta
    that names its own task (e.g. "math") is exact match with the reference, not a judge error."""
    from flaxlm.alignment import sft
    from flaxlm.data.synthetic_judge import WORLD_KEY, WORLD_MARK

    assert sft.score({"task": "math", "answer": "7"}, "7", "7") == (1.0, 1.0)
    assert sft.score({"task": "math", "answer": "7"}, "It is 7.", "7") == (0.0, 0.0)
    world = {"task": "arithmetic", "a": 3, "b": 4, "answer": "7", WORLD_KEY: WORLD_MARK}
    assert sft.score(world, "The answer is 7.", "")[0] == 1.0


def test_generation_sets_without_held_out_loss_report_their_drops(
    tmp_path, sft_cfg, monkeypatch, caplog
):
    """data.eval="" ("no held-out eval") with eval_gen.sets crashed `ValueError: no examples`
    (the loss batches were built from no examples), as did a data.eval whose every record was
    bad. A set's bad records vanished (its report was thrown away) and a set of prompt records
    (the RL stages' {"prompt", "meta": {"answer"}}) was all dropped, then logged NaN. Now: no
    loss metrics without held-out examples, the sets read as the RL stages read them, their
    drops in the data report's eval_gen section, and a set with nothing usable is an error."""
    from flaxlm.alignment import sft
    from flaxlm.models.sharding import make_mesh

    def jsonl(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    a = jsonl(tmp_path / "a" / "heldout.jsonl", [
        {"prompt": "What is 3 plus 4?", "meta": {"answer": "7"}},
        {"prompt": "What is 2 plus 2?", "completion": "4"},
        {"prompt": "What is 1 plus 1?", "meta": "2"},
    ])  # fmt: skip
    b = jsonl(tmp_path / "b" / "heldout.jsonl", [{"prompt": "Say 9.", "meta": {"answer": "9"}}])
    bad_eval = jsonl(tmp_path / "eval.jsonl", [{"prompt": "Hi?"}])  # no answer: dropped
    answers = []

    def fake_answers(cfg, params, prompts, template, **kw):  # no compile: fixed answers
        answers.append(len(prompts))
        return ["7"] * len(prompts), [True] * len(prompts)

    monkeypatch.setattr(sft, "generate_answers", fake_answers)
    mesh = make_mesh({"data": -1})
    for data_eval in ("", bad_eval):
        c = sft_cfg(**{"data.eval": data_eval, "eval_gen.sets": f"{a},{b}"})
        workdir = str(tmp_path / f"wd{len(answers)}")
        with caplog.at_level("WARNING", logger="flaxlm"):
            task = sft.build_task(c, mesh, workdir)
        out = task.eval_fn(None)
        assert "nll" not in out and "loss" not in out
        assert out["a_heldout/accuracy"] == 0.5 and out["b_heldout/accuracy"] == 0.0
        ev = json.load(open(os.path.join(workdir, "data_report.json")))["eval_gen"]
        assert ev["bad_input"]["examples"]["bad_meta"] == [
            f"{a}:3: bad_meta (meta='2' is not a JSON object)"]  # fmt: skip
        assert ev["used"] == 3 and "data eval_gen: " in caplog.text
    assert answers == [2, 1, 2, 1]
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt": " ", "completion": "x"}])
    c = sft_cfg(**{"data.eval": "", "eval_gen.sets": f"{a},{bad}"})
    with pytest.raises(ValueError, match=f"eval_gen.sets: {bad} has no usable example "
                       rf"\(dropped: 1 empty \(e.g. {bad}:1: empty prompt\)"):  # fmt: skip
        sft.build_task(c, mesh, None)


def test_generation_prompts_cut_to_max_prompt_len_are_counted(setup, tmp_path):
    """eval_gen prompts longer than eval_gen.max_prompt_len were cut from the left silently (the
    data report said truncated 0): the cut is now counted in the report, as the RL stages count
    their training prompts'."""
    import ml_collections

    from flaxlm.alignment import rl_eval

    template = setup[0]
    long = "Context: " + "the river " * 60 + "Question: what is the first word?"
    path = tmp_path / "sets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "user", "content": long},
                      {"role": "assistant", "content": "Context"}]},
        {"prompt": "What is 2 plus 2?", "completion": "4"},
    ]))  # fmt: skip
    c = ml_collections.ConfigDict({"data": {"fields": F.fields_config(), "world": "",
                                            "world_seed": 0},
                                   "eval_gen": {"sets": str(path), "examples": 8,
                                                "max_prompt_len": 48}})  # fmt: skip
    report = F.DataReport()
    (sets,) = rl_eval.heldout_sets(c, template, [], report).values()
    full, _ = F.render_prompt([{"role": "user", "content": long}], template, 1 << 20)
    assert [len(ex["ids"]) for ex in sets][0] == 48 < len(full)
    assert report.used == 2 and report.truncated == 1
    assert report.truncated_examples == [f"{path}:1: {len(full) - 48} prompt tokens cut from "
                                         "the left"]  # fmt: skip


def test_eval_gen_max_prompt_len_follows_seq_len_minus_max_new_tokens():
    """configs/sft.py's eval_gen.max_prompt_len was a fixed 256, whatever seq_len: it now
    follows seq_len − eval_gen.max_new_tokens (a prompt and its answer fit a training row), also
    when either is set on the command line; set itself, it leaves seq_len alone."""
    from flaxlm.configs import sft as sft_config
    from flaxlm.configs.common import override

    c = sft_config.get_config("variant=125m")
    assert c.eval_gen.max_prompt_len == c.seq_len - c.eval_gen.max_new_tokens == 1024 - 24
    c = sft_config.get_config("variant=tiny,runlocal=True")
    assert c.eval_gen.max_prompt_len == 128 - 12
    override(c, {"seq_len": 512, "eval_gen.max_new_tokens": 40})
    assert c.eval_gen.max_prompt_len == 512 - 40
    override(c, {"eval_gen.max_prompt_len": 100})
    assert c.eval_gen.max_prompt_len == 100 and c.seq_len == 512


def test_a_file_in_data_eval_and_eval_gen_sets_is_counted_once_per_section(
    tmp_path, sft_cfg, monkeypatch
):
    """data.eval and eval_gen.sets naming the same file: both readers counted into one eval
    report, so each record was counted twice ("records": 6 for a file of 3). The generation
    sets now have their own section, `eval_gen`."""
    from flaxlm.alignment import sft
    from flaxlm.models.sharding import make_mesh

    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 3 plus 4?", "completion": "7"},
        {"prompt": "What is 2 plus 2?", "completion": "4"},
        {"prompt": " ", "completion": "1"},  # bad: counted once in each section
    ]))  # fmt: skip
    monkeypatch.setattr(sft, "make_eval_fn", lambda *a, **k: None)  # (no compile)
    c = sft_cfg(**{"data.eval": str(path), "eval_gen.sets": str(path)})
    workdir = str(tmp_path / "wd")
    sft.build_task(c, make_mesh({"data": -1}), workdir)
    report = json.load(open(os.path.join(workdir, "data_report.json")))
    for section in ("eval", "eval_gen"):
        r = report[section]
        assert (r["records"], r["used"], r["dropped"]) == (3, 2, 1), (section, r)
