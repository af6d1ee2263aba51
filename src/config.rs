//! Configuration from environment variables. Airflow's own names are reused where the
//! setting is Airflow's, so one Kubernetes Secret serves Airflow and the gateway; the
//! gateway's own settings are `AIRSTATE_*`. Every error names its variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::auth::AuthSettings;
use crate::identity::metastore::{postgres_url_from_sqlalchemy, MetastoreSettings};
use crate::store::events::{DEFAULT_EVENT_BUFFER, DEFAULT_EVENT_BUFFER_BYTES};
use crate::store::redis::RedisSettings;

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityMode {
    Metastore,
    Claims,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: the embedded in-memory store.
    pub redis: Option<RedisSettings>,
    pub identity: IdentityMode,
    /// Present when `identity` is `Metastore`.
    pub metastore: Option<MetastoreSettings>,
    pub auth: AuthSettings,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    /// On SIGTERM: still accepting, `/ready` 503, until endpoints have dropped the replica.
    pub shutdown_drain: Duration,
    /// Connection-level limits of the HTTP server (`crate::server`).
    pub server: ServerSettings,
    /// airstate's extensions beyond Airflow's API.
    pub extensions: ExtensionSettings,
    pub admin: AdminSettings,
    /// `None`: requests airstate does not serve itself are 404s, as before forwarding existed.
    pub upstream: Option<UpstreamSettings>,
    /// How long Airflow's "allowed" answer to a Core REST API access question is reused.
    pub access_cache_ttl: Duration,
    pub access_cache_capacity: u64,
    /// Lifecycle passes (metastore identity only); `None` when turned off.
    pub reconcile: Option<ReconcileSettings>,
}

/// What one client connection may cost: a client that never finishes its headers or its
/// body, or keeps a connection idle, must not hold memory and descriptors for ever.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    pub max_header_bytes: usize,
    /// From a request's first byte until its headers are complete.
    pub header_read_timeout: Duration,
    /// From a request's headers until its body is complete.
    pub body_read_timeout: Duration,
    /// Between requests on a kept-alive connection.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Requests in their handlers at a time (`http::limits`).
    pub max_requests: usize,
    /// Request-body bytes in handlers at a time.
    pub max_body_bytes_in_flight: usize,
}

/// How state follows Airflow's lifecycle (`crate::lifecycle`).
#[derive(Debug, Clone, Copy)]
pub struct ReconcileSettings {
    pub interval: Duration,
    pub batch: usize,
    /// How long a resolved identity may be trusted: a write can still land that long
    /// after Airflow deleted its run or orphaned its asset.
    pub identity_ttl: Duration,
}

/// Airflow's API server behind airstate (README, "Running with Airflow"): everything airstate
/// does not serve itself is forwarded there, so workers and the UI need one URL.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// `http://host:port` with an optional path prefix; no query, no credentials.
    pub url: axum::http::Uri,
    /// Establishing a TCP connection to the upstream (502 when it fails or takes longer).
    pub connect_timeout: Duration,
    /// From sending the request until the upstream's response headers (504 when longer).
    pub response_timeout: Duration,
    /// Idle keep-alive connections kept per replica.
    pub pool_idle: usize,
    /// How long an idle kept connection may stay unused before it is closed.
    pub pool_idle_timeout: Duration,
}

/// The admin API (`/admin/v1/...`, README "Admin API").
#[derive(Clone, Default)]
pub struct AdminSettings {
    /// The bearer token operators present; `None` turns the admin routes off (404).
    pub token: Option<String>,
    /// Airflow's `[state_store] max_value_storage_bytes`: admin writes of a larger value are
    /// refused (422); 0 means no limit. The Execution API does not apply it, as in Airflow.
    pub max_value_bytes: usize,
    /// Airflow's `[state_store] default_retention_days`: a Core REST API write without an
    /// `expires_at` (or with `"default"`) expires this many days later; 0 = never.
    pub default_retention_days: u32,
}

// The token is a secret: never printed with the rest of the configuration.
impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("max_value_bytes", &self.max_value_bytes)
            .field("default_retention_days", &self.default_retention_days)
            .finish()
    }
}

/// Shortest admin token accepted: a guessable one would open every task's state.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// Settings of the extensions beyond Airflow's API (README, "Beyond Airflow").
#[derive(Debug, Clone)]
pub struct ExtensionSettings {
    /// A task may use an asset's state only if the metastore registers it as an inlet or
    /// outlet of that asset.
    pub asset_registration_check: bool,
    /// Change streams on: writes announce their changes (a Redis `PUBLISH` each) and
    /// `Accept: text/event-stream` reads are served. Off, writes announce nothing.
    pub change_streams: bool,
    /// Change streams: events buffered per watcher before it is told it lagged.
    pub change_stream_buffer: usize,
    /// Change streams: bytes of events buffered per watcher before it is cut off.
    pub change_stream_buffer_bytes: usize,
    /// Change streams: how often an idle stream gets a keep-alive comment.
    pub change_stream_heartbeat: Duration,
    /// Bulk reads: the most bytes of stored values one read returns (422 above).
    pub bulk_read_max_bytes: usize,
}

/// A variable's default: what parsing uses when the variable is unset, and what `--help`
/// and the README's table show. Written here once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This text, parsed as a set value would be.
    Value(&'static str),
    /// A number defined where it is used (and shown as its value).
    Number(u64),
    /// No value: the code decides (or the setting is off); the text says what happens.
    Described(&'static str),
}

impl DefaultValue {
    /// The value parsing falls back on; `None` for a [`DefaultValue::Described`] one.
    pub fn value(self) -> Option<String> {
        match self {
            DefaultValue::Value(text) => Some(text.to_owned()),
            DefaultValue::Number(number) => Some(number.to_string()),
            DefaultValue::Described(_) => None,
        }
    }

    /// As `--help` shows it.
    pub fn text(self) -> String {
        match self {
            DefaultValue::Described(text) => text.to_owned(),
            _ => self.value().unwrap_or_default(),
        }
    }
}

/// One environment variable the gateway reads.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: DefaultValue,
    pub meaning: &'static str,
}

/// Every variable read, with its default: the one list parsing, `--help` and the README's
/// table (checked by a test) take them from.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "AIRSTATE_LISTEN",
        default: DefaultValue::Value("0.0.0.0:8080"),
        meaning: "address to serve HTTP on",
    },
    Variable {
        name: "AIRSTATE_REDIS_URL",
        default: DefaultValue::Described("unset: embedded in-memory store"),
        meaning:
            "redis[s]://host:port, redis[s]-sentinel://h:p,h:p/service, redis[s]-cluster://h:p,h:p",
    },
    Variable {
        name: "AIRSTATE_REDIS_PASSWORD",
        default: DefaultValue::Described("unset: the URL's own, if any"),
        meaning: "Redis password, as it is (percent-encoded into the URL by airstate)",
    },
    Variable {
        name: "AIRSTATE_KEY_PREFIX",
        default: DefaultValue::Value("airstate:"),
        meaning: "prefix of every Redis key; no { or }",
    },
    Variable {
        name: "AIRSTATE_REDIS_POOL_SIZE",
        default: DefaultValue::Described("number of CPUs"),
        meaning: "Redis connections per replica",
    },
    Variable {
        name: "AIRSTATE_REDIS_TIMEOUT_MS",
        default: DefaultValue::Value("2000"),
        meaning: "Redis command and connect timeout",
    },
    Variable {
        name: "AIRSTATE_REDIS_RECONNECT_MIN_MS",
        default: DefaultValue::Value("50"),
        meaning: "first pause before reconnecting to Redis (doubles per attempt)",
    },
    Variable {
        name: "AIRSTATE_REDIS_RECONNECT_MAX_MS",
        default: DefaultValue::Value("2000"),
        meaning: "longest pause between reconnect attempts",
    },
    Variable {
        name: "AIRSTATE_REDIS_WAIT_REPLICAS",
        default: DefaultValue::Value("0"),
        meaning: "acknowledge a write only once WAIT confirms this many replicas (0: off)",
    },
    Variable {
        name: "AIRSTATE_REDIS_WAIT_TIMEOUT_MS",
        default: DefaultValue::Value("500"),
        meaning: "how long WAIT may take before the write is answered 503",
    },
    Variable {
        name: "AIRSTATE_SWEEP_INTERVAL_SECONDS",
        default: DefaultValue::Value("60"),
        meaning: "how often expired keys of mixed scopes are reclaimed",
    },
    Variable {
        name: "AIRSTATE_CLEAR_ALL",
        default: DefaultValue::Value("generation"),
        meaning: "generation (O(1); stale map indices reclaimed by the sweeper) | unlink (what airstate before 2026-12-03 did and understands: during a rolling upgrade from it, or before a rollback to it)",
    },
    Variable {
        name: "AIRSTATE_RECONCILE_INTERVAL_SECONDS",
        default: DefaultValue::Value("60"),
        meaning: "how often state of deleted DAG runs and orphaned assets is reclaimed (metastore identity; 0: never)",
    },
    Variable {
        name: "AIRSTATE_RECONCILE_BATCH",
        default: DefaultValue::Value("500"),
        meaning: "runs or assets asked of the metastore at a time in a reconcile pass",
    },
    Variable {
        name: "AIRSTATE_EXPORT_BATCH_BYTES",
        default: DefaultValue::Value("4194304"),
        meaning: "most bytes of values `airstate export` reads from Redis at once (a larger single value is read alone); its memory is a few times this",
    },
    Variable {
        name: "AIRSTATE_IDENTITY",
        default: DefaultValue::Described("metastore with a database, else claims"),
        meaning: "metastore | claims",
    },
    Variable {
        name: "AIRSTATE_IDENTITY_CACHE_SECONDS",
        default: DefaultValue::Value("5"),
        meaning: "how long a resolved task instance or asset is trusted",
    },
    Variable {
        name: "AIRSTATE_IDENTITY_CACHE_CAPACITY",
        default: DefaultValue::Value("100000"),
        meaning: "entries in each identity cache",
    },
    Variable {
        name: "AIRSTATE_METASTORE_POOL_SIZE",
        default: DefaultValue::Value("8"),
        meaning: "metastore connections per replica",
    },
    Variable {
        name: "AIRSTATE_METASTORE_TIMEOUT_MS",
        default: DefaultValue::Value("2000"),
        meaning: "one deadline per metastore statement: pool wait, connecting and the statement together (503 after)",
    },
    Variable {
        name: "AIRSTATE_MAX_BODY_BYTES",
        default: DefaultValue::Value("1049600"),
        meaning: "largest request body accepted (413 above): a 1 MiB value plus 1 KiB for the JSON around it",
    },
    Variable {
        name: "AIRSTATE_MAX_HEADER_BYTES",
        default: DefaultValue::Value("32768"),
        meaning: "largest request line plus headers accepted (431 above)",
    },
    Variable {
        name: "AIRSTATE_HEADER_READ_TIMEOUT_MS",
        default: DefaultValue::Value("10000"),
        meaning: "a connection that started a request's headers but not finished them in this long is closed",
    },
    Variable {
        name: "AIRSTATE_BODY_READ_TIMEOUT_MS",
        default: DefaultValue::Value("30000"),
        meaning: "a request body not received in full this long after its headers is refused (408)",
    },
    Variable {
        name: "AIRSTATE_IDLE_TIMEOUT_MS",
        default: DefaultValue::Value("60000"),
        meaning: "a keep-alive connection with no request for this long is closed",
    },
    Variable {
        name: "AIRSTATE_MAX_CONNECTIONS",
        default: DefaultValue::Value("1000"),
        meaning: "open client connections per replica; one more is closed at once",
    },
    Variable {
        name: "AIRSTATE_MAX_CONCURRENT_REQUESTS",
        default: DefaultValue::Value("256"),
        meaning: "requests handled at a time per replica; one more is a 503 at once",
    },
    Variable {
        name: "AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT",
        default: DefaultValue::Value("16777216"),
        meaning: "request-body bytes handled at a time per replica (declared length; the body cap when chunked); past it a 503 at once",
    },
    Variable {
        name: "AIRSTATE_JWKS_REFRESH_SECONDS",
        default: DefaultValue::Value("300"),
        meaning: "how often a JWKS URL or file is re-read",
    },
    Variable {
        name: "AIRSTATE_JWKS_TIMEOUT_MS",
        default: DefaultValue::Value("5000"),
        meaning: "longest a JWKS URL fetch may take, connect to last byte (start-up fails, a refresh keeps the old keys)",
    },
    Variable {
        name: "AIRSTATE_TOKEN_CACHE_MAX_BYTES",
        default: DefaultValue::Value("33554432"),
        meaning: "memory verified tokens are remembered in (each counted as 4 times its length plus 512 bytes); 0: none",
    },
    Variable {
        name: "AIRSTATE_SHUTDOWN_GRACE_SECONDS",
        default: DefaultValue::Value("20"),
        meaning: "longest wait for in-flight requests on SIGTERM",
    },
    Variable {
        name: "AIRSTATE_SHUTDOWN_DRAIN_SECONDS",
        default: DefaultValue::Value("0"),
        meaning: "on SIGTERM, keep accepting (with /ready 503) this long before stopping, so load balancers drop the replica first",
    },
    Variable {
        name: "AIRSTATE_LOG_FORMAT",
        default: DefaultValue::Described("json, or text on a terminal"),
        meaning: "log line format: json | text",
    },
    Variable {
        name: ALLOW_UNKNOWN_VARIABLES,
        default: DefaultValue::Value("false"),
        meaning: "true: an unknown AIRSTATE_* variable is only warned about; false: it stops the start",
    },
    Variable {
        name: "AIRSTATE_ADMIN_TOKEN",
        default: DefaultValue::Described("unset: admin API off"),
        meaning: "bearer token of the admin API (/admin/v1), at least 32 characters; from a Secret",
    },
    Variable {
        name: "AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES",
        default: DefaultValue::Value("65535"),
        meaning: "largest value the admin API stores (422 above); 0 = no limit",
    },
    // airstate's extensions beyond Airflow's API.
    Variable {
        name: "AIRSTATE_ASSET_REGISTRATION_CHECK",
        default: DefaultValue::Value("false"),
        meaning: "true: a task may use only assets it declares as inlet/outlet",
    },
    Variable {
        name: "AIRSTATE_CHANGE_STREAMS",
        default: DefaultValue::Value("true"),
        meaning: "false: writes publish no change events and streams are refused (406)",
    },
    Variable {
        name: "AIRSTATE_CHANGE_STREAM_BUFFER",
        default: DefaultValue::Number(DEFAULT_EVENT_BUFFER as u64),
        meaning: "change events buffered per stream before it lags",
    },
    Variable {
        name: "AIRSTATE_CHANGE_STREAM_BUFFER_BYTES",
        default: DefaultValue::Number(DEFAULT_EVENT_BUFFER_BYTES as u64),
        meaning: "bytes of change events buffered per stream before it is cut off (lagged)",
    },
    Variable {
        name: "AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS",
        default: DefaultValue::Value("15"),
        meaning: "keep-alive interval of idle change streams",
    },
    Variable {
        name: "AIRSTATE_BULK_READ_MAX_BYTES",
        default: DefaultValue::Value("4194304"),
        meaning: "most bytes of values one bulk read returns (422 above, nothing read)",
    },
    // Forwarding to Airflow's API server.
    Variable {
        name: "AIRSTATE_AIRFLOW_API_URL",
        default: DefaultValue::Described("unset: nothing forwarded, 404"),
        meaning: "Airflow's API server, http://host:port: every request airstate does not serve is forwarded there",
    },
    Variable {
        name: "AIRSTATE_ACCESS_CACHE_SECONDS",
        default: DefaultValue::Value("5"),
        meaning: "how long Airflow's yes to a UI/REST caller's access question is reused (0-5)",
    },
    Variable {
        name: "AIRSTATE_ACCESS_CACHE_CAPACITY",
        default: DefaultValue::Value("10000"),
        meaning: "(credential, DAG or asset, method) answers kept",
    },
    Variable {
        name: "AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS",
        default: DefaultValue::Value("30"),
        meaning: "Core REST API task writes without expires_at expire after this many days; 0 = never",
    },
    Variable {
        name: "AIRSTATE_AIRFLOW_API_CONNECT_TIMEOUT_MS",
        default: DefaultValue::Value("2000"),
        meaning: "connecting to Airflow's API server (502 after)",
    },
    Variable {
        name: "AIRSTATE_AIRFLOW_API_TIMEOUT_MS",
        default: DefaultValue::Value("60000"),
        meaning: "wait for Airflow's response headers (504 after)",
    },
    Variable {
        name: "AIRSTATE_AIRFLOW_API_POOL_IDLE",
        default: DefaultValue::Value("32"),
        meaning: "idle keep-alive connections to Airflow's API server per replica",
    },
    Variable {
        name: "AIRSTATE_AIRFLOW_API_POOL_IDLE_SECONDS",
        default: DefaultValue::Value("60"),
        meaning: "how long an idle connection to Airflow's API server is kept",
    },
    Variable {
        name: "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        default: DefaultValue::Described("unset"),
        meaning: "Airflow metastore, postgresql[+driver]://",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_SECRET",
        default: DefaultValue::Described("unset"),
        meaning: "HMAC secret shared with Airflow",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__TRUSTED_JWKS_URL",
        default: DefaultValue::Described("unset"),
        meaning: "JWKS file path or http(s) URL",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
        default: DefaultValue::Described("unset"),
        meaning: "PEM private key Airflow signs with",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_ALGORITHM",
        default: DefaultValue::Described("HS512 / from the key"),
        meaning: "pin the signing algorithm",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_KID",
        default: DefaultValue::Described("key thumbprint"),
        meaning: "kid of the private key",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_ISSUER",
        default: DefaultValue::Described("unset: not checked"),
        meaning: "required iss claim",
    },
    Variable {
        name: "AIRFLOW__API_AUTH__JWT_LEEWAY",
        default: DefaultValue::Value("10"),
        meaning: "clock leeway in seconds",
    },
    Variable {
        name: "AIRFLOW__EXECUTION_API__JWT_AUDIENCE",
        default: DefaultValue::Value("urn:airflow.apache.org:task"),
        meaning: "accepted audiences, comma-separated",
    },
    Variable {
        name: "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME",
        default: DefaultValue::Value("600"),
        meaning: "lifetime of refreshed tokens, seconds",
    },
    // Read by the libraries airstate uses: logging, OpenTelemetry and the TLS roots.
    Variable {
        name: "RUST_LOG",
        default: DefaultValue::Value("info"),
        meaning: "log filter (tracing EnvFilter syntax), e.g. info,airstate::access=off",
    },
    Variable {
        name: "OTEL_SDK_DISABLED",
        default: DefaultValue::Described("unset"),
        meaning: "true: no traces exported whatever else is set",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: DefaultValue::Described("unset: no traces exported"),
        meaning: "OTLP collector base URL; setting it turns trace export on",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        default: DefaultValue::Described("unset"),
        meaning: "OTLP traces URL, instead of the base URL",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: DefaultValue::Described("http/protobuf"),
        meaning: "grpc | http/protobuf",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        default: DefaultValue::Described("unset"),
        meaning: "protocol for traces, over OTEL_EXPORTER_OTLP_PROTOCOL",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_HEADERS",
        default: DefaultValue::Described("unset"),
        meaning: "key=value,... sent with every export",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        default: DefaultValue::Described("unset"),
        meaning: "headers for traces only",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_TIMEOUT",
        default: DefaultValue::Described("SDK: 10000"),
        meaning: "export timeout, milliseconds",
    },
    Variable {
        name: "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        default: DefaultValue::Described("unset"),
        meaning: "export timeout for traces, milliseconds",
    },
    Variable {
        name: "OTEL_SERVICE_NAME",
        default: DefaultValue::Value("airstate"),
        meaning: "service.name of the exported spans",
    },
    Variable {
        name: "OTEL_RESOURCE_ATTRIBUTES",
        default: DefaultValue::Described("unset"),
        meaning: "key=value,... added to the exported resource",
    },
    Variable {
        name: "OTEL_TRACES_SAMPLER",
        default: DefaultValue::Described("SDK: parentbased_always_on"),
        meaning: "always_on | always_off | traceidratio | parentbased_*",
    },
    Variable {
        name: "OTEL_TRACES_SAMPLER_ARG",
        default: DefaultValue::Described("unset"),
        meaning: "the sampler's ratio, 0.0-1.0",
    },
    Variable {
        name: "OTEL_BSP_SCHEDULE_DELAY",
        default: DefaultValue::Described("SDK: 5000"),
        meaning: "milliseconds between span batch exports",
    },
    Variable {
        name: "OTEL_BSP_MAX_QUEUE_SIZE",
        default: DefaultValue::Described("SDK: 2048"),
        meaning: "spans buffered for export (more are dropped)",
    },
    Variable {
        name: "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        default: DefaultValue::Described("SDK: 512"),
        meaning: "spans per export",
    },
    Variable {
        name: "OTEL_BSP_EXPORT_TIMEOUT",
        default: DefaultValue::Described("SDK: 30000"),
        meaning: "longest export of one batch, milliseconds",
    },
    Variable {
        name: "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT",
        default: DefaultValue::Described("SDK: 128"),
        meaning: "attributes kept per span",
    },
    Variable {
        name: "OTEL_SPAN_EVENT_COUNT_LIMIT",
        default: DefaultValue::Described("SDK: 128"),
        meaning: "events kept per span",
    },
    Variable {
        name: "OTEL_SPAN_LINK_COUNT_LIMIT",
        default: DefaultValue::Described("SDK: 128"),
        meaning: "links kept per span",
    },
    Variable {
        name: "SSL_CERT_FILE",
        default: DefaultValue::Described("system CA roots"),
        meaning: "PEM CA bundle trusted for rediss:// and the metastore's TLS",
    },
    Variable {
        name: "SSL_CERT_DIR",
        default: DefaultValue::Described("system CA roots"),
        meaning: "directory of CA certificates trusted likewise",
    },
];

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests need not touch the process env.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let redis = redis_settings(&env)?;

        let database = env.text("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN");
        let identity = match env.text("AIRSTATE_IDENTITY").as_deref() {
            None if database.is_some() => IdentityMode::Metastore,
            None => IdentityMode::Claims,
            Some("metastore") => IdentityMode::Metastore,
            Some("claims") => IdentityMode::Claims,
            Some(other) => {
                return Err(error(
                    "AIRSTATE_IDENTITY",
                    &format!("expected metastore or claims, got {other:?}"),
                ))
            }
        };
        let metastore = match identity {
            IdentityMode::Claims => None,
            IdentityMode::Metastore => {
                let conn = database.ok_or_else(|| {
                    error(
                        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                        "required when AIRSTATE_IDENTITY=metastore",
                    )
                })?;
                let url = postgres_url_from_sqlalchemy(&conn)
                    .map_err(|m| error("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &m))?;
                crate::identity::tls::Connection::parse(&url)
                    .map_err(|m| error("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", &m))?;
                Some(MetastoreSettings {
                    url,
                    pool_size: env.parse("AIRSTATE_METASTORE_POOL_SIZE")?,
                    cache_ttl: Duration::from_secs(env.parse("AIRSTATE_IDENTITY_CACHE_SECONDS")?),
                    cache_capacity: env.parse("AIRSTATE_IDENTITY_CACHE_CAPACITY")?,
                    timeout: Duration::from_millis(env.parse("AIRSTATE_METASTORE_TIMEOUT_MS")?),
                })
            }
        };

        let algorithm = match env.text("AIRFLOW__API_AUTH__JWT_ALGORITHM") {
            None => None,
            Some(name) => Some(Algorithm::from_str(&name).map_err(|_| {
                error(
                    "AIRFLOW__API_AUTH__JWT_ALGORITHM",
                    &format!("unknown algorithm {name:?}"),
                )
            })?),
        };
        let audiences: Vec<String> = env
            .parse::<String>("AIRFLOW__EXECUTION_API__JWT_AUDIENCE")?
            .split(',')
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if audiences.is_empty() {
            return Err(error(
                "AIRFLOW__EXECUTION_API__JWT_AUDIENCE",
                "needs at least one audience",
            ));
        }
        let auth = AuthSettings {
            secret: env.text("AIRFLOW__API_AUTH__JWT_SECRET"),
            jwks_source: env.text("AIRFLOW__API_AUTH__TRUSTED_JWKS_URL"),
            private_key_path: env
                .text("AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH")
                .map(PathBuf::from),
            algorithm,
            kid: env.text("AIRFLOW__API_AUTH__JWT_KID"),
            issuer: env.text("AIRFLOW__API_AUTH__JWT_ISSUER"),
            audiences,
            leeway: Duration::from_secs(env.parse("AIRFLOW__API_AUTH__JWT_LEEWAY")?),
            refreshed_lifetime: Duration::from_secs(
                env.parse("AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME")?,
            ),
            jwks_refresh: Duration::from_secs(
                env.parse::<u64>("AIRSTATE_JWKS_REFRESH_SECONDS")?.max(1),
            ),
            jwks_timeout: Duration::from_millis(
                env.parse::<u64>("AIRSTATE_JWKS_TIMEOUT_MS")?.max(1),
            ),
            token_cache_bytes: env.parse("AIRSTATE_TOKEN_CACHE_MAX_BYTES")?,
        };
        if auth.secret.is_none() && auth.jwks_source.is_none() && auth.private_key_path.is_none() {
            return Err(error(
                "AIRFLOW__API_AUTH__JWT_SECRET",
                "no JWT key configured: set AIRFLOW__API_AUTH__JWT_SECRET, \
                 AIRFLOW__API_AUTH__TRUSTED_JWKS_URL or AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
            ));
        }

        // airstate's extensions beyond Airflow's API.
        let asset_registration_check = env.parse("AIRSTATE_ASSET_REGISTRATION_CHECK")?;
        if asset_registration_check && identity != IdentityMode::Metastore {
            return Err(error(
                "AIRSTATE_ASSET_REGISTRATION_CHECK",
                "needs Airflow's metastore (AIRSTATE_IDENTITY=metastore): the inlet and outlet \
                 references live there",
            ));
        }
        let change_streams = change_streams(&env)?;
        let change_stream_buffer: usize = env.parse("AIRSTATE_CHANGE_STREAM_BUFFER")?;
        if !(1..=1_000_000).contains(&change_stream_buffer) {
            return Err(error(
                "AIRSTATE_CHANGE_STREAM_BUFFER",
                "must be between 1 and 1000000",
            ));
        }
        let change_stream_buffer_bytes: usize = env.parse("AIRSTATE_CHANGE_STREAM_BUFFER_BYTES")?;
        if change_stream_buffer_bytes == 0 {
            return Err(error(
                "AIRSTATE_CHANGE_STREAM_BUFFER_BYTES",
                "must be at least 1",
            ));
        }
        let heartbeat: u64 = env.parse("AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS")?;
        if heartbeat == 0 {
            return Err(error(
                "AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS",
                "must be at least 1",
            ));
        }
        let bulk_read_max_bytes: usize = env.parse("AIRSTATE_BULK_READ_MAX_BYTES")?;
        if bulk_read_max_bytes == 0 {
            return Err(error("AIRSTATE_BULK_READ_MAX_BYTES", "must be at least 1"));
        }
        let extensions = ExtensionSettings {
            asset_registration_check,
            change_streams,
            change_stream_buffer,
            change_stream_buffer_bytes,
            change_stream_heartbeat: Duration::from_secs(heartbeat),
            bulk_read_max_bytes,
        };

        // A token mounted from a Secret file often ends in a newline.
        let admin_token = env
            .text("AIRSTATE_ADMIN_TOKEN")
            .map(|token| token.trim().to_owned());
        if let Some(token) = &admin_token {
            if token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
                return Err(error(
                    "AIRSTATE_ADMIN_TOKEN",
                    &format!("must be at least {MIN_ADMIN_TOKEN_CHARS} characters"),
                ));
            }
        }
        let admin = AdminSettings {
            token: admin_token,
            max_value_bytes: env.parse("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES")?,
            default_retention_days: env.parse("AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS")?,
        };
        let access_cache_seconds: u64 = env.parse("AIRSTATE_ACCESS_CACHE_SECONDS")?;
        if access_cache_seconds > 5 {
            return Err(error(
                "AIRSTATE_ACCESS_CACHE_SECONDS",
                "at most 5: a permission Airflow withdraws must stop counting quickly",
            ));
        }

        let reconcile_seconds: u64 = env.parse("AIRSTATE_RECONCILE_INTERVAL_SECONDS")?;
        let reconcile_batch: usize = env.parse("AIRSTATE_RECONCILE_BATCH")?;
        if !(1..=10_000).contains(&reconcile_batch) {
            return Err(error(
                "AIRSTATE_RECONCILE_BATCH",
                "must be between 1 and 10000",
            ));
        }
        let reconcile = match &metastore {
            Some(settings) if reconcile_seconds > 0 => Some(ReconcileSettings {
                interval: Duration::from_secs(reconcile_seconds),
                batch: reconcile_batch,
                identity_ttl: settings.cache_ttl,
            }),
            _ => None,
        };

        Ok(Config {
            upstream: upstream_settings(&env)?,
            // A zero TTL would make moka keep entries for ever; one millisecond is "off".
            access_cache_ttl: Duration::from_millis((access_cache_seconds * 1000).max(1)),
            access_cache_capacity: env.parse("AIRSTATE_ACCESS_CACHE_CAPACITY")?,
            admin,
            listen: env.parse("AIRSTATE_LISTEN")?,
            redis,
            identity,
            metastore,
            auth,
            max_body_bytes: env.parse("AIRSTATE_MAX_BODY_BYTES")?,
            shutdown_grace: Duration::from_secs(env.parse("AIRSTATE_SHUTDOWN_GRACE_SECONDS")?),
            shutdown_drain: Duration::from_secs(env.parse("AIRSTATE_SHUTDOWN_DRAIN_SECONDS")?),
            server: server_settings(&env)?,
            extensions,
            reconcile,
        })
    }
}

/// The Redis settings alone, for the tools that need no JWT key (`airstate export` and
/// `import`); `None` when `AIRSTATE_REDIS_URL` is unset.
pub fn redis_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<RedisSettings>, ConfigError> {
    redis_settings(&Env(&lookup))
}

/// `AIRSTATE_EXPORT_BATCH_BYTES`: how many bytes of values `airstate export` reads at
/// once (at least 1).
pub fn export_batch_bytes_from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<usize, ConfigError> {
    let bytes: usize = Env(&lookup).parse("AIRSTATE_EXPORT_BATCH_BYTES")?;
    if bytes == 0 {
        return Err(error("AIRSTATE_EXPORT_BATCH_BYTES", "must be at least 1"));
    }
    Ok(bytes)
}

/// Redis settings with every default, for `url` and `prefix`: what a tool or test that
/// connects on its own uses.
pub fn redis_defaults(url: &str, key_prefix: &str) -> Result<RedisSettings, ConfigError> {
    let settings = redis_from_lookup(|name| match name {
        "AIRSTATE_REDIS_URL" => Some(url.to_owned()),
        "AIRSTATE_KEY_PREFIX" => Some(key_prefix.to_owned()),
        _ => None,
    })?;
    settings.ok_or_else(|| error("AIRSTATE_REDIS_URL", "must not be blank"))
}

fn redis_settings(env: &Env) -> Result<Option<RedisSettings>, ConfigError> {
    Ok(match env.text("AIRSTATE_REDIS_URL") {
        None => None,
        Some(url) => {
            let url = match env.text("AIRSTATE_REDIS_PASSWORD") {
                Some(password) => crate::store::redis::with_password(&url, &password)
                    .map_err(|message| error("AIRSTATE_REDIS_URL", &message))?,
                None => url,
            };
            crate::store::redis::client_config(&url)
                .map_err(|message| error("AIRSTATE_REDIS_URL", &message))?;
            let key_prefix: String = env.parse("AIRSTATE_KEY_PREFIX")?;
            if key_prefix.contains(['{', '}']) {
                return Err(error(
                    "AIRSTATE_KEY_PREFIX",
                    "must not contain { or }: they would change the Cluster hash slot",
                ));
            }
            Some(RedisSettings {
                url,
                key_prefix,
                // fred pipelines every command of a connection; few connections batch
                // more per syscall. One per core measured fastest (BENCHMARKS.md).
                pool_size: env.parse_or("AIRSTATE_REDIS_POOL_SIZE", cores())?,
                command_timeout: Duration::from_millis(env.parse("AIRSTATE_REDIS_TIMEOUT_MS")?),
                sweep_interval: Duration::from_secs(
                    env.parse::<u64>("AIRSTATE_SWEEP_INTERVAL_SECONDS")?.max(1),
                ),
                reconnect: reconnect_pauses(env)?,
                wait_replicas: env.parse("AIRSTATE_REDIS_WAIT_REPLICAS")?,
                change_events: change_streams(env)?,
                wait_timeout: Duration::from_millis(env.parse("AIRSTATE_REDIS_WAIT_TIMEOUT_MS")?),
                // A write trusts its lifecycle-index entry as long as a request trusts
                // the identity it resolved (see `store::lifecycle`).
                index_cache_ttl: Duration::from_secs(env.parse("AIRSTATE_IDENTITY_CACHE_SECONDS")?),
                index_cache_capacity: env.parse("AIRSTATE_IDENTITY_CACHE_CAPACITY")?,
                clear_all: env.parse("AIRSTATE_CLEAR_ALL")?,
            })
        }
    })
}

fn upstream_settings(env: &Env) -> Result<Option<UpstreamSettings>, ConfigError> {
    const VARIABLE: &str = "AIRSTATE_AIRFLOW_API_URL";
    let Some(text) = env.text(VARIABLE) else {
        return Ok(None);
    };
    let url: axum::http::Uri = text
        .trim()
        .parse()
        .map_err(|e| error(VARIABLE, &format!("not a URL ({e})")))?;
    match url.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(error(
                VARIABLE,
                "https is not supported: point it at the API server's in-cluster Service over http",
            ))
        }
        _ => return Err(error(VARIABLE, "must start with http://")),
    }
    let Some(authority) = url.authority() else {
        return Err(error(
            VARIABLE,
            "needs a host, as in http://airflow-api-server:8080",
        ));
    };
    if authority.as_str().contains('@') {
        return Err(error(VARIABLE, "must not carry credentials"));
    }
    if url.query().is_some() {
        return Err(error(VARIABLE, "must not carry a query"));
    }
    let connect_timeout: u64 = env.parse("AIRSTATE_AIRFLOW_API_CONNECT_TIMEOUT_MS")?;
    let response_timeout: u64 = env.parse("AIRSTATE_AIRFLOW_API_TIMEOUT_MS")?;
    if connect_timeout == 0 || response_timeout == 0 {
        return Err(error(
            "AIRSTATE_AIRFLOW_API_TIMEOUT_MS",
            "timeouts to Airflow's API server must be at least 1 ms",
        ));
    }
    Ok(Some(UpstreamSettings {
        url,
        connect_timeout: Duration::from_millis(connect_timeout),
        response_timeout: Duration::from_millis(response_timeout),
        pool_idle: env.parse("AIRSTATE_AIRFLOW_API_POOL_IDLE")?,
        pool_idle_timeout: Duration::from_secs(
            env.parse::<u64>("AIRSTATE_AIRFLOW_API_POOL_IDLE_SECONDS")?
                .max(1),
        ),
    }))
}

fn server_settings(env: &Env) -> Result<ServerSettings, ConfigError> {
    let millis = |name: &str| -> Result<Duration, ConfigError> {
        match env.parse::<u64>(name)? {
            0 => Err(error(name, "must be at least 1 ms")),
            ms => Ok(Duration::from_millis(ms)),
        }
    };
    let max_header_bytes: usize = env.parse("AIRSTATE_MAX_HEADER_BYTES")?;
    // Below this hyper cannot parse a request line and a bearer token.
    if max_header_bytes < 1024 {
        return Err(error("AIRSTATE_MAX_HEADER_BYTES", "must be at least 1024"));
    }
    let max_connections: usize = env.parse("AIRSTATE_MAX_CONNECTIONS")?;
    if max_connections == 0 {
        return Err(error("AIRSTATE_MAX_CONNECTIONS", "must be at least 1"));
    }
    let max_requests: usize = env.parse("AIRSTATE_MAX_CONCURRENT_REQUESTS")?;
    if max_requests == 0 {
        return Err(error(
            "AIRSTATE_MAX_CONCURRENT_REQUESTS",
            "must be at least 1",
        ));
    }
    let max_body_bytes: usize = env.parse("AIRSTATE_MAX_BODY_BYTES")?;
    let max_body_bytes_in_flight: usize = env.parse("AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT")?;
    if max_body_bytes_in_flight < max_body_bytes || max_body_bytes_in_flight > u32::MAX as usize {
        return Err(error(
            "AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT",
            &format!(
                "must be between AIRSTATE_MAX_BODY_BYTES ({max_body_bytes}), so that one largest body fits, and {}",
                u32::MAX
            ),
        ));
    }
    Ok(ServerSettings {
        max_requests,
        max_body_bytes_in_flight,
        max_header_bytes,
        header_read_timeout: millis("AIRSTATE_HEADER_READ_TIMEOUT_MS")?,
        body_read_timeout: millis("AIRSTATE_BODY_READ_TIMEOUT_MS")?,
        idle_timeout: millis("AIRSTATE_IDLE_TIMEOUT_MS")?,
        max_connections,
    })
}

/// `AIRSTATE_CHANGE_STREAMS`: read for the HTTP layer (streams served or 406) and for the
/// Redis store (writes publish or not), including in `airstate import`.
fn change_streams(env: &Env) -> Result<bool, ConfigError> {
    env.parse("AIRSTATE_CHANGE_STREAMS")
}

/// The reconnect backoff: exponential from the first pause to the longest, retried for
/// ever, so a replica always comes back by itself once Redis does.
fn reconnect_pauses(env: &Env) -> Result<(Duration, Duration), ConfigError> {
    let first: u64 = env.parse("AIRSTATE_REDIS_RECONNECT_MIN_MS")?;
    let longest: u64 = env.parse("AIRSTATE_REDIS_RECONNECT_MAX_MS")?;
    if first == 0 || longest < first {
        return Err(error(
            "AIRSTATE_REDIS_RECONNECT_MAX_MS",
            &format!("needs 0 < AIRSTATE_REDIS_RECONNECT_MIN_MS ({first}) <= AIRSTATE_REDIS_RECONNECT_MAX_MS ({longest})"),
        ));
    }
    Ok((Duration::from_millis(first), Duration::from_millis(longest)))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// The opt-out of [`check_variables`]' refusal.
pub const ALLOW_UNKNOWN_VARIABLES: &str = "AIRSTATE_ALLOW_UNKNOWN_VARIABLES";

/// An `AIRSTATE_*` variable airstate does not read, with the known name it most resembles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    pub name: String,
    pub suggestion: Option<&'static str>,
}

impl std::fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.suggestion {
            Some(known) => write!(
                f,
                "{} is not a variable airstate reads; did you mean {known}?",
                self.name
            ),
            None => write!(
                f,
                "{} is not a variable airstate reads (see airstate --help)",
                self.name
            ),
        }
    }
}

/// A misspelt variable would otherwise fall back on its default silently (a typo in
/// `AIRSTATE_REDIS_URL` starts the in-memory store), so unknown `AIRSTATE_*` names stop the
/// start unless [`ALLOW_UNKNOWN_VARIABLES`] is true; then they are returned as warnings.
pub fn check_variables(
    names: impl IntoIterator<Item = String>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<UnknownVariable>, ConfigError> {
    let env = Env(&lookup);
    let allowed: bool = env.parse(ALLOW_UNKNOWN_VARIABLES)?;
    let mut unknown: Vec<UnknownVariable> = names
        .into_iter()
        .filter(|name| name.to_ascii_uppercase().starts_with("AIRSTATE_"))
        .filter(|name| !VARIABLES.iter().any(|variable| variable.name == name))
        .filter(|name| !kubernetes_service_link(name, &env.text(name).unwrap_or_default()))
        .map(|name| UnknownVariable {
            suggestion: nearest_variable(&name),
            name,
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    match unknown.first() {
        Some(first) if !allowed => Err(error(
            &first.name,
            &format!(
                "{}{}; set {ALLOW_UNKNOWN_VARIABLES}=true to start anyway",
                first,
                match unknown.len() {
                    1 => String::new(),
                    n => format!(" (and {} more unknown AIRSTATE_* variables)", n - 1),
                }
            ),
        )),
        _ => Ok(unknown),
    }
}

/// Kubernetes gives every pod `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT_8080_TCP` and the
/// like for each Service in its namespace (unless `enableServiceLinks: false`); a Service
/// named `airstate…` thus puts `AIRSTATE_*` names in the environment that no one misspelt.
fn kubernetes_service_link(name: &str, value: &str) -> bool {
    if name.ends_with("_SERVICE_HOST")
        || name.ends_with("_SERVICE_PORT")
        || name.contains("_SERVICE_PORT_")
    {
        return true;
    }
    // `<SERVICE>_PORT=tcp://10.0.0.1:8080`; a number there is someone's setting.
    if name.ends_with("_PORT") {
        return ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|scheme| value.starts_with(scheme));
    }
    // <SERVICE>_PORT_<number>_<protocol>[_PROTO|_PORT|_ADDR]
    name.split("_PORT_").skip(1).any(|rest| {
        let mut parts = rest.split('_');
        let number = parts.next().unwrap_or_default();
        let protocol = parts.next().unwrap_or_default();
        let field = parts.next();
        !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit())
            && matches!(protocol, "TCP" | "UDP" | "SCTP")
            && matches!(field, None | Some("PROTO" | "PORT" | "ADDR"))
            && parts.next().is_none()
    })
}

/// The known `AIRSTATE_*` name closest to `name`, if it is close enough to be a typo.
fn nearest_variable(name: &str) -> Option<&'static str> {
    let wanted = name.to_ascii_uppercase();
    VARIABLES
        .iter()
        .filter(|variable| variable.name.starts_with("AIRSTATE_"))
        .map(|variable| (edit_distance(&wanted, variable.name), variable.name))
        .filter(|(distance, known)| *distance <= 3.max(known.len() / 5))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, known)| known)
}

/// Optimal string alignment distance: a swap of two neighbours (`ULR` for `URL`) is one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The value `name` takes when unset, from [`VARIABLES`]; `None` when the code works it
/// out or it has none.
pub fn default_value(name: &str) -> Option<String> {
    VARIABLES
        .iter()
        .find(|variable| variable.name == name)
        .and_then(|variable| variable.default.value())
}

fn parse_text<T: FromStr>(name: &str, text: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    text.trim()
        .parse()
        .map_err(|e: T::Err| error(name, &format!("cannot parse {text:?}: {e}")))
}

fn error(variable: &str, message: &str) -> ConfigError {
    ConfigError {
        variable: variable.to_owned(),
        message: message.to_owned(),
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    /// A set, non-blank variable.
    fn text(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|value| !value.trim().is_empty())
    }

    /// The variable's value, or else its default from [`VARIABLES`], parsed the same way.
    fn parse<T: FromStr>(&self, name: &str) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let Some(text) = self.text(name).or_else(|| default_value(name)) else {
            // A programming error, caught by the tests that read every default.
            return Err(error(name, "has no default value in config::VARIABLES"));
        };
        parse_text(name, &text)
    }

    /// For a variable whose default the code works out (a [`DefaultValue::Described`] one).
    fn parse_or<T: FromStr>(&self, name: &str, computed: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.text(name) {
            None => Ok(computed),
            Some(text) => parse_text(name, &text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    const SECRET: (&str, &str) = ("AIRFLOW__API_AUTH__JWT_SECRET", "s3cret");

    #[test]
    fn defaults_need_only_a_key() {
        let c = config(&[SECRET]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert!(c.redis.is_none());
        assert_eq!(c.identity, IdentityMode::Claims);
        assert_eq!(c.auth.audiences, ["urn:airflow.apache.org:task"]);
        assert_eq!(c.auth.leeway, Duration::from_secs(10));
        assert!(c.upstream.is_none());
    }

    #[test]
    fn upstream_url_and_timeouts() {
        let c = config(&[
            SECRET,
            ("AIRSTATE_AIRFLOW_API_URL", "http://airflow-api-server:8080"),
            ("AIRSTATE_AIRFLOW_API_TIMEOUT_MS", "1500"),
        ])
        .unwrap();
        let upstream = c.upstream.unwrap();
        assert_eq!(upstream.url.authority().unwrap(), "airflow-api-server:8080");
        assert_eq!(upstream.response_timeout, Duration::from_millis(1500));
        assert_eq!(upstream.connect_timeout, Duration::from_millis(2000));
        assert_eq!(upstream.pool_idle, 32);
        let url = ("AIRSTATE_AIRFLOW_API_URL", "http://airflow:8080");
        for bad in ["soon", "0"] {
            let err = config(&[SECRET, url, ("AIRSTATE_AIRFLOW_API_TIMEOUT_MS", bad)]).unwrap_err();
            assert_eq!(err.variable, "AIRSTATE_AIRFLOW_API_TIMEOUT_MS", "{bad}");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let err = config(&[]).unwrap_err();
        assert_eq!(err.variable, "AIRFLOW__API_AUTH__JWT_SECRET");
        for (var, value) in [
            ("AIRSTATE_LISTEN", "nowhere"),
            ("AIRSTATE_REDIS_URL", "http://x"),
            ("AIRSTATE_IDENTITY", "magic"),
            ("AIRFLOW__API_AUTH__JWT_LEEWAY", "-1"),
            ("AIRFLOW__API_AUTH__JWT_ALGORITHM", "none"),
            ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "mysql://db/airflow"),
            ("AIRSTATE_ASSET_REGISTRATION_CHECK", "yes"),
            // Asked for without a metastore to check against.
            ("AIRSTATE_ASSET_REGISTRATION_CHECK", "true"),
            ("AIRSTATE_CHANGE_STREAMS", "off"),
            ("AIRSTATE_CHANGE_STREAM_BUFFER", "0"),
            ("AIRSTATE_CHANGE_STREAM_BUFFER_BYTES", "0"),
            ("AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS", "0"),
            ("AIRSTATE_BULK_READ_MAX_BYTES", "0"),
            ("AIRSTATE_TOKEN_CACHE_MAX_BYTES", "-1"),
            ("AIRSTATE_ADMIN_TOKEN", "too-short"),
            ("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES", "-1"),
            ("AIRSTATE_ACCESS_CACHE_SECONDS", "6"),
            ("AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS", "-1"),
            ("AIRSTATE_AIRFLOW_API_URL", "airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "https://airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "http://user:pw@airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "http://airflow:8080/?x=1"),
            ("AIRSTATE_MAX_HEADER_BYTES", "100"),
            ("AIRSTATE_HEADER_READ_TIMEOUT_MS", "0"),
            ("AIRSTATE_BODY_READ_TIMEOUT_MS", "0"),
            ("AIRSTATE_IDLE_TIMEOUT_MS", "soon"),
            ("AIRSTATE_MAX_CONNECTIONS", "0"),
            ("AIRSTATE_MAX_CONCURRENT_REQUESTS", "0"),
            ("AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT", "1000"),
        ] {
            let err = config(&[SECRET, (var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{value}");
        }
        let err = config(&[
            SECRET,
            ("AIRSTATE_REDIS_URL", "redis://x"),
            ("AIRSTATE_KEY_PREFIX", "a{b}"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "AIRSTATE_KEY_PREFIX");
    }

    #[test]
    fn admin_api_settings() {
        let off = config(&[SECRET]).unwrap();
        assert!(off.admin.token.is_none());
        assert_eq!(off.admin.max_value_bytes, 65535);
        let token = "t".repeat(MIN_ADMIN_TOKEN_CHARS);
        let on = config(&[
            SECRET,
            ("AIRSTATE_ADMIN_TOKEN", &format!("{token}\n")),
            ("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES", "0"),
        ])
        .unwrap();
        assert_eq!(on.admin.token.as_deref(), Some(token.as_str()));
        assert_eq!(on.admin.max_value_bytes, 0);
        assert!(
            !format!("{on:?}").contains(&token),
            "the token is never printed"
        );
    }

    #[test]
    fn redis_topologies_and_resilience_settings() {
        let c = config(&[
            SECRET,
            (
                "AIRSTATE_REDIS_URL",
                "redis-cluster://10.0.0.1:7000,10.0.0.2:7000",
            ),
        ])
        .unwrap();
        let redis = c.redis.unwrap();
        assert_eq!(
            redis.reconnect,
            (Duration::from_millis(50), Duration::from_millis(2000))
        );
        assert_eq!(redis.wait_replicas, 0, "confirmed writes are opt-in");
        let c = config(&[
            SECRET,
            (
                "AIRSTATE_REDIS_URL",
                "redis-sentinel://s1:26379,s2:26379/mymaster",
            ),
            ("AIRSTATE_REDIS_RECONNECT_MIN_MS", "10"),
            ("AIRSTATE_REDIS_RECONNECT_MAX_MS", "500"),
            ("AIRSTATE_REDIS_WAIT_REPLICAS", "1"),
            ("AIRSTATE_REDIS_WAIT_TIMEOUT_MS", "250"),
        ])
        .unwrap();
        let redis = c.redis.unwrap();
        assert_eq!(
            redis.reconnect,
            (Duration::from_millis(10), Duration::from_millis(500))
        );
        assert_eq!(redis.wait_replicas, 1);
        assert_eq!(redis.wait_timeout, Duration::from_millis(250));
        for (var, value, blamed) in [
            (
                "AIRSTATE_REDIS_URL",
                "redis-sentinel://s1:1",
                "AIRSTATE_REDIS_URL",
            ),
            (
                "AIRSTATE_REDIS_URL",
                "redis-cluster://h:1/2",
                "AIRSTATE_REDIS_URL",
            ),
            (
                "AIRSTATE_REDIS_RECONNECT_MIN_MS",
                "0",
                "AIRSTATE_REDIS_RECONNECT_MAX_MS",
            ),
            (
                "AIRSTATE_REDIS_RECONNECT_MIN_MS",
                "5000",
                "AIRSTATE_REDIS_RECONNECT_MAX_MS",
            ),
            (
                "AIRSTATE_REDIS_WAIT_REPLICAS",
                "-1",
                "AIRSTATE_REDIS_WAIT_REPLICAS",
            ),
        ] {
            let mut vars = vec![SECRET, (var, value)];
            if var != "AIRSTATE_REDIS_URL" {
                vars.push(("AIRSTATE_REDIS_URL", "redis://h:1"));
            }
            assert_eq!(config(&vars).unwrap_err().variable, blamed, "{var}={value}");
        }
    }

    /// The README's configuration table (section "Configuration") lists the variables of [`VARIABLES`], in its
    /// order, with the same defaults (its meanings may say more than `--help`).
    #[test]
    fn readme_table_matches_the_variables() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme
            .find("\n## Configuration\n")
            .expect("the README has a Configuration section");
        let header = section
            + readme[section..]
                .find("| variable | default | meaning |")
                .expect("the Configuration section has the variables table");
        let rows: Vec<(String, String)> = readme[header..]
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                let cells: Vec<&str> = line.split(" | ").collect();
                (
                    cells[0]
                        .trim_start_matches("| ")
                        .trim_matches('`')
                        .to_owned(),
                    cells[1].to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = VARIABLES
            .iter()
            .map(|variable| {
                let shown = match variable.default.value() {
                    Some(value) => format!("`{value}`"),
                    None => variable.default.text(),
                };
                (variable.name.to_owned(), shown)
            })
            .collect();
        assert_eq!(rows, expected);
    }

    /// Every default in [`VARIABLES`] parses: a configuration reading every variable (a
    /// metastore and Redis) starts from nothing but a key, the URLs and the database.
    #[test]
    fn every_default_parses_to_its_value() {
        let c = config(&[
            SECRET,
            ("AIRSTATE_REDIS_URL", "redis://h:1"),
            (
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "postgresql://u@db/airflow",
            ),
        ])
        .unwrap();
        assert_eq!(c.listen, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert_eq!(c.max_body_bytes, 1_049_600);
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.shutdown_drain, Duration::ZERO);
        assert_eq!(c.server.max_header_bytes, 32768);
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_connections, 1000);
        assert_eq!(c.server.max_requests, 256);
        assert_eq!(export_batch_bytes_from_lookup(|_| None).unwrap(), 4 << 20);
        assert_eq!(c.server.max_body_bytes_in_flight, 16 << 20);
        let redis = c.redis.unwrap();
        assert_eq!(redis.key_prefix, "airstate:");
        assert_eq!(redis.command_timeout, Duration::from_millis(2000));
        assert_eq!(redis.sweep_interval, Duration::from_secs(60));
        assert_eq!(redis.wait_timeout, Duration::from_millis(500));
        assert!(redis.change_events);
        let metastore = c.metastore.unwrap();
        assert_eq!(metastore.pool_size, 8);
        assert_eq!(metastore.cache_ttl, Duration::from_secs(5));
        assert_eq!(metastore.cache_capacity, 100_000);
        assert_eq!(metastore.timeout, Duration::from_millis(2000));
        assert_eq!(c.auth.refreshed_lifetime, Duration::from_secs(600));
        assert_eq!(c.auth.jwks_refresh, Duration::from_secs(300));
        assert_eq!(c.auth.jwks_timeout, Duration::from_secs(5));
        assert_eq!(c.auth.token_cache_bytes, 33_554_432);
        assert!(!c.extensions.asset_registration_check);
        assert!(c.extensions.change_streams);
        assert_eq!(c.extensions.change_stream_buffer, DEFAULT_EVENT_BUFFER);
        assert_eq!(c.extensions.change_stream_buffer_bytes, 4_194_304);
        assert_eq!(
            c.extensions.change_stream_heartbeat,
            Duration::from_secs(15)
        );
        assert_eq!(c.extensions.bulk_read_max_bytes, 4_194_304);
        assert_eq!(c.admin.max_value_bytes, 65535);
        // The settings a tool connecting on its own gets are the same defaults.
        let tool = redis_defaults("redis://h:1", "p:").unwrap();
        assert_eq!(tool.command_timeout, redis.command_timeout);
        assert_eq!(tool.reconnect, redis.reconnect);
        assert_eq!(tool.key_prefix, "p:");
    }

    #[test]
    fn unknown_variables_are_refused_with_the_nearest_name() {
        let check = |names: &[&str], allow: Option<&str>| {
            let allow = allow.map(str::to_owned);
            check_variables(names.iter().map(|n| n.to_string()), |name| match name {
                ALLOW_UNKNOWN_VARIABLES => allow.clone(),
                "AIRSTATE_PORT" => Some("tcp://10.0.0.1:8080".to_owned()),
                "AIRSTATE_LISTEN_PORT" => Some("8080".to_owned()),
                _ => None,
            })
        };
        let err = check(&["AIRSTATE_REDIS_ULR", "PATH"], None).unwrap_err();
        assert_eq!(err.variable, "AIRSTATE_REDIS_ULR");
        assert!(
            err.message.contains("did you mean AIRSTATE_REDIS_URL?"),
            "{err}"
        );
        assert!(err.message.contains(ALLOW_UNKNOWN_VARIABLES), "{err}");
        assert_eq!(
            nearest_variable("airstate_listen"),
            Some("AIRSTATE_LISTEN"),
            "case is a typo too"
        );
        assert_eq!(
            nearest_variable("AIRSTATE_REDIS_POOLSIZE"),
            Some("AIRSTATE_REDIS_POOL_SIZE")
        );
        assert_eq!(nearest_variable("AIRSTATE_SOMETHING_ELSE_ENTIRELY"), None);
        // Known names, other prefixes and Kubernetes service links pass.
        let fine = [
            "AIRSTATE_REDIS_URL",
            "AIRFLOW__CORE__DAGS_FOLDER",
            "AIRSTATE_SERVICE_HOST",
            "AIRSTATE_SERVICE_PORT",
            "AIRSTATE_SERVICE_PORT_HTTP",
            "AIRSTATE_PORT",
            "AIRSTATE_PORT_8080_TCP",
            "AIRSTATE_PORT_8080_TCP_ADDR",
            "AIRSTATE_REDIS_PORT_6379_TCP_PROTO",
        ];
        assert_eq!(check(&fine, None).unwrap(), []);
        assert!(check(&["AIRSTATE_PORT_8080_TCP_EXTRA"], None).is_err());
        assert!(check(&["AIRSTATE_LISTEN_PORT"], None).is_err());
        // The opt-out turns the refusal into warnings; it must itself be a boolean.
        let warned = check(&["AIRSTATE_REDIS_ULR"], Some("true")).unwrap();
        assert_eq!(warned[0].suggestion, Some("AIRSTATE_REDIS_URL"));
        assert_eq!(
            check(&[], Some("yes")).unwrap_err().variable,
            ALLOW_UNKNOWN_VARIABLES
        );
    }

    #[test]
    fn database_selects_metastore_identity() {
        let c = config(&[
            SECRET,
            (
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "postgresql+psycopg2://u@db/airflow",
            ),
            ("AIRFLOW__EXECUTION_API__JWT_AUDIENCE", "a, b"),
        ])
        .unwrap();
        assert_eq!(c.identity, IdentityMode::Metastore);
        assert_eq!(c.metastore.unwrap().url, "postgresql://u@db/airflow");
        assert_eq!(c.auth.audiences, ["a", "b"]);
    }
}
