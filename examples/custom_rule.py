"""Write your own update rule: AdaBelief, in user code, compiled, verified, checked and trained.

AdaBelief (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
Gradients", NeurIPS 2020, Algorithm 2) replaces Adam's second moment of the gradient by the
second moment of its deviation from the first moment ("the belief"). Nothing in adamgen knows
it: it is one :class:`adamgen.spec.UpdateSpec`, written below, and ``adamgen.Rule(spec)`` gives
it every entry point a built-in rule has. The script:

1. compiles the rule (``adamgen.Rule(spec)``, which checks it) and times its first calls;
2. verifies it: SymPy proves the lowered kernels equal to the spec (exact and fast mode);
3. prints the generated C of one kernel (``rule.code("c", "float32")``);
4. checks it bit for bit against a plain NumPy transcription of the paper's algorithm, in the
   same evaluation order, for several steps, in float32 and float64, through the functional
   form and the in-place optimizer, with each kernel variant forced in turn (NumPy, C, threaded
   C): every exact variant gives the same bits;
5. trains the digits MLP of ``examples/train_mlp.py`` with it, next to ``ivy_adam``.

**What is computed** (Algorithm 2; the projection onto the feasible set is the identity, as
for an unconstrained problem), with decoupled weight decay (as AdamW, and as adabelief-pytorch's
``weight_decouple=True``; the default ``weight_decay=0.0`` multiplies by 1.0, which changes no
bit, so the default *is* the paper's algorithm)::

    theta = theta * (1 - lr*weight_decay)                  decoupled weight decay
    m     = beta1*m + (1 - beta1)*g
    s     = beta2*s + (1 - beta2)*(g - m)**2 + eps         the new m; eps added to s each step
    m_hat = m / (1 - beta1**t)
    s_hat = s / (1 - beta2**t)
    theta = theta - lr*m_hat / (sqrt(s_hat) + eps)

**Evaluation order**, which fixes every bit: each line is evaluated as Python evaluates it
(left to right: ``((beta2*s) + ((1 - beta2)*d*d)) + eps``; ``(lr*m_hat) / (sqrt(s_hat) + eps)``);
expressions of hyperparameters only (``1 - beta1``, ``1 - beta2**t``, ``1 - lr*weight_decay``)
are Python floats computed in double and rounded once to the arrays' dtype where they meet an
array, as NumPy does with a Python float; ``(g - m)**2`` is ``d*d``; ``sqrt`` is the correctly
rounded square root. adabelief-pytorch rounds differently (it computes
``sqrt(s)/sqrt(1 - beta2**t)``, and torch fuses ``addcmul_``): matching it bit for bit would be
another spec, written the same way.

    python examples/custom_rule.py [--epochs 5] [--lr 3e-3] [--full-c]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

import adamgen
from adamgen.spec import (
    Hyperparameter,
    Range,
    Tensor,
    UpdateSpec,
    sqrt,
    symbols,
    unevaluated,
)

DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-16, "weight_decay": 0.0}


def adabelief() -> UpdateSpec:
    """AdaBelief as an :class:`UpdateSpec` (the evaluation order is the module docstring's)."""
    param, grad, m, s = symbols("param grad m s")
    lr, beta1, beta2, eps, weight_decay, t = symbols("lr beta1 beta2 eps weight_decay step")
    with unevaluated():
        decayed = param * (1 - lr * weight_decay)
        m_new = beta1 * m + (1 - beta1) * grad
        belief = grad - m_new
        s_new = beta2 * s + (1 - beta2) * belief**2 + eps
        m_hat = m_new / (1 - beta1**t)
        s_hat = s_new / (1 - beta2**t)
        param_new = decayed - lr * m_hat / (sqrt(s_hat) + eps)
    unit = Range(0.0, 1.0, high_open=True)
    return UpdateSpec(
        "adabelief",
        tensors=[Tensor("param", doc="the parameter"), Tensor("grad", doc="its gradient"),
                 Tensor("m", doc="first moment of the gradient"),
                 Tensor("s", doc="second moment of the gradient's deviation from m")],
        hyperparameters=[
            Hyperparameter("lr", DEFAULTS["lr"], Range(low=0.0, finite=True), doc="step size"),
            Hyperparameter("beta1", DEFAULTS["beta1"], unit, doc="decay of m"),
            Hyperparameter("beta2", DEFAULTS["beta2"], unit, doc="decay of s"),
            Hyperparameter("eps", DEFAULTS["eps"], Range(low=0.0, finite=True),
                           doc="added to s, and to the denominator"),
            Hyperparameter("weight_decay", DEFAULTS["weight_decay"], Range(low=0.0, finite=True),
                           doc="decoupled weight decay (multiplied by lr)"),
            Hyperparameter("step", None, Range(low=1.0, finite=True), kind="step",
                           doc="the step count t, from 1")],
        outputs={"param_new": param_new, "m_new": m_new, "s_new": s_new},
        state={"param_new": "param", "m_new": "m", "s_new": "s"},
        parameter="param", gradient="grad",
        names={"belief": belief, "m_hat": m_hat, "s_hat": s_hat, "decayed": decayed},
        summary="AdaBelief (Zhuang et al. 2020, Algorithm 2), decoupled weight decay")


def reference(param: np.ndarray, grad: np.ndarray, m: np.ndarray, s: np.ndarray, step: int, *,
              lr: float = DEFAULTS["lr"], beta1: float = DEFAULTS["beta1"],
              beta2: float = DEFAULTS["beta2"], eps: float = DEFAULTS["eps"],
              weight_decay: float = DEFAULTS["weight_decay"]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of Algorithm 2 in plain NumPy, written independently of the spec above (Python
    floats for the hyperparameters, as the paper's pseudocode reads)."""
    theta = param * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    s = beta2 * s + (1 - beta2) * (grad - m) ** 2 + eps
    m_hat = m / (1 - beta1**step)
    s_hat = s / (1 - beta2**step)
    theta = theta - lr * m_hat / (np.sqrt(s_hat) + eps)
    return theta, m, s


# --- 4. bit for bit ---------------------------------------------------------------------------

def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bits (so NaN payloads and the sign of zero count)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def available_variants(rule: adamgen.Rule) -> tuple[str, ...]:
    """The kernel variants this machine has: NumPy always, C when a compiler is there."""
    c_kernel = rule.source.c_kernel("float32", frozenset())
    if c_kernel is None:
        return ("numpy",)
    return ("numpy", "c", "c-omp") if c_kernel.openmp else ("numpy", "c")


def forced(variant: str | None) -> None:
    """Force a kernel variant (``ADAMGEN_VARIANT``), or let the loader choose again (None)."""
    if variant is None:
        os.environ.pop("ADAMGEN_VARIANT", None)
    else:
        os.environ["ADAMGEN_VARIANT"] = variant
    adamgen.config.refresh_environment()


def check_bits(rule: adamgen.Rule, steps: int = 5, sizes: tuple[int, ...] = (1000, 40_000),
               log: Callable[[str], None] = print) -> int:
    """Compare ``steps`` steps of the rule with :func:`reference`, bit for bit; return the number
    of comparisons (an AssertionError names the first difference)."""
    hyper = {"lr": 3e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.05}
    compared = 0
    for variant in available_variants(rule):
        forced(variant)
        try:
            for dtype in (np.float32, np.float64):
                rng = np.random.default_rng(0)
                for n in sizes:
                    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
                    start = rng.standard_normal(n).astype(dtype)
                    # the functional form, from zero state
                    p, m, s = start, np.zeros(n, dtype), np.zeros(n, dtype)
                    p_ref, m_ref, s_ref = p, m, s
                    for t, g in enumerate(grads, 1):
                        p, m, s = rule.update(p, g, m, s, step=t, **hyper)
                        p_ref, m_ref, s_ref = reference(p_ref, g, m_ref, s_ref, t, **hyper)
                        for name, got, want in (("param", p, p_ref), ("m", m, m_ref),
                                                ("s", s, s_ref)):
                            assert same_bits(got, want), (variant, dtype, n, t, name)
                            compared += 1
                    # the in-place optimizer, which owns m and s (zeros) and counts the steps
                    param = start.copy()
                    opt = rule.optimizer([param], **hyper)
                    for g in grads:
                        opt.step([g])
                    assert same_bits(param, p), (variant, dtype, n, "optimizer param")
                    assert same_bits(opt.state["m"][0], m) and same_bits(opt.state["s"][0], s)
                    compared += 3
        finally:
            forced(None)
        log(f"  {variant:<6} float32 and float64, N = {', '.join(map(str, sizes))}, {steps} "
            "steps: functional and optimizer bit-identical to the NumPy reference")
    return compared


# --- 5. training --------------------------------------------------------------------------------

def train_mlp_module() -> ModuleType:
    """``examples/train_mlp.py`` (its data, its MLP), imported from beside this file."""
    path = Path(__file__).resolve().with_name("train_mlp.py")
    spec = importlib.util.spec_from_file_location("train_mlp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(rules: dict[str, adamgen.Rule], epochs: int, lr: float, seed: int = 0,
          log: Callable[[str], None] = print) -> dict[str, tuple[float, float]]:
    """Train the same MLP (same initial weights, same batches) with each rule; return each
    rule's final (training loss, test accuracy)."""
    mlp = train_mlp_module()
    x_train, y_train, x_test, y_test = mlp.load_data(seed)
    runs = {}
    for name, rule in rules.items():
        rng = np.random.default_rng(seed)
        model = mlp.MLP(x_train.shape[1], 128, 10, rng)
        runs[name] = (model, rule.optimizer(model.params, lr=lr), rng)
    log(f"digits: {len(x_train)} train, {len(x_test)} test, lr={lr}")
    header = "  ".join(f"{name + ' loss':>15} {'accuracy':>8}" for name in rules)
    log(f"epoch  {header}")
    final = {}
    for epoch in range(1, epochs + 1):
        cells = []
        for name, (model, opt, rng) in runs.items():
            order = rng.permutation(len(x_train))
            losses = []
            for first in range(0, len(order), 64):
                rows = order[first:first + 64]
                losses.append(model.loss_and_grads(x_train[rows], y_train[rows], opt.grads))
                opt.step()
            final[name] = (float(np.mean(losses)), model.accuracy(x_test, y_test))
            cells.append(f"{final[name][0]:15.4f} {final[name][1]:8.2%}")
        log(f"{epoch:5d}  {'  '.join(cells)}")
    return final


# --- the tour -----------------------------------------------------------------------------------

def c_excerpt(source: str) -> str:
    """The header comment and the functional form's loop of a generated C file."""
    header = source[:source.index("*/") + 2]
    start = source.index("/* ---- form functional")
    end = source.index("\n}\n", source.index("_functional_chunk(", start)) + 3
    return f"{header}\n...\n{source[start:end]}..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--full-c", action="store_true", help="print the whole C file")
    args = parser.parse_args(argv)

    print("1. compile: adamgen.Rule(adabelief())")
    start = time.perf_counter()
    rule = adamgen.Rule(adabelief())
    print(f"  {rule!r}: checked in {time.perf_counter() - start:.2f} s; tensors "
          f"{', '.join(rule.interface.tensor_names)}; hyperparameters "
          f"{', '.join(rule.interface.hyperparameter_names)}")
    for dtype in (np.float32, np.float64):
        x = np.ones(1000, dtype)
        start = time.perf_counter()
        rule.update(x, x, x, x, step=1)
        rule.optimizer([x.copy()]).step([x])
        print(f"  first {np.dtype(dtype).name} calls (build or fetch the kernels): "
              f"{time.perf_counter() - start:.2f} s")

    print("\n2. verify: the lowered kernels equal the spec (SymPy)")
    from adamgen.theorems import print_report

    failed = print_report(rule.verify(), verbose=False)

    print("\n3. the generated C (float32, exact)")
    source = rule.code("c", "float32")
    print(source if args.full_c else c_excerpt(source))

    print("\n4. bit for bit against the paper's algorithm in NumPy")
    compared = check_bits(rule)
    print(f"  {compared} arrays compared, all bit-identical")

    print("\n5. training: the digits MLP of examples/train_mlp.py")
    final = train({"adabelief": rule, "ivy_adam": adamgen.rule("ivy_adam")}, args.epochs,
                  args.lr)
    for name, (loss, accuracy) in final.items():
        print(f"{name}: final training loss {loss:.4f}, test accuracy {accuracy:.2%}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
