"""Cancellation as coglet delivers it: an exception raised asynchronously in the thread that runs ``train()``."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from trainer.serving.cancel import interrupt_thread, run_cancellable


class Cancelation(BaseException):
    """Stands for coglet.CancelationException (also a BaseException)."""


class Stopped(Exception):
    pass


def _cancel_soon(delay: float = 0.3) -> None:
    caller = threading.current_thread()
    threading.Timer(delay, lambda: interrupt_thread(caller, Cancelation)).start()


def test_result_and_errors_pass_through():
    assert run_cancellable(lambda: 42, stop=threading.Event(), interrupt_with=Stopped) == 42

    def fail():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_cancellable(fail, stop=threading.Event(), interrupt_with=Stopped)


def test_the_worker_sees_the_callers_context():
    """coglet routes log lines by a context variable: the worker must run in the job's context."""
    job = contextvars.ContextVar("job", default=None)
    job.set("job-1")
    assert run_cancellable(job.get, stop=threading.Event(), interrupt_with=Stopped) == "job-1"


def test_a_loop_that_polls_stops_at_its_next_step():
    stop = threading.Event()
    seen = {}

    def training_loop():
        for step in range(1000):
            if stop.is_set():
                seen["stopped_at"] = step
                raise Stopped(f"cancelled at step {step}")
            time.sleep(0.02)
        return "finished"

    _cancel_soon()
    started = time.monotonic()
    with pytest.raises(Cancelation):
        run_cancellable(training_loop, stop=stop, interrupt_with=Stopped, grace_seconds=30)
    assert time.monotonic() - started < 2.0
    assert 5 <= seen["stopped_at"] < 100


def test_work_that_does_not_poll_is_interrupted_after_the_grace_period():
    seen = {}

    def loading_models():
        try:
            while True:
                time.sleep(0.02)
        except Stopped:
            seen["interrupted"] = True
            raise

    _cancel_soon()
    started = time.monotonic()
    with pytest.raises(Cancelation):
        run_cancellable(loading_models, stop=threading.Event(), interrupt_with=Stopped, grace_seconds=0.5)
    assert seen == {"interrupted": True}
    assert time.monotonic() - started < 3.0


def test_clean_up_is_not_interrupted():
    stop = threading.Event()
    cleaning = threading.Event()
    seen = {}

    def job():
        while not stop.is_set():
            time.sleep(0.02)
        cleaning.set()
        time.sleep(1.0)  # a clean-up that outlasts the grace period
        seen["cleaned"] = True
        raise Stopped("cancelled")

    _cancel_soon(0.2)
    with pytest.raises(Cancelation):
        run_cancellable(job, stop=stop, interrupt_with=Stopped, may_interrupt=lambda: not cleaning.is_set(),
                        grace_seconds=0.1)
    assert seen == {"cleaned": True}


def test_a_cancel_while_the_worker_starts_still_waits_for_it():
    """The exception can land inside Thread.start(), with the worker already running."""
    seen = {}

    def job():
        time.sleep(0.3)
        seen["ran"] = True
        return "late"

    caller = threading.current_thread()
    original = threading.Thread.start

    def start_then_cancel(self):
        original(self)
        interrupt_thread(caller, Cancelation)

    threading.Thread.start = start_then_cancel
    try:
        with pytest.raises(Cancelation):
            run_cancellable(job, stop=threading.Event(), interrupt_with=Stopped, grace_seconds=5)
    finally:
        threading.Thread.start = original
    assert seen == {"ran": True}
