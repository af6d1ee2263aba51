//! Airflow's Core REST API state routes (what Airflow's UI and `airflow` CLI call), served
//! from the same store the workers write, so the UI shows and edits what tasks see:
//!
//! - `/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store[/{key}]`
//! - `/api/v2/assets/{asset_id}/state-store[/{key}]`
//!
//! Paths, parameters, bodies, statuses and JSON shapes are Airflow 3.3.2's. Served only in
//! front of an upstream with the metastore identity (asset ids are the metastore's).
//!
//! **Access stays Airflow's decision.** Before anything else, the caller's own credentials
//! (`Authorization`, `Cookie`) go to Airflow with a question that needs the same permission
//! and changes nothing: the same route with a parameter Airflow must refuse after its
//! access check (FastAPI runs a route's dependencies, the check among them, before it
//! reports parameter and body errors). Airflow's 422 means "allowed"; any other answer
//! (401, 403, an unknown asset's 404) is returned to the caller as Airflow gave it. An
//! asset DELETE has no parameter to spoil, so its question is the DELETE of a reserved key
//! that holds no row. Positive answers are cached briefly per (credential, DAG or asset,
//! method).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::body::{check_key, parse_core_task_put, parse_put_body, CoreExpiry};
use super::error::{python_repr, ApiError, ValidationIssue};
use super::extract::{query_params, JsonBody};
use super::forward::ForwardError;
use super::openapi::{route, Route, CORE_PAGE, CORE_TASK_LIST, MAP_INDEX, TASK_CLEAR};
use super::{no_content, AppState};
use crate::identity::with_run_key;
use crate::store::rules;
use crate::store::version::Tags;
use crate::store::{AssetKey, Condition, Entry, EpochMillis, TaskScope, Writer, Written};

pub const TASK_PATH: &str =
    "/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store";
pub const ASSET_PATH: &str = "/api/v2/assets/{asset_id}/state-store";

/// The key an asset DELETE access question deletes: no real key has this name, so the
/// question deletes nothing.
const PROBE_KEY: &str = "airstate-access-probe";
/// Airflow's answers to access questions are short; a longer one is not read whole.
const MAX_PROBE_ANSWER_BYTES: usize = 64 * 1024;
/// Airflow's `[api] fallback_page_limit` and `maximum_page_limit` defaults.
const DEFAULT_PAGE_LIMIT: usize = 50;
pub(crate) const MAX_PAGE_LIMIT: usize = 100;

const CORE_TASK: &str = TASK_PATH;
const CORE_TASK_KEY: &str =
    "/api/v2/dags/{dag_id}/dagRuns/{dag_run_id}/taskInstances/{task_id}/state-store/{*key}";
const CORE_ASSET: &str = ASSET_PATH;
const CORE_ASSET_KEY: &str = "/api/v2/assets/{asset_id}/state-store/{*key}";

/// Airflow's Core REST API state routes: their part of the route table (`routes::table`),
/// served from the store in front of an upstream.
pub(super) fn routes() -> Vec<Route> {
    vec![
        route!(
            "get",
            CORE_TASK,
            task_list,
            "List a task instance's state (Airflow's Core REST API)",
            "coreListTaskStates",
            CORE_TASK_LIST,
            None,
            AirflowPage,
            Airflow
        ),
        route!(
            "delete",
            CORE_TASK,
            task_clear,
            "Clear a task instance's state",
            "coreClearTaskStates",
            TASK_CLEAR,
            None,
            Empty,
            Airflow
        ),
        route!(
            "get",
            CORE_TASK_KEY,
            task_get,
            "Get a task state key",
            "coreGetTaskState",
            MAP_INDEX,
            None,
            AirflowEntry,
            Airflow
        ),
        route!(
            "put",
            CORE_TASK_KEY,
            task_put,
            "Set a task state key",
            "corePutTaskState",
            MAP_INDEX,
            TaskPut,
            Empty,
            Airflow
        ),
        route!(
            "patch",
            CORE_TASK_KEY,
            task_patch,
            "Change the value of a task state key",
            "corePatchTaskState",
            MAP_INDEX,
            AssetPut,
            Document,
            Airflow
        ),
        route!(
            "delete",
            CORE_TASK_KEY,
            task_delete,
            "Delete a task state key",
            "coreDeleteTaskState",
            MAP_INDEX,
            None,
            Empty,
            Airflow
        ),
        route!(
            "get",
            CORE_ASSET,
            asset_list,
            "List an asset's state",
            "coreListAssetStates",
            CORE_PAGE,
            None,
            AirflowPage,
            Airflow
        ),
        route!(
            "delete",
            CORE_ASSET,
            asset_clear,
            "Clear an asset's state",
            "coreClearAssetStates",
            &[],
            None,
            Empty,
            Airflow
        ),
        route!(
            "get",
            CORE_ASSET_KEY,
            asset_get,
            "Get an asset state key",
            "coreGetAssetState",
            &[],
            None,
            AirflowEntry,
            Airflow
        ),
        route!(
            "put",
            CORE_ASSET_KEY,
            asset_put,
            "Set an asset state key",
            "corePutAssetState",
            &[],
            AssetPut,
            Empty,
            Airflow
        ),
        route!(
            "delete",
            CORE_ASSET_KEY,
            asset_delete,
            "Delete an asset state key",
            "coreDeleteAssetState",
            &[],
            None,
            Empty,
            Airflow
        ),
    ]
}

/// Positive access answers, keyed by a digest of the credential, the DAG or asset, and the
/// permission's method; bounded in entries and age.
pub struct AccessCache(moka::sync::Cache<String, ()>);

impl AccessCache {
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        )
    }
}

/// What Airflow protects: a DAG's task instances, or an asset.
enum Resource<'a> {
    Dag(&'a str),
    Asset(&'a str),
}

/// The access question for one request, and the answer that means "allowed".
struct Question {
    method: Method,
    /// Path and query, percent-encoded.
    target: String,
    body: Option<&'static str>,
    allowed: StatusCode,
}

/// An error already shaped as Airflow shapes it (`{"detail": "..."}` with a plain string).
fn airflow_error(status: StatusCode, detail: String) -> Refusal {
    Refusal::Airflow(Box::new(
        (status, axum::Json(json!({ "detail": detail }))).into_response(),
    ))
}

/// Asks Airflow whether the caller may do `permission` on `resource`; `Err` carries the
/// response to give the caller instead.
async fn authorize(
    app: &AppState,
    headers: &HeaderMap,
    resource: Resource<'_>,
    permission: &Method,
    question: Question,
) -> Result<(), Refusal> {
    let Some(upstream) = app.upstream.as_ref() else {
        return Err(ApiError::RouteNotFound.into());
    };
    let credential = |name| {
        headers
            .get(name)
            .map(|value| value.as_bytes().to_vec())
            .unwrap_or_default()
    };
    let (authorization, cookie) = (credential(AUTHORIZATION), credential(COOKIE));
    let mut digest = Sha256::new();
    for part in [authorization.as_slice(), b"\0", cookie.as_slice(), b"\0"] {
        digest.update(part);
    }
    match resource {
        Resource::Dag(dag_id) => digest.update(format!("dag\0{dag_id}")),
        Resource::Asset(asset_id) => digest.update(format!("asset\0{asset_id}")),
    }
    digest.update(format!("\0{permission}"));
    let cache_key = hex::encode(digest.finalize());
    if app.access_cache.0.get(&cache_key).is_some() {
        metrics::counter!("airstate_core_api_access_total", "result" => "cached").increment(1);
        return Ok(());
    }

    let mut request = axum::http::Request::builder()
        .method(question.method)
        .uri(question.target);
    for (name, value) in [(AUTHORIZATION, &authorization), (COOKIE, &cookie)] {
        if !value.is_empty() {
            request = request.header(name, value.as_slice());
        }
    }
    if question.body.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(question.body.map_or_else(Body::empty, Body::from))
        .map_err(|_| ApiError::BadRequest("Invalid request target"))?;
    let answer = upstream.ask(request, MAX_PROBE_ANSWER_BYTES).await;
    let (parts, bytes) = match answer {
        Ok(answer) => answer,
        Err(error) => {
            metrics::counter!("airstate_core_api_access_total", "result" => "error").increment(1);
            let unreachable = matches!(error, ForwardError::Unreachable(_));
            tracing::warn!(error = %error, unreachable, "access question to Airflow failed");
            return Err(error.into());
        }
    };
    if parts.status == question.allowed {
        metrics::counter!("airstate_core_api_access_total", "result" => "allowed").increment(1);
        app.access_cache.0.insert(cache_key, ());
        return Ok(());
    }
    metrics::counter!("airstate_core_api_access_total", "result" => "refused").increment(1);
    // Airflow's own refusal, as Airflow gave it.
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = parts.status;
    for name in [CONTENT_TYPE, axum::http::header::WWW_AUTHENTICATE] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Err(Refusal::Airflow(Box::new(response)))
}

/// The request's path as sent (percent-encoded), for asking Airflow about the same route.
fn sent_path(uri: &OriginalUri) -> &str {
    uri.0.path()
}

/// A task route's question: the same method and path with `map_index=-2`, which Airflow
/// refuses (422, `ge=-1`) only once access is granted.
fn task_question(method: &Method, uri: &OriginalUri) -> Question {
    let body = matches!(*method, Method::PUT | Method::PATCH).then_some("{}");
    Question {
        method: method.clone(),
        target: format!("{}?map_index=-2", sent_path(uri)),
        body,
        allowed: StatusCode::UNPROCESSABLE_ENTITY,
    }
}

/// An asset route's question, by permission.
fn asset_question(permission: &Method, asset_id: &str, uri: &OriginalUri) -> Question {
    let id = percent_encoding::utf8_percent_encode(asset_id, percent_encoding::NON_ALPHANUMERIC);
    match *permission {
        // `limit` must be non-negative.
        Method::GET => Question {
            method: Method::GET,
            target: format!("/api/v2/assets/{id}/state-store?limit=-1"),
            body: None,
            allowed: StatusCode::UNPROCESSABLE_ENTITY,
        },
        // A value may not be null.
        Method::PUT => Question {
            method: Method::PUT,
            target: sent_path(uri).to_owned(),
            body: Some(r#"{"value":null}"#),
            allowed: StatusCode::UNPROCESSABLE_ENTITY,
        },
        _ => Question {
            method: Method::DELETE,
            target: format!("/api/v2/assets/{id}/state-store/{PROBE_KEY}"),
            body: None,
            allowed: StatusCode::NO_CONTENT,
        },
    }
}

/// Airflow's query parameters of these routes, each checked as FastAPI checks it.
pub(crate) struct Query {
    pub(crate) map_index: i64,
    pub(crate) limit: usize,
    pub(crate) offset: usize,
    pub(crate) all_map_indices: bool,
}

pub(crate) fn parse_query(raw: Option<&str>) -> Result<Query, ApiError> {
    let params = query_params(raw);
    let mut issues = Vec::new();
    let mut int = |name: &'static str, default: i64, minimum: i64| -> i64 {
        let Some(text) = params.get(name) else {
            return default;
        };
        match text.trim().parse::<i64>() {
            Ok(number) if number >= minimum => number,
            Ok(_) => {
                issues.push(
                    ValidationIssue::new(
                        "greater_than_equal",
                        &["query", name],
                        format!("Input should be greater than or equal to {minimum}"),
                        json!(text),
                    )
                    .with_ctx(json!({ "ge": minimum })),
                );
                default
            }
            Err(_) => {
                issues.push(ValidationIssue::new(
                    "int_parsing",
                    &["query", name],
                    "Input should be a valid integer, unable to parse string as an integer",
                    json!(text),
                ));
                default
            }
        }
    };
    let map_index = int("map_index", -1, -1);
    let limit = int("limit", DEFAULT_PAGE_LIMIT as i64, 0);
    let offset = int("offset", 0, 0);
    let all_map_indices = match super::body::parse_bool_param(
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
    Ok(Query {
        map_index,
        // Airflow caps the page at `maximum_page_limit` rather than refusing.
        limit: (limit as usize).min(MAX_PAGE_LIMIT),
        offset: offset as usize,
        all_map_indices,
    })
}

fn scope_of(params: &HashMap<String, String>, map_index: i64) -> TaskScope {
    let part = |name: &str| params.get(name).cloned().unwrap_or_default();
    TaskScope {
        dag_id: part("dag_id"),
        run_id: part("dag_run_id"),
        task_id: part("task_id"),
        map_index,
        run_key: None,
    }
}

/// The scope keyed by its run's `dag_run.id`; `None` when Airflow has no such run.
async fn tracked(app: &AppState, scope: TaskScope) -> Result<Option<TaskScope>, Refusal> {
    Ok(with_run_key(app.identity.as_ref(), scope)
        .await
        .map_err(ApiError::from)?)
}

fn key_of(params: &HashMap<String, String>) -> Result<String, ApiError> {
    let key = params.get("key").cloned().unwrap_or_default();
    check_key(&key, &["path", "key"])?;
    Ok(key)
}

/// Pydantic's rendering of an aware UTC datetime: microseconds only when there are any.
fn datetime_text(at: EpochMillis) -> Value {
    match chrono::DateTime::from_timestamp_millis(at) {
        Some(t) if at % 1000 == 0 => json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
        Some(t) => json!(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        None => Value::Null,
    }
}

/// One entry as Airflow renders it; the value is spliced in as stored.
fn entry_text(entry: &Entry, task: bool) -> String {
    let mut text = format!(
        "{{\"key\":{},\"value\":{},\"updated_at\":{}",
        json!(entry.key),
        entry.value.json,
        datetime_text(entry.value.updated_at)
    );
    if task {
        let expires = entry.value.expires_at.map_or(Value::Null, datetime_text);
        text.push_str(&format!(",\"expires_at\":{expires}}}"));
    } else {
        let writer = match &entry.writer {
            None => Value::Null,
            Some(Writer::Task {
                dag_id,
                run_id,
                task_id,
                map_index,
            }) => json!({"kind": "task", "dag_id": dag_id, "run_id": run_id,
                         "task_id": task_id, "map_index": map_index}),
            Some(Writer::Watcher) => json!({"kind": "watcher", "dag_id": null, "run_id": null,
                                            "task_id": null, "map_index": null}),
            Some(Writer::Api) => json!({"kind": "api", "dag_id": null, "run_id": null,
                                        "task_id": null, "map_index": null}),
        };
        text.push_str(&format!(",\"last_updated_by\":{writer}}}"));
    }
    text
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

fn collection(entries: &[Entry], query: &Query, task: bool) -> Response {
    let member = if task {
        "task_state_store"
    } else {
        "asset_state_store"
    };
    let page = entries.iter().skip(query.offset).take(query.limit);
    let items: Vec<String> = page.map(|entry| entry_text(entry, task)).collect();
    json_response(
        StatusCode::OK,
        format!(
            "{{\"{member}\":[{}],\"total_entries\":{}}}",
            items.join(","),
            entries.len()
        ),
    )
}

/// Airflow's 404 before a write to a task instance it does not have.
async fn require_task_instance(
    app: &AppState,
    scope: &TaskScope,
    any_map_index: bool,
) -> Result<(), Refusal> {
    let map_index = (!any_map_index).then_some(scope.map_index);
    let exists = app
        .identity
        .task_instance_exists(&scope.dag_id, &scope.run_id, &scope.task_id, map_index)
        .await?;
    if exists {
        return Ok(());
    }
    let addressed_by = match map_index {
        None => "all_map_indices=True".to_owned(),
        Some(index) => format!("map_index={index}"),
    };
    Err(airflow_error(
        StatusCode::NOT_FOUND,
        format!(
            "Task instance not found for dag_id={}, run_id={}, task_id={}, {addressed_by}",
            python_repr(&scope.dag_id),
            python_repr(&scope.run_id),
            python_repr(&scope.task_id)
        ),
    ))
}

/// Airflow's `max_value_storage_bytes` check, worded as Airflow words it.
fn check_size(app: &AppState, value: &str) -> Result<(), ApiError> {
    let limit = app.admin.max_value_bytes;
    if !rules::exceeds_value_limit(value, limit) {
        return Ok(());
    }
    Err(ValidationIssue::new(
        "value_error",
        &["body", "value"],
        format!(
            "Value error, value exceeds max_value_storage_bytes ({limit}); raise \
             [state_store] max_value_storage_bytes or set it to 0 to disable the limit"
        ),
        serde_json::from_str(value).unwrap_or(Value::Null),
    )
    .with_ctx(json!({"error": {}}))
    .into())
}

fn expiry(app: &AppState, expiry: CoreExpiry) -> Option<EpochMillis> {
    match expiry {
        CoreExpiry::Never => None,
        CoreExpiry::At(at) => Some(at),
        CoreExpiry::Default => match app.admin.default_retention_days {
            0 => None,
            days => Some(crate::store::now_millis() + i64::from(days) * 86_400_000),
        },
    }
}

/// Why a Core REST API request was not served: our own error, or Airflow's answer to the
/// access question, passed on as Airflow gave it.
pub enum Refusal {
    Api(ApiError),
    Airflow(Box<Response>),
}

impl<E: Into<ApiError>> From<E> for Refusal {
    fn from(error: E) -> Self {
        Refusal::Api(error.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Api(error) => error.into_response(),
            Refusal::Airflow(response) => *response,
        }
    }
}

type Outcome = Result<Response, Refusal>;

async fn task_list(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::GET, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let entries = match tracked(&app, scope_of(&params, query.map_index)).await? {
        Some(scope) => app.store.list_task(&scope).await?,
        None => Vec::new(),
    };
    Ok(collection(&entries, &query, true))
}

async fn task_get(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::GET, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let scope = tracked(&app, scope_of(&params, query.map_index)).await?;
    let key = key_of(&params)?;
    let Some(scope) = scope else {
        return Err(task_key_not_found(&key));
    };
    let Some(value) = app.store.get_task(&scope, &key).await? else {
        return Err(task_key_not_found(&key));
    };
    let entry = Entry {
        key,
        value,
        writer: None,
    };
    Ok(json_response(StatusCode::OK, entry_text(&entry, true)))
}

async fn task_put(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
    body: JsonBody,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::PUT, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let scope = scope_of(&params, query.map_index);
    require_task_instance(&app, &scope, false).await?;
    let key = key_of(&params)?;
    // Gone between the two reads: the run was deleted just now.
    let Some(scope) = tracked(&app, scope).await? else {
        return Err(task_key_not_found(&key));
    };
    let (value, expires) = parse_core_task_put(body.content_type.as_deref(), &body.bytes)?;
    check_size(&app, value)?;
    let expires_at = expiry(&app, expires);
    app.store.put_task(&scope, &key, value, expires_at).await?;
    Ok(no_content())
}

/// Airflow's PATCH changes the value of an existing key and keeps its expiry; it answers
/// 200 with a `null` body.
async fn task_patch(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
    body: JsonBody,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::PATCH, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let scope = scope_of(&params, query.map_index);
    require_task_instance(&app, &scope, false).await?;
    let key = key_of(&params)?;
    // Gone between the two reads: the run was deleted just now.
    let Some(scope) = tracked(&app, scope).await? else {
        return Err(task_key_not_found(&key));
    };
    // Airflow's PATCH body holds `value` alone.
    let value = parse_put_body(body.content_type.as_deref(), &body.bytes, false)?.value;
    check_size(&app, value)?;
    let Some(current) = app.store.get_task(&scope, &key).await? else {
        return Err(task_key_not_found(&key));
    };
    // Tied to the version read, so a write in between is never undone silently.
    let condition = Condition {
        if_match: Some(Tags::Listed(vec![current.version])),
        if_none_match: None,
    };
    match app
        .store
        .put_task_if(&scope, &key, value, current.expires_at, &condition)
        .await?
    {
        Written::Applied(_) => Ok(json_response(StatusCode::OK, "null".into())),
        _ => Err(ApiError::PreconditionFailed.into()),
    }
}

async fn task_delete(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::DELETE, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let scope = scope_of(&params, query.map_index);
    require_task_instance(&app, &scope, false).await?;
    let key = key_of(&params)?;
    // Gone between the two reads: the run was deleted just now.
    let Some(scope) = tracked(&app, scope).await? else {
        return Err(task_key_not_found(&key));
    };
    app.store.delete_task(&scope, &key).await?;
    Ok(no_content())
}

async fn task_clear(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Outcome {
    authorize_task(&app, &headers, &params, Method::DELETE, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let scope = scope_of(&params, query.map_index);
    require_task_instance(&app, &scope, query.all_map_indices).await?;
    if let Some(scope) = tracked(&app, scope).await? {
        app.store.clear_task(&scope, query.all_map_indices).await?;
    }
    Ok(no_content())
}

fn task_key_not_found(key: &str) -> Refusal {
    airflow_error(
        StatusCode::NOT_FOUND,
        format!("Task state store key {} not found", python_repr(key)),
    )
}

/// A task route's access question; PATCH needs Airflow's PUT permission, as in Airflow.
async fn authorize_task(
    app: &AppState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    method: Method,
    uri: &OriginalUri,
) -> Result<(), Refusal> {
    let dag_id = params.get("dag_id").map_or("", String::as_str);
    let permission = if method == Method::PATCH {
        Method::PUT
    } else {
        method.clone()
    };
    let question = task_question(&method, uri);
    authorize(app, headers, Resource::Dag(dag_id), &permission, question).await
}

/// The store's key of an asset given by Airflow's integer id (the metastore identity keys
/// assets by that id). Airflow's 404 for an unknown id comes from the access question.
fn asset_key(params: &HashMap<String, String>) -> Result<AssetKey, Refusal> {
    let text = params.get("asset_id").map_or("", String::as_str);
    match text.parse::<i32>() {
        Ok(id) => Ok(AssetKey(id.to_string())),
        Err(_) => Err(ValidationIssue::new(
            "int_parsing",
            &["path", "asset_id"],
            "Input should be a valid integer, unable to parse string as an integer",
            json!(text),
        )
        .into()),
    }
}

async fn authorize_asset(
    app: &AppState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    permission: Method,
    uri: &OriginalUri,
) -> Result<AssetKey, Refusal> {
    let asset_id = params.get("asset_id").map_or("", String::as_str);
    let question = asset_question(&permission, asset_id, uri);
    authorize(
        app,
        headers,
        Resource::Asset(asset_id),
        &permission,
        question,
    )
    .await?;
    asset_key(params)
}

async fn asset_list(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Outcome {
    let asset = authorize_asset(&app, &headers, &params, Method::GET, &uri).await?;
    let query = parse_query(raw.as_deref())?;
    let entries = app.store.list_asset(&asset).await?;
    Ok(collection(&entries, &query, false))
}

async fn asset_get(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
) -> Outcome {
    let asset = authorize_asset(&app, &headers, &params, Method::GET, &uri).await?;
    let key = key_of(&params)?;
    let Some(value) = app.store.get_asset(&asset, &key).await? else {
        return Err(airflow_error(
            StatusCode::NOT_FOUND,
            format!("Asset state store key {} not found", python_repr(&key)),
        ));
    };
    let writer = app.store.asset_writer(&asset, &key).await?;
    let entry = Entry { key, value, writer };
    Ok(json_response(StatusCode::OK, entry_text(&entry, false)))
}

async fn asset_put(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
    body: JsonBody,
) -> Outcome {
    let asset = authorize_asset(&app, &headers, &params, Method::PUT, &uri).await?;
    let key = key_of(&params)?;
    let value = parse_put_body(body.content_type.as_deref(), &body.bytes, false)?.value;
    check_size(&app, value)?;
    app.store
        .put_asset(&asset, &key, value, &Writer::Api)
        .await?;
    Ok(no_content())
}

async fn asset_delete(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
) -> Outcome {
    let asset = authorize_asset(&app, &headers, &params, Method::DELETE, &uri).await?;
    let key = key_of(&params)?;
    app.store.delete_asset(&asset, &key).await?;
    Ok(no_content())
}

async fn asset_clear(
    State(app): State<Arc<AppState>>,
    uri: OriginalUri,
    headers: HeaderMap,
    Path(params): Path<HashMap<String, String>>,
) -> Outcome {
    let asset = authorize_asset(&app, &headers, &params, Method::DELETE, &uri).await?;
    app.store.clear_asset(&asset).await?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_render_as_pydantic_does() {
        assert_eq!(
            datetime_text(1_777_636_800_000),
            json!("2026-05-01T12:00:00Z")
        );
        assert_eq!(
            datetime_text(1_777_636_800_123),
            json!("2026-05-01T12:00:00.123000Z")
        );
    }

    #[test]
    fn queries_are_checked_as_fastapi_checks_them() {
        let query = parse_query(Some("map_index=3&limit=500&offset=2")).unwrap();
        assert_eq!(
            (query.map_index, query.limit, query.offset),
            (3, MAX_PAGE_LIMIT, 2)
        );
        let defaults = parse_query(None).unwrap();
        assert_eq!(
            (defaults.map_index, defaults.limit, defaults.offset),
            (-1, DEFAULT_PAGE_LIMIT, 0)
        );
        for bad in [
            "map_index=-2",
            "map_index=x",
            "limit=-1",
            "offset=-1",
            "all_map_indices=maybe",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
