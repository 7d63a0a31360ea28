"""
The C{twistd txregistry} command: its options and its service.

Configuration problems end startup here, with one line naming the key and
the problem and a non-zero exit, before twistd has started anything.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.copyright import version as twisted_version
from twisted.python import usage

from txregistry import __version__
from txregistry.config import Config, ConfigError, default_config, load_config
from txregistry.service import RegistryService


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "A Docker/OCI registry pull-through cache. Without --config it listens on"
        " 127.0.0.1:5050 and caches Docker Hub (registry-1.docker.io)."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (see etc/txregistry.toml)."],
    ]

    def opt_version(self) -> None:
        """
        Display txregistry's version and exit.
        """
        # usage.Options would show Twisted's alone; the docstring above is
        # what --help shows for --version.
        print(f"txregistry {__version__} (Twisted {twisted_version})")
        sys.exit(0)

    def postOptions(self) -> None:
        path = self["config"]
        try:
            self.loaded: Config = load_config(path) if path else default_config()
        except ConfigError as e:
            raise SystemExit(f"txregistry: config error: {e}") from None


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor
    config = options.loaded
    try:
        return RegistryService(config, reactor)
    except ConfigError as e:
        where = f"{config.source}: " if config.source else ""
        raise SystemExit(f"txregistry: config error: {where}{e}") from None
