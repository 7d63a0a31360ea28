"""
The configuration, as the rest of txregistry sees it: frozen dataclasses
with their defaults, and the error every problem with it becomes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DOCKER_HUB_NAMES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# The hosts that serve Docker Hub's registry API, which accepts only Bearer
# tokens from its token service (auth.docker.io).  Basic auth is never sent
# to them, whatever registry they are a mirror of.  registry-1.docker.io is
# the API's host (moby's DefaultRegistryHost, where containers/image sends
# docker.io); index.docker.io and registry.hub.docker.com are older names
# of Docker Hub's hosts, and docker.io the name clients use.
DOCKER_HUB_REGISTRY_HOSTS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


class ConfigError(Exception):
    """A problem with the configuration, naming the key it concerns."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class ServerConfig:
    """
    @ivar admin_listen: where admin requests (offline mode) are served; an
        empty tuple turns them off.
    @ivar header_timeout: how long a client has to send a request's headers,
        counted from its first byte, so that a trickle cannot hold a
        connection for ever.
    @ivar idle_timeout: how long an idle connection is kept.
    @ivar shutdown_timeout: how long a stop waits for downloads in progress
        to finish before it drops them.
    @ivar push_from: the client networks (CIDRs) that may push.
    @ivar push_users: with C{push_users_file}, the users who may push, with
        Basic credentials; without it, any client in C{push_from} may.
    """

    listen: tuple[str, ...] = ("tcp:5050:interface=127.0.0.1",)
    admin_listen: tuple[str, ...] = ("tcp:5051:interface=127.0.0.1",)
    header_timeout: float = 30.0
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    # Pushes (see PushAccess): who may push, and with which credentials.
    push_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    push_users: PushUsers | None = None


@dataclass(frozen=True)
class PushUsers:
    """
    The users who may push, from C{push_users_file} (an htpasswd file of
    bcrypt hashes, as C{htpasswd -B} writes).  The hashes are kept as
    L{Secret}s: they never appear in a log or a dump of the config.
    """

    path: Path
    hashes: tuple[tuple[str, Secret], ...]

    def hash_for(self, username: str) -> Secret | None:
        for name, hashed in self.hashes:
            if name == username:
                return hashed
        return None


LOG_FORMATS = ("auto", "text", "json", "journal")


@dataclass(frozen=True)
class LogConfig:
    """
    @ivar format: C{text} (twistd's own), C{json} (one object per line on
        standard output), C{journal} (systemd's journal, with fields), or
        C{auto}: the journal when systemd connected our output to it, text
        otherwise.
    @ivar access_log: one line per request.
    """

    format: str = "auto"
    access_log: bool = True


@dataclass(frozen=True)
class CacheConfig:
    """
    @ivar negative_ttl: how long a tag the upstream said does not exist is
        remembered as missing.
    @ivar fill_after_disconnect: whether a download goes on when every
        client that wanted it has gone, so that the next pull is a hit.
    @ivar scrub_rate: bytes per second the background scrub re-hashes; 0
        turns it off.
    """

    directory: Path
    size_limit: int = 20 << 30
    tag_ttl: float = 300.0
    negative_ttl: float = 15.0
    fill_after_disconnect: bool = True
    scrub_rate: int = 4 << 20


class Secret:
    """
    A password or token.  Its C{repr} and C{str} never show it, so that no
    log line, error or dump of the config can.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ProxyServer:
    """An HTTP proxy, and the Basic credentials it wants, if any."""

    host: str
    port: int
    authorization: Secret | None = None

    @property
    def display(self) -> str:
        """The proxy's address, safe to log."""
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxyConfig:
    """
    Which upstream requests go through an HTTP proxy.

    @ivar http: the proxy for C{http://} upstreams (absolute-form requests).
    @ivar https: the proxy for C{https://} upstreams (CONNECT tunnels).
    @ivar no_proxy: hosts, domains (C{.example.com}) and networks
        (C{10.0.0.0/8}) reached directly; C{*} means all.
    """

    http: ProxyServer | None = None
    https: ProxyServer | None = None
    no_proxy: tuple[str, ...] = ()

    def for_url(self, scheme: str, host: str) -> ProxyServer | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or _bypasses_proxy(host, self.no_proxy):
            return None
        return proxy


def _bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    host = host.lower().strip("[]")
    for entry in no_proxy:
        entry = entry.lower().strip()
        if entry == "*":
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        domain = entry.lstrip(".").split(":")[0]
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


@dataclass(frozen=True)
class UpstreamConfig:
    """
    How upstreams are reached: the C{[upstream]} table, which a registry can
    override in part.
    """

    connect_timeout: float = 5.0
    response_timeout: float = 30.0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    backoff_initial: float = 10.0
    backoff_max: float = 300.0
    body_timeout: float = 30.0
    resume_attempts: int = 3
    # Segmented downloads: a blob larger than segments_above is fetched as
    # this many concurrent Range requests (1: one stream).
    segments: int = 4
    segments_above: int = 64 << 20


@dataclass(frozen=True)
class Credentials:
    """
    A registry user and password.  C{source} says where the password came
    from, for logs; the password itself is a L{Secret}.
    """

    username: str
    password: Secret
    source: str


ADDRESS_FAMILIES = ("ipv4", "ipv6", "any")


@dataclass(frozen=True)
class MirrorConfig:
    """
    One upstream URL of a registry, such as C{https://registry-1.docker.io}.

    @ivar resolve_tags: whether it may be asked what a tag means.  A mirror
        that may not is asked only for content by digest, which txregistry
        verifies, so it cannot swap an image behind a tag.  Such a mirror is
        also never sent the registry's credentials.
    @ivar credentials: this mirror's own user and password, used instead of
        the registry's: a company's mirror of C{docker.io} has other
        accounts than Docker Hub.  They are given for this mirror alone,
        so they go to it even if it is digest-only.
    """

    url: str
    resolve_tags: bool = True
    credentials: Credentials | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def is_docker_hub(self) -> bool:
        """Whether this is Docker Hub's registry API, which must never get Basic auth."""
        return self.host in DOCKER_HUB_REGISTRY_HOSTS


@dataclass(frozen=True)
class RegistryConfig:
    """
    A registry clients can pull from through txregistry.

    @ivar name: the name clients use for it (C{docker.io}, C{ghcr.io}).
    @ivar aliases: other names that select the same registry.
    @ivar mirrors: the upstreams to fetch from, in order.
    @ivar default: whether requests that name no registry go here.
    @ivar address_family: C{"ipv4"}, C{"ipv6"} or C{"any"}: which addresses
        of upstream hosts are resolved and connected to.
    @ivar ca_file: CA certificates to trust for the mirrors' TLS, instead of
        the system's.
    @ivar insecure: do not verify the mirrors' TLS certificates.
    @ivar offline: serve only what is cached, asking no upstream; admin
        requests can change it at runtime.
    @ivar hosted: a registry of its own, on this machine: what clients push
        is stored pinned and served from here; it has no mirrors.
    @ivar push: push-through: pushes go to the origin (the first mirror that
        resolves tags), and are kept in the cache as well.
    @ivar push_chunk_size: the largest request body sent to the origin.
    """

    name: str
    mirrors: tuple[MirrorConfig, ...]
    aliases: tuple[str, ...] = ()
    default: bool = False
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    address_family: str = "ipv4"
    ca_file: Path | None = None
    insecure: bool = False
    credentials: Credentials | None = None
    offline: bool = False
    # Pushes: a hosted registry keeps what clients push and has no mirrors;
    # a push-through one (push) sends pushes to its origin, the first mirror
    # that resolves tags, in request bodies of at most push_chunk_size.
    hosted: bool = False
    push: bool = False
    push_chunk_size: int = 50 << 20

    @property
    def takes_pushes(self) -> bool:
        return self.hosted or self.push

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this registry."""
        return (self.name, *self.aliases)

    @property
    def is_docker_hub(self) -> bool:
        """
        Docker Hub keeps official images under C{library/}, and clients
        leave that out: C{alpine} means C{library/alpine}.  This is about
        the names clients use; how a mirror is authenticated to is decided
        by its own host (L{MirrorConfig.is_docker_hub}).
        """
        return not DOCKER_HUB_NAMES.isdisjoint(self.names)

    def credentials_for(self, mirror: MirrorConfig) -> Credentials | None:
        """
        The credentials a mirror is sent: its own, or else the registry's,
        which go only to mirrors that may resolve tags (a digest-only
        mirror is typically a third party's).
        """
        if mirror.credentials is not None:
            return mirror.credentials
        return self.credentials if mirror.resolve_tags else None


# Storage: where content lives (issue 11).

STORAGE_BACKENDS = ("disk", "s3")


@dataclass(frozen=True)
class S3Config:
    """
    The bucket the fleet shares.  The keys are L{Secret}s; C{*_source}
    says where each came from (a file or a variable), for messages.
    """

    endpoint: str
    bucket: str
    region: str
    access_key: Secret
    secret_key: Secret
    access_key_source: str = ""
    secret_key_source: str = ""
    prefix: str = ""
    path_style: bool = True
    ca_file: Path | None = None
    # The most the bucket may hold under prefix; None: no limit of ours.
    size_limit: int | None = None


@dataclass(frozen=True)
class StorageConfig:
    """C{backend = "disk"}: the local cache only; C{"s3"}: a bucket behind it."""

    backend: str = "disk"
    s3: S3Config | None = None


@dataclass(frozen=True)
class FleetConfig:
    """
    The C{[fleet]} table: the txregistry nodes that share upstream fetches.

    @ivar self_url: this node's URL, as its peers reach it.
    @ivar peers: the other nodes' URLs (without this node's, which the file
        may list too), in the file's order.  Empty: no fleet.
    @ivar timing: the C{[upstream]} table's timeouts and backoff, which
        apply to peers too (its proxy does not: peers are reached directly).
    """

    self_url: str | None = None
    peers: tuple[str, ...] = ()
    timing: UpstreamConfig = field(default_factory=UpstreamConfig)

    @property
    def enabled(self) -> bool:
        return self.self_url is not None and bool(self.peers)


@dataclass(frozen=True)
class Config:
    """
    The whole configuration.

    @ivar source: the file it was read from, or L{None} for the built-in
        defaults.
    """

    cache: CacheConfig
    registries: tuple[RegistryConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    source: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def default_registry(self) -> RegistryConfig | None:
        for registry in self.registries:
            if registry.default:
                return registry
        return None
