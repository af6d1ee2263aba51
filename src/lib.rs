//! airstate: Apache Airflow's task-state and asset-state API (AIP-103) served from Redis
//! by stateless replicas.
//!
//! A request travels through these modules in order:
//!
//! - [`http`]: routes for both API generations, Airflow's middleware (API version,
//!   correlation id, JWT, token refresh) and the mapping of every error to a response;
//! - [`auth`]: Airflow's execution JWTs validated locally (secret, private key or JWKS);
//! - [`identity`]: the task-instance UUID resolved to its (dag_id, run_id, task_id,
//!   map_index) scope, from Airflow's metastore or from token claims;
//! - [`store`]: the state itself, in Redis hashes via Lua scripts (or in memory for a
//!   zero-setup run).
//!
//! [`config`] reads the environment; [`serve`] wires it all and runs until SIGTERM.

pub mod auth;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod lifecycle;
pub mod migrate;
pub mod server;
pub mod store;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use config::{Config, IdentityMode};
use http::AppState;
use identity::metastore::MetastoreResolver;
use identity::{ClaimsResolver, IdentityResolver};
use store::memory::MemoryStore;
use store::redis::RedisStore;
use store::StateStore;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Keys(#[from] auth::KeyError),
    #[error("cannot start the state store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot start the identity resolver: {0}")]
    Identity(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Builds the shared state: keys, identity resolver and store, each checked once.
pub async fn build_state(config: &Config) -> Result<Arc<AppState>, StartError> {
    telemetry::metrics_handle();
    let auth = auth::Authenticator::new(&config.auth)?;
    auth.spawn_refresh(config.auth.jwks_refresh, config.auth.jwks_timeout);
    let mut oracle: Option<Arc<dyn store::lifecycle::Oracle>> = None;
    let identity: Arc<dyn IdentityResolver> = match (config.identity, &config.metastore) {
        (IdentityMode::Metastore, Some(settings)) => {
            let resolver = Arc::new(
                MetastoreResolver::new(settings)
                    .map_err(StartError::Identity)?
                    .with_registration_check(config.extensions.asset_registration_check),
            );
            oracle = Some(resolver.clone());
            resolver
        }
        _ => Arc::new(ClaimsResolver),
    };
    let buffer = store::events::BufferLimits {
        events: config.extensions.change_stream_buffer,
        bytes: config.extensions.change_stream_buffer_bytes,
    };
    let store: Arc<dyn StateStore> = match &config.redis {
        Some(settings) => {
            let store = RedisStore::connect_in_background(settings).await?;
            // Off, no subscriber connection is opened either.
            if config.extensions.change_streams {
                store.enable_change_streams(settings, buffer).await?;
            }
            Arc::new(store)
        }
        None => Arc::new(MemoryStore::new().with_event_limits(buffer)),
    };
    for warning in store.warnings().await {
        tracing::warn!("{warning}");
    }
    if let (Some(oracle), Some(settings)) = (oracle, config.reconcile) {
        // Runs for the life of the process, like the sweeper.
        drop(lifecycle::spawn(store.clone(), oracle, settings));
    }
    tracing::info!(store = %store.describe(), identity = %identity.describe(), keys = %auth.describe(), "airstate configured");
    if let Some(upstream) = &config.upstream {
        tracing::info!(upstream = %upstream.url, "forwarding every other request to Airflow's API server");
    }
    if config.redis.is_none() {
        tracing::warn!("no AIRSTATE_REDIS_URL: serving from the embedded in-memory store; state is lost on restart and not shared between replicas");
    }
    let state = Arc::new(AppState {
        store,
        identity,
        auth,
        shutting_down: AtomicBool::new(false),
        ready_timeout: Duration::from_secs(2),
        reached: http::Reached::default(),
        extensions: config.extensions.clone(),
        admin: config.admin.clone(),
        // Lazy: an upstream down at start-up is not fatal, state is served regardless.
        upstream: config.upstream.as_ref().map(http::forward::Upstream::new),
        serve_core_api: config.upstream.is_some() && config.identity == IdentityMode::Metastore,
        access_cache: http::core_api::AccessCache::new(
            config.access_cache_ttl,
            config.access_cache_capacity,
        ),
        limits: Arc::new(http::limits::RequestLimits::new(
            config.server.max_requests,
            config.server.max_body_bytes_in_flight,
            config.max_body_bytes,
        )),
    });
    // Once at start, so `airstate_dependency_up` exists before the first probe.
    drop(tokio::spawn({
        let state = state.clone();
        async move { http::check_dependencies(&state).await }
    }));
    Ok(state)
}

/// Serves until SIGTERM or Ctrl-C, then reports not-ready while still accepting for the
/// drain period, stops accepting and finishes in-flight requests for at most the grace
/// period.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let state = build_state(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(address = %local, "listening");
    let app = http::app(state.clone());
    let (phase, stopping) = server::Stopping::channel();
    let server = server::run(listener, app, config.server, stopping);
    let mut server = std::pin::pin!(server);
    let shutdown = async {
        shutdown_signal().await;
        // Still accepting: endpoints take a while to drop a replica that turns unready,
        // and until then new connections keep arriving. Each response asks its client
        // to reconnect, which by then reaches another replica.
        state.shutting_down.store(true, Ordering::Relaxed);
        let _ = phase.send(server::Phase::Draining);
        if !config.shutdown_drain.is_zero() {
            tracing::info!(
                seconds = config.shutdown_drain.as_secs(),
                "shutting down: not ready, still accepting"
            );
            tokio::time::sleep(config.shutdown_drain).await;
        }
        // Change streams never finish on their own: end them so the drain can.
        state.store.close_watches();
        // Stop accepting; idle connections and requests not yet fully received end now, so
        // one half-sent request cannot hold the exit for the whole grace period.
        let _ = phase.send(server::Phase::Stopping);
        tracing::info!("shutting down: finishing in-flight requests");
    };
    tokio::select! {
        _ = &mut server => {}
        _ = shutdown => {
            if tokio::time::timeout(config.shutdown_grace, &mut server).await.is_err() {
                tracing::warn!("grace period over; exiting with requests still in flight");
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
