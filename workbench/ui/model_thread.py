"""The page's model work on one thread: loading, compressing, generating, the compare chart.

PyTorch's CPU kernels run on an OpenMP thread team that belongs to the thread that first ran
them; another thread's team on the same cores is throttled. Gradio runs each event on a worker
thread of its own pool, so a model loaded on the main thread decoded at half speed from the
page (int4 on this 2-core EPYC: 30-32 tok/s on the loading thread, 14-17 on a worker, the
same replies). The server already generates on the thread that loaded the model
(`GenerationQueue.run`); the page does the same: `python -m workbench.ui` runs this queue on
its main thread, where the model was loaded, and the handlers hand it their work and read the
results. Built without `own_thread=False` (tests, notebooks), it starts a thread of its own.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
_END = object()


class ModelThread:
    def __init__(self, *, own_thread: bool = True):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="workbench-model", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Do the page's model work on the calling thread until `shutdown()`."""
        while (job := self._jobs.get()) is not None:
            job()

    def shutdown(self) -> None:
        self._jobs.put(None)

    def call(self, work: Callable[[], T]) -> T:
        """`work()` run on the model thread, in the caller's context (as asyncio.to_thread
        runs it: Gradio finds the event's progress bar there, so tqdm bars still show); its
        result, or its exception raised here."""
        done: Future[T] = Future()
        context = contextvars.copy_context()

        def job() -> None:
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(context.run(work))
            except BaseException as exc:  # noqa: BLE001 - raised to the caller, not lost in the thread
                done.set_exception(exc)

        self._jobs.put(job)
        return done.result()

    def iterate(self, items: Iterator[T]) -> Iterator[T]:
        """`items` advanced on the model thread (an engine stream, which decodes as it is
        pulled), handed over one by one. Closing this iterator (Gradio's Stop, a closed page)
        stops the work at the next item and closes `items` there."""
        out: queue.Queue[object] = queue.Queue()
        stop = threading.Event()
        context = contextvars.copy_context()

        def job() -> None:
            try:
                while not stop.is_set():
                    try:
                        item = context.run(next, items)
                    except StopIteration:
                        break
                    out.put(item)
            except BaseException as exc:  # noqa: BLE001 - raised to the consumer below
                out.put(exc)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
                out.put(_END)

        self._jobs.put(job)
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]  # anything but _END and errors is an item
        finally:
            stop.set()
