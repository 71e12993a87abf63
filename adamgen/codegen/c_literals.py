"""C source for float constants: each literal is the constant rounded *once* to the element type.

Why a module of its own: a C compiler reads ``0.1f`` by rounding the decimal straight to float32,
while NumPy rounds a Python float (already a double) to float32; for some values the two differ
(double rounding). The literals here are chosen so that both roundings agree, checked in exact
rational arithmetic, so the printed kernel uses exactly the float32 constant NumPy would.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def float32_literal(value: float) -> str:
    """The shortest decimal that a correctly rounding C compiler reads as ``float32(value)``.

    ``value`` (a double) is rounded once to float32, as NumPy rounds a weak Python float; each
    candidate decimal is then checked in exact rational arithmetic against the rounding
    interval of that float32, so the C literal needs no double rounding to be right.
    """
    with np.errstate(over="ignore"):
        single = np.float32(value)
        if not np.isfinite(single):
            return "NAN" if np.isnan(single) else ("-INFINITY" if single < 0 else "INFINITY")
        down = np.nextafter(single, np.float32(-np.inf))
        up = np.nextafter(single, np.float32(np.inf))
    exact = Fraction(float(single))
    if np.isfinite(up) and np.isfinite(down):
        below, above = Fraction(float(down)), Fraction(float(up))
    elif np.isfinite(down):  # the largest float32: the overflow threshold mirrors its neighbour
        below = Fraction(float(down))
        above = 2 * exact - below
    else:
        above = Fraction(float(up))
        below = 2 * exact - above
    low, high = (below + exact) / 2, (exact + above) / 2
    even = int(single.view(np.uint32)) % 2 == 0
    for digits in range(1, 10):
        text = f"{float(single):.{digits}g}"
        candidate = Fraction(text)
        if low < candidate < high or (even and candidate in (low, high)):
            break
    else:  # unreachable for IEEE float32 (9 digits always suffice); stay exact regardless
        text = float(single).hex()
    if not any(ch in text for ch in ".epx"):
        text += ".0"
    return text + "f"


def c_literal(value: float, dtype: str) -> str:
    """A float constant as C source whose value is ``value`` rounded once to ``dtype``."""
    if dtype == "float32":
        return float32_literal(value)
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "-INFINITY" if value < 0 else "INFINITY"
    return repr(float(value))  # shortest round-trip decimal; C reads it back exactly
