"""The page's model thread: work handed to it runs there, results and errors come back, and a
consumer that stops stops the work."""

from __future__ import annotations

import threading
import time

import pytest

from workbench.ui.model_thread import ModelThread


def test_calls_run_on_the_model_thread_and_answer_or_raise():
    runner = ModelThread()
    assert runner.call(lambda: threading.current_thread().name) == "workbench-model"
    with pytest.raises(ZeroDivisionError):
        runner.call(lambda: 1 / 0)
    assert runner.call(lambda: 2 + 2) == 4  # still serving after an error
    runner.shutdown()


def test_a_thread_that_runs_it_itself_does_the_work():
    runner = ModelThread(own_thread=False)
    seen = []
    caller = threading.Thread(target=lambda: (seen.append(runner.call(threading.get_ident)), runner.shutdown()))
    caller.start()
    runner.run()  # returns once the caller shut it down
    caller.join()
    assert seen == [threading.get_ident()]


def test_items_are_produced_there_in_order_and_errors_arrive_in_place():
    runner = ModelThread()
    where = []

    def produce():
        for i in range(3):
            where.append(threading.current_thread().name)
            yield i
        raise RuntimeError("the model failed")

    got = []
    with pytest.raises(RuntimeError, match="the model failed"):
        for item in runner.iterate(produce()):
            got.append(item)
    assert got == [0, 1, 2] and set(where) == {"workbench-model"}


def test_a_consumer_that_stops_stops_the_producer_and_closes_it():
    runner = ModelThread()
    produced, closed = [], threading.Event()

    def produce():
        try:
            for i in range(1000):
                produced.append(i)
                time.sleep(0.001)
                yield i
        finally:
            closed.set()

    stream = runner.iterate(produce())
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert closed.wait(5) and len(produced) < 20
    assert runner.call(lambda: "free") == "free"  # the thread is free for the next job
