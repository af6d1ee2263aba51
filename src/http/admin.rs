//! The admin API: what Airflow's Core REST API lets the UI and CLI do with state (list,
//! get, set, patch, delete, clear), for operators, under `/admin/v1`.
//!
//! It has its own credential, `AIRSTATE_ADMIN_TOKEN`, and never accepts task tokens: a
//! task's JWT reaches only its own scope, while an admin reaches every scope. Tasks are
//! named by (dag_id, run_id, task_id) in the path and `map_index` in the query, as in
//! Airflow's `/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store`;
//! assets by name or URI, as on the Execution API (only active assets resolve), or by
//! Airflow's integer asset id, as in Airflow's `/api/v2/assets/{asset_id}/state-store`
//! (any asset row; metastore identity only). The last is what `airstate_airflow`, the
//! Airflow state backend in `python/airstate-airflow`, uses: Airflow hands its backends
//! asset ids, and the writer Airflow records travels in the PUT body's `last_updated_by`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::asset::{from_query, By};
use super::body::{check_key, parse_bool_param, parse_patch_body, parse_put_body};
use super::error::{ApiError, ValidationIssue};
use super::extract::{query_params, JsonBody};
use super::openapi::{
    route, Route, ASSET_LIST_NAME, ASSET_LIST_URI, ASSET_NAME, ASSET_NAME_KEY, ASSET_NAME_WRITE,
    ASSET_URI, ASSET_URI_KEY, ASSET_URI_WRITE, MAP_INDEX, PAGING, SKIP_VALUE_LIMIT, TASK_CLEAR,
    TASK_LIST, TASK_WRITE,
};
use super::{no_content, AppState};
use crate::auth::AuthError;
use crate::identity::with_run_key;
use crate::store::rules;
use crate::store::version::Tags;
use crate::store::{AssetKey, Condition, Entry, EpochMillis, TaskScope, Writer, Written};

/// The path every task route of the admin API starts with.
pub const TASK_PATH: &str =
    "/admin/v1/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/state-store";
/// Entries per page unless `limit` says otherwise, and the most one page holds.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Attempts of a PATCH whose read-modify-write keeps meeting a concurrent write.
const PATCH_ATTEMPTS: usize = 3;

const ADMIN_TASK: &str = TASK_PATH;
/// Assets by Airflow's integer id; the key, which may hold `/`, follows in the path.
pub const ASSET_ID_PATH: &str = "/admin/v1/assets/by-id/{asset_id}/state-store";
const ADMIN_ASSET_ID: &str = ASSET_ID_PATH;
const ADMIN_ASSET_ID_KEY: &str = "/admin/v1/assets/by-id/{asset_id}/state-store/{*key}";
const ADMIN_TASK_KEY: &str =
    "/admin/v1/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/state-store/{*key}";

/// The admin API's part of the route table (`routes::table`).
pub(super) fn routes() -> Vec<Route> {
    vec![
        route!(
            "get",
            ADMIN_TASK,
            task_list,
            "List a task scope's keys",
            "adminListTaskStates",
            TASK_LIST,
            None,
            Page,
            Admin
        ),
        route!(
            "delete",
            ADMIN_TASK,
            task_clear,
            "Clear a map index, or every one",
            "adminClearTaskStates",
            TASK_CLEAR,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            ADMIN_TASK_KEY,
            task_get,
            "Get a task state key",
            "adminGetTaskState",
            MAP_INDEX,
            None,
            Entry,
            Admin
        ),
        route!(
            "put",
            ADMIN_TASK_KEY,
            task_put,
            "Set a task state key",
            "adminPutTaskState",
            TASK_WRITE,
            TaskPut,
            Empty,
            Admin
        ),
        route!(
            "patch",
            ADMIN_TASK_KEY,
            task_patch,
            "Change a task state key's value or expiry",
            "adminPatchTaskState",
            TASK_WRITE,
            Patch,
            Empty,
            Admin
        ),
        route!(
            "delete",
            ADMIN_TASK_KEY,
            task_delete,
            "Delete a task state key",
            "adminDeleteTaskState",
            MAP_INDEX,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            "/admin/v1/assets/by-name/state-store",
            asset_list::<false>,
            "List an asset's keys",
            "adminListAssetStatesByName",
            ASSET_LIST_NAME,
            None,
            Page,
            Admin
        ),
        route!(
            "delete",
            "/admin/v1/assets/by-name/state-store",
            asset_clear::<false>,
            "Clear an asset",
            "adminClearAssetStatesByName",
            ASSET_NAME,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            "/admin/v1/assets/by-name/state-store/value",
            asset_get::<false>,
            "Get an asset state key",
            "adminGetAssetStateByName",
            ASSET_NAME_KEY,
            None,
            Entry,
            Admin
        ),
        route!(
            "put",
            "/admin/v1/assets/by-name/state-store/value",
            asset_put::<false>,
            "Set an asset state key",
            "adminPutAssetStateByName",
            ASSET_NAME_WRITE,
            AdminAssetPut,
            Empty,
            Admin
        ),
        route!(
            "delete",
            "/admin/v1/assets/by-name/state-store/value",
            asset_delete::<false>,
            "Delete an asset state key",
            "adminDeleteAssetStateByName",
            ASSET_NAME_KEY,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            "/admin/v1/assets/by-uri/state-store",
            asset_list::<true>,
            "List an asset's keys",
            "adminListAssetStatesByUri",
            ASSET_LIST_URI,
            None,
            Page,
            Admin
        ),
        route!(
            "delete",
            "/admin/v1/assets/by-uri/state-store",
            asset_clear::<true>,
            "Clear an asset",
            "adminClearAssetStatesByUri",
            ASSET_URI,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            "/admin/v1/assets/by-uri/state-store/value",
            asset_get::<true>,
            "Get an asset state key",
            "adminGetAssetStateByUri",
            ASSET_URI_KEY,
            None,
            Entry,
            Admin
        ),
        route!(
            "put",
            "/admin/v1/assets/by-uri/state-store/value",
            asset_put::<true>,
            "Set an asset state key",
            "adminPutAssetStateByUri",
            ASSET_URI_WRITE,
            AdminAssetPut,
            Empty,
            Admin
        ),
        route!(
            "delete",
            "/admin/v1/assets/by-uri/state-store/value",
            asset_delete::<true>,
            "Delete an asset state key",
            "adminDeleteAssetStateByUri",
            ASSET_URI_KEY,
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            ADMIN_ASSET_ID,
            id_list,
            "List an asset's keys, by Airflow's asset id",
            "adminListAssetStatesById",
            PAGING,
            None,
            Page,
            Admin
        ),
        route!(
            "delete",
            ADMIN_ASSET_ID,
            id_clear,
            "Clear an asset, by Airflow's asset id",
            "adminClearAssetStatesById",
            &[],
            None,
            Empty,
            Admin
        ),
        route!(
            "get",
            ADMIN_ASSET_ID_KEY,
            id_get,
            "Get an asset state key, by Airflow's asset id",
            "adminGetAssetStateById",
            &[],
            None,
            Entry,
            Admin
        ),
        route!(
            "put",
            ADMIN_ASSET_ID_KEY,
            id_put,
            "Set an asset state key (and its writer), by Airflow's asset id",
            "adminPutAssetStateById",
            SKIP_VALUE_LIMIT,
            AdminAssetPut,
            Empty,
            Admin
        ),
        route!(
            "delete",
            ADMIN_ASSET_ID_KEY,
            id_delete,
            "Delete an asset state key, by Airflow's asset id",
            "adminDeleteAssetStateById",
            &[],
            None,
            Empty,
            Admin
        ),
    ]
}

/// An operator holding the admin token. Checked before anything else of the request is
/// looked at, with the same 401/403 split as the Execution API.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, ApiError> {
        let Some(expected) = app.admin.token.as_deref() else {
            return Err(ApiError::RouteNotFound);
        };
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or(ApiError::Auth(AuthError::Missing))?;
        if same_secret(presented.trim(), expected) {
            Ok(Admin)
        } else {
            metrics::counter!("airstate_admin_auth_failures_total").increment(1);
            Err(ApiError::Auth(AuthError::Invalid))
        }
    }
}

/// Compares digests rather than the texts, so the time taken depends on neither the
/// token's length nor how many leading characters a guess got right.
fn same_secret(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn millis_to_rfc3339(at: EpochMillis) -> Value {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

/// An entry's members other than its value.
fn entry_meta(entry: &Entry, task: bool) -> Value {
    let mut out = json!({
        "key": entry.key,
        "updated_at": millis_to_rfc3339(entry.value.updated_at),
    });
    if task {
        out["expires_at"] = entry
            .value
            .expires_at
            .map(millis_to_rfc3339)
            .unwrap_or(Value::Null);
    } else {
        out["last_updated_by"] = entry
            .writer
            .as_ref()
            .and_then(|w| serde_json::to_value(w).ok())
            .unwrap_or(Value::Null);
    }
    out
}

fn raw_json_response(body: String) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// An entry as the admin API shows it: the stored JSON text is spliced in untouched, as
/// the Execution API serves it, so big integers and `1.0` come back as written.
fn entry_text(entry: &Entry, task: bool) -> String {
    let meta = entry_meta(entry, task).to_string();
    format!("{{\"value\":{},{}", entry.value.json, &meta[1..])
}

/// `map_index` (default -1, as in Airflow), `limit` and `after` from the query.
struct TaskQuery {
    map_index: i64,
    limit: usize,
    after: Option<String>,
    all_map_indices: bool,
}

fn int_issue(name: &str, text: &str) -> ValidationIssue {
    ValidationIssue::new(
        "int_parsing",
        &["query", name],
        "Input should be a valid integer, unable to parse string as an integer",
        json!(text),
    )
}

fn parse_query(query: Option<&str>) -> Result<TaskQuery, ApiError> {
    let params = query_params(query);
    let mut issues = Vec::new();
    let map_index = match params.get("map_index") {
        None => -1,
        Some(text) => match text.parse::<i64>() {
            Ok(index) if index >= -1 => index,
            Ok(_) => {
                issues.push(
                    ValidationIssue::new(
                        "greater_than_equal",
                        &["query", "map_index"],
                        "Input should be greater than or equal to -1",
                        json!(text),
                    )
                    .with_ctx(json!({"ge": -1})),
                );
                -1
            }
            Err(_) => {
                issues.push(int_issue("map_index", text));
                -1
            }
        },
    };
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => limit,
            Ok(_) => {
                issues.push(
                    ValidationIssue::new(
                        "less_than_equal",
                        &["query", "limit"],
                        format!("Input should be between 1 and {MAX_LIMIT}"),
                        json!(text),
                    )
                    .with_ctx(json!({"ge": 1, "le": MAX_LIMIT})),
                );
                DEFAULT_LIMIT
            }
            Err(_) => {
                issues.push(int_issue("limit", text));
                DEFAULT_LIMIT
            }
        },
    };
    let all_map_indices = match parse_bool_param(
        "all_map_indices",
        params.get("all_map_indices").map(String::as_str),
    ) {
        Ok(all) => all,
        Err(issue) => {
            issues.push(issue);
            false
        }
    };
    if !issues.is_empty() {
        return Err(ApiError::Validation(issues));
    }
    Ok(TaskQuery {
        map_index,
        limit,
        after: params.get("after").cloned(),
        all_map_indices,
    })
}

fn task_scope(params: &HashMap<String, String>, map_index: i64) -> Result<TaskScope, ApiError> {
    let mut issues = Vec::new();
    let mut part = |name: &str| {
        let text = params.get(name).cloned().unwrap_or_default();
        if text.is_empty() || text.chars().count() > 250 {
            issues.push(
                ValidationIssue::new(
                    "string_too_long",
                    &["path", name],
                    "String should have between 1 and 250 characters",
                    json!(text),
                )
                .with_ctx(json!({"min_length": 1, "max_length": 250})),
            );
        }
        text
    };
    let scope = TaskScope {
        dag_id: part("dag_id"),
        run_id: part("run_id"),
        task_id: part("task_id"),
        map_index,
        run_key: None,
    };
    if issues.is_empty() {
        Ok(scope)
    } else {
        Err(ApiError::Validation(issues))
    }
}

/// The scope keyed by its run's `dag_run.id` (see [`with_run_key`]); `None` when
/// Airflow has no such run, which reads see as empty.
async fn tracked(app: &AppState, scope: TaskScope) -> Result<Option<TaskScope>, ApiError> {
    Ok(with_run_key(app.identity.as_ref(), scope).await?)
}

/// As [`tracked`], for a write: state of a run Airflow does not have would be found by
/// nobody, so it is refused as Airflow's foreign key refuses it.
async fn tracked_for_write(app: &AppState, scope: TaskScope) -> Result<TaskScope, ApiError> {
    let (dag_id, run_id) = (scope.dag_id.clone(), scope.run_id.clone());
    tracked(app, scope)
        .await?
        .ok_or(ApiError::DagRunNotFound { dag_id, run_id })
}

fn path_key(params: &HashMap<String, String>) -> Result<String, ApiError> {
    let key = params.get("key").cloned().unwrap_or_default();
    check_key(&key, &["path", "key"])?;
    Ok(key)
}

/// Airflow's `max_value_storage_bytes`, measured on the JSON text as stored. Airflow's
/// Core REST API enforces it and its Execution API does not, so a caller storing on the
/// Execution API's behalf (the Airflow state backend) skips it with
/// `skip_value_limit=true`; the body cap (`AIRSTATE_MAX_BODY_BYTES`) still holds.
fn check_size(app: &AppState, value: &str, query: Option<&str>) -> Result<(), ApiError> {
    let params = query_params(query);
    if parse_bool_param(
        "skip_value_limit",
        params.get("skip_value_limit").map(String::as_str),
    )? {
        return Ok(());
    }
    let limit = app.admin.max_value_bytes;
    if !rules::exceeds_value_limit(value, limit) {
        return Ok(());
    }
    Err(ValidationIssue::new(
        "value_error",
        &["body", "value"],
        format!(
            "Value error, the value is {} bytes, over max_value_storage_bytes ({limit})",
            value.len()
        ),
        Value::Null,
    )
    .with_ctx(json!({"max_value_storage_bytes": limit}))
    .into())
}

/// One page of a sorted listing: entries after the `after` key, and the key to ask for
/// the next page with (`null` on the last one). Keyed by the last key seen rather than
/// an offset, so writes between pages never shift or repeat what a caller has read.
fn page(entries: Vec<Entry>, after: Option<&str>, limit: usize, task: bool) -> Response {
    let total = entries.len();
    let start = match after {
        Some(after) => entries.partition_point(|entry| entry.key.as_str() <= after),
        None => 0,
    };
    let slice = &entries[start..(start + limit).min(total)];
    let next = (start + limit < total)
        .then(|| slice.last().map(|entry| entry.key.clone()))
        .flatten();
    let mut body = String::from("{\"entries\":[");
    for (i, entry) in slice.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&entry_text(entry, task));
    }
    body.push_str(&format!(
        "],\"total_entries\":{total},\"next_after\":{}}}",
        json!(next)
    ));
    raw_json_response(body)
}

async fn task_list(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse_query(query.as_deref())?;
    let entries = match tracked(&app, task_scope(&params, query.map_index)?).await? {
        Some(scope) => app.store.list_task(&scope).await?,
        None => Vec::new(),
    };
    Ok(page(entries, query.after.as_deref(), query.limit, true))
}

async fn task_clear(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse_query(query.as_deref())?;
    if let Some(scope) = tracked(&app, task_scope(&params, query.map_index)?).await? {
        app.store.clear_task(&scope, query.all_map_indices).await?;
    }
    Ok(no_content())
}

async fn task_get(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse_query(query.as_deref())?;
    let scope = tracked(&app, task_scope(&params, query.map_index)?).await?;
    let key = path_key(&params)?;
    let Some(scope) = scope else {
        return Err(ApiError::TaskKeyNotFound(key));
    };
    match app.store.get_task(&scope, &key).await? {
        Some(value) => {
            let entry = Entry {
                key,
                value,
                writer: None,
            };
            Ok(raw_json_response(entry_text(&entry, true)))
        }
        None => Err(ApiError::TaskKeyNotFound(key)),
    }
}

async fn task_put(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let query_text = query;
    let query = parse_query(query_text.as_deref())?;
    let scope = task_scope(&params, query.map_index)?;
    let key = path_key(&params)?;
    let parsed = parse_put_body(body.content_type.as_deref(), &body.bytes, true)?;
    check_size(&app, parsed.value, query_text.as_deref())?;
    let scope = tracked_for_write(&app, scope).await?;
    app.store
        .put_task(&scope, &key, parsed.value, parsed.expires_at)
        .await?;
    Ok(no_content())
}

/// Changes the members given and keeps the others. The read and the write are tied by
/// the value's version (If-Match), so a concurrent write is never silently undone.
async fn task_patch(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let query_text = query;
    let query = parse_query(query_text.as_deref())?;
    let scope = task_scope(&params, query.map_index)?;
    let key = path_key(&params)?;
    let patch = parse_patch_body(body.content_type.as_deref(), &body.bytes)?;
    if let Some(value) = patch.value {
        check_size(&app, value, query_text.as_deref())?;
    }
    let Some(scope) = tracked(&app, scope).await? else {
        return Err(ApiError::TaskKeyNotFound(key));
    };
    for _ in 0..PATCH_ATTEMPTS {
        let Some(current) = app.store.get_task(&scope, &key).await? else {
            return Err(ApiError::TaskKeyNotFound(key));
        };
        let json = patch.value.unwrap_or(&current.json);
        let expires_at = patch.expires_at.unwrap_or(current.expires_at);
        let condition = Condition {
            if_match: Some(Tags::Listed(vec![current.version.clone()])),
            if_none_match: None,
        };
        let written = app
            .store
            .put_task_if(&scope, &key, json, expires_at, &condition)
            .await?;
        if matches!(written, Written::Applied(_)) {
            return Ok(no_content());
        }
    }
    Err(ApiError::PreconditionFailed)
}

async fn task_delete(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = parse_query(query.as_deref())?;
    let scope = tracked(&app, task_scope(&params, query.map_index)?).await?;
    let key = path_key(&params)?;
    if let Some(scope) = scope {
        app.store.delete_task(&scope, &key).await?;
    }
    Ok(no_content())
}

async fn asset_of(
    app: &AppState,
    by_uri: bool,
    query: Option<&str>,
    with_key: bool,
) -> Result<(AssetKey, Option<String>), ApiError> {
    let (asset, key) = from_query(By::of(by_uri), query, with_key)?;
    match app.identity.asset(&asset).await? {
        Some(found) => Ok((found, key)),
        None => Err(ApiError::AssetNotFound(asset)),
    }
}

async fn asset_list<const BY_URI: bool>(
    _: Admin,
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let paging = parse_query(query.as_deref())?;
    let (asset, _) = asset_of(&app, BY_URI, query.as_deref(), false).await?;
    let entries = app.store.list_asset(&asset).await?;
    Ok(page(entries, paging.after.as_deref(), paging.limit, false))
}

async fn asset_clear<const BY_URI: bool>(
    _: Admin,
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (asset, _) = asset_of(&app, BY_URI, query.as_deref(), false).await?;
    app.store.clear_asset(&asset).await?;
    Ok(no_content())
}

async fn asset_get<const BY_URI: bool>(
    _: Admin,
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_of(&app, BY_URI, query.as_deref(), true).await?;
    let key = key.unwrap_or_default();
    let Some(value) = app.store.get_asset(&asset, &key).await? else {
        return Err(ApiError::AssetKeyNotFound(key));
    };
    let writer = app.store.asset_writer(&asset, &key).await?;
    let entry = Entry { key, value, writer };
    Ok(raw_json_response(entry_text(&entry, false)))
}

async fn asset_put<const BY_URI: bool>(
    _: Admin,
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_of(&app, BY_URI, query.as_deref(), true).await?;
    put_asset_value(
        &app,
        &asset,
        &key.unwrap_or_default(),
        query.as_deref(),
        &body,
    )
    .await
}

/// An asset PUT body: Airflow's `{"value"}`, plus an optional `last_updated_by` naming
/// the writer to record (as the admin API's reads show it). Without it the writer is
/// Airflow's `api` kind, which its Core REST API records for an operator's write.
async fn put_asset_value(
    app: &AppState,
    asset: &AssetKey,
    key: &str,
    query: Option<&str>,
    body: &JsonBody,
) -> Result<Response, ApiError> {
    let (rest, writer) = split_writer(body.content_type.as_deref(), &body.bytes)?;
    let bytes = rest.as_deref().unwrap_or(&body.bytes);
    let parsed = parse_put_body(body.content_type.as_deref(), bytes, false)?;
    check_size(app, parsed.value, query)?;
    app.store
        .put_asset(asset, key, parsed.value, &writer)
        .await?;
    Ok(no_content())
}

/// Takes `last_updated_by` out of a JSON object body: the writer it names, and the body
/// without it (`None` when the member is absent, or the body is no object, which
/// [`parse_put_body`] then reports as it always does). The other members stay the
/// exact text received.
fn split_writer(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<(Option<Vec<u8>>, Writer), ApiError> {
    if !super::body::is_json_content_type(content_type) {
        return Ok((None, Writer::Api));
    }
    // Later duplicates win, as in Python's json (and `parse_put_body`).
    let Ok(mut members) = serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(bytes) else {
        return Ok((None, Writer::Api));
    };
    let Some(raw) = members.remove("last_updated_by") else {
        return Ok((None, Writer::Api));
    };
    let writer = parse_writer(&serde_json::from_str(raw.get()).unwrap_or(Value::Null))?;
    let rest = serde_json::to_vec(&members).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((Some(rest), writer))
}

/// Airflow's writer kinds and its rule (`validate_writer_fields`): a task writer names
/// its task instance in full; a watcher or an operator (`api`) names none.
fn parse_writer(value: &Value) -> Result<Writer, ApiError> {
    const LOC: &str = "last_updated_by";
    let issue = |field: &str, kind: &'static str, msg: &str, input: &Value| {
        let loc: Vec<&str> = if field.is_empty() {
            vec!["body", LOC]
        } else {
            vec!["body", LOC, field]
        };
        ValidationIssue::new(kind, &loc, msg, input.clone())
    };
    let Value::Object(members) = value else {
        if value.is_null() {
            return Ok(Writer::Api);
        }
        return Err(issue(
            "",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
            value,
        )
        .into());
    };
    let kind = members.get("kind").and_then(Value::as_str);
    let task_fields = ["dag_id", "run_id", "task_id", "map_index"];
    let mut issues = Vec::new();
    for name in members.keys() {
        if name != "kind" && !(kind == Some("task") && task_fields.contains(&name.as_str())) {
            issues.push(issue(
                name,
                "extra_forbidden",
                "Extra inputs are not permitted (a task writer alone names dag_id, run_id, task_id and map_index)",
                &members[name],
            ));
        }
    }
    let writer = match kind {
        Some("watcher") => Some(Writer::Watcher),
        Some("api") => Some(Writer::Api),
        Some("task") => {
            let mut text = |name: &str| match members.get(name) {
                Some(Value::String(text)) if (1..=250).contains(&text.chars().count()) => {
                    text.clone()
                }
                Some(other) => {
                    issues.push(
                        issue(
                            name,
                            "string_type",
                            "Input should be a string of 1 to 250 characters",
                            other,
                        )
                        .with_ctx(json!({"min_length": 1, "max_length": 250})),
                    );
                    String::new()
                }
                None => {
                    issues.push(ValidationIssue::missing(
                        &["body", LOC, name],
                        value.clone(),
                    ));
                    String::new()
                }
            };
            let (dag_id, run_id, task_id) = (text("dag_id"), text("run_id"), text("task_id"));
            let map_index = match members.get("map_index") {
                Some(index) => match index.as_i64() {
                    Some(index) if index >= -1 => index,
                    _ => {
                        issues.push(
                            issue(
                                "map_index",
                                "int_type",
                                "Input should be an integer greater than or equal to -1",
                                index,
                            )
                            .with_ctx(json!({"ge": -1})),
                        );
                        -1
                    }
                },
                None => {
                    issues.push(ValidationIssue::missing(
                        &["body", LOC, "map_index"],
                        value.clone(),
                    ));
                    -1
                }
            };
            Some(Writer::Task {
                dag_id,
                run_id,
                task_id,
                map_index,
            })
        }
        _ => {
            issues.push(
                issue(
                    "kind",
                    "enum",
                    "Input should be 'task', 'watcher' or 'api'",
                    members.get("kind").unwrap_or(&Value::Null),
                )
                .with_ctx(json!({"expected": "'task', 'watcher' or 'api'"})),
            );
            None
        }
    };
    match writer {
        Some(writer) if issues.is_empty() => Ok(writer),
        _ => Err(ApiError::Validation(issues)),
    }
}

async fn asset_delete<const BY_URI: bool>(
    _: Admin,
    State(app): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_of(&app, BY_URI, query.as_deref(), true).await?;
    app.store
        .delete_asset(&asset, &key.unwrap_or_default())
        .await?;
    Ok(no_content())
}

/// The asset of a `/by-id/{asset_id}` route, and its key when the route has one.
async fn asset_by_id(
    app: &AppState,
    params: &HashMap<String, String>,
    with_key: bool,
) -> Result<(AssetKey, String), ApiError> {
    let text = params.get("asset_id").map(String::as_str).unwrap_or("");
    let id = text.parse::<i64>().map_err(|_| {
        ValidationIssue::new(
            "int_parsing",
            &["path", "asset_id"],
            "Input should be a valid integer, unable to parse string as an integer",
            json!(text),
        )
    })?;
    let key = if with_key {
        path_key(params)?
    } else {
        String::new()
    };
    match app.identity.asset_by_id(id).await? {
        Some(asset) => Ok((asset, key)),
        None => Err(ApiError::AssetIdNotFound(id)),
    }
}

async fn id_list(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let paging = parse_query(query.as_deref())?;
    let (asset, _) = asset_by_id(&app, &params, false).await?;
    let entries = app.store.list_asset(&asset).await?;
    Ok(page(entries, paging.after.as_deref(), paging.limit, false))
}

async fn id_clear(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (asset, _) = asset_by_id(&app, &params, false).await?;
    app.store.clear_asset(&asset).await?;
    Ok(no_content())
}

async fn id_get(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_by_id(&app, &params, true).await?;
    let Some(value) = app.store.get_asset(&asset, &key).await? else {
        return Err(ApiError::AssetKeyNotFound(key));
    };
    let writer = app.store.asset_writer(&asset, &key).await?;
    let entry = Entry { key, value, writer };
    Ok(raw_json_response(entry_text(&entry, false)))
}

async fn id_put(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(query): RawQuery,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_by_id(&app, &params, true).await?;
    put_asset_value(&app, &asset, &key, query.as_deref(), &body).await
}

async fn id_delete(
    _: Admin,
    State(app): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (asset, key) = asset_by_id(&app, &params, true).await?;
    app.store.delete_asset(&asset, &key).await?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret("a-token", "a-token"));
        assert!(!same_secret("a-token", "a-tokeN"));
        assert!(!same_secret("", "a-token"));
    }
}
