//! The connection pool and the one way a command is sent: [`RedisStore::call`], with
//! its retries, error classification and metrics.

use std::time::{Duration, Instant};

use fred::clients::ExclusivePool;
use fred::prelude::*;
use fred::types::ClusterHash;
use fred::util::redis_keyslot;
use tracing::Instrument;

use super::super::{StoreError, StoreResult};
use super::RedisStore;

/// Writes acknowledged only after `WAIT`. `WAIT` counts the writes of the connection it
/// is sent on and blocks that connection, so each such write borrows a client of its
/// own instead of sharing the pipelined pool.
pub(super) struct ConfirmedWrites {
    pub(super) clients: ExclusivePool,
    pub(super) replicas: i64,
    pub(super) timeout: Duration,
}

/// The client a write goes through: a shared pooled one, or one borrowed for a write
/// that must be confirmed by `WAIT` on the same connection.
pub(super) enum WriteClient<'a> {
    Shared(&'a Client),
    Exclusive(tokio::sync::OwnedMutexGuard<Client>),
}

impl WriteClient<'_> {
    pub(super) fn client(&self) -> &Client {
        match self {
            WriteClient::Shared(client) => client,
            WriteClient::Exclusive(guard) => guard,
        }
    }
}

impl RedisStore {
    /// Runs one Redis call in a client span, recording its latency and errors.
    ///
    /// While a Cluster answers "try again" (TRYAGAIN: a multi-key call on a slot being
    /// migrated; CLUSTERDOWN: a failover in progress; MOVED or ASK: the slot lives or is
    /// moving elsewhere) the call is repeated, with short pauses, until the command
    /// timeout: none of these replies means the command ran, so a resharding or failover
    /// shows up as latency rather than as errors.
    pub(super) async fn call<T, F, Fut>(
        &self,
        command: &'static str,
        mut attempt: F,
    ) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
    {
        let span = tracing::info_span!(
            "redis",
            otel.name = command,
            otel.kind = "client",
            db.system = "redis",
            db.operation = command,
        );
        let started = Instant::now();
        let deadline = self.command_timeout;
        async move {
            let mut pause = Duration::from_millis(5);
            // One latency sample per call, retries included: that is what a request waited.
            let result = loop {
                match attempt().await {
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

    /// The client one write goes through: a shared one, or with confirmed writes on, one
    /// borrowed for this write alone.
    pub(super) async fn write_client(&self) -> StoreResult<WriteClient<'_>> {
        let Some(confirmed) = &self.confirmed else {
            // A pooled client that is reconnecting would hold the write until it is back.
            return Ok(WriteClient::Shared(self.pool.next_connected()));
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
            .call("wait", || waiter.wait(confirmed.replicas, wait_ms))
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
}

/// Replies from a Cluster that mean "not executed, ask again shortly", including fred's
/// refusal to follow a MOVED or ASK itself (see `max_redirections` in `connect`).
pub(super) fn cluster_says_retry(error: &fred::error::Error) -> bool {
    let details = error.details();
    details.starts_with("TRYAGAIN")
        || details.starts_with("CLUSTERDOWN")
        || (*error.kind() == fred::error::ErrorKind::Routing
            && (details.starts_with("Max attempts reached")
                || details.starts_with("Too many redirections")))
}

pub(super) fn millis_u32(duration: Duration) -> u32 {
    duration.as_millis().try_into().unwrap_or(u32::MAX)
}

/// The latency histogram of one command, registered once per command name rather than
/// looked up by label on every call.
pub(super) fn command_latency(command: &'static str) -> metrics::Histogram {
    type Handles = std::collections::HashMap<&'static str, metrics::Histogram>;
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
pub(super) fn count_error(command: &'static str, error: StoreError) -> StoreError {
    let kind = match error {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Internal(_) => "internal",
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
            if TRANSIENT.iter().any(|code| details.starts_with(code)) {
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
