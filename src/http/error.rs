//! Every failure a request can meet, mapped to Airflow's status codes and FastAPI's
//! `{"detail": ...}` bodies in this one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::{AuthError, TokenScope};
use crate::identity::{AssetRef, IdentityError};
use crate::store::StoreError;

/// Seconds a client is told to wait when a dependency is down.
const RETRY_AFTER_SECONDS: &str = "1";

/// One entry of FastAPI's validation-error list.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ValidationIssue {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub loc: Vec<Value>,
    pub msg: String,
    // Boxed: a `Value` is large, and issues travel in `Result`s.
    pub input: Box<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctx: Option<Box<Value>>,
}

impl ValidationIssue {
    pub fn new(kind: &'static str, loc: &[&str], msg: impl Into<String>, input: Value) -> Self {
        Self {
            kind,
            loc: loc.iter().map(|part| Value::from(*part)).collect(),
            msg: msg.into(),
            input: Box::new(input),
            ctx: None,
        }
    }

    pub fn with_ctx(mut self, ctx: Value) -> Self {
        self.ctx = Some(Box::new(ctx));
        self
    }

    pub fn missing(loc: &[&str], input: Value) -> Self {
        Self::new("missing", loc, "Field required", input)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("token type {0:?} not allowed")]
    TokenType(TokenScope),
    #[error("token subject does not match the task instance")]
    SubjectMismatch,
    #[error("request validation failed")]
    Validation(Vec<ValidationIssue>),
    #[error("task instance {0} not found")]
    TaskInstanceNotFound(Uuid),
    /// The writer of an asset value is the token's task instance; Airflow words this one
    /// with the UUID's Python repr.
    #[error("writer task instance {0} not found")]
    WriterNotFound(Uuid),
    #[error("asset not found")]
    AssetNotFound(AssetRef),
    /// The admin API's `/assets/by-id/{asset_id}` names no row of Airflow's `asset` table.
    #[error("asset id {0} not found")]
    AssetIdNotFound(i64),
    /// Asset ids asked of a gateway whose identity is not the metastore.
    #[error("asset ids need the metastore identity")]
    NoAssetIds,
    #[error("task state key not found")]
    TaskKeyNotFound(String),
    /// A write naming a DAG run Airflow does not have (with the metastore identity).
    #[error("DAG run not found")]
    DagRunNotFound { dag_id: String, run_id: String },
    #[error("asset state key not found")]
    AssetKeyNotFound(String),
    #[error("route not found")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Nested deeper than Python's decoder goes (FastAPI's 400).
    #[error("request body nested too deep to parse")]
    BodyUnparseable,
    #[error("request body over {0} bytes")]
    PayloadTooLarge(usize),
    /// A bulk read whose values total more than `AIRSTATE_BULK_READ_MAX_BYTES`.
    #[error("bulk read of {bytes} bytes over the limit of {limit}")]
    BulkReadTooLarge { bytes: u64, limit: u64 },
    /// `AIRSTATE_ASSET_REGISTRATION_CHECK`: the task is neither an inlet nor an outlet of
    /// the asset.
    #[error("task not registered with the asset")]
    AssetNotRegistered {
        dag_id: String,
        task_id: String,
        asset: AssetRef,
    },
    /// A malformed extension header (`If-Match`, `If-None-Match`).
    #[error("bad header: {0}")]
    BadHeader(String),
    /// `Accept: text/event-stream` on a gateway run with `AIRSTATE_CHANGE_STREAMS=false`.
    #[error("change streams are off")]
    ChangeStreamsOff,
    /// `If-Match` / `If-None-Match` did not hold; nothing was written.
    #[error("precondition failed")]
    PreconditionFailed,
    /// Forwarding: Airflow's API server refused the connection or broke it off.
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    /// Forwarding: Airflow's API server did not answer within the timeout.
    #[error("upstream timed out after {0} ms")]
    UpstreamTimeout(u128),
    /// A request that is malformed at the HTTP level (framing, target).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request body did not arrive in full within `AIRSTATE_BODY_READ_TIMEOUT_MS`.
    #[error("request body timed out after {0} ms")]
    BodyTimeout(u128),
    /// Past `AIRSTATE_MAX_CONCURRENT_REQUESTS` or `AIRSTATE_MAX_BODY_BYTES_IN_FLIGHT`.
    #[error("overloaded")]
    Overloaded,
    /// The replica is stopping and cut off a request whose body was still arriving.
    #[error("shutting down")]
    ShuttingDown,
    #[error("dependency unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(reason) => ApiError::Unavailable(reason),
            StoreError::Internal(reason) => ApiError::Internal(reason),
            StoreError::TooLarge { bytes, limit } => ApiError::BulkReadTooLarge { bytes, limit },
        }
    }
}

impl From<&crate::server::BodyCut> for ApiError {
    fn from(cut: &crate::server::BodyCut) -> Self {
        match cut {
            crate::server::BodyCut::Timeout(millis) => ApiError::BodyTimeout(*millis),
            crate::server::BodyCut::ShuttingDown => ApiError::ShuttingDown,
        }
    }
}

impl From<IdentityError> for ApiError {
    fn from(error: IdentityError) -> Self {
        match error {
            IdentityError::Unavailable(reason) => ApiError::Unavailable(reason),
            IdentityError::NoAssetIds => ApiError::NoAssetIds,
            IdentityError::InvalidClaims(problem) => {
                ApiError::Auth(AuthError::InvalidClaim(problem))
            }
        }
    }
}

/// Why a request did not reach the upstream or its answer did not come back.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("Airflow's API server is unreachable: {0}")]
    Unreachable(String),
    #[error("Airflow's API server did not answer within {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    BadRequest(&'static str),
}

impl From<ForwardError> for ApiError {
    fn from(error: ForwardError) -> Self {
        match error {
            ForwardError::Unreachable(reason) => ApiError::UpstreamUnreachable(reason),
            ForwardError::Timeout(millis) => ApiError::UpstreamTimeout(millis),
            ForwardError::BadRequest(message) => ApiError::BadRequest(message),
        }
    }
}

impl From<ValidationIssue> for ApiError {
    fn from(issue: ValidationIssue) -> Self {
        ApiError::Validation(vec![issue])
    }
}

fn not_found(message: String) -> Value {
    json!({"reason": "not_found", "message": message})
}

/// Python's `repr` of a string, which Airflow puts in its not-found messages.
pub fn python_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_printable(c) => {
                let code = c as u32;
                let escaped = if code < 0x100 {
                    format!("\\x{code:02x}")
                } else if code < 0x10000 {
                    format!("\\u{code:04x}")
                } else {
                    format!("\\U{code:08x}")
                };
                out.push_str(&escaped);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `str.isprintable`: not a control, format, private-use or unassigned
/// character, nor a separator other than the space. Unassigned code points are known here
/// only as the noncharacters (no Unicode tables are linked in).
fn python_printable(c: char) -> bool {
    let code = c as u32;
    !matches!(code,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad
        // Separators: spaces other than ' ', line and paragraph.
        | 0x1680 | 0x2000..=0x200a | 0x2028 | 0x2029 | 0x202f | 0x205f | 0x3000
        // Format characters.
        | 0x0600..=0x0605 | 0x061c | 0x06dd | 0x070f | 0x0890 | 0x0891 | 0x08e2 | 0x180e
        | 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f | 0xfeff
        | 0xfff9..=0xfffb | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3
        | 0x1d173..=0x1d17a | 0xe0001 | 0xe0020..=0xe007f
        // Private use.
        | 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd
        // Noncharacters (unassigned).
        | 0xfdd0..=0xfdef)
        && code & 0xfffe != 0xfffe
}

impl ApiError {
    fn status_and_detail(&self) -> (StatusCode, Value) {
        use ApiError::*;
        match self {
            Auth(AuthError::Missing) => (StatusCode::UNAUTHORIZED, json!("Missing auth token")),
            Auth(error) => (StatusCode::FORBIDDEN, json!(error.to_string())),
            TokenType(scope) => (
                StatusCode::FORBIDDEN,
                json!(format!(
                    "Token type '{}' not allowed for this endpoint. Allowed types: execution",
                    scope.as_str()
                )),
            ),
            SubjectMismatch => (
                StatusCode::FORBIDDEN,
                json!("Token subject does not match task instance ID"),
            ),
            Validation(issues) => (StatusCode::UNPROCESSABLE_ENTITY, json!(issues)),
            TaskInstanceNotFound(ti) => (
                StatusCode::NOT_FOUND,
                not_found(format!("Task instance {ti} not found")),
            ),
            WriterNotFound(ti) => (
                StatusCode::NOT_FOUND,
                not_found(format!("Task instance UUID('{ti}') not found")),
            ),
            AssetNotFound(asset) => {
                let (field, value) = match asset {
                    AssetRef::Name(name) => ("name", name),
                    AssetRef::Uri(uri) => ("uri", uri),
                };
                (
                    StatusCode::NOT_FOUND,
                    not_found(format!(
                        "Asset with {field}={} not found",
                        python_repr(value)
                    )),
                )
            }
            // Worded as Airflow's Core REST API words it.
            AssetIdNotFound(id) => (
                StatusCode::NOT_FOUND,
                not_found(format!("Asset with id {id} not found")),
            ),
            NoAssetIds => (
                StatusCode::BAD_REQUEST,
                json!({
                    "reason": "asset_ids_need_metastore",
                    "message": "Assets are addressed by Airflow's asset id only when airstate reads \
                                Airflow's metastore (AIRSTATE_IDENTITY=metastore); this gateway takes \
                                identity from token claims, so name the asset by name or URI",
                }),
            ),
            DagRunNotFound { dag_id, run_id } => (
                StatusCode::NOT_FOUND,
                not_found(format!(
                    "DagRun with dag_id: {} and run_id: {} was not found",
                    python_repr(dag_id),
                    python_repr(run_id)
                )),
            ),
            TaskKeyNotFound(key) => (
                StatusCode::NOT_FOUND,
                not_found(format!(
                    "Task state store key {} not found",
                    python_repr(key)
                )),
            ),
            AssetKeyNotFound(key) => (
                StatusCode::NOT_FOUND,
                not_found(format!(
                    "Asset state store key {} not found",
                    python_repr(key)
                )),
            ),
            RouteNotFound => (StatusCode::NOT_FOUND, json!("Not Found")),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, json!("Method Not Allowed")),
            BodyUnparseable => (
                StatusCode::BAD_REQUEST,
                json!("There was an error parsing the body"),
            ),
            PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!(format!(
                    "Request body is larger than the limit of {limit} bytes"
                )),
            ),
            // 422, not 413: the request is small, what it asks for is not; the same request
            // fails the same way until fewer keys are asked for, so no Retry-After.
            BulkReadTooLarge { bytes, limit } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "reason": "bulk_read_too_large",
                    "message": format!(
                        "The values asked for total {bytes} bytes as stored, more than the \
                         {limit} bytes one bulk read returns (AIRSTATE_BULK_READ_MAX_BYTES); \
                         ask for fewer keys at a time"
                    ),
                    "bytes": bytes,
                    "limit": limit,
                }),
            ),
            AssetNotRegistered {
                dag_id,
                task_id,
                asset,
            } => {
                let (field, value) = match asset {
                    AssetRef::Name(name) => ("name", name),
                    AssetRef::Uri(uri) => ("uri", uri),
                };
                (
                    StatusCode::FORBIDDEN,
                    json!({
                        "reason": "asset_not_registered",
                        "message": format!(
                            "Task {} of DAG {} is not registered with the asset with {field}={} \
                             as an inlet or outlet",
                            python_repr(task_id),
                            python_repr(dag_id),
                            python_repr(value)
                        ),
                    }),
                )
            }
            BadHeader(message) => (StatusCode::BAD_REQUEST, json!(message)),
            ChangeStreamsOff => (
                StatusCode::NOT_ACCEPTABLE,
                json!({
                    "reason": "change_streams_off",
                    "message": "This gateway serves no change streams (AIRSTATE_CHANGE_STREAMS=false); poll the values instead",
                }),
            ),
            PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                json!({
                    "reason": "precondition_failed",
                    "message": "The key's current version does not satisfy If-Match / If-None-Match; nothing was changed",
                }),
            ),
            UpstreamUnreachable(_) => (
                StatusCode::BAD_GATEWAY,
                json!("Airflow's API server is unreachable, retry later"),
            ),
            UpstreamTimeout(millis) => (
                StatusCode::GATEWAY_TIMEOUT,
                json!(format!(
                    "Airflow's API server did not answer within {millis} ms"
                )),
            ),
            BadRequest(message) => (StatusCode::BAD_REQUEST, json!(message)),
            BodyTimeout(millis) => (
                StatusCode::REQUEST_TIMEOUT,
                json!(format!("Request body not received within {millis} ms")),
            ),
            Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!("Too many requests in flight on this replica, retry later"),
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!("Server shutting down, retry on another replica"),
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!("State store temporarily unavailable, retry later"),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!("Internal server error"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = self.status_and_detail();
        match &self {
            ApiError::Internal(reason) => tracing::error!(%reason, "internal error"),
            ApiError::Unavailable(reason) | ApiError::UpstreamUnreachable(reason) => {
                tracing::warn!(%reason, "dependency unavailable")
            }
            _ => {}
        }
        let mut response = (status, axum::Json(json!({ "detail": detail }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::python_repr;

    #[test]
    fn repr_matches_python() {
        assert_eq!(python_repr("never"), "'never'");
        assert_eq!(python_repr("it's"), "\"it's\"");
        assert_eq!(python_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(python_repr("tab\there\\"), "'tab\\there\\\\'");
        assert_eq!(python_repr("über/é"), "'über/é'");
        assert_eq!(python_repr("\u{1}"), "'\\x01'");
        // As Python 3.11 prints them.
        assert_eq!(python_repr("a\u{a0}b"), "'a\\xa0b'");
        assert_eq!(python_repr("\u{85}"), "'\\x85'");
        assert_eq!(python_repr("\u{2028}\u{2029}"), "'\\u2028\\u2029'");
        assert_eq!(
            python_repr("\u{ad}\u{200b}\u{feff}"),
            "'\\xad\\u200b\\ufeff'"
        );
        assert_eq!(python_repr("\u{e0001}"), "'\\U000e0001'");
        assert_eq!(python_repr("\u{7f}\u{3000}"), "'\\x7f\\u3000'");
        assert_eq!(python_repr("😀\u{e000}"), "'😀\\ue000'");
    }
}
