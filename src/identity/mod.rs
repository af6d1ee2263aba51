//! Who is asking: a task-instance UUID becomes the (dag_id, run_id, task_id, map_index)
//! scope its state lives under, and an asset name or URI becomes the asset's store key.
//!
//! Two resolvers exist. [`metastore::MetastoreResolver`] reads Airflow's own tables, as
//! Airflow does, and is what a deployment beside Airflow uses. [`ClaimsResolver`] trusts
//! identity claims carried in the token, for running without Airflow's database.

pub mod metastore;
pub mod tls;

use async_trait::async_trait;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::auth::Claims;
use crate::store::{AssetKey, TaskScope};

/// How a request names an asset; Airflow resolves both forms to one asset id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AssetRef {
    Name(String),
    Uri(String),
}

/// What the identity source knows of a DAG run named by (dag_id, run_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKey {
    /// No metastore: runs have no id beyond their names.
    Untracked,
    /// The run's `dag_run.id`.
    Known(i64),
    /// Airflow has no such run (never created, or deleted).
    NoSuchRun,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The metastore cannot be reached now; the request may be retried.
    #[error("identity source unavailable: {0}")]
    Unavailable(String),
    /// Airflow's integer asset ids mean something only where Airflow's `asset` table is.
    #[error("asset ids need the metastore identity")]
    NoAssetIds,
    /// A token whose claims name no task instance Airflow can have (claims identity).
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

#[async_trait]
pub trait IdentityResolver: Send + Sync + 'static {
    /// The scope of a live task instance; `None` when the UUID does not resolve (unknown,
    /// or retired by a retry).
    async fn task(&self, ti: Uuid, claims: &Claims) -> Result<Option<TaskScope>, IdentityError>;
    /// The store key of an active asset; `None` when no active asset matches.
    async fn asset(&self, asset: &AssetRef) -> Result<Option<AssetKey>, IdentityError>;
    /// The store key of the asset with Airflow's integer id, active or not (as Airflow's
    /// Core REST API addresses assets); `None` when there is no such asset. Only a
    /// resolver that reads Airflow's `asset` table can answer.
    async fn asset_by_id(&self, _id: i64) -> Result<Option<AssetKey>, IdentityError> {
        Err(IdentityError::NoAssetIds)
    }
    /// Whether asset state is limited to the tasks registered with the asset (airstate's
    /// opt-in `AIRSTATE_ASSET_REGISTRATION_CHECK`).
    fn checks_asset_registration(&self) -> bool {
        false
    }
    /// Whether the task `scope` is registered with `asset` as an inlet or an outlet.
    async fn task_uses_asset(
        &self,
        _scope: &TaskScope,
        _asset: &AssetKey,
    ) -> Result<bool, IdentityError> {
        Ok(true)
    }
    /// Whether Airflow has this task instance (at any map index when `map_index` is
    /// `None`), which Airflow's Core REST API checks before it writes a task's state.
    /// Without a metastore there is nothing to check against.
    async fn task_instance_exists(
        &self,
        _dag_id: &str,
        _run_id: &str,
        _task_id: &str,
        _map_index: Option<i64>,
    ) -> Result<bool, IdentityError> {
        Ok(true)
    }
    /// The `dag_run.id` of a run named by (dag_id, run_id), for the routes that name a
    /// task instead of carrying its task-instance UUID (the admin API, Airflow's Core
    /// REST API). Never cached: a run deleted and created again under the same run_id
    /// must resolve to the new id at once.
    async fn run_key(&self, _dag_id: &str, _run_id: &str) -> Result<RunKey, IdentityError> {
        Ok(RunKey::Untracked)
    }
    /// Whether the identity source answers; drives `/ready`.
    async fn ping(&self) -> Result<(), IdentityError>;
    /// The service the resolver depends on, as `/ready` and `airstate_dependency_up`
    /// name it; `None` when it needs none (the token's claims).
    fn dependency(&self) -> Option<&'static str> {
        None
    }
    fn describe(&self) -> String;
    /// Sets the gauges of what the resolver holds (a connection pool), before a scrape.
    fn record_metrics(&self) {}
}

/// `scope` with its run's `dag_run.id` attached, as the identity knows it; `None` when
/// Airflow has no such run, so no state can be found for it.
pub async fn with_run_key(
    identity: &dyn IdentityResolver,
    mut scope: TaskScope,
) -> Result<Option<TaskScope>, IdentityError> {
    match identity.run_key(&scope.dag_id, &scope.run_id).await? {
        RunKey::Untracked => Ok(Some(scope)),
        RunKey::Known(id) => {
            scope.run_key = Some(id);
            Ok(Some(scope))
        }
        RunKey::NoSuchRun => Ok(None),
    }
}

/// Takes the task identity from the token's `dag_id`, `run_id`, `task_id` and `map_index`
/// claims (the last defaults to -1), for use without an Airflow metastore.
///
/// Without Airflow's `asset` table there is nothing that relates an asset's name to its
/// URI, so here each form is its own asset: a value written by name is not readable by URI.
pub struct ClaimsResolver;

#[async_trait]
impl IdentityResolver for ClaimsResolver {
    async fn task(&self, _ti: Uuid, claims: &Claims) -> Result<Option<TaskScope>, IdentityError> {
        let text = |name: &str| claims.all.get(name).and_then(Value::as_str);
        let (Some(dag_id), Some(run_id), Some(task_id)) =
            (text("dag_id"), text("run_id"), text("task_id"))
        else {
            return Ok(None);
        };
        let map_index = match claims.all.get("map_index") {
            None | Some(Value::Null) => -1,
            Some(value) => match value.as_i64() {
                Some(index) => index,
                None => return Ok(None),
            },
        };
        // Refused here rather than stored under a scope `airstate import` would refuse.
        crate::store::rules::check_task_identity(dag_id, run_id, task_id, map_index)
            .map_err(IdentityError::InvalidClaims)?;
        Ok(Some(TaskScope {
            dag_id: dag_id.to_owned(),
            run_id: run_id.to_owned(),
            task_id: task_id.to_owned(),
            map_index,
            run_key: None,
        }))
    }

    async fn asset(&self, asset: &AssetRef) -> Result<Option<AssetKey>, IdentityError> {
        let (form, text) = match asset {
            AssetRef::Name(name) => ("n", name),
            AssetRef::Uri(uri) => ("u", uri),
        };
        let digest = Sha256::digest(text.as_bytes());
        Ok(Some(AssetKey(format!(
            "{form}{}",
            hex::encode(&digest[..16])
        ))))
    }

    async fn ping(&self) -> Result<(), IdentityError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "token claims (dag_id, run_id, task_id, map_index); no metastore".to_owned()
    }
}
