"""Start the processes of a torch.distributed run on loopback, bounded in time, and leave none
behind (not a test module).

Two entry points:

* :func:`run_ranks` starts ``world_size`` copies of one program itself, as ``torchrun`` would
  (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
  ``MASTER_PORT``, ``GLOO_SOCKET_IFNAME=lo``);
* :func:`run_program` starts one program that starts its own workers (``python -m
  torch.distributed.run``, i.e. ``torchrun``).

What they promise, whatever the programs do:

* **Bounded time.** Past ``timeout`` every process still running is killed and the result says
  so (``timed_out``); a test then fails with each rank's output instead of hanging CI.
* **A failed rank ends the run.** Once one rank has exited with an error, the others get
  ``grace`` seconds to end by themselves (gloo raises "Connection closed by peer", or "reset
  by peer", on a rank waiting for a dead one, within a second here); whoever is left is killed
  and marked ``killed``, so a test can tell "ended with its own error" from "had to be killed".
* **No orphans.** Each rank runs in a session of its own, so killing its process group takes
  its children too; descendants that left the group (``torchrun`` starts each worker in a new
  session) are found through ``/proc`` before anything is killed, and killed as well. Every
  process of a run carries a token in its environment (:data:`TOKEN`, inherited by whatever it
  starts): when the run ends, any process still carrying it (a child that outlived a rank that
  exited by itself, in a session of its own) is killed too.
* **Loopback only, a free port**: :func:`free_port` asks the kernel for one on 127.0.0.1. The
  port is free when asked, not reserved: a run whose store lost the race ("address already in
  use") is started once more on another port.

Output goes to files, not pipes (a chatty rank could fill a pipe and block while the launcher
waits for another one), and ``TMPDIR`` points into the run's directory (torchrun keeps its logs
in a ``torchelastic_*`` directory there).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: stderr text of a rank whose TCP store could not bind its port (another process took it)
PORT_TAKEN = ("address already in use", "EADDRINUSE", "errno: 98")
#: the environment variable marking every process of one run
TOKEN = "ZERO_LAUNCH_TOKEN"


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def environment(**extra: str) -> dict[str, str]:
    """This process's environment (adamgen's cache directory included, as tests/conftest.py
    set it), gloo on the loopback interface, this checkout on ``PYTHONPATH``, and a fresh
    :data:`TOKEN`."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p),
            TOKEN: uuid.uuid4().hex, **extra}


def loopback_environment(port: int, world_size: int, **extra: str) -> dict[str, str]:
    """:func:`environment` plus what torch.distributed's ``env://`` needs, on loopback."""
    return environment(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port),
                       WORLD_SIZE=str(world_size), **extra)


@dataclass
class Ended:
    """How one process ended."""

    rank: int
    pid: int
    returncode: int
    stdout: str
    stderr: str
    #: True when the launcher had to kill it (a timeout, or it outlived a failed rank)
    killed: bool = False


@dataclass
class Run:
    """A finished run: every process, in rank order, and the wall time."""

    ended: list[Ended]
    seconds: float
    timed_out: bool = False
    pids: list[int] = field(default_factory=list)  # every process seen, descendants too

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(e.returncode == 0 for e in self.ended)

    def report(self) -> str:
        """Each process's exit and the tail of its output, for an assertion message."""
        lines = [f"run of {len(self.ended)} process(es), {self.seconds:.1f} s"
                 + (", TIMED OUT" if self.timed_out else "")]
        for e in self.ended:
            lines.append(f"--- rank {e.rank} (pid {e.pid}): exit {e.returncode}"
                         + (" (killed by the launcher)" if e.killed else ""))
            lines.append(e.stdout[-2000:])
            lines.append(e.stderr[-4000:])
        return "\n".join(lines)

    def check(self) -> Run:
        assert self.ok, self.report()
        return self


# -- processes -------------------------------------------------------------------------------------
def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    found = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, however many sessions it crossed."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def tagged(token: str) -> list[int]:
    """Every process whose environment carries ``TOKEN=token`` (Linux /proc)."""
    marker = f"{TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie awaiting its reaper does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _signal(pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def kill_tree(process: subprocess.Popen, polite: float = 0.0) -> list[int]:
    """End ``process`` (started with ``start_new_session=True``), its process group and every
    descendant; SIGTERM first when ``polite`` > 0 (``torchrun`` then stops its workers
    itself), SIGKILL for whatever is left. Returns every pid it saw."""
    seen = [process.pid, *descendants(process.pid)]
    if process.poll() is None and polite > 0:
        _signal(process.pid, signal.SIGTERM, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(polite)
        seen += [pid for pid in descendants(process.pid) if pid not in seen]
    kill(seen)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    return seen


def kill(pids: Sequence[int], wait: float = 10.0) -> None:
    """SIGKILL each process and its process group, then wait (bounded) until none runs."""
    for pid in pids:
        _signal(pid, signal.SIGKILL, group=True)  # a group leader takes its group along
        _signal(pid, signal.SIGKILL, group=False)
    deadline = time.monotonic() + wait
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


@contextlib.contextmanager
def _started(argvs: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], directory: Path,
             cwd: Path) -> Iterator[list[tuple[subprocess.Popen, Path, Path]]]:
    """Start every process with its output in files; whatever happens, none outlives the
    block."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / "tmp"  # what the processes put in a temporary directory stays here
    scratch.mkdir(exist_ok=True)
    started: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        for index, (argv, env) in enumerate(zip(argvs, envs)):
            env = {**env, "TMPDIR": str(scratch)}
            out, err = directory / f"{index}.out", directory / f"{index}.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=stdout,
                                           stderr=stderr, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            started.append((process, out, err))
        yield started
    finally:
        for process, _, _ in started:
            if process.poll() is None:
                kill_tree(process)
        tokens = {env[TOKEN] for env in envs}
        kill([pid for token in tokens for pid in tagged(token)])


def _supervise(started: list[tuple[subprocess.Popen, Path, Path]], timeout: float,
               grace: float, polite: float) -> Run:
    begin = time.monotonic()
    deadline = begin + timeout
    failed_at: float | None = None
    killed: set[int] = set()
    pids = [p.pid for p, _, _ in started]
    timed_out = False
    scanned = begin
    while True:
        codes = [p.poll() for p, _, _ in started]
        if all(code is not None for code in codes):
            break
        now = time.monotonic()
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = now
        late = failed_at is not None and now - failed_at > grace
        if now > deadline or late:
            timed_out = now > deadline
            for index, (process, _, _) in enumerate(started):
                if process.poll() is None:
                    killed.add(index)
                    pids += kill_tree(process, polite)
            break
        if now - scanned > 0.5:
            scanned = now
            pids += [pid for p, _, _ in started for pid in descendants(p.pid) if pid not in pids]
        time.sleep(0.05)
    ended = [Ended(index, process.pid, process.wait(), out.read_text(errors="replace"),
                   err.read_text(errors="replace"), index in killed)
             for index, (process, out, err) in enumerate(started)]
    return Run(ended, time.monotonic() - begin, timed_out, pids)


def run_ranks(argv: Sequence[str], world_size: int, directory: Path, *, timeout: float = 120,
              grace: float = 20, env: dict[str, str] | None = None, cwd: Path = REPO) -> Run:
    """Run ``world_size`` copies of ``argv`` as the ranks of one torch.distributed job on
    loopback (see the module docstring); ``directory`` receives their output files."""
    for attempt in range(2):
        port = free_port()
        base = loopback_environment(port, world_size, **(env or {}))
        envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE":
                 str(world_size)} for r in range(world_size)]
        with _started([argv] * world_size, envs, directory / f"try{attempt}", cwd) as started:
            run = _supervise(started, timeout, grace, polite=0.0)
        if run.ok or attempt or not any(t in e.stderr for e in run.ended for t in PORT_TAKEN):
            return run
    raise AssertionError("unreachable")


def run_program(argv: Sequence[str], directory: Path, *, timeout: float = 120,
                env: dict[str, str] | None = None, cwd: Path = REPO) -> Run:
    """Run one program that starts its own workers (``python -m torch.distributed.run``):
    on a timeout it gets SIGTERM and 5 s to stop them before everything below it is killed."""
    with _started([argv], [environment(**(env or {}))], directory, cwd) as started:
        return _supervise(started, timeout, grace=0.0, polite=5.0)


def python(*argv: str | Path) -> list[str]:
    """``argv`` run by this interpreter."""
    return [sys.executable, *map(str, argv)]
