"""``adamgen.runtime.validate``: the learning-rate rule (issue 12 item 10) and integers beyond
range (issue 13 D8)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import adamgen
from adamgen.errors import ArgumentTypeError, ArgumentValueError
from adamgen.runtime import validate


@pytest.mark.parametrize("value", [0, 0.0, -0.0, 1e-3, 7, np.float32(0.5), np.int64(2),
                                   np.array(0.25), 1e308])
def test_as_learning_rate_takes_finite_reals_at_or_above_zero(value):
    number = validate.as_learning_rate("lr", value)
    assert type(number) is float and number == float(value)


@pytest.mark.parametrize("value, error, message", [
    (-1e-9, ArgumentValueError, r"lr must be a finite number >= 0, got -1e-09"),
    (math.nan, ArgumentValueError, "got nan"),
    (math.inf, ArgumentValueError, "got inf"),
    (-math.inf, ArgumentValueError, "got -inf"),
    (np.float32("nan"), ArgumentValueError, "got np.float32"),
    ("0.1", ArgumentTypeError, "lr is a str"),
    (False, ArgumentTypeError, "lr is a bool"),
    (10**400, ArgumentValueError, r"lr=10000000\.\.\.\(401 digits\) is beyond the range"),
    (-(10**400), ArgumentValueError, r"lr=-1000000\.\.\.\(401 digits\)"),
    (np.ones(2), ArgumentValueError, r"lr must be a scalar, got an array of shape \(2,\)"),
    (np.array(1 + 2j), ArgumentTypeError, "dtype complex128"),
])
def test_as_learning_rate_names_what_it_refuses(value, error, message):
    with pytest.raises(error, match=message):
        validate.as_learning_rate("lr", value)


def test_shown_abbreviates_only_long_integers():
    assert validate.shown(12345) == "12345"
    assert validate.shown(0.1) == "0.1"
    assert validate.shown(10**30) == "10000000...(31 digits)"


@pytest.mark.parametrize("name", ["w", "dcdw", "mw_tm1", "vw_tm1", "lr"])
@pytest.mark.parametrize("big", [10**400, [10**400] * 3, [1, 2**63, 3]],
                         ids=["int", "list", "just past int64"])
def test_adam_update_names_an_integer_beyond_range(name, big):
    """Issue 13 D8: ``w=[10**400]*3`` gave ``Python int too large to convert to C long``,
    ``lr=10**400`` ``int too large to convert to float``: neither named the argument."""
    x = np.ones(3, np.float32)
    arguments = {"w": x, "dcdw": x, "lr": 0.1, "mw_tm1": x, "vw_tm1": x, name: big}
    with pytest.raises(ArgumentValueError, match=rf"{name}.*(beyond the range|int64)"):
        adamgen.adam_update(arguments["w"], arguments["dcdw"], arguments["lr"],
                            arguments["mw_tm1"], arguments["vw_tm1"], 1)
