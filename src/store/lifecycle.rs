//! State that follows Airflow's lifecycle: what the store needs in order to reclaim the
//! state of DAG runs Airflow deleted and of assets its scheduler orphaned, as Airflow's own
//! foreign keys and orphan pass reclaim them in the metastore.
//!
//! Each store keeps an index of the runs (`dag_run.id`) and assets (Airflow asset ids)
//! that hold state, written before the state itself, so a pass walks that index in
//! batches and asks an [`Oracle`] (the metastore) about each batch: no keyspace scan, no
//! scan of Airflow's tables. `crate::lifecycle` decides when passes run and on which
//! replica.
//!
//! A run or asset found gone is reclaimed at once and marked; a later pass, at least
//! `grace` after the mark, reclaims it once more and drops it from the index. The second
//! reclaim catches a write that was already past its identity check (a cached task
//! instance or asset, for at most the identity cache's lifetime) when the first ran.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;

/// What the metastore says about a batch of ids; an error skips the pass and deletes
/// nothing.
#[async_trait]
pub trait Oracle: Send + Sync {
    /// The ids among `runs` that are still rows of `dag_run`.
    async fn existing_runs(&self, runs: &[i64]) -> Result<HashSet<i64>, String>;
    /// The ids among `assets` that are active (an `asset_active` row), as Airflow's
    /// Execution API requires of an asset whose state it serves.
    async fn active_assets(&self, assets: &[i64]) -> Result<HashSet<i64>, String>;
}

/// The bounds of one pass.
#[derive(Debug, Clone, Copy)]
pub struct PassLimits {
    /// Ids read from the index, and asked of the metastore, at a time.
    pub batch: usize,
    /// How long a reclaimed run or asset stays marked before its final reclaim.
    pub grace: Duration,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// Index entries looked at.
    pub runs_checked: u64,
    pub assets_checked: u64,
    /// Runs and assets whose state was deleted for the first time in this pass.
    pub runs: u64,
    pub assets: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metastore: {0}")]
    Metastore(String),
}

/// Index shards: each has its own Redis hash tag, so on a Cluster the index spreads over
/// several nodes rather than making one slot hot.
pub const INDEX_SHARDS: u64 = 16;

/// The shard an id's index entry lives in.
pub fn shard_of(id: i64) -> u64 {
    id.unsigned_abs() % INDEX_SHARDS
}

/// An asset key with the metastore identity is Airflow's integer asset id; claims-mode
/// keys (`n…`, `u…`) have no lifecycle to follow.
pub fn asset_id(key: &str) -> Option<i64> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}
