"""train/loop_logging.py `_summarise`: a log window whose steps carry different keys averages
each key over the steps that have it (it raised KeyError on a key the last step had and an
earlier one lacked), and a `K`/`K_n` pair is weighted by the count, left out when it is 0."""

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
    assert rec["loss"] == pytest.approx(2.0)
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
