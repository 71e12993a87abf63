"""C literals: the shortest decimal that every C compiler reads as the constant rounded once."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from adamgen.codegen import build
from adamgen.codegen.c_literals import c_literal, float32_literal

needs_cc = pytest.mark.skipif(not build.probe_compiler().available, reason="no C compiler")


@pytest.mark.parametrize("value", [0.1, 0.09999999999999998, 1e-7, 1.0, 0.999, -2.5, 3.0,
                                   1e-45, 1.5e-39, 3.4028234663852886e38, -0.0, 0.0,
                                   0.0010000000000000009, 16777217.0])
def test_float32_literal_is_the_shortest_decimal_of_the_rounded_value(value):
    text = float32_literal(value)
    assert text.endswith("f") and re.fullmatch(r"-?\d+(\.\d*)?(e[-+]\d+)?f", text), text
    assert np.float32(float(text[:-1])) == np.float32(value) or np.isnan(np.float32(value))
    def significant(text: str) -> int:
        return len(re.sub(r"e.*|[-.]", "", text).strip("0")) or 1

    assert significant(text[:-1]) <= significant(str(np.float32(value)))  # NumPy's shortest


def test_special_literals():
    assert float32_literal(1e300) == "INFINITY" and float32_literal(-1e300) == "-INFINITY"
    assert float32_literal(float("nan")) == "NAN" and c_literal(float("-inf"), "float64")
    assert c_literal(0.09999999999999998, "float64") == "0.09999999999999998"


@needs_cc
def test_the_compiler_reads_every_literal_as_the_rounded_value(tmp_path: Path):
    """Exact rounding is the compiler's too: print each literal's bits from C and compare."""
    rng = np.random.default_rng(7)
    values = list(rng.standard_normal(300) * 10.0 ** rng.integers(-40, 38, 300))
    values += [0.1, 1e-7, 0.999, 0.0010000000000000009, 1.4e-45, 3.4028235677973366e38]
    lines = [f"    {{ float x = {float32_literal(v)}; memcpy(&u, &x, 4); printf(\"%u\\n\", u); }}"
             for v in values]
    source = tmp_path / "literals.c"
    source.write_text("#include <stdio.h>\n#include <string.h>\n#include <math.h>\n"
                      "int main(void) {\n    unsigned u;\n" + "\n".join(lines)
                      + "\n    return 0;\n}\n")
    exe = tmp_path / "literals"
    subprocess.run([*build.probe_compiler().argv, "-std=c99", "-o", str(exe), str(source)],
                   check=True)
    got = [int(x) for x in subprocess.run([str(exe)], check=True, capture_output=True,
                                          text=True).stdout.split()]
    with np.errstate(over="ignore"):
        expected = [int(np.float32(v).view(np.uint32)) for v in values]
    assert got == expected
