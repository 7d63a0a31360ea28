"""
Assembling txregistry into a Twisted service.

Startup order matters, because a daemon that depends on txregistry must not
be told it is ready before it can pull:

 1. C{privilegedStartService}: every listener is bound (before twistd drops
    privileges, so that a port below 1024 works);
 2. C{startService}: the cache is opened, and tag answers kept by an
    earlier version are brought into the current layout;
 3. once the reactor runs and that is done, C{txregistry ready} is logged.

A failure in 1 stops startup with one line and a non-zero exit; the reactor
is not running yet, which is the only time twistd can still exit non-zero.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHostnameResolver,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python.threadpool import ThreadPool
from twisted.web.iweb import IAgent
from twisted.web.server import Site

from txregistry import __version__
from txregistry.config import Config, ConfigError, RegistryConfig
from txregistry.http.admin import AdminResource
from txregistry.http.exchange import Finished
from txregistry.http.push_access import PushAccess
from txregistry.http.resource import RegistryResource
from txregistry.http.routing import Router
from txregistry.http.site import RegistrySite
from txregistry.http.uploads import PushAPI
from txregistry.ops.files import SELECT_LIMIT, ExhaustionReporter, FileDescriptors, raise_soft_limit
from txregistry.ops.listen import ReloadableTLS, server_endpoint
from txregistry.ops.logs import choose_observer
from txregistry.ops.metrics import Metrics
from txregistry.ops.systemd import notify
from txregistry.reactors import IServiceReactor
from txregistry.repository.choose import ByRegistry
from txregistry.repository.hosted import HostedRepository
from txregistry.repository.interface import IRepository
from txregistry.repository.pullthrough import PullThroughCache
from txregistry.repository.push import IPushTarget
from txregistry.repository.push_through import PushThroughRepository
from txregistry.repository.uploads import Uploads
from txregistry.storage.backends import make_storage
from txregistry.storage.interface import IStorage
from txregistry.storage.runner import in_thread_pool
from txregistry.storage.scrub import Scrubber
from txregistry.storage.staging import threaded_spools
from txregistry.upstream.client import Upstream
from txregistry.upstream.dns import ExplainingResolver
from txregistry.upstream.endpoints import peer_agent, registry_agent
from txregistry.upstream.peers import Fleet
from txregistry.upstream.push import OriginPusher
from txregistry.upstream.push.diagnosis import format_size


class Listener(Service):
    """One listening endpoint, from one C{[server] listen} description."""

    log = Logger()

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        exhaustion: ExhaustionReporter | None = None,
    ) -> None:
        """
        @param exhaustion: takes the port's accept failures, so that running
            out of file descriptors is reported once per interval.
        """
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self._exhaustion = exhaustion
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        outcome: list[Any] = []
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(
                f"txregistry: cannot listen on {self.description}: endpoint did not bind at once"
            )
        result = outcome[0]
        if not IListeningPort.providedBy(result):
            raise SystemExit(
                f"txregistry: cannot listen on {self.description}: {result.getErrorMessage()}"
            )
        self.port = result
        if self._exhaustion is not None:
            self._exhaustion.watch(result)
        self.log.info(
            "listening on {description} ({address})",
            description=self.description,
            address=_address(result),
        )

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def _address(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        return f"{host.host}:{host.port}"
    return str(host)


# Module-level: as a class attribute, a Logger takes the class's namespace.
_access_log = Logger(namespace="txregistry.access")


class RegistryService(MultiService):
    """The whole of txregistry: cache, upstreams, HTTP API and listeners."""

    log = Logger()

    def __init__(
        self, config: Config, reactor: IServiceReactor, resolver: IHostnameResolver | None = None
    ) -> None:
        """
        @param resolver: resolves upstream host names: C{getaddrinfo} in
            the reactor's thread pool, keeping its errors, unless a test
            injects one.
        @raise ConfigError: for a listen description that cannot be used, or
            a certificate or C{ca_file} that holds no certificate.
        """
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.threadpool = ThreadPool(minthreads=1, maxthreads=4, name="txregistry-storage")
        run_blocking = in_thread_pool(reactor, self.threadpool)
        self.storage: IStorage = make_storage(
            config,
            reactor,
            run_blocking,
            spools=threaded_spools(reactor),
        )
        self.scrubber = Scrubber(self.storage, run_blocking, reactor, config.cache.scrub_rate)
        self.files = FileDescriptors(clock=reactor)
        self.exhaustion = ExhaustionReporter(reactor, self.files)
        clock = reactor
        resolver = resolver or ExplainingResolver.for_reactor(reactor)
        # Fleet mode: peers are asked for content by digest before the
        # upstream (txregistry.upstream.peers).
        self.fleet: Fleet | None = None
        peers: IAgent | None = None
        if config.fleet.enabled:
            self.fleet = Fleet(config.fleet, clock)
            peers = peer_agent(reactor, resolver, config.fleet)
        self.upstreams = {
            r.name: Upstream(r, registry_agent(reactor, resolver, r), clock, self.fleet, peers)
            for r in config.registries
            if not r.hosted
        }
        self.cache = PullThroughCache(self.storage, self.upstreams, clock, config.cache)
        self.metrics = Metrics(
            self.cache, self.upstreams, self.storage, self.scrubber, fleet=self.fleet
        )
        self.metrics.watch_files(self.files)
        router = Router(config.registries)
        server = config.server

        # Pushes: hosted registries keep what is pushed to them; the
        # registries that take pushes are the keys of push_targets.
        self.hosted = HostedRepository(self.storage, clock)
        pulls: dict[str, IRepository] = {}
        push_targets: dict[str, IPushTarget] = {}
        for registry in config.registries:
            if registry.hosted:
                pulls[registry.name] = self.hosted
                push_targets[registry.name] = self.hosted
        # Push-through: pushes go on to the origin, on an agent (and a
        # connection pool) apart from the pulls', so that long uploads never
        # hold the connections pulls need.
        for registry in config.registries:
            if registry.push:
                pusher = OriginPusher(registry, registry_agent(reactor, resolver, registry), clock)
                push_targets[registry.name] = PushThroughRepository(self.storage, pusher, clock)
        self.uploads = Uploads(self.storage, clock)
        self.push_access = PushAccess(server.push_from, server.push_users, run_blocking, clock)

        resource = RegistryResource(
            router,
            ByRegistry(self.cache, pulls),
            clock,
            self.health,
            self.metrics.render,
            self._finished,
            peers=config.fleet.peers,
            push=PushAPI(push_targets, self.uploads),
            access=self.push_access,
        )
        self.site = RegistrySite(
            resource,
            header_timeout=server.header_timeout,
            idle_timeout=server.idle_timeout,
            reactor=reactor,
        )
        self.admin_site = Site(AdminResource(router, self.upstreams), reactor=reactor)
        self.admin_site.noisy = False
        self.tls: list[ReloadableTLS] = []
        self.listeners = self._listeners("server.listen", server.listen, self.site)
        self.admin_listeners = self._listeners(
            "server.admin_listen", server.admin_listen, self.admin_site
        )
        self._figures = LoopingCall(self.storage.update_figures)
        self._figures.clock = clock
        # The S3 backend's upkeep: multipart uploads a crash left behind, and
        # the bucket's size limit.
        bucket_upkeep = getattr(self.storage, "upkeep", None)
        self._bucket_upkeep = LoopingCall(bucket_upkeep) if bucket_upkeep else None
        if self._bucket_upkeep is not None:
            self._bucket_upkeep.clock = clock
        self.ready = False

    def _listeners(self, key: str, descriptions: tuple[str, ...], factory: Site) -> list[Listener]:
        listeners = []
        for i, description in enumerate(descriptions):
            try:
                endpoint, tls = server_endpoint(self._reactor, description)
            except ConfigError as e:
                where = f"{key}[{i}]" + (f" ({e.where})" if e.where else "")
                raise ConfigError(where, e.problem) from None
            if tls is not None:
                self.tls.append(tls)
            listener = Listener(description, endpoint, factory, self.exhaustion)
            listener.setServiceParent(self)
            listeners.append(listener)
        return listeners

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        # Under twistd the parent is the application, which may carry the
        # log observer twistd then uses instead of its own (AppLogger.start).
        observer = choose_observer(self.config.log.format)
        if observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, observer)

    def privilegedStartService(self) -> None:
        self.log.info(
            "txregistry {version} starting with {source}",
            version=__version__,
            source=f"config file {self.config.source}"
            if self.config.source
            else "built-in defaults",
        )
        for registry in self.config.registries:
            _log_registry(self.log, registry)
        if self.fleet is not None:
            self.log.info(
                "fleet: this node is {self_url}; peers {peers}",
                self_url=self.fleet.self_url,
                peers=", ".join(self.config.fleet.peers),
            )
        # Before any listener binds; a select() reactor cannot use more.
        raise_soft_limit(
            self.files, SELECT_LIMIT if isinstance(self._reactor, SelectReactor) else None
        )
        for tls in self.tls:
            self.log.info(
                "TLS certificate {path}: {subject}, valid until {expires}",
                path=str(tls.certificate),
                subject=tls.subject,
                expires=tls.expires,
            )
        super().privilegedStartService()

    def startService(self) -> None:
        self.threadpool.start()
        self.storage.start()
        if self.storage.status != "unavailable":
            self.log.info("cache open in {directory}", directory=str(self.config.cache.directory))
        super().startService()
        if self.tls:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
        self._figures.start(15, now=True)
        self.scrubber.start()
        if self._bucket_upkeep is not None:
            self._bucket_upkeep.start(3600, now=True)
        # Tag answers an earlier version kept are brought into the current
        # layout before we say we are ready, so that a restart onto this
        # version still serves them when the upstream is down.
        migrated = Deferred.fromCoroutine(self.cache.migrate_tag_answers())
        migrated.addErrback(
            lambda failure: self.log.failure(
                "bringing tag answers into the current layout failed;"
                " tags are fetched from the upstream again",
                failure,
            )
        )
        self._reactor.callWhenRunning(
            lambda: migrated.addCallback(lambda _: self._announce_ready())
        )

    def _sighup(self, signum: int, frame: Any) -> None:
        # A signal handler must not touch the reactor's state directly.
        self._reactor.callFromThread(self.reload_tls)

    def reload_tls(self) -> None:
        """Reread every TLS listener's certificate: new connections get the new one."""
        for tls in self.tls:
            tls.reload()

    def _announce_ready(self) -> None:
        if not self.running:
            return
        self.ready = True
        addresses = ", ".join(
            _address(listener.port) for listener in self.listeners if listener.port is not None
        )
        self.log.info("txregistry ready")
        notify(f"READY=1\nSTATUS=serving on {addresses}")

    def _finished(self, finished: Finished) -> None:
        self.metrics.request_done(finished.kind, finished.status, finished.cache, finished.sent)
        if self.config.log.access_log:
            _access_log.info(
                '{client} "{method} {path}" {status} {cache} {sent}B {duration:.3f}s{aborted}',
                client=finished.client,
                method=finished.method,
                path=finished.path,
                status=finished.status,
                cache=finished.cache or "-",
                sent=finished.sent,
                duration=finished.duration,
                aborted=" aborted" if finished.aborted else "",
            )

    def stopService(self) -> Any:
        """
        Stop accepting clients, let downloads in progress finish (for at
        most C{shutdown_timeout}) so that they are cached, then close the
        cache.  What does not finish in time is dropped cleanly: nothing
        partial is ever stored.
        """
        self.ready = False
        notify("STOPPING=1\nSTATUS=stopping")
        if self.tls and hasattr(self, "_previous_sighup"):
            signal.signal(signal.SIGHUP, self._previous_sighup)
        if self._figures.running:
            self._figures.stop()
        self.scrubber.stop()
        self.exhaustion.stop()
        if self._bucket_upkeep is not None and self._bucket_upkeep.running:
            self._bucket_upkeep.stop()
        listeners_stopped = super().stopService()
        return Deferred.fromCoroutine(self._stop(listeners_stopped))

    async def _stop(self, listeners_stopped: Any) -> None:
        if listeners_stopped is not None:
            await listeners_stopped
        await self.cache.drain(self.config.server.shutdown_timeout)
        self.uploads.drop_all()
        self.threadpool.stop()
        self.storage.stop()

    def health(self) -> tuple[int, dict[str, Any]]:
        """
        What C{/health} says: 200 once listening with the cache open, the
        cache's state and each mirror's.  It holds no secrets.  The status
        is C{degraded} when the cache cannot store, file descriptors ran
        out recently, or a registry has no usable mirror; the HTTP status
        stays 200 since cached content is still served, and restarting
        would not bring an upstream back.
        """
        cache = self.storage.describe()
        cache["scrub"] = self.scrubber.describe()
        # Pushed content is pinned: counted apart, since eviction never touches it.
        figures = self.storage.figures
        cache["size"] = figures.size
        cache["pinned"] = {"bytes": figures.pinned_size, "entries": figures.pinned_entries}
        cache["uploads_in_progress"] = len(self.uploads)
        status = "ok" if self.storage.status == "ok" else "degraded"
        files = self.files.describe()
        if self.files.exhausted_recently():
            # Clients are being turned away at the door.
            status = "degraded"
            files["problem"] = "out of file descriptors recently: connections were refused"
        registries = {name: upstream.describe() for name, upstream in self.upstreams.items()}
        unavailable = sorted(n for n, r in registries.items() if r["status"] == "unavailable")
        if unavailable:
            status = "degraded"
        document: dict[str, Any] = {
            "status": status,
            "version": __version__,
            "cache": cache,
            "registries": registries,
            "file_descriptors": files,
        }
        if unavailable:
            document["unavailable_registries"] = unavailable
        if self.fleet is not None:
            document["fleet"] = self.fleet.describe()
        return 200, document


def _log_registry(log: Logger, registry: RegistryConfig) -> None:
    """Say how a registry's upstreams are reached, once, at startup."""
    if registry.hosted:
        log.info(
            "registry {name}{default}: hosted here; what is pushed to it is kept, pinned",
            name=registry.name,
            default=" (default)" if registry.default else "",
        )
        return
    mirrors = ", ".join(
        m.url if m.resolve_tags else f"{m.url} (digest-only)" for m in registry.mirrors
    )
    log.info(
        "registry {name}{default}: mirrors {mirrors}; {family} connections",
        name=registry.name,
        default=" (default)" if registry.default else "",
        mirrors=mirrors,
        family={"ipv4": "IPv4-only", "ipv6": "IPv6-only", "any": "IPv4 and IPv6"}[
            registry.address_family
        ],
    )
    if registry.push:
        origin = next(m for m in registry.mirrors if m.resolve_tags)
        log.info(
            "registry {name}: push-through to {origin}, in request bodies of at most {chunk}",
            name=registry.name,
            origin=origin.url,
            chunk=format_size(registry.push_chunk_size),
        )
    if registry.credentials is not None:
        log.info(
            "using credentials for registry {name} (user: {user}, password from {source})",
            name=registry.name,
            user=registry.credentials.username,
            source=registry.credentials.source,
        )
    for mirror in registry.mirrors:
        if mirror.credentials is not None:
            log.info(
                "using credentials for registry {name} mirror {mirror}"
                " (user: {user}, password from {source})",
                name=registry.name,
                mirror=mirror.url,
                user=mirror.credentials.username,
                source=mirror.credentials.source,
            )
    if registry.insecure:
        log.warn(
            "registry {name}: TLS certificates of its mirrors are NOT verified (insecure = true)",
            name=registry.name,
        )
    proxy = registry.upstream.proxy
    for scheme, server in (("https", proxy.https), ("http", proxy.http)):
        if server is not None and any(m.url.startswith(scheme + ":") for m in registry.mirrors):
            log.info(
                "registry {name}: {scheme} upstreams through proxy {proxy}{except_}",
                name=registry.name,
                scheme=scheme,
                proxy=server.display,
                except_=f", except {', '.join(proxy.no_proxy)}" if proxy.no_proxy else "",
            )
