"""
Running a backend's blocking calls where they cannot stall the reactor.

Every backend gets one runner and sends every call that may block through
it: in the service, a thread pool of the storage's own; in the command line
and in tests that drive the reactor by hand, the caller's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingRunner(Protocol):
    """Runs a blocking call somewhere it cannot stall the reactor."""

    def __call__(self, f: Callable[..., T], /, *args: Any) -> Deferred[T]: ...


def run_inline(f: Callable[..., T], /, *args: Any) -> Deferred[T]:
    """Run the call at once, on this thread: for the command line and for tests."""
    return maybeDeferred(f, *args)


def in_thread_pool(reactor: IReactorFromThreads, pool: ThreadPool) -> BlockingRunner:
    """Run calls in C{pool}, and report their results in the reactor's thread."""

    def run(f: Callable[..., T], /, *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, f, *args)

    return run
