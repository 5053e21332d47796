"""What a config number must be, checked the one way every module checks it.

A bool is an int in Python (`isinstance(True, numbers.Real)` is true), so `loss.beta=True`
would pass a plain type check and train with β = 1. The checks of config numbers in train/,
alignment/ and data/clean.py use these, which refuse bools (each module had its own copy).
numpy scalars count (a sweep's values can be np.float64).
This module imports nothing of flaxlm, so any module can use it without an import cycle
(configs/common.py imports the training modules that check their own keys, and every
module in configs/ is a config file).
"""

from __future__ import annotations

import math
import numbers


def is_real(x) -> bool:
    """A real number (int, float or a numpy one), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite_real(x) -> bool:
    """A real number, not a bool, neither ±inf nor NaN."""
    return is_real(x) and math.isfinite(x)


def is_int(x) -> bool:
    """An integer (int or a numpy one), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)
