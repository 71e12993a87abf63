"""``examples/custom_rule.py``: AdaBelief written in user code runs end to end (compile, verify,
print C, bit-for-bit check against the paper's algorithm, training next to ivy_adam), and its
bit-for-bit check has teeth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_example

import adamgen
from adamgen.spec import sqrt, symbols, unevaluated

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "custom_rule.py"


def test_the_example_runs_end_to_end_in_a_fresh_process():
    pytest.importorskip("sklearn")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "2"], capture_output=True,
                         text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for expected in ("Rule('adabelief')", "IR == spec [adabelief float64 exact]", "0 failed",
                     "adabelief_functional_chunk(", "sqrtf(s_hat)",
                     "all bit-identical", "functional and optimizer bit-identical",
                     "epoch   adabelief loss", "adabelief: final training loss",
                     "ivy_adam: final training loss"):
        assert expected in out, (expected, out[-3000:])
    accuracy = float(out.split("adabelief: final training loss")[1].split("accuracy ")[1]
                     .split("%")[0])
    assert accuracy > 85, out[-1000:]
    assert seconds < 60, seconds


def test_the_bit_check_catches_a_one_rounding_difference():
    """The same rule with one product regrouped, ``lr*(m_hat/d)`` for ``(lr*m_hat)/d``: equal in
    exact arithmetic, different in the last bit: the check must say so."""
    module = load_example("custom_rule")
    spec = module.adabelief()
    outputs = dict(spec.outputs)
    named = dict(spec.names)
    lr, eps = symbols("lr eps")
    with unevaluated():
        outputs["param_new"] = named["decayed"] - lr * (named["m_hat"]
                                                        / (sqrt(named["s_hat"]) + eps))
    rule = adamgen.Rule(spec.replace(name="adabelief_regrouped", outputs=outputs))
    with pytest.raises(AssertionError, match="param"):
        module.check_bits(rule, steps=2, sizes=(1000,), log=lambda line: None)
    assert module.check_bits(adamgen.Rule(spec), steps=2, sizes=(1000,),
                             log=lambda line: None) > 0


def test_the_reference_is_the_papers_first_step():
    """The NumPy transcription's first step from zero state (eps = 0, no decay), in closed form:
    m = (1-beta1) g, the belief g - m = beta1 g, s = (1-beta2) (beta1 g)**2, so m_hat = g,
    s_hat = (beta1 g)**2, and each element moves by -lr*sign(g)/beta1."""
    module = load_example("custom_rule")
    g = np.array([0.5, -2.0, 3.0])
    theta, m, s = module.reference(np.zeros(3), g, np.zeros(3), np.zeros(3), 1, lr=0.1,
                                   beta1=0.9, beta2=0.999, eps=0.0)
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-12)
    np.testing.assert_allclose(s, 0.001 * (0.9 * g) ** 2, rtol=1e-12)
    np.testing.assert_allclose(theta, -0.1 * np.sign(g) / 0.9, rtol=1e-12)
