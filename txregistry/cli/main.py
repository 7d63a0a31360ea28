"""
The C{txregistry} command: diagnosis and upkeep beside the service.

    txregistry doctor [--config FILE] [--push REGISTRY[/REPOSITORY]]
    txregistry prefetch [--server URL] [--config FILE] REF... [--platform P | --all-platforms]
    txregistry cache stats|verify|gc [--config FILE] [--grace DURATION]
    txregistry config check FILE

Without C{--config}, the commands read C{/etc/txregistry/txregistry.toml}
if it exists, and the built-in defaults otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import IO, Any, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txregistry import __version__
from txregistry.config import (
    Config,
    ConfigError,
    MirrorConfig,
    S3Config,
    default_config,
    load_config,
    parse_duration,
)
from txregistry.ops.listen import server_endpoint
from txregistry.repository import hosted_gc
from txregistry.storage import upkeep
from txregistry.storage.disk import DiskStorage
from txregistry.storage.runner import run_inline
from txregistry.upstream.endpoints import MirrorTLSPolicy

T = TypeVar("T")

DEFAULT_CONFIG = "/etc/txregistry/txregistry.toml"


def _load(path: str | None) -> Config:
    if path is None:
        return load_config(DEFAULT_CONFIG) if os.path.exists(DEFAULT_CONFIG) else default_config()
    return load_config(path)


def check_config(path: str, out: IO[str]) -> int:
    """Validate a config file, certificates included, and say what it sets up."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"txregistry: config error: {e}", file=sys.stderr)
        return 1
    try:
        # What startup would refuse, short of binding ports: endpoint
        # descriptions, TLS certificates, CA files.
        from twisted.internet import reactor

        for key, descriptions in (
            ("server.listen", config.server.listen),
            ("server.admin_listen", config.server.admin_listen),
        ):
            for i, description in enumerate(descriptions):
                try:
                    server_endpoint(reactor, description)
                except ConfigError as e:
                    raise ConfigError(f"{key}[{i}]", e.problem) from None
        for i, registry in enumerate(config.registries):
            try:
                MirrorTLSPolicy.for_registry(registry)
            except ConfigError as e:
                raise ConfigError(f"registry[{i}].ca_file", e.problem) from None
    except ConfigError as e:
        print(f"txregistry: config error: {path}: {e}", file=sys.stderr)
        return 1
    print(f"{path}: OK", file=out)
    print(f"  listen: {', '.join(config.server.listen)}", file=out)
    if config.server.admin_listen:
        print(f"  admin: {', '.join(config.server.admin_listen)}", file=out)
    print(f"  cache: {config.cache.directory}, up to {config.cache.size_limit} bytes", file=out)
    for registry in config.registries:
        mirrors = ", ".join(_describe_mirror(m) for m in registry.mirrors)
        extras = []
        if registry.default:
            extras.append("default")
        if registry.credentials is not None:
            extras.append(f"user {registry.credentials.username}")
        if registry.offline:
            extras.append("offline")
        if registry.push:
            extras.append(f"push-through, chunks of at most {registry.push_chunk_size} bytes")
        suffix = f" ({', '.join(extras)})" if extras else ""
        if registry.hosted:
            mirrors = "hosted here, pushed content kept pinned"
        print(f"  registry {registry.name}{suffix}: {mirrors}", file=out)
    server = config.server
    users = f", users from {server.push_users.path}" if server.push_users else ", no credentials"
    if any(r.takes_pushes for r in config.registries):
        print(f"  pushes from: {', '.join(server.push_from)}{users}", file=out)
    return 0


def _describe_mirror(mirror: MirrorConfig) -> str:
    notes = [] if mirror.resolve_tags else ["digest-only"]
    if mirror.credentials is not None:
        notes.append(f"user {mirror.credentials.username}")
    return mirror.url + (f" ({', '.join(notes)})" if notes else "")


def cache_command(
    action: str, config: Config, out: IO[str], grace: float = hosted_gc.DEFAULT_GRACE
) -> int:
    """C{cache stats}, C{cache verify} and C{cache gc}, on the cache directory."""
    storage = DiskStorage(config.cache.directory, config.cache.size_limit, run_inline)
    # Not exclusive: the service may be running on the same cache.
    storage.open(exclusive=False)
    if storage.status == "unavailable":
        print(f"txregistry: {storage.problem}", file=sys.stderr)
        return 1
    try:
        if action == "stats":
            found = _now(upkeep.stats(storage))
            figures, kinds = found.figures, found.by_kind
            hits, misses = figures.hits, figures.misses
            answers = hits + misses
            ratio = f"{100 * hits / answers:.1f}%" if answers else "-"
            limit = config.cache.size_limit
            print(f"directory   {config.cache.directory}", file=out)
            print(
                f"size        {_size(figures.size)} of {_size(limit)}"
                f" ({100 * figures.size // max(limit, 1)}%)",
                file=out,
            )
            print(
                f"entries     {figures.entries} ({kinds['blob']} blobs,"
                f" {kinds['manifest']} manifests, {kinds['tag']} tags)",
                file=out,
            )
            print(
                f"pinned      {_size(figures.pinned_size)} in {figures.pinned_entries} entries"
                " (never evicted)",
                file=out,
            )
            print(f"hit ratio   {ratio} ({hits} hits, {misses} misses)", file=out)
            print(
                f"corrupt     {figures.corrupt_removed} entries removed"
                " (wrong size or digest, found on reading, by the scrub or by verify)",
                file=out,
            )
            bucket = config.storage.s3
            if config.storage.backend == "s3" and bucket is not None:
                _print_bucket_stats(bucket, out)
        elif action == "verify":
            checked, removed = _now(upkeep.verify(storage))
            for key in removed:
                print(f"removed corrupt entry {key}", file=out)
            print(
                f"verified {checked} blobs and manifests: {len(removed)} corrupt, removed", file=out
            )
        else:
            collected = _now(hosted_gc.collect(storage, time.time(), grace))
            evicted = _now(upkeep.gc(storage))
            size = _now(upkeep.stats(storage)).figures.size
            print(f"evicted {evicted} entries; the cache holds {_size(size)}", file=out)
            print(
                f"removed {len(collected.manifests)} manifests and {len(collected.blobs)} blobs"
                f" that no hosted manifest names; kept {collected.kept_for_grace} used within"
                f" the last {_duration(grace)} (pushes in progress)",
                file=out,
            )
    finally:
        storage.close()
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds:g}s"


def _print_bucket_stats(bucket: S3Config, out: IO[str]) -> None:
    """The shared tier, for C{cache stats} with C{backend = "s3"}."""
    from txregistry.cli.bucket_check import run_bucket_stats

    found = run_bucket_stats(bucket)
    where = f"{bucket.bucket} at {bucket.endpoint}" + (
        f" under {bucket.prefix}" if bucket.prefix else ""
    )
    print(f"bucket      {where}", file=out)
    if isinstance(found, Exception):
        print(f"            cannot be listed: {found}", file=out)
        return
    limit = f" of {_size(bucket.size_limit)}" if bucket.size_limit else ""
    print(
        f"            {_size(found.size)}{limit}: {found.blobs} blobs, {found.manifests} manifests,"
        f" {found.tags} tags",
        file=out,
    )


def _now(work: Coroutine[Any, Any, T]) -> T:
    """The result of upkeep run with an inline runner, which never waits."""
    results: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(results.append)
    (result,) = results
    if isinstance(result, Failure):
        result.raiseException()
    return cast(T, result)


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f} TiB"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="txregistry", description="Diagnosis and upkeep for txregistry, the registry cache."
    )
    parser.add_argument("--version", action="version", version=f"txregistry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    doctor = commands.add_parser("doctor", help="check every registry's mirrors from this machine")
    doctor.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG})")
    doctor.add_argument(
        "--push",
        metavar="REGISTRY[/REPOSITORY]",
        help="instead, push a test image to the registry's origin, step by step, and clean up",
    )

    prefetch = commands.add_parser("prefetch", help="warm a running txregistry's cache with images")
    prefetch.add_argument(
        "references", nargs="+", metavar="REF", help="alpine:3.20, ghcr.io/org/img@sha256:..."
    )
    prefetch.add_argument(
        "--server", help="txregistry's URL (default: its first listener in the config)"
    )
    prefetch.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG})")
    platforms = prefetch.add_mutually_exclusive_group()
    platforms.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    platforms.add_argument(
        "--all-platforms", action="store_true", help="every platform of an index"
    )

    cache = commands.add_parser("cache", help="the cache's figures, verification and size limit")
    cache.add_argument("action", choices=["stats", "verify", "gc"])
    cache.add_argument("--config", help=f"config file (default: {DEFAULT_CONFIG})")
    cache.add_argument(
        "--grace",
        default="1h",
        help="gc: keep pushed blobs unused for less than this, for pushes in progress (1h)",
    )

    config_parser = commands.add_parser("config", help="validate a config file")
    config_parser.add_argument("action", choices=["check"])
    config_parser.add_argument("file")

    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            return check_config(args.file, sys.stdout)
        config = _load(args.config)
        if args.command == "cache":
            try:
                grace = parse_duration(args.grace)
            except ValueError as e:
                print(f"txregistry: --grace: {e}", file=sys.stderr)
                return 2
            return cache_command(args.action, config, sys.stdout, grace)
        if args.command == "prefetch":
            from txregistry.cli.prefetch import (
                PrefetchError,
                host_platform,
                run,
                server_from_listen,
            )

            try:
                server = args.server or server_from_listen(config.server.listen)
            except PrefetchError as e:
                print(f"txregistry prefetch: {e}", file=sys.stderr)
                return 2
            wanted = None if args.all_platforms else (args.platform or host_platform())
            return run(server, args.references, wanted)
        return run_doctor(config, args.push)
    except ConfigError as e:
        print(f"txregistry: config error: {e}", file=sys.stderr)
        return 2


def run_doctor(config: Config, push: str | None = None) -> int:
    """Run the doctor (or its test push) on a reactor of its own; return its exit code."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from txregistry.cli.doctor import doctor
    from txregistry.cli.doctor_push import doctor_push

    codes: list[int] = []

    async def diagnose(reactor: object) -> None:
        if push is not None:
            codes.append(await doctor_push(reactor, config, push, sys.stdout))
        else:
            codes.append(await doctor(reactor, config, sys.stdout))

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(diagnose(reactor)))
    except SystemExit as e:  # react() always ends with sys.exit
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else 1
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main())
