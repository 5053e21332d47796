"""train/loop_logging.py `_summarise`: a log window whose steps carry different keys averages
each key over the steps that have it (it raised KeyError on a key the last step had and an
earlier one lacked), and a `K`/`K_n` pair is weighted by the count, left out when it is 0.
The step's metrics average the steps whose update was accepted (a skipped NaN step made the
whole line NaN); the skipped steps' loss is `skipped_loss`."""

import numpy as np
import pytest

from flaxlm.train.loop_logging import _summarise


def test_keys_missing_from_some_steps_are_averaged_over_the_steps_that_have_them():
    window = [
        {"loss": np.float32(1.0), "skipped": np.float32(0), "lr": np.float32(0.1)},
        {"loss": np.float32(3.0), "skipped": np.float32(1), "lr": np.float32(0.2),
         "rollout/extra": np.float32(5.0)},
        {"loss": np.float32(2.0), "lr": np.float32(0.3), "rollout/extra": np.float32(7.0)},
    ]  # fmt: skip
    rec = _summarise(window)
    # (over the accepted steps: the skipped middle one is left out of the loss, see below; a
    # step without the `skipped` key counts as accepted)
    assert rec["loss"] == pytest.approx(1.5)
    assert rec["rollout/extra"] == pytest.approx(6.0)  # over the two steps that have it
    assert rec["skipped"] == 1 and rec["lr"] == pytest.approx(0.3)
    # a key only an earlier step had is kept too (it vanished silently)
    rec = _summarise(window[:2] + [{"loss": np.float32(2.0)}])
    assert rec["rollout/extra"] == pytest.approx(5.0) and rec["lr"] == pytest.approx(0.2)


def test_a_count_weights_its_metric_and_a_zero_count_leaves_it_out():
    step = lambda acc, n: {"loss": 0.0, "rollout/accuracy": acc, "rollout/accuracy_n": n}  # noqa: E731
    rec = _summarise([step(0.0, 0.0), step(0.5, 12.0), step(1.0, 4.0)])
    assert rec["rollout/accuracy"] == pytest.approx((0.5 * 12 + 1.0 * 4) / 16)
    rec = _summarise([step(0.0, 0.0), step(0.0, 0.0)])
    assert "rollout/accuracy" not in rec and rec["rollout/accuracy_n"] == 0


def test_a_skipped_step_is_left_out_of_the_averages_and_its_loss_logged_apart():
    """One NaN step the guard skipped made the whole line's loss and grad_norm NaN (the sweep
    table's final_loss, and the scaling report then called the run diverged), and a skipped
    spike inflated the mean: the step's metrics average the accepted steps, the skipped steps'
    loss is `skipped_loss`, and the rollout's statistics (drawn before the update) keep every
    step."""
    nan = np.float32(np.nan)
    step = lambda loss, skipped, reward: {  # noqa: E731
        "loss": np.float32(loss), "grad_norm": np.float32(loss / 2), "skipped": np.float32(skipped),
        "lr": np.float32(0.1), "rollout/reward_mean": np.float32(reward),
        "rollout/accuracy": np.float32(reward), "rollout/accuracy_n": np.float32(4.0),
    }  # fmt: skip
    window = [step(1.0, 0, 1.0), step(nan, 1, 2.0), step(3.0, 0, 3.0), step(100.0, 1, 4.0)]
    rec = _summarise(window)
    assert rec["loss"] == pytest.approx(2.0) and rec["grad_norm"] == pytest.approx(1.0)
    assert rec["skipped"] == 2
    assert np.isnan(rec["skipped_loss"])  # (the NaN one and the spike: their mean)
    assert rec["lr"] == pytest.approx(0.1)
    # the rollout's statistics are of every step, skipped or not (the accepted ones': 2.0)
    assert rec["rollout/reward_mean"] == pytest.approx(2.5)
    assert rec["rollout/accuracy"] == pytest.approx(2.5)
    rec = _summarise(window[1:])
    assert rec["loss"] == pytest.approx(3.0) and rec["skipped"] == 2
    assert _summarise([window[0], window[3]])["skipped_loss"] == pytest.approx(100.0)
    # a key only a skipped step has is its value, not dropped
    window[1]["moe/load_balance"] = np.float32(1.25)
    assert _summarise(window)["moe/load_balance"] == pytest.approx(1.25)
    # no skipped step: no skipped_loss
    assert "skipped_loss" not in _summarise([window[0], window[2]])


def test_a_window_of_skipped_steps_only_averages_them_all():
    """Nothing accepted: the mean over every step, so a NaN stays in sight."""
    window = [{"loss": np.float32(np.nan), "skipped": np.float32(1)},
              {"loss": np.float32(2.0), "skipped": np.float32(1)}]  # fmt: skip
    rec = _summarise(window)
    assert np.isnan(rec["loss"]) and np.isnan(rec["skipped_loss"]) and rec["skipped"] == 2
    rec = _summarise(window[1:])
    assert rec["loss"] == pytest.approx(2.0) and rec["skipped_loss"] == pytest.approx(2.0)
