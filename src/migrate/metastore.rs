//! `airstate import --from-metastore`: Airflow 3.3's own state tables, read once, so a
//! deployment that kept state in its metastore switches to airstate without losing it; and
//! `airstate export --to-metastore`, the same mapping in reverse, so a rollback to
//! Airflow's own backend loses nothing either.
//!
//! Asset rows are keyed by Airflow's integer asset id, which is the asset key the gateway
//! uses with the metastore identity (`AIRSTATE_IDENTITY=metastore`).
//!
//! Every statement runs as PostgreSQL's unnamed statement in one round trip
//! (`query_typed*`, `execute_typed`), and writes inside explicit transactions, so both
//! work through PgBouncer in transaction pooling mode.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use tokio_postgres::types::{ToSql, Type};

use super::{Found, Item, MigrateError, Progress, Summary, Unplaced};
use crate::identity::metastore::explain;
use crate::identity::tls::Connection;
use crate::store::redis::RedisStore;
use crate::store::rules::{check_key, check_value_text};
use crate::store::{now_millis, AssetKey, EpochMillis, StateStore, TaskScope, Writer};

// Times as epoch milliseconds, so no date type crosses the driver.
const TASK_ROWS: &str = "SELECT dag_id, run_id, task_id, map_index, key, value, \
     (extract(epoch FROM updated_at) * 1000)::bigint, \
     (extract(epoch FROM expires_at) * 1000)::bigint, dag_run_id \
     FROM task_state_store ORDER BY id";
const ASSET_ROWS: &str = "SELECT asset_id, key, value, \
     (extract(epoch FROM updated_at) * 1000)::bigint, \
     last_updated_by_kind, last_updated_by_dag_id, last_updated_by_run_id, \
     last_updated_by_task_id, last_updated_by_map_index \
     FROM asset_state_store ORDER BY asset_id, key";

/// Reads every row, checks it, then writes the usable ones. Expired task rows are skipped
/// (Airflow would never serve them either); rows whose value the Execution API would
/// refuse (Python's `NaN`/`Infinity` tokens, `null`) or whose key is too long are skipped
/// with a warning on stderr naming the row, and counted.
pub async fn import(
    store: Arc<dyn StateStore>,
    postgres_url: &str,
) -> Result<Summary, MigrateError> {
    let (client, connection) = connect(postgres_url).await?;
    let now = now_millis();
    let mut summary = Summary::default();
    let mut items = Vec::new();

    let rows = client
        .query_typed_raw(TASK_ROWS, no_params())
        .await
        .map_err(failed)?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row.map_err(failed)?;
        let scope = TaskScope {
            dag_id: row.get(0),
            run_id: row.get(1),
            task_id: row.get(2),
            map_index: row.get::<_, i32>(3).into(),
            run_key: Some(row.get::<_, i32>(8).into()),
        };
        let key: String = row.get(4);
        let json: String = row.get(5);
        let expires_at: Option<i64> = row.get(7);
        if expires_at.is_some_and(|at| at <= now) {
            summary.expired += 1;
            continue;
        }
        if let Some(problem) = unusable(&key, &json) {
            eprintln!(
                "airstate: skipping task_state_store row ({}, {}, {}, {}, {key:?}): {problem}",
                scope.dag_id, scope.run_id, scope.task_id, scope.map_index
            );
            summary.invalid += 1;
            continue;
        }
        items.push(Item::Task {
            scope,
            key,
            json,
            updated_at: row.get(6),
            expires_at,
        });
    }

    let rows = client
        .query_typed_raw(ASSET_ROWS, no_params())
        .await
        .map_err(failed)?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row.map_err(failed)?;
        let asset_id: i32 = row.get(0);
        let key: String = row.get(1);
        let json: String = row.get(2);
        if let Some(problem) = unusable(&key, &json) {
            eprintln!("airstate: skipping asset_state_store row ({asset_id}, {key:?}): {problem}");
            summary.invalid += 1;
            continue;
        }
        let kind: Option<String> = row.get(4);
        let writer = match kind.as_deref() {
            None => None,
            Some("watcher") => Some(Writer::Watcher),
            Some("api") => Some(Writer::Api),
            Some("task") => match (
                row.get::<_, Option<String>>(5),
                row.get::<_, Option<String>>(6),
                row.get::<_, Option<String>>(7),
                row.get::<_, Option<i32>>(8),
            ) {
                (Some(dag_id), Some(run_id), Some(task_id), Some(map_index)) => {
                    Some(Writer::Task {
                        dag_id,
                        run_id,
                        task_id,
                        map_index: map_index.into(),
                    })
                }
                // Airflow validates these together; a partial record tells nothing sure.
                _ => None,
            },
            Some(other) => {
                eprintln!(
                    "airstate: asset_state_store row ({asset_id}, {key:?}): unknown writer kind {other:?}; imported without a writer"
                );
                None
            }
        };
        items.push(Item::Asset {
            asset: AssetKey(asset_id.to_string()),
            key,
            json,
            updated_at: row.get(3),
            writer,
        });
    }
    drop(client);
    connection.abort();
    super::write_all(store, items, summary).await
}

const RUN_IDS_SQL: &str = "SELECT dr.id, dr.dag_id, dr.run_id FROM dag_run dr \
     JOIN unnest($1::varchar[], $2::varchar[]) AS v(dag_id, run_id) \
     ON dr.dag_id = v.dag_id AND dr.run_id = v.run_id";

/// The `dag_run.id` of each (dag_id, run_id) Airflow has; runs it lacks are left out.
pub async fn run_ids(
    postgres_url: &str,
    mut runs: Vec<(String, String)>,
) -> Result<HashMap<(String, String), i64>, MigrateError> {
    runs.sort_unstable();
    runs.dedup();
    let mut ids = HashMap::new();
    if runs.is_empty() {
        return Ok(ids);
    }
    let (client, _connection) = connect(postgres_url).await?;
    for chunk in runs.chunks(EXPORT_BATCH) {
        let (dags, run_ids): (Vec<&str>, Vec<&str>) = chunk
            .iter()
            .map(|(dag, run)| (dag.as_str(), run.as_str()))
            .unzip();
        let rows = client
            .query_typed(
                RUN_IDS_SQL,
                &[
                    (&dags, Type::VARCHAR_ARRAY),
                    (&run_ids, Type::VARCHAR_ARRAY),
                ],
            )
            .await
            .map_err(failed)?;
        for row in rows {
            ids.insert((row.get(1), row.get(2)), i64::from(row.get::<_, i32>(0)));
        }
    }
    Ok(ids)
}

fn failed(error: tokio_postgres::Error) -> MigrateError {
    MigrateError::Metastore(explain(&error))
}

/// One connection, as the gateway makes it (the URL's `sslmode`), driven by its own task.
async fn connect(
    postgres_url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), MigrateError> {
    let target = Connection::parse(postgres_url).map_err(MigrateError::Metastore)?;
    let tls = target.connector().map_err(MigrateError::Metastore)?;
    let (client, connection) = target.config.connect(tls).await.map_err(failed)?;
    // A broken connection shows in the statement that needed it.
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, connection))
}

/// Statements run with `query_typed_raw`: PostgreSQL's unnamed statement in one round
/// trip, never a named prepared statement that PgBouncer in transaction pooling mode could
/// send to another server connection than the one that prepared it.
fn no_params() -> std::iter::Empty<(&'static (dyn ToSql + Sync), Type)> {
    std::iter::empty()
}

fn unusable(key: &str, json: &str) -> Option<String> {
    if let Err(issue) = check_key(key) {
        return Some(format!("key: {issue}"));
    }
    check_value_text(json)
        .err()
        .map(|message| format!("value: {message}"))
}

/// Keys per transaction of `export --to-metastore` (`--batch-size`) by default.
pub const EXPORT_BATCH: usize = 500;

/// Airflow's `StringID` columns (`dag_id`, `run_id`, `task_id` and the writer's copies).
const ID_CHARS: usize = 250;

// The DAG runs of a batch, locked against deletion until the batch commits, so the rows
// written for them cannot meet a foreign-key error halfway.
const RUNS_SQL: &str = "SELECT dr.id, dr.dag_id, dr.run_id FROM dag_run dr \
     JOIN unnest($1::varchar[], $2::varchar[]) AS v(dag_id, run_id) \
     ON dr.dag_id = v.dag_id AND dr.run_id = v.run_id FOR KEY SHARE OF dr";
const ASSETS_SQL: &str = "SELECT id FROM asset WHERE id = ANY($1::int4[]) FOR KEY SHARE";
// One statement per batch: arrays, one per column, unnested into rows. Times travel as
// epoch milliseconds and are rebuilt exactly (no float seconds).
const UPSERT_TASKS: &str = "INSERT INTO task_state_store \
     (dag_run_id, dag_id, run_id, task_id, map_index, key, value, updated_at, expires_at) \
     SELECT v.dag_run_id, v.dag_id, v.run_id, v.task_id, v.map_index, v.key, v.value, \
     timestamptz 'epoch' + v.updated_at * interval '1 millisecond', \
     timestamptz 'epoch' + v.expires_at * interval '1 millisecond' \
     FROM unnest($1::int4[], $2::varchar[], $3::varchar[], $4::varchar[], $5::int4[], \
     $6::varchar[], $7::text[], $8::int8[], $9::int8[]) \
     AS v(dag_run_id, dag_id, run_id, task_id, map_index, key, value, updated_at, expires_at) \
     ON CONFLICT (dag_run_id, task_id, map_index, key) DO UPDATE SET \
     value = EXCLUDED.value, updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at";
// The writer columns follow the store too: no writer in Redis is NULL columns here.
const UPSERT_ASSETS: &str = "INSERT INTO asset_state_store \
     (asset_id, key, value, updated_at, last_updated_by_kind, last_updated_by_dag_id, \
     last_updated_by_run_id, last_updated_by_task_id, last_updated_by_map_index) \
     SELECT v.asset_id, v.key, v.value, \
     timestamptz 'epoch' + v.updated_at * interval '1 millisecond', \
     v.kind, v.dag_id, v.run_id, v.task_id, v.map_index \
     FROM unnest($1::int4[], $2::varchar[], $3::text[], $4::int8[], $5::varchar[], \
     $6::varchar[], $7::varchar[], $8::varchar[], $9::int4[]) \
     AS v(asset_id, key, value, updated_at, kind, dag_id, run_id, task_id, map_index) \
     ON CONFLICT (asset_id, key) DO UPDATE SET \
     value = EXCLUDED.value, updated_at = EXCLUDED.updated_at, \
     last_updated_by_kind = EXCLUDED.last_updated_by_kind, \
     last_updated_by_dag_id = EXCLUDED.last_updated_by_dag_id, \
     last_updated_by_run_id = EXCLUDED.last_updated_by_run_id, \
     last_updated_by_task_id = EXCLUDED.last_updated_by_task_id, \
     last_updated_by_map_index = EXCLUDED.last_updated_by_map_index";

struct TaskRow {
    dag_id: String,
    run_id: String,
    task_id: String,
    map_index: i32,
    /// The `dag_run.id` the state was keyed by, when known.
    run_key: Option<i64>,
    key: String,
    json: String,
    updated_at: EpochMillis,
    expires_at: Option<EpochMillis>,
}

struct AssetRow {
    asset_id: i32,
    key: String,
    json: String,
    updated_at: EpochMillis,
    writer: WriterColumns,
}

/// `last_updated_by_kind`, `_dag_id`, `_run_id`, `_task_id`, `_map_index`.
type WriterColumns = (
    Option<&'static str>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i32>,
);

/// Writes the store's state into `task_state_store` and `asset_state_store`: the rows
/// `import --from-metastore` reads, with the values' JSON text, `updated_at`, `expires_at`
/// and the asset writers as the store holds them. Upserts, `batch` keys per transaction
/// (each batch commits on its own; running the export again is harmless). Skipped, counted
/// and named on stderr: expired keys, task keys whose DAG run is no longer in `dag_run`,
/// asset keys that are not an existing Airflow asset id (claims-mode keys are asset names
/// or URIs), and keys that do not fit Airflow's columns.
pub async fn export(
    store: &RedisStore,
    postgres_url: &str,
    batch: usize,
) -> Result<Summary, MigrateError> {
    export_in_batches(store, postgres_url, batch, super::default_batch_bytes()).await
}

/// [`export`] reading at most about `batch_bytes` of values from Redis at once.
pub async fn export_in_batches(
    store: &RedisStore,
    postgres_url: &str,
    batch: usize,
    batch_bytes: usize,
) -> Result<Summary, MigrateError> {
    let (client, connection) = connect(postgres_url).await?;
    let mut out = Export {
        client,
        batch: batch.max(1),
        now: now_millis(),
        tasks: Vec::with_capacity(batch.clamp(1, 10_000)),
        assets: Vec::new(),
        summary: Summary::default(),
        unplaced: Unplaced::default(),
        task_scopes: HashSet::new(),
        asset_ids: HashSet::new(),
        warned: HashSet::new(),
        progress: Progress::new("exported"),
    };
    super::walk(store, batch_bytes, async |found| out.take(found).await).await?;
    out.flush_tasks().await?;
    out.flush_assets().await?;
    drop(out.client);
    connection.abort();
    out.progress.finish();
    let mut summary = out.summary;
    summary.task_scopes = out.task_scopes.len();
    summary.assets = out.asset_ids.len();
    summary.unplaced = Some(out.unplaced);
    Ok(summary)
}

struct Export {
    client: tokio_postgres::Client,
    batch: usize,
    now: EpochMillis,
    tasks: Vec<TaskRow>,
    assets: Vec<AssetRow>,
    summary: Summary,
    unplaced: Unplaced,
    /// Scopes and assets with a row written, for the summary.
    task_scopes: HashSet<(String, String, String, i32)>,
    asset_ids: HashSet<i32>,
    /// DAG runs already named in a warning.
    warned: HashSet<(String, String)>,
    progress: Progress,
}

impl Export {
    async fn take(&mut self, found: Found) -> Result<(), MigrateError> {
        match found {
            Found::Task(scope, entries) => {
                let map_index = i32::try_from(scope.map_index).ok();
                let too_long = [&scope.dag_id, &scope.run_id, &scope.task_id]
                    .iter()
                    .any(|id| id.chars().count() > ID_CHARS);
                let Some(map_index) = map_index.filter(|_| !too_long) else {
                    eprintln!(
                        "airstate: skipping {} keys of ({}, {}, {}, {}): ids of at most {ID_CHARS} characters and a 32-bit map index fit task_state_store",
                        entries.len(), scope.dag_id, scope.run_id, scope.task_id, scope.map_index
                    );
                    self.summary.invalid += entries.len();
                    return Ok(());
                };
                for entry in entries {
                    if entry.value.is_expired(self.now) {
                        self.summary.expired += 1;
                        continue;
                    }
                    self.tasks.push(TaskRow {
                        dag_id: scope.dag_id.clone(),
                        run_id: scope.run_id.clone(),
                        task_id: scope.task_id.clone(),
                        map_index,
                        run_key: scope.run_key,
                        key: entry.key,
                        json: entry.value.json,
                        updated_at: entry.value.updated_at,
                        expires_at: entry.value.expires_at,
                    });
                    if self.tasks.len() >= self.batch {
                        self.flush_tasks().await?;
                    }
                }
            }
            Found::Asset(asset, entries) => {
                let Ok(asset_id) = asset.0.parse::<i32>() else {
                    eprintln!(
                        "airstate: skipping {} keys of asset {:?}: not an Airflow asset id (state written with AIRSTATE_IDENTITY=claims is keyed by name or URI)",
                        entries.len(),
                        asset.0
                    );
                    self.unplaced.no_asset += entries.len();
                    return Ok(());
                };
                for entry in entries {
                    let Some(writer) = writer_columns(entry.writer.as_ref()) else {
                        eprintln!(
                            "airstate: skipping asset_state_store row ({asset_id}, {:?}): its writer does not fit the last_updated_by_* columns",
                            entry.key
                        );
                        self.summary.invalid += 1;
                        continue;
                    };
                    self.assets.push(AssetRow {
                        asset_id,
                        key: entry.key,
                        json: entry.value.json,
                        updated_at: entry.value.updated_at,
                        writer,
                    });
                    if self.assets.len() >= self.batch {
                        self.flush_assets().await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn flush_tasks(&mut self) -> Result<(), MigrateError> {
        if self.tasks.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.tasks);
        let transaction = self.client.transaction().await.map_err(failed)?;
        let mut runs: Vec<(&str, &str)> = rows
            .iter()
            .map(|row| (row.dag_id.as_str(), row.run_id.as_str()))
            .collect();
        runs.sort_unstable();
        runs.dedup();
        let (dags, run_ids): (Vec<&str>, Vec<&str>) = runs.into_iter().unzip();
        let found = transaction
            .query_typed(
                RUNS_SQL,
                &[
                    (&dags, Type::VARCHAR_ARRAY),
                    (&run_ids, Type::VARCHAR_ARRAY),
                ],
            )
            .await
            .map_err(failed)?;
        let ids: HashMap<(String, String), i32> = found
            .iter()
            .map(|row| ((row.get(1), row.get(2)), row.get(0)))
            .collect();

        let mut columns = TaskColumns::default();
        for row in rows {
            let run = (row.dag_id, row.run_id);
            // State of a run deleted and created again under its run_id belongs to no run.
            let current = ids
                .get(&run)
                .copied()
                .filter(|id| row.run_key.is_none_or(|key| key == i64::from(*id)));
            let Some(dag_run_id) = current else {
                self.unplaced.no_dag_run += 1;
                if self.warned.insert(run.clone()) {
                    eprintln!(
                        "airstate: skipping keys of DAG run ({}, {}): it is no longer in dag_run",
                        run.0, run.1
                    );
                }
                continue;
            };
            self.task_scopes.insert((
                run.0.clone(),
                run.1.clone(),
                row.task_id.clone(),
                row.map_index,
            ));
            columns.dag_run_id.push(dag_run_id);
            columns.dag_id.push(run.0);
            columns.run_id.push(run.1);
            columns.task_id.push(row.task_id);
            columns.map_index.push(row.map_index);
            columns.key.push(row.key);
            columns.value.push(row.json);
            columns.updated_at.push(row.updated_at);
            columns.expires_at.push(row.expires_at);
        }
        let written = columns.key.len();
        if written > 0 {
            transaction
                .execute_typed(
                    UPSERT_TASKS,
                    &[
                        (&columns.dag_run_id, Type::INT4_ARRAY),
                        (&columns.dag_id, Type::VARCHAR_ARRAY),
                        (&columns.run_id, Type::VARCHAR_ARRAY),
                        (&columns.task_id, Type::VARCHAR_ARRAY),
                        (&columns.map_index, Type::INT4_ARRAY),
                        (&columns.key, Type::VARCHAR_ARRAY),
                        (&columns.value, Type::TEXT_ARRAY),
                        (&columns.updated_at, Type::INT8_ARRAY),
                        (&columns.expires_at, Type::INT8_ARRAY),
                    ],
                )
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)?;
        self.summary.task_keys += written;
        self.progress
            .tick(self.summary.task_keys + self.summary.asset_keys);
        Ok(())
    }

    async fn flush_assets(&mut self) -> Result<(), MigrateError> {
        if self.assets.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.assets);
        let transaction = self.client.transaction().await.map_err(failed)?;
        let mut wanted: Vec<i32> = rows.iter().map(|row| row.asset_id).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let existing: HashSet<i32> = transaction
            .query_typed(ASSETS_SQL, &[(&wanted, Type::INT4_ARRAY)])
            .await
            .map_err(failed)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for id in wanted.iter().filter(|id| !existing.contains(id)) {
            eprintln!(
                "airstate: skipping keys of asset {id}: it is no longer in Airflow's asset table"
            );
        }

        let mut columns = AssetColumns::default();
        for row in rows {
            if !existing.contains(&row.asset_id) {
                self.unplaced.no_asset += 1;
                continue;
            }
            self.asset_ids.insert(row.asset_id);
            let (kind, dag_id, run_id, task_id, map_index) = row.writer;
            columns.asset_id.push(row.asset_id);
            columns.key.push(row.key);
            columns.value.push(row.json);
            columns.updated_at.push(row.updated_at);
            columns.kind.push(kind);
            columns.dag_id.push(dag_id);
            columns.run_id.push(run_id);
            columns.task_id.push(task_id);
            columns.map_index.push(map_index);
        }
        let written = columns.key.len();
        if written > 0 {
            transaction
                .execute_typed(
                    UPSERT_ASSETS,
                    &[
                        (&columns.asset_id, Type::INT4_ARRAY),
                        (&columns.key, Type::VARCHAR_ARRAY),
                        (&columns.value, Type::TEXT_ARRAY),
                        (&columns.updated_at, Type::INT8_ARRAY),
                        (&columns.kind, Type::VARCHAR_ARRAY),
                        (&columns.dag_id, Type::VARCHAR_ARRAY),
                        (&columns.run_id, Type::VARCHAR_ARRAY),
                        (&columns.task_id, Type::VARCHAR_ARRAY),
                        (&columns.map_index, Type::INT4_ARRAY),
                    ],
                )
                .await
                .map_err(failed)?;
        }
        transaction.commit().await.map_err(failed)?;
        self.summary.asset_keys += written;
        self.progress
            .tick(self.summary.task_keys + self.summary.asset_keys);
        Ok(())
    }
}

#[derive(Default)]
struct TaskColumns {
    dag_run_id: Vec<i32>,
    dag_id: Vec<String>,
    run_id: Vec<String>,
    task_id: Vec<String>,
    map_index: Vec<i32>,
    key: Vec<String>,
    value: Vec<String>,
    updated_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
}

#[derive(Default)]
struct AssetColumns {
    asset_id: Vec<i32>,
    key: Vec<String>,
    value: Vec<String>,
    updated_at: Vec<i64>,
    kind: Vec<Option<&'static str>>,
    dag_id: Vec<Option<String>>,
    run_id: Vec<Option<String>>,
    task_id: Vec<Option<String>>,
    map_index: Vec<Option<i32>>,
}

/// The `last_updated_by_*` columns of a writer, as Airflow's `AssetStateStoreWriterKind`
/// records them (task fields only for `task`); `None` when they do not fit the columns.
fn writer_columns(writer: Option<&Writer>) -> Option<WriterColumns> {
    Some(match writer {
        None => (None, None, None, None, None),
        Some(Writer::Watcher) => (Some("watcher"), None, None, None, None),
        Some(Writer::Api) => (Some("api"), None, None, None, None),
        Some(Writer::Task {
            dag_id,
            run_id,
            task_id,
            map_index,
        }) => {
            if [dag_id, run_id, task_id]
                .iter()
                .any(|id| id.chars().count() > ID_CHARS)
            {
                return None;
            }
            (
                Some("task"),
                Some(dag_id.clone()),
                Some(run_id.clone()),
                Some(task_id.clone()),
                Some(i32::try_from(*map_index).ok()?),
            )
        }
    })
}
