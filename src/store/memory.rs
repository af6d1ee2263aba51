//! The embedded default: state in process memory, gone on restart.
//!
//! It lets `airstate serve` run with nothing installed. It is one replica's memory, so
//! it breaks the stateless-replica design on purpose; the start-up log says so.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use super::events::{BufferLimits, Change, Delivery, Event, EventHub, Watch};
use super::lifecycle::{asset_id, Oracle, PassError, PassLimits, Reclaimed};
use super::version::new_version;
use super::{
    now_millis, AssetKey, Condition, Entry, EpochMillis, StateStore, StoreError, StoreResult,
    StoredValue, TaskScope, Writer, Written,
};

type Fields = HashMap<String, StoredValue>;
type AssetFields = HashMap<String, (StoredValue, Option<Writer>)>;

/// (dag_id, run_id, task_id, dag_run.id): the unit that clear-all wipes.
type TaskKey = (String, String, String, Option<i64>);

pub struct MemoryStore {
    tasks: Mutex<HashMap<TaskKey, HashMap<i64, Fields>>>,
    assets: Mutex<HashMap<AssetKey, AssetFields>>,
    events: EventHub,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            tasks: Mutex::default(),
            assets: Mutex::default(),
            events: EventHub::new(BufferLimits::default()),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Each watcher buffers at most `limits` of change events.
    pub fn with_event_limits(self, limits: BufferLimits) -> Self {
        self.events.set_limits(limits);
        self
    }

    /// Delivers a change; called with the data's lock held, so events keep write order.
    fn publish(&self, channel: &str, map_index: Option<i64>, change: Change) {
        let event = Event { map_index, change };
        self.events.deliver(channel, Delivery::Event(event.into()));
    }
}

/// A bulk read's limit, checked before anything is copied; values count by their JSON
/// text (Redis adds its few bytes of bookkeeping per value).
fn within<'a>(values: impl Iterator<Item = &'a StoredValue>, max_bytes: usize) -> StoreResult<()> {
    let bytes: usize = values.map(|value| value.json.len()).sum();
    if bytes > max_bytes {
        return Err(StoreError::TooLarge {
            bytes: bytes as u64,
            limit: max_bytes as u64,
        });
    }
    Ok(())
}

fn task_channel(scope: &TaskScope) -> String {
    format!(
        "t:{}\0{}\0{}\0{:?}",
        scope.dag_id, scope.run_id, scope.task_id, scope.run_key
    )
}

fn asset_channel(asset: &AssetKey) -> String {
    format!("a:{}", asset.0)
}

fn task_key(scope: &TaskScope) -> TaskKey {
    (
        scope.dag_id.clone(),
        scope.run_id.clone(),
        scope.task_id.clone(),
        scope.run_key,
    )
}

fn fresh(json: &str, expires_at: Option<EpochMillis>) -> StoredValue {
    StoredValue {
        json: json.to_owned(),
        updated_at: now_millis(),
        expires_at,
        version: new_version(),
    }
}

/// The current version of a live value, for a [`Condition`].
fn live_version(value: Option<&StoredValue>, now: EpochMillis) -> Option<&str> {
    value
        .filter(|value| !value.is_expired(now))
        .map(|value| value.version.as_str())
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

    async fn get_task_many(
        &self,
        scope: &TaskScope,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let tasks = self.tasks.lock().unwrap();
        let fields = tasks
            .get(&task_key(scope))
            .and_then(|indices| indices.get(&scope.map_index));
        let found = |key: &String| fields.and_then(|fields| fields.get(key));
        within(keys.iter().filter_map(found), max_bytes)?;
        let now = now_millis();
        Ok(keys
            .iter()
            .map(|key| found(key).filter(|value| !value.is_expired(now)).cloned())
            .collect())
    }

    async fn put_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        expires_at: Option<EpochMillis>,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let mut tasks = self.tasks.lock().unwrap();
        let now = now_millis();
        let fields = tasks
            .entry(task_key(scope))
            .or_default()
            .entry(scope.map_index)
            .or_default();
        if !condition.allows(live_version(fields.get(key), now)) {
            return Ok(Written::PreconditionFailed);
        }
        fields.retain(|_, value| !value.is_expired(now));
        let value = fresh(json, expires_at);
        let version = value.version.clone();
        fields.insert(key.to_owned(), value);
        let change = Change::Set {
            key: key.to_owned(),
            json: json.to_owned(),
            version: version.clone(),
        };
        self.publish(&task_channel(scope), Some(scope.map_index), change);
        Ok(Written::Applied(Some(version)))
    }

    async fn delete_task_if(
        &self,
        scope: &TaskScope,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let mut tasks = self.tasks.lock().unwrap();
        let fields = tasks
            .get_mut(&task_key(scope))
            .and_then(|indices| indices.get_mut(&scope.map_index));
        let current = fields.as_ref().and_then(|fields| fields.get(key));
        if !condition.allows(live_version(current, now_millis())) {
            return Ok(Written::PreconditionFailed);
        }
        if let Some(fields) = fields {
            if fields.remove(key).is_some() {
                let change = Change::Delete {
                    key: key.to_owned(),
                };
                self.publish(&task_channel(scope), Some(scope.map_index), change);
            }
        }
        Ok(Written::Applied(None))
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
        let map_index = (!all_map_indices).then_some(scope.map_index);
        self.publish(&task_channel(scope), map_index, Change::Clear);
        Ok(())
    }

    async fn get_asset(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<StoredValue>> {
        let assets = self.assets.lock().unwrap();
        Ok(assets
            .get(asset)
            .and_then(|fields| fields.get(key))
            .map(|(value, _)| value.clone()))
    }

    async fn get_asset_many(
        &self,
        asset: &AssetKey,
        keys: &[String],
        max_bytes: usize,
    ) -> StoreResult<Vec<Option<StoredValue>>> {
        let assets = self.assets.lock().unwrap();
        let fields = assets.get(asset);
        let found = |key: &String| fields.and_then(|fields| fields.get(key)).map(|(v, _)| v);
        within(keys.iter().filter_map(found), max_bytes)?;
        Ok(keys.iter().map(|key| found(key).cloned()).collect())
    }

    async fn put_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        writer: &Writer,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let mut assets = self.assets.lock().unwrap();
        let fields = assets.entry(asset.clone()).or_default();
        let current = fields.get(key).map(|(value, _)| value);
        if !condition.allows(live_version(current, now_millis())) {
            return Ok(Written::PreconditionFailed);
        }
        let value = fresh(json, None);
        let version = value.version.clone();
        fields.insert(key.to_owned(), (value, Some(writer.clone())));
        let change = Change::Set {
            key: key.to_owned(),
            json: json.to_owned(),
            version: version.clone(),
        };
        self.publish(&asset_channel(asset), None, change);
        Ok(Written::Applied(Some(version)))
    }

    async fn delete_asset_if(
        &self,
        asset: &AssetKey,
        key: &str,
        condition: &Condition,
    ) -> StoreResult<Written> {
        let mut assets = self.assets.lock().unwrap();
        let fields = assets.get_mut(asset);
        let current = fields
            .as_ref()
            .and_then(|fields| fields.get(key))
            .map(|(value, _)| value);
        if !condition.allows(live_version(current, now_millis())) {
            return Ok(Written::PreconditionFailed);
        }
        if let Some(fields) = fields {
            if fields.remove(key).is_some() {
                let change = Change::Delete {
                    key: key.to_owned(),
                };
                self.publish(&asset_channel(asset), None, change);
            }
        }
        Ok(Written::Applied(None))
    }

    async fn clear_asset(&self, asset: &AssetKey) -> StoreResult<()> {
        let mut assets = self.assets.lock().unwrap();
        if assets.remove(asset).is_some() {
            self.publish(&asset_channel(asset), None, Change::Clear);
        }
        Ok(())
    }

    async fn watch_task(&self, scope: &TaskScope) -> StoreResult<Watch> {
        self.events
            .watch(task_channel(scope), Some(scope.map_index))
            .await
    }

    async fn watch_asset(&self, asset: &AssetKey) -> StoreResult<Watch> {
        self.events.watch(asset_channel(asset), None).await
    }

    fn close_watches(&self) {
        self.events.close();
    }

    async fn asset_writer(&self, asset: &AssetKey, key: &str) -> StoreResult<Option<Writer>> {
        let assets = self.assets.lock().unwrap();
        Ok(assets
            .get(asset)
            .and_then(|fields| fields.get(key))
            .and_then(|(_, writer)| writer.clone()))
    }

    async fn list_task(&self, scope: &TaskScope) -> StoreResult<Vec<Entry>> {
        let tasks = self.tasks.lock().unwrap();
        let now = now_millis();
        let mut entries: Vec<Entry> = tasks
            .get(&task_key(scope))
            .and_then(|indices| indices.get(&scope.map_index))
            .into_iter()
            .flatten()
            .filter(|(_, value)| !value.is_expired(now))
            .map(|(key, value)| Entry {
                key: key.clone(),
                value: value.clone(),
                writer: None,
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn list_asset(&self, asset: &AssetKey) -> StoreResult<Vec<Entry>> {
        let assets = self.assets.lock().unwrap();
        let mut entries: Vec<Entry> = assets
            .get(asset)
            .into_iter()
            .flatten()
            .map(|(key, (value, writer))| Entry {
                key: key.clone(),
                value: value.clone(),
                writer: writer.clone(),
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn import_task(
        &self,
        scope: &TaskScope,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    ) -> StoreResult<()> {
        self.put_task(scope, key, json, expires_at).await?;
        let mut tasks = self.tasks.lock().unwrap();
        if let Some(value) = tasks
            .get_mut(&task_key(scope))
            .and_then(|indices| indices.get_mut(&scope.map_index))
            .and_then(|fields| fields.get_mut(key))
        {
            value.updated_at = updated_at;
        }
        Ok(())
    }

    async fn import_asset(
        &self,
        asset: &AssetKey,
        key: &str,
        json: &str,
        updated_at: EpochMillis,
        writer: Option<&Writer>,
    ) -> StoreResult<()> {
        self.put_asset(asset, key, json, &Writer::Api).await?;
        let mut assets = self.assets.lock().unwrap();
        if let Some((value, recorded)) = assets.get_mut(asset).and_then(|f| f.get_mut(key)) {
            value.updated_at = updated_at;
            *recorded = writer.cloned();
        }
        Ok(())
    }

    /// One process: the lease is always this one's.
    async fn take_lease(&self, _holder: &str, _ttl: std::time::Duration) -> StoreResult<bool> {
        Ok(true)
    }

    /// The maps themselves are the index: every run and asset holding state is looked
    /// at in every pass, so a late write is caught by the next one and no mark is needed.
    async fn reconcile(
        &self,
        oracle: &dyn Oracle,
        limits: PassLimits,
    ) -> Result<Reclaimed, PassError> {
        let mut done = Reclaimed::default();
        let runs: BTreeSet<i64> = self
            .tasks
            .lock()
            .unwrap()
            .keys()
            .filter_map(|key| key.3)
            .collect();
        let runs: Vec<i64> = runs.into_iter().collect();
        for batch in runs.chunks(limits.batch.max(1)) {
            let alive = oracle
                .existing_runs(batch)
                .await
                .map_err(PassError::Metastore)?;
            done.runs_checked += batch.len() as u64;
            let gone: Vec<i64> = batch
                .iter()
                .copied()
                .filter(|id| !alive.contains(id))
                .collect();
            if gone.is_empty() {
                continue;
            }
            let mut tasks = self.tasks.lock().unwrap();
            let doomed: Vec<TaskKey> = tasks
                .keys()
                .filter(|key| key.3.is_some_and(|id| gone.contains(&id)))
                .cloned()
                .collect();
            for key in doomed {
                tasks.remove(&key);
                let channel = format!("t:{}\0{}\0{}\0{:?}", key.0, key.1, key.2, key.3);
                self.publish(&channel, None, Change::Clear);
            }
            done.runs += gone.len() as u64;
        }
        let assets: Vec<i64> = self
            .assets
            .lock()
            .unwrap()
            .keys()
            .filter_map(|asset| asset_id(&asset.0))
            .collect::<BTreeSet<i64>>()
            .into_iter()
            .collect();
        for batch in assets.chunks(limits.batch.max(1)) {
            let alive = oracle
                .active_assets(batch)
                .await
                .map_err(PassError::Metastore)?;
            done.assets_checked += batch.len() as u64;
            for id in batch.iter().filter(|id| !alive.contains(id)) {
                let asset = AssetKey(id.to_string());
                let mut assets = self.assets.lock().unwrap();
                if assets.remove(&asset).is_some() {
                    self.publish(&asset_channel(&asset), None, Change::Clear);
                    done.assets += 1;
                }
            }
        }
        Ok(done)
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded in-memory store (state is lost on restart and not shared between replicas)"
            .to_owned()
    }
}
