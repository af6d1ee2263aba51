//! Where state lives: the [`StateStore`] trait and its two backends.
//!
//! Redis ([`redis::RedisStore`]) is the product; [`memory::MemoryStore`] exists so that
//! `airstate serve` works with nothing else installed. Both are driven by the same
//! behaviour tests, so the trait is the contract, not either implementation.
//!
//! Values cross this boundary as the JSON text the client sent: the store never parses
//! or re-serialises them, which is what keeps big integers and `1.0` intact.

pub mod events;
pub mod lifecycle;
pub mod memory;
pub mod pyjson;
pub mod redis;
pub mod rules;
pub mod version;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch; the unit of every stored timestamp.
pub type EpochMillis = i64;

/// The scope Airflow keys task state by. A retry gets a new task-instance UUID but the
/// same scope, which is how a later try sees the state of earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskScope {
    pub dag_id: String,
    pub run_id: String,
    pub task_id: String,
    pub map_index: i64,
    /// The DAG run's `dag_run.id`, known with the metastore identity. Airflow keys task
    /// state by it, so a run deleted and created again with the same run_id is a
    /// different run whose state starts empty; the store keys state by it for the same
    /// reason. `None` without a metastore (claims identity), where (dag_id, run_id) is
    /// all there is.
    pub run_key: Option<i64>,
}

/// An asset's identity in the store. With the metastore resolver it is Airflow's integer
/// asset id (so a value written by name is read by URI); see `identity` for the claims form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AssetKey(pub String);

/// A stored value with its bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The JSON text exactly as it was received.
    pub json: String,
    pub updated_at: EpochMillis,
    pub expires_at: Option<EpochMillis>,
    /// Unique per write (see [`version`]); the HTTP layer serves it as the `ETag`.
    pub version: String,
}

impl StoredValue {
    pub fn is_expired(&self, now: EpochMillis) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Who wrote an asset value, as Airflow records it in `asset_state_store.last_updated_by_*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Writer {
    Task {
        dag_id: String,
        run_id: String,
        task_id: String,
        map_index: i64,
    },
    /// Event-trigger watchers and `airflow dags test`, whose token subject is the all-zero UUID.
    Watcher,
    /// An operator through the admin API (Airflow's Core REST API records the same kind).
    Api,
}

/// One key of a scope with everything stored about it, as the admin API lists it and
/// `airstate export` writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: StoredValue,
    /// Asset keys only; `None` also for a row Airflow stored without writer columns.
    pub writer: Option<Writer>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or refused to serve (down, loading, read-only replica,
    /// out of memory, timed out). Callers may retry: the request did not take effect, or
    /// took effect idempotently.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug, or data this version cannot read.
    #[error("state store error: {0}")]
    Internal(String),
    /// A bulk read whose values together are larger than the caller's limit; nothing
    /// was read.
    #[error("values total {bytes} bytes, over the limit of {limit}")]
    TooLarge { bytes: u64, limit: u64 },
}

pub type StoreResult<T> = Result<T, StoreError>;

pub use version::{Condition, Written};

/// The operations Airflow's `BaseStoreBackend` offers, over our scopes.
///
/// Every method is idempotent, so a replayed request after a lost reply is harmless.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// A value that is present and not expired; an expired one is never returned.
    async fn get_task(&self, scope: &TaskScope, key: &str) -> StoreResult<Option<StoredValue>>;
    /// Many keys of one scope in one round trip, in the order asked; `None` for a key that
    /// is missing or expired. [`StoreError::TooLarge`], with nothing read, when the values
    /// as stored total more than `max_bytes`: the check happens before any value is read.
    async fn get_task_many(
        &self,
        scope: &TaskScope,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>>;
    /// Upsert. `expires_at: None` makes the key permanent, removing an earlier expiry.
    async fn put_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        self.put_task_if(scope, key, json, expires_at, &Condition::NONE)
            .await
            .map(drop)
    }
    async fn delete_task(&self, scope: &TaskScope, key: &str) -> StoreResult<()> {
        self.delete_task_if(scope, key, &Condition::NONE)
            .await
            .map(drop)
    }
    /// [`put_task`](Self::put_task) applied only when `condition` holds for the key's
    /// current version, checked and written in one atomic step.
    async fn put_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
        condition: &Condition,
    ) -> StoreResult<Written>;
    async fn delete_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written>;
    /// Clear the scope's map index, or with `all_map_indices` every map index of the same
    /// (dag_id, run_id, task_id), atomically.
    async fn clear_task(&self, scope: &TaskScope, all_map_indices: bool) -> StoreResult<()>;

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>>;
    /// Many keys of one asset in one round trip, in the order asked; `None` for a missing
    /// key. Bounded by `max_bytes` as [`get_task_many`](Self::get_task_many) is.
    async fn get_asset_many(
        &self,
        asset: &AssetKey,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>>;
    async fn put_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
    ) -> StoreResult<()> {
        self.put_asset_if(asset, key, json, writer, &Condition::NONE)
            .await
            .map(drop)
    }
    async fn delete_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<()> {
        self.delete_asset_if(asset, key, &Condition::NONE)
            .await
            .map(drop)
    }
    async fn put_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
        condition: &Condition,
    ) -> StoreResult<Written>;
    async fn delete_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written>;
    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()>;
    /// Every live key of a task scope, sorted by key (a stable order to page through).
    /// One hash is read whole: a scope is one task's state, not a keyspace.
    async fn list_task(&self, scope: &TaskScope) -> StoreResult<Vec<Entry>>;
    /// Every key of an asset with its writer, sorted by key.
    async fn list_asset(&self, asset: &AssetKey) -> StoreResult<Vec<Entry>>;
    /// An upsert that keeps the `updated_at` it is given instead of now, for moving state
    /// in from elsewhere (`airstate import`); every other invariant of a write holds.
    async fn import_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()>;
    /// Like [`import_task`](Self::import_task); `writer: None` records no writer, as
    /// Airflow's plain `set()` leaves the writer columns NULL.
    async fn import_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        writer: Option<&Writer>,
    ) -> StoreResult<()>;

    /// The writer recorded with an asset key, if the key exists.
    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>>;

    /// Change events of a task scope's keys (the watch follows `scope.map_index`, and
    /// clears of every map index), from the moment this returns.
    async fn watch_task(&self, scope: &TaskScope) -> StoreResult<events::Watch>;
    /// Change events of an asset's keys, from the moment this returns.
    async fn watch_asset(&self, asset: &AssetKey) -> StoreResult<events::Watch>;
    /// Ends every change stream and refuses new ones (shutdown).
    fn close_watches(&self);

    /// Takes the lifecycle lease for `holder`, or renews it if `holder` has it; false
    /// when another holder does. One replica at a time runs lifecycle passes.
    async fn take_lease(&self, holder: &str, ttl: std::time::Duration) -> StoreResult<bool>;
    /// One lifecycle pass (see [`lifecycle`]): reclaims the state of runs and assets
    /// `oracle` says are gone.
    async fn reconcile(
        &self,
        oracle: &dyn lifecycle::Oracle,
        limits: lifecycle::PassLimits,
    ) -> Result<lifecycle::Reclaimed, lifecycle::PassError>;

    /// Whether the backend answers; drives `/ready`.
    async fn ping(&self) -> StoreResult<()>;
    /// The service the backend depends on, as `/ready` and `airstate_dependency_up`
    /// name it; `None` for a store held in the process.
    fn dependency(&self) -> Option<&'static str> {
        None
    }
    /// Configuration of the backend that puts state at risk, in words for an operator
    /// (`/ready` shows them and start-up logs them; they do not make a replica unready).
    async fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
    /// A short human-readable description for the start-up log line.
    fn describe(&self) -> String;
}

pub fn now_millis() -> EpochMillis {
    chrono::Utc::now().timestamp_millis()
}
