//! The HTTP surface: routes, the middleware Airflow's API server puts around them
//! (API version header, correlation id, JWT and token refresh), and health endpoints.

pub mod admin;
pub mod asset;
pub mod body;
pub mod conditional;
pub mod core_api;
pub mod error;
pub mod extensions;
pub mod extract;
pub mod forward;
pub mod limits;
mod methods;
mod observe;
pub mod openapi;
pub mod routes;
pub mod task;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, VARY};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};

use axum::{Extension, Json, Router};
use serde_json::json;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::Compression;
use tracing::Instrument;

use crate::auth::{AuthError, Authenticator};
use crate::identity::IdentityResolver;
use crate::store::StateStore;
use error::{ApiError, ValidationIssue};
use extract::AuthOutcome;

/// Shared by every request; cheap to clone behind an `Arc`.
pub struct AppState {
    pub store: Arc<dyn StateStore>,
    pub identity: Arc<dyn IdentityResolver>,
    pub auth: Arc<Authenticator>,
    /// Set on SIGTERM so `/ready` turns the replica out of the Service before it stops.
    pub shutting_down: AtomicBool,
    pub ready_timeout: Duration,
    /// What `/ready` has seen of each dependency since start-up.
    pub reached: Reached,
    /// airstate's extensions beyond Airflow's API.
    pub extensions: crate::config::ExtensionSettings,
    pub admin: crate::config::AdminSettings,
    /// Airflow's API server, which gets every request not served here (`None`: 404s).
    pub upstream: Option<forward::Upstream>,
    /// Airflow's Core REST API state routes are served here (an upstream to ask about
    /// access, and the metastore identity for asset ids), rather than forwarded.
    pub serve_core_api: bool,
    pub access_cache: core_api::AccessCache,
    /// Requests and body bytes in flight (`limits`).
    pub limits: Arc<limits::RequestLimits>,
}

/// The smallest response body that is gzipped: the `minimum_size` Airflow's API server
/// gives its GZipMiddleware.
const GZIP_MIN_BYTES: u64 = 1024;

/// The newest Execution API version, and the one that introduced the state routes.
pub const API_VERSION: &str = "2026-06-30";
const API_VERSION_HEADER: HeaderName = HeaderName::from_static("airflow-api-version");
const REFRESHED_TOKEN: HeaderName = HeaderName::from_static("refreshed-api-token");

fn router(state: Arc<AppState>) -> Router {
    // Without an admin credential the admin surface does not exist (404), rather than
    // existing and refusing everyone.
    let routes = routes::routers(state.admin.token.is_some(), state.serve_core_api);
    // One `from_fn` layer per route, each running [`front`] first: a layer is a boxed
    // `Route` around every route, cloned with everything inside it on each request, so the
    // Execution API's own middleware shares the layer rather than adding a second (a GET
    // measured 2,244 instructions fewer). No body-limit layers either: every body is read
    // by `json_first` or `JsonBody`, which take the cap from the state.
    let app = routes
        .open
        .layer(from_fn_with_state(state.clone(), front_layer))
        .merge(
            routes
                .execution
                .layer(from_fn_with_state(state.clone(), execution_layer)),
        )
        .merge(
            routes
                .admin
                .layer(from_fn_with_state(state.clone(), front_layer)),
        )
        .merge(
            routes
                .core_api
                .layer(from_fn_with_state(state.clone(), core_api_layer)),
        );
    // Set after the layers, so no layer wraps them: each runs `front` itself.
    app.fallback(unrouted)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The HTTP surface: the router with gzip around it as one service, not as a route layer
/// (a GET measured 1,298 instructions fewer).
pub type App = Compression<Router, Gzippable>;

pub fn app(state: Arc<AppState>) -> App {
    Compression::new(router(state))
        .gzip(true)
        .compress_when(Gzippable)
}

/// Gzip for a client that accepts it (Airflow's Task SDK, whose httpx asks on every
/// request), from Airflow's own `minimum_size`. Airflow gzips smaller bodies too (its
/// GZipMiddleware sees the Execution API's answers as streams, so the minimum never
/// applies); here they go as they are: a ~30-byte value grows under gzip, and each gzip
/// stream zeroes a ~300 KB compressor (a gzipped GET measured 7.5 times the instructions
/// of an uncompressed one). Change streams stay uncompressed: a gzip encoder holds events
/// back until its buffer fills.
#[derive(Clone, Copy)]
pub struct Gzippable;

impl Predicate for Gzippable {
    fn should_compress<B: HttpBody>(&self, response: &axum::http::Response<B>) -> bool {
        SizeAbove::new(GZIP_MIN_BYTES)
            .and(NotForContentType::GRPC)
            .and(NotForContentType::IMAGES)
            .and(NotForContentType::SSE)
            .should_compress(response)
    }
}

/// Every answer's own middleware, outermost first: `vary`, load shedding (an overloaded
/// replica refuses before parsing or authenticating), the version echo, observation,
/// Airflow's 405s.
async fn front<F, Fut>(
    app: &AppState,
    matched: Option<&MatchedPath>,
    request: Request,
    next: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    vary_on_encoding(request, |request| {
        limits::shed(&app.limits, request, |request| {
            echo_api_version(request, |request| {
                observe::observe(matched, request, |request| {
                    methods::airflow_methods(request, next)
                })
            })
        })
    })
    .await
}

/// [`front`] alone: the gateway's own routes and the admin API.
async fn front_layer(
    State(app): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    front(&app, matched.as_ref(), request, |request| next.run(request)).await
}

/// The Execution API: [`front`], then its own checks as Airflow orders them: the API
/// version, the JSON syntax of a body, then the token.
async fn execution_layer(
    State(app): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    front(&app, matched.as_ref(), request, |request| {
        api_version(request, |request| {
            json_first(app.limits.max_body_bytes(), request, |request| {
                authenticate(&app, request, |request| next.run(request))
            })
        })
    })
    .await
}

/// The Core REST API's state routes: [`front`], then the JSON syntax of a body (their
/// own authorization is an extractor).
async fn core_api_layer(
    State(app): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    front(&app, matched.as_ref(), request, |request| {
        json_first(app.limits.max_body_bytes(), request, |request| {
            next.run(request)
        })
    })
    .await
}

/// A path no route serves: forwarded to Airflow (or 404 without one), through [`front`].
async fn unrouted(
    State(app): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
) -> Response {
    front(&app, matched.as_ref(), request, |request| {
        forward::forward(State(app.clone()), request)
    })
    .await
}

/// A method the path does not serve, through [`front`]; counted as unmatched (no
/// operation of the table served it).
async fn method_not_allowed(
    State(app): State<Arc<AppState>>,
    matched: Option<MatchedPath>,
    request: Request,
) -> Response {
    front(&app, matched.as_ref(), request, |_| async {
        (Extension(observe::Unrouted), ApiError::MethodNotAllowed).into_response()
    })
    .await
}

/// `vary: Accept-Encoding` on every response with a body, spelled as Airflow spells it
/// (tower-http's compression then sees it and adds none of its own).
async fn vary_on_encoding<F, Fut>(request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let mut response = next(request).await;
    let empty = response.body().size_hint().exact() == Some(0);
    let varies = response
        .headers()
        .get_all(VARY)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"accept-encoding"));
    if !empty && !varies {
        response
            .headers_mut()
            .append(VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    response
}

/// Cadwyn echoes the version on every answer of the Execution API, including a 405 and
/// an unknown route (which never reach [`api_version`]); forwarded answers carry
/// Airflow's own echo.
async fn echo_api_version<F, Fut>(request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let echo = request
        .uri()
        .path()
        .starts_with("/execution/")
        .then(|| version_echo(&request));
    let mut response = next(request).await;
    if let Some(echo) = echo {
        if !response.headers().contains_key(&API_VERSION_HEADER) {
            response.headers_mut().insert(API_VERSION_HEADER, echo);
        }
    }
    response
}

fn version_echo(request: &Request) -> HeaderValue {
    request
        .headers()
        .get(&API_VERSION_HEADER)
        .cloned()
        .unwrap_or(HeaderValue::from_static(API_VERSION))
}

pub(crate) fn value_response(json: &str) -> Response {
    let mut body = String::with_capacity(json.len() + 10);
    body.push_str("{\"value\":");
    body.push_str(json);
    body.push('}');
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn no_content() -> Response {
    // Airflow's 204s carry a JSON content type; some clients look at it.
    (StatusCode::NO_CONTENT, [(CONTENT_TYPE, "application/json")]).into_response()
}

/// FastAPI reads a JSON body while it solves a route's dependencies, before the auth
/// one has refused anything: broken JSON is a 422 (too deep a 400) even with no token.
async fn json_first<F, Fut>(limit: usize, request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let declared_json = body::is_json_content_type(
        request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok()),
    );
    if !declared_json {
        return next(request).await;
    }
    let (parts, payload) = request.into_parts();
    let bytes = match axum::body::to_bytes(payload, limit).await {
        Ok(bytes) => bytes,
        Err(error) => return extract::read_error(&error, limit).into_response(),
    };
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    if let Err(error) = body::check_syntax(content_type, &bytes) {
        return error.into_response();
    }
    next(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Validates the bearer token once per request; the verdict is read by the extractors,
/// and a token near expiry gets a `Refreshed-API-Token` on whatever response follows.
async fn authenticate<F, Fut>(app: &AppState, mut request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let header = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let outcome = app
        .auth
        .authenticate(header)
        .instrument(tracing::info_span!("auth.jwt"))
        .await;
    if let Err(error) = &outcome {
        let reason = match error {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::InvalidClaim(_) => "claim",
            AuthError::UnknownKid => "unknown_kid",
        };
        metrics::counter!("airstate_jwt_failures_total", "reason" => reason).increment(1);
    }
    let claims = outcome.as_ref().ok().cloned();
    request.extensions_mut().insert(AuthOutcome(outcome));
    let mut response = next(request).await;
    if let Some(claims) = claims {
        let now = chrono::Utc::now().timestamp();
        if let Some(token) = app.auth.refreshed_token(&claims, now) {
            if let Ok(value) = HeaderValue::from_str(&token) {
                response.headers_mut().insert(REFRESHED_TOKEN, value);
            }
        }
    }
    response
}

/// Airflow's Cadwyn versioning: no header means the newest version; dates before the
/// state routes existed find no route; later dates are served as the newest.
async fn api_version<F, Fut>(request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let requested = request.headers().get(&API_VERSION_HEADER).cloned();
    let echo = version_echo(&request);
    let refusal = requested.and_then(|value| {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match parse_version_date(&text) {
            None if inexact_date(&text) => Some(ApiError::Validation(vec![ValidationIssue::new(
                "date_from_datetime_inexact",
                &["header", "Airflow-API-Version"],
                "Datetimes provided to dates should have zero time - e.g. be exact dates",
                json!(text),
            )])),
            None => {
                let error = body::datetime_error(text.as_bytes());
                Some(ApiError::Validation(vec![ValidationIssue::new(
                    "date_from_datetime_parsing",
                    &["header", "Airflow-API-Version"],
                    format!("Input should be a valid date or datetime, {error}"),
                    json!(text),
                )
                .with_ctx(json!({"error": error}))]))
            }
            Some(date) if date.as_str() < API_VERSION => Some(ApiError::RouteNotFound),
            Some(_) => None,
        }
    });
    let mut response = match refusal {
        Some(error) => error.into_response(),
        None => next(request).await,
    };
    response.headers_mut().insert(API_VERSION_HEADER, echo);
    response
}

/// A requested version from before the state routes existed: Cadwyn routes by version,
/// so none of them matches, with any method.
pub(crate) fn predates_state_routes(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(&API_VERSION_HEADER)
        .and_then(|value| parse_version_date(&String::from_utf8_lossy(value.as_bytes())))
        .is_some_and(|date| date.as_str() < API_VERSION)
}

/// A valid datetime that is not midnight, or a Unix timestamp (pydantic reads digits as
/// one): pydantic's `date_from_datetime_inexact`.
fn inexact_date(text: &str) -> bool {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    text.get(..19).is_some_and(|head| {
        chrono::NaiveDateTime::parse_from_str(head, "%Y-%m-%dT%H:%M:%S").is_ok()
            || chrono::NaiveDateTime::parse_from_str(head, "%Y-%m-%d %H:%M:%S").is_ok()
    })
}

/// `YYYY-MM-DD`, or a datetime at exactly midnight as pydantic accepts for a date.
fn parse_version_date(text: &str) -> Option<String> {
    let date = text.get(..10)?;
    chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    if date.len() != 10 || !date.as_bytes()[4..].starts_with(b"-") {
        return None;
    }
    match &text[10..] {
        "" => Some(date.to_owned()),
        rest if rest.starts_with('T') || rest.starts_with(' ') => {
            let time = rest[1..].trim_end_matches('Z');
            let midnight = time
                .split(['.', '+'])
                .next()
                .is_some_and(|t| t == "00:00:00" || t == "00:00");
            midnight.then(|| date.to_owned())
        }
        _ => None,
    }
}

/// The OpenAPI document of what this replica serves (admin routes only when enabled).
async fn openapi_document(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(routes::document(
        app.admin.token.is_some(),
        app.serve_core_api,
    ))
}

/// Liveness: the process answers. Never tied to Redis, so a Redis outage does not get
/// every replica restarted.
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Prometheus text exposition of every metric the process records; gauges of state held
/// elsewhere (the metastore pool, `/proc`) are read now, so they are never stale.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    app.identity.record_metrics();
    let mut text = crate::telemetry::metrics_handle().render();
    text.push_str(&crate::telemetry::process_metrics());
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Readiness says whether this replica should get traffic, not whether Redis or the
/// metastore is up right now. Every replica shares those, so tying readiness to them would
/// take every pod out of the Service at once during an outage, and with them every
/// forwarded Execution API call (heartbeats, state transitions) that needs neither.
///
/// - 503 while shutting down, and until each dependency has answered once since start:
///   a replica started with a wrong Redis URL or password never turns ready, so a bad
///   rollout stops at its first pod.
/// - 200 otherwise. A dependency that is down now is named under `"unavailable"` with
///   `"status": "degraded"`; state calls then answer 503 with `Retry-After`.
///
/// `airstate_dependency_up` records each check, so alerts need not scrape `/ready`.
async fn ready(State(app): State<Arc<AppState>>) -> Response {
    if app.shutting_down.load(Ordering::Relaxed) {
        return not_ready("shutting down".into());
    }
    let dependencies = check_dependencies(&app);
    // Airflow's API server is reported, never required: state is served without it, and
    // every replica shares it, so taking replicas out of the Service would not help.
    let upstream = async {
        match &app.upstream {
            None => None,
            Some(upstream) => Some(match upstream.check(app.ready_timeout).await {
                Ok(status) => format!("answers ({status})"),
                Err(error) => format!("unreachable: {error}"),
            }),
        }
    };
    let warnings = tokio::time::timeout(app.ready_timeout, app.store.warnings());
    let (dependencies, upstream, warnings) = tokio::join!(dependencies, upstream, warnings);
    let mut unavailable = serde_json::Map::new();
    for (name, outcome, reached) in dependencies {
        if let Err(reason) = outcome {
            if !reached {
                return not_ready(format!("{name} not reached since start-up: {reason}"));
            }
            unavailable.insert(name.to_owned(), json!(reason));
        }
    }
    let status = if unavailable.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    let mut body = json!({"status": status});
    if !unavailable.is_empty() {
        body["unavailable"] = serde_json::Value::Object(unavailable);
    }
    match warnings {
        Ok(warnings) if warnings.is_empty() => {}
        Ok(warnings) => body["warnings"] = json!(warnings),
        Err(_) => body["warnings"] = json!(["Redis configuration check timed out"]),
    }
    if let Some(upstream) = upstream {
        body["airflow_api_server"] = json!(upstream);
    }
    Json(body).into_response()
}

/// Pings the store's and the identity resolver's dependencies (those they have), records
/// each outcome, and returns it with whether that dependency has ever answered.
pub async fn check_dependencies(app: &AppState) -> Vec<(&'static str, Result<(), String>, bool)> {
    let timeout = app.ready_timeout;
    let store = async {
        let name = app.store.dependency()?;
        Some((name, within(timeout, app.store.ping()).await))
    };
    let identity = async {
        let name = app.identity.dependency()?;
        Some((name, within(timeout, app.identity.ping()).await))
    };
    let (store, identity) = tokio::join!(store, identity);
    [store, identity]
        .into_iter()
        .flatten()
        .map(|(name, outcome)| {
            let reached = app.reached.record(name, outcome.is_ok());
            (name, outcome, reached)
        })
        .collect()
}

async fn within<E: std::fmt::Display>(
    timeout: Duration,
    ping: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, ping).await {
        Ok(outcome) => outcome.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within the readiness timeout".to_owned()),
    }
}

/// Which dependencies have answered a readiness check since start-up.
#[derive(Default)]
pub struct Reached {
    redis: AtomicBool,
    metastore: AtomicBool,
}

impl Reached {
    /// Records one check of `name` and returns whether it has ever answered.
    fn record(&self, name: &'static str, up: bool) -> bool {
        metrics::gauge!("airstate_dependency_up", "dependency" => name)
            .set(f64::from(u8::from(up)));
        let flag = match name {
            "redis" => &self.redis,
            _ => &self.metastore,
        };
        if up {
            flag.store(true, Ordering::Relaxed);
        }
        flag.load(Ordering::Relaxed)
    }
}

fn not_ready(reason: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"detail": format!("not ready: {reason}")})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::parse_version_date;

    #[test]
    fn version_dates() {
        assert_eq!(
            parse_version_date("2026-06-30").as_deref(),
            Some("2026-06-30")
        );
        assert_eq!(
            parse_version_date("2026-06-30T00:00:00").as_deref(),
            Some("2026-06-30")
        );
        assert_eq!(
            parse_version_date("2099-01-01").as_deref(),
            Some("2099-01-01")
        );
        assert_eq!(parse_version_date("garbage"), None);
        assert_eq!(parse_version_date("2026-6-30"), None);
        assert_eq!(parse_version_date("2026-06-30T10:00:00"), None);
    }
}
