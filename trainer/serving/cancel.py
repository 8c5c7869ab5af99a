"""Turning cog's cancellation into a cooperative stop of the training.

coglet runs a synchronous ``train()`` in a thread of its worker process and cancels it by raising
``coglet.CancelationException`` (a ``BaseException``) in that thread with ``PyThreadState_SetAsyncExc``: the
exception appears at whatever bytecode the thread is executing. Landing in the middle of library code (a logging
handler holding its lock, a half-finished upload) is what makes asynchronous exceptions dangerous in a process that
serves many jobs, so the job does not run in that thread. :func:`run_cancellable` runs it in a worker thread and
lets the cog thread only wait; when the cancellation arrives there, it

1. sets the stop event: the training loop checks it before every step (``should_stop``) and the upload checks it
   between chunks, so a job in those phases stops at a clean boundary within about one step;
2. if the worker has not finished after a short grace period (it is loading models, preparing data, rendering
   samples or writing the zip, none of which polls the event), raises
   :class:`~trainer.training.errors.TrainingCancelled` in the worker thread the same way coglet does: those phases
   write only through atomic renames into the job's own folder, which the job removes when it ends cancelled;
3. waits for the worker to finish its clean-up, then re-raises the original exception so that coglet reports the
   job as ``canceled``.

The same path handles ``KeyboardInterrupt`` when ``train()`` runs in a terminal.
"""

from __future__ import annotations

import contextvars
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How often the waiting thread wakes up: the asynchronous exception is delivered between bytecodes, so a blocking
#: wait would delay it until the job ends. The wait is a plain sleep: an asynchronous exception that lands inside
#: ``Thread.join()`` makes the Thread object believe the worker has ended (CPython releases the worker's state lock
#: in join's exception path), and one inside ``Event.wait()`` can leave a condition half-updated.
POLL_SECONDS = 0.1
#: Time the worker gets to reach a step boundary (where it stops cleanly) before it is interrupted.
COOPERATIVE_GRACE_SECONDS = 3.0
#: Longest wait for the worker after a cancellation. A worker stuck inside one C call (a network read, a kernel)
#: gets the interruption only when the call returns; past this the job is reported cancelled anyway and the worker
#: removes its files when it ends.
MAX_CANCEL_WAIT_SECONDS = 120.0
#: A worker thread that has not run its first line this long after start() was interrupted never will.
STARTUP_SECONDS = 2.0


def interrupt_thread(thread: threading.Thread, exception: type[BaseException]) -> bool:
    """Raise ``exception`` in ``thread`` at its next bytecode. False when the thread is gone."""
    if thread.ident is None:
        return False
    count = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))
    if count > 1:  # never expected; undo rather than interrupt unrelated threads
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)
        return False
    return count == 1


def run_cancellable(fn: Callable[[], T], *, stop: threading.Event, interrupt_with: type[BaseException],
                    may_interrupt: Callable[[], bool] = lambda: True,
                    grace_seconds: float = COOPERATIVE_GRACE_SECONDS,
                    max_wait_seconds: float = MAX_CANCEL_WAIT_SECONDS, name: str = "training-job") -> T:
    """Run ``fn`` in a worker thread and return its result; a cancellation of the calling thread stops it.

    ``fn`` must poll ``stop`` where it can stop cleanly. ``may_interrupt`` says whether the worker may be
    interrupted now (not while it cleans up after itself). The worker runs in a copy of the caller's context, so
    that coglet routes its log lines to the job that started it.
    """
    outcome: dict[str, object] = {}
    started = threading.Event()
    done = threading.Event()

    def target() -> None:
        started.set()
        try:
            outcome["result"] = fn()
        except BaseException as error:  # handed to the caller's thread, which decides
            outcome["error"] = error
        finally:
            done.set()

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(target,), name=name, daemon=True)
    try:
        # start() waits for the thread to come up: a cancellation can land there too, with the worker running.
        worker.start()
        while not done.is_set():
            time.sleep(POLL_SECONDS)
    except BaseException as cancellation:
        logger.warning("cancellation requested (%s): stopping the job", type(cancellation).__name__)
        stop.set()
        if _wait_until(started, STARTUP_SECONDS):
            _wait_after_cancel(worker, done, interrupt_with, may_interrupt, grace_seconds, max_wait_seconds)
        raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def _wait_until(event: threading.Event, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not event.is_set() and time.monotonic() < deadline:
        try:
            time.sleep(POLL_SECONDS / 10)
        except BaseException:  # a repeated cancel request: keep waiting
            continue
    return event.is_set()


def _wait_after_cancel(worker: threading.Thread, done: threading.Event, interrupt_with: type[BaseException],
                       may_interrupt: Callable[[], bool], grace_seconds: float, max_wait_seconds: float) -> None:
    started = time.monotonic()
    interrupted = False
    while not done.is_set():
        waited = time.monotonic() - started
        if waited > max_wait_seconds:
            logger.error("the job did not stop within %.0fs; reporting it cancelled, its files are removed when it "
                         "ends", max_wait_seconds)
            return
        if not interrupted and waited >= grace_seconds and may_interrupt():
            interrupted = interrupt_thread(worker, interrupt_with)
            if interrupted:
                logger.info("the job was not at a step boundary: interrupting it")
        try:
            time.sleep(POLL_SECONDS)
        except BaseException:  # a repeated cancel request: keep waiting for the clean-up
            continue
