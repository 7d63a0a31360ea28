"""
Sharing one piece of work among everyone who asks for it at once.

When twenty clients ask for the same uncached blob, one upstream request is
made and the other nineteen wait for its outcome, success or failure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """
    At most one call per key in flight; callers that arrive while it runs
    get its result instead of starting another.

    @ivar joins: how many callers shared another's call, for metrics.
    """

    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[V]]] = {}
        self.joins = 0

    def run(self, key: K, work: Callable[[], Awaitable[V]]) -> Deferred[V]:
        """Run C{work()} for C{key}, or join the run already in flight."""
        result: Deferred[V] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            self.joins += 1
            waiters.append(result)
            return result
        self._waiting[key] = [result]
        Deferred.fromCoroutine(_call(work)).addBoth(self._deliver, key)
        return result

    def _deliver(self, outcome: V | Failure, key: K) -> None:
        for waiter in self._waiting.pop(key, []):
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


async def _call(work: Callable[[], Awaitable[V]]) -> V:
    return await work()
