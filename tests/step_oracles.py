"""Every IR body op with an independent oracle: shared by the C and NumPy backend tests.

Each step maps to its float32 value computed without either printer: NumPy's float32 arithmetic
(Python-float constants are weak) or :mod:`adamgen.ieee`'s exact fma, sign, maximum, minimum and
roundings. The inputs carry NaN of both signs, infinities, signed zeros and a subnormal.
"""

from __future__ import annotations

import numpy as np

from adamgen import ieee
from adamgen.codegen.ir import Step

STEP_ORACLES = {  # step -> the float32 value
    Step("t0", "add", ("x", "y")): lambda x, y: x + y,
    Step("t1", "sub", ("x", "y")): lambda x, y: x - y,
    Step("t2", "mul", ("x", "y")): lambda x, y: x * y,
    Step("t3", "div", ("x", "y")): lambda x, y: x / y,
    Step("t4", "neg", ("x",)): lambda x, y: -x,
    Step("t5", "sqrt", ("x",)): lambda x, y: np.sqrt(x),
    Step("t6", "select_ge", ("x", 0, "x", 0)): lambda x, y: np.where(x >= 0, x, 0),
    Step("t7", "sub", ("x", -0.5)): lambda x, y: x - -0.5,
    Step("t8", "add", (-0.5, "x")): lambda x, y: -0.5 + x,
    Step("t9", "mul", ("x", -0.3)): lambda x, y: x * -0.3,
    Step("t10", "div", (-1.0, "x")): lambda x, y: -1.0 / x,
    Step("t11", "sub", (-0.5, "x")): lambda x, y: -0.5 - x,
    Step("t12", "div", ("x", 3)): lambda x, y: x / np.float32(3),
    Step("t13", "add", ("x", "x")): lambda x, y: x + x,
    Step("t14", "select_gt", ("x", 0, "y", 0)): lambda x, y: np.where(x > 0, y, 0),
    Step("t15", "mul", (0.1, "x")): lambda x, y: 0.1 * x,
    Step("t16", "fma", ("x", "y", "x")): lambda x, y: ieee.fma(x, y, x),
    Step("t17", "fma", (0.1, "x", "y")): lambda x, y: ieee.fma(np.float32(0.1), x, y),
    Step("t18", "sign", ("x",)): lambda x, y: ieee.sign(x),
    Step("t19", "maximum", ("x", "y")): lambda x, y: ieee.maximum(x, y),
    Step("t20", "minimum", ("x", "y")): lambda x, y: ieee.minimum(x, y),
    Step("t21", "select_lt", ("x", "y", "y", -2.5)): lambda x, y: np.where(x < y, y, -2.5),
    Step("t22", "select_le", ("x", "y", 1, "x")): lambda x, y: np.where(x <= y, 1, x),
    Step("t23", "select_eq", ("x", "y", "x", "y")): lambda x, y: np.where(x == y, x, y),
    Step("t24", "select_ne", ("x", 0, "y", "x")): lambda x, y: np.where(x != 0, y, x),
    Step("t25", "round_bfloat16", ("x",)): lambda x, y: ieee.round_bfloat16(x),
    Step("t26", "round_float16", ("y",)): lambda x, y: ieee.round_float16(y),
}


def special_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 arrays of ``n`` random values with the special values up front."""
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    x[:6] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0]
    y[3:9] = [np.nan, 0.0, -0.0, np.inf, 1e-45, -1.0]
    return x, y
