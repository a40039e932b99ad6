"""Connections for the Redis tier: one server (`redis.Redis`) or a cluster (`redis.RedisCluster`).

`Backend.groups(keys)` splits a batch by endpoint (the server, or the cluster node owning each
key's slot), so every batch operation is one pipeline per endpoint, and a dead cluster node costs
only the keys it holds. Connections never retry on their own (the tier's breaker decides when to
try again), and every socket wait is bounded by `timeout_s`.

`startup_error(exc)` tells a misconfiguration (wrong password, missing ACL rights, TLS required or
not offered, untrusted certificate) from a server that is simply down: the first must fail the
start-up with a clear message, the second only makes the tier unavailable until it returns.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (AskError, AuthenticationError, AuthorizationError, ClusterDownError,
                              MovedError, NoPermissionError, RedisClusterException, SlotNotCoveredError,
                              TryAgainError)
from redis.retry import Retry

from lmcache_lab.config import RedisTierConfig

log = logging.getLogger(__name__)

SERVER = "server"        # the endpoint name in single-server mode
UNROUTED = "cluster"     # cluster mode: no slot map yet (no node reachable at start-up)


class RedisTierError(RuntimeError):
    """The Redis tier is misconfigured (credentials, ACL, TLS): raised at start-up, never later."""


class Buffers(tuple):
    """One command argument given as consecutive buffers (e.g. `wire.Encoding.parts()`): sent as
    one bulk string, each buffer as it is."""


class ZeroCopyPacker:
    """RESP command packing that hands every argument buffer over CUTOFF bytes to the socket
    uncopied, and takes `Buffers` arguments. redis-py's default packer with hiredis copies a
    bytearray or memoryview argument twice (`bytes()`, then into one packed command); for chunks
    of megabytes that costs more than sending them (docs/redis.md)."""
    CUTOFF = 6000

    def pack(self, *args) -> list:
        if isinstance(args[0], str):   # "CONFIG GET" is two arguments, as in redis-py
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        out, pending = [], [b"*%d\r\n" % len(args)]
        for arg in args:
            parts = arg if isinstance(arg, Buffers) else (_encode(arg),)
            pending.append(b"$%d\r\n" % sum(map(len, parts)))
            for part in parts:
                if len(part) > self.CUTOFF:
                    out += (b"".join(pending), part)
                    pending = []
                else:
                    pending.append(part)
            pending.append(b"\r\n")
        out.append(b"".join(pending))
        return out


def _encode(value) -> bytes | bytearray | memoryview:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise redis.DataError(f"cannot send an argument of type {type(value).__name__} to Redis")


# bytes per socket read: chunk values are megabytes, and redis-py's default (64 KiB) reads them in
# many small steps (GET of 6 MiB values, loopback: 0.56 GB/s at 64 KiB, 0.68 GB/s at 1 MiB)
SOCKET_READ_BYTES = 2**20


class _ZeroCopyPacking:
    """Mixed into a redis-py connection class: pack commands with `ZeroCopyPacker` (set on the
    connection: redis-py's cluster client does not pass a `command_packer` argument on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._command_packer = ZeroCopyPacker()


CONNECTION_CLASSES = {   # url scheme -> connection class
    scheme: type(f"ZeroCopy{base.__name__}", (_ZeroCopyPacking, base), {})
    for scheme, base in (("redis", redis.Connection), ("rediss", redis.SSLConnection),
                         ("unix", redis.UnixDomainSocketConnection))}


def client_kwargs(cfg: RedisTierConfig) -> dict:
    kw = dict(socket_timeout=cfg.timeout_s, socket_connect_timeout=cfg.timeout_s,
              retry=Retry(NoBackoff(), 0), health_check_interval=0,
              socket_read_size=SOCKET_READ_BYTES,
              connection_class=CONNECTION_CLASSES[(cfg.url or "redis").split(":", 1)[0]])
    if cfg.username is not None:
        kw["username"] = cfg.username
    if cfg.password is not None:
        kw["password"] = cfg.password
    if cfg.db is not None and not cfg.cluster:
        kw["db"] = cfg.db
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if getattr(cfg, name):
            kw[name] = getattr(cfg, name)
    return kw


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def startup_error(exc: BaseException, url: str) -> str | None:
    """A clear message if `exc` means misconfiguration; None if the server is just unreachable."""
    where = redact(url)
    for e in _chain(exc):
        if isinstance(e, AuthenticationError) or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
            return (f"Redis at {where} refused our credentials ({e}): check tiers.redis.username/"
                    f"password (or the user:password in the url)")
        if isinstance(e, (NoPermissionError, AuthorizationError)) or "NOPERM" in str(e):
            return (f"Redis at {where}: the ACL user lacks a permission the tier needs ({e}); it "
                    f"needs GETRANGE SET EXISTS DEL UNLINK TOUCH EXPIRE PING SCAN INFO DBSIZE on the key prefix")
        if isinstance(e, ssl.SSLCertVerificationError):
            return (f"Redis at {where}: the server's TLS certificate is not trusted ({e.verify_message}); "
                    f"set tiers.redis.ssl_ca_certs to the CA that signed it")
        if isinstance(e, ssl.SSLError):
            return f"Redis at {where}: TLS handshake failed ({e}); check the rediss:// url and TLS options"
        if "handshake" in str(e).lower():
            return (f"Redis at {where}: no TLS handshake answer ({e}); the server probably does not "
                    f"speak TLS: use redis:// instead of rediss://")
        if isinstance(e, (ConnectionResetError, BrokenPipeError)) or "closed by server" in str(e):
            if url.startswith("redis://"):
                return (f"Redis at {where} closed the connection during the handshake ({e!r}); it "
                        f"probably requires TLS: use a rediss:// url")
    return None


def redact(url: str) -> str:
    """The url without its password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else ':***'}@{host}"


class Backend:
    """One server or one cluster; hands out per-endpoint clients for pipelines."""

    def __init__(self, cfg: RedisTierConfig):
        assert cfg.url is not None
        self.cfg = cfg
        self.url = cfg.url
        self.cluster = cfg.cluster
        self._kw = client_kwargs(cfg)
        self._lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        self._refresh_due = 0.0
        if not self.cluster:
            self._client = redis.Redis.from_url(self.url, **self._kw)

    # ---- connection -------------------------------------------------------------------------------
    def connect(self) -> None:
        """Reach the server (a cluster: read its slot map from a reachable node); raises what
        redis-py raises. Cluster primaries are then checked one by one by the caller."""
        if self.cluster:
            self._connect_cluster()
        else:
            self._client.ping()

    def _connect_cluster(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                kw = dict(self._kw)
                kw.pop("retry")
                self._client = RedisCluster.from_url(self.url, require_full_coverage=False,
                                                     retry=Retry(NoBackoff(), 0), **kw)
            return self._client

    def probe(self, endpoint: str):
        """A callable that raises while `endpoint` is still unreachable."""
        def ping():
            if endpoint == UNROUTED:
                self._connect_cluster()
            elif self.cluster:
                # A failover may have moved the node's slots to another primary: then there is
                # nothing left to wait for.
                self.refresh_topology(force=True)
                primaries = {n.name: n for n in self._client.get_primaries()}
                if endpoint in primaries:
                    self._client.get_redis_connection(primaries[endpoint]).ping()
            else:
                self._client.ping()
        return ping

    def refresh_topology(self, force: bool = False) -> None:
        """Re-read the slot map (after MOVED, or when a node returns); at most once a second."""
        if not self.cluster or self._client is None:
            return
        now = time.monotonic()
        if not force and now < self._refresh_due:
            return
        self._refresh_due = now + 1.0
        try:
            self._client.nodes_manager.initialize()
        except (redis.RedisError, RedisClusterException) as e:
            log.warning("redis tier: could not refresh the cluster slot map: %r", e)

    # ---- routing ----------------------------------------------------------------------------------
    def groups(self, keys: Sequence[bytes]) -> list[tuple[str, redis.Redis | None, list[int]]]:
        """[(endpoint, client or None, indices into keys)] for full Redis keys; client None: the
        keys cannot be routed (no slot map, or a slot no node serves)."""
        if not self.cluster:
            return [(SERVER, self._client, list(range(len(keys))))]
        rc = self._client
        if rc is None:
            return [(UNROUTED, None, list(range(len(keys))))]
        by_node: dict[str, list[int]] = {}
        nodes = {}
        for i, key in enumerate(keys):
            try:
                node = rc.get_node_from_key(key)
            except SlotNotCoveredError:
                by_node.setdefault(UNROUTED, []).append(i)
                continue
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(i)
        return [(name, rc.get_redis_connection(nodes[name]) if name in nodes else None, idx)
                for name, idx in by_node.items()]

    def masters(self) -> list[tuple[str, redis.Redis]]:
        """Every endpoint that holds data: the server, or each cluster primary."""
        if not self.cluster:
            return [(SERVER, self._client)]
        if self._client is None:
            return []
        return [(n.name, self._client.get_redis_connection(n)) for n in self._client.get_primaries()]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def is_moved(exc: BaseException) -> bool:
    """A cluster redirection or transient cluster state: our slot map is stale."""
    return isinstance(exc, (MovedError, AskError, ClusterDownError, TryAgainError))
