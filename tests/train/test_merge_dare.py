"""python -m flaxlm.train.merge --method dare_linear|dare_ties and --ties_scope global
(train/merge.py, train/merge_math.py): against numpy formulas written here in float64.

DARE's drop masks are random: the tests take them from merge_math.dare (the mask of a tensor of
ones), check their statistics and exact rescale there, and check that every merge is the
formula with those masks, that one seed gives the same bits whatever the grouping of the reads
and the mesh, and that another seed gives other masks. Global TIES is checked against the
paper's per-vector reference run on the concatenation of all tensors, and its streaming exact
k-th largest (merge_math.KthMagnitude) against a sort.

The runs are tiny models written straight to checkpoints (tests/train/test_merge.py's helpers):
a base and three fine-tunes of it whose deltas have another scale in each tensor (0.002 to
0.016), so that a threshold over the whole task vector trims the tensors unevenly."""

import json
import os

import jax
import numpy as np
import pytest

from flaxlm.train import merge as merge_cli
from flaxlm.train import merge_math
from tests.train.test_merge import (
    _assert_close,
    _flat,
    _merge,
    _params,
    _random,
    _ties_reference,
    _write,
)

MESH = ["--mesh", "fsdp=4,tensor=2", "--sharding", "fsdp_tp"]


def _finetune(seed, base):
    """`base` plus normal noise of a scale that depends on the tensor (0.002 · 2^(i mod 4))."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(base)
    noisy = [(x + 0.002 * 2 ** (i % 4) * rng.standard_normal(x.shape)).astype(x.dtype)
             for i, x in enumerate(leaves)]  # fmt: skip
    return jax.tree.unflatten(tree, noisy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_tokenizer):
    root = tmp_path_factory.mktemp("merge_dare")
    tok = chat_tokenizer[0]
    base = _random(7)
    r = {"base": _write(root / "base", {1: base}, {"task": "pretrain"}, tok)}
    r["fts"] = [_write(root / f"ft{i}", {2: _finetune(50 + i, base)}, {"task": "sft"}, tok)
                for i in range(3)]  # fmt: skip
    r["flat_base"] = _flat(_params(r["base"]))
    r["flat_fts"] = [_flat(_params(f)) for f in r["fts"]]
    return r


def _masks(seed, density, paths_shapes, n_inputs):
    """[{path: bool mask}] per input: the entries merge_math.dare keeps of a tensor of ones."""
    return [{k: np.asarray(merge_math.dare(np.ones(shape, np.float32),
                                           merge_math.dare_key(seed, i, tuple(k.split("/"))),
                                           density)) != 0
             for k, shape in paths_shapes.items()}
            for i in range(n_inputs)]  # fmt: skip


def _dare_taus(runs, seed, density):
    """DARE's task vectors in float64: τ_t = θ_t − θ_base, kept by the mask, divided by p."""
    base = {k: v.astype(np.float64) for k, v in runs["flat_base"].items()}
    masks = _masks(seed, density, {k: v.shape for k, v in base.items()}, len(runs["fts"]))
    taus = [{k: np.where(m[k], (ft[k] - base[k]) / density, 0.0) for k in base}
            for ft, m in zip(runs["flat_fts"], masks)]  # fmt: skip
    return base, taus, masks


def _dare_linear(runs, seed=3):
    return [*runs["fts"], "--base", runs["base"], "--method", "dare_linear", "--density", "0.4",
            "--seed", str(seed), "--scale", "0.7", "--weights", "1,0.5,2"]  # fmt: skip


@pytest.fixture(scope="module")
def dare_linear_run(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dare_linear") / "out")
    return out, merge_cli.main([*_dare_linear(runs), "--out", out])


# ------------------------------------------------------------------------------------------
# DARE


def test_dare_keeps_a_density_share_and_scales_the_kept_by_exactly_one_over_density():
    tau = np.random.default_rng(0).standard_normal((400, 500)).astype(np.float32)
    n = tau.size
    for density in (0.1, 0.5, 0.9):
        got = np.asarray(merge_math.dare(tau, merge_math.dare_key(1, 0, ("w",)), density))
        kept = got != 0
        # binomial: the kept count is within 5 standard deviations of n·p (a fixed seed: this
        # either always holds or never; 5σ leaves a chance of ~6e-7 that a right mask fails)
        assert abs(kept.sum() - n * density) <= 5 * np.sqrt(n * density * (1 - density))
        np.testing.assert_array_equal(got[kept], tau[kept] * np.float32(1 / density))
    # density 1 keeps τ as it is; each of (seed, input index, path) changes the mask
    key = merge_math.dare_key(1, 0, ("w",))
    np.testing.assert_array_equal(np.asarray(merge_math.dare(tau, key, 1.0)), tau)
    mask = np.asarray(merge_math.dare(tau, key, 0.5)) != 0
    for other in ((2, 0, ("w",)), (1, 1, ("w",)), (1, 0, ("v",))):
        again = np.asarray(merge_math.dare(tau, merge_math.dare_key(*other), 0.5)) != 0
        assert 0.4 < np.mean(again != mask) < 0.6, other  # independent masks: half differ


def test_dare_linear_is_the_formula_with_its_masks(runs, dare_linear_run):
    out, record = dare_linear_run
    base, taus, masks = _dare_taus(runs, seed=3, density=0.4)
    want = {k: base[k] + 0.7 * sum(w * tau[k] for w, tau in zip((1, 0.5, 2), taus))
            for k in base}  # fmt: skip
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    # the masks over the whole model keep a share ≈ density (binomial, 5σ)
    n = sum(m.size for m in masks[0].values()) * len(masks)
    kept = sum(int(m.sum()) for mask in masks for m in mask.values())
    assert abs(kept - 0.4 * n) <= 5 * np.sqrt(n * 0.4 * 0.6)
    assert record["method"] == "dare_linear" and [i["weight"] for i in record["inputs"]] == [
        1, 0.5, 2]  # fmt: skip
    assert (record["density"], record["seed"], record["scale"]) == (0.4, 3, 0.7)
    assert "threefry2x32" in record["dare_rng"] and "ties_scope" not in record
    assert json.load(open(os.path.join(out, "merge.json"))) == record


def test_dare_linear_at_density_1_is_task_arithmetic(runs, tmp_path):
    args = [*runs["fts"], "--base", runs["base"], "--scale", "0.7", "--weights", "1,0.5,2"]
    ta, _ = _merge(tmp_path, *args, "--method", "task_arithmetic", name="ta")
    dare, _ = _merge(tmp_path, *args, "--method", "dare_linear", "--density", "1", name="dare")
    for a, b in zip(jax.tree.leaves(_params(dare)), jax.tree.leaves(_params(ta))):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def dare_ties_run(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dare_ties") / "out")
    argv = [*runs["fts"], "--base", runs["base"], "--method", "dare_ties", "--density", "0.3",
            "--seed", "9", "--scale", "1.2", "--out", out]  # fmt: skip
    return out, merge_cli.main(argv)


def _same_bits(run, other, msg=""):
    for a, b in zip(jax.tree.leaves(_params(run)), jax.tree.leaves(_params(other))):
        np.testing.assert_array_equal(a, b, err_msg=msg)


SPLIT = ["--chunk_mb", "0.25", *MESH]  # 2 groups of tensors, not 1; over 8 devices, not 1


def test_one_seed_gives_the_same_bits_whatever_the_reads_and_the_mesh(runs, dare_linear_run,
                                                                        tmp_path):  # fmt: skip
    out, _ = _merge(tmp_path, *_dare_linear(runs), *SPLIT, name="split")
    _same_bits(out, dare_linear_run[0])
    other, _ = _merge(tmp_path, *_dare_linear(runs, seed=4), name="seed4")
    want = jax.tree.leaves(_params(dare_linear_run[0]))
    differs = [np.mean(a != b) for a, b in zip(jax.tree.leaves(_params(other)), want)]
    assert min(differs) > 0.3  # another mask in every tensor (0.64 of entries on average)


def test_dare_ties_gives_the_same_bits_whatever_the_reads_and_the_mesh(runs, dare_ties_run,
                                                                         tmp_path):  # fmt: skip
    argv = [*runs["fts"], "--base", runs["base"], "--method", "dare_ties", "--density", "0.3",
            "--seed", "9", "--scale", "1.2"]  # fmt: skip
    out, _ = _merge(tmp_path, *argv, *SPLIT)
    _same_bits(out, dare_ties_run[0])


def test_dare_ties_is_ties_applied_to_the_dare_task_vectors(runs, dare_ties_run):
    out, record = dare_ties_run
    base, taus, _ = _dare_taus(runs, seed=9, density=0.3)
    # TIES of the models θ_base + τ'_t, its trim left out (density 1 keeps every entry)
    want = {k: _ties_reference(base[k], [base[k] + t[k] for t in taus], 1.0, 1.2) for k in base}
    _assert_close(_params(out), want, rtol=1e-5, atol=1e-6)
    assert (record["seed"], record["density"], record["ties_scope"]) == (9, 0.3, "tensor")
    assert "weight" not in record["inputs"][0] and "majority_sign" not in record


# ------------------------------------------------------------------------------------------
# TIES over the whole task vector


def _concat(flat):
    return np.concatenate([flat[k].astype(np.float64).ravel() for k in sorted(flat)])


def _split(vector, like):
    out, at = {}, 0
    for k in sorted(like):
        out[k] = vector[at : at + like[k].size].reshape(like[k].shape)
        at += like[k].size
    return out


GLOBAL = ["--method", "ties", "--density", "0.2", "--scale", "1.5", "--ties_scope", "global"]


@pytest.fixture(scope="module")
def global_run(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ties_global") / "out")
    return out, merge_cli.main([*runs["fts"], "--base", runs["base"], *GLOBAL, "--out", out])


def test_global_ties_is_the_papers_ties_over_the_concatenated_task_vector(runs, global_run):
    out, record = global_run
    base, fts = runs["flat_base"], runs["flat_fts"]
    whole = _ties_reference(_concat(base), [_concat(f) for f in fts], 0.2, 1.5)
    _assert_close(_params(out), _split(whole, base), rtol=1e-5, atol=1e-6)
    # each input's threshold: exactly the m-th largest float32 |τ| over all its tensors
    n = sum(v.size for v in base.values())
    m = max(1, int(np.floor(0.2 * n + 1e-6)))
    for entry, ft in zip(record["inputs"], fts):
        tau32 = np.concatenate([(ft[k] - base[k]).ravel() for k in base])  # (float32)
        assert entry["threshold"] == np.sort(np.abs(tau32))[n - m]
    assert record["ties_scope"] == "global" and record["majority_sign"] in (-1, 1)
    # not the per-tensor merge: the tensor of the smallest deltas (embed, 0.002) is trimmed
    # harder by the whole vector's threshold than by its own
    k = "embed/embedding"
    per_tensor = _ties_reference(base[k], [f[k] for f in fts], 0.2, 1.5)
    assert np.mean(_flat(_params(out))[k] != base[k]) < np.mean(per_tensor != base[k]) / 2


def test_global_ties_gives_the_same_bits_in_groups_and_under_a_mesh(runs, global_run, tmp_path):
    out, record = _merge(tmp_path, *runs["fts"], "--base", runs["base"], *GLOBAL, *SPLIT)
    assert [i["threshold"] for i in record["inputs"]] == [
        i["threshold"] for i in global_run[1]["inputs"]]  # fmt: skip
    assert record["majority_sign"] == global_run[1]["majority_sign"]
    _same_bits(out, global_run[0])


def test_kth_magnitude_is_exact_whatever_the_order_and_ties():
    rng = np.random.default_rng(0)
    parts = [  # magnitudes from 1e-40 (subnormal) to 1e30
        (rng.standard_normal(1000) * 10.0 ** rng.integers(-40, 30, 1000)).astype(np.float32),
        np.repeat(np.float32([0.0, -1.0, 1.0, 2.5e-3]), 300),  # ties, zeros, both signs
        # 400 neighbours of 1 (two high-16-bit bins: the second pass tells them apart)
        np.float32(1.0) + np.arange(-200, 200, dtype=np.float32) * np.float32(2**-23),
        np.float32([1e-45, -3e-44, np.inf]),  # the smallest subnormals, and inf
    ]
    values = np.sort(np.abs(np.concatenate(parts)))
    n = values.size
    for m in (1, 2, 7, 300, n // 3, n // 2 + 1, n - 1, n):
        found = merge_math.KthMagnitude(m)
        for k in range(found.PASSES):  # the second pass in another order (as any grouping)
            for x in parts if k == 0 else parts[::-1]:
                found.add(x)
            found.end_pass()
        assert found.value == values[n - m], m
        assert np.sum(values >= found.value) >= m


def test_global_majority_sign_decides_the_entries_whose_sum_is_zero():
    """Two tensors, two tasks: A's one zero-sum entry takes the whole vector's majority sign
    (−: B's entries vote −) where per tensor it takes A's own (+); as the merge composes them
    (merge.global_majority, then each tensor), against the reference on the concatenation."""
    a = [np.float32([3, 2, 1, -4]), np.float32([-3, 1, 1, -1])]  # sums 0, 3, 2, -5: A votes +
    b = [np.float32([-1, -2, -3, -4, 5, -6]), np.float32([-1, -1, -1, -1, 1, -1])]  # votes −
    mass = sum(merge_math.sign_mass(np.stack(t)) for t in (a, b))
    assert mass == (1 + 1 - 1) + (-5 + 1)
    got = [merge_math.elect_and_merge(np.zeros_like(t[0]), t, 1.0, mass) for t in (a, b)]
    want = _ties_reference(np.zeros(10), [np.concatenate(t) for t in zip(a, b)], 1.0, 1.0)
    np.testing.assert_allclose(np.concatenate(got), want)
    assert float(got[0][0]) == -3.0  # (per tensor: +3)
    assert float(merge_math.elect_and_merge(np.zeros(4, np.float32), a, 1.0)[0]) == 3.0


# ------------------------------------------------------------------------------------------
# refused arguments


@pytest.mark.parametrize("argv, message", [
    (["--method", "dare_linear"], "--method dare_linear needs --base"),
    (["--method", "dare_ties", "--density", "0.5"], "--method dare_ties needs --base"),
    (["--method", "ties", "--base", "B", "--seed", "1"], "--method ties takes no --seed"),
    (["--method", "task_arithmetic", "--base", "B", "--seed", "1"], "takes no --seed"),
    (["--method", "dare_linear", "--base", "B", "--ties_scope", "global"],
     "--method dare_linear takes no --ties_scope"),
    (["--method", "mean", "--ties_scope", "tensor"], "--method mean takes no --ties_scope"),
    (["--method", "dare_ties", "--base", "B", "--weights", "1,2"], "takes no --weights"),
    (["--method", "dare_ties", "--base", "B", "--density", "0"], "--density 0.0: .* \\(0, 1\\]"),
    (["--method", "dare_linear", "--base", "B", "--density", "1.5"], "--density 1.5"),
    (["--method", "dare_linear", "--base", "B", "--seed", "-1"], "--seed -1: .*\\[0, 2\\^32\\)"),
])  # fmt: skip
def test_bad_arguments_are_refused_by_flag_before_any_array_is_read(runs, tmp_path, monkeypatch,
                                                                    argv, message):  # fmt: skip
    def no_read(*a, **k):
        raise AssertionError("an array was read")

    monkeypatch.setattr(merge_cli, "read", no_read)
    argv = [runs["base"] if a == "B" else a for a in argv]
    with pytest.raises(SystemExit, match=message):
        _merge(tmp_path, *runs["fts"][:2], *argv)
    assert not os.listdir(tmp_path)


def test_another_ties_scope_is_refused_by_the_cli_and_by_merge(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):  # (argparse's choices)
        _merge(tmp_path, *runs["fts"], "--method", "ties", "--base", runs["base"],
               "--ties_scope", "paper")  # fmt: skip
    assert "--ties_scope: invalid choice: 'paper'" in capsys.readouterr().err
    with pytest.raises(merge_cli.MergeError, match="--ties_scope 'paper': one of tensor, global"):
        merge_cli.merge(runs["fts"], str(tmp_path / "x"), "ties", base=runs["base"],
                        ties_scope="paper")  # fmt: skip
    assert not os.listdir(tmp_path)
