"""One thread that runs every model call of the chat server, the decoding steps of all answers batched.

Design choices:
- A job is a plain Python generator. What it yields goes to the request that submitted it (an event,
  a clip), except a `Step`: the job's request for one decoding step of its sequence (the token it
  appends, the cache it appends to), answered with the logits that follow, sent back into the
  generator (`logits = yield Step(token, cache)`). Encoding a clip (and reading it into the LM's
  cache) or reading a question's first tokens is work a job does itself between two steps.
- Each turn the worker advances every job that is not waiting for a step by one item (an event it
  sends on, or the Step it asks for), then runs one decoding step for every waiting job at once
  (`step_many`: one batched forward over caches that stay each job's own, omni.model.gpt.GPT.step_many).
  Four conversations thus cost about one forward per token, not four, and a new question's first
  token (its last prompt token, asked as a Step) waits for at most one step of the others.
- The worker's torch threads leave a core to the server (`threads`, set by omni.serve.chat.create_app):
  the HTTP loop streams every answer's tokens, and on a small CPU intra-op threads that spin against it
  cost more than they give a small model (benchmarks/bench_chat.py on 2 cores: a step of 4
  conversations took 2.3x one conversation's with 2 threads, 1.1x with 1).
- What jobs send goes out once a turn, before the step: one wake-up of the request loop for every
  answer's token, not one each.
- An exception in a job becomes an {"event": "error"} for that request alone, and the worker goes on.
- A request that goes away (the client closed the tab) marks its job cancelled; the worker drops it
  at its next turn, so an abandoned answer stops using the CPU.
- `run_alone` drives a job without the thread (the terminal chat, tests), stepping its sequence alone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("omni.serve.chat")
_END = object()  # marks the end of a job's output


@dataclass
class Step:
    """A job's request for one decoding step of its sequence."""

    token: torch.Tensor  # (1,) the token appended
    cache: Any  # the sequence's own KV cache (omni's KVCache or an HF cache)


StepMany = Callable[[torch.Tensor, list], torch.Tensor]  # (tokens (B,), caches) -> logits (B, V)


class _Job:
    def __init__(self, steps: Iterator[Any], loop: asyncio.AbstractEventLoop, out: asyncio.Queue, outbox: list["_Job"]):
        self.steps, self.loop, self.out, self.outbox = steps, loop, out, outbox
        self.cancelled = False
        self.decoding = False  # it has asked for a decoding step: it runs to its next one each turn
        self.waiting: Step | None = None  # the step it asked for, not run yet
        self.reply: Any = None  # what goes back into it when it is advanced next
        self.pending: list[Any] = []  # what it sent this turn, delivered by Worker._flush

    def send(self, item: Any) -> None:
        if not self.pending:
            self.outbox.append(self)
        self.pending.append(item)


class Worker:
    """Runs submitted generators on one daemon thread; their decoding steps go through `step_many` together."""

    def __init__(self, step_many: StepMany | None = None, threads: int = 0) -> None:
        self.step_many = step_many
        self.threads = threads  # torch's intra-op threads for this thread's model calls; 0 = torch's default
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._outbox: list[_Job] = []  # jobs with events to deliver
        self._thread = threading.Thread(target=self._loop, name="omni-chat-worker", daemon=True)
        self._thread.start()

    async def run(self, steps: Iterator[Any]) -> AsyncIterator[Any]:
        """Submit `steps`; yields what it yields (Steps aside), or one {"event": "error", "message"} if it raises."""
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(steps, asyncio.get_running_loop(), out, self._outbox)
        self._inbox.put(job)
        try:
            while (item := await out.get()) is not _END:
                yield item
        finally:
            job.cancelled = True  # a no-op when the job ended; stops it when the client went away

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        active: list[_Job] = []
        while True:
            if not active:
                self._flush()
                active.append(self._inbox.get())  # idle: sleep until work arrives
            while not self._inbox.empty():
                active.append(self._inbox.get_nowait())
            for job in list(active):
                if job.cancelled:
                    _close(job)
                    active.remove(job)
                elif job.waiting is None and not self._advance(job):
                    active.remove(job)
            self._flush()  # the turn's events go out while the step runs
            waiting = [j for j in active if j.waiting is not None]
            if waiting:
                self._step(waiting)

    def _flush(self) -> None:
        """Deliver what the jobs sent since the last flush: one wake-up of each request loop per turn, not
        one per event (the loop and this thread share the interpreter lock)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, list[Any]]]] = {}
        for job in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, job.pending))
            job.pending = []
        self._outbox.clear()
        for loop, sent in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(job.out, item) for job, items in sent for item in items])
            except RuntimeError:  # the request's event loop is gone: nobody is listening
                for job, _ in sent:
                    job.cancelled = True

    def _advance(self, job: _Job) -> bool:
        """One turn of `job` (False when it ended): a decoding job (one that has asked for a step) runs
        until it asks for the next, sending its events on the way, so every answer under way joins the
        same batched step; any other job yields one item a turn, so jobs that never step (a clip's
        encoding) still take turns."""
        while True:
            try:
                item = job.steps.send(job.reply) if job.reply is not None else next(job.steps)
                job.reply = None
            except StopIteration:
                job.send(_END)
                return False
            except Exception as e:  # a bad job must not take the server down
                _report(job, e)
                return False
            if isinstance(item, Step):
                job.waiting, job.decoding = item, True
                return True
            job.send(item)
            if not job.decoding:
                return True

    def _step(self, jobs: list[_Job]) -> None:
        """One decoding step for every waiting job, batched; each job gets its own row of logits back."""
        tokens = torch.cat([j.waiting.token for j in jobs])
        caches = [j.waiting.cache for j in jobs]
        try:
            logits = self.step_many(tokens, caches)
        except Exception as e:  # the batch failed: every job in it hears why
            for j in jobs:
                _report(j, e)
                j.cancelled = True
            return
        for i, j in enumerate(jobs):
            j.reply, j.waiting = logits[i : i + 1], None


def run_alone(steps: Iterator[Any], step: Callable[[torch.Tensor, Any], torch.Tensor]) -> Iterator[Any]:
    """Drive a job in this thread: its events in order, each Step answered by `step(token, cache)` alone."""
    reply = None
    while True:
        try:
            item = steps.send(reply) if reply is not None else next(steps)
        except StopIteration:
            return
        reply = None
        if isinstance(item, Step):
            reply = step(item.token, item.cache)
        else:
            yield item


def _deliver(sent: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in sent:
        out.put_nowait(item)


def _report(job: _Job, e: Exception) -> None:
    if not isinstance(e, ValueError):
        log.exception("chat job failed", exc_info=e)
    job.send({"event": "error", "message": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)})
    job.send(_END)


def _close(job: _Job) -> None:
    close = getattr(job.steps, "close", None)
    if close is not None:
        close()
