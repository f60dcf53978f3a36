"""One loaded model behind the server: a bounded FIFO queue, one generation at a time.

Generation is blocking (torch, C kernels), so it runs on a single worker thread; its events reach
the asyncio side through `loop.call_soon_threadsafe`. A request that finds the queue full is
refused at once (HTTP 429) rather than left waiting without a bound. `ServedModel.lock` is also
taken by the desktop app around its own generations, so the app and the server never drive the
same model at the same time.

Cancellation works from either side: a client that disconnects cancels its job (queued jobs are
skipped, the running one stops within one token through `Session.cancel()`), and stopping the
server cancels everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from flashdesk.engine.generate import SamplingParams, Session, SessionBusyError, StreamEvent

_END = object()  # sentinel: the job will put nothing more


@dataclass
class ServedModel:
    """What the server needs of a loaded model.

    name: the id clients see in `/v1/models` and in responses.
    session: the `engine.generate.Session` the server generates with (its cached state gives
        prefix reuse across an agent's turns).
    tokenizer: the V4 tokenizer used to encode prompts (None: the bundled one).
    lock: held while generating; share it with the app so their generations never overlap.
    """

    name: str
    session: Session
    tokenizer: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_limit(self) -> int:
        return self.session.context_limit


class QueueFullError(Exception):
    """Every queue place is taken; the client should retry later."""

    def __init__(self, pending: int):
        self.pending = pending
        super().__init__(
            f"The model is busy: {pending} request(s) are already running or waiting, which is "
            "the limit of this server's queue. Retry in a moment, or send requests one at a time."
        )


class Job:
    """One generation request: its prompt, its sampling, and the events it produced so far."""

    def __init__(
        self,
        served: ServedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop,
    ):
        self.served = served
        self.prompt_ids = prompt_ids
        self.params = params
        self._loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._outbox: list[object] = []  # filled by the worker, drained on the loop
        self._outbox_lock = threading.Lock()
        self._cancel = threading.Event()
        self._running = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Skip the job if queued, stop it within one token if running; any thread."""
        self._cancel.set()
        if self._running:
            self.served.session.cancel()

    def _put(self, item: object) -> None:
        """Hand `item` to the loop. Items that arrive while a hand-over is already scheduled ride
        along with it: one loop wake-up per batch, not per token, so the loop thread and the
        worker do not trade the GIL on every token."""
        with self._outbox_lock:
            self._outbox.append(item)
            if len(self._outbox) > 1:
                return
        # A closed loop means the server stopped and nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._outbox_lock:
            items, self._outbox = self._outbox, []
        for item in items:
            self.events.put_nowait(item)

    def run(self) -> None:
        """Worker-thread body: wait for the model, stream, forward every event."""
        try:
            while not self.served.lock.acquire(timeout=0.05):
                if self._cancel.is_set():
                    return
            try:
                if self._cancel.is_set():
                    return
                self._running = True
                for event in self._session_stream():
                    self._put(event)
                    # Session.stream clears its cancel flag when it starts, so a cancel that
                    # raced with the start is re-sent here; it lands within one token.
                    if self._cancel.is_set() and not event.done:
                        self.served.session.cancel()
            finally:
                self._running = False
                self.served.lock.release()
        except Exception as exc:  # reported to the client; the worker thread lives on
            self._put(exc)
        finally:
            self._put(_END)

    def _session_stream(self) -> Iterator[StreamEvent]:
        """`session.stream(...)`, waiting while the session is busy with a generation the app
        started without holding `ServedModel.lock` (the session refuses a second stream)."""
        session = self.served.session
        while True:
            stream = session.stream(self.prompt_ids, self.params)
            try:
                first = next(stream)
            except SessionBusyError:
                if self._cancel.is_set():
                    return
                time.sleep(0.05)
                continue
            except StopIteration:
                return
            yield first
            yield from stream
            return

    async def batches(self, keepalive_s: float | None = None) -> AsyncIterator[list[StreamEvent]]:
        """The job's events, in batches of whatever arrived together (a fast model outruns the
        client; one write per batch instead of one per token). An empty batch every
        `keepalive_s` seconds of silence lets a stream send a keep-alive while the job waits or
        prefills."""
        while True:
            try:
                first = await asyncio.wait_for(self.events.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield []
                continue
            items = [first]
            while not self.events.empty():
                items.append(self.events.get_nowait())
            batch: list[StreamEvent] = []
            for item in items:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, BaseException):
                    if batch:
                        yield batch
                    raise item
                batch.append(item)
            yield batch


class GenerationQueue:
    """Runs jobs one at a time in arrival order; at most `max_waiting` wait behind the running one."""

    def __init__(self, max_waiting: int = 4):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashdesk-serve")
        self._closed = False

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (the running one included)."""
        with self._lock:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFullError when the queue is full, RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is stopping")
            if len(self._jobs) >= 1 + self.max_waiting:
                raise QueueFullError(len(self._jobs))
            self._jobs.add(job)
        future = self._executor.submit(job.run)
        future.add_done_callback(lambda _f: self._forget(job))

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def close(self) -> None:
        """Cancel every job and let the worker thread end (it finishes within one token)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._executor.shutdown(wait=False)
