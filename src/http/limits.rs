//! Load shedding: a replica takes at most so many requests, and so many request-body bytes,
//! at a time; past either it answers a 503 with `Retry-After` at once. Queuing instead
//! would only move the overload into memory (128 concurrent 1 MiB PUTs OOM-killed a
//! 256 MiB replica).
//!
//! A request counts from its headers until its handler has returned a response: a change
//! stream, whose body runs for hours, stops counting once its handler has answered.

use std::future::Future;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;

/// The two budgets, shared by every request of the replica.
pub struct RequestLimits {
    requests: Arc<Semaphore>,
    body_bytes: Arc<Semaphore>,
    /// A body's reservation when it declares no length (chunked): the most it may be.
    max_body_bytes: usize,
}

impl RequestLimits {
    pub fn new(
        max_requests: usize,
        max_body_bytes_in_flight: usize,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(max_requests)),
            body_bytes: Arc::new(Semaphore::new(max_body_bytes_in_flight)),
            max_body_bytes,
        }
    }

    /// The most one request's body may be (`AIRSTATE_MAX_BODY_BYTES`).
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The body bytes `request` may bring: its declared length (capped: a larger one is
    /// refused by the body limit anyway), the body cap when it streams, none otherwise.
    fn body_reservation(&self, request: &Request) -> usize {
        let headers = request.headers();
        if let Some(length) = headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
        {
            return usize::try_from(length)
                .unwrap_or(usize::MAX)
                .min(self.max_body_bytes);
        }
        if headers.contains_key(TRANSFER_ENCODING) {
            return self.max_body_bytes;
        }
        0
    }
}

/// Probes and scrapes are never shed: an overloaded replica that also failed its
/// liveness probe would be restarted, and its metrics are what shows the overload.
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

pub async fn shed<F, Fut>(limits: &RequestLimits, request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    if exempt(request.uri().path()) {
        return next(request).await;
    }
    let Ok(_request) = limits.requests.clone().try_acquire_owned() else {
        metrics::counter!("airstate_requests_shed_total", "reason" => "requests").increment(1);
        return ApiError::Overloaded.into_response();
    };
    let reserve = limits.body_reservation(&request);
    let _bytes = if reserve == 0 {
        None
    } else {
        let permits = u32::try_from(reserve).unwrap_or(u32::MAX);
        match limits.body_bytes.clone().try_acquire_many_owned(permits) {
            Ok(permit) => Some(permit),
            Err(_) => {
                metrics::counter!("airstate_requests_shed_total", "reason" => "body_bytes")
                    .increment(1);
                return ApiError::Overloaded.into_response();
            }
        }
    };
    next(request).await
}
