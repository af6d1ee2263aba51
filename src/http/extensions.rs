//! What airstate offers beyond Airflow's API; nothing here changes a reply to a request
//! an unmodified Airflow client sends.
//!
//! - Optimistic concurrency: an `ETag` on every read and write of a key; `If-Match` and
//!   `If-None-Match` on PUT and DELETE (412 when they fail), and on GET (304); the core
//!   routes apply them, so they live in `conditional`.
//! - Bulk reads: many keys of a task scope or an asset in one call and one Redis round trip.
//! - Change streams: the same routes with `Accept: text/event-stream` stream Server-Sent
//!   Events for every set, delete and clear.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::asset::{from_query, resolve, By};
use super::body::check_key;
use super::error::{ApiError, ValidationIssue};
use super::extract::{query_params, ExecutionToken, JsonBody, TaskCaller};
use super::task::scope_of;
use super::AppState;
use crate::store::events::{Change, Delivery, Watch};
use crate::store::StoredValue;

/// The most keys one bulk read may ask for.
pub const MAX_BULK_KEYS: usize = 10_000;

// --- Bulk reads -------------------------------------------------------------------------

/// `?keys=a,b,c`: the keys of a bulk GET (keys holding a comma need the POST form).
pub(crate) fn keys_from_query(query: Option<&str>) -> Result<Vec<String>, ApiError> {
    let params = query_params(query);
    let Some(list) = params.get("keys") else {
        return Err(ValidationIssue::missing(&["query", "keys"], Value::Null).into());
    };
    checked_keys(list.split(',').map(str::to_owned), "query")
}

/// `{"keys": ["a", "b"]}`: the keys of a bulk POST.
fn keys_from_body(body: &JsonBody) -> Result<Vec<String>, ApiError> {
    let parsed: Value = serde_json::from_slice(&body.bytes).map_err(|e| {
        ValidationIssue::new("json_invalid", &["body"], "JSON decode error", json!({}))
            .with_ctx(json!({"error": e.to_string()}))
    })?;
    let Some(list) = parsed.get("keys") else {
        return Err(ValidationIssue::missing(&["body", "keys"], parsed.clone()).into());
    };
    let Some(items) = list.as_array() else {
        return Err(ValidationIssue::new(
            "list_type",
            &["body", "keys"],
            "Input should be a valid list",
            list.clone(),
        )
        .into());
    };
    let mut keys = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(key) => keys.push(key.to_owned()),
            None => {
                return Err(ValidationIssue::new(
                    "string_type",
                    &["body", "keys"],
                    "Input should be a valid string",
                    item.clone(),
                )
                .into())
            }
        }
    }
    checked_keys(keys.into_iter(), "body")
}

/// Validates each key as a single-key route would, drops repeats, enforces the limits.
fn checked_keys(
    keys: impl Iterator<Item = String>,
    source: &'static str,
) -> Result<Vec<String>, ApiError> {
    let loc = [source, "keys"];
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut issues = Vec::new();
    for key in keys {
        if let Err(issue) = check_key(&key, &loc) {
            issues.push(issue);
        } else if seen.insert(key.clone()) {
            out.push(key);
        }
    }
    if !issues.is_empty() {
        return Err(ApiError::Validation(issues));
    }
    if out.is_empty() || out.len() > MAX_BULK_KEYS {
        return Err(ValidationIssue::new(
            "too_long",
            &loc,
            format!("List should have between 1 and {MAX_BULK_KEYS} distinct keys"),
            json!(out.len()),
        )
        .with_ctx(json!({"min_length": 1, "max_length": MAX_BULK_KEYS}))
        .into());
    }
    Ok(out)
}

/// `{"values": {key: value, ...}, "etags": {key: "\"v\"", ...}, "missing": [key, ...]}`,
/// values as the exact JSON text stored, keys in the order asked.
fn bulk_response(keys: &[String], values: Vec<Option<StoredValue>>) -> Response {
    let mut body = String::from("{\"values\":{");
    let mut etags = String::from("\"etags\":{");
    let mut missing = String::from("\"missing\":[");
    let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
    for (key, value) in keys.iter().zip(values) {
        let key = quoted(key);
        match value {
            Some(value) => {
                if !body.ends_with('{') {
                    body.push(',');
                    etags.push(',');
                }
                body.push_str(&key);
                body.push(':');
                body.push_str(&value.json);
                etags.push_str(&key);
                etags.push(':');
                etags.push_str(&quoted(&format!("\"{}\"", value.version)));
            }
            None => {
                if !missing.ends_with('[') {
                    missing.push(',');
                }
                missing.push_str(&key);
            }
        }
    }
    body.push_str("},");
    body.push_str(&etags);
    body.push_str("},");
    body.push_str(&missing);
    body.push_str("]}");
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /execution/store/ti/{id}?keys=a,b,c`: many keys of the caller's own scope; with
/// `Accept: text/event-stream`, the scope's change stream (`keys` then optional, a filter).
pub async fn task_bulk_get(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if wants_event_stream(&headers) {
        streams_on(&app)?;
        let filter = key_filter(query.as_deref())?;
        let scope = scope_of(&app, &caller).await?;
        let watch = app.store.watch_task(&scope).await?;
        return Ok(event_stream(&app, watch, filter, caller.claims.expires_at));
    }
    // Without `keys` this is the request Airflow answers 405 (the path only clears), and
    // so does airstate: the extension is only for clients that ask for it.
    if !query_params(query.as_deref()).contains_key("keys") {
        return Err(ApiError::MethodNotAllowed);
    }
    let keys = keys_from_query(query.as_deref())?;
    task_bulk(&app, &caller, keys).await
}

fn streams_on(app: &AppState) -> Result<(), ApiError> {
    if app.extensions.change_streams {
        Ok(())
    } else {
        Err(ApiError::ChangeStreamsOff)
    }
}

/// `POST /execution/store/ti/{id}` with `{"keys": [...]}`: any keys, commas included.
pub async fn task_bulk_post(
    State(app): State<Arc<AppState>>,
    caller: TaskCaller,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let keys = keys_from_body(&body)?;
    task_bulk(&app, &caller, keys).await
}

async fn task_bulk(
    app: &AppState,
    caller: &TaskCaller,
    keys: Vec<String>,
) -> Result<Response, ApiError> {
    let scope = scope_of(app, caller).await?;
    let values = app
        .store
        .get_task_many(&scope, &keys, app.extensions.bulk_read_max_bytes)
        .await?;
    Ok(bulk_response(&keys, values))
}

/// `GET /execution/store/asset/by-{name,uri}/values?name=&keys=a,b,c`.
pub async fn asset_bulk_get<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (asset, _) = from_query(By::of(BY_URI), query.as_deref(), false)?;
    if wants_event_stream(&headers) {
        streams_on(&app)?;
        let filter = key_filter(query.as_deref())?;
        let asset = resolve(&app, &claims, asset).await?;
        let watch = app.store.watch_asset(&asset).await?;
        return Ok(event_stream(&app, watch, filter, claims.expires_at));
    }
    let keys = keys_from_query(query.as_deref())?;
    let asset = resolve(&app, &claims, asset).await?;
    let values = app
        .store
        .get_asset_many(&asset, &keys, app.extensions.bulk_read_max_bytes)
        .await?;
    Ok(bulk_response(&keys, values))
}

/// `POST /execution/store/asset/by-{name,uri}/values?name=` with `{"keys": [...]}`.
pub async fn asset_bulk_post<const BY_URI: bool>(
    State(app): State<Arc<AppState>>,
    ExecutionToken(claims): ExecutionToken,
    RawQuery(query): RawQuery,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let (asset, _) = from_query(By::of(BY_URI), query.as_deref(), false)?;
    let keys = keys_from_body(&body)?;
    let asset = resolve(&app, &claims, asset).await?;
    let values = app
        .store
        .get_asset_many(&asset, &keys, app.extensions.bulk_read_max_bytes)
        .await?;
    Ok(bulk_response(&keys, values))
}

// --- Change streams -----------------------------------------------------------------------

/// Whether the client asked for Server-Sent Events.
fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("text/event-stream")
        })
}

/// `?keys=` on a stream: only events of these keys (and clears) are sent.
fn key_filter(query: Option<&str>) -> Result<Option<HashSet<String>>, ApiError> {
    if !query_params(query).contains_key("keys") {
        return Ok(None);
    }
    Ok(Some(keys_from_query(query)?.into_iter().collect()))
}

struct Stream {
    watch: Watch,
    filter: Option<HashSet<String>>,
    /// The token's expiry: the stream ends there, and the client reconnects with a new one.
    expires: tokio::time::Instant,
    started: bool,
    done: bool,
}

/// The SSE response: `ready` once events are flowing, then `set` / `delete` / `clear`;
/// it ends with `lagged` (events were lost: re-read and reconnect), `expired` (the token
/// expired) or `shutdown`. Idle streams get a keep-alive comment every heartbeat.
fn event_stream(
    app: &AppState,
    watch: Watch,
    filter: Option<HashSet<String>>,
    token_expires_at: i64,
) -> Response {
    let left = (token_expires_at - chrono::Utc::now().timestamp()).max(0) as u64;
    let state = Stream {
        watch,
        filter,
        expires: tokio::time::Instant::now() + std::time::Duration::from_secs(left),
        started: false,
        done: false,
    };
    metrics::gauge!("airstate_change_streams").increment(1.0);
    let events = futures_util::stream::unfold(state, |mut state| async move {
        let event = next_event(&mut state).await?;
        Some((Ok::<_, Infallible>(event), state))
    });
    let keep_alive = KeepAlive::new().interval(app.extensions.change_stream_heartbeat);
    let mut response = Sse::new(events).keep_alive(keep_alive).into_response();
    // Tell proxies such as nginx not to buffer the stream.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}

impl Drop for Stream {
    fn drop(&mut self) {
        metrics::gauge!("airstate_change_streams").decrement(1.0);
    }
}

async fn next_event(state: &mut Stream) -> Option<SseEvent> {
    if state.done {
        return None;
    }
    if !state.started {
        state.started = true;
        return Some(SseEvent::default().event("ready").data("{}"));
    }
    let ending =
        |name: &'static str, data: String| Some(SseEvent::default().event(name).data(data));
    loop {
        let closed = async {
            loop {
                if *state.watch.closed.borrow_and_update() {
                    return;
                }
                if state.watch.closed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let received = tokio::select! {
            _ = closed => {
                state.done = true;
                return ending("shutdown", "{}".into());
            }
            _ = tokio::time::sleep_until(state.expires) => {
                state.done = true;
                return ending("expired", "{}".into());
            }
            received = state.watch.deliveries.recv() => received,
        };
        let event = match received {
            Ok(Delivery::Event(event)) => event,
            Ok(Delivery::Lost) => {
                state.done = true;
                metrics::counter!("airstate_change_streams_lagged_total").increment(1);
                return ending("lagged", "{\"missed\":null}".into());
            }
            Err(RecvError::Lagged(missed)) => {
                state.done = true;
                metrics::counter!("airstate_change_streams_lagged_total").increment(1);
                metrics::counter!("airstate_change_stream_events_missed_total").increment(missed);
                return ending("lagged", format!("{{\"missed\":{missed}}}"));
            }
            Err(RecvError::Closed) => return None,
        };
        if !event.concerns(state.watch.map_index) {
            continue;
        }
        let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
        let wanted = |key: &str| state.filter.as_ref().is_none_or(|keys| keys.contains(key));
        let data = match &event.change {
            Change::Set { key, json, version } if wanted(key) => format!(
                "{{\"key\":{},\"value\":{json},\"etag\":{}}}",
                quoted(key),
                quoted(&format!("\"{version}\""))
            ),
            Change::Delete { key } if wanted(key) => format!("{{\"key\":{}}}", quoted(key)),
            Change::Clear => format!(
                "{{\"all_map_indices\":{}}}",
                event.map_index.is_none() && state.watch.map_index.is_some()
            ),
            _ => continue,
        };
        let name = event.change.kind().name();
        return Some(SseEvent::default().event(name).data(data));
    }
}
