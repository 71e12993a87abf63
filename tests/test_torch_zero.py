"""ZeroRedundancyOptimizer (torch.distributed, gloo on loopback) with ``adamgen.torch``'s Adam,
AdamW and Lion as each rank's optimizer: two processes are bit-identical to one.

The tests start the processes themselves (``tests/zero_launch.py``: bounded time, 127.0.0.1
only, a free port, no process left behind) and run ``tests/zero_worker.py`` in them; the
one-process reference is the same training with the plain optimizer, in this process.
Launches are shared by module-scoped fixtures: one ``train`` run (every configuration), one
``resume`` run (a new pair of processes continuing from ``train``'s checkpoints), one
``refuse`` run (refused input, and a rank that fails), and the example under torchrun.

bfloat16 with master weights is bit-identical too; stochastic rounding is not (its keys are
positions in each rank's shard), and a test pins what holds instead (docs/distributed.md).
"""

from __future__ import annotations

import functools
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install torch==2.13.0)")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this build",
                allow_module_level=True)

import zero_worker  # after the skips: it imports adamgen.torch
from zero_launch import REPO, alive, free_port, python, run_program, run_ranks

import adamgen.torch as agt
from adamgen.torch._kernels import rule_kernel, thread_count

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.distributed's own

WORKER = Path(zero_worker.__file__).resolve()
#: one launch normally takes 5-10 s here; the bound only keeps a hang from holding CI
TIMEOUT = 240
MAIN = zero_worker.MAIN
MIXED = tuple(zero_worker.mixed_precision_configs())
WORLD = 2


# -- the runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank run training every configuration; its directory holds the results."""
    out = tmp_path_factory.mktemp("zero-train")
    run_ranks(python(WORKER, "train", out, *MAIN, *MIXED), WORLD, out / "logs",
              timeout=TIMEOUT).check()
    return out


@pytest.fixture(scope="module")
def resumed(trained: Path) -> Path:
    """A new 2-rank run continuing every configuration from ``trained``'s checkpoints."""
    run_ranks(python(WORKER, "resume", trained, *MAIN, *MIXED), WORLD, trained / "logs-resume",
              timeout=TIMEOUT).check()
    return trained


@functools.cache
def reference(name: str, threads: int = 2) -> dict[str, Any]:
    """The one-process run of a configuration, at ``threads`` torch (and adamgen) threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return zero_worker.train(zero_worker.CONFIGS[name], zero=False)
    finally:
        torch.set_num_threads(before)


def ranks(directory: Path, name: str, kind: str = "") -> list[dict[str, Any]]:
    return [torch.load(directory / f"{name}{kind}.rank{rank}.pt", weights_only=False)
            for rank in range(WORLD)]


def assert_identical(actual: Any, expected: Any, where: str = "") -> None:
    """Same structure, same values, tensors ``torch.equal`` with the same dtype and shape."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}"
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (
            f"{where}: {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} "
            f"{tuple(expected.shape)}")
        if not torch.equal(actual, expected):
            differ = (actual != expected).flatten().nonzero().flatten()
            raise AssertionError(f"{where}: {differ.numel()} of {expected.numel()} elements "
                                 f"differ, first at flat index {differ[:5].tolist()}")
    elif isinstance(expected, dict):
        assert sorted(map(str, actual)) == sorted(map(str, expected)), (
            f"{where}: keys {sorted(map(str, actual))}, expected {sorted(map(str, expected))}")
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r}, expected {expected!r}"


def assert_same_state_dict(actual: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """The consolidated state dict equals the one-process optimizer's: every state tensor (step
    counts included), every group's hyperparameters and parameter indices."""
    assert_identical(actual["state"], expected["state"], f"{where} state")
    assert len(actual["param_groups"]) == len(expected["param_groups"])
    for index, (mine, theirs) in enumerate(zip(actual["param_groups"], expected["param_groups"])):
        assert_identical(mine, theirs, f"{where} param_groups[{index}]")


def check_against_one_process(directory: Path, name: str, kind: str) -> None:
    expected = reference(name)
    found = ranks(directory, name, kind)
    for rank, result in enumerate(found):
        assert_identical(result["params@end"], expected["params@end"], f"rank {rank} params")
    assert_same_state_dict(found[0]["optimizer@end"], expected["optimizer@end"], "rank 0")
    if not kind:
        assert_same_state_dict(found[0]["optimizer@checkpoint"],
                               expected["optimizer@checkpoint"], "checkpoint")
    assert found[1]["optimizer@end"] is None  # consolidated on rank 0 only


# -- bit-identity -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MAIN)
def test_two_ranks_are_bit_identical_to_one_process(trained: Path, name: str) -> None:
    """Parameters on every rank after the steps, and m, v (and max_exp_avg_sq, step) after
    ``consolidate_state_dict``, equal the one-process optimizer's, bit for bit."""
    check_against_one_process(trained, name, "")


@pytest.mark.parametrize("name", MAIN)
def test_a_checkpoint_continues_bit_for_bit_in_a_new_run(resumed: Path, name: str) -> None:
    """``consolidate_state_dict`` + ``state_dict()`` on rank 0, ``torch.save``; new processes
    ``torch.load(weights_only=True)`` it and ``load_state_dict`` (ZeroRedundancyOptimizer
    writes ``optim.state[param]`` directly): they end where an uninterrupted process ends."""
    check_against_one_process(resumed, name, ".resumed")


def test_a_loaded_checkpoint_is_held_once(resumed: Path) -> None:
    """After ``load_state_dict``, ZeroRedundancyOptimizer's own ``state`` (filled by torch's
    ``Optimizer.load_state_dict`` on the wrapper) holds the very tensors it placed in the local
    optimizer. adamgen copies them into its own buffers, and must not leave the wrapper holding
    the old ones: each rank would then keep its shard twice, as much as one unsharded
    process."""
    for name in MAIN:
        for rank, result in enumerate(ranks(resumed, name, ".resumed")):
            assert result["local"]["wrapper_bytes"] == 0, (name, rank, result["local"])


def test_the_reference_does_not_depend_on_the_thread_count() -> None:
    """The ranks run one thread each, the reference two: its big parameter group is past the
    kernels' threading threshold, so it really ran threaded, with the same bits."""
    config = zero_worker.CONFIGS["adamw"]
    big = sum(torch.Size(shape).numel() for shape in config.groups[0][0])
    kernel = rule_kernel("torch_adamw", (("amsgrad", False), ("maximize", False),
                                         ("lr_dtype", "float64")), "float32")
    # (torch's current thread count does not matter: an earlier test may have set it to 1,
    # and this test sets 2 itself)
    if kernel.threshold == 0 or (os.cpu_count() or 1) < 2:
        pytest.skip("no threaded kernel here (no OpenMP, or one CPU)")
    assert big >= kernel.threshold
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert thread_count() == 2
    finally:
        torch.set_num_threads(before)
    for name in ("adamw", "lion-bucket"):
        assert_identical(reference(name, threads=1), reference(name, threads=2), name)


def test_the_state_is_sharded(trained: Path) -> None:
    """Each rank holds the state of its own parameters only, and together exactly the
    one-process optimizer's (measured on the local optimizers' state tensors)."""
    for name in MAIN:
        found = [result["local"] for result in ranks(trained, name)]
        owned = sorted(i for holding in found for i in holding["owned"])
        count = len(zero_worker.make_params(zero_worker.CONFIGS[name]))
        assert owned == list(range(count)), (name, owned)  # a partition of the parameters
        expected = reference(name)["optimizer@end"]["state"]
        moments = {index: sum(t.numel() * t.element_size() for key, t in entry.items()
                              if key != "step") for index, entry in expected.items()}
        for rank, holding in enumerate(found):
            assert holding["moment_bytes"] == sum(moments.get(i, 0) for i in holding["owned"]), (
                name, rank)
            assert 0 < holding["moment_bytes"] < sum(moments.values()) or name.endswith(
                "one-parameter")
    one = [result["local"] for result in ranks(trained, "adamw-one-parameter")]
    assert one[1] == {"owned": [], "owned_numel": 0, "state_bytes": 0, "moment_bytes": 0,
                      "wrapper_bytes": 0}


def test_bucket_views_rebound_after_steps_are_followed(trained: Path) -> None:
    """With ``parameters_as_bucket_view=True`` every parameter is a view of a bucket, and
    when a parameter's ``requires_grad`` changes ZeroRedundancyOptimizer rebuilds the buckets
    and rebinds every ``param.data`` (after steps were taken): the configuration that does
    this mid-run really moved its parameters, and stayed bit-identical (tested above)."""
    found = ranks(trained, "adamw-float64-refreeze")
    for result in found:
        assert [step for step in result["moves"] if step > 0], result["moves"]
    for result in ranks(trained, "adamw-bucket"):
        assert result["moves"] == [0], "the buckets are built with the optimizer, before step 0"
    for result in ranks(trained, "adamw"):
        assert result["moves"] == [], "without bucket views nothing moves"


# -- mixed precision (issue 18) -----------------------------------------------------------------
MASTER_MODES = [name for name in MIXED if name.endswith("-master")]
STOCHASTIC_MODES = [name for name in MIXED if name.endswith("-stochastic")]


@pytest.mark.skipif(not MASTER_MODES, reason="adamgen.torch.AdamW has no master_weights")
@pytest.mark.parametrize("name", MASTER_MODES or ["none"])
def test_master_weights_two_ranks_equal_one_process(trained: Path, resumed: Path,
                                                    name: str) -> None:
    """bfloat16 parameters with float32 master weights and state: the same promises as
    float32 (parameters, consolidated state with ``master_param``, checkpoint continuation).
    Rounding to nearest even draws nothing, so nothing depends on the partition."""
    check_against_one_process(trained, name, "")
    check_against_one_process(resumed, name, ".resumed")


@pytest.mark.skipif(not STOCHASTIC_MODES, reason="adamgen.torch.AdamW has no stochastic_rounding")
@pytest.mark.parametrize("name", STOCHASTIC_MODES or ["none"])
def test_stochastic_rounding_depends_on_the_partition(trained: Path, resumed: Path,
                                                      name: str) -> None:
    """Stochastic rounding is *not* bit-identical to one process under ZeRO, and this test
    pins why (docs/distributed.md): each parameter's key in the random stream is the CRC-32 of
    its name or else its position in the optimizer's groups. ZeroRedundancyOptimizer refuses
    named parameters and hands each rank's optimizer a subset of every group, sorted by size,
    so the positions (the keys) are the shard's, not the model's. What does hold: the run is
    deterministic, every rank ends with the same parameters, and a checkpoint taken on 2
    ranks continues on 2 new ranks bit for bit as the uninterrupted 2-rank run."""
    expected = reference(name)
    found, continued = ranks(trained, name), ranks(resumed, name, ".resumed")
    assert not all(torch.equal(a, e) for a, e in zip(found[0]["params@end"],
                                                     expected["params@end"])), (
        "2 ranks now equal 1 process with stochastic rounding: the keys no longer depend on "
        "the partition; make this a bit-identity test and update docs/distributed.md")
    for rank in range(WORLD):
        assert_identical(found[rank]["params@end"], found[0]["params@end"], f"rank {rank}")
        assert_identical(continued[rank]["params@end"], found[0]["params@end"],
                         f"resumed rank {rank}")
    assert_same_state_dict(continued[0]["optimizer@end"], found[0]["optimizer@end"], "resumed")


# -- refused input and failing ranks ------------------------------------------------------------
@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("zero-refuse")
    run = run_ranks(python(WORKER, "refuse", out), WORLD, out / "logs", timeout=TIMEOUT,
                    grace=60)
    return out, run


#: what every rank must say for each refused input
REFUSALS = {
    "complex parameters": r"TypeError: parameter 0 of group 0 is a complex64 tensor; "
                          r"adamgen.torch updates float32, float64, bfloat16 and float16 parameters",
    "mixed dtypes": r"ValueError: ZeroRedundancyOptimizer only supports using the same dense "
                    r"type for all parameters but got both torch.FloatTensor and "
                    r"torch.DoubleTensor",
    "fused=True": r"NotImplementedError: adamgen.torch.AdamW does not implement fused=True",
    "Lion lr=0": r"ValueError: Invalid learning rate: 0.0",
}


def test_refused_input_is_a_clear_error_on_every_rank(refused: tuple[Path, Any]) -> None:
    out, _ = refused
    seen = [torch.load(out / f"refused.rank{rank}.pt") for rank in range(WORLD)]
    assert set(seen[0]) == set(REFUSALS)
    for name, pattern in REFUSALS.items():
        for rank in range(WORLD):
            assert seen[rank][name] is not None, f"rank {rank} accepted {name}"
            assert re.match(pattern, seen[rank][name]), (rank, name, seen[rank][name])


def test_a_rank_that_fails_ends_the_run_with_its_error(refused: tuple[Path, Any]) -> None:
    """Rank 1's step fails (a sparse gradient on a parameter it owns) while rank 0 waits for
    its broadcast: rank 1 ends with its error, and rank 0 ends by itself (gloo: the peer closed
    or reset the connection) instead of waiting; nobody had to be killed, nothing is left running."""
    out, run = refused
    zero, one = run.ended
    assert one.returncode != 0 and not one.killed, run.report()
    assert "Adam does not support sparse gradients" in one.stderr, run.report()
    assert zero.returncode != 0 and not zero.killed, run.report()
    # gloo's words for a peer that is gone: "closed" when it shut the connection cleanly,
    # "reset" when it exited with data still unread on its side (both seen here)
    assert re.search(r"Connection (closed|reset) by peer", zero.stderr), run.report()
    for rank in range(WORLD):
        assert (out / f"started.rank{rank}").exists()
        assert not (out / f"finished.rank{rank}").exists()
    assert not [pid for pid in run.pids if alive(pid)]


# -- the launcher itself ------------------------------------------------------------------------
HANGING = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=os.environ["RANK"] == "1")
    print(child.pid, flush=True)
    if os.environ["RANK"] == "1" and "fail" in sys.argv:
        sys.exit("rank 1 fails")
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["timeout", "fail"])
def test_the_launcher_leaves_no_process_behind(tmp_path: Path, how: str) -> None:
    """A run that hangs is killed at its timeout; when a rank fails, the ranks that do not
    end by themselves are killed after the grace period; either way with their children, even
    one that started a session of its own."""
    script = tmp_path / "hang.py"
    script.write_text(HANGING)
    run = run_ranks(python(script, how), WORLD, tmp_path / "logs", timeout=20 if how == "fail"
                    else 3, grace=1)
    children = [int(e.stdout.split()[0]) for e in run.ended if e.stdout.strip()]
    assert len(children) == WORLD, run.report()
    if how == "timeout":
        assert run.timed_out and all(e.killed for e in run.ended), run.report()
    else:
        assert not run.timed_out, run.report()
        assert run.ended[1].returncode == 1 and not run.ended[1].killed
        assert "rank 1 fails" in run.ended[1].stderr
        assert run.ended[0].killed
    assert not [pid for pid in [*run.pids, *children] if alive(pid)], run.report()


def test_free_ports_are_on_loopback() -> None:
    import socket

    port = free_port()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # still free


# -- the example --------------------------------------------------------------------------------
def test_the_example_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 examples/zero_gloo.py`` (as ``python -m
    torch.distributed.run``, the same program): sharded training with a checkpoint round
    trip, bit-identical to one process, each rank holding part of the state."""
    example = REPO / "examples" / "zero_gloo.py"
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    argv = python("-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  example, "--epochs", "2", "--depth", "3")
    run = run_program(argv, tmp_path / "logs", timeout=TIMEOUT).check()
    out = run.ended[0].stdout
    assert "losses bit-identical to one process: True" in out, run.report()
    assert "parameters bit-identical to one process: True" in out, run.report()
    assert "checkpoint saved by rank 0" in out, run.report()
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+(\d+)\s+\d+ us", out, re.MULTILINE)
    single = re.search(r"one process: (\d+) parameters, (\d+) state bytes", out)
    assert len(rows) == WORLD and single, run.report()
    assert sum(int(n) for _, n, _ in rows) == int(single.group(1))
    assert sum(int(held) for _, _, held in rows) == int(single.group(2))  # split, not copied
    for _, _, held in rows:
        assert 0 < int(held) < int(single.group(2))
    assert not [pid for pid in run.pids if alive(pid)]


# -- state placed from outside, as ZeroRedundancyOptimizer places it -----------------------------
def _stepped(cls: Any, params: list[Any], steps: int = 2, seed: int = 0) -> Any:
    optimizer = cls(params, lr=0.01)
    for step in range(steps):
        generator = torch.Generator().manual_seed(seed + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("cls", [agt.AdamW, agt.Lion])
def test_placed_state_tensors_become_views_of_the_live_state(cls: Any) -> None:
    """Tensors placed in ``optimizer.state`` (ZeroRedundancyOptimizer's ``load_state_dict``
    places a checkpoint's and keeps them in its own ``state`` too) are copied into the
    optimizer's buffers and then rebound to them: whoever holds them sees the live state, as
    torch's optimizers update a placed tensor in place, and no memory is held twice."""
    params = [torch.randn(300, requires_grad=True), torch.randn(7, 5, requires_grad=True)]
    source = _stepped(cls, [p.detach().clone().requires_grad_() for p in params])
    saved = source.state_dict()["state"]
    placed = {i: {k: v.clone() for k, v in saved[i].items()} for i in saved}
    optimizer = cls(params, lr=0.01)
    for index, param in enumerate(params):
        optimizer.state[param] = dict(placed[index])
    _stepped_more(optimizer, params)
    for index, param in enumerate(params):
        for key, tensor in placed[index].items():
            live = optimizer.state[param][key]
            assert tensor.data_ptr() == live.data_ptr(), (index, key)
            assert torch.equal(tensor, live)


def _stepped_more(optimizer: Any, params: list[Any]) -> None:
    for step in range(2):
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_another_optimizers_live_state_is_copied_not_rebound() -> None:
    """State placed from another adamgen optimizer's live buffers (one process, no
    checkpoint file in between) is only copied: the source keeps its own state."""
    params_a = [torch.randn(300, requires_grad=True)]
    params_b = [params_a[0].detach().clone().requires_grad_()]
    a, b = _stepped(agt.AdamW, params_a), agt.AdamW(params_b, lr=0.01)
    b.state[params_b[0]] = dict(a.state[params_a[0]])  # a's own views
    before = {key: (t.data_ptr(), t.clone()) for key, t in a.state[params_a[0]].items()}
    _stepped_more(b, params_b)
    for key, (pointer, value) in before.items():
        assert a.state[params_a[0]][key].data_ptr() == pointer
        assert torch.equal(a.state[params_a[0]][key], value), key  # b's steps did not reach it
    assert b.state[params_b[0]]["exp_avg"].data_ptr() != before["exp_avg"][0]


def test_the_drop_ins_are_what_zero_constructs() -> None:
    """ZeroRedundancyOptimizer builds each rank's optimizer as ``optimizer_class(groups,
    **defaults)``: the drop-ins accept a list of group dicts, including an empty group (a rank
    with no parameters)."""
    classes: tuple[Any, ...] = (agt.AdamW, agt.Adam, agt.Lion)
    for cls in classes:
        optimizer = cls([{"params": []}], lr=0.1)
        optimizer.step()
