//! Task-state routes: `/execution/store/ti/...` (Airflow 3.3) and `/execution/state/ti/...`
//! (AIP-103's original shape), one set of handlers.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::Response;

use super::body::{check_key, parse_bool_param, parse_put_body};
use super::conditional::{not_modified, with_etag, written_response, Precondition};
use super::error::ApiError;
use super::extract::{query_params, JsonBody, TaskCaller};
use super::{no_content, value_response, AppState};
use crate::store::TaskScope;

const KEY_LOC: [&str; 2] = ["path", "key"];

fn key_of(caller: &TaskCaller) -> Result<&str, ApiError> {
    let key = caller.key.as_deref().unwrap_or("");
    check_key(key, &KEY_LOC)?;
    Ok(key)
}

pub(crate) async fn scope_of(app: &AppState, caller: &TaskCaller) -> Result<TaskScope, ApiError> {
    app.identity
        .task(caller.task_instance, &caller.claims)
        .await?
        .ok_or(ApiError::TaskInstanceNotFound(caller.task_instance))
}

pub async fn get(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let key = key_of(&caller)?;
    let condition = precondition.condition()?;
    let scope = scope_of(&app, &caller).await?;
    match app.store.get_task(&scope, key).await? {
        Some(value) => Ok(not_modified(&condition, &value.version)
            .unwrap_or_else(|| with_etag(value_response(&value.json), Some(&value.version)))),
        None => Err(ApiError::TaskKeyNotFound(key.to_owned())),
    }
}

pub async fn put(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    precondition: Precondition,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let key = key_of(&caller)?;
    let parsed = parse_put_body(body.content_type.as_deref(), &body.bytes, true)?;
    let condition = precondition.condition()?;
    let scope = scope_of(&app, &caller).await?;
    let written = app
        .store
        .put_task_if(&scope, key, parsed.value, parsed.expires_at, &condition)
        .await?;
    written_response(written, no_content())
}

pub async fn delete(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    precondition: Precondition,
) -> Result<Response, ApiError> {
    let key = key_of(&caller)?;
    let condition = precondition.condition()?;
    let scope = scope_of(&app, &caller).await?;
    let written = app.store.delete_task_if(&scope, key, &condition).await?;
    written_response(written, no_content())
}

/// Airflow 3.3's clear: only the caller's own map index; `all_map_indices` is ignored.
pub async fn clear(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
) -> Result<Response, ApiError> {
    let scope = scope_of(&app, &caller).await?;
    app.store.clear_task(&scope, false).await?;
    Ok(no_content())
}

/// The clear of AIP-103's original path (`DELETE /execution/state/ti/{id}`, the shape the
/// AIP proposed before Airflow 3.3 shipped `/execution/store/...`; `aip103_*` handlers
/// serve those paths): `?all_map_indices=true` wipes every map index of the task at once.
pub async fn aip103_clear(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref());
    let all = parse_bool_param(
        "all_map_indices",
        params.get("all_map_indices").map(String::as_str),
    )?;
    let scope = scope_of(&app, &caller).await?;
    app.store.clear_task(&scope, all).await?;
    Ok(no_content())
}

/// `.../ti/{id}/` with nothing after the slash: an empty key, never a clear.
pub async fn empty_key(caller: TaskCaller) -> Result<Response, ApiError> {
    key_of(&caller)?;
    Err(ApiError::Internal("an empty key passed validation".into()))
}
