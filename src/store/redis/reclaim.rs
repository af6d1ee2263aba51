//! Reclaiming the scopes clear-alls left stale (`lua/task_clear.lua`): in the background,
//! a bounded batch at a time, so that no step holds Redis's main thread for long.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{reclaim:<n>}` | zset | `<generation>:<registry key>` per clear-all not yet reclaimed, scored by when it is due |
//!
//! A clear-all to generation G makes stale every scope written before it; after it, no
//! write can make another scope stale under G (writes record the current generation). So
//! one full HSCAN of the registry begun after the clear sees every scope still stale under
//! G, and the entry can go once the scan ends, whatever clears came since: each has its
//! own entry.

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, SetOptions};

use super::super::{now_millis, StoreResult};
use super::task::is_stale;
use super::RedisStore;

/// Shards of the reclaim index, each with its own hash tag, as for the sweep index.
const RECLAIM_SHARDS: u8 = 16;
/// Tasks taken per shard and pass.
const TASKS_PER_SHARD: i64 = 50;
/// Registry fields one HSCAN page asks for.
const SCAN_PAGE: i64 = 1000;
/// Scopes one script call reclaims. Each costs Redis about 15 µs (two UNLINKs and an
/// HDEL: clear-all's old figure, 146 ms for 10,000), so a call stays near 1.5 ms.
const SCRIPT_BATCH: usize = 100;
/// Registry fields a sweeper pass looks at, over every task: what bounds a pass.
pub(super) const FIELDS_PER_PASS: usize = 50_000;

impl RedisStore {
    fn reclaim_index(&self, shard: u8) -> String {
        format!("{}{{reclaim:{shard}}}", self.prefix)
    }

    /// Lists a task cleared to `generation` for the sweeper to reclaim, due at once.
    pub(super) async fn schedule_reclaim(
        &self,
        digest: &str,
        registry: &str,
        generation: i64,
    ) -> StoreResult<()> {
        let shard = u8::from_str_radix(&digest[..2], 16).unwrap_or(0) % RECLAIM_SHARDS;
        let index = self.reclaim_index(shard);
        let member = format!("{generation}:{registry}");
        let _: i64 = self
            .redis
            .call("zadd", |pool| {
                pool.zadd(
                    &index,
                    Some(SetOptions::NX),
                    None,
                    false,
                    false,
                    (now_millis() as f64, member.as_str()),
                )
            })
            .await?;
        Ok(())
    }

    /// Reclaims scopes clear-alls left stale, looking at about `max_fields` registry
    /// fields (the sweeper's pass: 50,000); a task not finished resumes where its scan
    /// stopped on this replica's next pass. Every replica may run it: the script checks
    /// staleness again and is idempotent. Returns the scopes reclaimed.
    pub async fn reclaim_once(&self, max_fields: usize) -> StoreResult<usize> {
        let reclaimed = self.reclaim_pass(max_fields).await?;
        self.reclaim_pending().await?;
        Ok(reclaimed)
    }

    /// Clear-alls whose stale scopes are not all reclaimed yet, over every shard; also set
    /// as the gauge `airstate_reclaim_pending`. Zero means nothing stale is left, the
    /// moment to roll back to an airstate before generations (README, "Upgrading").
    pub async fn reclaim_pending(&self) -> StoreResult<u64> {
        let mut pending = 0;
        for shard in 0..RECLAIM_SHARDS {
            let index = self.reclaim_index(shard);
            let count: u64 = self.redis.call("zcard", |pool| pool.zcard(&index)).await?;
            pending += count;
        }
        metrics::gauge!("airstate_reclaim_pending").set(pending as f64);
        Ok(pending)
    }

    async fn reclaim_pass(&self, max_fields: usize) -> StoreResult<usize> {
        let now = now_millis();
        let mut budget = max_fields.max(1);
        let mut reclaimed = 0;
        for shard in 0..RECLAIM_SHARDS {
            let index = self.reclaim_index(shard);
            let due: Vec<String> = self
                .redis
                .call("zrangebyscore", |pool| {
                    pool.zrangebyscore(&index, "-inf", now, false, Some((0, TASKS_PER_SHARD)))
                })
                .await?;
            for member in due {
                if budget == 0 {
                    return Ok(reclaimed);
                }
                let parsed = member
                    .split_once(':')
                    .and_then(|(g, registry)| Some((g.parse::<u64>().ok()?, registry)));
                let finished = match parsed {
                    Some((generation, registry)) => {
                        let (finished, count) = self
                            .reclaim_task(&member, registry, generation, &mut budget)
                            .await?;
                        reclaimed += count;
                        finished
                    }
                    None => true,
                };
                if finished {
                    let _: i64 = self
                        .redis
                        .call("zrem", |pool| pool.zrem(&index, member.as_str()))
                        .await?;
                }
            }
        }
        Ok(reclaimed)
    }

    /// Scans one task's registry for scopes stale under `generation` and reclaims them,
    /// until the scan ends (true) or `budget` fields have been looked at (false).
    async fn reclaim_task(
        &self,
        member: &str,
        registry: &str,
        generation: u64,
        budget: &mut usize,
    ) -> StoreResult<(bool, usize)> {
        let Some(base) = registry.strip_suffix('r') else {
            return Ok((true, 0));
        };
        let generation = generation.to_string();
        let mut cursor = self
            .reclaim_cursors
            .remove(member)
            .unwrap_or_else(|| "0".to_owned());
        let mut reclaimed = 0;
        loop {
            let count = SCAN_PAGE.min(i64::try_from(*budget).unwrap_or(i64::MAX));
            let (next, page) = self.scan_registry(registry, &cursor, count).await?;
            *budget = budget.saturating_sub((page.len() / 2).max(1));
            let stale: Vec<&str> = page
                .chunks_exact(2)
                .filter(|pair| is_stale(Some(&generation), Some(&pair[1])))
                .map(|pair| pair[0].as_str())
                .collect();
            for batch in stale.chunks(SCRIPT_BATCH) {
                reclaimed += self.reclaim_scopes(registry, base, batch).await?;
            }
            if next == "0" {
                return Ok((true, reclaimed));
            }
            cursor = next;
            if *budget == 0 {
                self.reclaim_cursors.insert(member.to_owned(), cursor);
                return Ok((false, reclaimed));
            }
        }
    }

    /// One HSCAN page of a registry's map-index fields: the next cursor, then field,
    /// value, field, value…
    async fn scan_registry(
        &self,
        registry: &str,
        cursor: &str,
        count: i64,
    ) -> StoreResult<(String, Vec<String>)> {
        let args: Vec<Value> = vec![
            registry.into(),
            cursor.into(),
            "MATCH".into(),
            "m*".into(),
            "COUNT".into(),
            count.into(),
        ];
        self.redis
            .call("hscan", |pool| {
                let command = CustomCommand::new_static("HSCAN", ClusterHash::FirstKey, false);
                pool.next().custom(command, args.clone())
            })
            .await
    }

    /// Runs `task_reclaim.lua` on the scopes `fields` names, every key declared.
    async fn reclaim_scopes(
        &self,
        registry: &str,
        base: &str,
        fields: &[&str],
    ) -> StoreResult<usize> {
        let mut keys = Vec::with_capacity(1 + 2 * fields.len());
        keys.push(registry.to_owned());
        for field in fields {
            let scope = format!("{base}{}", field.trim_start_matches('m'));
            let expiry = format!("{scope}:x");
            keys.extend([scope, expiry]);
        }
        let args: Vec<Value> = fields.iter().map(|field| Value::from(*field)).collect();
        // Nobody was promised anything about a reclaim: no wait for replicas.
        let client = self.redis.shared_client();
        let reclaimed: i64 = self
            .redis
            .eval(
                "task_reclaim",
                &self.scripts.task_reclaim,
                &client,
                &keys,
                &args,
            )
            .await?;
        Ok(reclaimed.max(0) as usize)
    }
}
