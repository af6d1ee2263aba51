//! What `airstate export` walks: SCAN over the keyspace, never on a request path.

use fred::prelude::*;

use super::super::{AssetKey, StoreResult, TaskScope};
use super::task::is_stale;
use super::RedisStore;

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
        let streams =
            ["{t:*}:r", "{a:*}:v"].map(|suffix| self.redis.scan(format!("{prefix}{suffix}")));
        futures_util::stream::iter(streams).flatten()
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
            self.redis.call("hgetall", |pool| pool.hgetall(key)).await?;
        let (Some(dag_id), Some(run_id), Some(task_id)) = (
            fields.get("dag_id"),
            fields.get("run_id"),
            fields.get("task_id"),
        ) else {
            return Ok(None);
        };
        // A map index a clear-all left stale holds nothing any more, whatever its hash
        // still has until it is reclaimed.
        let generation = fields.get("g").map(String::as_str);
        let mut indices: Vec<i64> = fields
            .iter()
            .filter(|(_, written_in)| !is_stale(generation, Some(written_in)))
            .filter_map(|(field, _)| field.strip_prefix('m')?.parse().ok())
            .collect();
        indices.sort_unstable();
        let run_key = fields.get("dag_run_id").and_then(|id| id.parse().ok());
        Ok(Some(ScopeRef::Task(
            indices
                .into_iter()
                .map(|map_index| TaskScope {
                    dag_id: dag_id.clone(),
                    run_id: run_id.clone(),
                    task_id: task_id.clone(),
                    map_index,
                    run_key,
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
