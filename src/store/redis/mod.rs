//! The Redis backend, through `fred`.
//!
//! Layout (every key starts with the configured prefix):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{t:<digest>}:<map_index>` | hash | one task scope: state key -> encoded value |
//! | `{t:<digest>}:<map_index>:x` | zset | that scope's expiring keys, scored by expiry |
//! | `{t:<digest>}:r` | hash | the map indices holding state (`m<map_index>`: the generation each was written in, plus one), the task's generation (`g`), and the readable identity |
//! | `{a:<asset>}:v` / `{a:<asset>}:w` | hash | an asset's values / who wrote each |
//! | `ev:{t:<digest>}` / `ev:{a:<asset>}` | pub/sub channel | change events (`events`) |
//! | `{rx:<n>}:…`, `{ax:<n>}:…`, `lifecycle:lease` | | the lifecycle index (`reconcile`) |
//! | `{sweep:<n>}`, `{reclaim:<n>}` | zset | scopes to sweep (`sweep`), tasks to reclaim after a clear-all (`reclaim`) |
//!
//! `<digest>` hashes the length-prefixed (dag_id, run_id, task_id) and the run's
//! `dag_run.id` when the identity knows it, so every map index of
//! a task shares one Cluster slot whatever characters the ids hold; that is what lets one
//! Lua script clear all map indices atomically: clear-all raises the task's generation
//! `g`, and a scope written in an older one is stale, read as empty, unlinked by its next
//! write and reclaimed in the background (`reclaim`).
//!
//! The read path is one pipeline, `HMGET` of the registry's `g` and `m<map_index>` then
//! `HGET` of the scope; the expiry check happens here, on the decoded value, so an expired
//! key is never served even before Redis reclaims it.
//!
//! One file per concern: `url` (the URL forms), `call` (the pool, and `Connection::call`,
//! the only way a command is sent), `codec` (a value in a hash field), `scripts` (the Lua
//! under `lua/`), `task` and `asset` (the operations), `sweep` (the sweeper and its
//! index), `reclaim` (what clear-alls left stale), `scan` and `export` (what `airstate
//! export` walks and reads) and `events` (change streams).

mod asset;
mod call;
pub use self::call::Startup;
mod codec;
mod events;
mod export;
mod reclaim;
mod reconcile;
mod scan;
mod scripts;
mod sweep;
mod task;
mod url;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;

use self::call::Connection;
use self::scripts::Scripts;
use super::events::{BufferLimits, EventHub, Watch};
use super::lifecycle::{Oracle, PassError, PassLimits, Reclaimed};
use super::{
    AssetKey, Condition, Entry, EpochMillis, StateStore, StoreError, StoreResult, StoredValue,
    TaskScope, Writer, Written,
};

pub use self::export::ExportScope;
pub use self::scan::ScopeRef;
pub use self::task::task_hash_tag;
use self::url::redact_url;
pub use self::url::{client_config, with_password};

/// How a clear of every map index of a task is done (`AIRSTATE_CLEAR_ALL`, `lua/task_clear.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearAll {
    /// Raise the task's generation: O(1); the stale scopes are reclaimed in the
    /// background. A replica of an airstate before generations does not understand it.
    Generation,
    /// Delete every scope at once, O(map indices): what a replica of an airstate before
    /// generations does, so a fleet mixing the two (a rolling upgrade, a rollback) agrees.
    Unlink,
}

impl std::str::FromStr for ClearAll {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "generation" => Ok(Self::Generation),
            "unlink" => Ok(Self::Unlink),
            _ => Err("expected generation or unlink".to_owned()),
        }
    }
}

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
    /// How long a replica trusts that a run or asset it indexed is still in the
    /// lifecycle index, and how many it remembers (see `reconcile`).
    pub index_cache_ttl: Duration,
    pub index_cache_capacity: u64,
    pub clear_all: ClearAll,
}

pub struct RedisStore {
    redis: Connection,
    prefix: String,
    scripts: Arc<Scripts>,
    /// The change-event hub, which every handle of a store shares.
    events: EventHub,
    url_for_display: String,
    sweeper: Option<tokio::task::JoinHandle<()>>,
    change_events: bool,
    clear_all: ClearAll,
    /// Lifecycle-index entries this replica wrote recently, shared by every handle.
    indexed: moka::sync::Cache<reconcile::Indexed, ()>,
    /// Where this replica's reclaim of a task's stale scopes stopped, by reclaim-index
    /// entry, so the next pass resumes there (`reclaim`). Lost on a restart, which only
    /// scans that registry again.
    reclaim_cursors: moka::sync::Cache<String, String>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.abort();
        }
    }
}

impl RedisStore {
    /// Connects and loads the Lua scripts. Fails when Redis cannot be reached: for
    /// one-shot work (export, import, tests) that has nothing to do without it.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        Self::open(settings, Startup::RequireRedis).await
    }

    /// What the server starts with: like [`RedisStore::connect`] when Redis answers
    /// within the command timeout, and otherwise a store that answers 503 at once and
    /// keeps connecting in the background. Airflow's workers send every Execution API
    /// call to the gateway, so one that exited without Redis would stop the forwarded
    /// ones too (heartbeats, state transitions). The scripts are then loaded by their
    /// first call (EVALSHA reloads on NOSCRIPT).
    pub async fn connect_in_background(settings: &RedisSettings) -> Result<Self, StoreError> {
        Self::open(settings, Startup::ConnectInBackground).await
    }

    async fn open(settings: &RedisSettings, startup: Startup) -> Result<Self, StoreError> {
        let redis = Connection::connect(settings, startup).await?;
        let scripts = Scripts::new();
        match scripts.load(&redis).await {
            Ok(()) => {}
            Err(StoreError::Unavailable(reason)) if startup == Startup::ConnectInBackground => {
                tracing::warn!(%reason, "Lua scripts not loaded at start-up; each loads on its first call");
            }
            Err(error) => return Err(error),
        }
        let mut store = Self {
            redis,
            prefix: settings.key_prefix.clone(),
            scripts: Arc::new(scripts),
            events: EventHub::new(BufferLimits::default()),
            url_for_display: redact_url(&settings.url),
            sweeper: None,
            change_events: settings.change_events,
            clear_all: settings.clear_all,
            indexed: moka::sync::Cache::builder()
                .max_capacity(settings.index_cache_capacity)
                .time_to_live(settings.index_cache_ttl)
                .build(),
            reclaim_cursors: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        };
        store.sweeper = Some(store.spawn_sweeper(settings.sweep_interval));
        Ok(store)
    }

    /// A handle sharing this store's connections, scripts and event hub, for background
    /// work.
    fn share(&self) -> Self {
        Self {
            redis: self.redis.clone(),
            prefix: self.prefix.clone(),
            scripts: self.scripts.clone(),
            events: self.events.clone(),
            url_for_display: self.url_for_display.clone(),
            sweeper: None,
            change_events: self.change_events,
            clear_all: self.clear_all,
            indexed: self.indexed.clone(),
            reclaim_cursors: self.reclaim_cursors.clone(),
        }
    }
}

pub(super) fn written(applied: bool, version: Option<String>) -> Written {
    if applied {
        Written::Applied(version)
    } else {
        Written::PreconditionFailed
    }
}

// Each method runs the inherent method of the same name in `task`, `asset` or `events`
// (an inherent method takes precedence over the trait's), so this impl stays a map of
// where each operation lives.
#[async_trait]
impl StateStore for RedisStore {
    async fn get_task(&self, scope: &TaskScope, key: &str) -> StoreResult<Option<StoredValue>> {
        self.get_task(scope, key).await
    }

    async fn get_task_many(
        &self,
        scope: &TaskScope,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        self.get_task_many(scope, keys, max_bytes).await
    }

    async fn put_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
        condition: &Condition,
    ) -> StoreResult<Written> {
        self.put_task_if(scope, key, json, expires_at, condition)
            .await
    }

    async fn delete_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        self.delete_task_if(scope, key, condition).await
    }

    async fn clear_task(&self, scope: &TaskScope, all_map_indices: bool) -> StoreResult<()> {
        self.clear_task(scope, all_map_indices).await
    }

    async fn watch_task(&self, scope: &TaskScope) -> StoreResult<Watch> {
        self.watch_task(scope).await
    }

    async fn watch_asset(&self, asset: &AssetKey) -> StoreResult<Watch> {
        self.watch_asset(asset).await
    }

    fn close_watches(&self) {
        self.close_watches()
    }

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>> {
        self.get_asset(asset, key).await
    }

    async fn get_asset_many(
        &self,
        asset: &AssetKey,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        self.get_asset_many(asset, keys, max_bytes).await
    }

    async fn put_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
        condition: &Condition,
    ) -> StoreResult<Written> {
        self.put_asset_if(asset, key, json, writer, condition).await
    }

    async fn delete_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        self.delete_asset_if(asset, key, condition).await
    }

    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        self.clear_asset(asset).await
    }

    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>> {
        self.asset_writer(asset, key).await
    }

    async fn list_task(&self, scope: &TaskScope) -> StoreResult<Vec<Entry>> {
        self.list_task(scope).await
    }

    async fn list_asset(&self, asset: &AssetKey) -> StoreResult<Vec<Entry>> {
        self.list_asset(asset).await
    }

    async fn import_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        self.import_task(scope, key, json, updated_at, expires_at)
            .await
    }

    async fn import_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        writer: Option<&Writer>,
    ) -> StoreResult<()> {
        self.import_asset(asset, key, json, updated_at, writer)
            .await
    }

    async fn take_lease(&self, holder: &str, ttl: Duration) -> StoreResult<bool> {
        self.take_lease(holder, ttl).await
    }

    async fn reconcile(
        &self,
        oracle: &dyn Oracle,
        limits: PassLimits,
    ) -> Result<Reclaimed, PassError> {
        self.reconcile(oracle, limits).await
    }

    /// Redis must never evict state: an evicting `maxmemory-policy` drops task state
    /// silently under memory pressure, where `noeviction` refuses writes (503) instead.
    async fn warnings(&self) -> Vec<String> {
        let reply: StoreResult<Vec<String>> = self
            .redis
            .call("config_get", |pool| {
                let command = fred::types::CustomCommand::new_static(
                    "CONFIG",
                    fred::types::ClusterHash::Random,
                    false,
                );
                pool.next().custom(command, vec!["GET", "maxmemory-policy"])
            })
            .await;
        match reply.as_deref() {
            Ok([_, policy]) if policy == "noeviction" => Vec::new(),
            Ok([_, policy]) => vec![format!(
                "Redis maxmemory-policy is {policy}: Redis may evict state under memory \
                 pressure; set maxmemory-policy noeviction"
            )],
            // Unreachable: `/ready` already says so, and the policy is checked once back.
            Err(StoreError::Unavailable(_)) => Vec::new(),
            _ => vec![
                "Redis maxmemory-policy unknown (CONFIG GET refused): make sure it is \
                 noeviction, or Redis may evict state under memory pressure"
                    .to_owned(),
            ],
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        let _: String = self
            .redis
            .call("ping", |pool| pool.next().ping(None))
            .await?;
        Ok(())
    }

    fn dependency(&self) -> Option<&'static str> {
        Some("redis")
    }

    fn describe(&self) -> String {
        format!(
            "Redis at {} (key prefix {:?})",
            self.url_for_display, self.prefix
        )
    }
}
