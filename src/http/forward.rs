//! The front door: every request airstate does not serve itself goes on to Airflow's API
//! server (`AIRSTATE_AIRFLOW_API_URL`), so workers point their whole Execution API and the
//! browser its UI at one URL.
//!
//! Bodies stream both ways through hyper's pooled client: a replica holds a few frames of a
//! large XCom at a time, never the whole body. Framing is never copied from the client:
//! hyper decodes the incoming body and encodes the outgoing one afresh, and a request whose
//! `Content-Length` and `Transfer-Encoding` disagree is refused here, so no request can be
//! read one way by airstate and another way by Airflow (request smuggling).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{PathAndQuery, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::Instrument;

use super::error::ApiError;
use super::AppState;
use crate::config::UpstreamSettings;

/// Marks a response that came from the upstream, so request metrics and spans label it
/// `forwarded` rather than by a route template.
#[derive(Clone, Copy)]
pub struct Forwarded;

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

/// A pooled HTTP/1.1 client to Airflow's API server.
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    base: Uri,
    response_timeout: Duration,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the message,
/// so a proxy drops them, and also every header the `Connection` header names.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Upstream {
    pub fn new(settings: &UpstreamSettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(settings.pool_idle)
            .pool_idle_timeout(settings.pool_idle_timeout)
            .build(connector);
        Self {
            client,
            base: settings.url.clone(),
            response_timeout: settings.response_timeout,
        }
    }

    pub fn describe(&self) -> String {
        self.base.to_string()
    }

    /// The upstream URI for a request's path and query: the configured prefix, then the
    /// path as the client sent it (still percent-encoded, so `%2F` stays `%2F`).
    fn target(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, ForwardError> {
        let prefix = self.base.path().trim_end_matches('/');
        let rest = path_and_query.map_or("/", PathAndQuery::as_str);
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(
            format!("{prefix}{rest}")
                .parse()
                .map_err(|_| ForwardError::BadRequest("Invalid request target"))?,
        );
        Uri::from_parts(parts).map_err(|_| ForwardError::BadRequest("Invalid request target"))
    }

    /// Sends `request` on, as a proxy: hop-by-hop headers dropped, `X-Forwarded-*` set,
    /// everything else (credentials, cookies, `traceparent`, `correlation-id`) unchanged.
    pub async fn send(
        &self,
        mut request: Request,
        peer: Option<SocketAddr>,
    ) -> Result<Response, ForwardError> {
        refuse_ambiguous_framing(request.headers())?;
        let target = self.target(request.uri().path_and_query())?;
        let original_host = request.headers().get(header::HOST).cloned();
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(peer) = peer {
            append_forwarded_for(headers, peer);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        if let Some(host) = original_host {
            if !headers.contains_key(&X_FORWARDED_HOST) {
                headers.insert(X_FORWARDED_HOST, host);
            }
        }
        crate::telemetry::inject_trace_context(headers);
        *request.uri_mut() = target;
        // hyper's client speaks HTTP/1.1 to the upstream whatever the client spoke to us.
        *request.version_mut() = axum::http::Version::HTTP_11;

        let pending = self.client.request(request);
        let mut response = match tokio::time::timeout(self.response_timeout, pending).await {
            Err(_) => return Err(ForwardError::Timeout(self.response_timeout.as_millis())),
            Ok(Err(error)) => return Err(ForwardError::Unreachable(describe_error(&error))),
            Ok(Ok(response)) => response,
        };
        strip_hop_by_hop(response.headers_mut());
        let mut response = response.map(Body::new);
        response.extensions_mut().insert(Forwarded);
        Ok(response)
    }

    /// Whether the upstream answers at all, for `/ready`'s report (any HTTP status counts:
    /// an answer proves the server is there).
    pub async fn check(&self, timeout: Duration) -> Result<u16, ForwardError> {
        let target = self.target(Some(&PathAndQuery::from_static("/api/v2/monitor/health")))?;
        let request = Request::get(target)
            .body(Body::empty())
            .map_err(|_| ForwardError::BadRequest("Invalid request target"))?;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(ForwardError::Timeout(timeout.as_millis())),
            Ok(Err(error)) => Err(ForwardError::Unreachable(describe_error(&error))),
            Ok(Ok(response)) => Ok(response.status().as_u16()),
        }
    }

    /// Sends a request built by airstate itself (an access check) and returns the status,
    /// headers and the body, read up to `max_body` bytes.
    pub async fn ask(
        &self,
        request: axum::http::Request<Body>,
        max_body: usize,
    ) -> Result<(axum::http::response::Parts, axum::body::Bytes), ForwardError> {
        let target = self.target(request.uri().path_and_query())?;
        let (mut parts, body) = request.into_parts();
        parts.uri = target;
        let request = axum::http::Request::from_parts(parts, body);
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| ForwardError::Unreachable(describe_error(&error)))?;
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(Body::new(body), max_body)
                .await
                .map_err(|error| ForwardError::Unreachable(error.to_string()))?;
            Ok((parts, bytes))
        };
        tokio::time::timeout(self.response_timeout, exchange)
            .await
            .map_err(|_| ForwardError::Timeout(self.response_timeout.as_millis()))?
    }
}

/// A request carrying both framings, or a transfer coding besides `chunked` (which hyper
/// removes, so the upstream would get coded bytes it was not told about), could be read
/// differently by another server: refuse it (RFC 9112 §6.1).
fn refuse_ambiguous_framing(headers: &HeaderMap) -> Result<(), ForwardError> {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("\u{0}").split(','))
        .map(str::trim)
        .filter(|coding| !coding.is_empty())
        .peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(ForwardError::BadRequest(
            "Both Content-Length and Transfer-Encoding were sent",
        ));
    }
    let only_chunked = codings
        .enumerate()
        .all(|(i, coding)| i == 0 && coding.eq_ignore_ascii_case("chunked"));
    if !only_chunked {
        return Err(ForwardError::BadRequest(
            "Transfer-Encoding other than chunked is not accepted",
        ));
    }
    Ok(())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Upgrade` only means something with `Connection: upgrade`, which is gone; and
    // `TE: trailers` is the one TE value a proxy may keep, but hyper adds what it needs.
    headers.remove(header::UPGRADE);
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers
        .get(&X_FORWARDED_FOR)
        .and_then(|value| value.to_str().ok())
    {
        Some(earlier) if !earlier.trim().is_empty() => format!("{earlier}, {ip}"),
        _ => ip,
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

/// hyper-util's errors say "client error (Connect)"; the cause says what happened.
fn describe_error(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The router's fallback when an upstream is configured.
pub async fn forward(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let Some(upstream) = app.upstream.as_ref() else {
        return ApiError::RouteNotFound.into_response();
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let span = tracing::info_span!(
        "forward",
        otel.kind = "client",
        http.request.method = %request.method(),
        server.address = %upstream.describe(),
        http.response.status_code = tracing::field::Empty,
    );
    let outcome = upstream.send(request, peer).instrument(span.clone()).await;
    match outcome {
        Ok(response) => {
            span.record("http.response.status_code", response.status().as_u16());
            response
        }
        Err(error) => {
            let kind = match &error {
                ForwardError::Unreachable(_) => "unreachable",
                ForwardError::Timeout(_) => "timeout",
                ForwardError::BadRequest(_) => "bad_request",
            };
            metrics::counter!("airstate_forward_errors_total", "kind" => kind).increment(1);
            if !matches!(error, ForwardError::BadRequest(_)) {
                tracing::warn!(error = %error, "forwarding failed");
            }
            let mut response = ApiError::from(error).into_response();
            response.extensions_mut().insert(Forwarded);
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn framing_must_be_unambiguous() {
        assert!(refuse_ambiguous_framing(&headers(&[("content-length", "3")])).is_ok());
        assert!(refuse_ambiguous_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(refuse_ambiguous_framing(&headers(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "3")
        ]))
        .is_err());
        assert!(refuse_ambiguous_framing(&headers(&[("transfer-encoding", "gzip")])).is_err());
        assert!(
            refuse_ambiguous_framing(&headers(&[("transfer-encoding", "gzip, chunked")])).is_err()
        );
        assert!(refuse_ambiguous_framing(&headers(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "identity")
        ]))
        .is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut map = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("authorization", "Bearer t"),
            ("cookie", "session=1"),
        ]);
        strip_hop_by_hop(&mut map);
        let left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["authorization", "cookie"]);
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut map = headers(&[("x-forwarded-for", "192.0.2.1")]);
        append_forwarded_for(&mut map, peer);
        assert_eq!(map["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        let mut map = HeaderMap::new();
        append_forwarded_for(&mut map, peer);
        assert_eq!(map["x-forwarded-for"], "10.1.2.3");
    }

    #[test]
    fn targets_keep_the_prefix_and_the_encoded_path() {
        let upstream = Upstream::new(&UpstreamSettings {
            url: "http://airflow:8080/base/".parse().unwrap(),
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_idle: 1,
            pool_idle_timeout: Duration::from_secs(1),
        });
        let path = PathAndQuery::from_static("/execution/xcoms/a%2Fb?x=1");
        assert_eq!(
            upstream.target(Some(&path)).unwrap().to_string(),
            "http://airflow:8080/base/execution/xcoms/a%2Fb?x=1"
        );
    }
}
