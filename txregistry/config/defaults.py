"""What txregistry uses where the configuration says nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from txregistry.config.model import MirrorConfig, RegistryConfig


def default_cache_directory(
    environ: Mapping[str, str] = os.environ, euid: int | None = None
) -> Path:
    """
    Where the cache goes when the config does not say: systemd's
    C{CacheDirectory=} when it set one, C{/var/cache/txregistry} for root,
    and the XDG cache directory of anyone else, so that a plain
    C{twistd -n txregistry} works for any user.
    """
    if environ.get("CACHE_DIRECTORY"):
        return Path(environ["CACHE_DIRECTORY"].split(":")[0])
    if (os.geteuid() if euid is None else euid) == 0:
        return Path("/var/cache/txregistry")
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(environ.get("HOME", "~")).expanduser() / ".cache"
    return base / "txregistry"


def builtin_registries() -> tuple[RegistryConfig, ...]:
    """The registry used when the config names none: Docker Hub, direct."""
    return (
        RegistryConfig(
            name="docker.io",
            aliases=("index.docker.io", "registry-1.docker.io"),
            mirrors=(MirrorConfig("https://registry-1.docker.io"),),
            default=True,
        ),
    )
