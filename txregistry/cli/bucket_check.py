"""
C{txregistry doctor}'s check of the S3 bucket (C{[storage] backend = "s3"}):
a signed round trip with a small object of its own, written, read back,
compared and deleted, so that the endpoint, the addressing style, the
region, the keys and the permissions are all tried at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import treq

from txregistry.config.model import S3Config
from txregistry.storage.backends import s3_client
from txregistry.storage.s3_client import Backoff, S3Error


@dataclass(frozen=True)
class BucketCheck:
    ok: bool
    text: str


async def check_bucket(reactor: Any, config: S3Config) -> BucketCheck:
    client = s3_client(reactor, config)
    # One attempt: the doctor reports what happens, it does not hide it.
    client.backoff = replace(Backoff(), attempts=1)
    where = f"bucket {config.bucket} at {config.endpoint}"
    key = f"{config.prefix}doctor/{os.urandom(8).hex()}"
    probe = os.urandom(64)
    step = "PUT"
    try:
        await client.put_object(key, probe)
        step = "GET"
        response = await client.get_object(key)
        if response is None:
            return BucketCheck(False, f"{where}: {key} was written but reads as missing")
        body = await treq.content(response)
        step = "DELETE"
        await client.delete_object(key)
    except S3Error as e:
        return BucketCheck(False, f"{where}: the signed {step} failed: {e}{_hint(e)}")
    if body != probe:
        return BucketCheck(False, f"{where}: {key} read back other bytes than were written")
    return BucketCheck(True, f"{where}: signed PUT, GET and DELETE of a small object work")


def _hint(error: S3Error) -> str:
    if error.status is None:
        return " (check endpoint, and that it is reachable from here)"
    if error.code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"):
        return " (check the keys, region and the key's permissions on the bucket)"
    if error.code == "NoSuchBucket":
        return " (create the bucket; txregistry never does)"
    if error.code in ("AuthorizationHeaderMalformed", "PermanentRedirect"):
        return " (check region, and path_style)"
    return ""


@dataclass(frozen=True)
class BucketStats:
    blobs: int
    manifests: int
    tags: int
    size: int


async def bucket_stats(reactor: Any, config: S3Config) -> BucketStats:
    """What the bucket holds under the prefix, from a listing (for C{cache stats})."""
    client = s3_client(reactor, config)
    client.backoff = replace(Backoff(), attempts=2)
    counts = {"blobs/": 0, "manifests/": 0, "tags/": 0}
    size = 0
    for item in await client.list_objects(config.prefix):
        rest = item.key[len(config.prefix) :]
        for folder in counts:
            if rest.startswith(folder):
                counts[folder] += 1
                if folder != "tags/":
                    size += item.size
    return BucketStats(counts["blobs/"], counts["manifests/"], counts["tags/"], size)


def run_bucket_stats(config: S3Config) -> BucketStats | S3Error:
    """L{bucket_stats} on a reactor of its own, for the command line."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    results: list[BucketStats | S3Error] = []

    async def count(reactor: Any) -> None:
        try:
            results.append(await bucket_stats(reactor, config))
        except S3Error as e:
            results.append(e)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(count(reactor)))
    except SystemExit:  # react() always ends with sys.exit
        pass
    return results[0]
