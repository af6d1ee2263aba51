//! The sweeper: reclaims expired keys that key-level expiry cannot free, and (through
//! `reclaim`) the scopes clear-alls left stale.

use std::time::Duration;

use fred::prelude::*;

use fred::types::sorted_sets::Ordering;

use super::super::{now_millis, Condition, EpochMillis, StoreResult};
use super::task::PURGE;
use super::RedisStore;

/// The sweep index is split in shards with their own hash tags, so that on a Cluster it
/// spreads over several nodes instead of making one slot hot.
pub(super) const SWEEP_SHARDS: u8 = 16;
/// Scopes purged per shard and pass; bounds the work of one pass.
pub(super) const SWEEP_BATCH: i64 = 200;

impl RedisStore {
    pub(super) fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.share();
        tokio::spawn(async move {
            // The first pass one interval after start, not at once: replicas rolling out
            // together do not all sweep at the same moment, and a store a test drives
            // (with an hour's interval) never has a pass race its own steps.
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Err(error) = store.sweep_once().await {
                    tracing::debug!(%error, "expiry sweep failed; retrying next pass");
                }
                if let Err(error) = store.reclaim_once(super::reclaim::FIELDS_PER_PASS).await {
                    tracing::debug!(%error, "reclaim after clear-all failed; retrying next pass");
                }
            }
        })
    }

    fn sweep_index(&self, shard: u8) -> String {
        format!("{}{{sweep:{shard}}}", self.prefix)
    }

    /// Puts a scope mixing permanent and expiring keys in the sweep index, due at `due`.
    pub(super) async fn schedule_sweep(
        &self,
        digest: &str,
        scope_key: &str,
        due: EpochMillis,
    ) -> StoreResult<()> {
        let shard = u8::from_str_radix(&digest[..2], 16).unwrap_or(0) % SWEEP_SHARDS;
        let index = self.sweep_index(shard);
        // Keep the earliest due time (LT): the sweeper corrects a stale one.
        let _: i64 = self
            .redis
            .call("zadd", |pool| {
                pool.zadd(
                    &index,
                    None,
                    Some(Ordering::LessThan),
                    false,
                    false,
                    (due as f64, scope_key),
                )
            })
            .await?;
        Ok(())
    }

    /// Reclaims expired keys of scopes that mix expiring and permanent keys (the scopes
    /// key-level expiry cannot free), walking the sweep index rather than the keyspace.
    /// Every replica may run it; the purge is idempotent. Returns the scopes purged.
    pub async fn sweep_once(&self) -> StoreResult<usize> {
        let now = now_millis();
        let mut purged = 0;
        for shard in 0..SWEEP_SHARDS {
            let index = self.sweep_index(shard);
            let due: Vec<String> = self
                .redis
                .call("zrangebyscore", |pool| {
                    pool.zrangebyscore(&index, "-inf", now, false, Some((0, SWEEP_BATCH)))
                })
                .await?;
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
                    .run_task_write(keys, PURGE, map_index, ["", "", "", ""], &Condition::NONE)
                    .await?;
                if next > 0 {
                    let _: i64 = self
                        .redis
                        .call("zadd", |pool| {
                            pool.zadd(
                                &index,
                                None,
                                None,
                                false,
                                false,
                                (next as f64, scope_key.as_str()),
                            )
                        })
                        .await?;
                } else {
                    let _: i64 = self
                        .redis
                        .call("zrem", |pool| pool.zrem(&index, scope_key.as_str()))
                        .await?;
                }
                purged += 1;
            }
        }
        Ok(purged)
    }
}
