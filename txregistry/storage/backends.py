"""
Building the configured storage backend: the disk alone, or a bucket with
the disk as its local tier (C{[storage] backend}).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from txregistry.config.model import Config, S3Config
from txregistry.storage.disk import DiskStorage
from txregistry.storage.interface import IStorage
from txregistry.storage.runner import BlockingRunner
from txregistry.storage.s3 import S3Storage
from txregistry.storage.s3_client import S3Client
from txregistry.storage.staging import InlineSpool, SpoolFactory
from txregistry.upstream.endpoints import load_ca_file

# A bucket that does not accept a connection this fast is treated as down.
_CONNECT_TIMEOUT = 10.0


def s3_client(reactor: IReactorTime, config: S3Config) -> S3Client:
    """A client for the bucket, on a persistent connection pool of its own."""
    policy = (
        BrowserLikePolicyForHTTPS(trustRoot=load_ca_file(config.ca_file))
        if config.ca_file is not None
        else BrowserLikePolicyForHTTPS()
    )
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    agent = Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=_CONNECT_TIMEOUT)
    return S3Client(
        agent,
        reactor,
        config.endpoint,
        config.bucket,
        config.region,
        config.path_style,
        config.access_key,
        config.secret_key,
    )


def make_storage(
    config: Config,
    reactor: IReactorTime,
    run_blocking: BlockingRunner,
    spools: SpoolFactory = InlineSpool,
) -> IStorage:
    local = DiskStorage(
        config.cache.directory, config.cache.size_limit, run_blocking, spools=spools
    )
    s3 = config.storage.s3
    if config.storage.backend != "s3" or s3 is None:
        return local
    return S3Storage(
        local,
        s3_client(reactor, s3),
        s3.prefix,
        run_blocking,
        reactor,
        size_limit=s3.size_limit,
        tag_ttl=config.cache.tag_ttl,
    )


__all__ = ["make_storage", "s3_client"]
