//! Asset state: an asset's values and who wrote each, written by `asset_write.lua`.

use fred::prelude::*;

use super::super::version::new_version;
use super::super::{
    now_millis, AssetKey, Condition, Entry, EpochMillis, StoreError, StoreResult, StoredValue,
    Writer, Written,
};
use super::codec::{decode, encode, pairs};
use super::scripts::WriteOp;
use super::{written, RedisStore};

impl RedisStore {
    pub(super) fn asset_keys(&self, asset: &AssetKey) -> (String, String) {
        let tag = format!("{}{{a:{}}}", self.prefix, asset.0);
        (format!("{tag}:v"), format!("{tag}:w"))
    }

    /// Runs `asset_write.lua`; false when `condition` failed and nothing was written.
    pub(super) async fn asset_write(
        &self,
        op: WriteOp,
        key: &str,
        encoded: String,
        writer: String,
        asset: &AssetKey,
        condition: &Condition,
    ) -> StoreResult<bool> {
        if op == WriteOp::Set {
            self.index_asset(asset).await?;
        }
        let (values, writers) = self.asset_keys(asset);
        let (if_match, if_none_match) = condition.to_args();
        let args: Vec<Value> = vec![
            op.as_lua().into(),
            key.into(),
            encoded.into(),
            writer.into(),
            if_match.into(),
            if_none_match.into(),
            self.announced(self.asset_channel(asset)).into(),
        ];
        let keys = vec![values, writers];
        let client = self.redis.write_client().await?;
        let script = &self.scripts.asset_write;
        let applied: i64 = self
            .redis
            .eval("asset_write", script, &client, &keys, &args)
            .await?;
        if applied == 1 {
            self.redis.confirm(&client, &keys[0]).await?;
        }
        Ok(applied == 1)
    }

    pub(super) async fn get_asset(
        &self,
        asset: &AssetKey,
        key: &str,
    ) -> StoreResult<Option<StoredValue>> {
        let (values, _) = self.asset_keys(asset);
        let raw: Option<String> = self
            .redis
            .call("hget", |pool| pool.hget(values.as_str(), key))
            .await?;
        raw.map(decode).transpose()
    }

    pub(super) async fn get_asset_many(
        &self,
        asset: &AssetKey,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let (values, _) = self.asset_keys(asset);
        self.read_many(&values, None, keys, max_bytes).await
    }

    pub(super) async fn put_asset_if(
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
        let applied = self.asset_write(WriteOp::Set, key, encoded, writer, asset, condition);
        Ok(written(applied.await?, Some(version)))
    }

    pub(super) async fn delete_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let applied = self.asset_write(
            WriteOp::Delete,
            key,
            String::new(),
            String::new(),
            asset,
            condition,
        );
        Ok(written(applied.await?, None))
    }

    pub(super) async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        let (values, writers) = self.asset_keys(asset);
        // Both keys share the asset's hash tag, so the script is atomic on a Cluster too.
        let args: Vec<Value> = vec![self.announced(self.asset_channel(asset)).into()];
        let keys = vec![values, writers];
        let client = self.redis.write_client().await?;
        let script = &self.scripts.asset_clear;
        let _: i64 = self
            .redis
            .eval("asset_clear", script, &client, &keys, &args)
            .await?;
        self.redis.confirm(&client, &keys[0]).await
    }

    pub(super) async fn asset_writer(
        &self,
        asset: &AssetKey,
        key: &str,
    ) -> StoreResult<Option<Writer>> {
        let (_, writers) = self.asset_keys(asset);
        let raw: Option<String> = self
            .redis
            .call("hget", |pool| pool.hget(writers.as_str(), key))
            .await?;
        raw.map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Internal(format!("unreadable writer record: {e}")))
        })
        .transpose()
    }

    pub(super) async fn list_asset(&self, asset: &AssetKey) -> StoreResult<Vec<Entry>> {
        let (values, writers) = self.asset_keys(asset);
        let raw: Vec<(String, String)> = self
            .redis
            .call("hgetall", |pool| pool.hgetall(values.as_str()))
            .await
            .map(pairs)?;
        let mut recorded: std::collections::HashMap<String, String> = self
            .redis
            .call("hgetall", |pool| pool.hgetall(writers.as_str()))
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

    pub(super) async fn import_asset(
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
        self.asset_write(WriteOp::Set, key, encoded, writer, asset, &Condition::NONE)
            .await
            .map(drop)
    }
}
