"""Running as one rank of a sharded model (`--shard` under `mlx.launch`): the group, agreement
between the ranks, and ending every rank with one clear line instead of a hang.

Every rank runs the same engine code on the same inputs (the front end hands rank 0's input to the
others), so every rank makes the same forward passes and the same collectives in the same order.
Three things keep it that way:
- One token for all: rank 0 alone holds the vocabulary head and samples; `agree_on_tokens` sends
  its token, and whether its logits were finite, to every rank (one int32 all_sum per step).
- One decision for all: `Cluster.broadcast` hands rank 0's value (a JSON value) to every rank;
  `Cluster.together` runs a step on every rank and, if it failed anywhere, ends every rank with
  the failing rank's message (printed by that rank only).
- No hang: a watchdog thread ends the process when no forward pass or token has completed for
  `timeout` seconds while the ranks should be working (a rank stalled, a cable pulled); waiting
  for the user's next message or a worker waiting for rank 0's next order is not timed. A rank
  that dies closes its sockets: the others' next collective fails at once ("connection to a peer
  was lost"), which `Cluster.guard` turns into one line. SIGINT and SIGTERM end a rank at once,
  even inside a collective (MLX blocks in C++ there, where Python's handlers cannot run): they
  are blocked in every thread before MLX starts any, and a thread of ours waits for them.
mlx.launch stops every other rank (SIGTERM) once one exits with an error.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from ..errors import GptOssError

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0  # seconds without progress before a rank gives up on the others
# Environment variables of the launchers that start ranks: mlx.launch (ring, jaccl), mpirun.
LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class DistributedError(GptOssError):
    """The ranks of a sharded run cannot work together (a rank left, stalled, or never came)."""


def launched() -> bool:
    """Whether this process was started as one rank of several (mlx.launch, mpirun)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def launcher_rank() -> int:
    """This process's rank as its launcher numbered it (before any group exists)."""
    for key in LAUNCHER_ENV:
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def launched_by_mlx() -> bool:
    """Started by mlx.launch (which sets MLX_RANK), rather than by mpirun."""
    return "MLX_RANK" in os.environ


def backend_name() -> str:
    """The backend mx.distributed.init() picks here, by what the launcher set up."""
    if "MLX_JACCL_COORDINATOR" in os.environ or "MLX_IBV_DEVICES" in os.environ:
        return "jaccl"
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return "mpi"
    if "NCCL_HOST_IP" in os.environ:
        return "nccl"
    return "ring"


@dataclass
class Cluster:
    """This process's place among the ranks: the group, its rank, the mode and the watchdog."""

    group: Any
    mode: str
    timeout: float = DEFAULT_TIMEOUT
    backend: str = "ring"
    _deadline: float | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def leader(self) -> bool:
        """Rank 0: the rank that reads input, samples, prints and writes files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"--shard {self.mode} over {self.size} ranks ({self.backend})"

    # ------------------------------------------------------------------ the watchdog

    def beat(self) -> None:
        """Progress: the ranks are working together; give them `timeout` seconds more."""
        self._deadline = time.monotonic() + self.timeout

    def idle(self) -> None:
        """Waiting on a person (or on rank 0's next order): nothing to time."""
        self._deadline = None

    def start(self) -> None:
        """Start the watchdog and the signal thread (signals must already be blocked)."""
        threading.Thread(target=self._watch, name="gptoss-watchdog", daemon=True).start()
        threading.Thread(target=self._signals, name="gptoss-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self.end(
                    1,
                    f"error: rank {self.rank}: no progress from the other ranks for "
                    f"{self.timeout:g} s (a rank stalled or the network between them dropped); "
                    "stopping (--shard-timeout sets the limit)",
                )

    def _signals(self) -> None:
        signo = signal.sigwait({signal.SIGINT, signal.SIGTERM})
        if signo == signal.SIGINT:
            self.end(130, "interrupted (a sharded run stops as a whole)" if self.leader else "")
        else:
            self.end(
                143,
                "error: stopped by SIGTERM (mlx.launch stops every rank once one of them "
                "fails; its message is above)"
                if self.leader
                else "",
            )

    def end(self, code: int, line: str) -> None:
        """End this process now, from any thread (the main one may be blocked in a collective)."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - leaving anyway
                pass
        if line:
            os.write(_real_stderr_fd(), (line + "\n").encode())
        os._exit(code)

    # ------------------------------------------------------------------ agreement

    def broadcast(self, value: Any = None, *, idle: bool = False) -> Any:
        """Rank 0's `value` (anything JSON can carry), on every rank. `idle`: the other ranks
        may wait as long as rank 0 takes to decide (the next chat message), so they do not time
        out while waiting here."""
        if self.leader:
            data = json.dumps(value, ensure_ascii=False).encode()
            self.beat()
        else:
            data = b""
            if idle:
                self.idle()
        with self.guard():
            n = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=self.group)
            size = int(n.item())
            buf = np.zeros(size, dtype=np.uint8)
            if self.leader:
                buf[:] = np.frombuffer(data, dtype=np.uint8)
            got = mx.distributed.all_sum(mx.array(buf), group=self.group)
            raw = bytes(np.array(got))
        self.beat()
        return value if self.leader else json.loads(raw.decode())

    def agree_min(self, value: int) -> int:
        """The smallest `value` over the ranks."""
        with self.guard():
            got = mx.distributed.all_min(mx.array([value], dtype=mx.int64), group=self.group)
            return int(got.item())

    def together(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; if it failed on any, end every rank. The failing rank's
        error is raised there (one line, printed by the front end); when several failed, rank 0's
        (only it is shown). The other ranks leave silently with the same exit code."""
        self.idle()  # loading, converting: as long as it takes on the slowest rank
        error: GptOssError | None = None
        result = None
        try:
            result = step()
        except GptOssError as e:
            error = e
        code = error.exit_code if error is not None else 0
        flags = np.zeros(self.size, dtype=np.int32)
        flags[self.rank] = code
        with self.guard():
            codes = np.array(mx.distributed.all_sum(mx.array(flags), group=self.group))
        failed = [r for r in range(self.size) if codes[r]]
        if not failed:
            return result  # type: ignore[return-value]
        if error is not None and self.rank == failed[0]:
            raise error
        raise SystemExit(int(codes[failed[0]]))

    def in_turn(self, step: Callable[[], T]) -> T:
        """Run `step` on rank 0 first, then on the other ranks (e.g. converting a model into a
        cache folder that ranks on one machine share); ends every rank if it fails anywhere."""
        first = self.together(lambda: step() if self.leader else None)
        rest = self.together(lambda: None if self.leader else step())
        return first if self.leader else rest

    def guard(self) -> _Guard:
        """Around collectives: MLX's error for a lost peer ends this rank with one line. Always
        fatal: a caller that handles errors and goes on (the chat loop) must not go on alone."""
        return _Guard(self)


class _Guard:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        text = str(exc) if isinstance(exc, RuntimeError) else ""
        if any(mark in text for mark in ("[ring]", "[jaccl]", "[mpi]", "peer", "connection")):
            self.cluster.end(
                1,
                f"error: rank {self.cluster.rank}: lost contact with another rank ({exc}); it "
                "stopped or its machine is unreachable",
            )
        return False


def agree_on_tokens(model: Any, y: mx.array, ok: mx.array) -> tuple[mx.array, mx.array]:
    """Rank 0's sampled tokens `y` and finite-logits flags `ok` on every rank of a sharded
    `model` (unchanged for any other model). One int32 all_sum carries both: the token, or -1
    where the logits were not finite. The other ranks' share depends on their own `y` (and so on
    their forward pass), so evaluating the result runs that pass and its collectives."""
    plan = getattr(model, "plan", None)
    group = getattr(model, "group", None)
    if plan is None or group is None or plan.size == 1:
        return y, ok
    heartbeat = getattr(model, "heartbeat", None)
    if heartbeat is not None:
        heartbeat()
    packed = mx.where(ok, y.astype(mx.int32), -1)
    mine = packed if plan.rank == 0 else mx.depends(mx.zeros_like(packed), packed)
    shared = mx.distributed.all_sum(mine, group=group)
    return mx.maximum(shared, 0).astype(y.dtype), shared >= 0


def agree_on_rows(model: Any, rows: set[int], n: int) -> set[int]:
    """Rank 0's choice of rows (of `n`) on every rank of a sharded `model`: which sequences a
    server's clients cancelled, which only rank 0 knows (one int32 all_sum of n flags)."""
    plan = getattr(model, "plan", None)
    group = getattr(model, "group", None)
    if plan is None or group is None or plan.size == 1:
        return rows
    flags = np.zeros(n, dtype=np.int32)
    if plan.rank == 0:
        flags[sorted(rows)] = 1
    got = np.array(mx.distributed.all_sum(mx.array(flags), group=group))
    return {int(i) for i in np.nonzero(got)[0]}


# --------------------------------------------------------------------------- joining


_STDERR_FD: int | None = None


def _real_stderr_fd() -> int:
    return _STDERR_FD if _STDERR_FD is not None else 2


def block_signals() -> None:
    """Block SIGINT and SIGTERM in this thread, and so in every thread started after it (MLX's
    included); the signal thread of `Cluster.start` takes them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def join(mode: str, timeout: float = DEFAULT_TIMEOUT) -> Cluster | None:
    """Join the other ranks for a `mode` run. Returns None for a single process (mx.distributed
    found no other rank: the model runs unsharded). Call before anything evaluates with MLX:
    SIGINT and SIGTERM must be blocked before MLX starts its threads.

    When a launcher started this process, the group must come up (`strict`): a missing hostfile
    or an unreachable rank is an error, never a silent single-process run.
    """
    if timeout <= 0:
        raise DistributedError(f"--shard-timeout must be positive, got {timeout:g}")
    strict = launched()
    block_signals()
    try:
        group = mx.distributed.init(strict=strict)
    except RuntimeError as e:
        unblock_signals()
        raise DistributedError(f"could not join the other ranks ({e})") from None
    if group.size() == 1:
        unblock_signals()
        return None
    cluster = Cluster(group, mode, timeout, backend_name())
    cluster.start()
    return cluster


def quiet_followers(cluster: Cluster, debug: bool = False) -> None:
    """On ranks other than 0: no output but errors. stdout goes nowhere; stderr keeps only
    `error:` lines (tagged with the rank) and tracebacks; MLX's own stderr logging is dropped
    too. With `debug` everything stays."""
    global _STDERR_FD
    if cluster.leader or debug:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    _STDERR_FD = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives with the process
    sys.stderr = _ErrorsOnly(os.fdopen(os.dup(_STDERR_FD), "w", encoding="utf-8"), cluster.rank)


class _ErrorsOnly:
    """A text stream passing only `error:` lines (as `error: rank N: ...`) and tracebacks."""

    def __init__(self, out: Any, rank: int):
        self.out, self.rank = out, rank
        self.pending = ""
        self.traceback = False

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if line.startswith("Traceback"):
            self.traceback = True
        if self.traceback:
            self.out.write(f"[rank {self.rank}] {line}\n")
        elif line.startswith("error: "):
            self.out.write(f"error: rank {self.rank}: {line[len('error: ') :]}\n")
        self.out.flush()

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.out.fileno()
