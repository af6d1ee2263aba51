//! The connection pool and the one way a command is sent: [`Connection::call`], with its
//! retries, error classification and metrics. The pool is private to this module, so no
//! command can skip them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::{ExclusivePool, SubscriberClient};
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::ClusterHash;
use fred::util::redis_keyslot;
use tracing::Instrument;

use super::super::{StoreError, StoreResult};
use super::url::client_config;
use super::RedisSettings;

/// The pooled connections to Redis, shared by every handle of a store.
#[derive(Clone)]
pub(super) struct Connection {
    pool: Pool,
    /// Present when writes wait for replicas (see [`RedisSettings::wait_replicas`]).
    confirmed: Option<Arc<ConfirmedWrites>>,
    command_timeout: Duration,
    /// Answer at once while no pooled connection is up, instead of queueing the command
    /// for the whole timeout. Not on a Cluster: there fred reports the least healthy
    /// node's state, and the other nodes' slots are still served.
    fail_fast: bool,
    /// The last connection error fred reported, so a 503 or `/ready` can say why Redis
    /// is unreachable (a refused port, an untrusted certificate, a wrong password).
    last_error: Arc<std::sync::Mutex<String>>,
}

/// Writes acknowledged only after `WAIT`. `WAIT` counts the writes of the connection it
/// is sent on and blocks that connection, so each such write borrows a client of its
/// own instead of sharing the pipelined pool.
struct ConfirmedWrites {
    clients: ExclusivePool,
    replicas: i64,
    timeout: Duration,
}

/// The client a write goes through: a shared pooled one, or one borrowed for a write
/// that must be confirmed by `WAIT` on the same connection.
pub(super) enum WriteClient<'a> {
    Shared(&'a Client),
    Exclusive(tokio::sync::OwnedMutexGuard<Client>),
}

impl WriteClient<'_> {
    fn client(&self) -> &Client {
        match self {
            WriteClient::Shared(client) => client,
            WriteClient::Exclusive(guard) => guard,
        }
    }
}

/// Whether start-up waits for Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Fail when Redis cannot be reached: a one-shot command (export, import) has nothing
    /// to do without it.
    RequireRedis,
    /// Start anyway and keep connecting in the background: the server forwards every other
    /// Execution API call and answers state calls 503 until Redis is back (README,
    /// "Readiness").
    ConnectInBackground,
}

/// fred's builder with what every connection to Redis shares: the URL, the command
/// timeout and the reconnect backoff.
fn builder(settings: &RedisSettings, startup: Startup) -> StoreResult<Builder> {
    let mut config = client_config(&settings.url)
        .map_err(|e| StoreError::Internal(format!("AIRSTATE_REDIS_URL: {e}")))?;
    // fred's own name for it: false makes the first connection follow the reconnect
    // policy too, instead of failing `init` at once.
    config.fail_fast = startup == Startup::RequireRedis;
    let timeout = settings.command_timeout;
    let (first_pause, longest_pause) = settings.reconnect;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|perf| {
            // fred's default is no timeout at all: a request would hang with Redis.
            perf.default_command_timeout = timeout;
        })
        .with_connection_config(|conn| {
            conn.connection_timeout = timeout;
            conn.internal_command_timeout = timeout;
        })
        // Unlimited attempts: a replica must come back by itself when Redis does.
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            millis_u32(first_pause),
            millis_u32(longest_pause),
            2,
        ));
    Ok(builder)
}

/// The connection change streams listen on. Pub/sub is no request and reply, so it is
/// the one connection commands do not go through [`Connection::call`] on; the event hub
/// (`store::events`) drives it.
/// Never a reason to stop start-up: it connects in the background, waiting for its first
/// connection only while the pool has one (a Redis that is down costs start-up one wait,
/// the pool's, not two).
pub(super) async fn subscriber(
    settings: &RedisSettings,
    redis: &Connection,
) -> StoreResult<SubscriberClient> {
    let startup = Startup::ConnectInBackground;
    let subscriber = builder(settings, startup)?
        .build_subscriber_client()
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let wait = if redis.is_up() {
        settings.command_timeout
    } else {
        Duration::ZERO
    };
    start(
        &subscriber,
        startup,
        wait,
        || subscriber.is_connected(),
        || false,
    )
    .await?;
    Ok(subscriber)
}

/// Connects `client` (a client or a pool). With [`Startup::ConnectInBackground`] it waits
/// for the first attempt's outcome: until `connected()`, or `failed()` (fred reported a
/// connection error), or at most `bound`, and then leaves fred's reconnect policy to it;
/// commands sent meanwhile fail fast (see [`Connection::call`]). Waiting for the outcome
/// rather than a fixed time keeps a slow but healthy start (a loaded node) from serving
/// its first requests as if Redis were down.
async fn start<C: ClientLike>(
    client: &C,
    startup: Startup,
    bound: Duration,
    connected: impl Fn() -> bool,
    failed: impl Fn() -> bool,
) -> StoreResult<()> {
    if startup == Startup::RequireRedis {
        client.init().await.map_err(classify)?;
        return Ok(());
    }
    drop(client.connect());
    if bound.is_zero() {
        return Ok(());
    }
    let deadline = Instant::now() + bound;
    while !connected() {
        if failed() || Instant::now() >= deadline {
            tracing::warn!(
                "Redis not reachable at start-up; serving without it and connecting in the background"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

impl Connection {
    /// Connects the pool (and the clients of confirmed writes); see [`Startup`] for what
    /// happens when Redis cannot be reached.
    pub(super) async fn connect(settings: &RedisSettings, startup: Startup) -> StoreResult<Self> {
        let timeout = settings.command_timeout;
        let wait_timeout = settings.wait_timeout;
        let mut builder = builder(settings, startup)?;
        builder.with_connection_config(|conn| {
            // One attempt: a command is never replayed after a reconnect. A replayed
            // conditional write whose first run succeeded would answer 412 for the
            // caller's own write. The caller gets a 503 and retries instead.
            conn.max_command_attempts = 1;
            // No redirections followed by fred itself. fred 10.1 answers an ASK by
            // writing ASKING on a pipelined connection and taking the next frame as
            // its reply, which steals another command's reply and shifts every later
            // one on that connection. It also counts each redirect as a write attempt.
            // With none allowed, fred still re-syncs its slot map on MOVED, and hands
            // MOVED and ASK back to `call`, which retries: the command then goes to the
            // slot's owner, once a migrating slot has settled.
            conn.max_redirections = 0;
            // Bounded queue: past it, fail fast rather than grow without limit.
            conn.max_command_buffer_len = 10_000;
            // A connection silent for twice the timeout (a paused server, a half-open
            // socket after a partition) is closed and reconnected rather than trusted
            // until TCP gives up. WAIT legitimately blocks for its own timeout.
            conn.unresponsive = fred::types::config::UnresponsiveConfig {
                max_timeout: Some(2 * timeout + wait_timeout),
                interval: Duration::from_millis(500),
            };
        });
        let pool = builder
            .build_pool(settings.pool_size.max(1))
            .map_err(classify)?;
        let last_error = Arc::new(std::sync::Mutex::new(String::new()));
        for client in pool.clients() {
            let last_error = last_error.clone();
            // Ends with the client. Logged when the reason changes, not at every retry.
            drop(client.on_error(move |(error, _server)| {
                let reason = error.details().to_owned();
                if let Ok(mut last) = last_error.lock() {
                    if *last != reason {
                        tracing::warn!(%reason, "cannot reach Redis; reconnecting");
                        *last = reason;
                    }
                }
                async { Ok(()) }
            }));
        }
        // A connection attempt ends by itself within the connection timeout (`timeout`);
        // the bound is a backstop.
        start(
            &pool,
            startup,
            3 * timeout,
            || pool.clients().iter().all(|client| client.is_connected()),
            || last_error.lock().map(|e| !e.is_empty()).unwrap_or(true),
        )
        .await?;
        let confirmed = if settings.wait_replicas > 0 {
            let clients = builder
                .build_exclusive_pool(4 * settings.pool_size.max(1))
                .map_err(classify)?;
            // ExclusivePool is no ClientLike: the same two ways, spelt for it.
            match startup {
                Startup::RequireRedis => drop(clients.init().await.map_err(classify)?),
                Startup::ConnectInBackground => {
                    drop(clients.connect().await);
                    if pool.clients().iter().any(|client| client.is_connected()) {
                        let _ = tokio::time::timeout(timeout, clients.wait_for_connect()).await;
                    }
                }
            }
            Some(Arc::new(ConfirmedWrites {
                clients,
                replicas: settings.wait_replicas.into(),
                timeout: settings.wait_timeout,
            }))
        } else {
            None
        };
        let fail_fast = !pool.clients().iter().any(|client| client.is_clustered());
        Ok(Self {
            pool,
            confirmed,
            command_timeout: timeout,
            fail_fast,
            last_error,
        })
    }

    /// Whether any pooled connection is up now.
    pub(super) fn is_up(&self) -> bool {
        self.pool
            .clients()
            .iter()
            .any(|client| client.is_connected())
    }

    fn disconnected(&self) -> String {
        let reason = self
            .last_error
            .lock()
            .map(|last| last.clone())
            .unwrap_or_default();
        if reason.is_empty() {
            "no connection to Redis; reconnecting".to_owned()
        } else {
            format!("no connection to Redis ({reason}); reconnecting")
        }
    }

    /// Runs one Redis call in a client span, recording its latency and errors.
    ///
    /// While a Cluster answers "try again" (TRYAGAIN: a multi-key call on a slot being
    /// migrated; CLUSTERDOWN: a failover in progress; MOVED or ASK: the slot lives or is
    /// moving elsewhere) the call is repeated, with short pauses, until the command
    /// timeout: none of these replies means the command ran, so a resharding or failover
    /// shows up as latency rather than as errors.
    pub(super) async fn call<'a, T, F, Fut>(
        &'a self,
        command: &'static str,
        mut attempt: F,
    ) -> StoreResult<T>
    where
        F: FnMut(&'a Pool) -> Fut,
        Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        let span = tracing::info_span!(
            "redis",
            otel.name = command,
            otel.kind = "client",
            db.system = "redis",
            db.operation = command,
        );
        if self.fail_fast && !self.is_up() {
            // fred knows Redis is gone (refused, closed) and is reconnecting: waiting
            // the command timeout for each request would only hold it longer.
            return Err(count_error(
                command,
                StoreError::Unavailable(self.disconnected()),
            ));
        }
        let started = Instant::now();
        let deadline = self.command_timeout;
        async move {
            let mut pause = Duration::from_millis(5);
            // One latency sample per call, retries included: that is what a request waited.
            let result = loop {
                match attempt(&self.pool).await {
                    Err(error)
                        if cluster_says_retry(&error) && started.elapsed() + pause < deadline =>
                    {
                        metrics::counter!("airstate_redis_retries_total", "command" => command)
                            .increment(1);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(100));
                    }
                    result => break result,
                }
            };
            command_latency(command).record(started.elapsed().as_secs_f64());
            result.map_err(|error| count_error(command, classify(error)))
        }
        .instrument(span)
        .await
    }

    /// Runs a loaded script through `client` (see [`call`](Self::call)), loading it
    /// again if Redis lost it.
    pub(super) async fn eval<T: FromValue>(
        &self,
        command: &'static str,
        script: &Script,
        client: &WriteClient<'_>,
        keys: &[String],
        args: &[Value],
    ) -> StoreResult<T> {
        self.call(command, |_| {
            script.evalsha_with_reload(client.client(), keys.to_vec(), args.to_vec())
        })
        .await
    }

    /// A shared pooled client for a write no client was promised anything about (a
    /// purge): it never waits for replicas.
    pub(super) fn shared_client(&self) -> WriteClient<'_> {
        // A pooled client that is reconnecting would hold the write until it is back.
        WriteClient::Shared(self.pool.next_connected())
    }

    /// The client one write goes through: a shared one, or with confirmed writes on, one
    /// borrowed for this write alone.
    pub(super) async fn write_client(&self) -> StoreResult<WriteClient<'_>> {
        let Some(confirmed) = &self.confirmed else {
            return Ok(self.shared_client());
        };
        tokio::time::timeout(self.command_timeout, confirmed.clients.clone().acquire())
            .await
            .map(WriteClient::Exclusive)
            .map_err(|_| {
                StoreError::Unavailable("no Redis connection free for a confirmed write".into())
            })
    }

    /// With confirmed writes on: waits until enough replicas hold what `client` wrote to
    /// the node serving `key`'s slot, else the write is not acknowledged (503). It did
    /// happen on the primary; the client's retry rewrites the same value.
    pub(super) async fn confirm(&self, client: &WriteClient<'_>, key: &str) -> StoreResult<()> {
        let (Some(confirmed), WriteClient::Exclusive(guard)) = (&self.confirmed, client) else {
            return Ok(());
        };
        let options = fred::types::config::Options {
            cluster_hash: Some(ClusterHash::Custom(redis_keyslot(key.as_bytes()))),
            timeout: Some(self.command_timeout + confirmed.timeout),
            ..Default::default()
        };
        let waiter = guard.with_options(&options);
        let wait_ms = confirmed.timeout.as_millis() as i64;
        let acked: i64 = self
            .call("wait", |_| waiter.wait(confirmed.replicas, wait_ms))
            .await?;
        if acked < confirmed.replicas {
            metrics::counter!("airstate_redis_unconfirmed_writes_total").increment(1);
            return Err(StoreError::Unavailable(format!(
                "write not confirmed: {acked} of {} replicas acknowledged it within {wait_ms} ms",
                confirmed.replicas
            )));
        }
        Ok(())
    }

    /// The keys matching `pattern`, by SCAN on every primary of a Cluster (one server
    /// otherwise). A stream of replies rather than one, so it is not retried: a failed
    /// page ends the walk with an error, which an offline tool reports.
    pub(super) fn scan(
        &self,
        pattern: String,
    ) -> impl futures_util::Stream<Item = StoreResult<String>> + Send + 'static {
        use futures_util::StreamExt;
        let client = self.pool.next();
        let keys = if client.is_clustered() {
            client
                .scan_cluster_buffered(pattern, Some(500), None)
                .boxed()
        } else {
            client.scan_buffered(pattern, Some(500), None).boxed()
        };
        keys.map(|key| {
            key.map_err(classify).and_then(|key| {
                key.into_string()
                    .ok_or_else(|| StoreError::Internal("a key that is not UTF-8".into()))
            })
        })
    }
}

/// Replies from a Cluster that mean "not executed, ask again shortly", including fred's
/// refusal to follow a MOVED or ASK itself (see `max_redirections` in `connect`).
fn cluster_says_retry(error: &fred::error::Error) -> bool {
    let details = error.details();
    details.starts_with("TRYAGAIN")
        || details.starts_with("CLUSTERDOWN")
        || script_met_a_moved_key(details)
        || (*error.kind() == fred::error::ErrorKind::Routing
            && (details.starts_with("Max attempts reached")
                || details.starts_with("Too many redirections")))
}

/// Clear-all "unlink"'s probe of a key its node does not hold, on a slot being migrated:
/// the script stopped before writing anything (see `lua/task_clear.lua`), as after TRYAGAIN.
fn script_met_a_moved_key(details: &str) -> bool {
    details.contains("Script attempted to access a non local key")
}

fn millis_u32(duration: Duration) -> u32 {
    duration.as_millis().try_into().unwrap_or(u32::MAX)
}

/// The latency histogram of one command, registered once per command name rather than
/// looked up by label on every call.
fn command_latency(command: &'static str) -> metrics::Histogram {
    // foldhash, not SipHash: the keys are our own command names, looked up on every call.
    type Handles = foldhash::HashMap<&'static str, metrics::Histogram>;
    static HANDLES: std::sync::OnceLock<std::sync::RwLock<Handles>> = std::sync::OnceLock::new();
    let handles = HANDLES.get_or_init(Default::default);
    if let Some(found) = handles.read().unwrap().get(command) {
        return found.clone();
    }
    let created =
        metrics::histogram!("airstate_redis_command_duration_seconds", "command" => command);
    handles.write().unwrap().insert(command, created.clone());
    created
}

/// Counts a failed Redis call by command and kind, passing the error on.
fn count_error(command: &'static str, error: StoreError) -> StoreError {
    let kind = match error {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Internal(_) => "internal",
        StoreError::TooLarge { .. } => "too_large",
    };
    metrics::counter!("airstate_redis_errors_total", "command" => command, "kind" => kind)
        .increment(1);
    error
}

/// Sorts Redis failures into "try again later" (503) and "our fault" (500).
pub(super) fn classify(error: fred::error::Error) -> StoreError {
    use fred::error::ErrorKind;
    let message = error.to_string();
    match error.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Backpressure
        | ErrorKind::Cluster
        | ErrorKind::Sentinel
        | ErrorKind::Routing
        | ErrorKind::Tls => StoreError::Unavailable(message),
        // fred reports "no connection to send on" (between a drop and the reconnect) as
        // an Unknown error; it is the same outage as an IO error.
        ErrorKind::Unknown
            if error.details().starts_with("Failed to route")
                || error
                    .details()
                    .starts_with("Too many failed write attempts") =>
        {
            StoreError::Unavailable(message)
        }
        _ => {
            let details = error.details();
            const TRANSIENT: [&str; 8] = [
                "OOM",
                "READONLY",
                "LOADING",
                "MASTERDOWN",
                "CLUSTERDOWN",
                "TRYAGAIN",
                "BUSY",
                "NOREPLICAS",
            ];
            if TRANSIENT.iter().any(|code| details.starts_with(code))
                || script_met_a_moved_key(details)
            {
                StoreError::Unavailable(message)
            } else {
                StoreError::Internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_unavailable_and_bugs_internal() {
        use fred::error::{Error, ErrorKind};
        let unavailable = [
            Error::new(ErrorKind::IO, "Connection closed."),
            Error::new(ErrorKind::Unknown, "Failed to route command."),
            Error::new(ErrorKind::Unknown, "Too many failed write attempts."),
            Error::new(ErrorKind::Timeout, "Request timed out."),
            Error::new(
                ErrorKind::Unknown,
                "READONLY You can't write against a read only replica.",
            ),
            Error::new(
                ErrorKind::Unknown,
                "OOM command not allowed when used memory > 'maxmemory'.",
            ),
            Error::new(
                ErrorKind::Unknown,
                "LOADING Redis is loading the dataset in memory",
            ),
        ];
        for error in unavailable {
            assert!(matches!(classify(error), StoreError::Unavailable(_)));
        }
        let internal = Error::new(ErrorKind::InvalidArgument, "ERR wrong number of arguments");
        assert!(matches!(classify(internal), StoreError::Internal(_)));
    }
}
