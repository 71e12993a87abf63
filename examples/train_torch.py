"""Train a torch model on scikit-learn's bundled digits with ``adamgen.torch.AdamW``, next to
``torch.optim.AdamW``.

The model is a residual MLP with 78 parameter tensors; every optimizer gets two param groups
(no weight decay on biases and norms) and a OneCycleLR schedule, and sees the same batches. The
script prints the losses side by side, saves a checkpoint halfway (model, optimizer and
scheduler, with ``torch.save``), reloads it into fresh objects with ``weights_only=True`` and
checks that the reloaded run continues bit for bit, and reports each optimizer's time per
``step()`` and its share of a training iteration (zero_grad, forward, backward, step), also for
``torch.optim.AdamW(fused=True)``.

Two torch columns, because adamgen's contract is torch's arithmetic operation by operation with
a correctly rounded square root, while torch's CPU square root (MKL's) is off by one ulp on some
elements: ``torch.optim.AdamW`` run with an IEEE square root swapped in gives adamgen's losses
and parameters to the last bit; as shipped, its losses agree in the first digits and drift
apart slowly (training amplifies last-bit differences).

    python examples/train_torch.py [--epochs 10] [--width 64] [--depth 12] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import torch
    from torch import nn
except ImportError:
    sys.exit("this example needs torch: pip install 'adamgen[torch]'")

import numpy as np

import adamgen.torch


@contextlib.contextmanager
def ieee_sqrt() -> Iterator[None]:
    """torch's ``Tensor.sqrt`` replaced by NumPy's correctly rounded one inside the block."""
    original = torch.Tensor.sqrt
    torch.Tensor.sqrt = lambda t: torch.from_numpy(np.sqrt(t.detach().numpy()))  # type: ignore
    try:
        yield
    finally:
        torch.Tensor.sqrt = original  # type: ignore[method-assign]


def load_digits(seed: int) -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits as load  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install 'adamgen[demo]'")
    digits = load()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


class Block(nn.Module):
    """x + fc2(relu(fc1(norm(x)))): six parameter tensors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def build(width: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), *(Block(width) for _ in range(depth)),
                         nn.LayerNorm(width), nn.Linear(width, 10))


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as is usual."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]


class Run:
    """One model with its optimizer and schedule."""

    def __init__(self, name: str, optimizer_class: Callable[..., Any], args: argparse.Namespace,
                 steps: int, sqrt: Callable[[], Any] = contextlib.nullcontext,
                 **options: Any) -> None:
        self.name = name
        self.sqrt = sqrt
        self.model = build(args.width, args.depth, args.seed)
        self.optimizer = optimizer_class(groups(self.model), lr=args.lr, **options)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=args.lr,
                                                             total_steps=steps)
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.iteration_seconds: list[float] = []

    def iterate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """zero_grad, forward, backward, step (timed), schedule."""
        start = time.perf_counter()
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        before_step = time.perf_counter()
        with self.sqrt():
            self.optimizer.step()
        end = time.perf_counter()
        self.scheduler.step()
        self.losses.append(loss.item())
        self.step_seconds.append(end - before_step)
        self.iteration_seconds.append(end - start)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return (self.model(x).argmax(1) == y).float().mean().item()

    def share(self) -> float:
        """The optimizer's share of an iteration: median step time / median iteration time."""
        return statistics.median(self.step_seconds) / statistics.median(self.iteration_seconds)


def checkpoint_round_trip(run: Run, args: argparse.Namespace, steps: int, directory: Path) -> Run:
    """Save ``run`` with torch.save, load it into fresh objects (weights_only=True)."""
    path = directory / "checkpoint.pt"
    torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict()}, path)
    fresh = Run("reloaded", adamgen.torch.AdamW, args, steps)
    saved = torch.load(path, weights_only=True)
    fresh.model.load_state_dict(saved["model"])
    fresh.optimizer.load_state_dict(saved["optimizer"])
    fresh.scheduler.load_state_dict(saved["scheduler"])
    return fresh


def train(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    x, y, x_test, y_test = load_digits(args.seed)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)]
    steps = args.epochs * len(batches)
    runs = [Run("adamgen.torch.AdamW", adamgen.torch.AdamW, args, steps),
            Run("torch.optim.AdamW, IEEE sqrt", torch.optim.AdamW, args, steps, ieee_sqrt),
            Run("torch.optim.AdamW", torch.optim.AdamW, args, steps),
            Run("torch.optim.AdamW(fused=True)", torch.optim.AdamW, args, steps, fused=True)]
    tensors = len(list(runs[0].model.parameters()))
    log(f"digits: {len(x)} training images; a residual MLP with {tensors} parameter tensors; "
        f"{steps} steps of batch {args.batch}; torch threads {torch.get_num_threads()}")
    log(f"{'epoch':>5}  {'adamgen':>12}  {'torch, IEEE sqrt':>16}  {'torch':>12}   (mean loss)")
    reloaded = None
    with tempfile.TemporaryDirectory() as directory:
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch))
            for index in order.tolist():
                for run in runs:  # interleaved: the same machine state for each
                    run.iterate(*batches[index])
                if reloaded is not None:
                    reloaded.iterate(*batches[index])
            mean = [statistics.fmean(run.losses[-len(batches):]) for run in runs[:3]]
            log(f"{epoch:5d}  {mean[0]:12.9f}  {mean[1]:16.9f}  {mean[2]:12.9f}")
            if epoch == args.epochs // 2:
                reloaded = checkpoint_round_trip(runs[0], args, steps, Path(directory))
                log("      checkpoint saved and reloaded into a fresh model and optimizer")
    mine, ieee = runs[0].model.parameters(), runs[1].model.parameters()
    identical = all(torch.equal(a, b) for a, b in zip(mine, ieee))
    log(f"parameters bit-identical to torch.optim.AdamW with an IEEE sqrt: {identical}")
    same = reloaded is None or all(
        torch.equal(a, b) for a, b in zip(reloaded.model.parameters(), runs[0].model.parameters()))
    log(f"the reloaded run continued bit for bit: {same}")
    log(f"test accuracy: adamgen {runs[0].accuracy(x_test, y_test):.4f}, "
        f"torch {runs[2].accuracy(x_test, y_test):.4f}")
    log(f"{'optimizer':<30} {'step (median)':>14} {'share of an iteration':>22}")
    for run in (runs[0], *runs[2:]):
        log(f"{run.name:<30} {statistics.median(run.step_seconds) * 1e6:11.1f} us "
            f"{run.share():21.1%}")
    return {"runs": runs, "identical": identical, "reloaded_identical": same,
            "accuracy": runs[0].accuracy(x_test, y_test)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    train(parse())
