"""One thread that runs every model call of the chat server, one step at a time.

Design choices:
- A job is a plain Python iterator; each next() is one unit of model work (encode a clip, one
  decoding step). The worker advances the active jobs round robin, so requests never touch the
  model at the same time, yet a second conversation's first token waits for one step of the first
  conversation's answer, not for all of it. Each job owns its state (its own KV cache), so nothing
  is shared between conversations but the weights.
- What a job yields goes to the asyncio queue of the request that submitted it; an exception in a
  job becomes an {"event": "error"} for that request alone, and the worker goes on.
- A request that goes away (the client closed the tab) marks its job cancelled; the worker drops it
  at its next turn, so an abandoned answer stops using the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

log = logging.getLogger("omni.serve.chat")
_END = object()  # marks the end of a job's output


class _Job:
    def __init__(self, steps: Iterator[Any], loop: asyncio.AbstractEventLoop, out: asyncio.Queue):
        self.steps, self.loop, self.out = steps, loop, out
        self.cancelled = False

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            self.cancelled = True


class Worker:
    """Runs submitted iterators on one daemon thread, interleaving their steps."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="omni-chat-worker", daemon=True)
        self._thread.start()

    async def run(self, steps: Iterator[Any]) -> AsyncIterator[Any]:
        """Submit `steps`; yields what it yields, or one {"event": "error", "message"} if it raises."""
        out: asyncio.Queue = asyncio.Queue()
        job = _Job(steps, asyncio.get_running_loop(), out)
        self._inbox.put(job)
        try:
            while (item := await out.get()) is not _END:
                yield item
        finally:
            job.cancelled = True  # a no-op when the job ended; stops it when the client went away

    def _loop(self) -> None:
        active: deque[_Job] = deque()
        while True:
            if not active:
                active.append(self._inbox.get())  # idle: sleep until work arrives
            while not self._inbox.empty():
                active.append(self._inbox.get_nowait())
            job = active.popleft()
            if job.cancelled:
                _close(job)
                continue
            try:
                item = next(job.steps)
            except StopIteration:
                job.send(_END)
                continue
            except Exception as e:  # a bad job must not take the server down
                if not isinstance(e, ValueError):
                    log.exception("chat job failed")
                job.send({"event": "error", "message": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)})
                job.send(_END)
                continue
            job.send(item)
            active.append(job)


def _close(job: _Job) -> None:
    close = getattr(job.steps, "close", None)
    if close is not None:
        close()
