"""
File descriptors: the soft limit raised at startup, and running out of them
said once per interval with a count, in memory with a Clock.
"""

from __future__ import annotations

import resource

import pytest
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from txregistry.config import CacheConfig, Config, ServerConfig
from txregistry.ops.files import (
    RECENT,
    REPORT_INTERVAL,
    ExhaustionReporter,
    FileDescriptors,
    raise_soft_limit,
)
from txregistry.service import RegistryService


def accept_failure(reporter: ExhaustionReporter, error: str = "EMFILE") -> None:
    """What Twisted's accept loop logs for one connection it cannot accept (tcp._accept)."""
    Logger(namespace="twisted.internet.tcp.Port", observer=reporter).info(
        "Could not accept new connection ({acceptError})", acceptError=error
    )


def reserved_fd_recovery(reporter: ExhaustionReporter, clients: int) -> None:
    logger = Logger(namespace="twisted.internet.tcp.Port", observer=reporter)
    logger.info("EMFILE encountered; releasing reserved file descriptor.")
    for i in range(clients):
        logger.info("EMFILE recovery: Closed socket from {address}", address=("127.0.0.1", i))
    logger.info("Re-reserving EMFILE recovery file descriptor.")


@pytest.fixture
def reporter():
    clock = Clock()
    forwarded: list[dict] = []
    files = FileDescriptors(soft_limit=1024, hard_limit=4096, clock=clock)
    reporter = ExhaustionReporter(clock, files, forwarded.append)
    reporter.clock, reporter.files, reporter.forwarded = clock, files, forwarded
    yield reporter
    reporter.stop()
    assert not clock.getDelayedCalls()


def test_a_flood_of_accept_failures_is_one_line_per_interval_with_a_count(reporter, logs):
    for _ in range(500):
        accept_failure(reporter)
    lines = logs.matching("out of file descriptors")
    assert len(lines) == 1, "the first failure is said at once, the rest wait"
    assert "1 connections could not be accepted (soft limit 1024" in lines[0]
    assert not logs.matching("EMFILE") and reporter.forwarded == []

    reporter.clock.advance(REPORT_INTERVAL / 2)
    for _ in range(250):
        accept_failure(reporter, "ENFILE")
    assert len(logs.matching("out of file descriptors")) == 1
    reporter.clock.advance(REPORT_INTERVAL / 2)
    lines = logs.matching("out of file descriptors")
    assert len(lines) == 2
    assert "749 connections could not be accepted since the last report" in lines[1]
    assert reporter.files.refused_total == 750

    reporter.clock.advance(REPORT_INTERVAL)
    assert len(logs.matching("out of file descriptors")) == 2, "nothing new, nothing said"
    assert not reporter.clock.getDelayedCalls()


def test_twisteds_reserved_descriptor_recovery_counts_the_clients_turned_away(reporter, logs):
    reserved_fd_recovery(reporter, clients=40)
    reporter.clock.advance(REPORT_INTERVAL)
    reserved_fd_recovery(reporter, clients=2)
    reporter.clock.advance(REPORT_INTERVAL)
    lines = logs.matching("out of file descriptors")
    assert len(lines) == 3
    assert "1 connections" in lines[0] and "39 connections" in lines[1]
    assert "2 connections" in lines[2]
    assert reporter.files.refused_total == 42
    assert not logs.matching("EMFILE")


def test_other_events_of_the_port_pass_through(reporter):
    Logger(namespace="twisted.internet.tcp.Port", observer=reporter).info(
        "{name} starting on {port}", name="site", port=5050
    )
    assert [e["port"] for e in reporter.forwarded] == [5050]
    assert reporter.files.refused_total == 0


def test_exhaustion_is_recent_for_a_while(reporter):
    assert not reporter.files.exhausted_recently()
    accept_failure(reporter)
    assert reporter.files.exhausted_recently()
    assert reporter.files.describe()["exhausted_seconds_ago"] == 0
    reporter.clock.advance(RECENT)
    assert not reporter.files.exhausted_recently()


def test_the_reporter_takes_the_place_of_a_tcp_ports_logger(reporter, logs):
    port = tcp.Port(0, None, interface="127.0.0.1")
    assert reporter.watch(port)
    port._logger.info("Could not accept new connection ({acceptError})", acceptError="EMFILE")
    assert reporter.files.refused_total == 1
    assert tcp.Port._logger.observer is not reporter, "only this port's, not the class's"


@pytest.fixture
def nofile():
    """Restores the soft limit after a test changes it."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_soft_limit_is_raised_to_the_hard_limit(nofile, logs):
    _, hard = nofile
    if hard == resource.RLIM_INFINITY or hard < 64:
        pytest.skip("needs a finite hard limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
    files = FileDescriptors()
    raise_soft_limit(files)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    assert (files.soft_limit, files.hard_limit) == (hard, hard)
    assert logs.matching(f"file descriptors: soft limit raised from {hard // 2} to {hard}")

    raise_soft_limit(files)
    assert logs.matching(f"file descriptors: soft limit {hard}, the hard limit; raise LimitNOFILE")


def test_a_select_reactor_keeps_within_fd_setsize(nofile, logs):
    _, hard = nofile
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip("needs a hard limit above 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    files = FileDescriptors()
    raise_soft_limit(files, ceiling=1024)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1024
    assert logs.matching("file descriptors: soft limit raised from 256 to 1024")


def test_health_and_metrics_show_the_descriptors(tmp_path):
    config = Config(
        server=ServerConfig(listen=("tcp:5050",), admin_listen=()),
        cache=CacheConfig(tmp_path / "cache"),
        registries=(),
    )
    reactor = MemoryReactorClock()
    service = RegistryService(config, reactor)
    service.files.soft_limit = 2048
    service.storage.open()
    _, document = service.health()
    files = document["file_descriptors"]
    assert files["soft_limit"] == 2048 and files["refused_total"] == 0
    assert isinstance(files["open"], int) and files["open"] > 0
    assert document["status"] == "ok"

    accept_failure(service.exhaustion)
    _, document = service.health()
    assert document["status"] == "degraded"
    assert "out of file descriptors" in document["file_descriptors"]["problem"]
    metrics = service.metrics.render().decode()
    assert "txregistry_fd_limit 2048.0" in metrics
    assert "txregistry_fd_exhaustion_total 1.0" in metrics
    assert "txregistry_open_fds " in metrics
    service.exhaustion.stop()
    service.storage.close()
