//! Identity from Airflow's metastore (PostgreSQL), read-only, behind a short-lived cache.
//!
//! A task instance's scope never changes, but its UUID stops resolving when Airflow
//! retries the task (the primary key rotates) and the old attempt must then be refused.
//! The cache's freshness window is therefore the longest a retired attempt can still be
//! served; "not found" is never cached, because the row may appear a moment later.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use metrics::Counter;
use moka::future::Cache;
use tokio_postgres::types::{ToSql, Type};
use tracing::Instrument;
use uuid::Uuid;

use super::tls::Connection;
use super::{AssetRef, IdentityError, IdentityResolver, RunKey};
use crate::auth::Claims;
use crate::store::lifecycle::Oracle;
use crate::store::{AssetKey, TaskScope};

#[derive(Debug, Clone)]
pub struct MetastoreSettings {
    /// A `postgresql://` URL (SQLAlchemy's `postgresql+driver://` form already rewritten).
    pub url: String,
    pub pool_size: usize,
    pub cache_ttl: Duration,
    pub cache_capacity: u64,
    /// How long a request may wait for a connection or a query before it is a 503.
    pub timeout: Duration,
}

pub struct MetastoreResolver {
    pool: Pool,
    tasks: Cache<Uuid, TaskScope>,
    assets: Cache<AssetRef, AssetKey>,
    asset_ids: Cache<i32, AssetKey>,
    /// (asset id, dag_id, task_id) pairs found registered; refusals are not cached.
    registrations: Cache<(i32, String, String), ()>,
    registration_check: bool,
    /// The longest one statement may take (waiting in PgBouncer's queue included).
    timeout: Duration,
    display: String,
}

/// Why a lookup produced no cacheable answer.
#[derive(Debug, Clone)]
enum Miss {
    NotFound,
    Unavailable(String),
}

// The run's id comes along: Airflow keys task state by `dag_run.id`, not by run_id.
const TASK_SQL: &str = "SELECT ti.dag_id, ti.run_id, ti.task_id, ti.map_index, dr.id \
     FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id \
     WHERE ti.id = $1";
const EXISTING_RUNS_SQL: &str = "SELECT id FROM dag_run WHERE id = ANY($1)";
// An empty dag_run table means the wrong database far more often than an empty Airflow.
const ANY_RUN_SQL: &str = "SELECT 1 FROM dag_run LIMIT 1";
const ACTIVE_ASSETS_SQL: &str = "SELECT a.id FROM asset a \
     JOIN asset_active act ON act.name = a.name AND act.uri = a.uri WHERE a.id = ANY($1)";
const RUN_KEY_SQL: &str = "SELECT id FROM dag_run WHERE dag_id = $1 AND run_id = $2";
// Only active assets resolve, as in Airflow: an `asset_active` row with the same name and URI.
const ASSET_BY_NAME_SQL: &str = "SELECT a.id FROM asset a \
     JOIN asset_active act ON act.name = a.name AND act.uri = a.uri WHERE a.name = $1 LIMIT 1";
// A task may use an asset it reads (inlet) or writes (outlet).
const REGISTRATION_SQL: &str = "SELECT 1 FROM task_inlet_asset_reference \
     WHERE asset_id = $1 AND dag_id = $2 AND task_id = $3 \
     UNION ALL SELECT 1 FROM task_outlet_asset_reference \
     WHERE asset_id = $1 AND dag_id = $2 AND task_id = $3 LIMIT 1";
// By id, as Airflow's Core REST API: the asset row must exist, active or not.
const ASSET_BY_ID_SQL: &str = "SELECT id FROM asset WHERE id = $1";
// Any map index when the last parameter is NULL, as Airflow checks a clear of every index.
const TASK_INSTANCE_EXISTS_SQL: &str = "SELECT 1 FROM task_instance \
     WHERE dag_id = $1 AND run_id = $2 AND task_id = $3 \
     AND ($4::integer IS NULL OR map_index = $4::integer) LIMIT 1";
const ASSET_BY_URI_SQL: &str = "SELECT a.id FROM asset a \
     JOIN asset_active act ON act.name = a.name AND act.uri = a.uri WHERE a.uri = $1 LIMIT 1";

/// Accepts Airflow's `sql_alchemy_conn` (`postgresql+psycopg2://...`) and plain URLs.
pub fn postgres_url_from_sqlalchemy(conn: &str) -> Result<String, String> {
    let (scheme, rest) = conn
        .split_once("://")
        .ok_or_else(|| "expected a URL such as postgresql://user@host/airflow".to_owned())?;
    let dialect = scheme.split('+').next().unwrap_or_default();
    match dialect {
        "postgresql" | "postgres" => Ok(format!("postgresql://{rest}")),
        other => Err(format!(
            "only PostgreSQL metastores are supported, got the {other:?} dialect"
        )),
    }
}

impl MetastoreResolver {
    pub fn new(settings: &MetastoreSettings) -> Result<Self, String> {
        let connection = Connection::parse(&settings.url)?;
        let tls = connection.connector()?;
        let display = format!(
            "{} ({})",
            describe_config(&connection.config),
            connection.describe()
        );
        let manager = Manager::from_config(
            connection.config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| format!("cannot build the metastore pool: {e}"))?;
        // Every label value known, every series from zero (see `telemetry::metrics_handle`).
        for kind in ["pool", "query", "timeout"] {
            metrics::counter!("airstate_metastore_errors_total", "kind" => kind).increment(0);
        }
        for kind in ["task", "asset", "registration"] {
            for result in ["hit", "miss"] {
                metrics::counter!("airstate_identity_cache_total", "kind" => kind, "result" => result)
                    .increment(0);
            }
        }
        Ok(Self {
            pool,
            tasks: bounded_cache(settings),
            assets: bounded_cache(settings),
            asset_ids: bounded_cache(settings),
            registrations: bounded_cache(settings),
            registration_check: false,
            timeout: settings.timeout,
            display,
        })
    }

    /// Turns on the asset registration check (`AIRSTATE_ASSET_REGISTRATION_CHECK`).
    pub fn with_registration_check(mut self, enabled: bool) -> Self {
        self.registration_check = enabled;
        self
    }

    /// Whether (asset, dag, task) is registered, straight from the metastore.
    async fn query_registration(
        &self,
        asset_id: i32,
        dag_id: &str,
        task_id: &str,
    ) -> Result<bool, IdentityError> {
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&asset_id, Type::INT4),
            (&dag_id, Type::VARCHAR),
            (&task_id, Type::VARCHAR),
        ];
        let row = self
            .query_opt(REGISTRATION_SQL, &params)
            .await
            .map_err(IdentityError::Unavailable)?;
        Ok(row.is_some())
    }

    async fn query_one<T>(
        &self,
        sql: &str,
        param: (&(dyn ToSql + Sync), Type),
        read: impl FnOnce(&tokio_postgres::Row) -> T,
    ) -> Result<T, Miss> {
        let row = self
            .query_opt(sql, &[param])
            .await
            .map_err(Miss::Unavailable)?;
        row.as_ref().map(read).ok_or(Miss::NotFound)
    }

    /// One statement, as PostgreSQL's unnamed statement in a single round trip
    /// (Parse/Bind/Execute/Sync): behind PgBouncer in transaction pooling mode each round
    /// trip may reach a different server connection, where a named prepared statement
    /// would not exist. The parameter types are given, and are all built-in, so no type
    /// lookup (which prepares statements of its own) happens either.
    async fn query_all(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<tokio_postgres::Row>, String> {
        let span = tracing::info_span!(
            "metastore.query",
            otel.kind = "client",
            db.system = "postgresql"
        );
        let started = std::time::Instant::now();
        let (outcome, result) = async {
            // One deadline for the pool wait and the statement: a frozen server (accepting,
            // never answering) costs a request no more than the timeout.
            let deadline = tokio::time::Instant::now() + self.timeout;
            let client = match self.checkout(deadline).await {
                Ok(client) => client,
                Err(e) => return ("pool", Err(e)),
            };
            let query = client.query_typed(sql, params);
            match tokio::time::timeout_at(deadline, query).await {
                Ok(Ok(rows)) => ("ok", Ok(rows)),
                Ok(Err(e)) => ("query", Err(explain(&e))),
                Err(_) => ("timeout", Err(self.abandon(client))),
            }
        }
        .instrument(span)
        .await;
        metrics::histogram!(
            "airstate_metastore_query_duration_seconds",
            "outcome" => if outcome == "ok" { "ok" } else { "error" },
        )
        .record(started.elapsed().as_secs_f64());
        if outcome != "ok" {
            metastore_error(outcome);
        }
        result
    }

    /// Like [`query_all`](Self::query_all), for a statement of one row at most (a
    /// primary key, or `LIMIT 1`).
    async fn query_opt(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<tokio_postgres::Row>, String> {
        Ok(self.query_all(sql, params).await?.into_iter().next())
    }

    /// Which of `ids` the statement (taking an `int4[]`) returns.
    async fn ids_found(&self, sql: &str, ids: &[i64]) -> Result<HashSet<i64>, String> {
        // The columns are INTEGER: an id beyond i32 is no row of them.
        let ids: Vec<i32> = ids
            .iter()
            .filter_map(|id| i32::try_from(*id).ok())
            .collect();
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let rows = self.query_all(sql, &[(&ids, Type::INT4_ARRAY)]).await?;
        Ok(rows
            .iter()
            .map(|row| i64::from(row.get::<_, i32>(0)))
            .collect())
    }

    /// A pooled connection by `deadline`, which the statement shares: the pool's own
    /// timeouts apply one after the other (waiting for a free slot, then connecting or
    /// recycling), so a frozen server, which accepts TCP connections and answers nothing,
    /// would otherwise hold a request for several of them before its statement starts.
    async fn checkout(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<deadpool_postgres::Object, String> {
        match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(client) => client.map_err(|e| explain(&e)),
            Err(_) => Err(format!(
                "no metastore connection within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    /// A statement over its time (still running, or queued in PgBouncer for a server
    /// connection) keeps its connection busy: the connection leaves the pool and closes,
    /// rather than making the next request wait behind it.
    fn abandon(&self, client: deadpool_postgres::Object) -> String {
        drop(deadpool_postgres::Object::take(client));
        format!(
            "metastore query timed out after {} ms",
            self.timeout.as_millis()
        )
    }
}

fn bounded_cache<K, V>(settings: &MetastoreSettings) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(settings.cache_capacity)
        .time_to_live(settings.cache_ttl)
        .build()
}

/// An error with its causes ("error performing TLS handshake" alone does not say that the
/// certificate names another host), each said once.
pub fn explain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = inner.source();
    }
    text
}

fn describe_config(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "Airflow metastore at {} (database {})",
        hosts.join(","),
        config.get_dbname().unwrap_or("default")
    )
}

/// PostgreSQL text cannot hold a NUL byte, so no row has one; sending it would be an
/// encoding error, answered 503 with Retry-After as if the metastore were down. Text
/// holding one is no such row (404) without asking.
fn holds_nul(text: &str) -> bool {
    text.contains('\0')
}

fn settle<T>(result: Result<T, Arc<Miss>>) -> Result<Option<T>, IdentityError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(miss) => match miss.as_ref() {
            Miss::NotFound => Ok(None),
            Miss::Unavailable(reason) => Err(IdentityError::Unavailable(reason.clone())),
        },
    }
}

#[async_trait]
impl IdentityResolver for MetastoreResolver {
    async fn task(&self, ti: Uuid, _claims: &Claims) -> Result<Option<TaskScope>, IdentityError> {
        let span = tracing::info_span!("identity.task", cache = tracing::field::Empty);
        self.resolve_task(ti).instrument(span).await
    }

    async fn asset(&self, asset: &AssetRef) -> Result<Option<AssetKey>, IdentityError> {
        let span = tracing::info_span!("identity.asset", cache = tracing::field::Empty);
        self.resolve_asset(asset).instrument(span).await
    }

    async fn asset_by_id(&self, id: i64) -> Result<Option<AssetKey>, IdentityError> {
        let span = tracing::info_span!("identity.asset", cache = tracing::field::Empty);
        self.resolve_asset_id(id).instrument(span).await
    }

    fn checks_asset_registration(&self) -> bool {
        self.registration_check
    }

    async fn task_uses_asset(
        &self,
        scope: &TaskScope,
        asset: &AssetKey,
    ) -> Result<bool, IdentityError> {
        // Metastore asset keys are Airflow's integer asset ids.
        let Ok(asset_id) = asset.0.parse::<i32>() else {
            return Ok(false);
        };
        let key = (asset_id, scope.dag_id.clone(), scope.task_id.clone());
        if self.registrations.get(&key).await.is_some() {
            cache_outcome(Cached::Registration, true);
            return Ok(true);
        }
        cache_outcome(Cached::Registration, false);
        let registered = self
            .query_registration(asset_id, &scope.dag_id, &scope.task_id)
            .await?;
        if registered {
            self.registrations.insert(key, ()).await;
        }
        Ok(registered)
    }

    async fn task_instance_exists(
        &self,
        dag_id: &str,
        run_id: &str,
        task_id: &str,
        map_index: Option<i64>,
    ) -> Result<bool, IdentityError> {
        if [dag_id, run_id, task_id].into_iter().any(holds_nul) {
            return Ok(false);
        }
        // A map index beyond i32 matches no row (the column is an integer).
        let map_index = match map_index.map(i32::try_from) {
            None => None,
            Some(Ok(index)) => Some(index),
            Some(Err(_)) => return Ok(false),
        };
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&dag_id, Type::VARCHAR),
            (&run_id, Type::VARCHAR),
            (&task_id, Type::VARCHAR),
            (&map_index, Type::INT4),
        ];
        let row = self
            .query_opt(TASK_INSTANCE_EXISTS_SQL, &params)
            .await
            .map_err(IdentityError::Unavailable)?;
        Ok(row.is_some())
    }

    async fn run_key(&self, dag_id: &str, run_id: &str) -> Result<RunKey, IdentityError> {
        if holds_nul(dag_id) || holds_nul(run_id) {
            return Ok(RunKey::NoSuchRun);
        }
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&dag_id, Type::VARCHAR), (&run_id, Type::VARCHAR)];
        let row = self
            .query_opt(RUN_KEY_SQL, &params)
            .await
            .map_err(IdentityError::Unavailable)?;
        Ok(match row {
            Some(row) => RunKey::Known(i64::from(row.get::<_, i32>(0))),
            None => RunKey::NoSuchRun,
        })
    }

    fn dependency(&self) -> Option<&'static str> {
        Some("metastore")
    }

    async fn ping(&self) -> Result<(), IdentityError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let client = self.checkout(deadline).await.map_err(|e| {
            metastore_error("pool");
            IdentityError::Unavailable(e)
        })?;
        // The simple query protocol: no prepared statement at all.
        match tokio::time::timeout_at(deadline, client.simple_query("SELECT 1")).await {
            Ok(result) => result.map(drop).map_err(|e| {
                metastore_error("query");
                IdentityError::Unavailable(explain(&e))
            }),
            Err(_) => {
                metastore_error("timeout");
                Err(IdentityError::Unavailable(self.abandon(client)))
            }
        }
    }

    fn describe(&self) -> String {
        self.display.clone()
    }

    fn record_metrics(&self) {
        let status = self.pool.status();
        metrics::gauge!("airstate_metastore_pool_connections").set(status.size as f64);
        metrics::gauge!("airstate_metastore_pool_idle_connections").set(status.available as f64);
        metrics::gauge!("airstate_metastore_pool_max_connections").set(status.max_size as f64);
        metrics::gauge!("airstate_metastore_pool_waiting").set(status.waiting as f64);
    }
}

/// `kind`: `pool` (no connection in time), `query` (the statement failed) or `timeout`.
fn metastore_error(kind: &'static str) {
    metrics::counter!("airstate_metastore_errors_total", "kind" => kind).increment(1);
}

/// What an identity cache holds: the `kind` label of `airstate_identity_cache_total`.
#[derive(Debug, Clone, Copy)]
enum Cached {
    Task,
    Asset,
    Registration,
}

impl Cached {
    const ALL: [Cached; 3] = [Cached::Task, Cached::Asset, Cached::Registration];

    fn label(self) -> &'static str {
        match self {
            Cached::Task => "task",
            Cached::Asset => "asset",
            Cached::Registration => "registration",
        }
    }
}

/// Records on the current span whether the cache answered, and counts it.
fn cache_outcome(kind: Cached, hit: bool) {
    // Handles made once, indexed as `ALL` and (miss, hit): `counter!` with labels looks its
    // key up in the recorder, allocating, on every call (1.34k instructions of each GET
    // with the metastore identity).
    static COUNTERS: OnceLock<[[Counter; 2]; 3]> = OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        Cached::ALL.map(|kind| {
            ["miss", "hit"].map(|result| {
                metrics::counter!(
                    "airstate_identity_cache_total",
                    "kind" => kind.label(),
                    "result" => result
                )
            })
        })
    });
    let result = if hit { "hit" } else { "miss" };
    tracing::Span::current().record("cache", result);
    counters[kind as usize][usize::from(hit)].increment(1);
}

impl MetastoreResolver {
    async fn resolve_task(&self, ti: Uuid) -> Result<Option<TaskScope>, IdentityError> {
        if let Some(scope) = self.tasks.get(&ti).await {
            cache_outcome(Cached::Task, true);
            return Ok(Some(scope));
        }
        cache_outcome(Cached::Task, false);
        // Concurrent misses for one UUID share a single query.
        let result = self
            .tasks
            .try_get_with(ti, async {
                self.query_one(TASK_SQL, (&ti, Type::UUID), |row| TaskScope {
                    dag_id: row.get(0),
                    run_id: row.get(1),
                    task_id: row.get(2),
                    map_index: i64::from(row.get::<_, i32>(3)),
                    run_key: Some(i64::from(row.get::<_, i32>(4))),
                })
                .await
            })
            .await;
        settle(result)
    }

    async fn resolve_asset(&self, asset: &AssetRef) -> Result<Option<AssetKey>, IdentityError> {
        let (AssetRef::Name(text) | AssetRef::Uri(text)) = asset;
        if holds_nul(text) {
            return Ok(None);
        }
        if let Some(key) = self.assets.get(asset).await {
            cache_outcome(Cached::Asset, true);
            return Ok(Some(key));
        }
        cache_outcome(Cached::Asset, false);
        let result = self
            .assets
            .try_get_with_by_ref(asset, async {
                let (sql, text) = match asset {
                    AssetRef::Name(name) => (ASSET_BY_NAME_SQL, name),
                    AssetRef::Uri(uri) => (ASSET_BY_URI_SQL, uri),
                };
                self.query_one(sql, (text, Type::VARCHAR), |row| {
                    AssetKey(row.get::<_, i32>(0).to_string())
                })
                .await
            })
            .await;
        settle(result)
    }

    async fn resolve_asset_id(&self, id: i64) -> Result<Option<AssetKey>, IdentityError> {
        // `asset.id` is an INTEGER: an id beyond it names no asset.
        let Ok(id) = i32::try_from(id) else {
            return Ok(None);
        };
        if let Some(key) = self.asset_ids.get(&id).await {
            cache_outcome(Cached::Asset, true);
            return Ok(Some(key));
        }
        cache_outcome(Cached::Asset, false);
        let result = self
            .asset_ids
            .try_get_with(id, async {
                self.query_one(
                    ASSET_BY_ID_SQL,
                    (&id, tokio_postgres::types::Type::INT4),
                    |row| AssetKey(row.get::<_, i32>(0).to_string()),
                )
                .await
            })
            .await;
        settle(result)
    }
}

#[async_trait]
impl Oracle for MetastoreResolver {
    async fn existing_runs(&self, runs: &[i64]) -> Result<HashSet<i64>, String> {
        let found = self.ids_found(EXISTING_RUNS_SQL, runs).await?;
        // State is held for these runs, so Airflow had them: a metastore with no run at
        // all is a misconfigured URL, not a reason to delete everything.
        if found.is_empty() && !runs.is_empty() && self.query_opt(ANY_RUN_SQL, &[]).await?.is_none()
        {
            return Err(
                "the metastore has no DAG runs at all; not reclaiming anything \
                        (does AIRFLOW__DATABASE__SQL_ALCHEMY_CONN name Airflow's database?)"
                    .into(),
            );
        }
        Ok(found)
    }

    async fn active_assets(&self, assets: &[i64]) -> Result<HashSet<i64>, String> {
        self.ids_found(ACTIVE_ASSETS_SQL, assets).await
    }
}

#[cfg(test)]
mod tests {
    use super::postgres_url_from_sqlalchemy;

    #[test]
    fn sqlalchemy_urls_become_postgres_urls() {
        assert_eq!(
            postgres_url_from_sqlalchemy("postgresql+psycopg2://u:p@db:5432/airflow").unwrap(),
            "postgresql://u:p@db:5432/airflow"
        );
        assert_eq!(
            postgres_url_from_sqlalchemy("postgres://db/airflow").unwrap(),
            "postgresql://db/airflow"
        );
        assert!(postgres_url_from_sqlalchemy("mysql+mysqldb://db/airflow")
            .unwrap_err()
            .contains("mysql"));
        assert!(postgres_url_from_sqlalchemy("db/airflow").is_err());
    }
}
