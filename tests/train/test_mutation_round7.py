"""Mutation testing, round 7: train/loop_guard.py and train/optim.py behaviours the other tests
left open, each checked against a reference written here (a float64 Adam, the documented
schedule formulas, hand-counted rollback sequences), not against the code's own text."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from flaxlm.train import loop_guard


class _Ckpt:
    """A checkpointer that records the order of its calls."""

    def __init__(self, latest=10, restored=None):
        self.calls, self.latest, self.restored = [], latest, restored

    def wait(self):
        self.calls.append("wait")

    def latest_step(self):
        self.calls.append("latest_step")
        return self.latest

    def restore_latest(self, target):
        self.calls.append("restore_latest")
        return None if self.restored is None else (self.latest, self.restored)


class _Writer:
    def __init__(self):
        self.events, self.rolled = [], []

    def event(self, name, why, **kw):
        self.events.append((name, why, kw))

    def rolled_back(self, step, last, why, **kw):
        self.rolled.append((step, last, kw))
        return step - last


class _Task:
    init_params = None


@dataclasses.dataclass(frozen=True)
class _State:
    step: object
    guard: dict

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def _limit_run(limit, steps):
    """The trigger steps `_RollbackLimit(limit)` accepts before it raises (and the error)."""
    lim, ckpt, writer, ok = loop_guard._RollbackLimit(limit), _Ckpt(), _Writer(), []
    for s in steps:
        try:
            lim.check(s, 3, ckpt, writer)
        except RuntimeError as e:
            return ok, str(e), writer.events, ckpt.calls
        ok.append(s)
    return ok, None, writer.events, ckpt.calls


def test_rollback_limit_counts_rollbacks_without_progress_exactly():
    """max_rollbacks=2: two rollbacks at (or before) the last one's step are allowed, the third
    is refused; the event names the two before it and the latest checkpoint, read only after
    the save in flight landed."""
    ok, err, events, calls = _limit_run(2, [15, 13, 13])
    assert ok == [15, 13] and err is not None
    assert "after 2 rollbacks in a row (at steps [15, 13]) none of which got past step 15" in err
    assert events == [("rollback_limit", err, {"step": 13, "rollback_steps": [15, 13]})]
    assert calls == ["wait", "latest_step"]  # waited before naming the latest step


def test_rollback_limit_progress_past_the_last_trigger_starts_the_count_again():
    """A rollback triggered after the previous one's step is progress: the count restarts
    there. A trigger at the same step is not."""
    assert _limit_run(1, [10, 12, 14, 20])[1] is None  # always further: never stops
    ok, err, _, _ = _limit_run(1, [10, 12, 12])
    assert ok == [10, 12] and "at steps [12]" in err


def test_rollback_limit_zero_never_stops():
    assert _limit_run(0, [7] * 50)[1] is None


def _guard_call(max_bad, bad_in_row, monkeypatch):
    rec = {"bad_in_row": float(bad_in_row), "loss": float("nan"), "grad_norm": 1.0}
    monkeypatch.setattr(loop_guard, "_log_window", lambda *a: rec)
    monkeypatch.setattr(loop_guard, "abstract_state", lambda *a: None)
    restored = _State(step=jnp.asarray(10, jnp.int32),
                      guard={"bad_in_row": jnp.asarray(2, jnp.int32), "n_skipped": 4})  # fmt: skip
    ckpt, writer = _Ckpt(10, restored), _Writer()

    class Meter:
        skipped = 0

        def skip(self):
            self.skipped += 1

    class Bar:
        n = 17

    class Config:
        class guard:
            pass

    Config.guard.max_bad_in_row = max_bad
    state = _State(step=17, guard={"bad_in_row": bad_in_row})
    meter, bar, summary = Meter(), Bar(), {"rollbacks": 0}
    limit = loop_guard._RollbackLimit(3)
    out = loop_guard._log_and_guard(Config, [], meter, state, 17, writer, summary, bar, limit,
                                    ckpt, _Task, None, None)  # fmt: skip
    return out, meter, bar, summary, ckpt, writer


def test_a_streak_of_exactly_max_bad_in_row_rolls_back_and_resets_the_streak(monkeypatch):
    (state, step, rolled), meter, bar, summary, ckpt, writer = _guard_call(3, 3, monkeypatch)
    assert rolled and step == 10 and isinstance(step, int)  # the restored checkpoint's step
    assert summary["rollbacks"] == 1
    assert bar.n == 10 and meter.skipped == 1  # the progress bar and timer follow the restore
    streak = state.guard["bad_in_row"]
    assert int(streak) == 0 and streak.dtype == jnp.int32  # reset, its dtype kept
    assert state.guard["n_skipped"] == 4  # the rest of the guard is the checkpoint's
    assert ckpt.calls[0] == "wait"  # a save in flight lands before the restore
    assert writer.rolled == [(17, 10, {"checkpoint": 10, "bad_in_row": 3})]


@pytest.mark.parametrize("max_bad,bad_in_row", [(3, 2), (0, 0), (0, 5)])
def test_no_rollback_below_the_streak_or_with_rollback_off(max_bad, bad_in_row, monkeypatch):
    (state, step, rolled), meter, bar, summary, ckpt, _ = _guard_call(
        max_bad, bad_in_row, monkeypatch
    )
    assert not rolled and step == 17 and summary["rollbacks"] == 0 and ckpt.calls == []
    assert meter.skipped == 0 and bar.n == 17


def test_the_detail_of_a_window_with_only_a_loss():
    """A logged line with a loss and no gradient norm (nor skipped means) shows the loss alone;
    a finite one says 'both finite', a NaN one names the forward or backward pass."""
    d = loop_guard.bad_steps_detail({"loss": 2.0})
    assert d == (" (the skipped steps' mean loss 2: both finite: the updates were non-finite "
                 "(the optimizer's state) or the losses spikes)")  # fmt: skip
    d = loop_guard.bad_steps_detail({"skipped_loss": 1.5, "skipped_grad_norm": float("inf")})
    assert d.endswith("grad_norm inf: a NaN/Inf in the forward or backward pass)")
    assert "mean loss 1.5," in d


# --- train/optim.py ------------------------------------------------------------------------------


def _opt(**kw):
    """An opt section without ml_collections' type locks."""
    import ml_collections

    from flaxlm.train.optim import opt_config

    return ml_collections.ConfigDict({**opt_config().to_dict(), **kw})


def _schedule_reference(kind, lr, frac, total, warmup, wsd_frac):
    """The module docstring's schedules, in float64: a linear warmup from 0 peaking on update
    w, then a decay from lr reaching lr·frac on update total − 1 and holding it."""
    w = min(warmup, max(total - 1, 0))
    span = max(total - w - 1, 1)
    final = lr * frac
    out = []
    for t in range(total + 3):
        if t < w:
            out.append(lr * t / w)
            continue
        u = min(t - w, span)
        if kind == "cosine":
            out.append(final + (lr - final) * 0.5 * (1 + np.cos(np.pi * u / span)))
        elif kind == "linear":
            out.append(lr + (final - lr) * u / span)
        elif kind == "wsd":
            decay = min(max(int(total * wsd_frac), 1), span)
            v = min(max(t - w - (span - decay), 0), decay)
            out.append(lr + (final - lr) * v / decay)
        else:
            out.append(lr)
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
@pytest.mark.parametrize("total,warmup,wsd_frac", [(12, 3, 0.25), (30, 0, 0.5), (6, 10, 1.0),
                                                    (40, 5, 0.1)])  # fmt: skip
def test_every_schedule_value_matches_a_float64_reference(kind, total, warmup, wsd_frac):
    from flaxlm.train.optim import make_schedule

    cfg = _opt(schedule=kind, lr=0.5, final_lr_frac=0.2, warmup_steps=warmup,
               wsd_decay_frac=wsd_frac)  # fmt: skip
    s = make_schedule(cfg, total)
    got = [float(s(t)) for t in range(total + 3)]
    want = _schedule_reference(kind, 0.5, 0.2, total, warmup, wsd_frac)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kw",
    [{"lr": 0.0}, {"final_lr_frac": 1.0}, {"final_lr_frac": 0.0}, {"warmup_steps": 0},
     {"schedule": "wsd", "wsd_decay_frac": 1.0}, {"b1": 0.0, "b2": 0.0}, {"grad_accum": 1}],
)  # fmt: skip
def test_the_edges_of_each_documented_range_are_accepted(kw):
    from flaxlm.train.optim import make_optimizer

    make_optimizer(_opt(**kw), 10)


def test_a_run_of_zero_steps_and_a_zero_lr_build_an_optimizer():
    """total_steps = 0 is an integer >= 0 (a config only inspected); lr = 0 trains nothing."""
    from flaxlm.train.optim import make_optimizer, make_schedule

    assert float(make_schedule(_opt(warmup_steps=5), 0)(0)) == pytest.approx(3e-4)
    tx, schedule = make_optimizer(_opt(lr=0.0, warmup_steps=0), 5)
    params = {"w": {"kernel": jnp.ones((3, 2))}}
    up, _ = tx.update({"w": {"kernel": jnp.full((3, 2), 0.5)}}, tx.init(params), params)
    assert float(schedule(2)) == 0.0 and not np.asarray(up["w"]["kernel"]).any()


@pytest.mark.parametrize(
    "kw, match",
    [({"schedule": "wsd", "wsd_decay_frac": 0.0}, r"opt\.wsd_decay_frac=0\.0 .*\(0, 1\]"),
     ({"final_lr_frac": 1.5}, r"opt\.final_lr_frac=1\.5"), ({"grad_accum": 0}, "opt.grad_accum"),
     ({"total": -1}, r"total_steps=-1 must be an integer >= 0")],
)  # fmt: skip
def test_just_outside_each_range_is_refused(kw, match):
    from flaxlm.train.optim import make_optimizer

    total = kw.pop("total", 10)
    with pytest.raises(ValueError, match=match):
        make_optimizer(_opt(**kw), total)


def test_the_largest_decay_a_bfloat16_moment_carries_is_accepted_and_the_next_refused():
    """1 − β > 2·eps is 'more than two rounding steps': with bfloat16's eps = 2^-7 the limit is
    β <= 1 − 2^-6 = 0.984375 (the docstring's 0.984), accepted; the next float64 above it is
    refused. A float32 second moment (opt.nu_dtype) carries it and far more."""
    from flaxlm.train.optim import make_optimizer

    params = {"w": {"kernel": jnp.ones((2, 2), jnp.bfloat16)}}
    edge = 1 - 2.0**-6
    make_optimizer(_opt(b2=edge), 10)[0].init(params)
    with pytest.raises(ValueError, match=r"opt\.b2=0\.98437500000000\d* is a decay a bfloat16"):
        make_optimizer(_opt(b2=float(np.nextafter(edge, 1.0))), 10)[0].init(params)
    make_optimizer(_opt(b2=0.999, nu_dtype="float32"), 10)[0].init(params)


def test_clipping_at_a_norm_exactly_max_norm_is_optax_bit_for_bit():
    """Float32 leaves get optax's arithmetic exactly, the boundary included: a norm equal to
    max_norm (12, 35: exactly 37) is scaled by max_norm / norm as optax does (12 → 11.999999),
    not passed through."""
    import optax

    from flaxlm.train.optim import clip_by_global_norm32

    g = {"a": jnp.asarray([12.0, 35.0], jnp.float32)}
    got, _ = clip_by_global_norm32(37.0).update(g, optax.EmptyState())
    want, _ = optax.clip_by_global_norm(37.0).update(g, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(got["a"]), np.asarray(want["a"]))


def test_muon_keeps_its_momentum_in_mu_dtype_and_refuses_a_momentum_of_one():
    """opt.mu_dtype reaches Muon's own momentum (the layers' matrices) as well as its AdamW's
    first moment; a momentum of 1 never forgets and is refused naming the key."""
    import jax

    from flaxlm.train.optim import make_optimizer

    params = {"layers_0": {"mlp": {"up": {"kernel": jnp.ones((4, 6))}}},
              "embed": {"embedding": jnp.ones((5, 4))}}  # fmt: skip
    tx, _ = make_optimizer(_opt(name="muon", mu_dtype="bfloat16"), 10)
    kept = {(x.shape, str(x.dtype)) for x in jax.tree.leaves(tx.init(params)) if x.ndim}
    assert ((4, 6), "bfloat16") in kept  # Muon's momentum of the matrix
    assert ((4, 6), "float32") not in kept
    assert ((5, 4), "bfloat16") in kept and ((5, 4), "float32") in kept  # AdamW's mu, nu
    with pytest.raises(ValueError, match=r"opt\.muon_momentum=1\.0 must be in \[0, 1\)"):
        make_optimizer(_opt(name="muon", muon_momentum=1.0), 10)
