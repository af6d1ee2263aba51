//! `airstate import --from-metastore`: Airflow 3.3's own state tables, read once, so a
//! deployment that kept state in its metastore switches to airstate without losing it.
//!
//! Asset rows are keyed by Airflow's integer asset id, which is the asset key the gateway
//! uses with the metastore identity (`AIRSTATE_IDENTITY=metastore`).

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_postgres::types::{ToSql, Type};

use super::{Item, MigrateError, Summary};
use crate::http::body::{check_key, check_value_text};
use crate::identity::metastore::explain;
use crate::identity::tls::Connection;
use crate::store::{now_millis, AssetKey, StateStore, TaskScope, Writer};

// Times as epoch milliseconds, so no date type crosses the driver.
const TASK_ROWS: &str = "SELECT dag_id, run_id, task_id, map_index, key, value, \
     (extract(epoch FROM updated_at) * 1000)::bigint, \
     (extract(epoch FROM expires_at) * 1000)::bigint \
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
    let failed = |e: tokio_postgres::Error| MigrateError::Metastore(explain(&e));
    let target = Connection::parse(postgres_url).map_err(MigrateError::Metastore)?;
    let tls = target.connector().map_err(MigrateError::Metastore)?;
    let (client, connection) = target.config.connect(tls).await.map_err(failed)?;
    let connection = tokio::spawn(connection);
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

/// Statements run with `query_typed_raw`: PostgreSQL's unnamed statement in one round
/// trip, never a named prepared statement that PgBouncer in transaction pooling mode could
/// send to another server connection than the one that prepared it.
fn no_params() -> std::iter::Empty<(&'static (dyn ToSql + Sync), Type)> {
    std::iter::empty()
}

fn unusable(key: &str, json: &str) -> Option<String> {
    if let Err(issue) = check_key(key, &["key"]) {
        return Some(format!("key: {}", issue.msg));
    }
    check_value_text(json)
        .err()
        .map(|message| format!("value: {message}"))
}
