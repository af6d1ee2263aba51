//! Extractors that run Airflow's checks in Airflow's order: bearer present (401), token
//! valid (403), token type (403), `ti:self` (403), then parameters and body (422).
//! Axum runs parts extractors before the body one, so a request with a bad token never
//! has its body read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use uuid::Uuid;

use super::error::{ApiError, ValidationIssue};
use super::AppState;
use crate::auth::{AuthError, Claims, TokenScope};

/// The outcome of authentication, left in the request's extensions by the auth
/// middleware so that it can also decide on a refreshed token after the handler.
#[derive(Clone)]
pub struct AuthOutcome(pub Result<Arc<Claims>, AuthError>);

/// A valid `execution` token.
pub struct ExecutionToken(pub Arc<Claims>);

impl<S: Send + Sync> FromRequestParts<S> for ExecutionToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let outcome = parts
            .extensions
            .get::<AuthOutcome>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("auth middleware missing".into()))?;
        let claims = outcome.0?;
        if claims.scope != TokenScope::Execution {
            metrics::counter!("airstate_jwt_failures_total", "reason" => "token_type").increment(1);
            return Err(ApiError::TokenType(claims.scope));
        }
        Ok(ExecutionToken(claims))
    }
}

/// A task route's caller: an execution token whose subject is the path's task instance
/// (`ti:self`), and the key from the path when the route has one.
pub struct TaskCaller {
    pub claims: Arc<Claims>,
    pub task_instance: Uuid,
    pub key: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for TaskCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ExecutionToken(claims) = ExecutionToken::from_request_parts(parts, state).await?;
        // Borrowed, not a `Path<HashMap<..>>`: that allocates a map and a string per
        // parameter on every request.
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                let message = match rejection {
                    RawPathParamsRejection::InvalidUtf8InPathParam(invalid) => {
                        format!("Invalid URL: {}", invalid.body_text())
                    }
                    other => other.body_text(),
                };
                ValidationIssue::new("string_type", &["path"], message, serde_json::Value::Null)
            })?;
        let (mut raw, mut key) = ("", None);
        for (name, value) in &params {
            match name {
                "task_instance_id" => raw = value,
                "key" => key = Some(value.to_owned()),
                _ => {}
            }
        }
        // Airflow compares the canonical form of the subject with the path text, so an
        // upper-case or dash-less UUID in the path is refused even for the right token.
        let mut canonical = [0u8; uuid::fmt::Hyphenated::LENGTH];
        if *claims.subject.hyphenated().encode_lower(&mut canonical) != *raw {
            metrics::counter!("airstate_jwt_failures_total", "reason" => "subject").increment(1);
            return Err(ApiError::SubjectMismatch);
        }
        Ok(TaskCaller {
            task_instance: claims.subject,
            claims,
            key,
        })
    }
}

/// The raw request body plus whether it was declared as JSON; a body over the cap
/// (`AIRSTATE_MAX_BODY_BYTES`, from the state) is a 413 with our error body.
pub struct JsonBody {
    pub content_type: Option<String>,
    pub bytes: Bytes,
}

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, app: &Arc<AppState>) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let limit = app.limits.max_body_bytes();
        let bytes = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|error| read_error(&error, limit))?;
        Ok(JsonBody {
            content_type,
            bytes,
        })
    }
}

/// Why a body read to its end by [`axum::body::to_bytes`] failed: over the cap, cut by
/// the server (too slow, or the replica stopping), or broken by the client (400, not a 500
/// with an ERROR log line).
pub(crate) fn read_error(error: &axum::Error, limit: usize) -> ApiError {
    if let Some(cut) = find_in_chain::<crate::server::BodyCut>(error) {
        return cut.into();
    }
    if find_in_chain::<http_body_util::LengthLimitError>(error).is_some() {
        return ApiError::PayloadTooLarge(limit);
    }
    tracing::debug!(%error, "malformed request body");
    ApiError::BadRequest(MALFORMED_BODY)
}

const MALFORMED_BODY: &str = "Malformed or truncated request body (invalid chunked encoding, or fewer bytes than Content-Length)";

/// The first error of type `T` in `error`'s source chain.
pub(crate) fn find_in_chain<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        next = error.source();
    }
    None
}

/// Query parameters as Starlette reads them: the last of repeated names wins.
pub fn query_params(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}
