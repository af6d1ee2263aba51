//! The lifecycle index and passes over it (see `store::lifecycle` for the rules).
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{rx:<n>}:runs` | zset | `dag_run.id`s holding state; score 0, or the time of a first reclaim |
//! | `{rx:<n>}:run:<id>` | hash | that run's `dag_id`, `run_id` and `t:<task_id>` per task |
//! | `{ax:<n>}:assets` | zset | Airflow asset ids holding state; score as for runs |
//! | `lifecycle:lease` | string | the replica running passes, with a TTL |
//!
//! `<n>` is the id modulo [`INDEX_SHARDS`]. An entry is written before the state it
//! points at, so a crash in between leaves an entry without state (harmless), never state
//! without an entry. A replica remembers the entries it wrote for as long as it trusts a
//! resolved identity, so only a task's first write in that window pays the extra call.

use fred::prelude::*;
use fred::types::sorted_sets::Ordering;
use fred::types::SetOptions;

use super::super::lifecycle::{
    asset_id, shard_of, Oracle, PassError, PassLimits, Reclaimed, INDEX_SHARDS,
};
use super::super::{now_millis, AssetKey, EpochMillis, StoreResult, TaskScope};
use super::RedisStore;

/// An entry this replica has written to the index recently.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Indexed {
    Task { run: i64, task_id: String },
    Asset(i64),
}

/// Which index a pass walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Runs,
    Assets,
}

impl RedisStore {
    fn runs_shard(&self, shard: u64) -> String {
        format!("{}{{rx:{shard}}}:runs", self.prefix)
    }

    fn run_tasks(&self, run: i64) -> String {
        format!("{}{{rx:{}}}:run:{run}", self.prefix, shard_of(run))
    }

    fn assets_shard(&self, shard: u64) -> String {
        format!("{}{{ax:{shard}}}:assets", self.prefix)
    }

    fn lease_key(&self) -> String {
        format!("{}lifecycle:lease", self.prefix)
    }

    /// Puts a task of a tracked run in the index, unless this replica did so recently.
    pub(super) async fn index_task(&self, scope: &TaskScope) -> StoreResult<()> {
        let Some(run) = scope.run_key else {
            return Ok(());
        };
        let entry = Indexed::Task {
            run,
            task_id: scope.task_id.clone(),
        };
        if self.indexed.contains_key(&entry) {
            return Ok(());
        }
        let keys = vec![self.runs_shard(shard_of(run)), self.run_tasks(run)];
        let args: Vec<Value> = vec![
            run.into(),
            scope.dag_id.as_str().into(),
            scope.run_id.as_str().into(),
            scope.task_id.as_str().into(),
        ];
        let client = self.redis.shared_client();
        let _: i64 = self
            .redis
            .eval(
                "lifecycle_index",
                &self.scripts.lifecycle_index,
                &client,
                &keys,
                &args,
            )
            .await?;
        self.indexed.insert(entry, ());
        Ok(())
    }

    /// Puts an Airflow asset in the index, unless this replica did so recently.
    pub(super) async fn index_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        let Some(id) = asset_id(&asset.0) else {
            return Ok(());
        };
        let entry = Indexed::Asset(id);
        if self.indexed.contains_key(&entry) {
            return Ok(());
        }
        let shard = self.assets_shard(shard_of(id));
        let _: i64 = self
            .redis
            .call("zadd", |pool| {
                pool.zadd(
                    shard.as_str(),
                    Some(SetOptions::NX),
                    None,
                    false,
                    false,
                    (0.0, id.to_string()),
                )
            })
            .await?;
        self.indexed.insert(entry, ());
        Ok(())
    }

    pub(super) async fn take_lease(
        &self,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<bool> {
        let keys = vec![self.lease_key()];
        let ttl_ms = ttl.as_millis().max(1) as i64;
        let args: Vec<Value> = vec![holder.into(), ttl_ms.into()];
        let client = self.redis.shared_client();
        let held: i64 = self
            .redis
            .eval("lease", &self.scripts.lease, &client, &keys, &args)
            .await?;
        Ok(held == 1)
    }

    pub(super) async fn reconcile(
        &self,
        oracle: &dyn Oracle,
        limits: PassLimits,
    ) -> Result<Reclaimed, PassError> {
        let mut done = Reclaimed::default();
        for kind in [Kind::Runs, Kind::Assets] {
            for shard in 0..INDEX_SHARDS {
                self.reconcile_shard(kind, shard, oracle, limits, &mut done)
                    .await?;
            }
        }
        Ok(done)
    }

    /// Walks one shard in pages of `limits.batch`. Entries dropped from a page shift the
    /// ones after it, so the next page starts that much earlier; only the lease holder
    /// drops entries, and an entry added meanwhile can only make a page repeat one.
    async fn reconcile_shard(
        &self,
        kind: Kind,
        shard: u64,
        oracle: &dyn Oracle,
        limits: PassLimits,
        done: &mut Reclaimed,
    ) -> Result<(), PassError> {
        let index = match kind {
            Kind::Runs => self.runs_shard(shard),
            Kind::Assets => self.assets_shard(shard),
        };
        let batch = limits.batch.max(1) as i64;
        let grace = limits.grace.as_millis() as EpochMillis;
        let mut offset: i64 = 0;
        loop {
            let page: Vec<(String, f64)> = self
                .redis
                .call("zrange", |pool| {
                    pool.zrange(
                        index.as_str(),
                        offset,
                        offset + batch - 1,
                        None,
                        false,
                        None,
                        true,
                    )
                })
                .await?;
            if page.is_empty() {
                return Ok(());
            }
            let entries: Vec<(i64, EpochMillis)> = page
                .iter()
                .filter_map(|(member, score)| Some((member.parse().ok()?, *score as EpochMillis)))
                .collect();
            let ids: Vec<i64> = entries.iter().map(|(id, _)| *id).collect();
            let alive = match kind {
                Kind::Runs => oracle.existing_runs(&ids).await,
                Kind::Assets => oracle.active_assets(&ids).await,
            }
            .map_err(PassError::Metastore)?;
            match kind {
                Kind::Runs => done.runs_checked += ids.len() as u64,
                Kind::Assets => done.assets_checked += ids.len() as u64,
            }
            let now = now_millis();
            let mut dropped = 0;
            for (id, marked_at) in entries {
                if alive.contains(&id) {
                    if marked_at != 0 {
                        // Active again (an asset re-added to a DAG): its state starts
                        // from what was written since the reclaim.
                        self.mark(&index, id, 0).await?;
                    }
                    continue;
                }
                if marked_at == 0 {
                    self.reclaim(kind, id).await?;
                    self.mark(&index, id, now).await?;
                    match kind {
                        Kind::Runs => done.runs += 1,
                        Kind::Assets => done.assets += 1,
                    }
                } else if now - marked_at >= grace {
                    self.reclaim(kind, id).await?;
                    self.unindex(kind, &index, id).await?;
                    dropped += 1;
                }
            }
            offset += page.len() as i64 - dropped;
            if (page.len() as i64) < batch {
                return Ok(());
            }
        }
    }

    async fn mark(&self, index: &str, id: i64, at: EpochMillis) -> StoreResult<()> {
        let _: i64 = self
            .redis
            .call("zadd", |pool| {
                pool.zadd(
                    index,
                    Some(SetOptions::XX),
                    None::<Ordering>,
                    false,
                    false,
                    (at as f64, id.to_string()),
                )
            })
            .await?;
        Ok(())
    }

    /// Deletes the state of a deleted run (every map index of every task it indexed) or
    /// of an orphaned asset, through the store's own clears, so change streams hear of it.
    async fn reclaim(&self, kind: Kind, id: i64) -> StoreResult<()> {
        match kind {
            Kind::Assets => self.clear_asset(&AssetKey(id.to_string())).await,
            Kind::Runs => {
                let key = self.run_tasks(id);
                let fields: std::collections::HashMap<String, String> = self
                    .redis
                    .call("hgetall", |pool| pool.hgetall(key.as_str()))
                    .await?;
                let (Some(dag_id), Some(run_id)) = (fields.get("dag_id"), fields.get("run_id"))
                else {
                    return Ok(());
                };
                for task_id in fields.keys().filter_map(|field| field.strip_prefix("t:")) {
                    let scope = TaskScope {
                        dag_id: dag_id.clone(),
                        run_id: run_id.clone(),
                        task_id: task_id.to_owned(),
                        map_index: -1,
                        run_key: Some(id),
                    };
                    self.clear_task(&scope, true).await?;
                }
                Ok(())
            }
        }
    }

    async fn unindex(&self, kind: Kind, index: &str, id: i64) -> StoreResult<()> {
        if kind == Kind::Runs {
            let key = self.run_tasks(id);
            let _: i64 = self
                .redis
                .call("unlink", |pool| pool.unlink(key.as_str()))
                .await?;
        }
        let _: i64 = self
            .redis
            .call("zrem", |pool| pool.zrem(index, id.to_string()))
            .await?;
        // No replica still remembers an entry for the id: the grace is two index-cache
        // lifetimes, so the last write that could have been remembered has expired.
        Ok(())
    }
}
