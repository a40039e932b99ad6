"""Typed configuration, one set of keys everywhere.

The same nested keys are read from a YAML file, from `LMCACHE_LAB_*` environment variables, from
Hydra's composed config and from the vLLM connector's `kv_connector_extra_config`:

    chunk_size: 256
    hash: sha256              # or xxh3_128 (faster, single-tenant only: not collision resistant)
    policy: {name: lru}       # plus the policy's own parameters
    tiers:
      cpu:   {capacity_bytes: 2GiB, device: cpu}
      disk:  {path: null, capacity_bytes: 10GiB}   # off while path is null
      redis: {url: null}                           # off while url is null
    codec: none
    metrics: {port: null, host: 127.0.0.1}         # off while port is null
    write_behind: {max_bytes: 256MiB}              # pending writes to disk/Redis; beyond: skipped
    lookup_timeout_s: 2.0                          # vLLM scheduler's wait for a lookup; then a miss
    tail_blocks: true         # vLLM: also keep a prompt's whole blocks past its last full chunk
    prefetch: auto            # vLLM: load hits only a slow tier holds between engine steps
    store_secret: null        # a literal, file:/path or env:NAME; authenticates shared tiers' values
    observability: {ghost_entries: 100000}         # evicted keys remembered for miss reasons
    trace: {path: null, sample: 1.0}               # capture requests as a Mooncake trace (JSONL)

Invariants are checked in `__post_init__`, so an invalid value fails at start-up with one
`ConfigError` that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

HASHES = ("xxh3_128", "sha256")
MIN_SECRET_BYTES = 16
CODECS = ("none", "int8", "fp8")
ENV_PREFIX = "LMCACHE_LAB_"


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key and the allowed values."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str, key: str = "size") -> int:
    """`512MiB`, `2GB`, `1048576` -> bytes. Fails with a ConfigError naming `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size such as 512MiB or a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: expected a size such as 512MiB, 2GB or 1048576, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "B").lower()
    return int(number * _UNITS[unit])


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


class StoreSecret:
    """A deployment's store secret, resolved at load time. Neither its repr nor its str shows the
    value (only where it came from), so a config printed, logged or dumped with `default=str`
    never leaks it; `reveal()` is the one way to the bytes."""
    __slots__ = ("_value", "source")

    def __init__(self, value: bytes, source: str):
        self._value = value
        self.source = source

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"StoreSecret(<{len(self._value)} bytes from {self.source}>)"

    __str__ = __repr__

    def __eq__(self, other) -> bool:
        return isinstance(other, StoreSecret) and hmac.compare_digest(self._value, other._value)

    __hash__ = None


def resolve_secret(spec: Any) -> StoreSecret | None:
    """`store_secret` as given -> the secret: `file:/path` (the file's bytes, one trailing line end
    dropped), `env:NAME` (that environment variable), anything else the literal string. At least
    MIN_SECRET_BYTES bytes. Errors name the source, never the value."""
    if spec is None or isinstance(spec, StoreSecret):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"store_secret: expected a string (a literal, file:/path or env:NAME), "
                          f"got a {type(spec).__name__}")
    if spec.startswith("file:"):
        source = spec
        try:
            value = Path(spec[5:]).read_bytes()
        except OSError as e:
            raise ConfigError(f"store_secret: cannot read the secret file {spec[5:]!r}: {e.strerror}") from None
        value = value.removesuffix(b"\n").removesuffix(b"\r")   # the line end an editor adds
    elif spec.startswith("env:"):
        source = spec
        if spec[4:] not in os.environ:
            raise ConfigError(f"store_secret: the environment variable {spec[4:]!r} is not set")
        value = os.environ[spec[4:]].encode()
    else:
        source, value = "a literal", spec.encode()
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigError(f"store_secret: the secret from {source} has {len(value)} bytes; use at least "
                          f"{MIN_SECRET_BYTES} (e.g. the output of `openssl rand -hex 32`)")
    return StoreSecret(value, source)


@dataclass
class PolicyConfig:
    """`name` selects the policy; every other key is passed to its constructor."""
    name: str = "lru"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from lmcache_lab.policies import POLICIES  # late: policies import nothing from here
        _check_choice("policy.name", self.name, tuple(sorted(POLICIES)))


@dataclass
class CpuTierConfig:
    """In-memory tier; `device: cuda` makes it a GPU tier. capacity_bytes 0 turns it off."""
    capacity_bytes: int = 2 * 2**30
    device: str = "cpu"

    def __post_init__(self):
        self.capacity_bytes = parse_size(self.capacity_bytes, "tiers.cpu.capacity_bytes")


@dataclass
class DiskTierConfig:
    path: str | None = None
    capacity_bytes: int = 10 * 2**30

    def __post_init__(self):
        self.capacity_bytes = parse_size(self.capacity_bytes, "tiers.disk.capacity_bytes")


@dataclass
class RedisTierConfig:
    """Shared Redis tier; off while `url` is null. See docs/redis.md.

    * `url`: redis://[user:password@]host:port[/db], rediss:// (TLS) or unix://; with
      `cluster: true` the address of any cluster node (the rest are discovered).
    * `username`/`password` override those in the URL (ACL user; password alone = `requirepass`).
    * `db` overrides the URL's database number (cluster mode only has db 0).
    * `ssl_ca_certs`, `ssl_certfile`/`ssl_keyfile` (client certificate): rediss:// only.
    * `timeout_s`: bound on each wait of one operation (connect, each socket read); when it
      passes, the chunk counts as a miss. `backoff_max_s`: longest wait between reconnect probes.
    * `ttl_s`: optional expiry of stored chunks (refreshed when a request uses them).
    * `max_chunk_bytes`: largest stored chunk accepted on write or read (caps what a hostile
      value can make us allocate); the learned chunk layout tightens it to the exact size.
    * `capacity_bytes`: Redis's own `maxmemory` is the budget (the tier never evicts); this value
      is only reported as the capacity where the server does not tell its maxmemory.
    """
    url: str | None = None
    key_prefix: str = "lmcache_lab"
    cluster: bool = False
    db: int | None = None
    timeout_s: float = 0.5
    backoff_max_s: float = 2.0
    ttl_s: int | None = None
    capacity_bytes: int | None = None
    max_chunk_bytes: int = 256 * 2**20
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def __post_init__(self):
        url = self.url
        if url is not None and not str(url).startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"tiers.redis.url: {url!r} must start with redis://, rediss:// or unix://")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise ConfigError(f"tiers.redis.timeout_s: must be > 0, got {self.timeout_s!r}")
        if not isinstance(self.backoff_max_s, (int, float)) or self.backoff_max_s <= 0:
            raise ConfigError(f"tiers.redis.backoff_max_s: must be > 0, got {self.backoff_max_s!r}")
        if self.ttl_s is not None and (not isinstance(self.ttl_s, int) or isinstance(self.ttl_s, bool)
                                       or self.ttl_s <= 0):
            raise ConfigError(f"tiers.redis.ttl_s: must be a positive number of seconds or null, got {self.ttl_s!r}")
        if self.db is not None and (not isinstance(self.db, int) or isinstance(self.db, bool) or self.db < 0):
            raise ConfigError(f"tiers.redis.db: must be an integer >= 0 or null, got {self.db!r}")
        if not isinstance(self.key_prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.:/{}-]+", self.key_prefix):
            raise ConfigError(f"tiers.redis.key_prefix: must be a non-empty string of letters, digits "
                              f"and _.:/{{}}-, got {self.key_prefix!r}")
        if self.cluster and url is not None and str(url).startswith("unix://"):
            raise ConfigError("tiers.redis.cluster: a Redis Cluster is reached over TCP, not unix://")
        if self.cluster and self.db:
            raise ConfigError(f"tiers.redis.db: Redis Cluster only has database 0, got {self.db!r}")
        tls = [k for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if getattr(self, k)]
        if tls and url is not None and not str(url).startswith("rediss://"):
            raise ConfigError(f"tiers.redis.{tls[0]}: TLS options need a rediss:// url, got {url!r}")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("tiers.redis.ssl_certfile/ssl_keyfile: a client certificate needs both")
        self.max_chunk_bytes = parse_size(self.max_chunk_bytes, "tiers.redis.max_chunk_bytes")
        if self.max_chunk_bytes <= 0:
            raise ConfigError("tiers.redis.max_chunk_bytes: must be > 0")
        if self.capacity_bytes is not None:
            self.capacity_bytes = parse_size(self.capacity_bytes, "tiers.redis.capacity_bytes")


@dataclass
class S3TierConfig:
    """Shared object-storage tier (AWS S3 or an S3-compatible store); off while `url` is null.
    See docs/s3.md.

    * `url`: s3://bucket[/prefix]; one object per chunk under the prefix.
    * `endpoint_url`: an S3-compatible store (MinIO, Ceph RGW, R2, ...); null for AWS S3.
    * `region`: null takes the AWS chain's region (AWS_REGION, ~/.aws/config), else us-east-1.
    * Credentials come only from the standard AWS chain (env vars, shared files, instance roles).
    * `timeout_s`: connect/read timeout of one request; when it passes the chunk is a miss.
    * `max_chunk_bytes`: largest stored chunk accepted on write or read.
    * `max_connections`: connection pool size, also the number of parallel requests.
    * `capacity_bytes`: the bucket has no budget of its own and the tier never evicts; this value
      is only reported as the capacity (use a bucket lifecycle rule to expire old chunks).
    """
    url: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    capacity_bytes: int | None = None
    timeout_s: float = 2.0
    backoff_max_s: float = 2.0
    max_chunk_bytes: int = 256 * 2**20
    max_connections: int = 32

    def __post_init__(self):
        url = self.url
        if url is not None and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?", str(url)):
            raise ConfigError(f"tiers.s3.url: {url!r} must be s3://bucket[/prefix] with a valid bucket name")
        if self.endpoint_url is not None and not str(self.endpoint_url).startswith(("http://", "https://")):
            raise ConfigError(f"tiers.s3.endpoint_url: {self.endpoint_url!r} must start with http:// or https://")
        for k in ("timeout_s", "backoff_max_s"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"tiers.s3.{k}: must be > 0, got {v!r}")
        if not isinstance(self.max_connections, int) or isinstance(self.max_connections, bool) \
                or self.max_connections < 1:
            raise ConfigError(f"tiers.s3.max_connections: must be an integer >= 1, got {self.max_connections!r}")
        self.max_chunk_bytes = parse_size(self.max_chunk_bytes, "tiers.s3.max_chunk_bytes")
        if self.max_chunk_bytes <= 0:
            raise ConfigError("tiers.s3.max_chunk_bytes: must be > 0")
        if self.capacity_bytes is not None:
            self.capacity_bytes = parse_size(self.capacity_bytes, "tiers.s3.capacity_bytes")

    @property
    def bucket(self) -> str:
        return str(self.url)[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The key prefix inside the bucket, '' or ending in '/'."""
        rest = str(self.url)[5:].split("/", 1)
        p = rest[1].strip("/") if len(rest) > 1 else ""
        return p + "/" if p else ""


@dataclass
class TiersConfig:
    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    redis: RedisTierConfig = field(default_factory=RedisTierConfig)
    s3: S3TierConfig = field(default_factory=S3TierConfig)


@dataclass
class MetricsConfig:
    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self):
        if self.port is not None and not (0 <= int(self.port) <= 65535):
            raise ConfigError(f"metrics.port: must be in 0..65535 or null, got {self.port!r}")


@dataclass
class WriteBehindConfig:
    """Writes to slow tiers (disk, Redis) run behind the engine step, in at most `max_bytes` of
    pending chunk bytes; a chunk that would exceed it is skipped for the slow tiers (counted)."""
    max_bytes: int = 256 * 2**20

    def __post_init__(self):
        self.max_bytes = parse_size(self.max_bytes, "write_behind.max_bytes")


@dataclass
class ObservabilityConfig:
    """`ghost_entries`: chunks no longer held whose fate (evicted by which tier, store skipped)
    is remembered to give a miss its reason (`lmcache_lab.observe.GhostIndex`); 0 turns it off
    (every such miss then reads `never_stored`)."""
    ghost_entries: int = 100_000

    def __post_init__(self):
        if isinstance(self.ghost_entries, bool) or not isinstance(self.ghost_entries, int) \
                or self.ghost_entries < 0:
            raise ConfigError(f"observability.ghost_entries: must be an integer >= 0, "
                              f"got {self.ghost_entries!r}")


@dataclass
class TraceConfig:
    """Capture each request as a line of a Mooncake trace at `path` (off while null); `sample`
    keeps that fraction of requests, chosen by their first chunk."""
    path: str | None = None
    sample: float = 1.0

    def __post_init__(self):
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"trace.path: must be a file path or null, got {self.path!r}")
        if isinstance(self.sample, bool) or not isinstance(self.sample, (int, float)) \
                or not 0 < self.sample <= 1:
            raise ConfigError(f"trace.sample: must be a number in (0, 1], got {self.sample!r}")
        self.path = None if self.path is None else str(self.path)


@dataclass
class CacheConfig:
    chunk_size: int = 256
    hash: str = "sha256"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    codec: str = "none"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    write_behind: WriteBehindConfig = field(default_factory=WriteBehindConfig)
    lookup_timeout_s: float = 2.0
    # vLLM connector: a prompt's whole engine blocks past its last full chunk are stored as a
    # shorter chunk and served like one (codec none, chunk_size a multiple of the block size),
    # so a connector hit covers what the engine's own prefix cache would
    tail_blocks: bool = True
    # vLLM connector: a hit that a slow tier (disk, Redis, S3) holds and the memory tier does not
    # is loaded between engine steps (vLLM's async KV load) while the engine runs other requests:
    # true: always; false: never (loaded in the step that schedules the request, which waits);
    # auto: on an accelerator engine, when the other requests of a step would wait longer in
    # total than a step lasts (`vllm_plan.load_between_steps`); on a CPU engine never (the load
    # would compete with the forward pass for the same cores)
    prefetch: bool | str = "auto"
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    # With a secret, chunk keys are rooted in it and every value in a shared tier (disk, Redis, S3)
    # carries a MAC under it (docs/security.md). Never serialized by `to_dict`: processes get it
    # from their own config file or environment (LMCACHE_LAB_STORE_SECRET=file:/path).
    store_secret: StoreSecret | None = field(default=None, repr=False)

    def __post_init__(self):
        self.store_secret = resolve_secret(self.store_secret)
        if isinstance(self.lookup_timeout_s, bool) or not isinstance(self.lookup_timeout_s, (int, float)) \
                or self.lookup_timeout_s <= 0:
            raise ConfigError(f"lookup_timeout_s: must be a number of seconds > 0, got {self.lookup_timeout_s!r}")
        if not isinstance(self.tail_blocks, bool):
            raise ConfigError(f"tail_blocks: must be true or false, got {self.tail_blocks!r}")
        if self.prefetch not in (True, False, "auto") or isinstance(self.prefetch, int) \
                and not isinstance(self.prefetch, bool):
            raise ConfigError(f"prefetch: must be auto, true or false, got {self.prefetch!r}")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size <= 0:
            raise ConfigError(f"chunk_size: must be a positive integer, got {self.chunk_size!r}")
        _check_choice("hash", self.hash, HASHES)
        _check_choice("codec", self.codec, CODECS)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "CacheConfig":
        """Build from nested plain data; unknown keys are errors (a typo must not be ignored)."""
        return _build(cls, dict(data or {}), prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "CacheConfig":
        return cls.from_dict(_read_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` reads back, less `store_secret` (never serialized)."""
        data = dataclasses.asdict(self)
        data.pop("store_secret")
        policy = data.pop("policy")
        data["policy"] = {"name": policy["name"], **policy["params"]}
        return data


def _build(cls, data: dict[str, Any], prefix: str):
    if cls is PolicyConfig:
        data = dict(data)
        name = data.pop("name", "lru")
        return PolicyConfig(name=name, params={**data.pop("params", {}), **data})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed keys are {', '.join(fields)}")
        sub = _nested_type(fields[key])
        if sub is not None:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key}: expected a mapping, got {value!r}")
            kwargs[key] = _build(sub, dict(value), prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)


_NESTED = {"PolicyConfig": PolicyConfig, "TiersConfig": TiersConfig, "CpuTierConfig": CpuTierConfig,
           "DiskTierConfig": DiskTierConfig, "RedisTierConfig": RedisTierConfig, "S3TierConfig": S3TierConfig,
           "MetricsConfig": MetricsConfig, "WriteBehindConfig": WriteBehindConfig,
           "ObservabilityConfig": ObservabilityConfig, "TraceConfig": TraceConfig}


def _nested_type(f: dataclasses.Field):
    return _NESTED.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return data


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`LMCACHE_LAB_TIERS__CPU__CAPACITY_BYTES=1GiB` -> {"tiers": {"cpu": {"capacity_bytes": "1GiB"}}}.

    A double underscore separates nesting levels; values are parsed as YAML scalars so numbers,
    booleans and `null` come out typed. `LMCACHE_LAB_CONFIG_FILE` names a YAML file instead.
    """
    import yaml

    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG_FILE":
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return out


def load_config(source: str | os.PathLike | Mapping[str, Any] | CacheConfig | None = None,
                environ: Mapping[str, str] | None = None) -> CacheConfig:
    """Defaults <- YAML file (`LMCACHE_LAB_CONFIG_FILE` or a path) <- env vars <- mapping `source`.

    A mapping may itself name a file with the key `config_file` (as the vLLM extra config does).
    """
    if isinstance(source, CacheConfig):
        return source
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    file = environ.get(ENV_PREFIX + "CONFIG_FILE")
    if isinstance(source, (str, os.PathLike)):
        file = source
    elif isinstance(source, Mapping):
        overrides = dict(source)
        file = overrides.pop("config_file", None) or file
    if file:
        data = _read_yaml(file)
    data = _deep_merge(data, env_overrides(environ))
    data = _deep_merge(data, overrides)
    return CacheConfig.from_dict(data)


CACHE_KEYS = tuple(f.name for f in dataclasses.fields(CacheConfig))
