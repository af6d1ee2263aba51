//! The floor the gateway's hot path is measured against (`benches/gateway.rs`): a bare
//! axum + fred server with one route doing one pooled HGET, no auth, no observability,
//! mimalloc and the same release profile. What airstate costs above it is its own layers.
//!
//! `cargo build --release --example floor`, then
//! `FLOOR_LISTEN=127.0.0.1:8080 FLOOR_REDIS_URL=redis://127.0.0.1:6379 FLOOR_KEY=h target/release/examples/floor`
//! serves `GET /{field}` as `HGET $FLOOR_KEY field` (404 when absent).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use fred::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    pool: Pool,
    key: String,
}

async fn hget(State(floor): State<Arc<Floor>>, Path(field): Path<String>) -> Response {
    match floor
        .pool
        .hget::<Option<String>, _, _>(&floor.key, field)
        .await
    {
        Ok(Some(value)) => ([(header::CONTENT_TYPE, "application/json")], value).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

#[tokio::main]
async fn main() {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let config = Config::from_url(&env("FLOOR_REDIS_URL")).expect("FLOOR_REDIS_URL");
    // One connection per core, as the gateway's default pool.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Builder::from_config(config)
        .build_pool(cores)
        .expect("fred pool");
    pool.init().await.expect("Redis reachable");
    let floor = Arc::new(Floor {
        pool,
        key: env("FLOOR_KEY"),
    });
    let app = axum::Router::new()
        .route("/{field}", axum::routing::get(hget))
        .with_state(floor);
    let listener = tokio::net::TcpListener::bind(env("FLOOR_LISTEN"))
        .await
        .expect("FLOOR_LISTEN bindable");
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        term.recv().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .expect("serve");
}
