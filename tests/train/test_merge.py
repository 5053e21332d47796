"""python -m flaxlm.train.merge (train/merge.py): each method against a numpy reference written
here from its paper's formula, the merged run read by every consumer (load_params/load_model,
init_from's loader, evaluation, generate, HF export), and the inputs it refuses.

The runs are tiny models with random numpy params written straight to checkpoints (no
training): a "pretraining" run with three steps (and an EMA), three "fine-tunes" of its last
step, a LoRA run, and runs that differ from them in the ways a merge must refuse."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from flaxlm.models import lora as lora_lib
from flaxlm.models.config import get_variant
from flaxlm.train import checkpoint as ckpt_lib
from flaxlm.train import merge as merge_cli
from flaxlm.train import merge_math
from flaxlm.train.checkpoint import Checkpointer
from flaxlm.train.pretrain import model_fns
from flaxlm.train.state import unbox

VOCAB = 400  # conftest's chat_tokenizer
CFG = get_variant("tiny", vocab_size=VOCAB)
LORA = lora_lib.LoraSpec(rank=2, alpha=4.0, targets="attn/(q|v)")


def _abstract(cfg=CFG):
    return unbox(jax.eval_shape(model_fns(cfg)[0], jax.random.PRNGKey(0)))


def _target():
    """`_abstract()` placed on one device (a reader's target)."""
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                        _abstract())  # fmt: skip


def _random(seed, cfg=CFG, like=None, noise=0.05):
    """Normal(noise) params of `cfg` (noisy unit scales), or `like` plus that noise."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = noise * rng.standard_normal(s.shape).astype(np.float32)
        if like is not None:
            return np.asarray(like_flat[path] + x, s.dtype)
        return (1 + x if path[-1].key == "scale" else x).astype(s.dtype)

    like_flat = dict(jax.tree_util.tree_flatten_with_path(like)[0]) if like is not None else {}
    return jax.tree_util.tree_map_with_path(draw, _abstract(cfg))


def _write(workdir, steps: dict, meta: dict, tokenizer: str, ema: dict | None = None) -> str:
    """A run with a checkpoint per step ({step: params}) and its own copy of `tokenizer`."""
    os.makedirs(workdir, exist_ok=True)
    tok = os.path.join(workdir, "tokenizer.model")
    shutil.copy(tokenizer, tok)
    meta = {"model_config": CFG.to_dict(), "head": "lm", "lora": {}, "tokenizer": tok, **meta}
    ck = Checkpointer(workdir, keep=0, async_save=False)
    for step, params in steps.items():
        state = {"params": params, **({"ema": ema[step]} if ema else {})}
        ck.save(step, state, {}, meta)
    ck.wait()
    ck.close()
    return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("merge_runs")
    tok = chat_tokenizer[0]
    pt = {s: _random(s) for s in (10, 20, 30)}
    r = {"root": root, "tok": tok}
    r["pt"] = _write(root / "pt", pt, {"task": "pretrain", "config": {"total_steps": 30}}, tok,
                     ema={s: _random(s + 1) for s in pt})  # fmt: skip
    for i, name in enumerate(("ft_a", "ft_b", "ft_c")):
        r[name] = _write(root / name, {5: _random(100 + i, like=pt[30], noise=0.01)},
                         {"task": "sft"}, tok)  # fmt: skip
    base = _random(200, like=pt[30], noise=0.01)
    adapters = jax.tree.map(
        lambda s: np.random.default_rng(s.size).standard_normal(s.shape).astype(s.dtype) * 0.1,
        lora_lib.abstract_adapters(_abstract(), LORA),
    )
    r["lora"] = _write(root / "lora", {7: {"base": base, "lora": adapters}},
                       {"task": "sft", "lora": LORA.to_dict()}, tok)  # fmt: skip
    r["lora_parts"] = (base, adapters)
    return r


def _params(run, step=None, ema=False):
    return jax.device_get(ckpt_lib.load_model(run, step, ema=ema)[1])


def _flat(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(x, np.float32)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def _assert_close(got, want, rtol=1e-6, atol=1e-7):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


def _merge(tmp_path, *argv, name="out"):
    out = str(tmp_path / name)
    record = merge_cli.main([*map(str, argv), "--out", out])
    return out, record


def _mean_reference(trees, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    flats = [_flat(t) for t in trees]
    return {k: sum(wi * f[k].astype(np.float64) for wi, f in zip(w, flats)) for k in flats[0]}


@pytest.fixture(scope="module")
def mean_run(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mean") / "avg")
    pt = runs["pt"]
    record = merge_cli.main([f"{pt}@10", f"{pt}@20", f"{pt}@30", "--out", out])
    return out, record


# ------------------------------------------------------------------------------------------
# mean, weighted mean, --last, --ema


def test_mean_is_the_numpy_mean_of_the_checkpoints_read_back(runs, mean_run):
    out, record = mean_run
    pt = runs["pt"]
    want = _mean_reference([_params(pt, s) for s in (10, 20, 30)], [1, 1, 1])
    _assert_close(_params(out), want)
    assert [(i["run"], i["step"]) for i in record["inputs"]] == [(pt, 10), (pt, 20), (pt, 30)]
    assert record["method"] == "mean"
    assert [i["weight"] for i in record["inputs"]] == pytest.approx([1 / 3] * 3)
    on_disk = json.load(open(os.path.join(out, "merge.json")))
    assert on_disk == record == ckpt_lib.read_meta(out)[1]["merge"]
    assert on_disk["flaxlm_version"] and not on_disk["trained_on_chats"]


def test_weighted_mean_normalises_the_weights_and_last_takes_the_newest_steps(runs, tmp_path):
    pt = runs["pt"]
    out, record = _merge(tmp_path, f"{pt}@10", f"{pt}@20", f"{pt}@30", "--weights", "1,2,1")
    want = _mean_reference([_params(pt, s) for s in (10, 20, 30)], [1, 2, 1])
    _assert_close(_params(out), want)
    assert [i["weight"] for i in record["inputs"]] == [0.25, 0.5, 0.25]

    out, record = _merge(tmp_path, pt, "--last", "2", name="last2")
    assert [i["step"] for i in record["inputs"]] == [30, 20]
    _assert_close(_params(out), _mean_reference([_params(pt, 30), _params(pt, 20)], [1, 1]))


def test_ema_merges_the_ema_weights_and_refuses_a_run_without_them(runs, tmp_path):
    pt = runs["pt"]
    out, record = _merge(tmp_path, pt, "--last", "2", "--ema")
    want = _mean_reference([_params(pt, 30, ema=True), _params(pt, 20, ema=True)], [1, 1])
    _assert_close(_params(out), want)
    assert all(i["ema"] for i in record["inputs"])
    with pytest.raises(SystemExit, match=f"{runs['ft_a']}@5: --ema, but this step holds no EMA"):
        _merge(tmp_path, runs["ft_a"], pt, "--ema", name="no_ema")


# ------------------------------------------------------------------------------------------
# task arithmetic, TIES, SLERP: numpy references from the papers' formulas


def _ties_reference(base, tasks, density, lam):
    """Yadav et al. 2023, Algorithm 1, per tensor, in float64: τ_t = θ_t − θ_base; trim each
    to its top-k% magnitudes (|τ| >= the m-th largest, m = floor(k·n), at least 1); γ =
    sgn(Σ_t τ̂_t), a 0 taking the tensor's majority sign sgn(Σ γ); τ_m = mean of the τ̂_t whose
    sign is γ; θ = θ_base + λ τ_m."""
    taus = np.stack([np.asarray(t, np.float64) - base for t in tasks])
    n = base.size
    m = max(1, int(np.floor(density * n + 1e-6)))
    trimmed = []
    for tau in taus:
        kth = np.sort(np.abs(tau).ravel())[::-1][m - 1]
        trimmed.append(np.where(np.abs(tau) >= kth, tau, 0.0))
    trimmed = np.stack(trimmed)
    gamma = np.sign(trimmed.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    chosen = np.where(gamma > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * chosen).sum(0) / np.maximum(chosen.sum(0), 1)
    return base + lam * merged


def test_ties_on_hand_made_tensors():
    tau = np.array([[3, -1, 0.5, -4, 2], [-2, -2, 1, 1, -2], [1, 3, -0.2, -1, 0.1]], np.float32)
    # density 0.6 keeps 3 of 5 per task: [3, 0, 0, -4, 2], [-2, -2, 0, 0, -2] and [1, 3, 0, -1, 0]
    # (|1| ties with |-1| at the threshold: both kept). Sums [2, 1, 0, -5, 0]: signs +, +, 0, -,
    # 0; the zeros take the tensor's majority sign, sgn(1 + 1 + 0 - 1 + 0) = +. Means of the
    # agreeing values: (3 + 1)/2, 3, none, (-4 - 1)/2, and 2 (τ1's, not τ2's -2).
    base = np.ones(5, np.float32)
    got = merge_math.ties(base, list(tau), 0.6, 0.5)
    want = 1 + 0.5 * np.array([2, 3, 0, -2.5, 2])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), _ties_reference(base, base + tau, 0.6, 0.5))
    assert merge_math.trim_count(100, 0.29) == 29 and merge_math.trim_count(3, 0.1) == 1


def test_task_arithmetic_and_ties_match_the_formulas(runs, tmp_path):
    fts = [runs["ft_a"], runs["ft_b"], runs["ft_c"]]
    base = _flat(_params(runs["pt"]))
    tasks = [_flat(_params(r)) for r in fts]
    out, record = _merge(tmp_path, *fts, "--method", "task_arithmetic", "--base", runs["pt"],
                         "--scale", "0.7", "--weights", "1,0.5,2")  # fmt: skip
    want = {k: base[k] + 0.7 * sum(w * (t[k] - base[k]) for w, t in zip((1, 0.5, 2), tasks))
            for k in base}  # fmt: skip
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    assert record["base"]["step"] == 30 and record["scale"] == 0.7
    assert record["trained_on_chats"]  # (sft inputs: evaluation's --chat auto turns on)

    out, record = _merge(tmp_path, *fts, "--method", "ties", "--base", runs["pt"], "--density",
                         "0.3", "--scale", "1.5", name="ties")  # fmt: skip
    want = {k: _ties_reference(base[k], [t[k] for t in tasks], 0.3, 1.5) for k in base}
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    assert record["density"] == 0.3
    # tensor by tensor (one per read) gives the same bits as one pass over all of them
    ties = ["--method", "ties", "--base", runs["pt"], "--density", "0.3", "--scale", "1.5"]
    small, _ = _merge(tmp_path, *fts, *ties, "--chunk_mb", "0.001", name="ties_small")
    for a, b in zip(jax.tree.leaves(_params(small)), jax.tree.leaves(_params(out))):
        np.testing.assert_array_equal(a, b)


def _slerp_reference(t, a, b, threshold=0.9995):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > threshold:
        return (1 - t) * a + t * b, True
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega), False


def test_slerp_formula_endpoints_and_colinear_fallback():
    a, b = np.array([1, 0], np.float32), np.array([0, 1], np.float32)
    got, lin = merge_math.slerp(0.5, a, b)
    np.testing.assert_allclose(np.asarray(got), [np.sqrt(0.5)] * 2, rtol=1e-6)
    assert not bool(lin)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 50)).astype(np.float32)
    for t in (0.0, 1.0, 0.3):
        got, lin = merge_math.slerp(t, x, y)
        if t in (0.0, 1.0):
            np.testing.assert_array_equal(np.asarray(got), x if t == 0 else y)
        np.testing.assert_allclose(np.asarray(got), _slerp_reference(t, x, y)[0], rtol=1e-5)
    # colinear (same direction, other norm; and opposite): the linear interpolation
    for z in (2 * x, -x):
        got, lin = merge_math.slerp(0.25, x, z)
        assert bool(lin)
        np.testing.assert_allclose(np.asarray(got), 0.75 * x + 0.25 * z, rtol=1e-6)
    # the threshold: 1° apart is linear (cos 0.99985 > 0.9995), 3° apart spherical
    for deg, linear in ((1.0, True), (3.0, False)):
        r = np.radians(deg)
        v = np.array([np.cos(r), np.sin(r)], np.float32)
        got, lin = merge_math.slerp(0.5, a, 3 * v)
        assert bool(lin) == linear
        np.testing.assert_allclose(np.asarray(got), _slerp_reference(0.5, a, 3 * v)[0], rtol=1e-5)
    got, lin = merge_math.slerp(0.5, a, np.zeros(2, np.float32))  # no direction: linear
    assert bool(lin)
    np.testing.assert_allclose(np.asarray(got), 0.5 * a)


def test_slerp_of_two_runs_matches_the_reference(runs, tmp_path):
    a, b = _flat(_params(runs["ft_a"])), _flat(_params(runs["ft_b"]))
    out, record = _merge(tmp_path, runs["ft_a"], runs["ft_b"], "--method", "slerp", "--t", "0.3")
    want, linear = {}, []
    for k in a:
        v, lin = _slerp_reference(0.3, a[k], b[k])
        want[k] = v.reshape(a[k].shape)
        linear += [k] if lin else []
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    assert record["linear_tensors"] == linear and record["colinear_threshold"] == 0.9995
    assert any("scale" in k for k in linear) and not any("kernel" in k for k in linear)
    out, _ = _merge(tmp_path, runs["ft_a"], runs["ft_b"], "--method", "slerp", "--t", "0",
                    name="t0")  # fmt: skip
    for x, y in zip(jax.tree.leaves(_params(out)), jax.tree.leaves(_params(runs["ft_a"]))):
        np.testing.assert_array_equal(x, y)


def test_a_lora_run_is_merged_with_its_adapters_folded_in(runs, tmp_path):
    base, adapters = runs["lora_parts"]
    folded = jax.device_get(lora_lib.merge({"base": base, "lora": adapters}, LORA))
    _assert_close(_params(runs["lora"]), folded)  # (what every reader gives)
    for chunk in ("1024", "0.001"):  # one read, and a read per tensor (most without adapters)
        out, record = _merge(tmp_path, runs["lora"], runs["ft_a"], "--chunk_mb", chunk,
                             name=f"lora{chunk}")  # fmt: skip
        _assert_close(_params(out), _mean_reference([folded, _params(runs["ft_a"])], [1, 1]))
    assert record["inputs"][0]["read"] == "lm (LoRA merged)"
    assert not ckpt_lib.read_meta(out)[1]["lora"]  # a plain run now


def test_merging_under_a_mesh_gives_the_one_device_params(runs, mean_run, tmp_path):
    pt, mesh = runs["pt"], ["--mesh", "fsdp=4,tensor=2", "--sharding", "fsdp_tp"]
    out, _ = _merge(tmp_path, f"{pt}@10", f"{pt}@20", f"{pt}@30", *mesh)
    for a, b in zip(jax.tree.leaves(_params(out)), jax.tree.leaves(_params(mean_run[0]))):
        np.testing.assert_array_equal(a, b)  # elementwise: the same bits
    fts = [runs["ft_a"], runs["ft_b"], runs["ft_c"]]
    args = [*fts, "--method", "ties", "--base", pt, "--density", "0.3"]
    sharded, _ = _merge(tmp_path, *args, *mesh, name="ties_mesh")
    one, _ = _merge(tmp_path, *args, name="ties_one")
    for a, b in zip(jax.tree.leaves(_params(sharded)), jax.tree.leaves(_params(one))):
        np.testing.assert_array_equal(a, b)  # (merge_math.elect_and_merge: no fused mul-add)


# ------------------------------------------------------------------------------------------
# the merged run, read by each consumer


def test_the_merged_run_is_read_by_every_consumer(runs, mean_run, tmp_path, capsys):
    from flaxlm import generate
    from flaxlm.alignment.common import load_lm_params
    from flaxlm.evaluation.__main__ import main as evaluate
    from flaxlm.evaluation.__main__ import trained_on_chats
    from flaxlm.models import hf
    from flaxlm.train import pretrain

    out, _ = mean_run
    want = _params(out)
    step, meta = ckpt_lib.read_meta(out)
    assert step == 0 and meta["task"] == "merge" and not trained_on_chats(meta)
    assert meta["tokenizer"] == os.path.join(out, "tokenizer.model")
    assert open(meta["tokenizer"], "rb").read() == open(runs["tok"], "rb").read()
    assert os.listdir(os.path.join(out, "checkpoints")) == ["0"]
    _assert_close(jax.device_get(ckpt_lib.load_params(out, _target())), want)
    # init_from=OUT: the loop's loader for a language model, and alignment's
    _assert_close(jax.device_get(pretrain.init_loader(None)(out, _target())), want)
    _assert_close(jax.device_get(load_lm_params(out, _target())), want)
    # a training run pointed at it as its workdir refuses it (not a run to resume)
    ck = Checkpointer(out, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="task: checkpoint 'merge', this run"):
        ck.restore_latest({"params": _target()}, expect_meta={"task": "pretrain"})
    ck.close()

    (tmp_path / "text.jsonl").write_text('{"text": "where does Kavo live in Brel"}\n')
    (tmp_path / "ppl.json").write_text('{"name": "ppl", "type": "perplexity", "file": '
                                       '"text.jsonl"}')  # fmt: skip
    result = evaluate(["--checkpoint", out, "--tasks", str(tmp_path / "ppl.json")])
    assert result["step"] == 0 and result["chat_mode"] == "per task"
    assert np.isfinite(result["tasks"]["ppl"]["metrics"]["ppl"])

    capsys.readouterr()
    generate.main([out, "--prompt", "where does", "--max_new_tokens", "4", "--json"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "where does" and 1 <= line["n_tokens"] <= 4

    hf.main(["export", out, str(tmp_path / "hf")])
    _, exported = hf.load_pretrained(str(tmp_path / "hf"))
    _assert_close(jax.device_get(exported), want)


# ------------------------------------------------------------------------------------------
# refused inputs and outputs


def test_inputs_of_another_model_tokenizer_or_shape_are_refused_by_name(runs, tmp_path):
    root, pt = runs["root"], runs["pt"]
    other_cfg = get_variant("tiny", vocab_size=VOCAB, d_ff=96)
    ck_meta = {"task": "sft", "model_config": other_cfg.to_dict()}
    wide = _write(root / "wide", {3: _random(1, other_cfg)}, ck_meta, runs["tok"])
    with pytest.raises(SystemExit, match=rf"{wide}@3 is another model than {pt}@30:\n  "
                       r"model_config.d_ff: 96 there, 128 in"):  # fmt: skip
        _merge(tmp_path, pt, wide)
    # execution-only keys may differ
    exec_cfg = CFG.replace(attention_impl="flash", remat_policy="full")
    fast = _write(root / "fast", {3: _random(3)}, {"model_config": exec_cfg.to_dict()},
                  runs["tok"])  # fmt: skip
    out, _ = _merge(tmp_path, pt, fast, name="exec")
    assert ckpt_lib.read_meta(out)[1]["model_config"]["attention_impl"] == CFG.attention_impl

    junk = root / "junk.model"
    junk.write_bytes(b"not the same tokenizer")
    other_tok = _write(root / "other_tok", {3: _random(4)}, {}, str(junk))
    with pytest.raises(SystemExit, match=f"{other_tok}@3 has another tokenizer than {pt}@30: "
                       f"{other_tok}/tokenizer.model there, {pt}/tokenizer.model in"):  # fmt: skip
        _merge(tmp_path, pt, other_tok)

    bad = _random(5)
    bad["lm_head"]["kernel"] = np.zeros((CFG.d_model, VOCAB + 8), np.float32)
    lying = _write(root / "lying", {3: bad}, {}, runs["tok"])  # its meta says CFG
    with pytest.raises(SystemExit, match=rf"{lying}@3: tensor lm_head/kernel has shape "
                       rf"\(64, 408\); the model config gives \(64, 400\)"):  # fmt: skip
        _merge(tmp_path, pt, lying)

    rm = _write(root / "rm", {3: {"w": np.zeros(2, np.float32)}}, {"head": "scalar"}, runs["tok"])
    with pytest.raises(SystemExit, match=f"{rm}@3: a reward-model run"):
        _merge(tmp_path, pt, rm)
    with pytest.raises(SystemExit, match=f"{pt}: .*there is no step 7; steps there: "
                       r"\[10, 20, 30\]"):  # fmt: skip
        _merge(tmp_path, f"{pt}@7", pt)
    with pytest.raises(SystemExit, match=rf"{pt}: --last 4, but it has 3 checkpoint step\(s\)"):
        _merge(tmp_path, pt, "--last", "4")
    assert not [p for p in os.listdir(tmp_path) if p != "exec"]  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["A", "B", "--method", "ties"], "--method ties needs --base"),
    (["A", "B", "C", "--method", "slerp"], "slerp merges exactly two checkpoints; got 3"),
    (["A", "B", "--density", "0.5"], "--method mean takes no --density"),
    (["A", "B", "--weights", "1,-1"], "a mean's weights are >= 0"),
    (["A", "B", "--weights", "1,2,3"], "3 weight\\(s\\) for 2 checkpoint\\(s\\)"),
    (["A", "A"], "is given twice"),
    (["A", "B", "--method", "ties", "--base", "A", "--density", "0"], "in \\(0, 1\\]"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_read(runs, tmp_path, argv, message):
    names = {"A": runs["ft_a"], "B": runs["ft_b"], "C": runs["ft_c"]}
    with pytest.raises(SystemExit, match=message):
        _merge(tmp_path, *(names.get(a, a) for a in argv))
    assert not os.listdir(tmp_path)


def test_an_existing_out_is_refused_and_a_failed_merge_leaves_nothing(runs, tmp_path, monkeypatch):
    pt = runs["pt"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="out exists and is not empty"):
        _merge(tmp_path, pt, "--last", "2")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Checkpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _merge(tmp_path, pt, "--last", "2", name="new")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no new/, no .new.merge-tmp-*
    monkeypatch.undo()
    # an empty directory is taken
    (tmp_path / "empty").mkdir()
    out, _ = _merge(tmp_path, pt, "--last", "2", name="empty")
    assert ckpt_lib.run_steps(out) == [0]
