//! How `airstate export` reads one scope: its field names at once, then its values in
//! batches bounded by bytes (`export_batch.lua`), so the exporter's memory is bounded by
//! a batch whatever one scope holds. Never on a request path; the API's list is
//! `list_task` / `list_asset`.

use fred::prelude::*;

use super::super::{now_millis, AssetKey, Entry, StoreError, StoreResult, TaskScope};
use super::codec::decode;
use super::RedisStore;

/// Field names sent to one `export_batch.lua` call at most: a scope of many small values
/// still takes several calls, each a short one for a Redis that is serving requests.
const NAMES_PER_CALL: usize = 1000;

/// One scope `airstate export` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportScope {
    Task(TaskScope),
    Asset(AssetKey),
}

impl RedisStore {
    /// The hash holding `scope`'s values and, for an asset, the hash of its writers.
    fn export_hashes(&self, scope: &ExportScope) -> (String, Option<String>) {
        match scope {
            ExportScope::Task(scope) => (self.task_keys(scope).scope, None),
            ExportScope::Asset(asset) => {
                let (values, writers) = self.asset_keys(asset);
                (values, Some(writers))
            }
        }
    }

    /// Every key name of `scope`, sorted: names only (HKEYS reads no value).
    pub async fn export_names(&self, scope: &ExportScope) -> StoreResult<Vec<String>> {
        let (hash, _) = self.export_hashes(scope);
        let mut names: Vec<String> = self
            .redis
            .call("hkeys", |pool| pool.hkeys(hash.as_str()))
            .await?;
        names.sort_unstable();
        Ok(names)
    }

    /// The next keys of `scope` among `names`, in order, as many as fit `max_bytes` of
    /// stored values (at least one, whatever its size). Returns how many names were
    /// consumed and their live entries: keys deleted since `names` was read and expired
    /// task keys are left out.
    pub async fn export_batch(
        &self,
        scope: &ExportScope,
        names: &[String],
        max_bytes: usize,
    ) -> StoreResult<(usize, Vec<Entry>)> {
        let names = &names[..names.len().min(NAMES_PER_CALL)];
        if names.is_empty() {
            return Ok((0, Vec::new()));
        }
        let (hash, writers) = self.export_hashes(scope);
        let mut keys = vec![hash];
        keys.extend(writers);
        let mut args: Vec<Value> = Vec::with_capacity(names.len() + 1);
        args.push(i64::try_from(max_bytes).unwrap_or(i64::MAX).into());
        args.extend(names.iter().map(|name| Value::from(name.as_str())));
        let client = self.redis.shared_client();
        let reply: Vec<Value> = self
            .redis
            .eval(
                "export_batch",
                &self.scripts.export_batch,
                &client,
                &keys,
                &args,
            )
            .await?;
        let mut reply = reply.into_iter();
        let read = reply
            .next()
            .and_then(|n| n.as_i64())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=names.len()).contains(n))
            .ok_or_else(|| StoreError::Internal("export batch read no field".into()))?;
        let text = |value: Value| match value {
            Value::Null => Ok(None),
            value => value
                .into_string()
                .map(Some)
                .ok_or_else(|| StoreError::Internal("a value that is not UTF-8".into())),
        };
        let now = now_millis();
        let mut entries = Vec::with_capacity(read);
        for name in &names[..read] {
            let (Some(value), Some(writer)) = (reply.next(), reply.next()) else {
                return Err(StoreError::Internal(format!(
                    "export batch of {read} fields returned fewer"
                )));
            };
            let Some(value) = text(value)?.map(decode).transpose()? else {
                continue;
            };
            // Expired keys read as missing here too; the next write reclaims them.
            if matches!(scope, ExportScope::Task(_)) && value.is_expired(now) {
                continue;
            }
            let writer = text(writer)?
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|e| StoreError::Internal(format!("unreadable writer record: {e}")))?;
            entries.push(Entry {
                key: name.clone(),
                value,
                writer,
            });
        }
        Ok((read, entries))
    }
}
