"""Train a small MLP on scikit-learn's bundled handwritten digits with ``adamgen.Adam``.

The forward and backward passes are written by hand in NumPy; gradients go straight into the
optimizer-owned buffers (``opt.grads``), so a step gathers no pointers and copies nothing. The data
set ships inside scikit-learn: nothing is downloaded.

    python examples/train_mlp.py [--epochs 30] [--hidden 128] [--lr 3e-3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import adamgen


def load_data(seed: int) -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install 'adamgen[demo]'")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


class MLP:
    """64 -> hidden -> 10, ReLU, softmax cross-entropy."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, rng: np.random.Generator) -> None:
        self.w1 = (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2 / n_in)).astype(np.float32)
        self.b1 = np.zeros(n_hidden, np.float32)
        self.w2 = (rng.standard_normal((n_hidden, n_out)) * np.sqrt(1 / n_hidden)).astype(
            np.float32)
        self.b2 = np.zeros(n_out, np.float32)

    @property
    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2]

    def logits(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hidden = np.maximum(x @ self.w1 + self.b1, 0)
        return hidden @ self.w2 + self.b2, hidden

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, grads: list[np.ndarray]) -> float:
        """Cross-entropy of the batch; writes d loss / d param into ``grads`` in place."""
        logits, hidden = self.logits(x)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = -np.log(probs[np.arange(len(y)), y] + 1e-12).mean()
        d_logits = probs
        d_logits[np.arange(len(y)), y] -= 1
        d_logits /= len(y)
        g_w1, g_b1, g_w2, g_b2 = grads
        np.matmul(hidden.T, d_logits, out=g_w2)
        np.sum(d_logits, axis=0, out=g_b2)
        d_hidden = d_logits @ self.w2.T
        d_hidden[hidden <= 0] = 0
        np.matmul(x.T, d_hidden, out=g_w1)
        np.sum(d_hidden, axis=0, out=g_b1)
        return float(loss)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.logits(x)[0].argmax(axis=1) == y).mean())


def train(epochs: int = 30, hidden: int = 128, lr: float = 3e-3, batch: int = 64,
          seed: int = 0, log=print) -> float:
    """Train and return the test accuracy."""
    x_train, y_train, x_test, y_test = load_data(seed)
    rng = np.random.default_rng(seed)
    model = MLP(x_train.shape[1], hidden, 10, rng)
    opt = adamgen.Adam(model.params, lr=lr)
    log(f"digits: {len(x_train)} train, {len(x_test)} test; {opt}")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        losses = []
        for first in range(0, len(order), batch):
            rows = order[first:first + batch]
            losses.append(model.loss_and_grads(x_train[rows], y_train[rows], opt.grads))
            opt.step()
        log(f"epoch {epoch:3d}/{epochs}  loss {np.mean(losses):.4f}  "
            f"test accuracy {model.accuracy(x_test, y_test):6.2%}  "
            f"({time.perf_counter() - start:5.1f} s)")
    return model.accuracy(x_test, y_test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    accuracy = train(args.epochs, args.hidden, args.lr, seed=args.seed)
    print(f"final test accuracy: {accuracy:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
