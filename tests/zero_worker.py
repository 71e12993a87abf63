"""One rank of the ZeroRedundancyOptimizer tests, and the one-process reference they compare it
with (not a test module).

Run by :func:`zero_launch.run_ranks` as ``python tests/zero_worker.py JOB OUTDIR [CONFIG ...]``
with torch.distributed's ``env://`` variables set. Jobs:

* ``train``: each config trains ``STEPS`` steps under ZeroRedundancyOptimizer; rank 0 saves
  the consolidated state dict (and the parameters, as a training script saves its model) after
  ``CHECKPOINT_AT`` steps and at the end; every rank saves its parameters and what its local
  optimizer holds;
* ``resume``: each config starts from ``train``'s checkpoint in a fresh run (new processes, new
  ZeroRedundancyOptimizer, ``load_state_dict``) and trains the remaining steps;
* ``refuse``: the inputs the local optimizer refuses, each constructed on every rank (the error
  each rank saw is saved), then a run in which one rank's step fails (``FAIL_AT``): that rank
  must end with its error, and the others must end too instead of waiting for it.

:func:`train` is also the one-process reference: the same parameters, gradients and events
with the plain optimizer (``zero=False``). Every rank gets the same seeded gradients (no
all-reduce, whose summation order would change the bits). Ranks run torch (and so adamgen) at
one thread each; the tests run the reference at 1 and 2 threads (the kernels' bits do not
depend on the thread count).
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import adamgen.torch as agt

STEPS = 6
CHECKPOINT_AT = 3
LR_CHANGE_AT = 2  # every group's lr is halved before this step (as a scheduler would)
FAIL_AT = 2
#: per-rank timeout of every collective: a lost peer cannot hold a rank longer than this
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class Config:
    """One training setup: optimizer, hyperparameters, parameters, events."""

    optimizer: str  # a name in OPTIMIZERS
    defaults: dict[str, Any]
    #: per group: its parameters' shapes and its own hyperparameters
    groups: tuple[tuple[tuple[tuple[int, ...], ...], dict[str, Any]], ...]
    bucket_view: bool = False
    dtype: torch.dtype = torch.float32
    #: (parameter index, step) pairs: that parameter has no gradient at that step
    no_grad: tuple[tuple[int, int], ...] = ((1, 1),)
    #: (parameter index, first step, last step): requires_grad=False in between
    frozen: tuple[tuple[int, int, int], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": agt.Adam, "AdamW": agt.AdamW, "Lion": agt.Lion}

#: a big parameter (past the kernels' threading threshold), matrices, vectors, a scalar
_SHAPES_A = ((20000,), (64, 33), (1,))
_SHAPES_B = ((33,), (7, 5), (300,), (2, 3, 4))


def _configs() -> dict[str, Config]:
    found = {}
    for bucket_view in (False, True):
        suffix = "-bucket" if bucket_view else ""
        found[f"adam{suffix}"] = Config(
            "Adam", {"lr": 1e-2, "weight_decay": 1e-2},
            ((_SHAPES_A, {}), (_SHAPES_B, {"lr": 3e-2, "amsgrad": True, "weight_decay": 0.0})),
            bucket_view)
        found[f"adamw{suffix}"] = Config(
            "AdamW", {"lr": 1e-2, "betas": (0.8, 0.99)},
            ((_SHAPES_A, {"weight_decay": 0.1}), (_SHAPES_B, {"weight_decay": 0.0})),
            bucket_view)
        found[f"lion{suffix}"] = Config(
            "Lion", {"lr": 1e-3, "weight_decay": 0.5},
            ((_SHAPES_A, {}), (_SHAPES_B, {"lr": 2e-3, "betas": (0.95, 0.98)})), bucket_view)
    # float64; bucket views rebuilt twice mid-run (ZeRO rebuilds them when a parameter's
    # requires_grad changes, rebinding every parameter's .data after steps were taken)
    found["adamw-float64-refreeze"] = Config(
        "AdamW", {"lr": 1e-2, "amsgrad": True},
        ((_SHAPES_A, {}), (_SHAPES_B, {"weight_decay": 0.0})), True, torch.float64,
        frozen=((0, 2, 3), (4, 1, 4)))
    # more ranks than parameters: a rank whose local optimizer has an empty group
    found["adamw-one-parameter"] = Config(
        "AdamW", {"lr": 1e-2}, ((((50, 3),), {}),), True, no_grad=())
    return found


CONFIGS = _configs()

#: the configs of the main runs (the mixed-precision ones are added when adamgen.torch
#: accepts ``master_weights``: see :func:`mixed_precision_configs`)
MAIN = tuple(CONFIGS)


def mixed_precision_configs() -> dict[str, Config]:
    """bfloat16 parameters with fp32 master weights and state (issue 18), and with stochastic
    rounding: only the modes ``adamgen.torch.AdamW`` accepts (none before issue 18)."""
    accepted = inspect.signature(agt.AdamW).parameters
    found = {}
    if "master_weights" in accepted:
        found["adamw-bf16-master"] = Config(
            "AdamW", {"lr": 1e-2, "master_weights": True},
            ((_SHAPES_A, {}), (_SHAPES_B, {"weight_decay": 0.0})), True, torch.bfloat16)
    if "stochastic_rounding" in accepted:
        found["adamw-bf16-stochastic"] = Config(
            "AdamW", {"lr": 1e-2, "stochastic_rounding": True, "seed": 7},
            ((_SHAPES_A, {}), (_SHAPES_B, {"weight_decay": 0.0})), True, torch.bfloat16)
    return found


CONFIGS.update(mixed_precision_configs())


# -- one training run --------------------------------------------------------------------------
def make_params(config: Config) -> list[torch.Tensor]:
    """The parameters, seeded (the same on every rank and in the reference)."""
    generator = torch.Generator().manual_seed(1234)
    shapes = [shape for shapes, _ in config.groups for shape in shapes]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(config.dtype)
            .requires_grad_() for shape in shapes]


def make_groups(params: list[torch.Tensor], config: Config) -> list[dict[str, Any]]:
    groups, start = [], 0
    for shapes, options in config.groups:
        groups.append({"params": params[start:start + len(shapes)], **options})
        start += len(shapes)
    return groups


def give_grads(params: list[torch.Tensor], step: int, config: Config) -> None:
    """Seeded gradients, the same on every rank; None where the config says so, and for
    frozen parameters."""
    for index, param in enumerate(params):
        generator = torch.Generator().manual_seed(1000 * step + index)
        grad = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        skip = (index, step) in config.no_grad or not param.requires_grad
        param.grad = None if skip else grad.to(config.dtype)


def apply_trainability(params: list[torch.Tensor], step: int, config: Config) -> None:
    frozen = {index for index, first, last in config.frozen if first <= step <= last}
    for index, param in enumerate(params):
        param.requires_grad_(index not in frozen)


def run_steps(optimizer: Any, params: list[torch.Tensor], config: Config, start: int,
              end: int, on_step: Callable[[int], None] | None = None) -> None:
    """Steps ``start``..``end - 1``: trainability, the lr change, gradients, the step."""
    for step in range(start, end):
        apply_trainability(params, step, config)
        if step == LR_CHANGE_AT:
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * 0.5
        give_grads(params, step, config)
        if on_step is not None:
            on_step(step)
        optimizer.step()


def build(config: Config, params: list[torch.Tensor], zero: bool) -> Any:
    cls = OPTIMIZERS[config.optimizer]
    if not zero:
        return cls(make_groups(params, config), **config.defaults)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(make_groups(params, config), optimizer_class=cls,
                                   parameters_as_bucket_view=config.bucket_view,
                                   **config.defaults)


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def train(config: Config, zero: bool, checkpoint: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """Train ``config``; with ``checkpoint`` (``{"params": ..., "optimizer": ...}`` saved after
    ``CHECKPOINT_AT`` steps) continue from it instead.

    Returns the parameters at the end and, for the one-process run or on rank 0, the state
    dict after ``CHECKPOINT_AT`` steps (``train`` only) and at the end; the steps before which
    some parameter had moved to other memory (``param.data = ...``); under ZeRO, what this
    rank's local optimizer holds.
    """
    params = make_params(config)
    pointers = [p.data_ptr() for p in params]
    moves: list[int] = []  # steps before which some parameter had been moved (param.data = ...)

    def moved(step: int) -> None:
        nonlocal pointers
        now = [p.data_ptr() for p in params]
        if now != pointers:
            moves.append(step)
        pointers = now

    start = 0
    if checkpoint is not None:
        with torch.no_grad():  # as model.load_state_dict copies into the parameters
            for param, saved in zip(params, checkpoint["params"]):
                param.copy_(saved)
        start = CHECKPOINT_AT
        apply_trainability(params, start, config)
    optimizer = build(config, params, zero)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    found: dict[str, Any] = {}

    def state_dict() -> dict[str, Any] | None:
        if not zero:
            return optimizer.state_dict()
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if optimizer.rank == 0 else None

    def save(at: str) -> None:
        found[f"optimizer@{at}"] = _copied(state_dict())
        found[f"params@{at}"] = snapshot(params)

    if checkpoint is None:
        run_steps(optimizer, params, config, 0, CHECKPOINT_AT, moved)
        save("checkpoint")
    run_steps(optimizer, params, config, CHECKPOINT_AT, STEPS, moved)
    save("end")
    found["moves"] = moves
    if zero:
        found["local"] = local_holdings(optimizer, params)
    return found


def _copied(value: Any) -> Any:
    """A deep copy of a state dict's tensors (they alias the optimizer's live state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


def local_holdings(zero: Any, params: list[torch.Tensor]) -> dict[str, Any]:
    """What this rank's local optimizer holds: the global indices of its parameters, their
    element count, and the bytes of its state (each storage once: adamgen's state tensors are
    rows of a few flat buffers)."""
    index = {id(p): i for i, p in enumerate(params)}
    owned = [index[id(p)] for group in zero.optim.param_groups for p in group["params"]]
    storages: dict[int, int] = {}
    moments = 0
    for entry in zero.optim.state.values():
        for name, tensor in entry.items():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            if name != "step":
                moments += tensor.numel() * tensor.element_size()
    # what ZeroRedundancyOptimizer's own ``state`` holds besides (after ``load_state_dict``,
    # torch's Optimizer.load_state_dict on the wrapper keeps the loaded tensors there)
    extra: dict[int, int] = {}
    for entry in zero.state.values():
        for tensor in (entry or {}).values():
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in storages:
                    extra[storage.data_ptr()] = storage.nbytes()
    return {"owned": owned, "owned_numel": sum(params[i].numel() for i in owned),
            "state_bytes": sum(storages.values()), "moment_bytes": moments,
            "wrapper_bytes": sum(extra.values())}


# -- jobs ---------------------------------------------------------------------------------------
def job_train(out: Path, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    for name in names:
        found = train(CONFIGS[name], zero=True)
        if rank == 0:
            torch.save({"params": found["params@checkpoint"],
                        "optimizer": found["optimizer@checkpoint"]}, out / f"{name}.ckpt")
        torch.save(found, out / f"{name}.rank{rank}.pt")


def job_resume(out: Path, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    for name in names:
        # what a user does: every rank loads the file rank 0 wrote, weights_only
        checkpoint = torch.load(out / f"{name}.ckpt", weights_only=True)
        found = train(CONFIGS[name], zero=True, checkpoint=checkpoint)
        torch.save(found, out / f"{name}.resumed.rank{rank}.pt")


#: inputs the local optimizer (or ZeroRedundancyOptimizer itself) refuses: name -> (optimizer,
#: parameters, defaults)
REFUSED: dict[str, tuple[str, Callable[[], list[torch.Tensor]], dict[str, Any]]] = {
    "complex parameters": ("AdamW", lambda: [torch.zeros(8, 2, dtype=torch.complex64,
                                                         requires_grad=True) for _ in range(4)],
                           {}),
    "mixed dtypes": ("AdamW", lambda: [torch.zeros(8, requires_grad=True),
                                       torch.zeros(8, dtype=torch.float64, requires_grad=True)],
                     {}),
    "fused=True": ("AdamW", lambda: [torch.zeros(8, requires_grad=True) for _ in range(4)],
                   {"fused": True}),
    "Lion lr=0": ("Lion", lambda: [torch.zeros(8, requires_grad=True) for _ in range(4)],
                  {"lr": 0.0}),
}


def job_refuse(out: Path, names: list[str]) -> None:
    """Each refused input on every rank (errors saved), then a step that fails on one rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank = int(os.environ["RANK"])
    seen: dict[str, str | None] = {}
    for name, (optimizer, make, defaults) in REFUSED.items():
        try:
            ZeroRedundancyOptimizer(make(), optimizer_class=OPTIMIZERS[optimizer], **defaults)
            seen[name] = None
        except Exception as error:  # noqa: BLE001 - the error is the result
            seen[name] = f"{type(error).__name__}: {error}"
    torch.save(seen, out / f"refused.rank{rank}.pt")
    # One rank's step fails: a sparse gradient on a parameter rank 1 owns (as an embedding
    # with sparse=True would give). Rank 0 is then waiting in the parameter broadcast.
    config = CONFIGS["adamw"]
    params = make_params(config)
    zero = build(config, params, zero=True)
    victim = zero.optim.param_groups[0]["params"][0] if rank == 1 else None

    def sparse(step: int) -> None:
        if step == FAIL_AT and victim is not None:
            victim.grad = victim.grad.to_sparse()

    (out / f"started.rank{rank}").write_text(str(os.getpid()))
    run_steps(zero, params, config, 0, STEPS, on_step=sparse)
    (out / f"finished.rank{rank}").write_text("finished")


JOBS = {"train": job_train, "resume": job_resume, "refuse": job_refuse}


def main(argv: list[str]) -> None:
    job, out, names = argv[0], Path(argv[1]), argv[2:]
    torch.set_num_threads(1)  # two ranks on two cores; the bits do not depend on it
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    code = 1
    try:
        JOBS[job](out, names)
        code = 0
    except BaseException:  # noqa: BLE001 - printed; the exit code says it
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
    exit_now(code)


def exit_now(code: int) -> None:
    """End the process without finalising the interpreter (everything is saved and closed).

    torch 2.13's gloo worker threads can still hold the tensors of the last collective when
    the interpreter finalises, even after ``destroy_process_group``; releasing them then needs
    the GIL, which a finalising interpreter no longer hands out, and the process aborts
    ("terminate called without an active exception", SIGABRT, after all its work; seen about
    once in 20 runs here, with torch.optim's optimizers as with adamgen's: pytorch/pytorch
    #190489). ``os._exit`` skips the finaliser.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
