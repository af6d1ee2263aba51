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
    /// airstate's extensions beyond Airflow's API.
    pub extensions: ExtensionSettings,
    pub admin: AdminSettings,
    /// `None`: requests airstate does not serve itself are 404s, as before forwarding existed.
    pub upstream: Option<UpstreamSettings>,
    /// How long Airflow's "allowed" answer to a Core REST API access question is reused.
    pub access_cache_ttl: Duration,
    pub access_cache_capacity: u64,
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
    /// Change streams: how often an idle stream gets a keep-alive comment.
    pub change_stream_heartbeat: Duration,
}

impl Default for ExtensionSettings {
    fn default() -> Self {
        Self {
            asset_registration_check: false,
            change_streams: true,
            change_stream_buffer: 256,
            change_stream_heartbeat: Duration::from_secs(15),
        }
    }
}

/// Every variable read, with its default, for `--help` and the README.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "AIRSTATE_LISTEN",
        "0.0.0.0:8080",
        "address to serve HTTP on",
    ),
    (
        "AIRSTATE_REDIS_URL",
        "(unset: embedded in-memory store)",
        "redis[s]://host:port, redis[s]-sentinel://h:p,h:p/service, redis[s]-cluster://h:p,h:p",
    ),
    (
        "AIRSTATE_KEY_PREFIX",
        "airstate:",
        "prefix of every Redis key; no { or }",
    ),
    (
        "AIRSTATE_REDIS_POOL_SIZE",
        "number of CPUs",
        "Redis connections per replica",
    ),
    (
        "AIRSTATE_REDIS_TIMEOUT_MS",
        "2000",
        "Redis command and connect timeout",
    ),
    (
        "AIRSTATE_REDIS_RECONNECT_MIN_MS",
        "50",
        "first pause before reconnecting to Redis (doubles per attempt)",
    ),
    (
        "AIRSTATE_REDIS_RECONNECT_MAX_MS",
        "2000",
        "longest pause between reconnect attempts",
    ),
    (
        "AIRSTATE_REDIS_WAIT_REPLICAS",
        "0 (off)",
        "acknowledge a write only once WAIT confirms this many replicas",
    ),
    (
        "AIRSTATE_REDIS_WAIT_TIMEOUT_MS",
        "500",
        "how long WAIT may take before the write is answered 503",
    ),
    (
        "AIRSTATE_IDENTITY",
        "metastore if a database is set, else claims",
        "metastore | claims",
    ),
    (
        "AIRSTATE_IDENTITY_CACHE_SECONDS",
        "5",
        "how long a resolved task instance or asset is trusted",
    ),
    (
        "AIRSTATE_IDENTITY_CACHE_CAPACITY",
        "100000",
        "entries in each identity cache",
    ),
    (
        "AIRSTATE_METASTORE_POOL_SIZE",
        "8",
        "metastore connections per replica",
    ),
    (
        "AIRSTATE_METASTORE_TIMEOUT_MS",
        "2000",
        "metastore connect/query timeout",
    ),
    (
        "AIRSTATE_MAX_BODY_BYTES",
        "1048576",
        "largest request body accepted (413 above)",
    ),
    (
        "AIRSTATE_JWKS_REFRESH_SECONDS",
        "300",
        "how often a JWKS URL or file is re-read",
    ),
    (
        "AIRSTATE_SHUTDOWN_GRACE_SECONDS",
        "20",
        "longest wait for in-flight requests on SIGTERM",
    ),
    (
        "AIRSTATE_SWEEP_INTERVAL_SECONDS",
        "60",
        "how often expired keys of mixed scopes are reclaimed",
    ),
    (
        "AIRSTATE_LOG_FORMAT",
        "json, or text on a terminal",
        "log line format: json | text",
    ),
    (
        "AIRSTATE_ADMIN_TOKEN",
        "(unset: admin API off)",
        "bearer token of the admin API (/admin/v1), at least 32 characters; from a Secret",
    ),
    (
        "AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES",
        "65535",
        "largest value the admin API stores (422 above); 0 = no limit",
    ),
    // airstate's extensions beyond Airflow's API.
    (
        "AIRSTATE_ASSET_REGISTRATION_CHECK",
        "false",
        "true: a task may use only assets it declares as inlet/outlet",
    ),
    (
        "AIRSTATE_CHANGE_STREAMS",
        "true",
        "false: writes publish no change events and streams are refused (406)",
    ),
    (
        "AIRSTATE_CHANGE_STREAM_BUFFER",
        "256",
        "change events buffered per stream before it lags",
    ),
    (
        "AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS",
        "15",
        "keep-alive interval of idle change streams",
    ),
    // Forwarding to Airflow's API server.
    (
        "AIRSTATE_AIRFLOW_API_URL",
        "(unset: nothing forwarded, 404)",
        "Airflow's API server, http://host:port: every request airstate does not serve is forwarded there",
    ),
    (
        "AIRSTATE_ACCESS_CACHE_SECONDS",
        "5",
        "how long Airflow's yes to a UI/REST caller's access question is reused (0-5)",
    ),
    (
        "AIRSTATE_ACCESS_CACHE_CAPACITY",
        "10000",
        "(credential, DAG or asset, method) answers kept",
    ),
    (
        "AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS",
        "30",
        "Core REST API task writes without expires_at expire after this many days; 0 = never",
    ),
    (
        "AIRSTATE_AIRFLOW_API_CONNECT_TIMEOUT_MS",
        "2000",
        "connecting to Airflow's API server (502 after)",
    ),
    (
        "AIRSTATE_AIRFLOW_API_TIMEOUT_MS",
        "60000",
        "wait for Airflow's response headers (504 after)",
    ),
    (
        "AIRSTATE_AIRFLOW_API_POOL_IDLE",
        "32",
        "idle keep-alive connections to Airflow's API server per replica",
    ),
    (
        "AIRSTATE_AIRFLOW_API_POOL_IDLE_SECONDS",
        "60",
        "how long an idle connection to Airflow's API server is kept",
    ),
    (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "(unset)",
        "Airflow metastore, postgresql[+driver]://",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "(unset)",
        "HMAC secret shared with Airflow",
    ),
    (
        "AIRFLOW__API_AUTH__TRUSTED_JWKS_URL",
        "(unset)",
        "JWKS file path or http(s) URL",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
        "(unset)",
        "PEM private key Airflow signs with",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_ALGORITHM",
        "HS512 / from the key",
        "pin the signing algorithm",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_KID",
        "(key thumbprint)",
        "kid of the private key",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_ISSUER",
        "(unset: not checked)",
        "required iss claim",
    ),
    (
        "AIRFLOW__API_AUTH__JWT_LEEWAY",
        "10",
        "clock leeway in seconds",
    ),
    (
        "AIRFLOW__EXECUTION_API__JWT_AUDIENCE",
        "urn:airflow.apache.org:task",
        "accepted audiences, comma-separated",
    ),
    (
        "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME",
        "600",
        "lifetime of refreshed tokens, seconds",
    ),
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
                    pool_size: env.parse("AIRSTATE_METASTORE_POOL_SIZE", 8usize)?,
                    cache_ttl: Duration::from_secs(
                        env.parse("AIRSTATE_IDENTITY_CACHE_SECONDS", 5u64)?,
                    ),
                    cache_capacity: env.parse("AIRSTATE_IDENTITY_CACHE_CAPACITY", 100_000u64)?,
                    timeout: Duration::from_millis(
                        env.parse("AIRSTATE_METASTORE_TIMEOUT_MS", 2000u64)?,
                    ),
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
            .text("AIRFLOW__EXECUTION_API__JWT_AUDIENCE")
            .unwrap_or_else(|| "urn:airflow.apache.org:task".to_owned())
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
            leeway: Duration::from_secs(env.parse("AIRFLOW__API_AUTH__JWT_LEEWAY", 10u64)?),
            refreshed_lifetime: Duration::from_secs(
                env.parse("AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME", 600u64)?,
            ),
            jwks_refresh: Duration::from_secs(
                env.parse("AIRSTATE_JWKS_REFRESH_SECONDS", 300u64)?.max(1),
            ),
        };
        if auth.secret.is_none() && auth.jwks_source.is_none() && auth.private_key_path.is_none() {
            return Err(error(
                "AIRFLOW__API_AUTH__JWT_SECRET",
                "no JWT key configured: set AIRFLOW__API_AUTH__JWT_SECRET, \
                 AIRFLOW__API_AUTH__TRUSTED_JWKS_URL or AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH",
            ));
        }

        // airstate's extensions beyond Airflow's API.
        let asset_registration_check = env.parse("AIRSTATE_ASSET_REGISTRATION_CHECK", false)?;
        if asset_registration_check && identity != IdentityMode::Metastore {
            return Err(error(
                "AIRSTATE_ASSET_REGISTRATION_CHECK",
                "needs Airflow's metastore (AIRSTATE_IDENTITY=metastore): the inlet and outlet \
                 references live there",
            ));
        }
        let defaults = ExtensionSettings::default();
        let change_streams = change_streams(&env)?;
        let change_stream_buffer = env.parse(
            "AIRSTATE_CHANGE_STREAM_BUFFER",
            defaults.change_stream_buffer,
        )?;
        if !(1..=1_000_000).contains(&change_stream_buffer) {
            return Err(error(
                "AIRSTATE_CHANGE_STREAM_BUFFER",
                "must be between 1 and 1000000",
            ));
        }
        let heartbeat = env.parse(
            "AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS",
            defaults.change_stream_heartbeat.as_secs(),
        )?;
        if heartbeat == 0 {
            return Err(error(
                "AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS",
                "must be at least 1",
            ));
        }
        let extensions = ExtensionSettings {
            asset_registration_check,
            change_streams,
            change_stream_buffer,
            change_stream_heartbeat: Duration::from_secs(heartbeat),
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
            max_value_bytes: env
                .parse("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES", 65535usize)?,
            default_retention_days: env
                .parse("AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS", 30u32)?,
        };
        let access_cache_seconds = env.parse("AIRSTATE_ACCESS_CACHE_SECONDS", 5u64)?;
        if access_cache_seconds > 5 {
            return Err(error(
                "AIRSTATE_ACCESS_CACHE_SECONDS",
                "at most 5: a permission Airflow withdraws must stop counting quickly",
            ));
        }

        Ok(Config {
            upstream: upstream_settings(&env)?,
            // A zero TTL would make moka keep entries for ever; one millisecond is "off".
            access_cache_ttl: Duration::from_millis((access_cache_seconds * 1000).max(1)),
            access_cache_capacity: env.parse("AIRSTATE_ACCESS_CACHE_CAPACITY", 10_000u64)?,
            admin,
            listen: env.parse("AIRSTATE_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            redis,
            identity,
            metastore,
            auth,
            max_body_bytes: env.parse("AIRSTATE_MAX_BODY_BYTES", 1_048_576usize)?,
            shutdown_grace: Duration::from_secs(
                env.parse("AIRSTATE_SHUTDOWN_GRACE_SECONDS", 20u64)?,
            ),
            extensions,
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

fn redis_settings(env: &Env) -> Result<Option<RedisSettings>, ConfigError> {
    Ok(match env.text("AIRSTATE_REDIS_URL") {
        None => None,
        Some(url) => {
            crate::store::redis::client_config(&url)
                .map_err(|message| error("AIRSTATE_REDIS_URL", &message))?;
            let key_prefix = env
                .text("AIRSTATE_KEY_PREFIX")
                .unwrap_or_else(|| "airstate:".to_owned());
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
                pool_size: env.parse("AIRSTATE_REDIS_POOL_SIZE", cores())?,
                command_timeout: Duration::from_millis(
                    env.parse("AIRSTATE_REDIS_TIMEOUT_MS", 2000u64)?,
                ),
                sweep_interval: Duration::from_secs(
                    env.parse("AIRSTATE_SWEEP_INTERVAL_SECONDS", 60u64)?.max(1),
                ),
                reconnect: reconnect_pauses(env)?,
                wait_replicas: env.parse("AIRSTATE_REDIS_WAIT_REPLICAS", 0u32)?,
                change_events: change_streams(env)?,
                wait_timeout: Duration::from_millis(
                    env.parse("AIRSTATE_REDIS_WAIT_TIMEOUT_MS", 500u64)?,
                ),
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
    let connect_timeout = env.parse("AIRSTATE_AIRFLOW_API_CONNECT_TIMEOUT_MS", 2000u64)?;
    let response_timeout = env.parse("AIRSTATE_AIRFLOW_API_TIMEOUT_MS", 60_000u64)?;
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
        pool_idle: env.parse("AIRSTATE_AIRFLOW_API_POOL_IDLE", 32usize)?,
        pool_idle_timeout: Duration::from_secs(
            env.parse("AIRSTATE_AIRFLOW_API_POOL_IDLE_SECONDS", 60u64)?
                .max(1),
        ),
    }))
}

/// `AIRSTATE_CHANGE_STREAMS`: read for the HTTP layer (streams served or 406) and for the
/// Redis store (writes publish or not), including in `airstate import`.
fn change_streams(env: &Env) -> Result<bool, ConfigError> {
    env.parse(
        "AIRSTATE_CHANGE_STREAMS",
        ExtensionSettings::default().change_streams,
    )
}

/// The reconnect backoff: exponential from the first pause to the longest, retried for
/// ever, so a replica always comes back by itself once Redis does.
fn reconnect_pauses(env: &Env) -> Result<(Duration, Duration), ConfigError> {
    let first = env.parse("AIRSTATE_REDIS_RECONNECT_MIN_MS", 50u64)?;
    let longest = env.parse("AIRSTATE_REDIS_RECONNECT_MAX_MS", 2000u64)?;
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

    fn parse<T: FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.text(name) {
            None => Ok(default),
            Some(text) => text
                .trim()
                .parse()
                .map_err(|e: T::Err| error(name, &format!("cannot parse {text:?}: {e}"))),
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
            ("AIRSTATE_CHANGE_STREAM_HEARTBEAT_SECONDS", "0"),
            ("AIRSTATE_ADMIN_TOKEN", "too-short"),
            ("AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES", "-1"),
            ("AIRSTATE_ACCESS_CACHE_SECONDS", "6"),
            ("AIRFLOW__STATE_STORE__DEFAULT_RETENTION_DAYS", "-1"),
            ("AIRSTATE_AIRFLOW_API_URL", "airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "https://airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "http://user:pw@airflow:8080"),
            ("AIRSTATE_AIRFLOW_API_URL", "http://airflow:8080/?x=1"),
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
