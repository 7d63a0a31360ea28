"""
The reactor features each part of txregistry needs, as interfaces, so that
a parameter says what it uses instead of C{Any}.  Twisted's reactors
provide all of them; tests pass a L{twisted.internet.testing.MemoryReactorClock}.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IConnectingReactor(IReactorTCP, IReactorTime):
    """Opens TCP connections within a deadline: the upstream endpoints."""


class IServiceReactor(
    IConnectingReactor, IReactorCore, IReactorThreads, IReactorPluggableNameResolver
):
    """Everything the running service uses: the composition root's reactor."""
