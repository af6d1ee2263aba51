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
//! | `ev:{t:<digest>}` / `ev:{a:<asset>}` | pub/sub channel | change events (`events`) |
//!
//! `<digest>` hashes the length-prefixed (dag_id, run_id, task_id), so every map index of
//! a task shares one Cluster slot whatever characters the ids hold; that is what lets one
//! Lua script clear all map indices atomically.
//!
//! The read path is a single pipelined `HGET`; the expiry check happens here, on the
//! decoded value, so an expired key is never served even before Redis reclaims it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fred::clients::ExclusivePool;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::sorted_sets::Ordering;
use fred::types::ClusterHash;
use fred::util::redis_keyslot;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::events::{parse_message, Change, Event, EventHub, RedisSubscriptions, Watch};
use super::version::{legacy_version, new_version};
use super::{
    now_millis, AssetKey, Condition, Entry, EpochMillis, StateStore, StoreError, StoreResult,
    StoredValue, TaskScope, Writer, Written,
};

/// Connection settings the operator can tune.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    pub pool_size: usize,
    pub command_timeout: Duration,
    /// How often the sweep index is walked (see [`RedisStore::sweep_once`]).
    pub sweep_interval: Duration,
    /// First and longest pause of the exponential reconnect backoff.
    pub reconnect: (Duration, Duration),
    /// When above 0, a write is acknowledged only once `WAIT` reports this many replicas
    /// have it; fewer within `wait_timeout` answers 503.
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    /// Whether writes publish change events. Each is one `PUBLISH`, which a Cluster relays
    /// over its bus to every node whether or not anyone listens.
    pub change_events: bool,
}

impl RedisSettings {
    /// Settings with the gateway's defaults for everything but the URL and prefix.
    pub fn new(url: &str, key_prefix: &str) -> Self {
        Self {
            url: url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            pool_size: 2,
            command_timeout: Duration::from_millis(2000),
            sweep_interval: Duration::from_secs(60),
            reconnect: (Duration::from_millis(50), Duration::from_millis(2000)),
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
            change_events: true,
        }
    }
}

/// fred's configuration for the URL forms the README documents.
///
/// fred lists extra nodes as `?node=host:port` and names a Sentinel service with
/// `?sentinelServiceName=`; operators write `redis-cluster://h1:p1,h2:p2` and
/// `redis-sentinel://h1:p1,h2:p2/service_name`, so those forms are rewritten into fred's
/// (fred's own forms pass through unchanged). Errors never echo the URL: it may hold a
/// password.
pub fn client_config(url: &str) -> Result<Config, String> {
    let rewritten = fred_url(url)?;
    Config::from_url(&rewritten).map_err(|e| e.details().to_owned())
}

fn fred_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected a URL such as redis://host:6379")?;
    let sentinel = match scheme {
        "redis" | "rediss" => return Ok(url.to_owned()),
        "redis-cluster" | "rediss-cluster" => false,
        "redis-sentinel" | "rediss-sentinel" => true,
        other => {
            return Err(format!(
                "unknown scheme {other:?}: expected redis, rediss, redis-cluster, \
                 rediss-cluster, redis-sentinel or rediss-sentinel"
            ))
        }
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, query),
        None => (rest, ""),
    };
    let (userinfo, location) = match rest.rfind('@') {
        Some(at) => rest.split_at(at + 1),
        None => ("", rest),
    };
    let (hosts, path) = location.split_once('/').unwrap_or((location, ""));
    let mut hosts = hosts.split(',').map(str::trim).filter(|h| !h.is_empty());
    let first = hosts.next().ok_or("no host given")?;
    let mut params: Vec<String> = hosts.map(|host| format!("node={host}")).collect();
    let mut database = String::new();
    if sentinel {
        if path.bytes().all(|b| b.is_ascii_digit()) {
            if !path.is_empty() {
                database = format!("/{path}");
            }
        } else {
            params.push(format!("sentinelServiceName={path}"));
        }
    } else if !path.is_empty() {
        return Err("a Cluster URL takes no database: Redis Cluster has database 0 only".into());
    }
    params.extend(
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
    );
    if sentinel && !params.iter().any(|p| p.starts_with("sentinelServiceName=")) {
        return Err(
            "a Sentinel URL names its service: redis-sentinel://host:port,host:port/service_name"
                .into(),
        );
    }
    let mut out = format!("{scheme}://{userinfo}{first}{database}");
    if !params.is_empty() {
        out.push('?');
        out.push_str(&params.join("&"));
    }
    Ok(out)
}

/// Lua scripts, kept as files under `lua/` and compiled in, loaded by name; and the
/// change-event hub, which every handle of a store shares the same way.
struct Scripts {
    task_write: Script,
    task_clear: Script,
    asset_write: Script,
    asset_clear: Script,
    events: EventHub,
}

impl Scripts {
    fn new() -> Self {
        Self {
            task_write: Script::from_lua(include_str!("../../../lua/task_write.lua")),
            task_clear: Script::from_lua(include_str!("../../../lua/task_clear.lua")),
            asset_write: Script::from_lua(include_str!("../../../lua/asset_write.lua")),
            asset_clear: Script::from_lua(include_str!("../../../lua/asset_clear.lua")),
            events: EventHub::new(DEFAULT_EVENT_BUFFER),
        }
    }

    fn all(&self) -> [&Script; 4] {
        [
            &self.task_write,
            &self.task_clear,
            &self.asset_write,
            &self.asset_clear,
        ]
    }
}

/// Events buffered per watcher and channel unless configured.
pub const DEFAULT_EVENT_BUFFER: usize = 256;

pub struct RedisStore {
    pool: Pool,
    /// Present when writes wait for replicas (see [`RedisSettings::wait_replicas`]).
    confirmed: Option<Arc<ConfirmedWrites>>,
    command_timeout: Duration,
    prefix: String,
    scripts: Arc<Scripts>,
    url_for_display: String,
    sweeper: Option<tokio::task::JoinHandle<()>>,
    change_events: bool,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.abort();
        }
    }
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
enum WriteClient<'a> {
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

/// The sweep index is split in shards with their own hash tags, so that on a Cluster it
/// spreads over several nodes instead of making one slot hot.
const SWEEP_SHARDS: u8 = 16;
/// Scopes purged per shard and pass; bounds the work of one pass.
const SWEEP_BATCH: i64 = 200;
/// Reads of the registry before a clear-all gives up on a task still gaining map indices.
const CLEAR_ALL_ATTEMPTS: usize = 5;

/// Key names of one task scope.
struct TaskKeys {
    digest: String,
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
        let config = client_config(&settings.url)
            .map_err(|e| StoreError::Internal(format!("AIRSTATE_REDIS_URL: {e}")))?;
        let timeout = settings.command_timeout;
        let wait_timeout = settings.wait_timeout;
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
            })
            // Unlimited attempts: a replica must come back by itself when Redis does.
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                millis_u32(first_pause),
                millis_u32(longest_pause),
                2,
            ));
        let pool = builder
            .build_pool(settings.pool_size.max(1))
            .map_err(classify)?;
        pool.init().await.map_err(classify)?;
        let confirmed = if settings.wait_replicas > 0 {
            let clients = builder
                .build_exclusive_pool(4 * settings.pool_size.max(1))
                .map_err(classify)?;
            clients.init().await.map_err(classify)?;
            Some(Arc::new(ConfirmedWrites {
                clients,
                replicas: settings.wait_replicas.into(),
                timeout: settings.wait_timeout,
            }))
        } else {
            None
        };
        let mut store = Self {
            pool,
            confirmed,
            command_timeout: timeout,
            prefix: settings.key_prefix.clone(),
            scripts: Arc::new(Scripts::new()),
            url_for_display: redact_url(&settings.url),
            sweeper: None,
            change_events: settings.change_events,
        };
        for script in store.scripts.all() {
            script.load(store.pool.next()).await.map_err(classify)?;
        }
        store.sweeper = Some(store.spawn_sweeper(settings.sweep_interval));
        Ok(store)
    }

    /// A handle sharing this store's pool and scripts, for background work.
    fn share(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            confirmed: self.confirmed.clone(),
            command_timeout: self.command_timeout,
            prefix: self.prefix.clone(),
            scripts: self.scripts.clone(),
            url_for_display: self.url_for_display.clone(),
            sweeper: None,
            change_events: self.change_events,
        }
    }

    fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.share();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(error) = store.sweep_once().await {
                    tracing::debug!(%error, "expiry sweep failed; retrying next pass");
                }
            }
        })
    }

    fn sweep_shard(&self, digest: &str) -> String {
        let shard = u8::from_str_radix(&digest[..2], 16).unwrap_or(0) % SWEEP_SHARDS;
        format!("{}{{sweep:{shard}}}", self.prefix)
    }

    /// Reclaims expired keys of scopes that mix expiring and permanent keys (the scopes
    /// key-level expiry cannot free), walking the sweep index rather than the keyspace.
    /// Every replica may run it; the purge is idempotent. Returns the scopes purged.
    pub async fn sweep_once(&self) -> StoreResult<usize> {
        let now = now_millis();
        let mut purged = 0;
        for shard in 0..SWEEP_SHARDS {
            let index = format!("{}{{sweep:{shard}}}", self.prefix);
            let due: Vec<String> = self
                .pool
                .zrangebyscore(&index, "-inf", now, false, Some((0, SWEEP_BATCH)))
                .await
                .map_err(classify)?;
            for scope_key in due {
                let Some((base, map_index)) = scope_key.rsplit_once(':') else {
                    continue;
                };
                let keys = vec![
                    scope_key.clone(),
                    format!("{scope_key}:x"),
                    format!("{base}:r"),
                ];
                let (_, next) = self
                    .run_task_write(keys, PURGE, map_index, ["", "", ""], &Condition::NONE)
                    .await?;
                if next > 0 {
                    let _: i64 = self
                        .pool
                        .zadd(
                            &index,
                            None,
                            None,
                            false,
                            false,
                            (next as f64, scope_key.as_str()),
                        )
                        .await
                        .map_err(classify)?;
                } else {
                    let _: i64 = self
                        .pool
                        .zrem(&index, scope_key.as_str())
                        .await
                        .map_err(classify)?;
                }
                purged += 1;
            }
        }
        Ok(purged)
    }

    fn task_keys(&self, scope: &TaskScope) -> TaskKeys {
        let digest = task_digest(scope);
        let base = format!("{}{{t:{digest}}}:", self.prefix);
        let scope_key = format!("{base}{}", scope.map_index);
        TaskKeys {
            expiry: format!("{scope_key}:x"),
            registry: format!("{base}r"),
            scope: scope_key,
            base,
            digest,
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
        condition: &Condition,
    ) -> StoreResult<bool> {
        let keys = self.task_keys(scope);
        let keys = vec![keys.scope, keys.expiry, keys.registry];
        let write = Write {
            op,
            key,
            encoded,
            expires_at,
        };
        let identity = [
            scope.dag_id.as_str(),
            scope.run_id.as_str(),
            scope.task_id.as_str(),
        ];
        let (fields, next) = self
            .run_task_write(
                keys,
                write,
                &scope.map_index.to_string(),
                identity,
                condition,
            )
            .await?;
        if fields < 0 {
            return Ok(false);
        }
        if next > 0 {
            // Only scopes mixing permanent and expiring keys get here, so the key names
            // are rebuilt rather than kept around on every write.
            let keys = self.task_keys(scope);
            let sweep = self.sweep_shard(&keys.digest);
            let scope_key = keys.scope;
            // Keep the earliest due time (LT): the sweeper corrects a stale one.
            let _: i64 = self
                .pool
                .zadd(
                    &sweep,
                    None,
                    Some(Ordering::LessThan),
                    false,
                    false,
                    (next as f64, scope_key.as_str()),
                )
                .await
                .map_err(classify)?;
        }
        Ok(true)
    }

    /// Runs `task_write.lua`; `identity` (dag_id, run_id, task_id) is recorded when a
    /// write creates the task's registry. Returns the scope's earliest pending expiry when
    /// it needs the sweep index, else 0, after the fields left (-1: `condition` failed
    /// and nothing was written).
    async fn run_task_write(
        &self,
        keys: Vec<String>,
        write: Write<'_>,
        map_index: &str,
        identity: [&str; 3],
        condition: &Condition,
    ) -> StoreResult<(i64, i64)> {
        let (if_match, if_none_match) = condition.to_args();
        // Only writes are published; a purge of expired keys is not a change anyone made.
        let channel = match keys.first() {
            Some(scope_key) if write.op != PURGE.op => self.announced(task_channel(scope_key)),
            _ => String::new(),
        };
        let args: Vec<Value> = vec![
            write.op.into(),
            write.key.into(),
            write.encoded.into(),
            write
                .expires_at
                .map(|e| e.to_string())
                .unwrap_or_default()
                .into(),
            now_millis().into(),
            map_index.into(),
            identity[0].into(),
            identity[1].into(),
            identity[2].into(),
            if_match.into(),
            if_none_match.into(),
            channel.into(),
        ];
        // A purge changes nothing a client was promised, so it never waits for replicas.
        let client = if write.op == PURGE.op {
            WriteClient::Shared(self.pool.next_connected())
        } else {
            self.write_client().await?
        };
        let script = &self.scripts.task_write;
        let reply: Vec<i64> = self
            .call("task_write", || {
                script.evalsha_with_reload(client.client(), keys.clone(), args.clone())
            })
            .await?;
        let fields = reply.first().copied().unwrap_or(0);
        // A refused condition wrote nothing: there is nothing to confirm.
        if fields >= 0 {
            self.confirm(&client, &keys[0]).await?;
        }
        Ok((fields, reply.get(1).copied().unwrap_or(0)))
    }
}

impl RedisStore {
    /// Runs `asset_write.lua`; false when `condition` failed and nothing was written.
    async fn asset_write(
        &self,
        op: &str,
        key: &str,
        encoded: String,
        writer: String,
        asset: &AssetKey,
        condition: &Condition,
    ) -> StoreResult<bool> {
        let (values, writers) = self.asset_keys(asset);
        let (if_match, if_none_match) = condition.to_args();
        let args: Vec<Value> = vec![
            op.into(),
            key.into(),
            encoded.into(),
            writer.into(),
            if_match.into(),
            if_none_match.into(),
            self.announced(self.asset_channel(asset)).into(),
        ];
        let keys = vec![values, writers];
        let client = self.write_client().await?;
        let script = &self.scripts.asset_write;
        let applied: i64 = self
            .call("asset_write", || {
                script.evalsha_with_reload(client.client(), keys.clone(), args.clone())
            })
            .await?;
        if applied == 1 {
            self.confirm(&client, &keys[0]).await?;
        }
        Ok(applied == 1)
    }
}

impl RedisStore {
    /// One `HMGET`, decoded; `None` for a missing field.
    async fn hmget(&self, hash: &str, keys: &[String]) -> StoreResult<Vec<Option<StoredValue>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = self
            .call("hmget", || self.pool.hmget(hash, keys.to_vec()))
            .await?;
        if raw.len() != keys.len() {
            return Err(StoreError::Internal(format!(
                "HMGET of {} fields returned {}",
                keys.len(),
                raw.len()
            )));
        }
        raw.into_iter()
            .map(|value| value.map(decode).transpose())
            .collect()
    }
}

/// What `airstate export` walks: every task scope and asset holding state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeRef {
    /// Every map index of one task, read from its registry.
    Task(Vec<TaskScope>),
    Asset(AssetKey),
}

impl RedisStore {
    /// Every task registry and asset value hash under this store's prefix, as found by
    /// SCAN on every primary of a Cluster (one server otherwise). Only for offline tools:
    /// a keyspace scan never runs on a request path. Keys written while it runs may or may
    /// not be seen, as SCAN guarantees.
    pub fn scan_scopes(
        &self,
    ) -> impl futures_util::Stream<Item = StoreResult<String>> + Send + 'static {
        use futures_util::StreamExt;
        let prefix = glob_escape(&self.prefix);
        let client = self.pool.next().clone();
        let clustered = client.is_clustered();
        let streams = ["{t:*}:r", "{a:*}:v"].map(|suffix| {
            let pattern = format!("{prefix}{suffix}");
            if clustered {
                client
                    .scan_cluster_buffered(pattern, Some(500), None)
                    .boxed()
            } else {
                client.scan_buffered(pattern, Some(500), None).boxed()
            }
        });
        futures_util::stream::iter(streams).flatten().map(|key| {
            key.map_err(classify).and_then(|key| {
                key.into_string()
                    .ok_or_else(|| StoreError::Internal("a key that is not UTF-8".into()))
            })
        })
    }

    /// What one key found by [`scan_scopes`](Self::scan_scopes) holds; `None` for a
    /// registry gone since the scan saw it.
    pub async fn scope_of_key(&self, key: &str) -> StoreResult<Option<ScopeRef>> {
        let tail = key.strip_prefix(self.prefix.as_str()).unwrap_or(key);
        if let Some(asset) = tail
            .strip_prefix("{a:")
            .and_then(|rest| rest.strip_suffix("}:v"))
        {
            return Ok(Some(ScopeRef::Asset(AssetKey(asset.to_owned()))));
        }
        let fields: std::collections::HashMap<String, String> =
            self.call("hgetall", || self.pool.hgetall(key)).await?;
        let (Some(dag_id), Some(run_id), Some(task_id)) = (
            fields.get("dag_id"),
            fields.get("run_id"),
            fields.get("task_id"),
        ) else {
            return Ok(None);
        };
        let mut indices: Vec<i64> = fields
            .keys()
            .filter_map(|field| field.strip_prefix('m')?.parse().ok())
            .collect();
        indices.sort_unstable();
        Ok(Some(ScopeRef::Task(
            indices
                .into_iter()
                .map(|map_index| TaskScope {
                    dag_id: dag_id.clone(),
                    run_id: run_id.clone(),
                    task_id: task_id.clone(),
                    map_index,
                })
                .collect(),
        )))
    }
}

/// A literal for a SCAN MATCH pattern: the prefix is the operator's text.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// HGETALL's reply as pairs, whatever order Redis gave.
fn pairs(map: std::collections::HashMap<String, String>) -> Vec<(String, String)> {
    map.into_iter().collect()
}

/// The change channel of a task: `<prefix>ev:{t:<digest>}`, shared by its map indices.
/// Derived from a scope key (`<prefix>{t:<digest>}:<map_index>`), so purges and writes
/// need no extra arguments.
fn task_channel(scope_key: &str) -> String {
    match scope_key.rfind("{t:") {
        Some(tag) => {
            let base = scope_key
                .rsplit_once(':')
                .map_or(scope_key, |(base, _)| base);
            format!("{}ev:{}", &scope_key[..tag], &base[tag..])
        }
        None => String::new(),
    }
}

/// A published change message (see `events::parse_message`) as an event.
fn decode_event(message: &str) -> Option<Event> {
    let (map_index, op, key, rest) = parse_message(message)?;
    let change = match op {
        's' => {
            let value = decode(rest.to_owned()).ok()?;
            Change::Set {
                key: key?.to_owned(),
                json: value.json,
                version: value.version,
            }
        }
        'd' => Change::Delete {
            key: key?.to_owned(),
        },
        'c' => Change::Clear,
        _ => return None,
    };
    Some(Event { map_index, change })
}

impl RedisStore {
    /// The channel a write publishes its change on: none (`""`, which the scripts skip)
    /// when change events are off.
    fn announced(&self, channel: String) -> String {
        if self.change_events {
            channel
        } else {
            String::new()
        }
    }

    fn asset_channel(&self, asset: &AssetKey) -> String {
        format!("{}ev:{{a:{}}}", self.prefix, asset.0)
    }

    /// Starts the change streams: one subscriber connection, its buffers `buffer` events
    /// per watcher. Until called, watching is refused (writes publish regardless).
    pub async fn enable_change_streams(
        &self,
        settings: &RedisSettings,
        buffer: usize,
    ) -> StoreResult<()> {
        let config = client_config(&settings.url)
            .map_err(|e| StoreError::Internal(format!("AIRSTATE_REDIS_URL: {e}")))?;
        let timeout = settings.command_timeout;
        let (first_pause, longest_pause) = settings.reconnect;
        let subscriber = Builder::from_config(config)
            .with_performance_config(|perf| perf.default_command_timeout = timeout)
            .with_connection_config(|conn| {
                conn.connection_timeout = timeout;
                conn.internal_command_timeout = timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                millis_u32(first_pause),
                millis_u32(longest_pause),
                2,
            ))
            .build_subscriber_client()
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        subscriber
            .init()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.scripts.events.set_capacity(buffer);
        RedisSubscriptions::spawn(subscriber, self.scripts.events.clone(), decode_event);
        Ok(())
    }

    fn hub(&self) -> StoreResult<&EventHub> {
        let hub = &self.scripts.events;
        if hub.has_upstream() {
            Ok(hub)
        } else {
            Err(StoreError::Internal(
                "change streams are not started".into(),
            ))
        }
    }
}

fn written(applied: bool, version: Option<String>) -> Written {
    if applied {
        Written::Applied(version)
    } else {
        Written::PreconditionFailed
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
    async fn call<T, F, Fut>(&self, command: &'static str, mut attempt: F) -> StoreResult<T>
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
    async fn write_client(&self) -> StoreResult<WriteClient<'_>> {
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
    async fn confirm(&self, client: &WriteClient<'_>, key: &str) -> StoreResult<()> {
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
fn cluster_says_retry(error: &fred::error::Error) -> bool {
    let details = error.details();
    details.starts_with("TRYAGAIN")
        || details.starts_with("CLUSTERDOWN")
        || (*error.kind() == fred::error::ErrorKind::Routing
            && (details.starts_with("Max attempts reached")
                || details.starts_with("Too many redirections")))
}

fn millis_u32(duration: Duration) -> u32 {
    duration.as_millis().try_into().unwrap_or(u32::MAX)
}

/// The hash-tagged name every key of a task shares, whatever its map index; its Cluster
/// hash slot is the task's slot. For tools and tests that look at Redis directly.
pub fn task_hash_tag(prefix: &str, scope: &TaskScope) -> String {
    format!("{prefix}{{t:{}}}", task_digest(scope))
}

/// A digest of the length-prefixed (dag_id, run_id, task_id): safe in a hash tag whatever
/// characters the ids hold (a `}` would end the tag early).
fn task_digest(scope: &TaskScope) -> String {
    let mut hasher = Sha256::new();
    for part in [&scope.dag_id, &scope.run_id, &scope.task_id] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

/// One step of `task_write.lua`.
struct Write<'a> {
    op: &'a str,
    key: &'a str,
    encoded: &'a str,
    expires_at: Option<EpochMillis>,
}

/// A purge: no key is written, only expired ones are reclaimed.
const PURGE: Write<'static> = Write {
    op: "purge",
    key: "",
    encoded: "",
    expires_at: None,
};

/// `"<updated_ms>.<version>:<expires_ms or empty>:<json>"`: bookkeeping in front of the
/// JSON text, so one `HGET` returns everything a read needs. Values written before
/// versions existed lack `.<version>`; they read with a [`legacy_version`].
fn encode(
    json: &str,
    updated_at: EpochMillis,
    version: &str,
    expires_at: Option<EpochMillis>,
) -> String {
    match expires_at {
        Some(at) => format!("{updated_at}.{version}:{at}:{json}"),
        None => format!("{updated_at}.{version}::{json}"),
    }
}

fn decode(raw: String) -> StoreResult<StoredValue> {
    let corrupt = || StoreError::Internal("stored value has an unknown encoding".to_owned());
    let (updated, rest) = raw.split_once(':').ok_or_else(corrupt)?;
    let (expires, json) = rest.split_once(':').ok_or_else(corrupt)?;
    let (updated, version) = match updated.split_once('.') {
        Some((updated, version)) => (updated, Some(version.to_owned())),
        None => (updated, None),
    };
    let updated_at = updated.parse().map_err(|_| corrupt())?;
    let version = version.unwrap_or_else(|| legacy_version(updated_at));
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
        version,
    })
}

/// The latency histogram of one command, registered once per command name rather than
/// looked up by label on every call.
fn command_latency(command: &'static str) -> metrics::Histogram {
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
fn count_error(command: &'static str, error: StoreError) -> StoreError {
    let kind = match error {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Internal(_) => "internal",
    };
    metrics::counter!("airstate_redis_errors_total", "command" => command, "kind" => kind)
        .increment(1);
    error
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
        let raw: Option<String> = self
            .call("hget", || self.pool.hget(keys.scope.as_str(), key))
            .await?;
        let Some(value) = raw.map(decode).transpose()? else {
            return Ok(None);
        };
        if value.is_expired(now_millis()) {
            // Reclaim now rather than wait for the next write; the reply does not wait.
            let store = self.share();
            let keys = vec![keys.scope, keys.expiry, keys.registry];
            let map_index = scope.map_index.to_string();
            tokio::spawn(async move {
                if let Err(error) = store
                    .run_task_write(keys, PURGE, &map_index, ["", "", ""], &Condition::NONE)
                    .await
                {
                    tracing::debug!(%error, "lazy purge of expired task state failed");
                }
            });
            return Ok(None);
        }
        Ok(Some(value))
    }

    async fn get_task_many(
        &self,
        scope: &TaskScope,
        keys: &[String],
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let scope_key = self.task_keys(scope).scope;
        let now = now_millis();
        // Expired keys read as missing; reclaiming them is left to the next write or
        // single-key read, so a bulk read stays one HMGET.
        Ok(self
            .hmget(&scope_key, keys)
            .await?
            .into_iter()
            .map(|value| value.filter(|value| !value.is_expired(now)))
            .collect())
    }

    async fn put_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let version = new_version();
        let encoded = encode(json, now_millis(), &version, expires_at);
        let applied = self
            .task_write(scope, "set", key, &encoded, expires_at, condition)
            .await?;
        Ok(written(applied, Some(version)))
    }

    async fn delete_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let applied = self
            .task_write(scope, "del", key, "", None, condition)
            .await?;
        Ok(written(applied, None))
    }

    async fn clear_task(&self, scope: &TaskScope, all_map_indices: bool) -> StoreResult<()> {
        let keys = self.task_keys(scope);
        let script = &self.scripts.task_clear;
        // The script publishes the clear to change streams, atomically with it.
        let channel = self.announced(task_channel(&keys.scope));
        if !all_map_indices {
            let args: Vec<Value> = vec![
                "one".into(),
                keys.base.as_str().into(),
                scope.map_index.into(),
                channel.as_str().into(),
            ];
            let declared = vec![keys.registry, keys.scope, keys.expiry];
            let client = self.write_client().await?;
            let _: i64 = self
                .call("task_clear", || {
                    script.evalsha_with_reload(client.client(), declared.clone(), args.clone())
                })
                .await?;
            return self.confirm(&client, &declared[0]).await;
        }
        // The script is handed every key it deletes. On a Cluster slot being migrated,
        // Redis then answers TRYAGAIN (retried) rather than letting the script miss the
        // keys already moved, which would break the clear's atomicity. The registry is
        // read first to name them; the script refuses (-1) if it grew meanwhile.
        let own = scope.map_index.to_string();
        let args: Vec<Value> = vec![
            "all".into(),
            keys.base.as_str().into(),
            channel.as_str().into(),
        ];
        for _ in 0..CLEAR_ALL_ATTEMPTS {
            let fields: Vec<String> = self
                .call("hkeys", || self.pool.hkeys(keys.registry.as_str()))
                .await?;
            let mut indices: Vec<&str> =
                fields.iter().filter_map(|f| f.strip_prefix('m')).collect();
            if !indices.contains(&own.as_str()) {
                indices.push(&own);
            }
            let mut declared = Vec::with_capacity(1 + 2 * indices.len());
            declared.push(keys.registry.clone());
            for index in indices {
                declared.push(format!("{}{index}", keys.base));
                declared.push(format!("{}{index}:x", keys.base));
            }
            let client = self.write_client().await?;
            let cleared: i64 = self
                .call("task_clear", || {
                    script.evalsha_with_reload(client.client(), declared.clone(), args.clone())
                })
                .await?;
            if cleared >= 0 {
                return self.confirm(&client, &declared[0]).await;
            }
        }
        Err(StoreError::Unavailable(
            "map indices kept being added while clearing them all; try again".into(),
        ))
    }

    async fn watch_task(&self, scope: &TaskScope) -> StoreResult<Watch> {
        let keys = self.task_keys(scope);
        self.hub()?
            .watch(task_channel(&keys.scope), Some(scope.map_index))
            .await
    }

    async fn watch_asset(&self, asset: &AssetKey) -> StoreResult<Watch> {
        self.hub()?.watch(self.asset_channel(asset), None).await
    }

    fn close_watches(&self) {
        self.scripts.events.close();
    }

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>> {
        let (values, _) = self.asset_keys(asset);
        let raw: Option<String> = self
            .call("hget", || self.pool.hget(values.as_str(), key))
            .await?;
        raw.map(decode).transpose()
    }

    async fn get_asset_many(
        &self,
        asset: &AssetKey,
        keys: &[String],
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let (values, _) = self.asset_keys(asset);
        self.hmget(&values, keys).await
    }

    async fn put_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let writer = serde_json::to_string(writer)
            .map_err(|e| StoreError::Internal(format!("cannot encode writer: {e}")))?;
        let version = new_version();
        let encoded = encode(json, now_millis(), &version, None);
        let applied = self.asset_write("set", key, encoded, writer, asset, condition);
        Ok(written(applied.await?, Some(version)))
    }

    async fn delete_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let applied = self.asset_write("del", key, String::new(), String::new(), asset, condition);
        Ok(written(applied.await?, None))
    }

    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        let (values, writers) = self.asset_keys(asset);
        // Both keys share the asset's hash tag, so the script is atomic on a Cluster too.
        let args: Vec<Value> = vec![self.announced(self.asset_channel(asset)).into()];
        let keys = vec![values, writers];
        let client = self.write_client().await?;
        let script = &self.scripts.asset_clear;
        let _: i64 = self
            .call("asset_clear", || {
                script.evalsha_with_reload(client.client(), keys.clone(), args.clone())
            })
            .await?;
        self.confirm(&client, &keys[0]).await
    }

    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>> {
        let (_, writers) = self.asset_keys(asset);
        let raw: Option<String> = self
            .call("hget", || self.pool.hget(writers.as_str(), key))
            .await?;
        raw.map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Internal(format!("unreadable writer record: {e}")))
        })
        .transpose()
    }

    async fn list_task(&self, scope: &TaskScope) -> StoreResult<Vec<Entry>> {
        let scope_key = self.task_keys(scope).scope;
        let raw: Vec<(String, String)> = self
            .call("hgetall", || self.pool.hgetall(scope_key.as_str()))
            .await
            .map(pairs)?;
        let now = now_millis();
        let mut entries = Vec::with_capacity(raw.len());
        for (key, value) in raw {
            let value = decode(value)?;
            // Expired keys read as missing here too; the next write reclaims them.
            if !value.is_expired(now) {
                entries.push(Entry {
                    key,
                    value,
                    writer: None,
                });
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn list_asset(&self, asset: &AssetKey) -> StoreResult<Vec<Entry>> {
        let (values, writers) = self.asset_keys(asset);
        let raw: Vec<(String, String)> = self
            .call("hgetall", || self.pool.hgetall(values.as_str()))
            .await
            .map(pairs)?;
        let mut recorded: std::collections::HashMap<String, String> = self
            .call("hgetall", || self.pool.hgetall(writers.as_str()))
            .await?;
        let mut entries = Vec::with_capacity(raw.len());
        for (key, value) in raw {
            let writer = recorded
                .remove(&key)
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| StoreError::Internal(format!("unreadable writer record: {e}")))?;
            entries.push(Entry {
                value: decode(value)?,
                key,
                writer,
            });
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn import_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        let encoded = encode(json, updated_at, &new_version(), expires_at);
        self.task_write(scope, "set", key, &encoded, expires_at, &Condition::NONE)
            .await
            .map(drop)
    }

    async fn import_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        writer: Option<&Writer>,
    ) -> StoreResult<()> {
        let writer = match writer {
            Some(writer) => serde_json::to_string(writer)
                .map_err(|e| StoreError::Internal(format!("cannot encode writer: {e}")))?,
            None => String::new(),
        };
        let encoded = encode(json, updated_at, &new_version(), None);
        self.asset_write("set", key, encoded, writer, asset, &Condition::NONE)
            .await
            .map(drop)
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
            let decoded = decode(encode(json, 42, "00ff", expires)).unwrap();
            assert_eq!(decoded.json, json);
            assert_eq!(decoded.version, "00ff");
            assert_eq!(decoded.updated_at, 42);
            assert_eq!(decoded.expires_at, expires);
        }
    }

    #[test]
    fn values_from_before_versions_still_decode() {
        let decoded = decode("42::\"a:b\"".to_owned()).unwrap();
        assert_eq!(decoded.json, "\"a:b\"");
        assert_eq!(decoded.version, legacy_version(42));
        let decoded = decode("42:7:1".to_owned()).unwrap();
        assert_eq!(
            (decoded.expires_at, decoded.version.as_str()),
            (Some(7), "L42")
        );
    }

    #[test]
    fn change_channels_and_events() {
        assert_eq!(task_channel("p:{t:ab12}:-1"), "p:ev:{t:ab12}");
        assert_eq!(task_channel("{t:ab12}:3"), "ev:{t:ab12}");
        let set = decode_event(&format!("s-1:3:k:v{}", encode("1.0", 5, "0a", None))).unwrap();
        assert_eq!(set.map_index, Some(-1));
        assert_eq!(
            set.change,
            Change::Set {
                key: "k:v".into(),
                json: "1.0".into(),
                version: "0a".into()
            }
        );
        assert_eq!(decode_event("c:").unwrap().change, Change::Clear);
        assert_eq!(decode_event("x:"), None);
    }

    #[test]
    fn undecodable_values_are_errors_not_panics() {
        for raw in ["", "nocolon", "x::1", "1:y:2"] {
            assert!(decode(raw.to_owned()).is_err(), "{raw:?} decoded");
        }
    }

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

    #[test]
    fn operator_url_forms_become_freds() {
        for (given, expected) in [
            ("redis://h:1/2", "redis://h:1/2"),
            ("rediss://u:p@h:1", "rediss://u:p@h:1"),
            (
                "redis-cluster://h1:1,h2:2, h3:3",
                "redis-cluster://h1:1?node=h2:2&node=h3:3",
            ),
            (
                "rediss-cluster://:pw@h1:1,h2:2",
                "rediss-cluster://:pw@h1:1?node=h2:2",
            ),
            (
                "redis-cluster://h1:1?node=h2:2",
                "redis-cluster://h1:1?node=h2:2",
            ),
            (
                "redis-sentinel://u:p@s1:26379,s2:26379/mymaster",
                "redis-sentinel://u:p@s1:26379?node=s2:26379&sentinelServiceName=mymaster",
            ),
            (
                "redis-sentinel://s1:26379/3?sentinelServiceName=m",
                "redis-sentinel://s1:26379/3?sentinelServiceName=m",
            ),
        ] {
            assert_eq!(fred_url(given).unwrap(), expected, "{given}");
            client_config(given).unwrap_or_else(|e| panic!("{given}: {e}"));
        }
        let cluster = client_config("redis-cluster://h1:1,h2:2").unwrap();
        assert!(cluster.server.is_clustered());
        let sentinel = client_config("redis-sentinel://s1:1,s2:2/svc").unwrap();
        assert!(sentinel.server.is_sentinel());
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_secrets() {
        for bad in [
            "http://h:1",
            "redis-cluster://h:1/0",
            "redis-sentinel://s1:1,s2:2",
            "redis-cluster://",
            "nonsense",
        ] {
            let message = client_config(bad).unwrap_err();
            assert!(!message.is_empty(), "{bad}");
        }
        let message = client_config("redis-sentinel://user:hunter2@s1:1").unwrap_err();
        assert!(!message.contains("hunter2"), "{message}");
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
