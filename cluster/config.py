"""The cluster's configuration: frozen dataclasses, one sub-config per component.

YAML files in ``configs/`` load through ``load_config`` (cluster/config_loader.py),
which checks every key and names the key and the file in its errors. Like the
engine's configs, constructors do no I/O and raise ``ValueError("field: ...")``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from engine.config import EFFORTS, EngineConfig

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ACCELERATORS = ("cpu", "gpu")
ROLES = ("tenant", "peer")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS; with ``client_ca`` set, mutual TLS (clients must present a certificate it signed)."""

    cert: str | None = None  # PEM certificate chain
    key: str | None = None  # PEM private key
    client_ca: str | None = None  # PEM CA bundle for client certificates

    def __post_init__(self) -> None:
        _check((self.cert is None) == (self.key is None), "cert", "set both cert and key, or neither")
        _check(self.client_ca is None or self.cert is not None, "client_ca", "mutual TLS needs cert and key too")

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class TenantConfig:
    """One API key = one tenant, with its own limits. 0 means unlimited."""

    name: str
    api_key: str | None = None  # the key itself, or:
    api_key_env: str | None = None  # the name of an environment variable holding it (read at server start)
    requests_per_second: float = 0.0
    burst: int = 0  # token-bucket depth; 0: max(1, requests_per_second)
    max_concurrency: int = 0
    max_effort: str = "high"
    # a request with no first token this long after it arrived ends with DEADLINE_EXCEEDED (a limit the
    # tenant asked for, never a sign of a dead region: no region is ejected for it); 0: no limit
    first_token_timeout_s: float = 0.0
    # Tenants share prefix-cache hits (and their timing) only within one group; None: a group of its own
    prefix_cache_group: str | None = None

    # "peer": another region's router; only a peer may resume a stream or say which region forwarded a
    # call (and whose effort ceiling it carries). A peer key alone does not turn on authentication.
    role: str = "tenant"

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        # "tenant/" prefixes the tenant's request ids: a "/" in a name would let two tenants' ids collide
        _check("/" not in self.name, "name", f"must not contain '/', got {self.name!r}")
        _check(self.prefix_cache_group != "", "prefix_cache_group", "must not be empty (null: the tenant's own)")
        _check(
            (self.api_key is None) != (self.api_key_env is None), "api_key", "set exactly one of api_key, api_key_env"
        )
        _check(self.role in ROLES, "role", f"must be one of {ROLES}, got {self.role!r}")
        _check(self.requests_per_second >= 0, "requests_per_second", "must be >= 0")
        _check(self.burst >= 0, "burst", "must be >= 0")
        _check(self.max_concurrency >= 0, "max_concurrency", "must be >= 0")
        _check(self.max_effort in EFFORTS, "max_effort", f"must be one of {EFFORTS}")
        _check(self.first_token_timeout_s >= 0, "first_token_timeout_s", "must be >= 0 (0: no limit)")

    @property
    def cache_group(self) -> str:
        """The prefix-cache namespace of this tenant's requests."""
        return self.prefix_cache_group or self.name


@dataclass(frozen=True)
class InputLimitsConfig:
    """Caps on what one request may carry, each refused as INVALID_ARGUMENT naming the field and the cap.
    ``frontdoor.max_request_bytes`` bounds the whole message; these bound its parts, so no field costs the
    engine more than a real request needs (every stop id is checked at every step)."""

    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_chat_messages: int = 256
    max_role_chars: int = 32  # roles are "system", "user" or "assistant"; a longer one is refused unread
    max_model_name_chars: int = 256
    max_request_id_chars: int = 128  # a longer forwarded id is hashed to fit 128: keep it >= 128 in every region
    max_logprobs: int = 20  # top-n alternatives per token: enough to inspect, not a vocabulary dump
    max_tools: int = 64  # tools per request: all of them are rendered into the prompt
    max_tool_schema_chars: int = 16384  # characters of one tool: name, description and parameters schema
    max_schema_bytes: int = 32768  # response_format's JSON Schema: compiling it into a grammar costs per byte

    def __post_init__(self) -> None:
        for name in ("max_stop_strings", "max_stop_token_ids", "max_logprobs", "max_tools"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in (
            "max_stop_string_chars",
            "max_chat_messages",
            "max_model_name_chars",
            "max_request_id_chars",
            "max_tool_schema_chars",
            "max_schema_bytes",
        ):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.max_role_chars >= len("assistant"), "max_role_chars", "must be >= 9 (len('assistant'))")


@dataclass(frozen=True)
class AdminConfig:
    """``levante.v1.Admin`` (fault injection, region health) on a server and port of its own."""

    enabled: bool = False
    host: str = "127.0.0.1"  # loopback: reachable only from this machine unless set otherwise
    port: int = 0  # 0: any free port (logged, and read back by `levante up`)
    api_key_env: str | None = None  # environment variable holding the admin key (read at server start)
    # mutual TLS: subject common names or SAN DNS names of client certificates that are admins
    client_identities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.host), "host", "must not be empty")
        _check(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.api_key_env is None or bool(self.api_key_env), "api_key_env", "must not be empty")
        _check(all(self.client_identities), "client_identities", "must not contain empty names")
        _check(
            not self.enabled or self.api_key_env is not None or bool(self.client_identities),
            "api_key_env",
            "admin is enabled without a credential: set api_key_env (a variable holding the admin key) "
            "or client_identities (mutual TLS)",
        )


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API, served by the front door beside gRPC (same process and backends)."""

    port: int | None = 8000  # 0: any free port; None: no HTTP
    host: str | None = None  # None: the front door's own host

    def __post_init__(self) -> None:
        _check(self.port is None or 0 <= self.port <= 65535, "port", f"must be in [0, 65535] or null, got {self.port}")
        _check(self.host is None or bool(self.host), "host", "must not be empty (null: the front door's host)")

    @property
    def enabled(self) -> bool:
        return self.port is not None


@dataclass(frozen=True)
class FrontDoorConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    tls: TLSConfig = field(default_factory=TLSConfig)
    tenants: tuple[TenantConfig, ...] = ()  # empty: no authentication, every call is tenant "anonymous"
    max_request_bytes: int = 1 << 20  # larger requests: INVALID_ARGUMENT naming the size
    max_inflight: int = 256  # calls in flight across tenants; beyond: RESOURCE_EXHAUSTED
    # every RPC at once (health checks, ListModels, Admin too), refused by grpc itself beyond it; above
    # max_inflight, so a door full of Generate calls still answers its health checks
    maximum_concurrent_rpcs: int = 320
    max_streams_per_connection: int = 128  # Generate calls at once on one client connection; 0: no cap
    write_timeout_s: float = 30.0  # a stream whose client took no message for this long is stopped
    retry_after_ms: int = 1000  # the retry hint sent with every RESOURCE_EXHAUSTED refusal
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running streams may take to finish
    backend_timeout_s: float = 90.0  # no chunk from the backend for this long (first or next): UNAVAILABLE
    heartbeat_s: float = 0.5  # with nothing else to send for this long, a stream gets a Progress message
    admin: AdminConfig = field(default_factory=AdminConfig)  # levante.v1.Admin, on its own port
    limits: InputLimitsConfig = field(default_factory=InputLimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)  # the OpenAI-compatible API, on a port of its own

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.max_request_bytes > 0, "max_request_bytes", "must be positive")
        _check(self.max_inflight > 0, "max_inflight", "must be positive")
        _check(
            self.maximum_concurrent_rpcs > self.max_inflight,
            "maximum_concurrent_rpcs",
            f"must exceed max_inflight ({self.max_inflight}), so health checks are answered under load",
        )
        _check(self.max_streams_per_connection >= 0, "max_streams_per_connection", "must be >= 0 (0: no cap)")
        _check(self.write_timeout_s > 0, "write_timeout_s", "must be positive")
        _check(self.retry_after_ms >= 0, "retry_after_ms", "must be >= 0")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        _check(self.backend_timeout_s > 0, "backend_timeout_s", "must be positive")
        _check(self.heartbeat_s > 0, "heartbeat_s", "must be positive")
        names = [t.name for t in self.tenants]
        _check(len(names) == len(set(names)), "tenants", "tenant names must be unique")
        keys = [t.api_key for t in self.tenants if t.api_key is not None]  # a key must identify one tenant
        _check(len(keys) == len(set(keys)), "tenants", "tenant api_keys must be unique")
        _check(
            not self.admin.client_identities or self.tls.client_ca is not None,
            "admin.client_identities",
            "need mutual TLS: set tls.client_ca (and tls.cert, tls.key)",
        )
        _check(
            not (self.admin.enabled and self.admin.port and self.admin.port == self.port),
            "admin.port",
            f"must differ from port ({self.port}): admin never shares the public port",
        )
        _check(
            not (self.http.port and self.http.port in (self.port, self.admin.port)),
            "http.port",
            f"must differ from port ({self.port}) and admin.port: HTTP has a port of its own",
        )


@dataclass(frozen=True)
class ReplicaConfig:
    """The engine replica deployment, and the expert-parallel group inside each replica."""

    num_replicas: int = 1
    max_ongoing_requests: int = 64  # per replica, Serve's cap
    max_queued_requests: int = 128  # waiting in a caller's handle; beyond: RESOURCE_EXHAUSTED
    ep_size: int = 1  # Ray actors per replica, each with 1/ep_size of the routed experts
    accelerator: str = "cpu"  # bundle per rank: {"CPU": cpus_per_rank} or {"GPU": 1}
    cpus_per_rank: float = 1.0
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD put ranks on different nodes
    stream_chunk_tokens: int = 16  # a chunk closes at this many tokens...
    stream_chunk_ms: float = 20.0  # ...or this long after its first token (and prefill progress at most this often)
    heartbeat_s: float = 0.5  # with nothing to send for this long (queued, prefilling), a keepalive goes out
    max_gang_restarts: int = 3  # consecutive failed restarts before the replica gives up (Serve replaces it)
    rank_timeout_s: float = 60.0  # per call to a rank, and per collective between ranks (a frozen rank fails the group)
    load_timeout_s: float = 900.0  # placing the group and loading the model on every rank

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_ongoing_requests", "ep_size", "stream_chunk_tokens"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.max_queued_requests >= -1, "max_queued_requests", "must be >= 0, or -1 for unbounded")
        _check(self.accelerator in ACCELERATORS, "accelerator", f"must be one of {ACCELERATORS}")
        _check(self.cpus_per_rank >= 0, "cpus_per_rank", "must be >= 0")
        _check(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            "placement_strategy",
            f"must be one of {PLACEMENT_STRATEGIES}",
        )
        _check(self.stream_chunk_ms >= 0, "stream_chunk_ms", "must be >= 0")
        _check(self.heartbeat_s > 0, "heartbeat_s", "must be positive")
        _check(self.max_gang_restarts >= 0, "max_gang_restarts", "must be >= 0")
        _check(self.rank_timeout_s > 0, "rank_timeout_s", "must be positive")
        _check(self.load_timeout_s > 0, "load_timeout_s", "must be positive")


@dataclass(frozen=True)
class AutoEffortConfig:
    """The small policy behind ``reasoning_effort: AUTO`` (cluster/policy/effort.py)."""

    default: str = "none"  # a short, plain prompt
    keyword_effort: str = "medium"  # the prompt asks for reasoning ("prove", "step by step", ...)
    keywords: tuple[str, ...] = (
        "prove",
        "step by step",
        "derive",
        "calculate",
        "solve",
        "why",
        "explain",
        "debug",
        "reason",
    )
    long_prompt_chars: int = 4000  # at least this long: long_prompt_effort
    long_prompt_effort: str = "low"
    # A deadline shorter than this (seconds) caps the effort: a deep answer would not arrive in time.
    min_deadline_s: dict[str, float] = field(default_factory=lambda: {"low": 2.0, "medium": 5.0, "high": 15.0})
    # Queueing delay (seconds) at which depth steps down one level, and at which it drops to none.
    degrade_queue_delay_s: float = 0.5
    none_queue_delay_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("default", "keyword_effort", "long_prompt_effort"):
            _check(getattr(self, name) in EFFORTS, name, f"must be one of {EFFORTS}")
        _check(self.long_prompt_chars > 0, "long_prompt_chars", "must be positive")
        _check(set(self.min_deadline_s) <= set(EFFORTS), "min_deadline_s", f"keys must be among {EFFORTS}")
        _check(all(v >= 0 for v in self.min_deadline_s.values()), "min_deadline_s", "values must be >= 0")
        _check(all(k.strip() for k in self.keywords), "keywords", "must not contain blank keywords")
        _check(
            0 <= self.degrade_queue_delay_s <= self.none_queue_delay_s,
            "degrade_queue_delay_s",
            "must be >= 0 and <= none_queue_delay_s",
        )


@dataclass(frozen=True)
class RouterConfig:
    """The replica router, in each front door's process."""

    prefix_chars: int = 512  # leading prompt characters hashed for prefix affinity
    affinity_slack: int = 4  # keep a prefix on its replica unless it has this many more in flight than the least
    affinity_entries: int = 4096  # prefixes remembered (LRU)
    auto: AutoEffortConfig = field(default_factory=AutoEffortConfig)
    replica_timeout_s: float = 60.0  # no chunk from a replica for this long (keepalives included): UNAVAILABLE

    def __post_init__(self) -> None:
        _check(self.prefix_chars > 0, "prefix_chars", "must be positive")
        _check(self.affinity_slack >= 0, "affinity_slack", "must be >= 0")
        _check(self.affinity_entries > 0, "affinity_entries", "must be positive")
        _check(self.replica_timeout_s > 0, "replica_timeout_s", "must be positive")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local cluster owned by this process
    num_cpus: int | None = None  # logical CPUs of a local cluster (may exceed the cores)
    temp_dir: str | None = None  # None: a fresh directory under the system temp dir
    namespace: str = "levante"
    deploy: bool = True  # False: the Serve app is deployed by someone else (KubeRay's serveConfigV2); attach to it

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", "must be >= 1")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a DNS name: it may resolve anywhere
        return False


@dataclass(frozen=True)
class PeerConfig:
    """Another region's front door, reached over gRPC only."""

    name: str  # its region name (what its responses report in served_by)
    target: str  # host:port of its front door
    tls_ca: str | None = None  # PEM CA bundle that signed its certificate; set: TLS
    tls_cert: str | None = None  # client certificate, when the peer asks for mutual TLS
    tls_key: str | None = None
    api_key_env: str | None = None  # environment variable with the API key to present, when it has tenants

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must not be empty")
        _check(
            ":" in self.target and self.target.rsplit(":", 1)[1].isdigit(),
            "target",
            f"must be host:port, got {self.target!r}",
        )
        _check(
            (self.tls_cert is None) == (self.tls_key is None), "tls_cert", "set both tls_cert and tls_key, or neither"
        )
        _check(self.tls_cert is None or self.tls_ca is not None, "tls_ca", "mutual TLS needs tls_ca too")
        # A key sent over a plaintext channel is a key given to anyone on the path; on loopback
        # (regions on one machine, `levante up`) there is no path.
        _check(
            self.api_key_env is None or self.tls_ca is not None or _is_loopback(self.target.rsplit(":", 1)[0]),
            "api_key_env",
            f"an API key is sent only over TLS to {self.target!r} (not a loopback address); set tls_ca too",
        )


@dataclass(frozen=True)
class HealthCheckConfig:
    """How a region router (and the client library) judges each region: active checks plus passive
    outlier detection with ejection, in the manner of Envoy and gRPC A50. A region is dead when its
    heartbeats stop or its checks fail, never because a first token is slow: every hop sends a
    heartbeat at least every 0.5s (``replica.heartbeat_s``, ``frontdoor.heartbeat_s``) while a
    request waits or prefills, so a frozen region is left within ``stream_idle_timeout_s``."""

    interval_s: float = 0.5  # active grpc.health.v1 Check on every region this often
    timeout_s: float = 0.5  # a check not answered within this is a failure ("timeout")
    unhealthy_threshold: int = 2  # consecutive failed checks before a region is unhealthy
    healthy_threshold: int = 2  # consecutive good checks before it is healthy again
    consecutive_failures: int = 3  # passive: errors or silent streams in a row before ejection
    base_ejection_s: float = 5.0  # ejected for base * (number of ejections), up to max_ejection_s
    max_ejection_s: float = 60.0
    cooldown_s: float = 30.0  # this long without an ejection forgets the earlier ones (backoff resets)
    # no chunk at all (heartbeats included) for this long, before or after the first token: the region is
    # lost; a stream not yet started tries the next region, one that started resumes there
    stream_idle_timeout_s: float = 1.5
    # at most this share of the regions is ejected at once (Envoy's max_ejection_percent); one ejection is
    # always allowed, and never of the last region that takes traffic: a busy cluster is not a dead one
    max_ejection_percent: float = 50.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s", "base_ejection_s", "stream_idle_timeout_s"):
            _check(getattr(self, name) > 0, name, "must be positive")
        for name in ("unhealthy_threshold", "healthy_threshold", "consecutive_failures"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.max_ejection_s >= self.base_ejection_s, "max_ejection_s", "must be >= base_ejection_s")
        _check(self.cooldown_s >= 0, "cooldown_s", "must be >= 0")
        _check(0 <= self.max_ejection_percent <= 100, "max_ejection_percent", "must be in [0, 100]")


@dataclass(frozen=True)
class RegionsConfig:
    """This region's peers and how requests fail over between regions."""

    peers: tuple[PeerConfig, ...] = ()  # empty: a single region (no failover)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    max_attempts: int = 3  # regions tried per request, the first included (each at most once)
    spill_on_overload: bool = True  # RESOURCE_EXHAUSTED here: try the peers before returning it

    def __post_init__(self) -> None:
        names = [p.name for p in self.peers]
        _check(len(names) == len(set(names)), "peers", "peer names must be unique")
        _check(self.max_attempts >= 1, "max_attempts", "must be >= 1")


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry traces, exported over OTLP/gRPC. Off: no tracer provider is installed at all."""

    enabled: bool = False
    otlp_endpoint: str = "localhost:4317"  # the collector's OTLP gRPC receiver: host:port, or http(s)://host:port
    insecure: bool = True  # plaintext gRPC to the collector (an https:// endpoint always uses TLS)
    sample_ratio: float = 1.0  # share of new traces kept; a caller's traceparent decides for its own trace
    service_name: str = "levante"
    export_interval_s: float = 5.0  # finished spans leave in batches at least this often

    def __post_init__(self) -> None:
        address = self.otlp_endpoint.split("://", 1)[1] if "://" in self.otlp_endpoint else self.otlp_endpoint
        scheme = self.otlp_endpoint.split("://", 1)[0] if "://" in self.otlp_endpoint else ""
        _check(
            scheme in ("", "http", "https"),
            "otlp_endpoint",
            f"scheme must be http or https (or none), got {self.otlp_endpoint!r}",
        )
        _check(
            ":" in address and address.rsplit(":", 1)[1].rstrip("/").isdigit() and bool(address.rsplit(":", 1)[0]),
            "otlp_endpoint",
            f"must be host:port of an OTLP gRPC receiver, got {self.otlp_endpoint!r}",
        )
        _check(0.0 <= self.sample_ratio <= 1.0, "sample_ratio", f"must be in [0, 1], got {self.sample_ratio}")
        _check(bool(self.service_name), "service_name", "must not be empty")
        _check(self.export_interval_s > 0, "export_interval_s", "must be positive")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics, served by the front door's process at http://host:port/metrics."""

    enabled: bool = False  # off by default: regions started on one machine would all want the same port
    host: str = "127.0.0.1"
    port: int = 9464  # 0: any free port
    poll_interval_s: float = 5.0  # the engine replicas' figures are asked for this often (and within this)

    def __post_init__(self) -> None:
        _check(bool(self.host), "host", "must not be empty")
        _check(0 <= self.port <= 65535, "port", f"must be in [0, 65535], got {self.port}")
        _check(self.poll_interval_s > 0, "poll_interval_s", "must be positive")


@dataclass(frozen=True)
class TelemetryConfig:
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class ClusterConfig:
    region: str = "local"
    model_name: str = "levante-default"  # the name clients ask for; "" in a request means this one
    engine: EngineConfig = field(default_factory=EngineConfig)  # engine.parallel comes from replica.ep_size
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    frontdoor: FrontDoorConfig = field(default_factory=FrontDoorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        _check(bool(self.region), "region", "must not be empty")
        _check(bool(self.model_name), "model_name", "must not be empty")
        _check(
            self.region not in {p.name for p in self.regions.peers},
            "regions.peers",
            f"must not list this region ({self.region!r}) itself",
        )
        idle = self.regions.health.stream_idle_timeout_s
        for name, beat in (
            ("replica.heartbeat_s", self.replica.heartbeat_s),
            ("frontdoor.heartbeat_s", self.frontdoor.heartbeat_s),
        ):
            _check(beat < idle, name, f"{beat:g} must be below regions.health.stream_idle_timeout_s ({idle:g})")
        metrics = self.telemetry.metrics
        _check(
            not (metrics.enabled and metrics.port and metrics.port == self.frontdoor.port),
            "telemetry.metrics.port",
            f"must differ from frontdoor.port ({self.frontdoor.port})",
        )
        self._check_engine_placement()

    def _check_engine_placement(self) -> None:
        """The engine's device and parallelism agree with what each replica reserves."""
        engine, replica = self.engine, self.replica
        device = engine.model.device
        if replica.accelerator == "gpu":
            _check(
                device is None or device.startswith("cuda"),
                "engine.model.device",
                f"{device!r} contradicts replica.accelerator: gpu (leave it unset, or 'cuda')",
            )
        else:
            _check(
                device in (None, "cpu"),
                "engine.model.device",
                f"{device!r} needs replica.accelerator: gpu (a rank only sees the GPUs its bundle reserves)",
            )
        if engine.backend == "vllm":
            _check(
                replica.ep_size == 1,
                "replica.ep_size",
                "must be 1 with engine.backend: vllm (vLLM splits the experts itself: "
                "engine.vllm.enable_expert_parallel and tensor_parallel_size)",
            )
            _check(
                replica.accelerator == "gpu" or engine.vllm.world_size == 1,
                "engine.vllm.tensor_parallel_size",
                "more than one device per engine needs replica.accelerator: gpu",
            )
