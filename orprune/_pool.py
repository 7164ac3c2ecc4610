"""A process pool that stops at once on Ctrl-C (private core).

``ProcessPoolExecutor`` alone does not: SIGINT reaches every process of the terminal's process group,
the workers die with their own tracebacks, ``map``'s generator cancels the pending futures, and the
pool's manager thread then fails to mark those cancelled futures broken (``InvalidStateError``) and
never exits, so the interpreter hangs at exit joining it. Here the workers never see SIGINT (they
are started with it blocked, and ignore it), only the parent raises ``KeyboardInterrupt``, and the
parent then terminates the workers, so the pool marks its (never cancelled) futures broken and the
manager thread ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

__all__ = ["interruptible_pool"]


def _worker_init(initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if initializer is not None:
        initializer()


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while workers start, so they inherit it blocked (a Ctrl-C meanwhile
    is delivered when it is unblocked again)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(pool: ProcessPoolExecutor, timeout: float = 1.0) -> None:
    """Terminate the workers (their futures become ``BrokenProcessPool``) and release the pool."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout)
    pool.shutdown(wait=True)


@contextlib.contextmanager
def interruptible_pool(
    n_jobs: int, initializer: Callable[[], None] | None = None
) -> Iterator[Callable[..., Iterator[Any]]]:
    """A ``map(fn, *iterables)`` over ``n_jobs`` spawned processes; results in order, lazily.

    On any exception in the ``with`` body (``KeyboardInterrupt`` included) the workers are
    terminated before it propagates, so no process outlives the block.
    """
    pool = ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(initializer,))

    def mapper(fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        with _sigint_blocked():
            futures: list[Future] = [pool.submit(fn, *args) for args in zip(*iterables)]
        return (future.result() for future in futures)  # never cancelled: see the module docstring

    try:
        yield mapper
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
