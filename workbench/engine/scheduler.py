"""Continuous batching: which waiting requests decode together, on one generation thread.

Generation is CPU/GPU-bound and the model is shared, so it runs on one worker thread that
takes waiting requests in arrival order and decodes them together as a batch, while the
caller's event loop keeps accepting and validating requests and streaming tokens out. A
consumer that stops (a client that disconnects) sets its request's cancel flag; the worker
drops that row from the batch at the next token and the others go on.

How many requests may decode at once is the engine's to say (`Engine.max_batch`: the cache
policy's and the model's limits); the queue's own `max_batch` is the front end's ceiling on
top of it.

Other work on the model (scoring prompts: `call`) goes through the same queue and runs on the
same thread, in arrival order: between batches, or between two decode steps of a running
batch that takes new requests, so nobody's reply waits for a whole batch to end.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from workbench.engine.engine import Engine
from workbench.engine.events import Done, Event
from workbench.engine.sequence import Plan

_END = object()
"""Put after a request's last event (or its error): its stream ends."""


T = TypeVar("T")


@dataclass
class _Job:
    plan: Plan
    put: Callable[[object], None]
    cancelled: threading.Event


@dataclass
class _Call:
    """Work for the generation thread other than a reply (scoring prompts): run, then answered."""

    work: Callable[[], object]
    answer: Callable[[object, BaseException | None], None]

    def run(self) -> None:
        try:
            result = self.work()
        except Exception as exc:  # noqa: BLE001 - answered to the caller, not lost in the thread
            self.answer(None, exc)
        else:
            self.answer(result, None)


class GenerationQueue:
    """Continuous batching on one worker thread, at most `max_batch` requests decoding at once.

    The worker takes the oldest request, gathers whatever else arrives within `gather_s`,
    and starts a batch; requests that arrive while it runs join it at the next step, and a
    request's stream ends as soon as its own reply does."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, gather_s: float = 0.01, own_thread: bool = True):
        self._engine = engine
        self._max_batch = max_batch
        self._gather_s = gather_s
        self._pending: queue.Queue[_Job | _Call | None] = queue.Queue()
        if own_thread:
            self._worker = threading.Thread(target=self._work, name="workbench-generate", daemon=True)
            self._worker.start()

    def run(self) -> None:
        """Generate on the calling thread until `shutdown()` (with `own_thread=False`).

        Why a caller may want this: PyTorch's CPU kernels run on an OpenMP thread team that
        belongs to the thread which first ran them, and a second thread's team on the same
        cores is throttled. A model loaded (and compressed) on the main thread decodes ~2.5x
        slower on a worker thread (int4 compiled, one 2-core Xeon: 50 tok/s on the main
        thread, 20 on a worker; the packed int8 kernel alone 60 ms vs 150 ms), so
        `python -m workbench.serve` generates on its main thread and serves HTTP from another."""
        self._work()

    async def events(self, plan: Plan) -> AsyncIterator[Event]:
        """`plan`'s events, as the worker generates them; an error in generation is raised here."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                cancelled.set()

        self._pending.put(_Job(plan, put, cancelled))
        try:
            while (item := await inbox.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield cast(Event, item)
        finally:
            cancelled.set()

    async def call(self, work: Callable[[], T]) -> T:
        """`work()`'s result, run on the generation thread (the model's), in turn with replies."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: object, error: BaseException | None) -> None:
            if done.done():  # the caller went away
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(cast(T, result))

        def answer(result: object, error: BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        self._pending.put(_Call(work, answer))
        return await done

    def _gather(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self._gather_s
        limit = min(self._max_batch, self._engine.max_batch or self._max_batch)
        while len(batch) < limit:
            try:
                job = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._pending.put(None)
                break
            if isinstance(job, _Call):
                job.run()
                continue
            batch.append(job)
        for job in batch:
            if job.cancelled.is_set():
                job.put(_END)
        return [job for job in batch if not job.cancelled.is_set()]

    def _admit(self, batch: list[_Job], room: int) -> list[Plan]:
        """Requests that arrived while the batch runs join it at the next step."""
        joined: list[Plan] = []
        while len(joined) < room:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._pending.put(None)
                break
            if isinstance(job, _Call):  # between two decode steps: the batch's cache is untouched
                job.run()
                continue
            if job.cancelled.is_set():
                job.put(_END)
                continue
            batch.append(job)
            joined.append(job.plan)
        return joined

    def _work(self) -> None:
        while (first := self._pending.get()) is not None:
            if isinstance(first, _Call):
                first.run()
                continue
            batch = self._gather(first)
            if not batch:
                continue
            try:
                plans = [job.plan for job in batch]
                events = self._engine.generate(
                    plans,
                    is_cancelled=lambda i: batch[i].cancelled.is_set(),  # noqa: B023 - used within this iteration
                    admit=lambda room: self._admit(batch, room),  # noqa: B023 - used within this iteration
                    max_rows=self._max_batch,
                )
                for index, event in events:
                    batch[index].put(event)
                    if isinstance(event, Done):
                        batch[index].put(_END)
            except Exception as exc:  # noqa: BLE001 - reported to the waiting requests, not lost in the thread
                for job in batch:
                    job.put(exc)
            finally:
                for job in batch:
                    job.put(_END)

    def shutdown(self) -> None:
        self._pending.put(None)
