//! Moving state in and out: `airstate export` (Redis -> JSON lines), `airstate import`
//! (JSON lines -> Redis) and `airstate import --from-metastore` (Airflow's
//! `task_state_store` / `asset_state_store` tables -> Redis).
//!
//! One line per key:
//!
//! ```text
//! {"kind":"task","dag_id":"d","run_id":"r","task_id":"t","map_index":-1,"key":"k","value":<JSON>,"updated_at":"2026-05-01T00:00:00.000Z","expires_at":null}
//! {"kind":"asset","asset":"42","key":"k","value":<JSON>,"updated_at":"...","last_updated_by":{"kind":"api"}}
//! ```
//!
//! `value` is the stored JSON text, spliced in untouched. `asset` is the store's asset key:
//! Airflow's integer asset id with the metastore identity. Every write goes through the
//! store's own operations, so the registry, expiry index and change streams stay right;
//! versions (ETags) are minted afresh.

pub mod metastore;

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::redis::{ExportScope, RedisStore, ScopeRef};
use crate::store::rules::{check_key, check_task_identity, check_value_text};
use crate::store::{now_millis, AssetKey, Entry, EpochMillis, StateStore, StoreError, TaskScope};
use crate::store::{StoredValue, Writer};

/// Keys written at once by an import: enough to hide the round trip, few enough not to
/// crowd out a live gateway on the same Redis.
const IMPORT_CONCURRENCY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line that cannot be imported; nothing has been written when this is returned.
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("metastore: {0}")]
    Metastore(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Task,
    Asset,
}

/// One line of the format. A flat struct, not a tagged enum: serde's tagged enums buffer
/// their content, which a `RawValue` (the value's exact text) cannot pass through.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dag_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_index: Option<i64>,
    /// Tasks only: the run's `dag_run.id`, when the state was written with the metastore
    /// identity (it is part of the state's key there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dag_run_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset: Option<String>,
    pub key: String,
    pub value: Box<RawValue>,
    pub updated_at: String,
    /// Tasks only; `null` = never expires.
    #[serde(default, skip_serializing_if = "skip_expires")]
    pub expires_at: Option<Option<String>>,
    /// Assets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_by: Option<Option<Writer>>,
}

fn skip_expires(value: &Option<Option<String>>) -> bool {
    value.is_none()
}

pub fn rfc3339(at: EpochMillis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn parse_time(text: &str) -> Result<EpochMillis, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time with an offset: {e}"))
}

/// What one record writes, validated.
#[derive(Debug, PartialEq)]
pub enum Item {
    Task {
        scope: TaskScope,
        key: String,
        json: String,
        updated_at: EpochMillis,
        expires_at: Option<EpochMillis>,
    },
    Asset {
        asset: AssetKey,
        key: String,
        json: String,
        updated_at: EpochMillis,
        writer: Option<Writer>,
    },
}

impl Item {
    /// Checks a record as strictly as the Execution API checks a request.
    pub fn from_record(record: Record) -> Result<Item, String> {
        check_key(&record.key).map_err(|problem| format!("key: {problem}"))?;
        let json = record.value.get().to_owned();
        check_value_text(&json).map_err(|message| format!("value: {message}"))?;
        let updated_at = parse_time(&record.updated_at)?;
        match record.kind {
            Kind::Task => {
                let need = |field: Option<String>, name: &str| {
                    field.ok_or_else(|| format!("a task record needs {name}"))
                };
                if record.asset.is_some() || record.last_updated_by.is_some() {
                    return Err("a task record has no asset or last_updated_by".into());
                }
                let scope = TaskScope {
                    dag_id: need(record.dag_id, "dag_id")?,
                    run_id: need(record.run_id, "run_id")?,
                    task_id: need(record.task_id, "task_id")?,
                    map_index: record
                        .map_index
                        .ok_or("a task record needs a map_index of -1 or more")?,
                    run_key: record.dag_run_id,
                };
                // The rule the API applies to a token's claims: what one accepts, the
                // other does.
                check_task_identity(
                    &scope.dag_id,
                    &scope.run_id,
                    &scope.task_id,
                    scope.map_index,
                )
                .map_err(|problem| format!("a task record: {problem}"))?;
                let expires_at = record.expires_at.flatten().as_deref().map(parse_time);
                Ok(Item::Task {
                    scope,
                    key: record.key,
                    json,
                    updated_at,
                    expires_at: expires_at.transpose()?,
                })
            }
            Kind::Asset => {
                if record.dag_id.is_some()
                    || record.run_id.is_some()
                    || record.dag_run_id.is_some()
                    || record.task_id.is_some()
                    || record.map_index.is_some()
                    || record.expires_at.is_some()
                {
                    return Err("an asset record has no task fields or expires_at".into());
                }
                let asset = record
                    .asset
                    .filter(|id| !id.is_empty() && !id.contains(['{', '}']))
                    .ok_or("an asset record needs an asset (without { or })")?;
                Ok(Item::Asset {
                    asset: AssetKey(asset),
                    key: record.key,
                    json,
                    updated_at,
                    writer: record.last_updated_by.flatten(),
                })
            }
        }
    }

    fn expires_at(&self) -> Option<EpochMillis> {
        match self {
            Item::Task { expires_at, .. } => *expires_at,
            Item::Asset { .. } => None,
        }
    }

    /// The line `airstate export` writes for this item once it is stored, which an import
    /// reads back as the same item (the fuzz target `import` checks that). The version the
    /// write mints is not exported, so none is made here.
    pub fn export_line(&self) -> String {
        let entry =
            |key: &str, json: &str, updated_at, expires_at, writer: Option<&Writer>| Entry {
                key: key.to_owned(),
                value: StoredValue {
                    json: json.to_owned(),
                    updated_at,
                    expires_at,
                    version: String::new(),
                },
                writer: writer.cloned(),
            };
        match self {
            Item::Task {
                scope,
                key,
                json,
                updated_at,
                expires_at,
            } => task_line(scope, &entry(key, json, *updated_at, *expires_at, None)),
            Item::Asset {
                asset,
                key,
                json,
                updated_at,
                writer,
            } => asset_line(asset, &entry(key, json, *updated_at, None, writer.as_ref())),
        }
    }

    async fn write(&self, store: &dyn StateStore) -> Result<(), StoreError> {
        match self {
            Item::Task {
                scope,
                key,
                json,
                updated_at,
                expires_at,
            } => {
                store
                    .import_task(scope, key, json, *updated_at, *expires_at)
                    .await
            }
            Item::Asset {
                asset,
                key,
                json,
                updated_at,
                writer,
            } => {
                store
                    .import_asset(asset, key, json, *updated_at, writer.as_ref())
                    .await
            }
        }
    }
}

/// A progress line on stderr, only when stderr is a terminal, at most a few per second.
pub struct Progress {
    verb: &'static str,
    shown: Option<Instant>,
    enabled: bool,
}

impl Progress {
    pub fn new(verb: &'static str) -> Self {
        Self {
            verb,
            shown: None,
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn tick(&mut self, done: usize) {
        if !self.enabled
            || self
                .shown
                .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.shown = Some(Instant::now());
        eprint!("\r{} {done} keys", self.verb);
    }

    fn finish(&self) {
        if self.enabled && self.shown.is_some() {
            eprintln!();
        }
    }
}

/// What an export or import did, for the closing summary line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub task_keys: usize,
    pub task_scopes: usize,
    pub asset_keys: usize,
    pub assets: usize,
    /// Expired when read (never exported, never imported).
    pub expired: usize,
    /// Rows the metastore import could not use, or keys the metastore export could not
    /// write (see their warnings).
    pub invalid: usize,
    /// `export --to-metastore` only.
    pub unplaced: Option<Unplaced>,
}

/// Keys `export --to-metastore` leaves out because Airflow's tables have nothing to hang
/// them on (both tables have foreign keys).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// Task keys whose DAG run no longer exists in `dag_run`.
    pub no_dag_run: usize,
    /// Asset keys that are no Airflow asset id (claims-mode keys), or whose `asset` row is gone.
    pub no_asset: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} task keys in {} task scopes, {} asset keys in {} assets; {} expired skipped, {} invalid skipped",
            self.task_keys, self.task_scopes, self.asset_keys, self.assets, self.expired, self.invalid
        )?;
        if let Some(unplaced) = &self.unplaced {
            write!(
                f,
                ", {} task keys without a dag_run skipped, {} asset keys without an Airflow asset skipped",
                unplaced.no_dag_run, unplaced.no_asset
            )?;
        }
        Ok(())
    }
}

pub(crate) fn task_line(scope: &TaskScope, entry: &Entry) -> String {
    let record = serde_json::json!({
        "kind": "task",
        "dag_id": scope.dag_id,
        "run_id": scope.run_id,
        "task_id": scope.task_id,
        "map_index": scope.map_index,
        "key": entry.key,
    });
    let mut record = record;
    if let Some(run_key) = scope.run_key {
        record["dag_run_id"] = run_key.into();
    }
    let tail = serde_json::json!({
        "updated_at": rfc3339(entry.value.updated_at),
        "expires_at": entry.value.expires_at.map(rfc3339),
    });
    splice(record, &entry.value, tail)
}

pub(crate) fn asset_line(asset: &AssetKey, entry: &Entry) -> String {
    let record = serde_json::json!({"kind": "asset", "asset": asset.0, "key": entry.key});
    let tail = serde_json::json!({
        "updated_at": rfc3339(entry.value.updated_at),
        "last_updated_by": entry.writer,
    });
    splice(record, &entry.value, tail)
}

/// `head` + `"value":<stored text>` + `tail`: the value's text goes out byte for byte.
fn splice(head: serde_json::Value, value: &StoredValue, tail: serde_json::Value) -> String {
    let head = head.to_string();
    let tail = tail.to_string();
    format!(
        "{},\"value\":{},{}",
        &head[..head.len() - 1],
        value.json,
        &tail[1..]
    )
}

/// `AIRSTATE_EXPORT_BATCH_BYTES`'s default: what [`export`] reads at once.
pub fn default_batch_bytes() -> usize {
    crate::config::export_batch_bytes_from_lookup(|_| None)
        .expect("the default of AIRSTATE_EXPORT_BATCH_BYTES parses")
}

/// A batch of a scope found in the store: some of its live keys, sorted by key. The
/// batches of one scope come one after another, in key order.
pub enum Found {
    Task(TaskScope, Vec<Entry>),
    Asset(AssetKey, Vec<Entry>),
}

/// Hands every non-empty task scope and asset of `store` to `visit`, in batches of at
/// most about `batch_bytes` of values: scopes in the order of their Redis key names,
/// keys sorted within a scope. Only the key names (of the scopes, and of the scope being
/// read) and one batch of entries are held in memory. Expired keys are never listed.
pub async fn walk(
    store: &RedisStore,
    batch_bytes: usize,
    mut visit: impl AsyncFnMut(Found) -> Result<(), MigrateError>,
) -> Result<(), MigrateError> {
    let mut names = Vec::new();
    let mut scan = std::pin::pin!(store.scan_scopes());
    while let Some(name) = scan.next().await {
        names.push(name?);
    }
    names.sort_unstable();
    names.dedup();
    for name in names {
        let scopes = match store.scope_of_key(&name).await? {
            None => continue,
            Some(ScopeRef::Task(scopes)) => scopes.into_iter().map(ExportScope::Task).collect(),
            Some(ScopeRef::Asset(asset)) => vec![ExportScope::Asset(asset)],
        };
        for scope in scopes {
            let keys = store.export_names(&scope).await?;
            let mut rest = keys.as_slice();
            while !rest.is_empty() {
                let (read, entries) = store.export_batch(&scope, rest, batch_bytes).await?;
                rest = &rest[read..];
                if entries.is_empty() {
                    continue;
                }
                visit(match &scope {
                    ExportScope::Task(scope) => Found::Task(scope.clone(), entries),
                    ExportScope::Asset(asset) => Found::Asset(asset.clone(), entries),
                })
                .await?;
            }
        }
    }
    Ok(())
}

/// Writes every task scope and asset of `store` as JSON lines, in [`walk`]'s order (so two
/// exports of the same data are byte-identical). Values stream: each batch of a scope is
/// written as it is read.
pub async fn export(store: &RedisStore, out: &mut dyn Write) -> Result<Summary, MigrateError> {
    export_in_batches(store, out, default_batch_bytes()).await
}

/// [`export`] reading at most about `batch_bytes` of values from Redis at once (a single
/// larger value is read alone), so its memory is bounded by a batch, not by a scope.
pub async fn export_in_batches(
    store: &RedisStore,
    out: &mut dyn Write,
    batch_bytes: usize,
) -> Result<Summary, MigrateError> {
    let mut summary = Summary::default();
    let mut progress = Progress::new("exported");
    // The batches of one scope are consecutive: a scope is counted at its first.
    let mut last_task: Option<TaskScope> = None;
    let mut last_asset: Option<AssetKey> = None;
    walk(store, batch_bytes, async |found| {
        match found {
            Found::Task(scope, entries) => {
                if last_task.as_ref() != Some(&scope) {
                    summary.task_scopes += 1;
                }
                for entry in &entries {
                    writeln!(out, "{}", task_line(&scope, entry))?;
                    summary.task_keys += 1;
                }
                last_task = Some(scope);
            }
            Found::Asset(asset, entries) => {
                if last_asset.as_ref() != Some(&asset) {
                    summary.assets += 1;
                }
                for entry in &entries {
                    writeln!(out, "{}", asset_line(&asset, entry))?;
                    summary.asset_keys += 1;
                }
                last_asset = Some(asset);
            }
        }
        progress.tick(summary.task_keys + summary.asset_keys);
        Ok(())
    })
    .await?;
    out.flush()?;
    progress.finish();
    Ok(summary)
}

/// Reads JSON lines and writes them to `store`. Every line is checked before the first
/// write, so a bad file changes nothing. Importing the same file twice leaves the same
/// state (each key is an upsert). Keys already expired are skipped.
///
/// Memory is bounded by a batch of lines, not by the file: the first pass checks each line
/// and copies it to a temporary file (`$TMPDIR`), keeping only which line is the last of
/// each key; the second reads the copy again and writes batches of at most
/// `IMPORT_CONCURRENCY` lines and `IMPORT_BATCH_BYTES`.
pub async fn import(
    store: Arc<dyn StateStore>,
    input: &mut dyn BufRead,
) -> Result<Summary, MigrateError> {
    let checked = check_lines(input)?;
    let (summary, _) = write_checked(store, checked, None).await?;
    Ok(summary)
}

/// [`import`] for a gateway with the metastore identity, which keys task state by the
/// run's `dag_run.id`: task lines without `dag_run_id` (exported by an airstate that did
/// not key state by it, or under the claims identity) get the id of their run from
/// `dag_run`, and lines of runs Airflow no longer has are skipped and counted. Once
/// written under the run id, the copies still keyed without it are cleared, so
/// `airstate export | airstate import` moves old state in place.
pub async fn import_with_run_ids(
    store: Arc<dyn StateStore>,
    input: &mut dyn BufRead,
    postgres_url: &str,
) -> Result<Summary, MigrateError> {
    let checked = check_lines(input)?;
    let wanted: Vec<(String, String)> = checked.runs_without_id.iter().cloned().collect();
    let ids = metastore::run_ids(postgres_url, wanted).await?;
    let (mut summary, old_copies) = write_checked(store.clone(), checked, Some(&ids)).await?;
    let unplaced = summary.unplaced.get_or_insert_with(Unplaced::default);
    if unplaced.no_dag_run > 0 {
        eprintln!(
            "airstate: skipping {} task keys whose DAG run is no longer in dag_run",
            unplaced.no_dag_run
        );
    }
    for scope in old_copies {
        store.clear_task(&scope, false).await?;
    }
    Ok(summary)
}

/// Bytes of lines one import batch writes at once at most (besides `IMPORT_CONCURRENCY`
/// lines): with values of up to 1 MiB, 32 lines in flight and the copies each write makes
/// would not fit a 128 MiB pod.
const IMPORT_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The key an item writes, owned: the first pass remembers the last line of each.
type Target = (Option<TaskScope>, Option<AssetKey>, String);

/// What import's first pass learnt: every line is good, and which to write.
struct Checked {
    /// The non-blank lines, copied, to be read again.
    copy: std::fs::File,
    /// The number (among the copied lines) of the last live line naming each key.
    last: std::collections::HashMap<Target, usize>,
    expired: usize,
    /// Runs named by task lines without `dag_run_id`.
    runs_without_id: std::collections::HashSet<(String, String)>,
}

fn owned_target(item: &Item) -> Target {
    let (scope, asset, key) = target(item);
    (scope.cloned(), asset.cloned(), key.to_owned())
}

/// One line of the input, numbered from 1: `None` when blank or expired (counted).
fn check_line(
    number: usize,
    line: &str,
    now: EpochMillis,
    summary: &mut Summary,
) -> Result<Option<Item>, MigrateError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let item = parse_line(line).map_err(|message| MigrateError::Line {
        line: number,
        message,
    })?;
    if item.expires_at().is_some_and(|at| at <= now) {
        summary.expired += 1;
        return Ok(None);
    }
    Ok(Some(item))
}

fn check_lines(input: &mut dyn BufRead) -> Result<Checked, MigrateError> {
    use std::io::Seek;
    let now = now_millis();
    let mut summary = Summary::default();
    let mut copy = std::io::BufWriter::new(tempfile::tempfile()?);
    let mut last = std::collections::HashMap::new();
    let mut runs_without_id = std::collections::HashSet::new();
    let mut copied = 0;
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        copy.write_all(line.as_bytes())?;
        copy.write_all(b"\n")?;
        copied += 1;
        let Some(item) = check_line(index + 1, &line, now, &mut summary)? else {
            continue;
        };
        if let Item::Task { scope, .. } = &item {
            if scope.run_key.is_none() {
                runs_without_id.insert((scope.dag_id.clone(), scope.run_id.clone()));
            }
        }
        last.insert(owned_target(&item), copied - 1);
    }
    let live = copied - summary.expired;
    if live > last.len() {
        eprintln!(
            "airstate: {} lines name a key a later line names again; the last line of each key is imported",
            live - last.len()
        );
    }
    let mut copy = copy.into_inner().map_err(|e| e.into_error())?;
    copy.rewind()?;
    Ok(Checked {
        copy,
        last,
        expired: summary.expired,
        runs_without_id,
    })
}

/// Import's second pass: the lines [`check_lines`] chose, written in bounded batches,
/// task lines without a run id given theirs from `run_ids` when it is there (and skipped
/// when their run is not in it). Returns the summary and, with `run_ids`, the scopes
/// still keyed without a run id whose keys were written under one.
async fn write_checked(
    store: Arc<dyn StateStore>,
    checked: Checked,
    run_ids: Option<&std::collections::HashMap<(String, String), i64>>,
) -> Result<(Summary, std::collections::HashSet<TaskScope>), MigrateError> {
    let mut summary = Summary {
        expired: checked.expired,
        ..Summary::default()
    };
    let mut unplaced = Unplaced::default();
    let mut tasks = std::collections::HashSet::new();
    let mut assets = std::collections::HashSet::new();
    let mut old_copies = std::collections::HashSet::new();
    let mut progress = Progress::new("imported");
    let mut batch: Vec<Item> = Vec::with_capacity(IMPORT_CONCURRENCY);
    let mut batch_bytes = 0;
    let mut done = 0;
    let now = now_millis();
    let mut ignored = Summary::default();
    for (index, line) in std::io::BufReader::new(checked.copy).lines().enumerate() {
        let line = line?;
        // Checked by the first pass: only an expiry passed since could set it aside now,
        // and such a line is not in `last` anyway.
        let Some(mut item) = check_line(index + 1, &line, now, &mut ignored)? else {
            continue;
        };
        if checked.last.get(&owned_target(&item)) != Some(&index) {
            continue;
        }
        match &mut item {
            Item::Task { scope, .. } => {
                if let (Some(ids), None) = (run_ids, scope.run_key) {
                    let Some(id) = ids.get(&(scope.dag_id.clone(), scope.run_id.clone())) else {
                        unplaced.no_dag_run += 1;
                        continue;
                    };
                    old_copies.insert(scope.clone());
                    scope.run_key = Some(*id);
                }
                tasks.insert(scope.clone());
                summary.task_keys += 1;
            }
            Item::Asset { asset, .. } => {
                assets.insert(asset.clone());
                summary.asset_keys += 1;
            }
        }
        batch_bytes += line.len();
        batch.push(item);
        if batch.len() >= IMPORT_CONCURRENCY || batch_bytes >= IMPORT_BATCH_BYTES {
            done += write_batch(store.as_ref(), &mut batch).await?;
            batch_bytes = 0;
            progress.tick(done);
        }
    }
    done += write_batch(store.as_ref(), &mut batch).await?;
    progress.tick(done);
    progress.finish();
    summary.task_scopes = tasks.len();
    summary.assets = assets.len();
    if run_ids.is_some() {
        summary.unplaced = Some(unplaced);
    }
    Ok((summary, old_copies))
}

/// Writes `batch` concurrently and empties it; returns how many were written.
async fn write_batch(store: &dyn StateStore, batch: &mut Vec<Item>) -> Result<usize, MigrateError> {
    futures_util::future::try_join_all(batch.iter().map(|item| item.write(store))).await?;
    let written = batch.len();
    batch.clear();
    Ok(written)
}

/// The key an item writes: two lines for the same key are the same write.
fn target(item: &Item) -> (Option<&TaskScope>, Option<&AssetKey>, &str) {
    match item {
        Item::Task { scope, key, .. } => (Some(scope), None, key),
        Item::Asset { asset, key, .. } => (None, Some(asset), key),
    }
}

/// Lines naming a key an earlier line named replace it: the last line of a key wins, as
/// if the file were applied in order (writes run concurrently, so both cannot be sent).
fn last_of_each_key(items: Vec<Item>) -> (Vec<Item>, usize) {
    let mut last = std::collections::HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let (scope, asset, key) = target(item);
        last.insert((scope.cloned(), asset.cloned(), key.to_owned()), index);
    }
    let replaced = items.len() - last.len();
    let kept = items
        .into_iter()
        .enumerate()
        .filter(|(index, item)| {
            let (scope, asset, key) = target(item);
            last.get(&(scope.cloned(), asset.cloned(), key.to_owned())) == Some(index)
        })
        .map(|(_, item)| item)
        .collect();
    (kept, replaced)
}

/// One line of the format, parsed and checked (what `airstate import` does to each line).
pub fn parse_line(line: &str) -> Result<Item, String> {
    let record: Record = serde_json::from_str(line).map_err(|e| e.to_string())?;
    Item::from_record(record)
}

/// Every line parsed and checked, in memory; nothing is written (the fuzz target's view of
/// what [`import`] accepts, which checks each line the same way).
pub(crate) fn read_items(input: &mut dyn BufRead) -> Result<(Vec<Item>, Summary), MigrateError> {
    let mut items = Vec::new();
    let mut summary = Summary::default();
    let now = now_millis();
    for (index, line) in input.lines().enumerate() {
        if let Some(item) = check_line(index + 1, &line?, now, &mut summary)? {
            items.push(item);
        }
    }
    let (items, _) = last_of_each_key(items);
    Ok((items, summary))
}

/// Writes validated items, counting scopes and keys.
pub async fn write_all(
    store: Arc<dyn StateStore>,
    items: Vec<Item>,
    mut summary: Summary,
) -> Result<Summary, MigrateError> {
    let mut tasks = std::collections::HashSet::new();
    let mut assets = std::collections::HashSet::new();
    for item in &items {
        match item {
            Item::Task { scope, .. } => {
                tasks.insert(scope.clone());
                summary.task_keys += 1;
            }
            Item::Asset { asset, .. } => {
                assets.insert(asset.clone());
                summary.asset_keys += 1;
            }
        }
    }
    summary.task_scopes = tasks.len();
    summary.assets = assets.len();
    let mut progress = Progress::new("imported");
    let mut written = futures_util::stream::iter(items.iter())
        .map(|item| item.write(store.as_ref()))
        .buffer_unordered(IMPORT_CONCURRENCY);
    let mut done = 0;
    while let Some(result) = written.next().await {
        result?;
        done += 1;
        progress.tick(done);
    }
    progress.finish();
    Ok(summary)
}
