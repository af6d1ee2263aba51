//! Asset-state routes. Airflow 3.3 names the asset in the query
//! (`/execution/store/asset/by-name/value?name=&key=`); AIP-103's original shape names
//! it in the path (`/execution/state/asset/{name}/{key}`). Both land in the same core.
//!
//! Any valid execution token may read, delete or clear any active asset, as in Airflow;
//! a write additionally records who wrote it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use serde_json::Value;

use super::body::{check_key, parse_put_body};
use super::conditional::{not_modified, with_etag, written_response, Precondition};
use super::error::{ApiError, ValidationIssue};
use super::extract::{query_params, ExecutionToken, JsonBody};
use super::{no_content, value_response, AppState};
use crate::auth::{Claims, WATCHER_SUBJECT};
use crate::identity::AssetRef;
use crate::store::{AssetKey, Writer};

/// Which query parameter names the asset on a `/execution/store/asset/...` route; the
/// handlers take it as a const parameter (`BY_URI`), one instance per route family.
#[derive(Clone, Copy)]
pub(crate) enum By {
    Name,
    Uri,
}

impl By {
    pub(crate) fn of(by_uri: bool) -> Self {
        if by_uri {
            By::Uri
        } else {
            By::Name
        }
    }

    fn param(self) -> &'static str {
        match self {
            By::Name => "name",
            By::Uri => "uri",
        }
    }
}

/// Reads the asset (and, when `with_key`, the key) from the query, reporting every
/// problem at once as FastAPI does.
pub(crate) fn from_query(
    by: By,
    query: Option<&str>,
    with_key: bool,
) -> Result<(AssetRef, Option<String>), ApiError> {
    let mut params = query_params(query);
    let mut issues = Vec::new();
    let mut required = |name: &'static str, params: &mut HashMap<String, String>| {
        let loc = ["query", name];
        match params.remove(name) {
            None => {
                issues.push(ValidationIssue::missing(&loc, Value::Null));
                None
            }
            Some(value) => match check_key(&value, &loc) {
                Ok(()) => Some(value),
                Err(issue) => {
                    issues.push(issue);
                    None
                }
            },
        }
    };
    let asset = required(by.param(), &mut params);
    let key = if with_key {
        required("key", &mut params)
    } else {
        None
    };
    if !issues.is_empty() {
        return Err(ApiError::Validation(issues));
    }
    let asset = asset.unwrap_or_default();
    let asset = match by {
        By::Name => AssetRef::Name(asset),
        By::Uri => AssetRef::Uri(asset),
    };
    Ok((asset, key))
}

/// The asset's store key, once the caller may use it: the asset must be active, and with
/// `AIRSTATE_ASSET_REGISTRATION_CHECK` the token's task must be registered with it as an
/// inlet or outlet. Watcher tokens (the all-zero subject) belong to no task and pass.
pub(crate) async fn resolve(
    app: &AppState,
    claims: &Claims,
    asset: AssetRef,
) -> Result<AssetKey, ApiError> {
    let Some(key) = app.identity.asset(&asset).await? else {
        return Err(ApiError::AssetNotFound(asset));
    };
    if !app.identity.checks_asset_registration() || claims.subject == WATCHER_SUBJECT {
        return Ok(key);
    }
    let scope = app
        .identity
        .task(claims.subject, claims)
        .await?
        .ok_or(ApiError::TaskInstanceNotFound(claims.subject))?;
    if app.identity.task_uses_asset(&scope, &key).await? {
        return Ok(key);
    }
    metrics::counter!("airstate_asset_registration_denied_total").increment(1);
    Err(ApiError::AssetNotRegistered {
        dag_id: scope.dag_id,
        task_id: scope.task_id,
        asset,
    })
}

async fn writer_of(app: &AppState, claims: &Claims) -> Result<Writer, ApiError> {
    if claims.subject == WATCHER_SUBJECT {
        return Ok(Writer::Watcher);
    }
    let scope = app
        .identity
        .task(claims.subject, claims)
        .await?
        .ok_or(ApiError::WriterNotFound(claims.subject))?;
    Ok(Writer::Task {
        dag_id: scope.dag_id,
        run_id: scope.run_id,
        task_id: scope.task_id,
        map_index: scope.map_index,
    })
}

async fn get_value(
    app: &AppState,
    claims: &Claims,
    asset: AssetRef,
    key: &str,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let condition = precondition.condition()?;
    let asset = resolve(app, claims, asset).await?;
    match app.store.get_asset(&asset, key).await? {
        Some(value) => Ok(not_modified(&condition, &value.version)
            .unwrap_or_else(|| with_etag(value_response(&value.json), Some(&value.version)))),
        None => Err(ApiError::AssetKeyNotFound(key.to_owned())),
    }
}

async fn put_value(
    app: &AppState,
    claims: &Claims,
    asset: AssetRef,
    key: &str,
    precondition: Precondition,
    body: &JsonBody,
) -> Result<Response, ApiError> {
    let parsed = parse_put_body(body.content_type.as_deref(), &body.bytes, false)?;
    let condition = precondition.condition()?;
    let asset = resolve(app, claims, asset).await?;
    let writer = writer_of(app, claims).await?;
    let written = app
        .store
        .put_asset_if(&asset, key, parsed.value, &writer, &condition)
        .await?;
    written_response(written, no_content())
}

async fn delete_value(
    app: &AppState,
    claims: &Claims,
    asset: AssetRef,
    key: &str,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let condition = precondition.condition()?;
    let asset = resolve(app, claims, asset).await?;
    let written = app.store.delete_asset_if(&asset, key, &condition).await?;
    written_response(written, no_content())
}

async fn clear_all(app: &AppState, claims: &Claims, asset: AssetRef) -> Result<Response, ApiError> {
    let asset = resolve(app, claims, asset).await?;
    app.store.clear_asset(&asset).await?;
    Ok(no_content())
}

// --- Airflow 3.3: /execution/store/asset/by-{name,uri}/{value,clear} -------------------

pub async fn get<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let (asset, key) = from_query(By::of(BY_URI), query.as_deref(), true)?;
    get_value(&app, &claims, asset, &key.unwrap_or_default(), precondition).await
}

pub async fn put<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
    precondition: Precondition,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let (asset, key) = from_query(By::of(BY_URI), query.as_deref(), true)?;
    put_value(
        &app,
        &claims,
        asset,
        &key.unwrap_or_default(),
        precondition,
        &body,
    )
    .await
}

pub async fn delete<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let (asset, key) = from_query(By::of(BY_URI), query.as_deref(), true)?;
    delete_value(&app, &claims, asset, &key.unwrap_or_default(), precondition).await
}

pub async fn clear<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (asset, _) = from_query(By::of(BY_URI), query.as_deref(), false)?;
    clear_all(&app, &claims, asset).await
}

// --- AIP-103's original paths: /execution/state/asset/{name}[/{key}] -----------------
// The shape the AIP proposed, before Airflow 3.3 shipped `/execution/store/asset/...`
// with the name in the query: the `aip103_*` handlers serve it on the same state, with
// the name and key in the path.

fn from_path(name: String, key: Option<&str>) -> Result<AssetRef, ApiError> {
    let mut issues = Vec::new();
    if let Err(issue) = check_key(&name, &["path", "name"]) {
        issues.push(issue);
    }
    if let Some(Err(issue)) = key.map(|key| check_key(key, &["path", "key"])) {
        issues.push(issue);
    }
    if issues.is_empty() {
        Ok(AssetRef::Name(name))
    } else {
        Err(ApiError::Validation(issues))
    }
}

pub async fn aip103_get(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    Path((name, key)): Path<(String, String)>,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let asset = from_path(name, Some(&key))?;
    get_value(&app, &claims, asset, &key, precondition).await
}

pub async fn aip103_put(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    Path((name, key)): Path<(String, String)>,
    precondition: Precondition,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let asset = from_path(name, Some(&key))?;
    put_value(&app, &claims, asset, &key, precondition, &body).await
}

pub async fn aip103_delete(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    Path((name, key)): Path<(String, String)>,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let asset = from_path(name, Some(&key))?;
    delete_value(&app, &claims, asset, &key, precondition).await
}

pub async fn aip103_clear(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let asset = from_path(name, None)?;
    clear_all(&app, &claims, asset).await
}
