//! Conditional requests: the `ETag` of every read and write of a key, and the
//! `If-Match` / `If-None-Match` preconditions (412 on a write, 304 on a GET) that the core
//! task and asset routes and the extensions share.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::header::{ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::store::version::Tags;
use crate::store::{Condition, Written};
/// `"<version>"`: a strong entity tag.
pub fn etag(version: &str) -> Option<HeaderValue> {
    HeaderValue::try_from(["\"", version, "\""].concat()).ok()
}

/// Adds the `ETag` of `version` to `response`.
pub fn with_etag(mut response: Response, version: Option<&str>) -> Response {
    if let Some(value) = version.and_then(etag) {
        response.headers_mut().insert(ETAG, value);
    }
    response
}

/// A request's precondition, read from its headers where they are (extracting the whole
/// `HeaderMap` copies it). A malformed one is kept, not refused here: the handler checks
/// the key and the body first and asks for the condition after them, so a request with
/// several faults gets the same error as before.
pub struct Precondition(Result<Condition, ApiError>);

impl Precondition {
    pub fn condition(self) -> Result<Condition, ApiError> {
        self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Precondition {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Precondition(condition(&parts.headers)))
    }
}

/// The precondition a request carries; [`Condition::NONE`] when it sends neither header.
pub fn condition(headers: &HeaderMap) -> Result<Condition, ApiError> {
    Ok(Condition {
        // If-Match uses the strong comparison: a weak tag never matches (RFC 9110 §13.1.1).
        if_match: tags(headers, IF_MATCH, false)?,
        // If-None-Match uses the weak comparison: `W/"v"` matches `"v"`.
        if_none_match: tags(headers, IF_NONE_MATCH, true)?,
    })
}

fn tags(headers: &HeaderMap, name: HeaderName, weak_ok: bool) -> Result<Option<Tags>, ApiError> {
    let mut values = headers.get_all(&name).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let bad = |why: &str| ApiError::BadHeader(format!("Invalid {name} header: {why}"));
    let mut listed = Vec::new();
    let mut any = false;
    for value in values {
        let text = value.to_str().map_err(|_| bad("not visible ASCII"))?;
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            if part == "*" {
                any = true;
                continue;
            }
            let (weak, quoted) = match part.strip_prefix("W/") {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            let tag = quoted
                .strip_prefix('"')
                .and_then(|rest| rest.strip_suffix('"'))
                .filter(|tag| !tag.contains('"'))
                .ok_or_else(|| bad("expected * or a list of quoted entity tags"))?;
            if !weak || weak_ok {
                listed.push(tag.to_owned());
            }
        }
    }
    match (any, listed.is_empty()) {
        (true, true) => Ok(Some(Tags::Any)),
        (true, false) => Err(bad("* cannot be combined with entity tags")),
        (false, _) if headers.get_all(&name).iter().all(|v| v.is_empty()) => {
            Err(bad("empty value"))
        }
        (false, _) => Ok(Some(Tags::Listed(listed))),
    }
}

/// The reply to a conditional write: the usual 204 (with the new `ETag` after a set), or
/// 412 when the condition failed.
pub fn written_response(written: Written, ok: Response) -> Result<Response, ApiError> {
    match written {
        Written::Applied(version) => Ok(with_etag(ok, version.as_deref())),
        Written::PreconditionFailed => Err(ApiError::PreconditionFailed),
    }
}

/// A GET whose `If-None-Match` names the current version: 304 with the `ETag`, no body.
pub fn not_modified(condition: &Condition, version: &str) -> Option<Response> {
    let tags = condition.if_none_match.as_ref()?;
    let unchanged = Condition {
        if_match: None,
        if_none_match: Some(tags.clone()),
    };
    if unchanged.allows(Some(version)) {
        return None;
    }
    Some(with_etag(
        StatusCode::NOT_MODIFIED.into_response(),
        Some(version),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(if_match: &[&str], if_none_match: &[&str]) -> Result<Condition, ApiError> {
        let mut headers = HeaderMap::new();
        for value in if_match {
            headers.append(IF_MATCH, HeaderValue::from_str(value).unwrap());
        }
        for value in if_none_match {
            headers.append(IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
        }
        condition(&headers)
    }

    fn listed(tags: &[&str]) -> Option<Tags> {
        Some(Tags::Listed(tags.iter().map(|t| t.to_string()).collect()))
    }

    #[test]
    fn headers_become_conditions() {
        assert_eq!(parse(&[], &[]).unwrap(), Condition::NONE);
        let c = parse(&["\"a\", W/\"b\"", "\"c\""], &["W/\"d\""]).unwrap();
        assert_eq!(c.if_match, listed(&["a", "c"]));
        assert_eq!(c.if_none_match, listed(&["d"]));
        assert_eq!(parse(&[], &["*"]).unwrap().if_none_match, Some(Tags::Any));
        // Only weak tags in If-Match: nothing can match, rather than no condition.
        assert_eq!(parse(&["W/\"a\""], &[]).unwrap().if_match, listed(&[]));
    }

    #[test]
    fn malformed_headers_are_400s() {
        for (m, n) in [
            (&["abc"][..], &[][..]),
            (&["*, \"a\""], &[]),
            (&[], &["\"a"]),
            (&[""], &[]),
        ] {
            let error = parse(m, n).unwrap_err();
            assert!(matches!(error, ApiError::BadHeader(_)), "{m:?} {n:?}");
        }
    }
}
