"""flaxlm/config_values.py: the one check of "is a config number" every module uses refuses bools
(True is an int in Python: `loss.beta=True` trained with β = 1) and takes numpy scalars."""

import math

import numpy as np
import pytest

from flaxlm.config_values import is_finite_real, is_int, is_real


@pytest.mark.parametrize("x", [0, 1, -2.5, 1e30, np.float32(0.5), np.int64(3), math.inf])
def test_real_numbers_are_real(x):
    assert is_real(x)


@pytest.mark.parametrize("x", [True, False, np.bool_(True), "1", None, 1j, [1.0]])
def test_bools_strings_and_others_are_not(x):
    assert not is_real(x) and not is_finite_real(x) and not is_int(x)


def test_finite_and_integer():
    assert is_finite_real(1.5) and is_finite_real(np.float64(-3))
    assert not any(is_finite_real(x) for x in (math.inf, -math.inf, math.nan, np.float32("nan")))
    assert is_int(3) and is_int(np.int32(-1)) and not is_int(3.0) and not is_int(np.float64(2))
