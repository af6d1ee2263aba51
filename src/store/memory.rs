//! The embedded default: state in process memory, gone on restart.
//!
//! It lets `airstate serve` run with nothing installed. It is one replica's memory, so
//! it breaks the stateless-replica design on purpose; the start-up log says so.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    now_millis, AssetKey, EpochMillis, StateStore, StoreResult, StoredValue, TaskScope, Writer,
};

type Fields = HashMap<String, StoredValue>;
type AssetFields = HashMap<String, (StoredValue, Writer)>;

/// (dag_id, run_id, task_id): the unit that clear-all wipes.
type TaskKey = (String, String, String);

#[derive(Default)]
pub struct MemoryStore {
    tasks: Mutex<HashMap<TaskKey, HashMap<i64, Fields>>>,
    assets: Mutex<HashMap<AssetKey, AssetFields>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn task_key(scope: &TaskScope) -> TaskKey {
    (
        scope.dag_id.clone(),
        scope.run_id.clone(),
        scope.task_id.clone(),
    )
}

fn fresh(json: &str, expires_at: Option<EpochMillis>) -> StoredValue {
    StoredValue {
        json: json.to_owned(),
        updated_at: now_millis(),
        expires_at,
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn get_task(&self, scope: &TaskScope, key: &str) -> StoreResult<Option<StoredValue>> {
        let mut tasks = self.tasks.lock().unwrap();
        let Some(fields) = tasks
            .get_mut(&task_key(scope))
            .and_then(|indices| indices.get_mut(&scope.map_index))
        else {
            return Ok(None);
        };
        match fields.get(key) {
            Some(value) if value.is_expired(now_millis()) => {
                // Reclaim on sight, as the Redis backend does.
                fields.remove(key);
                Ok(None)
            }
            other => Ok(other.cloned()),
        }
    }

    async fn put_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        let mut tasks = self.tasks.lock().unwrap();
        let now = now_millis();
        let fields = tasks
            .entry(task_key(scope))
            .or_default()
            .entry(scope.map_index)
            .or_default();
        fields.retain(|_, value| !value.is_expired(now));
        fields.insert(key.to_owned(), fresh(json, expires_at));
        Ok(())
    }

    async fn delete_task(&self, scope: &TaskScope, key: &str) -> StoreResult<()> {
        let mut tasks = self.tasks.lock().unwrap();
        if let Some(fields) = tasks
            .get_mut(&task_key(scope))
            .and_then(|indices| indices.get_mut(&scope.map_index))
        {
            fields.remove(key);
        }
        Ok(())
    }

    async fn clear_task(&self, scope: &TaskScope, all_map_indices: bool) -> StoreResult<()> {
        let mut tasks = self.tasks.lock().unwrap();
        let key = task_key(scope);
        if all_map_indices {
            tasks.remove(&key);
        } else if let Some(indices) = tasks.get_mut(&key) {
            indices.remove(&scope.map_index);
            if indices.is_empty() {
                tasks.remove(&key);
            }
        }
        Ok(())
    }

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>> {
        let assets = self.assets.lock().unwrap();
        Ok(assets
            .get(asset)
            .and_then(|fields| fields.get(key))
            .map(|(value, _)| value.clone()))
    }

    async fn put_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
    ) -> StoreResult<()> {
        let mut assets = self.assets.lock().unwrap();
        assets
            .entry(asset.clone())
            .or_default()
            .insert(key.to_owned(), (fresh(json, None), writer.clone()));
        Ok(())
    }

    async fn delete_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<()> {
        let mut assets = self.assets.lock().unwrap();
        if let Some(fields) = assets.get_mut(asset) {
            fields.remove(key);
        }
        Ok(())
    }

    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        self.assets.lock().unwrap().remove(asset);
        Ok(())
    }

    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>> {
        let assets = self.assets.lock().unwrap();
        Ok(assets
            .get(asset)
            .and_then(|fields| fields.get(key))
            .map(|(_, writer)| writer.clone()))
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded in-memory store (state is lost on restart and not shared between replicas)"
            .to_owned()
    }
}
