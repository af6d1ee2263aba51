//! The Redis backend, through `fred`.
//!
//! Layout (every key starts with the configured prefix):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{t:<digest>}:<map_index>` | hash | one task scope: state key -> encoded value |
//! | `{t:<digest>}:<map_index>:x` | zset | that scope's expiring keys, scored by expiry |
//! | `{t:<digest>}:r` | hash | the map indices holding state, and the readable identity |
//! | `{a:<asset>}:v` / `{a:<asset>}:w` | hash | an asset's values / who wrote each |
//!
//! `<digest>` hashes the length-prefixed (dag_id, run_id, task_id), so every map index of
//! a task shares one Cluster slot whatever characters the ids hold; that is what lets one
//! Lua script clear all map indices atomically.
//!
//! The read path is a single pipelined `HGET`; the expiry check happens here, on the
//! decoded value, so an expired key is never served even before Redis reclaims it.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use sha2::{Digest, Sha256};

use super::{
    now_millis, AssetKey, EpochMillis, StateStore, StoreError, StoreResult, StoredValue, TaskScope,
    Writer,
};

/// Connection settings the operator can tune.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    pub pool_size: usize,
    pub command_timeout: Duration,
}

/// Lua scripts, kept as files under `lua/` and compiled in, loaded by name.
struct Scripts {
    task_write: Script,
    task_clear: Script,
    asset_write: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            task_write: Script::from_lua(include_str!("../../lua/task_write.lua")),
            task_clear: Script::from_lua(include_str!("../../lua/task_clear.lua")),
            asset_write: Script::from_lua(include_str!("../../lua/asset_write.lua")),
        }
    }

    fn all(&self) -> [&Script; 3] {
        [&self.task_write, &self.task_clear, &self.asset_write]
    }
}

pub struct RedisStore {
    pool: Pool,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
    url_for_display: String,
}

/// Key names of one task scope.
struct TaskKeys {
    /// `<prefix>{t:<digest>}:`; the scope hash of map index `i` is `base + i`.
    base: String,
    scope: String,
    expiry: String,
    registry: String,
}

impl RedisStore {
    /// Connects and loads the Lua scripts. Fails when Redis cannot be reached, so a
    /// misconfigured replica never reports ready.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let config = Config::from_url(&settings.url)
            .map_err(|e| StoreError::Internal(format!("AIRSTATE_REDIS_URL: {e}")))?;
        let timeout = settings.command_timeout;
        let pool = Builder::from_config(config)
            .with_performance_config(|perf| {
                // fred's default is no timeout at all: a request would hang with Redis.
                perf.default_command_timeout = timeout;
            })
            .with_connection_config(|conn| {
                conn.connection_timeout = timeout;
                conn.internal_command_timeout = timeout;
                // A write replayed after a reconnect could land after a newer one; fail it
                // instead and let the client retry (the Task SDK retries on 5xx).
                conn.max_command_attempts = 1;
                // Bounded queue: past it, fail fast rather than grow without limit.
                conn.max_command_buffer_len = 10_000;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(settings.pool_size.max(1))
            .map_err(classify)?;
        pool.init().await.map_err(classify)?;
        let store = Self {
            pool,
            prefix: settings.key_prefix.clone(),
            scripts: std::sync::Arc::new(Scripts::new()),
            url_for_display: redact_url(&settings.url),
        };
        for script in store.scripts.all() {
            script.load(store.pool.next()).await.map_err(classify)?;
        }
        Ok(store)
    }

    fn task_keys(&self, scope: &TaskScope) -> TaskKeys {
        let mut hasher = Sha256::new();
        for part in [&scope.dag_id, &scope.run_id, &scope.task_id] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        let digest = hex::encode(&hasher.finalize()[..16]);
        let base = format!("{}{{t:{digest}}}:", self.prefix);
        let scope_key = format!("{base}{}", scope.map_index);
        TaskKeys {
            expiry: format!("{scope_key}:x"),
            registry: format!("{base}r"),
            scope: scope_key,
            base,
        }
    }

    fn asset_keys(&self, asset: &AssetKey) -> (String, String) {
        let tag = format!("{}{{a:{}}}", self.prefix, asset.0);
        (format!("{tag}:v"), format!("{tag}:w"))
    }

    async fn task_write(
        &self,
        scope: &TaskScope,
        op: &str,
        key: &str,
        encoded: &str,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        let keys = self.task_keys(scope);
        let args: Vec<Value> = vec![
            op.into(),
            key.into(),
            encoded.into(),
            expires_at.map(|e| e.to_string()).unwrap_or_default().into(),
            now_millis().into(),
            scope.map_index.into(),
            scope.dag_id.as_str().into(),
            scope.run_id.as_str().into(),
            scope.task_id.as_str().into(),
        ];
        self.scripts
            .task_write
            .evalsha_with_reload::<i64, _, _>(
                self.pool.next(),
                vec![keys.scope, keys.expiry, keys.registry],
                args,
            )
            .await
            .map_err(classify)?;
        Ok(())
    }
}

/// `"<updated_ms>:<expires_ms or empty>:<json>"`: bookkeeping in front of the JSON text,
/// so one `HGET` returns everything a read needs.
fn encode(json: &str, updated_at: EpochMillis, expires_at: Option<EpochMillis>) -> String {
    match expires_at {
        Some(at) => format!("{updated_at}:{at}:{json}"),
        None => format!("{updated_at}::{json}"),
    }
}

fn decode(raw: String) -> StoreResult<StoredValue> {
    let corrupt = || StoreError::Internal("stored value has an unknown encoding".to_owned());
    let (updated, rest) = raw.split_once(':').ok_or_else(corrupt)?;
    let (expires, json) = rest.split_once(':').ok_or_else(corrupt)?;
    let updated_at = updated.parse().map_err(|_| corrupt())?;
    let expires_at = if expires.is_empty() {
        None
    } else {
        Some(expires.parse().map_err(|_| corrupt())?)
    };
    let json_start = raw.len() - json.len();
    let mut json = raw;
    json.drain(..json_start);
    Ok(StoredValue {
        json,
        updated_at,
        expires_at,
    })
}

/// Sorts Redis failures into "try again later" (503) and "our fault" (500).
fn classify(error: fred::error::Error) -> StoreError {
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

fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn get_task(&self, scope: &TaskScope, key: &str) -> StoreResult<Option<StoredValue>> {
        let keys = self.task_keys(scope);
        let raw: Option<String> = self.pool.hget(&keys.scope, key).await.map_err(classify)?;
        let Some(value) = raw.map(decode).transpose()? else {
            return Ok(None);
        };
        if value.is_expired(now_millis()) {
            // Reclaim now rather than wait for the next write; the reply does not wait.
            let store = (self.pool.clone(), self.scripts.clone());
            let (scope, key) = (scope.clone(), key.to_owned());
            let (keys_vec, now) = (vec![keys.scope, keys.expiry, keys.registry], now_millis());
            tokio::spawn(async move {
                let args: Vec<Value> = vec![
                    "purge".into(),
                    key.into(),
                    "".into(),
                    "".into(),
                    now.into(),
                    scope.map_index.into(),
                    "".into(),
                    "".into(),
                    "".into(),
                ];
                let (pool, scripts) = store;
                if let Err(error) = scripts
                    .task_write
                    .evalsha_with_reload::<i64, _, _>(pool.next(), keys_vec, args)
                    .await
                {
                    tracing::debug!(%error, "lazy purge of expired task state failed");
                }
            });
            return Ok(None);
        }
        Ok(Some(value))
    }

    async fn put_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        let encoded = encode(json, now_millis(), expires_at);
        self.task_write(scope, "set", key, &encoded, expires_at)
            .await
    }

    async fn delete_task(&self, scope: &TaskScope, key: &str) -> StoreResult<()> {
        self.task_write(scope, "del", key, "", None).await
    }

    async fn clear_task(&self, scope: &TaskScope, all_map_indices: bool) -> StoreResult<()> {
        let keys = self.task_keys(scope);
        let mode = if all_map_indices { "all" } else { "one" };
        let args: Vec<Value> = vec![
            mode.into(),
            keys.base.as_str().into(),
            scope.map_index.into(),
        ];
        self.scripts
            .task_clear
            .evalsha_with_reload::<i64, _, _>(
                self.pool.next(),
                vec![keys.registry, keys.scope, keys.expiry],
                args,
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>> {
        let (values, _) = self.asset_keys(asset);
        let raw: Option<String> = self.pool.hget(&values, key).await.map_err(classify)?;
        raw.map(decode).transpose()
    }

    async fn put_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
    ) -> StoreResult<()> {
        let (values, writers) = self.asset_keys(asset);
        let writer = serde_json::to_string(writer)
            .map_err(|e| StoreError::Internal(format!("cannot encode writer: {e}")))?;
        let args: Vec<Value> = vec![
            "set".into(),
            key.into(),
            encode(json, now_millis(), None).into(),
            writer.into(),
        ];
        self.scripts
            .asset_write
            .evalsha_with_reload::<i64, _, _>(self.pool.next(), vec![values, writers], args)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn delete_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<()> {
        let (values, writers) = self.asset_keys(asset);
        let args: Vec<Value> = vec!["del".into(), key.into(), "".into(), "".into()];
        self.scripts
            .asset_write
            .evalsha_with_reload::<i64, _, _>(self.pool.next(), vec![values, writers], args)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        let (values, writers) = self.asset_keys(asset);
        // Both keys share the asset's hash tag, so one UNLINK is atomic on a Cluster too.
        let _: i64 = self
            .pool
            .unlink(vec![values, writers])
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>> {
        let (_, writers) = self.asset_keys(asset);
        let raw: Option<String> = self.pool.hget(&writers, key).await.map_err(classify)?;
        raw.map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Internal(format!("unreadable writer record: {e}")))
        })
        .transpose()
    }

    async fn ping(&self) -> StoreResult<()> {
        let _: String = self.pool.next().ping(None).await.map_err(classify)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "Redis at {} (key prefix {:?})",
            self.url_for_display, self.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_json_text_untouched() {
        for (json, expires) in [
            ("1.0", None),
            ("\"a:b::c\"", Some(1_700_000_000_123)),
            ("123456789012345678901234567890", None),
            ("{\"k\": [1, 2]}", Some(5)),
        ] {
            let decoded = decode(encode(json, 42, expires)).unwrap();
            assert_eq!(decoded.json, json);
            assert_eq!(decoded.updated_at, 42);
            assert_eq!(decoded.expires_at, expires);
        }
    }

    #[test]
    fn undecodable_values_are_errors_not_panics() {
        for raw in ["", "nocolon", "x::1", "1:y:2"] {
            assert!(decode(raw.to_owned()).is_err(), "{raw:?} decoded");
        }
    }

    #[test]
    fn url_credentials_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
