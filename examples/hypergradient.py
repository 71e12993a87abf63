"""Tune Adam's learning rate by gradient descent on lr, through K unrolled Adam steps.

The problem is least squares, ``f(w) = ||A w - b||**2 / (2 m)``. For a learning rate ``lr``, run
K Adam steps from a fixed ``w0`` (``adamgen.adam_update``) and score ``L(lr) = f(w_K)``. The
hypergradient ``dL/dlr`` comes from reverse mode through the K updates with
``adam_update_vjp``: the cotangent of ``w_K`` is ``grad f(w_K)``; each step pulls
``(d_w, d_m, d_v)`` back and adds its ``d_lr``; since the gradient fed to step k is
``grad f(w_k) = H w_k - A^T b / m`` with ``H = A^T A / m``, the cotangent reaching the step's
``dcdw`` flows on to ``w_k`` as ``H d_dcdw``. The outer loop descends on ``log(lr)``.

Before tuning, the hypergradient is compared with a central finite difference of ``L``.

    python examples/hypergradient.py [--steps 20] [--outer 15] [--lr 1e-3] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import adamgen
from adamgen import adam_update_vjp


class LeastSquares:
    """``f(w) = ||A w - b||**2 / (2 m)`` with its gradient and (constant) Hessian."""

    def __init__(self, m: int, n: int, rng: np.random.Generator) -> None:
        self.a = rng.standard_normal((m, n)) / math.sqrt(n)
        self.b = self.a @ rng.standard_normal(n) + 0.1 * rng.standard_normal(m)
        self.hessian = self.a.T @ self.a / m

    def loss(self, w: np.ndarray) -> float:
        residual = self.a @ w - self.b
        return float(residual @ residual) / (2 * len(self.b))

    def grad(self, w: np.ndarray) -> np.ndarray:
        return self.a.T @ (self.a @ w - self.b) / len(self.b)


def unrolled(problem: LeastSquares, w0: np.ndarray, lr: float, steps: int,
             tape: list | None = None) -> np.ndarray:
    """``w_K`` after ``steps`` Adam steps from ``w0``; with ``tape``, record each step's inputs."""
    w, m, v = w0, np.zeros_like(w0), np.zeros_like(w0)
    for k in range(1, steps + 1):
        g = problem.grad(w)
        if tape is not None:
            tape.append((w, g, m, v, k))
        w, m, v = adamgen.adam_update(w, g, lr, m, v, k)
    return w


def unrolled_loss(problem: LeastSquares, w0: np.ndarray, lr: float, steps: int) -> float:
    """``L(lr) = f(w_K)``."""
    return problem.loss(unrolled(problem, w0, lr, steps))


def hypergradient(problem: LeastSquares, w0: np.ndarray, lr: float,
                  steps: int) -> tuple[float, float]:
    """``(L(lr), dL/dlr)`` by reverse mode through the unrolled steps with the VJP kernels."""
    tape: list = []
    w_final = unrolled(problem, w0, lr, steps, tape)
    d_w, d_m, d_v = problem.grad(w_final), np.zeros_like(w0), np.zeros_like(w0)
    d_lr = 0.0
    for w, g, m, v, k in reversed(tape):
        d_w_prev, d_g, d_lr_k, d_m, d_v = adam_update_vjp(w, g, lr, m, v, k, (d_w, d_m, d_v))
        d_w = d_w_prev + problem.hessian @ d_g  # g = grad f(w): its cotangent reaches w
        d_lr += float(d_lr_k)
    return problem.loss(w_final), d_lr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="unrolled Adam steps K")
    parser.add_argument("--outer", type=int, default=15, help="outer iterations on lr")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    parser.add_argument("--meta-lr", type=float, default=5.0,
                        help="step on log(lr) per unit of d log L / d log lr")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    problem = LeastSquares(200, 20, rng)
    w0 = rng.standard_normal(20)

    lr = args.lr
    loss, grad = hypergradient(problem, w0, lr, args.steps)
    h = 1e-5 * lr
    finite = (unrolled_loss(problem, w0, lr + h, args.steps)
              - unrolled_loss(problem, w0, lr - h, args.steps)) / (2 * h)
    relative = abs(grad - finite) / abs(finite)
    print(f"K = {args.steps} unrolled steps, L(lr={lr:g}) = {loss:.6g}")
    print(f"dL/dlr: VJP {grad:.10g}, central difference {finite:.10g}, relative gap "
          f"{relative:.1e}")

    print(f"{'iter':>4}  {'lr':>10}  {'L(lr)':>12}  {'dL/dlr':>12}  {'dlogL/dloglr':>12}")
    meta_lr = args.meta_lr
    for iteration in range(args.outer):
        loss, grad = hypergradient(problem, w0, lr, args.steps)
        slope = lr * grad / loss  # d log L / d log lr: scale-free
        print(f"{iteration:>4}  {lr:>10.4g}  {loss:>12.6g}  {grad:>12.4g}  {slope:>12.4g}")
        # gradient descent on log(lr), the step capped at a factor e, halved on overshoot
        candidate = lr * math.exp(-max(-1.0, min(1.0, meta_lr * slope)))
        if unrolled_loss(problem, w0, candidate, args.steps) < loss:
            lr = candidate
        else:
            meta_lr /= 2
    loss = unrolled_loss(problem, w0, lr, args.steps)
    print(f"tuned lr = {lr:.4g}, L = {loss:.6g} (from L = "
          f"{unrolled_loss(problem, w0, args.lr, args.steps):.6g} at lr = {args.lr:g})")
    return 0 if relative < 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
