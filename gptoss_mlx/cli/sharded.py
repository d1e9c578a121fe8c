"""`--shard` in `chat`, `generate`, `batch` and `serve`: rank 0 leads, the other ranks follow
its orders.

Under `mlx.launch` every rank runs the same command. Rank 0 runs it as usual: it reads the input,
prints, asks about tool calls, writes files. The others never read input or files and print
nothing but errors: once their share of the model is loaded they wait for orders from rank 0
(`follow`) and carry each out exactly as rank 0 does, so both make the same forward passes and
collectives; rank 0 alone samples (engine/distributed.py shares its token).

Orders, each a JSON message (Cluster.broadcast):
  send / tool_results / reset   a chat turn, with the session's whole state (history, effort,
                                instructions, tools, structured-output settings), so that /load,
                                /effort, /system or MCP tools on rank 0 need no order of their own
  complete                      a --raw completion (token ids in, generate_tokens run out)
  batch                         a batch job's settings, then its input lines one by one
  serve                         a server's engine settings, then each answer to the engine's
                                "next request?" (a request, or none ready yet), until it stops
  quit                          rank 0 is done
A rank that fails ends every rank (mlx.launch stops the others; without it, their next
collective finds the connection gone), each with at most one line.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import click

from ..errors import GptOssError, OutputError, UsageError

if TYPE_CHECKING:  # MLX is imported when a command runs, never by `--help`
    from ..engine.distributed import Cluster

SHARD_MODES = ("expert", "tensor", "pipeline")  # model/parallel/plan.py's MODES
DEFAULT_TIMEOUT = 120.0  # engine/distributed.py's

# The session attributes that make up a chat's state (the model and caches aside).
_STATE = (
    "messages",
    "reasoning_effort",
    "instructions",
    "tools",
    "date",
    "turns",
    "response_format",
    "tool_choice",
    "max_reasoning_tokens",
    "strict_tools",
    "max_tokens",
)


def shard_options(fn: Callable) -> Callable:
    """--shard and --shard-timeout, for the commands that run the model."""
    fn = click.option(
        "--shard-timeout",
        type=click.FloatRange(min=1),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="With --shard: end every rank when the others make no progress for this long "
        "(a rank stalled or the network dropped).",
    )(fn)
    return click.option(
        "--shard",
        type=click.Choice(SHARD_MODES),
        default=None,
        help="Split the model over the processes mlx.launch starts (one per Mac): expert "
        "(1/N of the experts each; 2, 4 or 8 ranks), tensor (heads and expert widths halved; "
        "2 ranks), pipeline (a range of layers each). See docs/DISTRIBUTED.md.",
    )(fn)


def join_cluster(opts: dict[str, Any]) -> Cluster | None:
    """Pop --shard/--shard-timeout from a command's options and join the other ranks. Call it
    first thing in the command, before anything runs MLX (see engine/distributed.join).
    None: not sharded (no --shard, or --shard in a single process, which runs unsharded)."""
    from ..engine.distributed import join, launched, launcher_rank, quiet_followers

    mode = opts.pop("shard", None)
    timeout = opts.pop("shard_timeout", DEFAULT_TIMEOUT)
    if mode is None:
        if launched():
            if launcher_rank() != 0:
                raise SystemExit(2)  # rank 0 says why, once
            raise UsageError(
                "started as one of several processes (mlx.launch) but without --shard: pass "
                "--shard expert|tensor|pipeline, or run a single process"
            )
        return None
    cluster = join(mode, timeout)
    if cluster is None:
        click.echo(
            f"note: --shard {mode} in a single process: running unsharded "
            "(start one process per machine with mlx.launch to shard)",
            err=True,
        )
        return None
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    quiet_followers(cluster, debug)
    return cluster


def refuse_piped_stdin(cluster: Cluster | None, what: str, instead: str) -> None:
    """mlx.launch hands its stdin to the ranks but never closes theirs: input read to its end
    would wait forever. Refuse it, saying what to pass instead (chat reads line by line and ends
    with /quit, so it is fine)."""
    from ..engine.distributed import launched_by_mlx

    if cluster is not None and launched_by_mlx():
        raise UsageError(
            f"with --shard under mlx.launch, {what} cannot come from stdin (mlx.launch never "
            f"closes the ranks' stdin, so it has no end): {instead}"
        )


def open_model(
    cluster: Cluster | None, spec: str | None, max_context: int | None, batch: int = 1
) -> tuple[Any, Any, int]:
    """(model, tokenizer, context limit) for `--model spec`: resolved (converted on first use)
    and loaded; with a cluster, rank 0's settings on every rank, the conversion done by rank 0
    first (ranks on one machine share its cache) and each rank's share loaded."""
    from gptoss_mlx.convert.resolve import resolve_model

    from ..engine.runtime import load_for_inference

    if cluster is None:
        return load_for_inference(resolve_model(spec), max_context, batch=batch)
    mine = {"model": spec, "max_context": max_context, "batch": batch}
    settings = cluster.broadcast(mine if cluster.leader else None, idle=True)
    path = cluster.in_turn(lambda: resolve_model(settings["model"]))
    with cluster.guard():
        return load_for_inference(
            path, settings["max_context"], batch=settings["batch"], cluster=cluster
        )


# --------------------------------------------------------------------------- rank 0


class Leader:
    """Rank 0's side: sends each order before carrying it out itself, and `quit` once the
    command ends normally (after a failure it just leaves: mlx.launch stops the others)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.busy = False
        click.get_current_context().call_on_close(self.release)

    def order(self, kind: str, **payload: Any) -> None:
        self.busy = True
        self.cluster.broadcast({"order": kind, **payload})

    def done(self) -> None:
        """The order was carried out: the ranks are now waiting for a person, not each other."""
        self.busy = False
        self.cluster.idle()

    def release(self) -> None:
        exc = sys.exc_info()[1]
        failed = exc is not None and not (isinstance(exc, SystemExit) and exc.code in (0, None))
        if self.busy or failed:
            return  # the others are mid-order; our exit (or mlx.launch) ends them
        try:
            self.cluster.broadcast({"order": "quit"})
        except GptOssError:
            pass  # they are gone already


class MirroredSession:
    """A ChatSession on rank 0 whose turns the other ranks repeat: every attribute is the
    session's own; send, send_tool_results and reset first send the order with the state."""

    def __init__(self, session: Any, leader: Leader):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_leader", leader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._session, name, value)

    def _run(self, kind: str, call: Callable[[], Any], **payload: Any) -> Any:
        self._leader.order(kind, state=session_state(self._session), **payload)
        with self._leader.cluster.guard():
            try:
                result = call()
            except OutputError as e:
                # Rank 0's own output failed mid-turn while the others go on: the run ends.
                self._leader.cluster.end(e.exit_code, f"error: {e}")
                raise
            except GptOssError:
                # Errors from the inputs or the shared tokens: every rank met the same one at
                # the same point and waits for the next order (see follow).
                self._leader.done()
                raise
        self._leader.done()
        return result

    def send(self, text: str, on_event: Callable | None = None) -> Any:
        return self._run("send", lambda: self._session.send(text, on_event), text=text)

    def send_tool_results(self, results: Any, on_event: Callable | None = None) -> Any:
        pairs = [[call, content] for call, content in results]
        call = lambda: self._session.send_tool_results(results, on_event)  # noqa: E731
        return self._run("tool_results", call, results=pairs)

    def reset(self) -> None:
        self._run("reset", self._session.reset)


def lead_session(cluster: Cluster | None, session: Any) -> Any:
    """The session rank 0 uses: mirrored to the other ranks when sharded."""
    return session if cluster is None else MirroredSession(session, Leader(cluster))


def mirrored(session: Any, generate_tokens: Callable) -> Callable:
    """`generate_tokens` for a --raw completion; with a mirrored session the other ranks run the
    same completion (the prompt ids and limits go with the order)."""
    if not isinstance(session, MirroredSession):
        return generate_tokens
    leader = session._leader

    def run(model: Any, prompt: list[int], **kw: Any) -> Iterator[int]:
        limits = {k: kw.get(k) for k in ("max_tokens", "stop_ids", "max_context")}
        leader.order(
            "complete",
            prompt=list(prompt),
            **{**limits, "stop_ids": list(limits["stop_ids"] or ())},
        )
        with leader.cluster.guard():
            yield from generate_tokens(model, prompt, **kw)
        leader.done()

    return run


def lead_batch(cluster: Cluster | None, job: Any) -> None:
    """Make `job` (a cli/batch_job.BatchJob on rank 0) run on every rank: its settings go out
    when it starts, then each input line as the job reads it."""
    if cluster is None:
        return
    leader = Leader(cluster)
    run = job.run

    def mirrored_run(lines: Iterable[Any], write: Callable[[dict[str, Any]], None]) -> Any:
        settings = {
            "defaults": _plain(job.defaults),
            "date": job.date,
            "done": sorted(job.done),
            "batch_size": job.engine.batch_size,
            "max_context": job.engine.max_context,
            "fail_fast": job.fail_fast,
        }
        leader.order("batch", **settings)
        with cluster.guard():
            summary = run(_send_lines(cluster, lines), write)
        leader.done()
        return summary

    job.run = mirrored_run


def lead_scheduler(cluster: Cluster | None, scheduler: Any) -> None:
    """Make a server's Scheduler (engine/scheduler.py) run its batch engine on every rank: each
    time the engine asks for the next request, rank 0's answer (a request, or none ready yet)
    goes to every rank, and a client's cancellation is agreed each step (batching.py). An engine
    that fails on rank 0 ends every rank: the scheduler would start a new engine there alone."""
    if cluster is None:
        return
    store = scheduler.store
    if store is not None and cluster.mode == "pipeline":
        # Each stage's KV snapshots have sizes of their own (its own mix of sliding and full
        # layers), so the ranks' stores would evict different prompts and prefill differently.
        raise UsageError(
            "serve --shard pipeline keeps no prompt cache: pass --prompt-cache-bytes 0 (or use "
            "--shard expert or tensor, whose ranks' caches have the same sizes)"
        )
    leader = Leader(cluster)
    admit = scheduler._admit  # the engine's request source (blocks while there is no work)
    settings = {
        "batch_size": scheduler.max_concurrency,
        "stop_ids": list(scheduler.stop_ids),
        "max_context": scheduler.max_context,
        "prompt_cache_bytes": store.max_bytes if store is not None else 0,
    }

    def mirrored_admit() -> Iterator[Any]:
        leader.order("serve", **settings)
        items = admit()
        ended = False
        try:
            while True:
                cluster.idle()  # waiting for clients is not timed
                item = next(items, StopIteration)
                if item is StopIteration:
                    ended = True
                    cluster.broadcast({"end": True})
                    leader.done()
                    return
                cluster.broadcast({"request": _request_json(item) if item is not None else None})
                yield item
        finally:
            if not ended:
                cluster.end(
                    1,
                    "error: rank 0: the engine failed in a sharded server; stopping every rank "
                    "(see the log above)",
                )

    scheduler._admit = mirrored_admit


def _request_json(req: Any) -> dict[str, Any]:
    grammar = getattr(req.constraint, "grammar", None) if req.constraint is not None else None
    return {
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "sampling": dataclasses.asdict(req.sampling),
        "id": req.id,
        "stop_ids": list(req.stop_ids) if req.stop_ids is not None else None,
        "max_context": req.max_context,
        "cancellable": req.cancelled is not None,
        "lark": grammar.lark if grammar is not None else None,
    }


def _follow_server(cluster: Cluster, model: Any, tokenizer: Any, order: dict[str, Any]) -> None:
    from ..engine.batching import BatchEngine, BatchRequest
    from ..engine.chat import harmony_ids
    from ..engine.constraints.matcher import Grammar, ll_tokenizer
    from ..engine.generate import SamplingParams
    from ..engine.prompt_store import PromptStore

    size = order["prompt_cache_bytes"]
    store = PromptStore(size, message_start=harmony_ids(tokenizer).start) if size else None
    engine = BatchEngine(
        model,
        batch_size=order["batch_size"],
        stop_ids=order["stop_ids"],
        max_context=order["max_context"],
        prompt_store=store,
    )
    grammars: dict[str, Any] = {}

    def never() -> bool:
        return False  # rank 0's clients cancel; the engine agrees on it each step

    def requests() -> Iterator[BatchRequest | None]:
        while True:
            msg = cluster.broadcast(idle=True)
            if "end" in msg:
                return
            r = msg["request"]
            if r is None:
                yield None
                continue
            constraint = None
            if r["lark"] is not None:
                if r["lark"] not in grammars:
                    lltok = ll_tokenizer(tokenizer, model.config.vocab_size)
                    grammars[r["lark"]] = Grammar(r["lark"], lltok, None)
                constraint = grammars[r["lark"]].constraint()
            yield BatchRequest(
                r["prompt"],
                max_tokens=r["max_tokens"],
                sampling=SamplingParams(**r["sampling"]),
                id=r["id"],
                stop_ids=r["stop_ids"],
                max_context=r["max_context"],
                cancelled=never if r["cancellable"] else None,
                constraint=constraint,
            )

    for _ in engine.run(requests()):
        pass


def _send_lines(cluster: Cluster, lines: Iterable[Any]) -> Iterator[Any]:
    for line in lines:  # reading may wait on a pipe: not timed
        cluster.broadcast({"line": dataclasses.asdict(line)})
        yield line
        cluster.idle()
    cluster.broadcast({"end": True})


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def session_state(session: Any) -> dict[str, Any]:
    state = {k: getattr(session, k) for k in _STATE if hasattr(session, k)}
    state["sampling"] = dataclasses.asdict(session.sampling)
    return state


# --------------------------------------------------------------------------- the others


def follow(cluster: Cluster) -> None:
    """A rank other than 0: load this rank's share, then carry out rank 0's orders until quit."""
    from ..engine.chat import ChatSession
    from ..engine.generate import SamplingParams, generate_tokens

    model, tokenizer, context = open_model(cluster, None, None)
    session = ChatSession(model, tokenizer, max_context=context)
    with cluster.guard():
        while True:
            order = cluster.broadcast(idle=True)
            kind = order["order"]
            if kind == "quit":
                return
            if "state" in order:
                state = dict(order["state"])
                session.sampling = SamplingParams(**state.pop("sampling"))
                for key, value in state.items():
                    setattr(session, key, value)
            try:
                if kind == "send":
                    session.send(order["text"])
                elif kind == "tool_results":
                    session.send_tool_results([tuple(p) for p in order["results"]])
                elif kind == "reset":
                    session.reset()
                elif kind == "complete":
                    for _ in generate_tokens(
                        model,
                        order["prompt"],
                        max_tokens=order["max_tokens"],
                        stop_ids=order["stop_ids"],
                        max_context=order["max_context"],
                    ):
                        pass
                elif kind == "batch":
                    _follow_batch(cluster, model, tokenizer, order)
                elif kind == "serve":
                    _follow_server(cluster, model, tokenizer, order)
                else:
                    raise UsageError(f"unknown order {kind!r} from rank 0 (mismatched versions?)")
            except GptOssError:
                # Rank 0 met the same error at the same point (same inputs, same tokens) and
                # reports it; this rank waits for the next order as rank 0 goes on.
                pass
            cluster.idle()


def _follow_batch(cluster: Cluster, model: Any, tokenizer: Any, order: dict[str, Any]) -> None:
    from ..engine.generate import SamplingParams
    from .batch_files import InputLine
    from .batch_job import BatchDefaults, BatchJob

    fields = dict(order["defaults"])
    fields["sampling"] = SamplingParams(**fields["sampling"])
    job = BatchJob(
        model,
        tokenizer,
        defaults=BatchDefaults(**fields),
        batch_size=order["batch_size"],
        max_context=order["max_context"],
        date=order["date"],
        done=order["done"],
        fail_fast=order["fail_fast"],
    )

    def lines() -> Iterator[InputLine]:
        while True:
            msg = cluster.broadcast(idle=True)
            if "end" in msg:
                return
            yield InputLine(**msg["line"])

    job.run(lines(), lambda _record: None)
