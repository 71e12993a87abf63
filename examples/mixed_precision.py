"""Train one model with bfloat16 parameters in adamgen.torch's three mixed-precision modes, next
to float32, and plot the loss curves (docs/mixed-precision.png).

The model and data are ``examples/train_torch.py``'s (a residual MLP with 78 parameter tensors on
scikit-learn's digits, two param groups, weight decay on matrices). Every run starts from the
same float32 initialisation (rounded to bfloat16 for the bfloat16 runs) and sees the same
batches; the bfloat16 runs compute their forward and backward passes in bfloat16 (the loss in
float32):

* ``float32``: ``adamgen.torch.AdamW`` on float32 parameters;
* ``bf16, torch-compatible``: the default mode, bfloat16 state and torch's rounding: bit for
  bit ``torch.optim.AdamW`` on the same bfloat16 model (checked at the end);
* ``bf16, master weights``: ``master_weights=True``, a float32 master copy and float32 state;
* ``bf16, stochastic rounding``: ``stochastic_rounding=True``, the same with the parameter
  rounded stochastically.

    python examples/mixed_precision.py [--epochs 40] [--lr 1e-3] [--plot docs/mixed-precision.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

try:
    import torch
    from torch import nn
except ImportError:
    sys.exit("this example needs torch: pip install 'adamgen[torch]'")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_torch import build, groups, load_digits

import adamgen.torch

RUNS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": torch.float32},
    "bf16, torch-compatible (= torch.optim.AdamW)": {"dtype": torch.bfloat16},
    "bf16, master weights": {"dtype": torch.bfloat16, "master_weights": True},
    "bf16, stochastic rounding": {"dtype": torch.bfloat16, "stochastic_rounding": True},
}


class Run:
    """One model, its optimizer and schedule, and its losses."""

    def __init__(self, name: str, args: argparse.Namespace, steps: int, *,
                 dtype: torch.dtype, optimizer_class: Any = None, **options: Any) -> None:
        self.name, self.dtype = name, dtype
        self.model = build(args.width, args.depth, args.seed).to(dtype)
        optimizer_class = optimizer_class or adamgen.torch.AdamW
        self.optimizer = optimizer_class(groups(self.model), lr=args.lr, **options)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, steps)
        self.losses: list[float] = []

    def iterate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x.to(self.dtype)).float(), y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(loss.item())

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(loss, accuracy) on ``x``, ``y``."""
        with torch.no_grad():
            logits = self.model(x.to(self.dtype)).float()
            return (nn.functional.cross_entropy(logits, y).item(),
                    (logits.argmax(1) == y).float().mean().item())


def train(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    x, y, x_test, y_test = load_digits(args.seed)
    batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(x), args.batch)]
    steps = args.epochs * len(batches)
    runs = [Run(name, args, steps, **options) for name, options in RUNS.items()]
    torch_run = Run("torch.optim.AdamW, bf16", args, steps, dtype=torch.bfloat16,
                    optimizer_class=torch.optim.AdamW, foreach=False)
    log(f"digits: {len(x)} training images, {steps} steps of batch {args.batch}, lr {args.lr} "
        "with cosine annealing")
    log(f"{'epoch':>5}  " + "  ".join(f"{run.name[:24]:>24}" for run in runs) + "   (mean loss)")
    curves: dict[str, list[float]] = {run.name: [] for run in runs}
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch))
        for index in order.tolist():
            for run in (*runs, torch_run):
                run.iterate(*batches[index])
        for run in runs:
            curves[run.name].append(statistics.fmean(run.losses[-len(batches):]))
        if epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs:
            log(f"{epoch:5d}  " + "  ".join(f"{curves[run.name][-1]:24.6f}" for run in runs))
    identical = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in
                    zip(runs[1].model.parameters(), torch_run.model.parameters()))
    log(f"bf16 torch-compatible parameters bit-identical to torch.optim.AdamW's: {identical}")
    tests = {run.name: run.evaluate(x_test, y_test) for run in runs}
    for name, (loss, accuracy) in tests.items():
        log(f"  {name:<46} test loss {loss:.4f}, accuracy {accuracy:.4f}")
    return {"curves": curves, "tests": tests, "identical": identical, "batches": len(batches)}


def plot(found: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8), dpi=110)
    styles = {"float32": ("black", "-"), "torch-compatible": ("tab:red", "-"),
              "master": ("tab:blue", "--"), "stochastic": ("tab:green", ":")}
    for name, curve in found["curves"].items():
        color, line = next(v for k, v in styles.items() if k in name)
        _loss, accuracy = found["tests"][name]
        axis.plot(range(1, len(curve) + 1), curve, color=color, linestyle=line, linewidth=1.8,
                  label=f"{name}: test accuracy {accuracy:.3f}")
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss (mean over the epoch)")
    axis.set_title(f"AdamW on bfloat16 parameters, digits MLP (78 tensors), lr {args.lr}, "
                   "cosine", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write the figure here (PNG)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    torch.set_num_threads(1)
    result = train(arguments)
    if arguments.plot:
        plot(result, arguments.plot, arguments)
    sys.exit(0 if result["identical"] else 1)
