//! Airflow's answers to a method a path does not serve. Each FastAPI route has exactly
//! one method, and Starlette's 405 names the methods of the first route whose path
//! matched, not all of them: `POST` on a key says `allow: GET`, `GET` on the clear path
//! says `allow: DELETE`. FastAPI routes never add `HEAD`, so a `HEAD` is a 405 too,
//! where axum would run the GET handler.

use std::collections::HashMap;
use std::future::Future;
use std::sync::OnceLock;

use axum::extract::{MatchedPath, Request};
use axum::http::header::ALLOW;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::routes;

/// The method of the first route of each template, in the route table's order (which
/// follows Airflow's registration order for Airflow's routes).
fn first_methods() -> &'static HashMap<&'static str, HeaderValue> {
    static FIRST: OnceLock<HashMap<&'static str, HeaderValue>> = OnceLock::new();
    FIRST.get_or_init(|| {
        let mut first = HashMap::new();
        for route in routes::table() {
            first.entry(route.operation.path).or_insert_with(|| {
                HeaderValue::from_static(match route.operation.method {
                    "get" => "GET",
                    "put" => "PUT",
                    "post" => "POST",
                    "patch" => "PATCH",
                    _ => "DELETE",
                })
            });
        }
        first
    })
}

pub async fn airflow_methods<F, Fut>(request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let Some(template) = request.extensions().get::<MatchedPath>().cloned() else {
        return next(request).await;
    };
    let Some(allow) = first_methods().get(template.as_str()).cloned() else {
        return next(request).await;
    };
    // Only Airflow's own routes; the gateway's (`/health`, the admin API) keep axum's HEAD.
    let airflows = ["/execution/", "/api/v2/"]
        .iter()
        .any(|prefix| template.as_str().starts_with(prefix));
    let hidden = template.as_str().starts_with("/execution/")
        && super::predates_state_routes(request.headers());
    let mut response = if airflows && request.method() == Method::HEAD {
        ApiError::MethodNotAllowed.into_response()
    } else {
        next(request).await
    };
    if response.status() == StatusCode::METHOD_NOT_ALLOWED && hidden {
        return ApiError::RouteNotFound.into_response();
    }
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(ALLOW, allow);
    }
    response
}
