"""KTO: the loss equals the paper's formula written independently in numpy (float64) — the
mismatched-pair KL estimate, its clamp at 0, the weights, and no gradient through z0 (central
differences of the formula with z0 held fixed) — also with the batch sharded over 8 devices;
the unpaired-data reader (both record forms, preference records split, bad input named
file:line); the mismatched (KL) rows of a batch, built explicitly; the λ_D·n_D / (λ_U·n_U)
warning; and runs through the shared loop from a random SFT run, full and LoRA (no reference
copy)."""

import importlib
import importlib.util
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxlm.alignment import kto
from flaxlm.configs import kto as kto_config
from flaxlm.data import formats as F
from flaxlm.data.sources import DataError
from flaxlm.data.tokenizer import train as train_tokenizer
from flaxlm.train.metrics import read_metrics
from flaxlm.train.step import finish_metrics, loss_and_grads

_spec = importlib.util.spec_from_file_location(
    "rl_helpers", os.path.join(os.path.dirname(__file__), "rl_helpers.py")
)
H = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(H)

V = 13  # vocabulary of the table "model"
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---------------------------------------------------------------------------------------------
# The loss against float64 numpy


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _table_apply(params, tokens, positions, segment_ids):
    """logits = table[token] + pos[position]: each row's logits depend on its own tokens only."""
    del segment_ids
    return params["table"][tokens] + params["pos"][positions]


def _seq_logps(params, batch, prefix):
    """float64 Σ over the loss mask of log p(target), with numpy's own log-softmax."""
    table = np.asarray(params["table"], np.float64)
    pos = np.asarray(params["pos"], np.float64)
    logits = table[batch[f"{prefix}tokens"]] + pos[batch[f"{prefix}positions"]]
    m = logits.max(-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    picked = np.take_along_axis(logp, batch[f"{prefix}targets"][..., None], -1)[..., 0]
    return (picked * batch[f"{prefix}loss_mask"]).sum(-1)


def _kto_reference(pol, pol_kl, ref, ref_kl, label, valid, kl_valid, beta, wd, wu, z0=None):
    """The paper's loss (eq. 8 less its constant, TRL's): z0 = max(0, mean KL over the
    mismatched rows), each example's λ·(1 − σ(·)), the mean over real examples."""
    if z0 is None:
        z0 = max(0.0, float(((pol_kl - ref_kl) * kl_valid).sum() / max(kl_valid.sum(), 1.0)))
    d = pol - ref
    sig = lambda x: np.exp(_logsig(x))  # noqa: E731
    per = np.where(label > 0.5, wd * (1 - sig(beta * (d - z0))), wu * (1 - sig(beta * (z0 - d))))
    return float((per * valid).sum() / valid.sum()), z0, per


def _batch(rng, B=8, T=10, kl_shift=0.0):
    """A KTO batch of random rows (prompts of 2-4 tokens, completions of 1-5, garbage padding),
    the last row padding (valid 0) and row 2's mismatched row missing (kl_valid 0). The reference
    log-probabilities are given: the matched ones random, the mismatched ones the table
    model's own (`params`) minus `kl_shift`, so the KL estimate is kl_shift plus noise."""
    params = {"table": jnp.asarray(rng.normal(0, 1.5, (V, V)), jnp.float32),
              "pos": jnp.asarray(rng.normal(0, 0.5, (T, V)), jnp.float32)}  # fmt: skip
    batch = {}
    for prefix in ("", "kl_"):
        mask = np.zeros((B, T), np.float32)
        for b in range(B):
            p, n = rng.integers(2, 5), rng.integers(1, 6)
            mask[b, p - 1 : p - 1 + n] = 1.0
        batch.update({
            f"{prefix}tokens": rng.integers(0, V, (B, T)).astype(np.int32),
            f"{prefix}targets": rng.integers(0, V, (B, T)).astype(np.int32),
            f"{prefix}positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            f"{prefix}segment_ids": np.ones((B, T), np.int32), f"{prefix}loss_mask": mask,
        })  # fmt: skip
    batch["label"] = np.array([1, 0, 1, 1, 0, 0, 1, 1], np.float32)[:B]
    batch["valid"] = np.r_[np.ones(B - 1), 0.0].astype(np.float32)
    batch["kl_valid"] = batch["valid"].copy()
    batch["kl_valid"][2] = 0.0
    batch["ref_logps"] = (_seq_logps(params, batch, "") + rng.normal(0, 2.0, B)).astype(np.float32)
    kl_noise = rng.normal(0, 0.3, B)
    batch["ref_kl_logps"] = (_seq_logps(params, batch, "kl_") - kl_shift + kl_noise).astype(
        np.float32
    )
    return params, batch


def _cfg(beta=0.1, wd=1.0, wu=1.0):
    return ml_collections.ConfigDict(
        {"beta": beta, "desirable_weight": wd, "undesirable_weight": wu}
    )


def _reference_of(params, batch, k, z0=None):
    return _kto_reference(
        _seq_logps(params, batch, ""), _seq_logps(params, batch, "kl_"),
        batch["ref_logps"].astype(np.float64), batch["ref_kl_logps"].astype(np.float64),
        batch["label"], batch["valid"], batch["kl_valid"], k.beta, k.desirable_weight,
        k.undesirable_weight, z0,
    )  # fmt: skip


@pytest.mark.parametrize("kl_shift,beta,wd,wu", [(2.0, 0.1, 1.0, 1.0), (2.0, 0.5, 1.3, 0.7),
                                                  (-2.0, 0.5, 1.0, 1.5)])  # fmt: skip
def test_loss_fn_equals_the_formula(kl_shift, beta, wd, wu):
    params, batch = _batch(np.random.default_rng(0), kl_shift=kl_shift)
    k = _cfg(beta, wd, wu)
    loss, metrics = kto.kto_loss_fn(_table_apply, k)(params, batch, None)
    metrics = finish_metrics(metrics)  # (the counts and per-kind means as logged)
    want, z0, per = _reference_of(params, batch, k)
    # The estimate is the mean over rows 0, 1, 3, 4, 5, 6 (row 2 has no mismatched row, row 7 is
    # padding): about kl_shift; a negative estimate is clamped to 0.
    assert (z0 > 1.0) if kl_shift > 0 else (z0 == 0.0)
    np.testing.assert_allclose(float(loss), want, **TOL)
    np.testing.assert_allclose(float(metrics["kl"]), z0, **TOL)
    raw = _seq_logps(params, batch, "kl_") - batch["ref_kl_logps"]
    raw = (raw * batch["kl_valid"]).sum() / batch["kl_valid"].sum()
    np.testing.assert_allclose(float(metrics["kl_unclamped"]), raw, **TOL)
    assert z0 == max(raw, 0.0)
    pol, ref = _seq_logps(params, batch, ""), batch["ref_logps"].astype(np.float64)
    good = (batch["label"] > 0) & (batch["valid"] > 0)
    bad = (batch["label"] == 0) & (batch["valid"] > 0)
    np.testing.assert_allclose(float(metrics["rewards/desirable"]),
                               beta * (pol - ref)[good].mean(), **TOL)  # fmt: skip
    np.testing.assert_allclose(float(metrics["rewards/undesirable"]),
                               beta * (pol - ref)[bad].mean(), **TOL)  # fmt: skip
    np.testing.assert_allclose(float(metrics["logps/desirable"]), pol[good].mean(), **TOL)
    np.testing.assert_allclose(float(metrics["logps/undesirable"]), pol[bad].mean(), **TOL)
    np.testing.assert_allclose(float(metrics["rewards/margin"]),
                               beta * ((pol - ref)[good].mean() - (pol - ref)[bad].mean()),
                               **TOL)  # fmt: skip
    right = np.where(batch["label"] > 0, pol - ref > z0, pol - ref < z0)[batch["valid"] > 0]
    np.testing.assert_allclose(float(metrics["rewards/accuracy"]), right.mean(), **TOL)
    assert (float(metrics["count/desirable"]), float(metrics["count/undesirable"])) == (4, 3)
    assert float(metrics["weight"]) == 7
    # The weights scale each kind's losses, nothing else.
    _, _, per1 = _reference_of(params, batch, _cfg(beta), z0)
    np.testing.assert_allclose(per, np.where(batch["label"] > 0, wd, wu) * per1, rtol=1e-12)


def test_reward_accuracy_counts_strict_wins_only():
    """rewards/accuracy: a desirable example is right when Δ > z0, an undesirable one when
    Δ < z0, strictly (the module docstring). With the policy as its own reference (step 0)
    every Δ is 0 and z0 is 0: no example is right, desirable ones no more than undesirable
    ones (the held-out accuracy counts such ties ½)."""
    from flaxlm.alignment.dpo import rows_logps

    params, batch = _batch(np.random.default_rng(3))
    (pol,), _ = rows_logps(_table_apply, params, batch, ("",))
    (pol_kl,), _ = rows_logps(_table_apply, params, batch, ("kl_",))
    fn = kto.kto_loss_fn(_table_apply, _cfg())
    same = {**batch, "ref_logps": np.asarray(pol), "ref_kl_logps": np.asarray(pol_kl)}
    m = finish_metrics(fn(params, same, None)[1])
    assert float(m["kl"]) == 0.0 and float(m["rewards/margin"]) == 0.0
    assert float(m["rewards/accuracy"]) == 0.0
    # row 0 (desirable) up 1 nat, row 1 (undesirable) down 1 nat: right; the rest tied
    assert batch["label"][:2].tolist() == [1, 0] and batch["valid"].sum() == 7
    shift = np.zeros_like(batch["ref_logps"])
    shift[:2] = [1.0, -1.0]
    m = finish_metrics(fn(params, {**same, "ref_logps": np.asarray(pol) - shift}, None)[1])
    np.testing.assert_allclose(float(m["rewards/accuracy"]), 2 / 7, **TOL)


def test_metrics_are_the_batchs_own_with_grad_accum():
    """With opt.grad_accum > 1 the step combines micro-batches weighted by their examples: the
    counts and per-kind means used to come out divided by the number of micro-batches
    (count/desirable 4 → 2 → 1 at grad_accum 1, 2, 4) and pulled toward 0 by a micro-batch
    without one kind. They are sums now (train/step.py `finish_metrics`): the same at any
    grad_accum. (The loss, the gradient and z0 are each micro-batch's, as documented.)"""
    params, batch = _batch(np.random.default_rng(5), kl_shift=0.0)
    # grad_accum=4 splits rows strided (0, 4 | 1, 5 | 2, 6 | 3, 7): micro-batch 3 holds only
    # desirable examples (row 7 is padding), micro-batch 1 only undesirable ones.
    batch["label"] = np.array([1, 0, 0, 1, 1, 0, 1, 1], np.float32)
    batch["kl_valid"] = np.zeros_like(batch["kl_valid"])  # z0 = 0 in every micro-batch
    k = _cfg(beta=0.5)
    fn, rng = kto.kto_loss_fn(_table_apply, k), jax.random.PRNGKey(0)
    runs = {n: jax.jit(lambda p, b, n=n: loss_and_grads(p, b, rng, fn, grad_accum=n)[1])(
        params, batch) for n in (1, 2, 4)}  # fmt: skip
    assert (float(runs[1]["count/desirable"]), float(runs[1]["count/undesirable"])) == (4, 3)
    pol, ref = _seq_logps(params, batch, ""), batch["ref_logps"].astype(np.float64)
    good = (batch["label"] > 0) & (batch["valid"] > 0)
    np.testing.assert_allclose(float(runs[4]["rewards/desirable"]),
                               0.5 * (pol - ref)[good].mean(), **TOL)  # fmt: skip
    for n in (2, 4):
        for key in ("count/desirable", "count/undesirable", "rewards/desirable",
                    "rewards/undesirable", "rewards/margin", "rewards/accuracy",
                    "logps/desirable", "logps/undesirable", "weight"):  # fmt: skip
            np.testing.assert_allclose(float(runs[n][key]), float(runs[1][key]), **TOL,
                                       err_msg=f"{key} at grad_accum={n}")  # fmt: skip
        assert not {"sums", "ratios"} & set(runs[n])


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])
def test_gradient_stops_at_z0(kl_shift):
    """jax.grad of the loss = central differences of the formula with z0 held at its value:
    the reference point moves with the policy, but is a constant of each step (TRL detaches
    it). Where z0 > 0, the full derivative (z0 moving too) is measurably different."""
    params, batch = _batch(np.random.default_rng(1), kl_shift=kl_shift)
    k = _cfg(beta=0.5, wd=1.2, wu=0.9)
    grads = jax.grad(lambda p: kto.kto_loss_fn(_table_apply, k)(p, batch, None)[0])(params)
    _, z0, _ = _reference_of(params, batch, k)
    p64 = {n: np.asarray(v, np.float64) for n, v in params.items()}

    def central(name, fixed_z0, eps=1e-5):
        out = np.zeros_like(p64[name])
        for idx in np.ndindex(*out.shape):
            up, dn = dict(p64), dict(p64)
            up[name], dn[name] = p64[name].copy(), p64[name].copy()
            up[name][idx] += eps
            dn[name][idx] -= eps
            f = lambda q: _reference_of(q, batch, k, z0 if fixed_z0 else None)[0]  # noqa: E731
            out[idx] = (f(up) - f(dn)) / (2 * eps)
        return out

    for name in ("table", "pos"):
        fd = central(name, fixed_z0=True)
        np.testing.assert_allclose(np.asarray(grads[name]), fd, rtol=1e-4, atol=1e-6)
    full = central("table", fixed_z0=False)
    if kl_shift > 0:  # z0 depends on the policy: differentiating it would change the step
        assert np.abs(full - central("table", fixed_z0=True)).max() > 1e-3
    else:  # clamped at 0: no dependence at all
        np.testing.assert_allclose(full, central("table", fixed_z0=True), atol=1e-9)


def test_z0_is_the_global_batch_mean_when_sharded():
    """On the mesh (one row per device), the jitted loss still takes the KL mean over the whole
    batch: the value the formula gives on the host."""
    from flaxlm.models.sharding import make_mesh, shard_batch, use_mesh

    params, batch = _batch(np.random.default_rng(2), kl_shift=1.5)
    k = _cfg(beta=0.3)
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with use_mesh(mesh, ()):
        sharded = shard_batch(batch, mesh)
        assert len(sharded["kl_tokens"].sharding.device_set) == 8
        loss, metrics = jax.jit(kto.kto_loss_fn(_table_apply, k))(params, sharded, None)
    want, z0, _ = _reference_of(params, batch, k)
    np.testing.assert_allclose(float(metrics["kl"]), z0, **TOL)
    np.testing.assert_allclose(float(loss), want, **TOL)


def test_lora_reference_is_the_frozen_base():
    """With `base_apply` the reference log-probabilities come from params["base"] (any in the
    batch are ignored), under stop_gradient."""
    params, batch = _batch(np.random.default_rng(3), kl_shift=0.0)
    k = _cfg(beta=0.5)
    base = {n: v + 0.1 for n, v in params.items()}
    both = {"base": base, "lora": params}
    lora_apply = lambda p, *a: _table_apply(p["lora"], *a)  # noqa: E731  (policy = "lora")
    fn = kto.kto_loss_fn(lora_apply, k, base_apply=_table_apply)
    loss, _ = fn(both, {**batch, "ref_logps": batch["ref_logps"] * 0 + 123.0}, None)
    ref = {**batch, "ref_logps": _seq_logps(base, batch, ""),
           "ref_kl_logps": _seq_logps(base, batch, "kl_")}  # fmt: skip
    want, _, _ = _reference_of(params, ref, k)
    np.testing.assert_allclose(float(loss), want, **TOL)
    g = jax.grad(lambda p: fn(p, batch, None)[0])(both)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g["base"]))


def test_label_balance_warns_outside_the_papers_range(caplog):
    def examples(n_d, n_u):  # (each its own prompt: ids[:split])
        return [{"label": i < n_d, "ids": np.array([7, i], np.int32), "split": 2}
                for i in range(n_d + n_u)]  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        assert kto.label_balance(examples(50, 50), _cfg())["weighted_ratio"] == 1.0
        assert kto.label_balance(examples(12, 10), _cfg())["weighted_ratio"] == 1.2
        assert not caplog.records
        out = kto.label_balance(examples(10, 100), _cfg())  # 1:10, the paper's example
        assert out == {"desirable": 10, "undesirable": 100, "weighted_ratio": 0.1,
                       "distinct_prompts": 110}  # fmt: skip
        assert "desirable_weight=10 (ratio 1)" in caplog.records[-1].getMessage()
        ok = kto.label_balance(examples(10, 100), _cfg(wd=12.0))  # λ_D in [10, 13.3]: no warning
        assert ok["weighted_ratio"] == pytest.approx(1.2) and len(caplog.records) == 1
        assert kto.label_balance(examples(5, 0), _cfg())["weighted_ratio"] is None
        assert "only one kind" in caplog.records[-1].getMessage()


def test_one_prompt_for_every_example_is_named(caplog):
    """With one prompt, no row has a KL partner (another prompt): z0 = 0 at every step and the
    logged kl read 0 while the policy moved, without a word."""
    one = [{"label": i % 2 == 0, "ids": np.array([7, 8, 9, i], np.int32), "split": 3}
           for i in range(40)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="flaxlm"):
        assert kto.label_balance(one, _cfg())["distinct_prompts"] == 1
    assert "share one prompt" in caplog.records[-1].getMessage()
    # (what the batches then do: no row of a batch has a partner)
    assert F.kl_partners([ex["ids"][: ex["split"]].tobytes() for ex in one[:4]]) == [-1] * 4


# ---------------------------------------------------------------------------------------------
# Data: records, mismatched rows

WORDS = "the river and mountain have a forest of tall trees that grow with light".split()


@pytest.fixture(scope="module")
def template():
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(200)]
    return F.ChatTemplate(train_tokenizer(texts, 320))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_reader_both_forms_and_preference_split(tmp_path, template):
    convo = [{"role": "user", "content": "the river"}, {"role": "assistant", "content": "a forest"},
             {"role": "user", "content": "tall trees"}]  # fmt: skip
    path = _jsonl(tmp_path / "fb.jsonl", [
        {"prompt": "the river", "completion": "a forest", "label": True},
        {"messages": [*convo, {"role": "assistant", "content": "grow with light"}], "label": False},
        {"prompt": "the mountain", "chosen": "tall trees", "rejected": "light",
         "meta": {"pair": "x"}},
    ])  # fmt: skip
    report = F.DataReport()
    exs = F.render_unpaired(F.read_records(path, report), template, 64, report=report)
    assert [(e["loc"], e["label"]) for e in exs] == [
        (f"{path}:1", True),
        (f"{path}:2", False),
        (f"{path}:3", True),
        (f"{path}:3", False),
    ]
    assert report.to_dict()["used"] == 3 and report.to_dict()["dropped"] == 0
    header = template.headers["assistant"]
    for e in exs:
        ids, mask, s = e["ids"], e["mask"], e["split"]
        assert mask[:s].sum() == 0 and mask[s:].sum() > 0  # only the completion trains
        assert list(ids[s : s + len(header)]) == header and e["head"] == 1  # BOS
    # Record 1 renders as the same chat without a label would; record 2's first answer is
    # context, its last the completion; a split pair shares its prompt ids.
    ids, mask = F.render_chat([{"role": "user", "content": "the river"},
                               {"role": "assistant", "content": "a forest"}], template)  # fmt: skip
    np.testing.assert_array_equal(exs[0]["ids"], ids)
    np.testing.assert_array_equal(exs[0]["mask"], mask)
    prompt, _ = F.render_chat(convo, template, add_generation_prompt=True)
    np.testing.assert_array_equal(exs[1]["ids"][: exs[1]["split"]], prompt[: -len(header)])
    a, b = exs[2], exs[3]
    np.testing.assert_array_equal(a["ids"][: a["split"]], b["ids"][: b["split"]])
    assert a["meta"] == {"pair": "x"}


def test_reader_bad_input_names_file_and_line(tmp_path, template):
    path = _jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "the river", "completion": "a forest", "label": True},
        {"prompt": "the river", "completion": "a forest", "label": "yes"},
        {"prompt": "the river", "completion": "a forest"},
        {"messages": [{"role": "user", "content": "the river"}], "label": True},
        '{"prompt": "the river", "label": tru',
        {"prompt": "the river", "completion": "a forest", "label": 1},
        {"prompt": "the river", "chosen": "a forest", "rejected": "a forest"},
    ])  # fmt: skip
    report = F.DataReport()
    exs = F.render_unpaired(F.read_records(path, report), template, 64, report=report)
    assert [e["loc"] for e in exs] == [f"{path}:1"]
    bad = report.to_dict()["bad_input"]
    assert bad["counts"] == {"bad_label": 2, "missing_field": 1, "no_assistant_turn": 1,
                             "malformed_json": 1, "identical_pair": 1}  # fmt: skip
    assert bad["examples"]["bad_label"][0].startswith(f"{path}:2: bad_label (label='yes'")
    assert bad["examples"]["missing_field"][0].startswith(f"{path}:3: missing_field")
    strict = F.DataReport(strict=True)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: bad_label"):
        F.render_unpaired(F.read_records(path, strict), template, 64, report=strict)


def test_kl_partners_shift_by_one_and_skip_the_same_prompt():
    assert F.kl_partners([b"a", b"b", b"c", b"d"]) == [1, 2, 3, 0]
    assert F.kl_partners([b"a", b"a", b"b", b"c"]) == [2, 2, 3, 0]  # a split pair, adjacent
    assert F.kl_partners([b"a", b"b", b"b"]) == [1, 0, 0]
    assert F.kl_partners([b"a", b"a"]) == [-1, -1] and F.kl_partners([b"a"]) == [-1]


def test_processes_keep_their_rows_of_the_global_batch(template):
    """Mismatched partners are chosen over the whole global batch, which every process builds
    and cuts: two processes' rows together are one process's batch."""
    recs = [({"prompt": f"q{i} about the river", "completion": "tall trees" * (1 + i % 3),
              "label": i % 2 == 0}, f"f:{i}") for i in range(11)]  # fmt: skip
    exs = F.render_unpaired(recs, template, 64)
    kw = dict(seq_len=48, pad_id=0, seed=1)
    one = F.UnpairedBatches(exs, batch=4, **kw)
    parts = [F.UnpairedBatches(exs, batch=2, process_index=p, process_count=2, **kw)
             for p in (0, 1)]  # fmt: skip
    for _ in range(5):
        whole, halves = next(one), [next(it) for it in parts]
        for k, v in whole.items():
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v, err_msg=k)


def test_mismatched_rows_of_a_batch(tmp_path, template):
    """Each row's `kl_*` row is exactly its completion after its partner's prompt, trained on
    the completion only; a lone row (a final partial batch) has none."""
    recs = [({"prompt": "the mountain", "chosen": "tall trees", "rejected": "light"}, "f:1"),
            ({"prompt": "the river and a forest", "completion": "light", "label": True}, "f:2"),
            ({"prompt": "have", "completion": "a forest of tall trees", "label": False}, "f:3"),
            ({"prompt": "grow", "completion": "the river", "label": True}, "f:4")]  # fmt: skip
    exs = F.render_unpaired(recs, template, 64)
    assert len(exs) == 5
    it = F.UnpairedBatches(exs, seq_len=32, batch=4, pad_id=0, shuffle=False, num_epochs=1)
    b = next(it)
    np.testing.assert_array_equal(b["label"], [1, 0, 1, 0])
    np.testing.assert_array_equal(b["kl_valid"], [1, 1, 1, 1])
    partners = [2, 2, 3, 0]  # rows 0 and 1 share a prompt: both take row 2's
    convs = [[{"role": "user", "content": p}] for p in
             ("the mountain", "the mountain", "the river and a forest", "have")]  # fmt: skip
    answers = ["tall trees", "light", "light", "a forest of tall trees"]
    for r, j in enumerate(partners):
        want = np.r_[exs[j]["ids"][: exs[j]["split"]], exs[r]["ids"][exs[r]["split"] :]]
        # ... which is the rendering of that mismatched conversation, trained as its answer
        full, fmask = F.render_chat(convs[j] + [{"role": "assistant", "content": answers[r]}],
                                    template)  # fmt: skip
        np.testing.assert_array_equal(want, full)
        n = len(want) - 1
        np.testing.assert_array_equal(b["kl_loss_mask"][r, :n], fmask[1:])
        np.testing.assert_array_equal(b["kl_tokens"][r, :n], want[:-1])
        np.testing.assert_array_equal(b["kl_targets"][r, :n], want[1:])
        np.testing.assert_array_equal(b["kl_positions"][r, :n], np.arange(n))
        assert (b["kl_segment_ids"][r, :n] == 1).all() and (b["kl_segment_ids"][r, n:] == 0).all()
        # the completion's targets train, and as many of them as in the matched row
        assert b["kl_loss_mask"][r].sum() == b["loss_mask"][r].sum() > 0
        assert b["kl_loss_mask"][r, : exs[j]["split"] - 1].sum() == 0
        np.testing.assert_array_equal(b["kl_targets"][r][b["kl_loss_mask"][r] > 0],
                                      b["targets"][r][b["loss_mask"][r] > 0])  # fmt: skip
    last = next(it)
    np.testing.assert_array_equal(last["valid"], [1, 0, 0, 0])
    np.testing.assert_array_equal(last["kl_valid"], [0, 0, 0, 0])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_mismatched_rows_through_a_jinja_template(name, tmp_path):
    """With an HF tokenizer's own chat template (tests/data/test_chat_template_training.py's
    ChatML and Llama-3-style ones), the prompt is the template's generation prompt and a
    mismatched row is exactly the template's rendering of that other conversation."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                        "test_chat_template_training.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("chat_template_training", path)
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    tok = C._load(tmp_path, name)
    t = F.training_template(tok)
    convs = [
        ([C.S("You are a river."), C.U("the river")], "the forest"),
        ([C.U("Hello, the river?"), C.A("a forest"), C.U("is the river")], "Hello"),
    ]
    recs = [({"messages": p + [C.A(c)], "label": i == 0}, f"j:{i}")
            for i, (p, c) in enumerate(convs)]  # fmt: skip
    exs = F.render_unpaired(recs, t, 512)
    for ex, (prompt, _) in zip(exs, convs):
        assert ex["ids"][: ex["split"]].tolist() == F.generation_prompt(prompt, tok)[0]
        assert not ex["mask"][: ex["split"]].any() and ex["head"] == int(name == "llama3")
    for j, i in ((1, 0), (0, 1)):  # completion i after prompt j
        ids, mask = F.mismatched(exs[j], exs[i], 512)
        full, fmask = F.render_chat(convs[j][0] + [C.A(convs[i][1])], t)
        assert ids.tolist() == full.tolist()
        n = exs[j]["split"]
        assert mask.tolist() == [0.0] * n + fmask[n:].tolist() and mask.sum() > 0


def test_mismatched_cuts_the_borrowed_prompt_from_the_left():
    long_prompt = {"ids": np.r_[1, np.arange(10, 40)].astype(np.int32), "split": 31, "head": 1}
    short = {"ids": np.array([1, 5, 6, 7, 8, 9, 2], np.int32), "split": 3, "head": 1,
             "mask": np.array([0, 0, 0, 1, 1, 1, 0], np.float32)}  # fmt: skip
    ids, mask = F.mismatched(long_prompt, short, seq_len=12)
    assert len(ids) == 13 and ids[0] == 1  # BOS kept, the oldest prompt tokens cut
    np.testing.assert_array_equal(ids[1:9], np.arange(32, 40))
    np.testing.assert_array_equal(ids[9:], [7, 8, 9, 2])
    np.testing.assert_array_equal(mask, np.r_[np.zeros(9), 1, 1, 1, 0])


# ---------------------------------------------------------------------------------------------
# Runs through the loop


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    return H.fake_runs(str(tmp_path_factory.mktemp("kto_runs")), cache_dir)


def test_main_knows_the_task():
    from flaxlm.train.main import TASKS

    assert importlib.import_module(TASKS["kto"]).run is kto.run


def test_reference_is_init_from_or_its_ema_or_ref_from(cache_dir, tmp_path):
    """The frozen reference copy: init_from's EMA with init_from_ema (the policy's start);
    kto.ref_from names a reference of its own, read as its params. Misconfigurations are named
    before anything loads."""
    from flaxlm.models.sharding import make_mesh
    from flaxlm.train.pretrain import model_fns

    sft, _ = H.fake_runs(str(tmp_path), cache_dir, ema=True)
    mesh = make_mesh({"data": -1})
    for ref_from, seed in (("", H.EMA_SEED["lm"]), (sft, 0)):
        c = H.tiny(kto_config, cache_dir, init_from=sft, init_from_ema=True, **{
            "batch_size": 8, "seq_len": 64, "data.eval": "", "kto.ref_from": ref_from,
        })  # fmt: skip
        task = kto.build_task(c, mesh, None)
        want = H.random_params(model_fns(H.get_variant("tiny", vocab_size=H.VOCAB))[0], seed)
        got = jax.device_get(task.frozen)  # the step's frozen argument, scored in the loss
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = [({"init_from": ""}, "init_from=SFT_RUN"), ({"batch_size": 1}, "fewer than 2"),
           ({"lora.rank": 8, "kto.ref_from": sft}, "frozen base"),
           # base leaves that train would move the reference (params["base"]) with the policy
           ({"lora.rank": 8, "lora.train_extra": "norm"},
            "kto: lora.train_extra='norm' trains")]  # fmt: skip
    for overrides, match in bad:
        with pytest.raises(ValueError, match=match):
            kto.build_task(H.tiny(kto_config, cache_dir, **{"init_from": sft, **overrides}),
                           mesh, None)  # fmt: skip


def test_flops_per_token_is_the_mean_of_a_trained_and_a_forward_row(runs, cache_dir):
    """Half the rows train, the mismatched half only runs forward (2·N + A/3 per token, N the
    matmul weights, A the training count's attention term); a frozen copy's forward runs over
    both. The count was 2/3 of the task's training count, right for full fine-tuning only:
    under LoRA (4·N + A training) it was 8/3·N + 2A/3, not 3·N + 2A/3."""
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    mesh = make_mesh({"data": -1})
    cfg = H.get_variant("tiny", vocab_size=H.VOCAB)
    T = 64
    for lora in (0, 8):
        c = H.tiny(kto_config, cache_dir, f"runlocal=True,lora={lora}", init_from=sft,
                   **{"batch_size": 8, "seq_len": T, "data.eval": ""})  # fmt: skip
        task = kto.build_task(c, mesh, None)
        for causal, got in ((False, task.flops_per_token), (True, task.flops_per_token_causal)):
            full = cfg.flops_per_token(T, causal=causal)
            N = cfg.param_counts()["matmul"]
            A = full - 6 * N
            trained = (4 if lora else 6) * N + A
            forward = 2 * N + A / 3
            ref_copy = 0 if lora else forward  # (LoRA's reference is the base: not counted)
            want = (trained + forward) / 2 + ref_copy
            assert got == pytest.approx(want, rel=1e-9), (lora, causal, got, want)


def test_nonsense_numbers_are_refused_before_any_load(cache_dir):
    """kto.beta=0 (every loss λ/2 whatever the policy: nothing trains) or below, and negative
    weights, were accepted without a word. Refused when the task is built, naming the key
    (init_from names no run)."""
    for key, bad, match in (("beta", 0.0, "kto.beta=0.0 must be > 0"),
                            ("beta", -0.1, "kto.beta=-0.1 must be > 0"),
                            ("undesirable_weight", -1.0, "kto.undesirable_weight=-1.0 must be"),
                            ("desirable_weight", 0.0, None)):  # fmt: skip
        c = H.tiny(kto_config, cache_dir, init_from="/no/such/run", **{f"kto.{key}": bad})
        if match is None:  # one kind weighted 0 is allowed: the run fails on the missing run
            with pytest.raises(Exception) as e:
                kto.build_task(c, None, None)
            assert "kto." not in str(e.value)
            with c.unlocked():
                c.kto.undesirable_weight = 0.0
            match = "no loss to train"
        with pytest.raises(ValueError, match=match):
            kto.build_task(c, None, None)


def test_ref_from_with_another_tokenizer_is_refused_before_any_load(
    runs, cache_dir, tmp_path, chat_tokenizer, monkeypatch
):  # fmt: skip
    """kto.ref_from trained with another tokenizer: refused (it used to train silently)."""
    from flaxlm.models.sharding import make_mesh

    sft, _ = runs
    other = H.other_tokenizer_run(str(tmp_path / "other"), chat_tokenizer[0])
    H.forbid_loads(monkeypatch)
    c = H.tiny(kto_config, cache_dir, init_from=sft, **{"kto.ref_from": other})
    with pytest.raises(
        ValueError,
        match=rf"kto.ref_from={other}: its tokenizer "
        rf"{chat_tokenizer[0]} \(\d+ pieces\) is not this run's",
    ):
        kto.build_task(c, make_mesh({"data": -1}), None)


def test_kto_trains_in_the_loop(runs, cache_dir, tmp_path):
    sft, _ = runs
    c = H.tiny(kto_config, cache_dir, init_from=sft, **{
        "batch_size": 16, "seq_len": 64, "opt.lr": 3e-3, "total_steps": 6, "log_every": 1,
        "eval_every": 6, "eval_gen.examples": 8, "eval_gen.batch": 8,
        "eval_gen.max_new_tokens": 4, "eval_gen.max_prompt_len": 48,
    })  # fmt: skip
    _, summary = kto.run(c, str(tmp_path))
    recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    # Step 1: the policy is the reference, Δ = 0 and z0 = 0 for every example: loss 1 − σ(0).
    assert recs[0]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert recs[0]["count/desirable"] + recs[0]["count/undesirable"] == 16
    for key in ("rewards/desirable", "rewards/undesirable", "rewards/accuracy", "kl",
                "logps/desirable", "logps/undesirable"):  # fmt: skip
        assert np.isfinite(recs[-1][key]), key
    # Training separates the two kinds: the desirable-minus-undesirable reward margin grows.
    assert recs[-1]["rewards/margin"] > recs[0]["rewards/margin"] + 0.05
    assert recs[-1]["loss"] < recs[0]["loss"]
    ev = summary["eval"]
    for key in ("eval/loss", "eval/accuracy", "eval/kl", "eval/margin",
                "eval/rewards/desirable", "eval/sft_heldout/accuracy"):  # fmt: skip
        assert np.isfinite(ev[key]), key
    rep = json.load(open(tmp_path / "data_report.json"))["train"]
    assert rep["desirable"] == rep["undesirable"] and rep["weighted_ratio"] == 1.0


def test_kto_lora_runs_with_no_reference_copy(runs, cache_dir, tmp_path, monkeypatch):
    from flaxlm.alignment import common

    H.forbid_reference_copy(monkeypatch)
    sft, _ = runs
    c = H.tiny(kto_config, cache_dir, "runlocal=True,lora=8", init_from=sft, **{
        "batch_size": 16, "seq_len": 64, "opt.lr": 3e-2, "total_steps": 4, "log_every": 1,
    })  # fmt: skip
    state, _ = kto.run(c, str(tmp_path))
    recs = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert recs[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # adapters start at 0: Δ = 0
    assert recs[-1]["rewards/margin"] > recs[0]["rewards/margin"]
    # The base (the reference) is the SFT run's, untouched; the adapters trained.
    _, base, _ = common.load_policy(sft)
    policy = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(policy["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(policy["lora"]))
