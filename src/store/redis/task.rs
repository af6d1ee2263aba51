//! Task state: one hash per (task, map index), written by `task_write.lua`.

use fred::prelude::*;
use sha2::{Digest, Sha256};

use super::super::version::new_version;
use super::super::{
    now_millis, Condition, Entry, EpochMillis, StoreResult, StoredValue, TaskScope, Written,
};

use super::codec::{decode, encode, pairs};
use super::events::task_channel;
use super::scripts::WriteOp;
use super::{written, ClearAll, RedisStore};

/// Key names of one task scope.
pub(super) struct TaskKeys {
    pub(super) digest: String,
    /// `<prefix>{t:<digest>}:`; the scope hash of map index `i` is `base + i`.
    pub(super) base: String,
    pub(super) scope: String,
    pub(super) expiry: String,
    pub(super) registry: String,
}

/// The hash-tagged name every key of a task shares, whatever its map index; its Cluster
/// hash slot is the task's slot. For tools and tests that look at Redis directly.
pub fn task_hash_tag(prefix: &str, scope: &TaskScope) -> String {
    format!("{prefix}{{t:{}}}", task_digest(scope))
}

/// A digest of the length-prefixed (dag_id, run_id, task_id), then the run's
/// `dag_run.id` when known: safe in a hash tag whatever characters the ids hold (a `}`
/// would end the tag early). With the id in it, a run created again under the same
/// run_id is another task scope, empty from its first read.
pub(super) fn task_digest(scope: &TaskScope) -> String {
    let mut hasher = Sha256::new();
    for part in [&scope.dag_id, &scope.run_id, &scope.task_id] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    if let Some(run_key) = scope.run_key {
        hasher.update(b"#");
        hasher.update(run_key.to_be_bytes());
    }
    // `hex::encode` builds its String a char at a time (about 700 instructions a GET).
    let mut text = [0u8; 32];
    hex::encode_to_slice(&hasher.finalize()[..16], &mut text).expect("16 bytes are 32 digits");
    String::from_utf8(text.to_vec()).expect("hex digits are ASCII")
}

/// What a read of one scope names: the scope hash, the task's registry, and the
/// scope's field in it (`m<map_index>`, the generation it was written in plus one).
pub(super) struct ReadKeys {
    pub(super) scope: String,
    pub(super) registry: String,
    pub(super) field: String,
}

/// Whether a scope is stale: written in a generation older than the task's, that is
/// before a clear-all (`lua/task_clear.lua`), so it reads as empty. Read from the
/// registry's `g` and `m<map_index>` fields. No field means the scope is empty or
/// predates generations: not stale, so no data is ever hidden for want of a field.
pub(super) fn is_stale(generation: Option<&str>, written_in: Option<&str>) -> bool {
    let generation: u64 = generation.and_then(|g| g.parse().ok()).unwrap_or(0);
    written_in
        .and_then(|m| m.parse::<u64>().ok())
        .is_some_and(|m| m <= generation)
}

/// One step of `task_write.lua`.
pub(super) struct Write<'a> {
    op: WriteOp,
    key: &'a str,
    encoded: &'a str,
    expires_at: Option<EpochMillis>,
}

/// A purge: no key is written, only expired ones are reclaimed.
pub(super) const PURGE: Write<'static> = Write {
    op: WriteOp::Purge,
    key: "",
    encoded: "",
    expires_at: None,
};

impl RedisStore {
    // Key names are joined with `concat` rather than `format!`: they are built on every
    // request, and each `format!` cost about 800 instructions of a GET (callgrind).
    pub(super) fn task_keys(&self, scope: &TaskScope) -> TaskKeys {
        let digest = task_digest(scope);
        let base = [&self.prefix, "{t:", &digest, "}:"].concat();
        let scope_key = [base.as_str(), &scope.map_index.to_string()].concat();
        TaskKeys {
            expiry: [scope_key.as_str(), ":x"].concat(),
            registry: [base.as_str(), "r"].concat(),
            scope: scope_key,
            base,
            digest,
        }
    }

    /// [`ReadKeys`] of a scope, from one digest.
    pub(super) fn task_read_keys(&self, scope: &TaskScope) -> ReadKeys {
        let digest = task_digest(scope);
        let index = scope.map_index.to_string();
        ReadKeys {
            scope: [&self.prefix, "{t:", &digest, "}:", &index].concat(),
            registry: [&self.prefix, "{t:", &digest, "}:r"].concat(),
            field: ["m", &index].concat(),
        }
    }

    pub(super) async fn task_write(
        &self,
        scope: &TaskScope,
        op: WriteOp,
        key: &str,
        encoded: &str,
        expires_at: Option<EpochMillis>,
        condition: &Condition,
    ) -> StoreResult<bool> {
        if op == WriteOp::Set {
            self.index_task(scope).await?;
        }
        let keys = self.task_keys(scope);
        let keys = vec![keys.scope, keys.expiry, keys.registry];
        let write = Write {
            op,
            key,
            encoded,
            expires_at,
        };
        let run_key = scope.run_key.map(|key| key.to_string()).unwrap_or_default();
        let identity = [
            scope.dag_id.as_str(),
            scope.run_id.as_str(),
            scope.task_id.as_str(),
            run_key.as_str(),
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
            if let Err(error) = self.schedule_sweep(&keys.digest, &keys.scope, next).await {
                // The write happened: a 503 now would make a client's retry with
                // If-None-Match: * fail (412) on its own write. The index only frees
                // memory sooner (an expired key is never served), and the scope's next
                // write or read of an expired key reclaims it anyway.
                metrics::counter!("airstate_sweep_schedule_failures_total").increment(1);
                tracing::warn!(%error, "write applied, but its scope is not in the sweep index");
            }
        }
        Ok(true)
    }

    /// Runs `task_write.lua`; `identity` (dag_id, run_id, task_id) is recorded when a
    /// write creates the task's registry. Returns the scope's earliest pending expiry when
    /// it needs the sweep index, else 0, after the fields left (-1: `condition` failed
    /// and nothing was written).
    pub(super) async fn run_task_write(
        &self,
        keys: Vec<String>,
        write: Write<'_>,
        map_index: &str,
        identity: [&str; 4],
        condition: &Condition,
    ) -> StoreResult<(i64, i64)> {
        let (if_match, if_none_match) = condition.to_args();
        // Only writes are published; a purge of expired keys is not a change anyone made.
        let channel = match keys.first() {
            Some(scope_key) if write.op != WriteOp::Purge => {
                self.announced(task_channel(scope_key))
            }
            _ => String::new(),
        };
        let args: Vec<Value> = vec![
            write.op.as_lua().into(),
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
            identity[3].into(),
        ];
        // A purge changes nothing a client was promised, so it never waits for replicas.
        let client = if write.op == WriteOp::Purge {
            self.redis.shared_client()
        } else {
            self.redis.write_client().await?
        };
        let script = &self.scripts.task_write;
        let reply: Vec<i64> = self
            .redis
            .eval("task_write", script, &client, &keys, &args)
            .await?;
        let fields = reply.first().copied().unwrap_or(0);
        // A refused condition wrote nothing: there is nothing to confirm.
        if fields >= 0 {
            self.redis.confirm(&client, &keys[0]).await?;
        }
        Ok((fields, reply.get(1).copied().unwrap_or(0)))
    }

    pub(super) async fn get_task(
        &self,
        scope: &TaskScope,
        key: &str,
    ) -> StoreResult<Option<StoredValue>> {
        let read = self.task_read_keys(scope);
        // One script, not the pipeline `list_task` sends: see `lua/task_read.lua`. Named
        // "hget" in metrics and traces, as the single HGET it replaced was.
        let keys = [read.scope, read.registry];
        let args = [Value::from(key), Value::from(read.field)];
        let client = self.redis.shared_client();
        let raw: Option<String> = self
            .redis
            .eval("hget", &self.scripts.task_read, &client, &keys, &args)
            .await?;
        let Some(value) = raw.map(decode).transpose()? else {
            return Ok(None);
        };
        if value.is_expired(now_millis()) {
            // Reclaim now rather than wait for the next write; the reply does not wait.
            let store = self.share();
            let keys = self.task_keys(scope);
            let keys = vec![keys.scope, keys.expiry, keys.registry];
            let map_index = scope.map_index.to_string();
            tokio::spawn(async move {
                if let Err(error) = store
                    .run_task_write(keys, PURGE, &map_index, ["", "", "", ""], &Condition::NONE)
                    .await
                {
                    tracing::debug!(%error, "lazy purge of expired task state failed");
                }
            });
            return Ok(None);
        }
        Ok(Some(value))
    }

    pub(super) async fn get_task_many(
        &self,
        scope: &TaskScope,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let read = self.task_read_keys(scope);
        let now = now_millis();
        // Expired keys read as missing (they still count towards `max_bytes`);
        // reclaiming them is left to the next write or single-key read, so a bulk read
        // stays one call. The script checks the scope's generation itself.
        let registry = Some((read.registry.as_str(), read.field.as_str()));
        Ok(self
            .read_many(&read.scope, registry, keys, max_bytes)
            .await?
            .into_iter()
            .map(|value| value.filter(|value| !value.is_expired(now)))
            .collect())
    }

    pub(super) async fn put_task_if(
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
            .task_write(scope, WriteOp::Set, key, &encoded, expires_at, condition)
            .await?;
        Ok(written(applied, Some(version)))
    }

    pub(super) async fn delete_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let applied = self
            .task_write(scope, WriteOp::Delete, key, "", None, condition)
            .await?;
        Ok(written(applied, None))
    }

    pub(super) async fn clear_task(
        &self,
        scope: &TaskScope,
        all_map_indices: bool,
    ) -> StoreResult<()> {
        let keys = self.task_keys(scope);
        let script = &self.scripts.task_clear;
        // The script publishes the clear to change streams, atomically with it.
        let channel = self.announced(task_channel(&keys.scope));
        let client = self.redis.write_client().await?;
        let one_step = match (all_map_indices, self.clear_all) {
            (false, _) => Some(vec![
                "one".into(),
                keys.base.as_str().into(),
                scope.map_index.into(),
                channel.as_str().into(),
            ]),
            (true, ClearAll::Unlink) => Some(vec![
                "unlink".into(),
                keys.base.as_str().into(),
                channel.as_str().into(),
            ]),
            (true, ClearAll::Generation) => None,
        };
        if let Some(args) = one_step {
            let args: Vec<Value> = args;
            let declared = vec![keys.registry, keys.scope, keys.expiry];
            let _: i64 = self
                .redis
                .eval("task_clear", script, &client, &declared, &args)
                .await?;
            return self.redis.confirm(&client, &declared[0]).await;
        }
        // "all" only raises the task's generation: O(1), one declared key, and no race
        // with writers adding map indices (`lua/task_clear.lua`).
        let args: Vec<Value> = vec!["all".into(), channel.as_str().into()];
        let declared = vec![keys.registry];
        let generation: i64 = self
            .redis
            .eval("task_clear", script, &client, &declared, &args)
            .await?;
        // Listed before the wait for replicas: a clear that is applied but not confirmed
        // (503) still gets its stale scopes reclaimed if the client never retries.
        if generation > 0 {
            if let Err(error) = self
                .schedule_reclaim(&keys.digest, &declared[0], generation)
                .await
            {
                // The clear happened: every stale scope already reads as empty, and a
                // write to one reclaims it. A 503 now would only make the client clear
                // again; the index just frees the memory of the rest sooner.
                metrics::counter!("airstate_reclaim_schedule_failures_total").increment(1);
                tracing::warn!(%error, "clear-all applied, but its task is not in the reclaim index");
            }
        }
        self.redis.confirm(&client, &declared[0]).await
    }

    pub(super) async fn list_task(&self, scope: &TaskScope) -> StoreResult<Vec<Entry>> {
        let read = self.task_read_keys(scope);
        // As in `get_task`: the registry first, then the scope, in one pipeline.
        let (marks, raw): (
            Vec<Option<String>>,
            std::collections::HashMap<String, String>,
        ) = self
            .redis
            .call("hgetall", |pool| {
                let pipeline = pool.next().pipeline();
                let read = &read;
                async move {
                    let _: () = pipeline
                        .hmget(read.registry.as_str(), vec!["g", read.field.as_str()])
                        .await?;
                    let _: () = pipeline.hgetall(read.scope.as_str()).await?;
                    pipeline.all().await
                }
            })
            .await?;
        if stale_marks(&marks) {
            return Ok(Vec::new());
        }
        let raw = pairs(raw);
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

    pub(super) async fn import_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        let encoded = encode(json, updated_at, &new_version(), expires_at);
        self.task_write(
            scope,
            WriteOp::Set,
            key,
            &encoded,
            expires_at,
            &Condition::NONE,
        )
        .await
        .map(drop)
    }
}

/// [`is_stale`] of an `HMGET registry g m<map_index>` reply: `list_task`'s pipeline (a
/// single-key read checks the same in `lua/task_read.lua`).
///
/// Why a read that way is linearizable although the registry and the scope are read by
/// two commands (pipelined on one connection, so in this order, and on the one node that
/// holds the task's slot): the registry is read first, at t1, and the scope at t2.
/// - Stale at t1: the scope was empty at t1 (a clear-all had made it so), which is what
///   the read answers.
/// - Not stale at t1, and no clear-all between t1 and t2: the scope read at t2 is the
///   current one then.
/// - Not stale at t1, a clear-all at tc between them: a stale generation's data is never
///   written again, because every write after the clear unlinks the stale scope first
///   (`lua/task_write.lua`). So at t2 the scope holds either what it held just before tc
///   (current then, a moment within [t1, t2]), or only what was written after tc (current
///   at t2), or nothing.
///
/// A registry is deleted, and its generation starts over at 0, only once no scope holds
/// data, stale or not, so a generation seen at t1 can never make old data look current.
fn stale_marks(marks: &[Option<String>]) -> bool {
    is_stale(
        marks.first().and_then(Option::as_deref),
        marks.get(1).and_then(Option::as_deref),
    )
}

#[cfg(test)]
mod tests {
    use super::is_stale;

    #[test]
    fn a_scope_is_stale_only_when_written_before_the_current_generation() {
        // Written in generation 0 (before generations existed, too: "1").
        assert!(!is_stale(None, Some("1")));
        assert!(is_stale(Some("1"), Some("1")));
        assert!(!is_stale(Some("1"), Some("2")));
        assert!(is_stale(Some("5"), Some("3")));
        // No field: an empty scope, or one no registry lists; never hidden.
        assert!(!is_stale(Some("3"), None));
        assert!(!is_stale(None, None));
    }
}
